//! The manual recipe beamredir replaces (README, "What it replaces"), run for real against the
//! simulated cluster: the baseline the benchmarks compare beamredir with.
//!
//! * [`PortForward`]: a real `kubectl port-forward` in the workstation namespace (SPDY/3.1, as
//!   kubectl speaks it), ready once it has printed its "Forwarding from" lines.
//! * [`KubectlRecipe`]: that forward plus what makes `POD_IP:PORT` reach it: a route to the
//!   pod IP via `lo`, `route_localnet=1` and one `iptables` DNAT rule per port, all inside the
//!   workstation namespace (they are per namespace), all undone on drop.
use std::{
    io::Read,
    path::Path,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{Netns, Proc, cluster::SimCluster, run, wait_until};

/// Stands in for a workstation's LAN address (TEST-NET-1: documentation only, never routed;
/// it only ever exists on the namespace's loopback).
pub const WORKSTATION_ADDR: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

/// `kubectl port-forward pod/POD L1:P1 L2:P2 …` running in the workstation namespace.
pub struct PortForward {
    child: Proc,
    output: Arc<Mutex<String>>,
    /// (local port, pod port), in the order given.
    pub ports: Vec<(u16, u16)>,
}

impl PortForward {
    /// Starts the forward and waits until kubectl listens on every local port.
    pub fn start(cluster: &SimCluster, pod: &str, ports: &[(u16, u16)], env: &[(&str, &str)]) -> Result<Self> {
        Self::start_at(&cluster.ws, &cluster.kubeconfig, pod, ports, env)
    }

    /// [`PortForward::start`] in another workstation namespace, with another kubeconfig (e.g.
    /// one whose API server is reached through a delay relay).
    pub fn start_at(ws: &Netns, kubeconfig: &Path, pod: &str, ports: &[(u16, u16)], env: &[(&str, &str)]) -> Result<Self> {
        let mut cmd = ws.command("kubectl");
        cmd.arg("--kubeconfig").arg(kubeconfig);
        cmd.args(["port-forward", &format!("pod/{pod}")]).args(ports.iter().map(|(l, p)| format!("{l}:{p}")));
        cmd.envs(env.iter().copied()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting kubectl port-forward")?;
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>, Box::new(child.stderr.take().unwrap())] {
            let output = output.clone();
            thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        let mut pf = PortForward { child: Proc(child), output, ports: ports.to_vec() };
        let ready = wait_until("kubectl port-forward to listen", Duration::from_secs(30), || {
            if !pf.is_running() {
                return true;
            }
            let out = pf.output();
            ports.iter().all(|(l, p)| out.contains(&format!("Forwarding from 127.0.0.1:{l} -> {p}")))
        });
        if ready.is_err() || !pf.is_running() {
            bail!("kubectl port-forward did not get ready: {}", pf.output());
        }
        Ok(pf)
    }

    /// Everything kubectl printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.0.try_wait(), Ok(None))
    }

    /// Waits up to `timeout` for kubectl to exit; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.0.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The local port forwarding to `pod_port`.
    pub fn local_port(&self, pod_port: u16) -> Option<u16> {
        self.ports.iter().find(|(_, p)| *p == pod_port).map(|(l, _)| *l)
    }
}

/// `n` distinct free ports on 127.0.0.1 in the workstation namespace.
pub fn free_local_ports(cluster: &SimCluster, n: usize) -> Result<Vec<u16>> {
    free_local_ports_in(&cluster.ws, n)
}

/// `n` distinct free ports on 127.0.0.1 in namespace `ws`.
pub fn free_local_ports_in(ws: &Netns, n: usize) -> Result<Vec<u16>> {
    ws.in_ns(move || -> std::io::Result<Vec<u16>> {
        // Held together until all are picked, so they differ.
        let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0))).collect::<Result<_, _>>()?;
        listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
    })?
    .context("picking free local ports")
}

/// What became of a recipe's forward after its pod was deleted (and recreated).
#[derive(Debug)]
pub struct AfterPodDeleted {
    /// kubectl exited during the wait, before anything used the forward again.
    pub exited_by_itself: bool,
    /// What a new connection through the forward got back (an EPMD `NAMES` answer if pod port
    /// 4369 is forwarded, else whatever the pod sent first); empty if nothing.
    pub answer: String,
    /// kubectl's exit status once that connection was tried (None: still running).
    pub exit: Option<ExitStatus>,
    /// Everything kubectl printed.
    pub output: String,
    /// The recreated pod's IP (the recipe's route and DNAT rules still name the old one).
    pub new_pod_ip: Option<Ipv4Addr>,
}

/// The seed recipe, baseline for beamredir:
///
/// ```sh
/// kubectl port-forward pod/app-0 L1:4369 L2:DIST &
/// ip route add POD_IP/32 dev lo
/// sysctl -w net.ipv4.conf.all.route_localnet=1
/// iptables -t nat -A OUTPUT -d POD_IP -p tcp --dport 4369 -j DNAT --to-destination 127.0.0.1:L1
/// iptables -t nat -A OUTPUT -d POD_IP -p tcp --dport DIST -j DNAT --to-destination 127.0.0.1:L2
/// ```
///
/// The README's version forwards local 4369 itself, which takes the port a local epmd needs;
/// here the local ports are free ones, so a local `erl -name` still gets its own epmd, and the
/// DNAT rules make `POD_IP:4369` and `POD_IP:DIST` reach the forward all the same.
///
/// A real workstation has a LAN address, and the kernel takes it as the source of connections
/// routed to `POD_IP` via `lo`. The simulated workstation has only 127.0.0.1 (scope host, not
/// eligible for that route): connect() would leave from 0.0.0.0, complete its handshake, and
/// then never get an answer. So if the namespace has no global IPv4 address, the recipe gives
/// it [`WORKSTATION_ADDR`] for as long as it runs.
pub struct KubectlRecipe {
    /// Field order is drop order: kubectl goes first, then the rules (see `Drop`).
    forward: Option<PortForward>,
    ws: std::path::PathBuf,
    pub pod: String,
    pub pod_ip: Ipv4Addr,
    /// Commands that undo what was set up, run in reverse order on drop.
    undo: Vec<Vec<String>>,
}

impl KubectlRecipe {
    /// Sets the recipe up for `pod_ports` of `pod` in the workstation namespace and waits until
    /// the forward is ready. Whatever was set up is undone if a later step fails.
    pub fn start(cluster: &SimCluster, pod: &str, pod_ports: &[u16]) -> Result<Self> {
        Self::start_at(cluster, &cluster.ws, &cluster.kubeconfig, pod, pod_ports)
    }

    /// [`KubectlRecipe::start`] in another workstation namespace `ws` (the rules, route and
    /// sysctl go there), with another kubeconfig: e.g. several recipes side by side, each
    /// reaching the API server through its own delay relay. Several recipes (for different
    /// pods) may share a namespace if they are dropped newest first.
    pub fn start_at(cluster: &SimCluster, ws: &Netns, kubeconfig: &Path, pod: &str, pod_ports: &[u16]) -> Result<Self> {
        let pod_ip = cluster.pod_ip(pod).with_context(|| format!("pod {pod} has no IP"))?;
        let mut recipe = KubectlRecipe { forward: None, ws: ws.path(), pod: pod.into(), pod_ip, undo: Vec::new() };
        let locals = free_local_ports_in(ws, pod_ports.len())?;
        let ports: Vec<(u16, u16)> = locals.into_iter().zip(pod_ports.iter().copied()).collect();
        recipe.forward = Some(PortForward::start_at(ws, kubeconfig, pod, &ports, &[])?);
        let global = recipe.run(&["ip", "-4", "-o", "addr", "show", "scope", "global"])?.stdout;
        if global.is_empty() {
            let addr = format!("{WORKSTATION_ADDR}/32");
            recipe.step(&["ip", "addr", "add", &addr, "dev", "lo"], &["ip", "addr", "del", &addr, "dev", "lo"])?;
        }
        let ip = format!("{pod_ip}/32");
        recipe.step(&["ip", "route", "add", &ip, "dev", "lo"], &["ip", "route", "del", &ip, "dev", "lo"])?;
        let key = "net.ipv4.conf.all.route_localnet";
        let before = String::from_utf8(recipe.run(&["sysctl", "-n", key])?.stdout)?.trim().to_string();
        recipe.step(&["sysctl", "-qw", &format!("{key}=1")], &["sysctl", "-qw", &format!("{key}={before}")])?;
        for (local, remote) in ports {
            let rule = |op: &str| -> Vec<String> {
                let to = format!("127.0.0.1:{local}");
                ["iptables", "-w", "5", "-t", "nat", op, "OUTPUT", "-d", &pod_ip.to_string(), "-p", "tcp", "--dport", &remote.to_string(), "-j", "DNAT", "--to-destination", &to]
                    .map(String::from)
                    .to_vec()
            };
            let (add, del) = (rule("-A"), rule("-D"));
            recipe.step(&add.iter().map(String::as_str).collect::<Vec<_>>(), &del.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        Ok(recipe)
    }

    fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ws.display())).arg("--").args(argv);
        cmd
    }

    fn run(&self, argv: &[&str]) -> Result<std::process::Output> {
        run(&mut self.command(argv))
    }

    /// Runs `argv` in the workstation namespace and remembers `undo` once it succeeded.
    fn step(&mut self, argv: &[&str], undo: &[&str]) -> Result<()> {
        self.run(argv)?;
        self.undo.push(undo.iter().map(|s| s.to_string()).collect());
        Ok(())
    }

    pub fn forward(&mut self) -> &mut PortForward {
        self.forward.as_mut().expect("started")
    }

    /// Deletes the pod (its StatefulSet recreates it with a new IP), waits until the new pod is
    /// Ready, and reports what the forward does: whether kubectl ends by itself within `wait`,
    /// what a new connection through it gets, and whether kubectl ends after that (within
    /// `wait` again). kubectl's forward is bound to the deleted pod: it never reaches the new one.
    pub fn delete_pod_and_watch(&mut self, cluster: &SimCluster, wait: Duration) -> Result<AfterPodDeleted> {
        let old = cluster.delete_pod(&self.pod)?;
        // Deletion is graceful: the old pod stays until its node stops; wait for the new one.
        let new_pod = cluster.wait_replaced(&self.pod, old.metadata.uid.as_deref(), Duration::from_secs(90))?;
        let new_pod_ip = new_pod.status.and_then(|s| s.pod_ip).and_then(|ip| ip.parse().ok());
        let forward = self.forward();
        let exited_by_itself = forward.wait_exit(wait).is_some();
        let (port, epmd) = match forward.local_port(4369) {
            Some(local) => (local, true),
            None => (forward.ports[0].0, false),
        };
        let answer = cluster.ws.in_ns(move || probe_local(port, epmd))?;
        let exit = self.forward().wait_exit(wait);
        let output = self.forward().output();
        Ok(AfterPodDeleted { exited_by_itself, answer, exit, output, new_pod_ip })
    }
}

/// One connection to 127.0.0.1:`port` (an EPMD NAMES request if `epmd`): what came back
/// within 10 s, until EOF; empty if the connection failed. Call it inside the namespace.
pub fn probe_local(port: u16, epmd: bool) -> String {
    let Ok(mut s) = TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if epmd {
        let _ = std::io::Write::write_all(&mut s, &[0, 1, b'n']);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 64 * 1024 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    // NAMES answers with epmd's port (4 bytes) before the text.
    let text = if epmd && got.len() >= 4 { &got[4..] } else { &got[..] };
    String::from_utf8_lossy(text).into_owned()
}

impl Drop for KubectlRecipe {
    fn drop(&mut self) {
        // kubectl first (nothing may use the forward while the rules go), then the rules,
        // the sysctl and the route, newest first.
        self.forward = None;
        while let Some(undo) = self.undo.pop() {
            let argv: Vec<&str> = undo.iter().map(String::as_str).collect();
            if let Err(e) = self.run(&argv) {
                log::warn!("undoing the kubectl recipe: {e:#}");
            }
        }
    }
}

/// The DNAT rules in nat OUTPUT of a namespace, as `iptables -S` prints them.
pub fn nat_output_rules(cluster: &SimCluster) -> Result<Vec<String>> {
    let out = run(cluster.ws.command("iptables").args(["-w", "5", "-t", "nat", "-S", "OUTPUT"]))?;
    let text = String::from_utf8(out.stdout)?;
    let rules: Vec<String> = text.lines().filter(|l| l.starts_with("-A ")).map(String::from).collect();
    ensure!(text.contains("-P OUTPUT"), "unexpected iptables output: {text}");
    Ok(rules)
}
