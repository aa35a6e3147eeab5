//! The bed that benchmarks 2-4 share: a simulated Kubernetes cluster (`beamredir_testbed`'s
//! [`SimCluster`]) running `xtask/bench/cluster.yaml`, and the namespaces the comparison cases
//! need next to beamredir's path:
//!
//! * **workstation** (the cluster's own): the API server on 127.0.0.1, `beamredir up` and the
//!   clients it runs (`beamredir exec`). No route to any pod IP.
//! * **direct** (`brbd…`): the one namespace with a route to the pods: a veth pair per pod,
//!   10.250.0.1 on its loopback, `POD_IP/32 dev bdN` here and `10.250.0.1/32 dev bdpN` in the pod.
//!   Only between these namespaces: nothing is routed anywhere else.
//! * **relay** (`brbr…`): two plain TCP relays in a chain, `127.0.0.1:R1 → 127.0.0.1:R2 →
//!   127.0.0.1:9100 inside the pod` (dialled from inside the pod's namespace, as the kubelet
//!   does): the same hops as beamredir's client → forward → API server → pod.
//!
//! Everything goes on drop, in field order, also on error or Ctrl-C.
use std::{
    io::{BufRead, BufReader, Read},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use beamredir_testbed::{
    DelayRelay, Netns, Proc, TempDir,
    cluster::{IpAllocation, SimCluster},
    recipe::KubectlRecipe,
    unique,
};
use serde_json::Value;

use super::{check_interrupted, run_bounded, run_cleanup};

pub const TUNNEL_POD: &str = "tunnel-0";
pub const ERL_POD: &str = "erl-0";
/// tunnel_bench's server in the tunnel pod (its declared `dist` port).
pub const TUNNEL_PORT: u16 = 9100;
/// The erl pod's epmd and distribution ports (cluster.yaml).
pub const ERL_EPMD_PORT: u16 = 4369;
pub const ERL_DIST_PORT: u16 = 9000;
pub const COOKIE: &str = "benchcookie";
/// The direct namespace's own address (on its loopback; the pods route it back over the veth).
const DIRECT_SRC: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);

/// The manifest, with the server's path filled in.
/// Erlang expressions (for `erl -eval`, each ending in a comma) that time `rpc:call(Node,
/// erlang, node, [])`: `T(F)` times a fun in ns, `warmup` untimed calls, then `Ts` (`calls`
/// timings, sorted), `N` and the percentile fun `P(Q)`. `Node` must be bound before, and none
/// of `T`, `Call`, `Ts`, `N`, `P`, `TimedFrom` (a variable bound outside a fun is matched, not
/// bound, inside it).
pub fn erl_rpc_timing(warmup: u32, calls: u32) -> String {
    format!(
        r#"T = fun(F) -> TimedFrom = erlang:monotonic_time(nanosecond), F(), erlang:monotonic_time(nanosecond) - TimedFrom end,
Call = fun() -> Node = rpc:call(Node, erlang, node, []) end,
[Call() || _ <- lists:seq(1, {warmup})],
Ts = lists:sort([T(Call) || _ <- lists:seq(1, {calls})]),
N = length(Ts),
P = fun(Q) -> lists:nth(max(1, min(N, round(Q / 100 * N))), Ts) end,
"#
    )
}

pub fn manifest(tunnel_bench: &Path) -> String {
    include_str!("../../bench/cluster.yaml").replace("@TUNNEL_BENCH@", &tunnel_bench.display().to_string())
}

/// Lines of a child's output as they arrive, each with its arrival time.
pub type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

fn collect_lines(pipe: impl Read + Send + 'static, lines: Lines) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            lines.lock().unwrap().push((Instant::now(), line));
        }
    });
}

/// A `beamredir up` session in the workstation namespace, with a state dir of its own (so its
/// clean-up, `down --all`, touches nothing else). Ended on drop.
pub struct UpSession {
    pub name: String,
    pub started: Instant,
    pub pid: u32,
    pub stderr: Lines,
    proc: Option<Proc>,
    ws: PathBuf,
    kubeconfig: PathBuf,
    bin: PathBuf,
    state: TempDir,
}

impl UpSession {
    /// Starts `beamredir [-v] up --pod P… --session NAME`; does not wait (see [`UpSession::wait_up`]).
    pub fn start(cluster: &SimCluster, bin: &Path, pods: &[&str], verbose: bool) -> Result<Self> {
        Self::start_at(&cluster.ws.path(), &cluster.kubeconfig, bin, pods, verbose, &[])
    }

    /// [`UpSession::start`] in namespace `ws` with `kubeconfig`, with extra environment.
    pub fn start_at(ws: &Path, kubeconfig: &Path, bin: &Path, pods: &[&str], verbose: bool, env: &[(&str, &str)]) -> Result<Self> {
        let state = TempDir::new("brbench-up")?;
        let mut s = UpSession {
            name: unique("bup"),
            started: Instant::now(),
            pid: 0,
            stderr: Lines::default(),
            proc: None,
            ws: ws.to_path_buf(),
            kubeconfig: kubeconfig.to_path_buf(),
            bin: bin.to_path_buf(),
            state,
        };
        let mut cmd = s.beamredir();
        if verbose {
            cmd.arg("-v");
        }
        cmd.args(["up", "--session", &s.name]);
        for p in pods {
            cmd.args(["--pod", p]);
        }
        cmd.envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        s.started = Instant::now();
        let mut child = cmd.spawn().context("starting beamredir up")?;
        // nsenter --net execs beamredir in place (it forks only for a PID namespace).
        s.pid = child.id();
        collect_lines(child.stderr.take().unwrap(), s.stderr.clone());
        s.proc = Some(Proc(child));
        Ok(s)
    }

    /// Waits for the banner ("… is up (pid N)."); returns when its line arrived.
    pub fn wait_up(&mut self, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            if let Some((t, _)) = self.stderr.lock().unwrap().iter().find(|(_, l)| l.contains(" is up (pid ")) {
                return Ok(*t);
            }
            if let Some(status) = self.proc.as_mut().unwrap().0.try_wait()? {
                thread::sleep(Duration::from_millis(100));
                bail!("beamredir up exited early ({status}): {}", self.log());
            }
            if Instant::now() > deadline {
                bail!("beamredir up did not come up within {timeout:?}: {}", self.log());
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// `beamredir --state-dir D ARGS` in the workstation namespace, against the cluster.
    pub fn beamredir(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ws.display()))
            .arg("--")
            .arg(&self.bin)
            .arg("--state-dir")
            .arg(self.state.path())
            .env("KUBECONFIG", &self.kubeconfig);
        // What `exec` starts then runs as root like the other cases' clients.
        cmd.env_remove("SUDO_UID").env_remove("SUDO_GID").env_remove("SUDO_USER");
        cmd
    }

    /// `PROGRAM` run in the session (`beamredir exec`).
    pub fn exec(&self, program: &Path) -> Command {
        let mut cmd = self.beamredir();
        cmd.args(["-q", "exec", "--session", &self.name, "--"]).arg(program);
        cmd
    }

    /// This session's `status --json` entry.
    pub fn status(&self) -> Option<Value> {
        let out = run_bounded(self.beamredir().args(["status", "--json"]), Duration::from_secs(10)).ok()?;
        let all: Value = serde_json::from_str(&out).ok()?;
        all.as_array()?.iter().find(|s| s["name"] == self.name.as_str()).cloned()
    }

    /// beamredir's memory in KiB, summed over the `up` process and its children (the
    /// unprivileged network part, which holds the forwards, and the reaper): (Pss, Pss_Anon,
    /// VmRSS, VmHWM). Pss shares each page among the processes that map it (the three map the
    /// same binary), so its sum is what beamredir costs the machine; the VmRSS sum counts the
    /// shared pages three times. The peak is the sum of each process's own (an upper bound).
    pub fn memory_kib(&self) -> Result<Memory> {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid)).unwrap_or_default();
        ensure!(comm.trim() == "beamredir", "process {} is {:?}, not beamredir", self.pid, comm.trim());
        let mut m = Memory::default();
        let field = |text: &str, name: &str| -> u64 {
            text.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
        };
        for pid in process_tree(self.pid) {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            m.pss += field(&rollup, "Pss:");
            m.pss_anon += field(&rollup, "Pss_Anon:");
            m.rss += field(&status, "VmRSS:");
            m.hwm += field(&status, "VmHWM:");
        }
        Ok(m)
    }
}

/// See [`UpSession::memory_kib`].
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    pub pss: u64,
    pub pss_anon: u64,
    pub rss: u64,
    pub hwm: u64,
}

/// A process and its descendants (from /proc/PID/task/*/children).
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        for task in std::fs::read_dir(format!("/proc/{p}/task")).into_iter().flatten().flatten() {
            if let Ok(children) = std::fs::read_to_string(task.path().join("children")) {
                all.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            }
        }
        i += 1;
    }
    all
}

impl Drop for UpSession {
    fn drop(&mut self) {
        let _ = run_cleanup(self.beamredir().args(["-q", "down", "--session", &self.name]), Duration::from_secs(15));
        if let Some(mut proc) = self.proc.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(proc.0.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
            drop(proc); // kills it if it is still there
        }
        let _ = run_cleanup(self.beamredir().args(["-q", "down", "--all"]), Duration::from_secs(15));
    }
}

/// A long-running helper (a relay) that prints one JSON line when ready. Killed on drop.
pub struct Helper {
    pub ready: Value,
    pub pid: u32,
    _proc: Proc,
}

impl Helper {
    pub fn start(cmd: &mut Command, timeout: Duration) -> Result<Self> {
        let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().with_context(|| format!("starting {cmd:?}"))?;
        let stdout = child.stdout.take().unwrap();
        let stderr = Lines::default();
        collect_lines(child.stderr.take().unwrap(), stderr.clone());
        let proc = Proc(child);
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(timeout).map_err(|_| anyhow::anyhow!("{cmd:?}: not ready within {timeout:?}"))?;
        let ready: Value = serde_json::from_str(line.trim()).with_context(|| {
            let err: Vec<String> = stderr.lock().unwrap().iter().map(|l| l.1.clone()).collect();
            format!("{cmd:?} said {line:?} {}", err.join(" "))
        })?;
        ensure!(ready["ready"] == true, "{cmd:?} said {ready}");
        Ok(Helper { ready, pid: proc.0.id(), _proc: proc })
    }
}

/// The whole bed. Fields drop in order: sessions, relays and namespaces before the cluster.
pub struct Bed {
    /// `beamredir up --pod tunnel-0`.
    pub session: UpSession,
    /// `beamredir up --pod erl-0`. One pod per session: with two `--pod` names, each name's
    /// watch takes the other pod for deleted when it (re)lists (see docs/performance.md).
    pub erl_session: UpSession,
    /// Kept alive for the bed's lifetime (killed on drop).
    pub _relays: Vec<Helper>,
    /// Where the relay chain starts (in `relay_ns`).
    pub relay_port: u16,
    pub relay_ns: Netns,
    pub direct: Netns,
    pub tunnel_ip: Ipv4Addr,
    pub erl_ip: Ipv4Addr,
    pub tunnel_bench: PathBuf,
    pub beamredir: PathBuf,
    pub cluster: SimCluster,
}

impl Bed {
    pub fn start(tunnel_bench: &Path, beamredir: &Path) -> Result<Self> {
        let t = Instant::now();
        // Freed addresses are reused at once (as Calico's or Cilium's IPAM do): a restarted pod
        // gets its address back, so its node name (app@POD_IP) and the recipe's DNAT rules stay
        // valid and the restart benchmark compares the forwards alone.
        let cluster = SimCluster::options()
            .ip_allocation(IpAllocation::LowestFree)
            .start(&manifest(tunnel_bench))
            .context("starting the simulated cluster")?;
        check_interrupted()?;
        let tunnel_ip = cluster.pod_ip(TUNNEL_POD).context("no tunnel pod IP")?;
        let erl_ip = cluster.pod_ip(ERL_POD).context("no erl pod IP")?;
        let pod_ns = |pod: &str| cluster.kubelet.netns_of("default", pod).with_context(|| format!("no namespace for pod {pod}"));
        let (tunnel_ns, erl_ns) = (pod_ns(TUNNEL_POD)?, pod_ns(ERL_POD)?);

        let direct = Netns::new("brbd")?;
        direct.add_address(DIRECT_SRC)?;
        for (i, (ns_path, ip)) in [(&tunnel_ns, tunnel_ip), (&erl_ns, erl_ip)].into_iter().enumerate() {
            link_direct(&direct, ns_path, ip, i)?;
        }

        let relay_ns = Netns::new("brbr")?;
        let relay2 = Helper::start(
            relay_ns
                .command(tunnel_bench)
                .args(["relay", "--listen-port", "0", "--target", &format!("127.0.0.1:{TUNNEL_PORT}"), "--target-netns"])
                .arg(&tunnel_ns),
            Duration::from_secs(10),
        )?;
        let port2 = relay2.ready["port"].as_u64().context("relay port")?;
        let relay1 = Helper::start(
            relay_ns.command(tunnel_bench).args(["relay", "--listen-port", "0", "--target", &format!("127.0.0.1:{port2}")]),
            Duration::from_secs(10),
        )?;
        let relay_port = relay1.ready["port"].as_u64().context("relay port")? as u16;

        let mut session = UpSession::start(&cluster, beamredir, &[TUNNEL_POD], false)?;
        session.wait_up(Duration::from_secs(60))?;
        let mut erl_session = UpSession::start(&cluster, beamredir, &[ERL_POD], false)?;
        erl_session.wait_up(Duration::from_secs(60))?;
        println!("  simulated cluster, namespaces and `beamredir up` ready in {:.1} s (tunnel pod {tunnel_ip}, erl pod {erl_ip})", t.elapsed().as_secs_f64());
        Ok(Bed {
            session,
            erl_session,
            _relays: vec![relay1, relay2],
            relay_port,
            relay_ns,
            direct,
            tunnel_ip,
            erl_ip,
            tunnel_bench: tunnel_bench.to_path_buf(),
            beamredir: beamredir.to_path_buf(),
            cluster,
        })
    }
}

/// A veth pair between the direct namespace and a pod, with a /32 route each way.
fn link_direct(direct: &Netns, pod_ns: &Path, pod_ip: Ipv4Addr, i: usize) -> Result<()> {
    let pod = pod_ns.file_name().and_then(|n| n.to_str()).context("pod namespace name")?;
    let (here, there) = (format!("bd{i}"), format!("bdp{i}"));
    let ip = |args: &[&str]| beamredir_testbed::run(Command::new("ip").args(args)).map(|_| ());
    ip(&["-n", direct.name(), "link", "add", &here, "type", "veth", "peer", "name", &there, "netns", pod])?;
    ip(&["-n", direct.name(), "link", "set", &here, "up"])?;
    ip(&["-n", pod, "link", "set", &there, "up"])?;
    ip(&["-n", direct.name(), "route", "add", &format!("{pod_ip}/32"), "dev", &here, "src", &DIRECT_SRC.to_string()])?;
    ip(&["-n", pod, "route", "add", &format!("{DIRECT_SRC}/32"), "dev", &there])
}

/// Runs a benchmark client to completion within `timeout`; returns its last stdout line as JSON.
pub fn run_client(cmd: &mut Command, timeout: Duration) -> Result<Value> {
    let out = run_bounded(cmd, timeout)?;
    let line = out.lines().rev().find(|l| !l.trim().is_empty()).with_context(|| format!("{cmd:?} printed nothing"))?;
    serde_json::from_str(line).with_context(|| format!("{cmd:?} printed {line:?}"))
}

/// The tool a [`Link`]'s workstation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// `beamredir up --pod tunnel-0 --pod erl-0`.
    Beamredir,
    /// The same with `BEAMREDIR_NET_SPARE_CONNECTIONS=0`: no API-server connections made ahead of
    /// need (what every forwarded connection cost before they existed).
    BeamredirNoSpares,
    /// The seed recipe: `kubectl port-forward` + iptables DNAT + route + route_localnet, for
    /// tunnel-0 (9100) and erl-0 (4369, 9000).
    Kubectl,
}

impl Tool {
    pub fn key(self) -> &'static str {
        match self {
            Tool::Beamredir => "beamredir",
            Tool::BeamredirNoSpares => "beamredir_no_spares",
            Tool::Kubectl => "kubectl",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Tool::Beamredir => "beamredir up",
            Tool::BeamredirNoSpares => "beamredir up, no spare connections",
            Tool::Kubectl => "kubectl recipe",
        }
    }
}

/// A workstation of its own (a namespace with only loopback) that reaches the bed's simulated
/// API server through a [`DelayRelay`] with a given RTT, running one [`Tool`] for the bed's
/// pods. Each tool gets its own namespace: the recipe's nat rules turn conntrack on for the
/// whole namespace, which must not slow the other tool down. Everything goes on drop: the
/// session or the recipes (newest first: they share the namespace's address, route and
/// sysctl), then the relay and the namespace.
pub struct Link {
    pub tool: Tool,
    pub rtt: Duration,
    pub session: Option<UpSession>,
    pub recipes: Vec<KubectlRecipe>,
    _relay: DelayRelay,
    pub kubeconfig: PathBuf,
    _files: TempDir,
    pub ns: Netns,
}

impl Link {
    pub fn start(bed: &Bed, tool: Tool, rtt: Duration) -> Result<Self> {
        let cluster = &bed.cluster;
        let ns = Netns::new("brlk")?;
        let api: std::net::SocketAddr = cluster.url.trim_start_matches("https://").parse().context("the API server's address")?;
        let relay = DelayRelay::start(&ns, &cluster.ws.path(), api, rtt)?;
        let files = TempDir::new("brbench-link")?;
        let kubeconfig = files.path().join("kubeconfig");
        let text = std::fs::read_to_string(&cluster.kubeconfig)?;
        ensure!(text.contains(&cluster.url), "the kubeconfig does not name {}", cluster.url);
        std::fs::write(&kubeconfig, text.replace(&cluster.url, &format!("https://127.0.0.1:{}", relay.port)))?;
        let mut link = Link { tool, rtt, session: None, recipes: Vec::new(), _relay: relay, kubeconfig, _files: files, ns };
        match tool {
            Tool::Beamredir | Tool::BeamredirNoSpares => {
                let env: &[(&str, &str)] = if tool == Tool::BeamredirNoSpares { &[("BEAMREDIR_NET_SPARE_CONNECTIONS", "0")] } else { &[] };
                let mut session = UpSession::start_at(&link.ns.path(), &link.kubeconfig, &bed.beamredir, &[TUNNEL_POD, ERL_POD], false, env)?;
                session.wait_up(Duration::from_secs(60))?;
                link.session = Some(session);
            }
            Tool::Kubectl => {
                link.recipes.push(KubectlRecipe::start_at(cluster, &link.ns, &link.kubeconfig, TUNNEL_POD, &[TUNNEL_PORT])?);
                link.recipes.push(KubectlRecipe::start_at(cluster, &link.ns, &link.kubeconfig, ERL_POD, &[ERL_EPMD_PORT, ERL_DIST_PORT])?);
            }
        }
        Ok(link)
    }

    /// `program` run as this link's tool needs it: in the `up` session, or in the namespace.
    pub fn command(&self, program: &Path) -> Command {
        match &self.session {
            Some(s) => s.exec(program),
            None => self.ns.command(program),
        }
    }

    /// The recipe for `pod`, if this link runs the kubectl recipe.
    pub fn recipe(&mut self, pod: &str) -> Option<&mut KubectlRecipe> {
        self.recipes.iter_mut().find(|r| r.pod == pod)
    }

    /// What the tool said: beamredir's stderr, or kubectl's output.
    pub fn log(&mut self) -> String {
        match &self.session {
            Some(s) => s.log(),
            None => self
                .recipes
                .iter_mut()
                .map(|r| {
                    let pod = r.pod.clone();
                    format!("[{pod}] {}", r.forward().output())
                })
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    pub fn describe(&self) -> String {
        format!("{} at {} ms", self.tool.key(), self.rtt.as_millis())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.session = None;
        while let Some(r) = self.recipes.pop() {
            drop(r);
        }
    }
}

/// One link per tool and RTT, started one after the other.
pub fn start_links(bed: &Bed, tools: &[Tool], rtts: &[Duration]) -> Result<Vec<Link>> {
    let t = Instant::now();
    let mut links = Vec::new();
    for &rtt in rtts {
        for &tool in tools {
            check_interrupted()?;
            links.push(Link::start(bed, tool, rtt).with_context(|| format!("starting {} at {} ms", tool.key(), rtt.as_millis()))?);
        }
    }
    println!("  {} workstations with delay relays ready in {:.1} s", links.len(), t.elapsed().as_secs_f64());
    Ok(links)
}

/// CPU time (user + system, in clock ticks) a process and all its descendants used so far,
/// threads that ended included (/proc/PID/stat utime and stime count them); 0 if it is gone.
pub fn cpu_ticks(pid: u32) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command (which may hold spaces) in parentheses.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    let children: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|c| c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()).collect::<Vec<_>>())
        .map(cpu_ticks)
        .sum();
    own + children
}

/// Clock ticks per second (USER_HZ).
pub fn ticks_per_s() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}
