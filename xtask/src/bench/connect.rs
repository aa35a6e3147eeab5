//! Benchmark 1: what one `connect()` costs, side by side, for IPv4 (connect4) and IPv6
//! (connect6):
//!
//! * **loopback**: plain `connect(127.0.0.1:LOCAL_PORT)` (or `[::1]`), the floor: the client is
//!   in no cgroup with programs, so no hook runs;
//! * **hook, map miss**: a client inside a beamredir session dialling loopback directly, an
//!   address that is not in the map: the hook runs and looks up the map, and nothing else
//!   happens. What a cgroup sock_addr hook costs on its own;
//! * **beamredir (redirected)**: `connect(POD_IP:POD_PORT)` rewritten to the local port by
//!   beamredir's `cgroup/connect4` (`connect6`) program, with N entries in its map (N-1 fillers
//!   for other pod IPs plus the one dialled);
//! * **iptables** (IPv4 only): the same pod address rewritten by the manual recipe, a DNAT rule
//!   in the nat OUTPUT chain, with N rules of which the N-1 fillers come *first* (the chain is
//!   walked in order, so the dialled rule is the last one tried), plus the route to the pod IP
//!   and `route_localnet=1` that DNAT to loopback needs.
//!
//! Two measures: a whole connection (`socket`, `connect`, `accept`, both `close`s; 50 rounds of
//! 2000 by default), and a connect to a closed port (`socket`, `connect` refused, `close`; five
//! runs of 50 000), where the kernel's work is smallest and the hook's share largest. The
//! closed port is a second dialled entry (`POD_IP:POD_PORT+1` → a local port where nothing
//! listens), so beamredir's map and iptables' chain hold N+1 entries.
//!
//! Each case at each size lives in its own network namespace (only loopback, no default route:
//! a pod address can never leave the machine), deleted at the end, also on error; the two
//! cases of a session (miss and redirect) share its namespace. The client is
//! `xtask/bench/connect_bench.c`: one thread, listening on the loopback of its family itself and
//! accepting every connection it makes, the same server for all cases. One persistent client
//! per case runs one batch at a time on request; after a warm-up batch each, the batches run
//! in rounds over every size and case (see [`run`]), so drift on the machine (on a shared 2-CPU
//! VM: builds on the other CPU) hits every case alike, and the ratios to plain loopback are
//! taken per round.
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use beamredir_testbed::{Netns, Proc, TempDir, unique};
use serde_json::{Value, json};

use super::{
    BenchArgs, check_interrupted,
    plot::{self, Chart, Marker, Point, Series},
    report::{self, Machine, Spread},
    run_bounded, run_cleanup,
};

/// The pod addresses the clients dial (reached only inside the bench's namespaces).
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 5);
const POD_PORT: u16 = 4369;
/// The pod port redirected to [`CLOSED_PORT`], for the closed-port measure.
const POD_CLOSED_PORT: u16 = 4370;
/// Where the clients listen: the stand-in for the local port-forward.
const LOCAL_PORT: u16 = 14369;
/// Where the "hook, map miss" client listens and dials (not in any map).
const MISS_PORT: u16 = 14370;
/// Where nothing listens.
const CLOSED_PORT: u16 = 14371;
/// The target from the issue: a redirected connect within 2% of plain loopback.
const TARGET_RATIO: f64 = 1.02;
/// connect6's redirect cost is "flat in N" if its ratio to loopback moves by at most this much
/// between the smallest and the largest N.
const FLAT_TOLERANCE: f64 = 0.02;

/// Filler pod addresses, never the dialled one: 10.244.1.1, 10.244.1.2, … (250 per /24).
fn filler_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, (1 + i / 250) as u8, (1 + i % 250) as u8)
}

/// IPv6 fillers: fd00:10:244:1::1, fd00:10:244:1::2, …
fn filler_ip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x10, 0x244, 1 + (i >> 16) as u16, 0, 0, 0, (i & 0xffff) as u16 + 1)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn key(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }

    fn loopback(self, port: u16) -> SocketAddr {
        match self {
            Family::V4 => SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            Family::V6 => SocketAddr::from((Ipv6Addr::LOCALHOST, port)),
        }
    }

    fn pod(self, port: u16) -> SocketAddr {
        match self {
            Family::V4 => SocketAddr::from((POD_IP, port)),
            Family::V6 => SocketAddr::from((POD_IP6, port)),
        }
    }

    fn hook(self) -> &'static str {
        match self {
            Family::V4 => "connect4",
            Family::V6 => "connect6",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    Loopback,
    Miss,
    Redirect,
    Iptables,
}

impl Case {
    fn key(self) -> &'static str {
        match self {
            Case::Loopback => "loopback",
            Case::Miss => "miss",
            Case::Redirect => "beamredir",
            Case::Iptables => "iptables",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Case::Loopback => "plain loopback",
            Case::Miss => "hook runs, map misses",
            Case::Redirect => "beamredir (redirected)",
            Case::Iptables => "iptables DNAT (nat OUTPUT)",
        }
    }
}

/// What one client measures: a case in an address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    pub family: Family,
    pub case: Case,
}

impl Kind {
    const fn new(family: Family, case: Case) -> Self {
        Kind { family, case }
    }

    fn key(self) -> String {
        format!("{}-{}", self.case.key(), self.family.key())
    }
}

/// Every client at each size. There is no ip6tables case: DNAT to [::1] is not the recipe
/// anyone uses (IPv6 has no route_localnet), and the IPv4 case shows the chain's cost already.
const KINDS: [Kind; 7] = [
    Kind::new(Family::V4, Case::Loopback),
    Kind::new(Family::V4, Case::Miss),
    Kind::new(Family::V4, Case::Redirect),
    Kind::new(Family::V4, Case::Iptables),
    Kind::new(Family::V6, Case::Loopback),
    Kind::new(Family::V6, Case::Miss),
    Kind::new(Family::V6, Case::Redirect),
];

fn cases_of(family: Family) -> Vec<Case> {
    KINDS.iter().filter(|k| k.family == family).map(|k| k.case).collect()
}

/// The two measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    /// A whole connection: socket, connect, accept, close ×2.
    Open,
    /// A connect() to a port where nothing listens (refused), then close.
    Closed,
}

impl Measure {
    fn key(self) -> &'static str {
        match self {
            Measure::Open => "open",
            Measure::Closed => "closed",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub smoke: bool,
    /// Entries in beamredir's map = rules in the nat OUTPUT chain (plus the closed-port one).
    pub sizes: Vec<u32>,
    pub reps: u32,
    /// Connections per timed repetition.
    pub connects: u32,
    /// Untimed connections the client makes before each timed batch.
    pub client_warmup: u32,
    /// One untimed batch per case and size before the repetitions.
    pub warmup_batch: u32,
    /// Runs of the closed-port measure, and connects per run.
    pub closed_runs: u32,
    pub closed_connects: u32,
    /// The CPU the client is pinned to (the last one: the rest of the machine uses the others).
    pub cpu: usize,
}

impl Config {
    pub fn new(args: &BenchArgs) -> Self {
        let nproc = thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let (sizes, reps, connects) = if args.smoke { (vec![1, 10], 2, 200) } else { (vec![1, 100, 1000, 10_000], 50, 2_000) };
        let mut sizes = if args.sizes.is_empty() { sizes } else { args.sizes.clone() };
        sizes.sort_unstable();
        sizes.dedup();
        let connects = args.connects.unwrap_or(connects);
        Config {
            smoke: args.smoke,
            sizes,
            reps: args.reps.unwrap_or(reps),
            connects,
            client_warmup: (connects / 20).clamp(10, 1000),
            warmup_batch: if args.smoke { 100 } else { 5000 },
            closed_runs: args.closed_runs.unwrap_or(if args.smoke { 1 } else { 5 }),
            closed_connects: args.closed_connects.unwrap_or(if args.smoke { 2000 } else { 50_000 }),
            cpu: nproc - 1,
        }
    }

    pub fn describe(&self) -> String {
        let sizes: Vec<String> = self.sizes.iter().map(u32::to_string).collect();
        format!(
            "N = {} entries/rules; IPv4 and IPv6; {} rounds × {} connections per case (each batch after {} untimed ones; first a {}-connect warm-up batch per case); closed port: {} runs × {} connects per case; clients on CPU {}{}",
            sizes.join(", "),
            self.reps,
            self.connects,
            self.client_warmup,
            self.warmup_batch,
            self.closed_runs,
            self.closed_connects,
            self.cpu,
            if self.smoke { " [smoke: measures nothing useful]" } else { "" }
        )
    }

    fn json(&self) -> Value {
        json!({
            "smoke": self.smoke,
            "sizes": self.sizes,
            "reps": self.reps,
            "connects": self.connects,
            "client_warmup": self.client_warmup,
            "warmup_batch": self.warmup_batch,
            "closed_runs": self.closed_runs,
            "closed_connects": self.closed_connects,
            "client_cpu": self.cpu,
            "pod": Family::V4.pod(POD_PORT).to_string(),
            "pod6": Family::V6.pod(POD_PORT).to_string(),
            "local": Family::V4.loopback(LOCAL_PORT).to_string(),
        })
    }
}

/// One timed batch of one client.
pub struct Measurement {
    pub entries: u32,
    pub kind: Kind,
    pub measure: Measure,
    /// The round (open) or run (closed).
    pub rep: u32,
    /// Position within its round (0 = first).
    pub position: u32,
    /// The client's JSON output (see connect_bench.c).
    pub client: Value,
}

impl Measurement {
    fn get(&self, key: &str) -> f64 {
        self.client[key].as_f64().unwrap_or(f64::NAN)
    }
}

/// What beamredir's own counter says it redirected, against what the client did.
pub struct RedirectCount {
    pub entries: u32,
    pub pod: String,
    pub expected: u64,
    pub counted: Option<u64>,
}

pub struct Results {
    pub config: Config,
    pub measurements: Vec<Measurement>,
    pub redirect_counts: Vec<RedirectCount>,
    /// Seconds to set up each namespace at each size (namespace, session or rules).
    pub setup_s: Vec<(u32, String, f64)>,
}

/// A running `beamredir map` session in the foreground, ended (and its stale leftovers
/// cleaned) on drop.
struct Session {
    bin: PathBuf,
    ns_path: PathBuf,
    name: String,
    state: TempDir,
    proc: Option<Proc>,
}

impl Session {
    fn start(ns: &Netns, bin: &Path, mappings: &[String]) -> Result<Self> {
        let state = TempDir::new("brbench-state")?;
        let log_path = state.path().join("map.log");
        let log = std::fs::File::create(&log_path)?;
        let mut session = Session { bin: bin.to_path_buf(), ns_path: ns.path(), name: unique("bench"), state, proc: None };
        let child = session
            .beamredir()
            .args(["map", "--session", &session.name])
            .args(mappings)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting beamredir map")?;
        session.proc = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            check_interrupted()?;
            if let Some(status) = session.proc.as_mut().unwrap().0.try_wait()? {
                bail!("beamredir map exited early ({status}): {}", std::fs::read_to_string(&log_path).unwrap_or_default().trim());
            }
            if session.status().is_some_and(|s| s["state"] == "running") {
                return Ok(session);
            }
            if Instant::now() > deadline {
                bail!("beamredir session {} did not come up within 30 s", session.name);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `beamredir --state-dir D ARGS` in the session's namespace (nsenter keeps the mounts).
    fn beamredir(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns_path.display()))
            .arg("--")
            .arg(&self.bin)
            .arg("--state-dir")
            .arg(self.state.path());
        // What `exec` starts (the client) then runs as root like the other cases' clients,
        // not as the user behind sudo.
        cmd.env_remove("SUDO_UID").env_remove("SUDO_GID").env_remove("SUDO_USER");
        cmd
    }

    /// This session's `status --json` entry.
    fn status(&self) -> Option<Value> {
        let out = run_bounded(self.beamredir().args(["status", "--json"]), Duration::from_secs(10)).ok()?;
        let all: Value = serde_json::from_str(&out).ok()?;
        all.as_array()?.iter().find(|s| s["name"] == self.name.as_str()).cloned()
    }

    /// How many connects beamredir redirected to a pod endpoint so far (its own counter).
    fn redirected(&self, pod: &str) -> Option<u64> {
        let status = self.status()?;
        status["redirects"].as_array()?.iter().find(|r| r["pod"] == pod)?["connects"].as_u64()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = run_cleanup(self.beamredir().args(["-q", "down", "--session", &self.name]), Duration::from_secs(15));
        if let Some(mut proc) = self.proc.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(proc.0.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(50));
            }
            drop(proc); // kills it if it is still there
        }
        // Removes what a killed session would have left (its cgroup), in this state dir only.
        let _ = run_cleanup(self.beamredir().args(["-q", "down", "--all"]), Duration::from_secs(15));
    }
}

/// What a namespace holds: plain loopback clients, a beamredir session of one family (its miss
/// and redirect clients), or the iptables rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Loopback,
    Session(Family),
    Iptables,
}

impl Place {
    const ALL: [Place; 4] = [Place::Loopback, Place::Session(Family::V4), Place::Session(Family::V6), Place::Iptables];

    fn key(self) -> &'static str {
        match self {
            Place::Loopback => "loopback",
            Place::Session(Family::V4) => "beamredir-ipv4",
            Place::Session(Family::V6) => "beamredir-ipv6",
            Place::Iptables => "iptables",
        }
    }

    fn kinds(self) -> Vec<Kind> {
        match self {
            Place::Loopback => vec![Kind::new(Family::V4, Case::Loopback), Kind::new(Family::V6, Case::Loopback)],
            Place::Session(f) => vec![Kind::new(f, Case::Miss), Kind::new(f, Case::Redirect)],
            Place::Iptables => vec![Kind::new(Family::V4, Case::Iptables)],
        }
    }
}

/// One namespace at one size and whatever redirects in it. Fields drop in order: the session
/// ends before its namespace goes.
struct Env {
    place: Place,
    session: Option<Session>,
    ns: Netns,
}

impl Env {
    fn new(place: Place, entries: u32, beamredir: &Path) -> Result<Self> {
        let ns = Netns::new(match place {
            Place::Loopback => "brbl",
            Place::Session(Family::V4) => "brbb",
            Place::Session(Family::V6) => "brb6",
            Place::Iptables => "brbi",
        })?;
        let mut env = Env { place, session: None, ns };
        match place {
            Place::Loopback => {}
            Place::Session(family) => {
                let filler = |i| match family {
                    Family::V4 => SocketAddr::from((filler_ip(i), POD_PORT)),
                    Family::V6 => SocketAddr::from((filler_ip6(i), POD_PORT)),
                };
                let mut mappings: Vec<String> = (0..entries - 1).map(|i| format!("{}={LOCAL_PORT}", filler(i))).collect();
                mappings.push(format!("{}={LOCAL_PORT}", family.pod(POD_PORT)));
                mappings.push(format!("{}={CLOSED_PORT}", family.pod(POD_CLOSED_PORT)));
                env.session = Some(Session::start(&env.ns, beamredir, &mappings)?);
            }
            Place::Iptables => {
                let ns = env.ns.name().to_string();
                // What DNAT to loopback needs besides the rule: a route to the pod IP, and
                // permission to route 127/8 (both only inside this namespace). And, as on a real
                // workstation, an address the kernel takes as the source of connections routed
                // to the pod IP via lo: with only 127.0.0.1 (scope host) the source stays
                // 0.0.0.0, and a refused connect's RST never comes back (see the recipe).
                env.ns.add_address(beamredir_testbed::recipe::WORKSTATION_ADDR)?;
                beamredir_testbed::run(Command::new("ip").args(["-n", &ns, "route", "add", &format!("{POD_IP}/32"), "dev", "lo"]))?;
                run_bounded(
                    env.ns.command("sysctl").args(["-qw", "net.ipv4.conf.all.route_localnet=1", "net.ipv4.conf.lo.route_localnet=1"]),
                    Duration::from_secs(10),
                )?;
                let files = TempDir::new("brbench-rules")?;
                let rules = files.path().join("nat.rules");
                std::fs::write(&rules, iptables_ruleset(entries))?;
                run_bounded(env.ns.command("iptables-restore").arg(&rules), Duration::from_secs(60))
                    .context("loading the DNAT rules with iptables-restore")?;
                let saved = run_bounded(env.ns.command("iptables-save").args(["-t", "nat"]), Duration::from_secs(30))?;
                let n = saved.lines().filter(|l| l.starts_with("-A OUTPUT")).count();
                ensure!(n == entries as usize + 1, "expected {} rules in nat OUTPUT, iptables-save shows {n}", entries + 1);
            }
        }
        Ok(env)
    }

    /// Starts a persistent client: in the namespace, and for the session's cases inside the
    /// session (`beamredir exec`).
    fn start_client(&self, kind: Kind, client: &Path, cfg: &Config) -> Result<Client> {
        let mut cmd = match &self.session {
            Some(session) => {
                let mut cmd = session.beamredir();
                cmd.args(["-q", "exec", "--session", &session.name, "--"]).arg(client);
                cmd
            }
            None => self.ns.command(client),
        };
        let f = kind.family;
        let (listen, target, closed) = match kind.case {
            Case::Loopback => (LOCAL_PORT, f.loopback(LOCAL_PORT), f.loopback(CLOSED_PORT)),
            Case::Miss => (MISS_PORT, f.loopback(MISS_PORT), f.loopback(CLOSED_PORT)),
            Case::Redirect | Case::Iptables => (LOCAL_PORT, f.pod(POD_PORT), f.pod(POD_CLOSED_PORT)),
        };
        cmd.args(["--listen-port", &listen.to_string(), "--target", &target.to_string(), "--closed-target", &closed.to_string()])
            .args(["--stdin", "--cpu", &cfg.cpu.to_string()]);
        Client::start(kind, &mut cmd)
    }
}

/// A running `connect_bench --stdin`: asked for one batch at a time, so the cases can be
/// interleaved finely without starting a process per batch. Killed on drop.
struct Client {
    kind: Kind,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    proc: Proc,
}

impl Client {
    fn start(kind: Kind, cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let (stdin, stdout, mut stderr_pipe) = (child.stdin.take().unwrap(), child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let proc = Proc(child);
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr2 = stderr.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = stderr_pipe.read(&mut buf) {
                stderr2.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut client = Client { kind, stdin, lines, stderr, proc };
        // It checks that its target reaches its listener (and that its closed target refuses)
        // before it says it is ready.
        let ready = client.recv(Duration::from_secs(30))?;
        ensure!(ready["ready"] == true, "{} client: unexpected {ready}", kind.key());
        Ok(client)
    }

    /// The next output line, as JSON, within `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => return serde_json::from_str(&line).with_context(|| format!("{} client said {line:?}", self.kind.key())),
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(e) => {
                    thread::sleep(Duration::from_millis(100)); // let stderr and a Ctrl-C arrive
                    check_interrupted()?;
                    let what = match e {
                        mpsc::RecvTimeoutError::Timeout => format!("no answer within {timeout:?}"),
                        mpsc::RecvTimeoutError::Disconnected => match self.proc.0.try_wait() {
                            Ok(Some(status)) => format!("it exited ({status})"),
                            _ => "it closed its output".to_string(),
                        },
                    };
                    bail!("{} client: {what}: {}", self.kind.key(), self.stderr.lock().unwrap().trim())
                }
            }
        }
    }

    /// One timed batch of `connects`, after `warmup` untimed ones, to the open or the closed
    /// port.
    fn batch(&mut self, measure: Measure, connects: u32, warmup: u32) -> Result<Value> {
        let mode = match measure {
            Measure::Open => "",
            Measure::Closed => " closed",
        };
        writeln!(self.stdin, "{connects} {warmup}{mode}").and_then(|_| self.stdin.flush()).context("asking the client for a batch")?;
        // Generous: even 1 ms per connection (5× the slowest case seen) finishes well within it.
        let v = self.recv(Duration::from_secs(30) + Duration::from_millis(u64::from(connects + warmup)))?;
        ensure!(v["count"].as_u64() == Some(u64::from(connects)), "{} client answered {v}", self.kind.key());
        Ok(v)
    }
}

/// The nat table for iptables-restore: N-1 filler DNAT rules for other pod IPs, then the
/// dialled one and the closed-port one, so the lookup walks the whole chain.
fn iptables_ruleset(entries: u32) -> String {
    let mut s = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    let rule = |s: &mut String, ip: Ipv4Addr, port: u16, local: u16| {
        let _ = writeln!(s, "-A OUTPUT -d {ip}/32 -p tcp -m tcp --dport {port} -j DNAT --to-destination 127.0.0.1:{local}");
    };
    for i in 0..entries - 1 {
        rule(&mut s, filler_ip(i), POD_PORT, LOCAL_PORT);
    }
    rule(&mut s, POD_IP, POD_PORT, LOCAL_PORT);
    rule(&mut s, POD_IP, POD_CLOSED_PORT, CLOSED_PORT);
    s.push_str("COMMIT\n");
    s
}

/// Everything for one size: its namespaces and their clients (which go first on drop).
struct Group {
    entries: u32,
    clients: Vec<Client>,
    envs: Vec<Env>,
    /// Connects the redirect clients made so far to each pod endpoint, for checking
    /// beamredir's own counters.
    made: Vec<(Family, String, u64)>,
}

impl Group {
    fn made(&mut self, family: Family, pod: SocketAddr, n: u64) {
        let pod = pod.to_string();
        match self.made.iter_mut().find(|m| m.1 == pod) {
            Some(m) => m.2 += n,
            None => self.made.push((family, pod, n)),
        }
    }
}

/// The order of the clients in round `rep`: rotated every round, so each takes every position.
fn order(rep: u32) -> Vec<Kind> {
    let mut kinds = KINDS.to_vec();
    kinds.rotate_left(rep as usize % KINDS.len());
    kinds
}

/// Sets up every size at once, then runs rounds: in each, every size (in rotating order) runs
/// its clients back to back (in rotating order). So drift on the machine spreads over sizes and
/// cases alike, and each round gives a ratio per size from batches that ran within a fraction of
/// a second of each other. Then the closed-port runs, organised the same way.
pub fn run(cfg: &Config, client: &Path, beamredir: &Path) -> Result<Results> {
    ensure!(
        (1..=8).contains(&cfg.sizes.len()),
        "give 1 to 8 sizes (each one runs 4 namespaces and 2 beamredir sessions at once)"
    );
    let mut results = Results { config: cfg.clone(), measurements: Vec::new(), redirect_counts: Vec::new(), setup_s: Vec::new() };
    let mut groups = Vec::new();
    for &n in &cfg.sizes {
        let mut envs = Vec::new();
        for place in Place::ALL {
            check_interrupted()?;
            let t = Instant::now();
            envs.push(Env::new(place, n, beamredir).with_context(|| format!("setting up {} with N={n}", place.key()))?);
            results.setup_s.push((n, place.key().to_string(), t.elapsed().as_secs_f64()));
        }
        let mut clients = Vec::new();
        let mut g = Group { entries: n, clients: Vec::new(), envs: Vec::new(), made: Vec::new() };
        for env in &envs {
            for kind in env.place.kinds() {
                clients.push(env.start_client(kind, client, cfg)?);
                if kind.case == Case::Redirect {
                    // Each client checked one connection and one closed-port connect on start.
                    g.made(kind.family, kind.family.pod(POD_PORT), 1);
                    g.made(kind.family, kind.family.pod(POD_CLOSED_PORT), 1);
                }
            }
        }
        g.clients = clients;
        g.envs = envs;
        groups.push(g);
    }
    println!("  set up {} namespaces and {} clients; warming up", groups.len() * Place::ALL.len(), groups.len() * KINDS.len());
    let closed_warmup = (cfg.closed_connects / 50).clamp(10, 1000);
    for g in &mut groups {
        for c in &mut g.clients {
            c.batch(Measure::Open, cfg.warmup_batch, cfg.client_warmup)?;
            c.batch(Measure::Closed, cfg.warmup_batch, cfg.client_warmup)?;
        }
        for f in [Family::V4, Family::V6] {
            g.made(f, f.pod(POD_PORT), u64::from(cfg.warmup_batch + cfg.client_warmup));
            g.made(f, f.pod(POD_CLOSED_PORT), u64::from(cfg.warmup_batch + cfg.client_warmup));
        }
    }
    let sizes = groups.len();
    for (measure, reps, connects, warmup) in
        [(Measure::Open, cfg.reps, cfg.connects, cfg.client_warmup), (Measure::Closed, cfg.closed_runs, cfg.closed_connects, closed_warmup)]
    {
        for rep in 0..reps {
            let mut lines = Vec::new();
            for k in 0..sizes {
                let g = &mut groups[(rep as usize + k) % sizes];
                let mut line = format!("  {} {:>2}/{} N={:<6}", if measure == Measure::Open { "round" } else { "closed-port run" }, rep + 1, reps, g.entries);
                for (position, kind) in order(rep).into_iter().enumerate() {
                    check_interrupted()?;
                    let c = g.clients.iter_mut().find(|c| c.kind == kind).expect("a client per kind");
                    let m = Measurement { entries: g.entries, kind, measure, rep, position: position as u32, client: c.batch(measure, connects, warmup)? };
                    let _ = write!(line, "  {} {:>8}", kind.key(), report::us(m.get("per_connect_ns")));
                    results.measurements.push(m);
                }
                for f in [Family::V4, Family::V6] {
                    let port = if measure == Measure::Open { POD_PORT } else { POD_CLOSED_PORT };
                    g.made(f, f.pod(port), u64::from(connects + warmup));
                }
                lines.push((g.entries, line));
            }
            // Every round of a short run; every tenth of a long one.
            if reps <= 10 || (rep + 1) % 10 == 0 || rep + 1 == reps {
                lines.sort_by_key(|l| l.0);
                for (_, line) in lines {
                    println!("{line}");
                }
            }
        }
    }
    for mut g in groups {
        g.clients.clear();
        for (family, pod, expected) in std::mem::take(&mut g.made) {
            let counted = g.envs.iter().find(|e| e.place == Place::Session(family)).and_then(|e| e.session.as_ref()?.redirected(&pod));
            if counted != Some(expected) {
                println!("  warning: at N={} beamredir counted {counted:?} redirected connects to {pod}, the client made {expected}", g.entries);
            }
            results.redirect_counts.push(RedirectCount { entries: g.entries, pod, expected, counted });
        }
    }
    Ok(results)
}

/// One case at one size, summarised over its repetitions.
struct CaseSummary {
    case: Case,
    /// The batch figure (ns per connection).
    batch: Spread,
    /// The batches' per-call medians (whole iteration): the headline figure, insensitive to
    /// the multi-millisecond stalls a shared VM adds to a batch's mean.
    call: Spread,
    /// The median of the batches' per-call medians (whole iteration).
    call_median: f64,
    /// The median of the batches' medians of the connect() call alone.
    connect_median: f64,
    /// Per round: this case's batch figure over plain loopback's in the same round.
    ratios: Vec<f64>,
    /// The same with the per-call medians.
    call_ratios: Vec<f64>,
    /// The same with the medians of connect() alone.
    connect_ratios: Vec<f64>,
}

/// Per family, measure and size: every case. Ratios are paired by round (the batches of a
/// round run back to back), and their median is the ratio reported: drift on the machine that
/// lasts longer than a round cancels out.
struct Row {
    entries: u32,
    cases: Vec<CaseSummary>,
}

impl Row {
    fn case(&self, case: Case) -> &CaseSummary {
        self.cases.iter().find(|c| c.case == case).expect("every case measured")
    }

    fn ratio(&self, case: Case) -> f64 {
        report::median(&self.case(case).ratios)
    }

    fn call_ratio(&self, case: Case) -> f64 {
        report::median(&self.case(case).call_ratios)
    }

    fn connect_ratio(&self, case: Case) -> f64 {
        report::median(&self.case(case).connect_ratios)
    }
}

fn rows(r: &Results, family: Family, measure: Measure) -> Vec<Row> {
    let of = |m: &&Measurement, n: u32, case: Case| m.entries == n && m.kind == Kind::new(family, case) && m.measure == measure;
    let get = |n: u32, case: Case, rep: u32, key: &str| {
        r.measurements.iter().find(|m| of(m, n, case) && m.rep == rep).map(|m| m.get(key))
    };
    r.config
        .sizes
        .iter()
        .map(|&n| Row {
            entries: n,
            cases: cases_of(family)
                .into_iter()
                .map(|case| {
                    let ms: Vec<&Measurement> = r.measurements.iter().filter(|m| of(m, n, case)).collect();
                    let batch: Vec<f64> = ms.iter().map(|m| m.get("per_connect_ns")).collect();
                    let call: Vec<f64> = ms.iter().map(|m| m.get("iter_median_ns")).collect();
                    let paired = |key: &str| -> Vec<f64> {
                        ms.iter().filter_map(|m| Some(m.get(key) / get(n, Case::Loopback, m.rep, key)?)).collect()
                    };
                    CaseSummary {
                        case,
                        batch: Spread::of(&batch),
                        call: Spread::of(&call),
                        call_median: report::median(&call),
                        connect_median: report::median(&ms.iter().map(|m| m.get("connect_median_ns")).collect::<Vec<_>>()),
                        ratios: paired("per_connect_ns"),
                        call_ratios: paired("iter_median_ns"),
                        connect_ratios: paired("connect_median_ns"),
                    }
                })
                .collect(),
        })
        .collect()
}

/// The main table of one family and measure: the median cost of one connection (per-call
/// medians of the whole iteration), median [min–max] over the rounds, and ratios to plain
/// loopback paired by round.
pub fn markdown_table(r: &Results, family: Family, measure: Measure) -> String {
    let cases = cases_of(family);
    let mut s = String::from("| N |");
    for c in &cases {
        let _ = write!(s, " {}{} |", c.label(), if *c == Case::Loopback { "" } else { " (ratio)" });
    }
    s.push_str("\n|---:|");
    s.push_str(&"---:|".repeat(cases.len()));
    s.push('\n');
    for row in rows(r, family, measure) {
        let _ = write!(s, "| {} |", row.entries);
        for &c in &cases {
            let b = row.case(c).call;
            if c == Case::Loopback {
                let _ = write!(s, " {} |", b.markdown());
            } else {
                let _ = write!(s, " {} (**{:.3}×**) |", b.markdown(), row.call_ratio(c));
            }
        }
        s.push('\n');
    }
    s
}

/// The other figures of one family and measure: the `connect()` call alone (median), and the
/// batch's mean (which includes the machine's stalls).
fn per_call_table(r: &Results, family: Family, measure: Measure) -> String {
    let cases = cases_of(family);
    let mut s = String::from("| N |");
    for c in &cases {
        let _ = write!(s, " `connect()` alone: {} |", c.key());
    }
    for c in &cases {
        let _ = write!(s, " batch mean: {} |", c.key());
    }
    s.push_str("\n|---:|");
    s.push_str(&"---:|".repeat(2 * cases.len()));
    s.push('\n');
    for row in rows(r, family, measure) {
        let _ = write!(s, "| {} |", row.entries);
        for &c in &cases {
            let x = row.case(c);
            if c == Case::Loopback {
                let _ = write!(s, " {} |", report::us(x.connect_median));
            } else {
                let _ = write!(s, " {} ({:.3}×) |", report::us(x.connect_median), row.connect_ratio(c));
            }
        }
        for &c in &cases {
            let x = row.case(c);
            if c == Case::Loopback {
                let _ = write!(s, " {} |", report::us(x.batch.median));
            } else {
                let _ = write!(s, " {} ({:.3}×) |", report::us(x.batch.median), row.ratio(c));
            }
        }
        s.push('\n');
    }
    s
}

/// Where a redirected connect's extra time goes, from the medians of connect() alone: the hook
/// itself (miss - loopback: the kernel running a sock_addr program, plus one map lookup) and
/// the redirect path of the program (redirect - miss: the netns cookie, the counter, the
/// rewrite; the lookup hits instead of missing).
fn breakdown(r: &Results, family: Family, measure: Measure) -> String {
    rows(r, family, measure)
        .iter()
        .map(|row| {
            let (l, m, b) = (row.case(Case::Loopback).connect_median, row.case(Case::Miss).connect_median, row.case(Case::Redirect).connect_median);
            format!("N={}: hook {:+.0} ns, redirect {:+.0} ns", row.entries, m - l, b - m)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The verdicts: redirected within 2% of loopback in both measures at every N (IPv4 and IPv6);
/// connect6's cost flat in N.
pub fn verdict(r: &Results) -> String {
    let met = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let mut s = String::new();
    for family in [Family::V4, Family::V6] {
        let mut parts = Vec::new();
        let mut ok = true;
        for measure in [Measure::Open, Measure::Closed] {
            let rows = rows(r, family, measure);
            ok &= rows.iter().all(|row| row.call_ratio(Case::Redirect) <= TARGET_RATIO);
            parts.push(format!(
                "{}: {} (`connect()` alone {}; the hook without a redirect {})",
                if measure == Measure::Open { "whole connection" } else { "closed port" },
                rows.iter().map(|row| format!("{:.3}× at N={}", row.call_ratio(Case::Redirect), row.entries)).collect::<Vec<_>>().join(", "),
                rows.iter().map(|row| format!("{:.3}×", row.connect_ratio(Case::Redirect))).collect::<Vec<_>>().join(", "),
                rows.iter().map(|row| format!("{:.3}×", row.call_ratio(Case::Miss))).collect::<Vec<_>>().join(", "),
            ));
        }
        let _ = writeln!(
            s,
            "Target, a {}-redirected connect within {:.0}% of plain loopback ({}): {}. Redirected/loopback: {}.\n",
            family.hook(),
            (TARGET_RATIO - 1.0) * 100.0,
            family.key(),
            met(ok),
            parts.join("; ")
        );
    }
    let mut flat = Vec::new();
    let mut ok = true;
    for measure in [Measure::Open, Measure::Closed] {
        let rows = rows(r, Family::V6, measure);
        if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
            let d = last.call_ratio(Case::Redirect) - first.call_ratio(Case::Redirect);
            ok &= d.abs() <= FLAT_TOLERANCE;
            flat.push(format!("{}: {:+.3} from N={} to N={}", measure.key(), d, first.entries, last.entries));
        }
    }
    let _ = writeln!(
        s,
        "Target, connect6's redirect cost flat in N (its ratio to loopback moves by at most {:.0} points): {} ({}).\n",
        FLAT_TOLERANCE * 100.0,
        met(ok),
        flat.join("; ")
    );
    let iptables = rows(r, Family::V4, Measure::Open);
    let _ = write!(
        s,
        "For comparison, iptables DNAT/loopback: {}.",
        iptables.iter().map(|row| format!("{:.2}× at N={}", row.call_ratio(Case::Iptables), row.entries)).collect::<Vec<_>>().join(", ")
    );
    if r.config.smoke {
        s.push_str(" (Smoke run: too short to mean anything.)");
    }
    s
}

/// The console summary: the two IPv4 tables and the verdict.
pub fn console(r: &Results) -> String {
    format!(
        "connect4, whole connection:\n{}\nconnect4, closed port:\n{}\nconnect6, whole connection:\n{}\n{}",
        markdown_table(r, Family::V4, Measure::Open),
        markdown_table(r, Family::V4, Measure::Closed),
        markdown_table(r, Family::V6, Measure::Open),
        verdict(r)
    )
}

/// The report section.
pub fn markdown(r: &Results, svg_open: &str, svg_closed: &str) -> String {
    let c = &r.config;
    let mut s = String::from("## connect() cost: beamredir against plain loopback, the bare hook and the iptables recipe\n\n");
    let _ = writeln!(s, "{}.\n", c.describe());
    s.push_str(
        "Cost per connection in µs: each batch's median over its calls (one call = the whole iteration), then the median \
         over the rounds, [min–max] in brackets; per-call medians ignore the multi-millisecond stalls a shared VM adds to a \
         batch's mean (the batch means are in the second table). Ratio: the case's figure over plain loopback's (same \
         family) in the same round (the cases run back to back), median over the rounds; so drift on the machine that \
         outlasts a round (a build on the other core) cancels out. Lower is better. *Hook runs, map misses*: a client in the session dialling loopback \
         directly, so the program runs and finds nothing: the price of having a cgroup hook at all.\n\n",
    );
    for (family, measure, title) in [
        (Family::V4, Measure::Open, "### connect4, whole connection (`socket`, `SO_LINGER 0`, `connect`, `accept`, `close` ×2)"),
        (Family::V4, Measure::Closed, "### connect4, connect to a closed port (`socket`, `connect` → ECONNREFUSED, `close`)"),
        (Family::V6, Measure::Open, "### connect6 (IPv6 pod endpoints redirected to [::1]), whole connection"),
        (Family::V6, Measure::Closed, "### connect6, connect to a closed port"),
    ] {
        let _ = writeln!(s, "{title}\n");
        s.push_str(&markdown_table(r, family, measure));
        s.push('\n');
        s.push_str("The `connect()` call alone (median per batch, then over the rounds), where the cases differ, and the batch means (ratios paired by round):\n\n");
        s.push_str(&per_call_table(r, family, measure));
        let _ = writeln!(s, "\nWhere the time goes (medians of `connect()` alone): {}.\n", breakdown(r, family, measure));
    }
    s.push_str(&verdict(r));
    s.push_str("\n\n");
    let _ = writeln!(s, "![connect() cost against N]({svg_open})\n");
    let _ = writeln!(s, "![connect() to a closed port against N]({svg_closed})\n");
    s.push_str("beamredir's own counters of redirected connects to each dialled endpoint, against what the clients made:\n\n");
    for rc in &r.redirect_counts {
        let counted = rc.counted.map_or("unavailable".to_string(), |c| c.to_string());
        let _ = writeln!(
            s,
            "* N={} {}: {counted} counted, {} made{}",
            rc.entries,
            rc.pod,
            rc.expected,
            if rc.counted == Some(rc.expected) { "" } else { " (**mismatch**)" }
        );
    }
    s.push_str("\nSet-up time per namespace (the namespace, then the session or the rules):\n\n| N |");
    for p in Place::ALL {
        let _ = write!(s, " {} |", p.key());
    }
    s.push_str("\n|---:|");
    s.push_str(&"---:|".repeat(Place::ALL.len()));
    s.push('\n');
    for &n in &c.sizes {
        let _ = write!(s, "| {n} |");
        for p in Place::ALL {
            let t = r.setup_s.iter().find(|x| x.0 == n && x.1 == p.key()).map_or(f64::NAN, |x| x.2);
            let _ = write!(s, " {t:.2} s |");
        }
        s.push('\n');
    }
    s.push_str(&format!(
        "\nHow: each namespace has only loopback and no default route. Its clients (`xtask/bench/connect_bench.c`, \
         `cc -O2`, pinned to one CPU) listen on loopback and connect to it: plain loopback dials 127.0.0.1:{LOCAL_PORT} \
         ([::1]:{LOCAL_PORT}); the session's miss client dials 127.0.0.1:{MISS_PORT} directly; the redirect clients dial \
         {} and {} (a `beamredir map` session with N-1 fillers, the dialled entry and the closed-port entry \
         `POD:{POD_CLOSED_PORT}={CLOSED_PORT}`, the clients started in it by `beamredir exec`); iptables: \
         `iptables-restore` of N+1 DNAT rules in nat OUTPUT with the dialled ones last, plus `ip route add {POD_IP}/32 \
         dev lo`, `route_localnet=1` and a workstation address (192.0.2.10/32 on lo). All sizes are set up at once and their clients stay up for the whole run; they \
         run one batch at a time, never together, in rounds: each round visits every size (in rotating order) and runs \
         its seven clients back to back, in an order that rotates every round. The closed-port runs follow, organised \
         the same way.\n",
        Family::V4.pod(POD_PORT),
        Family::V6.pod(POD_PORT),
    ));
    s
}

/// Every repetition and the summary, machine-readable.
pub fn json(r: &Results) -> Value {
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let mut summary = json!({});
    let mut met = true;
    for family in [Family::V4, Family::V6] {
        for measure in [Measure::Open, Measure::Closed] {
            let rows = rows(r, family, measure);
            met &= rows.iter().all(|row| row.call_ratio(Case::Redirect) <= TARGET_RATIO);
            summary[family.key()][measure.key()] = rows
                .iter()
                .map(|row| {
                    let mut o = json!({ "entries": row.entries });
                    for case in cases_of(family) {
                        let x = row.case(case);
                        let mut c = json!({
                            "per_call_ns": x.call.json(),
                            "per_connect_ns": x.batch.json(),
                            "per_call_median_ns": report::round1(x.call_median),
                            "connect_call_median_ns": report::round1(x.connect_median),
                        });
                        if case != Case::Loopback {
                            c["ratio"] = json!(r3(row.ratio(case)));
                            c["ratios_by_round"] = json!(x.ratios.iter().map(|&v| r3(v)).collect::<Vec<_>>());
                            c["per_call_ratio"] = json!(r3(row.call_ratio(case)));
                            c["per_call_ratios_by_round"] = json!(x.call_ratios.iter().map(|&v| r3(v)).collect::<Vec<_>>());
                            c["connect_call_ratio"] = json!(r3(row.connect_ratio(case)));
                        }
                        o[case.key()] = c;
                    }
                    o
                })
                .collect::<Vec<_>>()
                .into();
        }
    }
    json!({
        "config": r.config.json(),
        "unit": "ns per connection",
        "target_ratio": TARGET_RATIO,
        "target_met": met,
        "summary": summary,
        "repetitions": r.measurements.iter().map(|m| json!({
            "entries": m.entries,
            "family": m.kind.family.key(),
            "case": m.kind.case.key(),
            "measure": m.measure.key(),
            "rep": m.rep,
            "position": m.position,
            "client": m.client,
        })).collect::<Vec<_>>(),
        "beamredir_redirect_counts": r.redirect_counts.iter().map(|c| json!({
            "entries": c.entries, "pod": c.pod, "made": c.expected, "counted": c.counted,
        })).collect::<Vec<_>>(),
        "setup_s": r.setup_s.iter().map(|(n, place, t)| json!({
            "entries": n, "namespace": place, "seconds": (t * 1000.0).round() / 1000.0,
        })).collect::<Vec<_>>(),
    })
}

/// A plot of one measure: cost per connection against N (log scale), one line per case and
/// family (IPv6 dashed).
pub fn plot(r: &Results, measure: Measure, machine: &Machine) -> String {
    let mut series = Vec::new();
    for family in [Family::V4, Family::V6] {
        let rows = rows(r, family, measure);
        for case in cases_of(family) {
            let (color, marker) = match case {
                Case::Loopback => ("#555555", Marker::Circle),
                Case::Miss => ("#2a9d3a", Marker::Diamond),
                Case::Redirect => ("#1f6fd1", Marker::Square),
                Case::Iptables => ("#d1341f", Marker::Triangle),
            };
            series.push(Series {
                name: format!(
                    "{}, {}",
                    if case == Case::Iptables { "iptables DNAT" } else { case.label() },
                    if family == Family::V4 { "IPv4" } else { "IPv6" }
                ),
                color,
                dash: if family == Family::V6 { Some("7 4") } else { None },
                marker,
                points: rows
                    .iter()
                    .map(|row| {
                        let s = row.case(case).call;
                        Point { x: f64::from(row.entries), y: s.median / 1000.0, lo: s.min / 1000.0, hi: s.max / 1000.0 }
                    })
                    .collect(),
            });
        }
    }
    let (what, reps, n) = match measure {
        Measure::Open => ("connect() cost", r.config.reps, r.config.connects),
        Measure::Closed => ("connect() to a closed port", r.config.closed_runs, r.config.closed_connects),
    };
    plot::svg(&Chart {
        title: format!("{what}: beamredir vs plain loopback, the bare hook, iptables DNAT"),
        subtitle: format!(
            "{} × {} connects per case and N{}; Linux {}, {} × {}",
            reps,
            n,
            if r.config.smoke { " (smoke run)" } else { "" },
            machine.kernel,
            machine.nproc,
            machine.cpu_model
        ),
        x_label: "N: entries in beamredir's map / rules in the nat OUTPUT chain (log scale)".into(),
        y_label: "median cost per connection (µs, log scale)".into(),
        x_log: true,
        y_log: true,
        series,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fillers_never_hit_the_dialled_address() {
        for i in 0..16_000 {
            assert_ne!(filler_ip(i), POD_IP);
            assert_ne!(filler_ip6(i), POD_IP6);
        }
        assert_eq!(filler_ip(0), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(filler_ip(250), Ipv4Addr::new(10, 244, 2, 1));
        assert_eq!(filler_ip6(0).to_string(), "fd00:10:244:1::1");
    }

    #[test]
    fn ruleset_puts_the_dialled_rules_last() {
        let rules = iptables_ruleset(3);
        let lines: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A OUTPUT")).collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[2].contains("-d 10.244.0.5/32") && lines[2].contains("--to-destination 127.0.0.1:14369"));
        assert!(lines[3].contains("--dport 4370") && lines[3].contains("--to-destination 127.0.0.1:14371"));
        assert!(rules.ends_with("COMMIT\n"));
    }

    #[test]
    fn every_kind_has_a_namespace_and_every_order_has_them_all() {
        for kind in KINDS {
            assert_eq!(Place::ALL.iter().filter(|p| p.kinds().contains(&kind)).count(), 1, "{kind:?}");
        }
        for rep in 0..10 {
            let o = order(rep);
            assert_eq!(o.len(), KINDS.len());
            assert!(KINDS.iter().all(|k| o.contains(k)));
        }
    }
}
