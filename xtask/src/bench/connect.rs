//! Benchmark 1: what one `connect()` costs, side by side:
//!
//! * **loopback**: plain `connect(127.0.0.1:LOCAL_PORT)`, the floor;
//! * **beamredir**: `connect(POD_IP:POD_PORT)` rewritten to `127.0.0.1:LOCAL_PORT` by
//!   beamredir's `cgroup/connect4` program, with N entries in its map (N-1 fillers for other
//!   pod IPs plus the one dialled);
//! * **iptables**: the same pod address rewritten by the manual recipe, a DNAT rule in the nat
//!   OUTPUT chain, with N rules of which the N-1 fillers come *first* (the chain is walked in
//!   order, so the dialled rule is the last one tried), plus the route to the pod IP and
//!   `route_localnet=1` that DNAT to loopback needs.
//!
//! Each case at each size lives in its own network namespace (only loopback, no default route:
//! a pod address can never leave the machine), deleted at the end, also on error. The client
//! is `xtask/bench/connect_bench.c`: one thread, listening on `127.0.0.1:LOCAL_PORT` itself
//! and accepting every connection it makes, the same server for all cases. One persistent
//! client per namespace runs one batch at a time on request; after a warm-up batch each, the
//! batches run in rounds over every size and case (see [`run`]), so drift on the machine (on
//! a shared 2-CPU VM: builds on the other CPU) hits every case alike, and the ratios to plain
//! loopback are taken per round.
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddrV4},
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

/// The pod address the client dials (reached only inside the bench's namespaces).
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 5);
const POD_PORT: u16 = 4369;
/// Where the client listens: the stand-in for the local port-forward.
const LOCAL_PORT: u16 = 14369;
/// The target from the issue: beamredir's redirected connect within 5% of plain loopback.
const TARGET_RATIO: f64 = 1.05;

/// Filler pod addresses, never the dialled one: 10.244.1.1, 10.244.1.2, … (250 per /24).
fn filler_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, (1 + i / 250) as u8, (1 + i % 250) as u8)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    Loopback,
    Beamredir,
    Iptables,
}

impl Case {
    const ALL: [Case; 3] = [Case::Loopback, Case::Beamredir, Case::Iptables];

    fn key(self) -> &'static str {
        match self {
            Case::Loopback => "loopback",
            Case::Beamredir => "beamredir",
            Case::Iptables => "iptables",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Case::Loopback => "plain loopback",
            Case::Beamredir => "beamredir (eBPF connect4)",
            Case::Iptables => "iptables DNAT (nat OUTPUT)",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub smoke: bool,
    /// Entries in beamredir's map = rules in the nat OUTPUT chain.
    pub sizes: Vec<u32>,
    pub reps: u32,
    /// Connections per timed repetition.
    pub connects: u32,
    /// Untimed connections the client makes before each timed batch.
    pub client_warmup: u32,
    /// One untimed batch per case and size before the repetitions.
    pub warmup_batch: u32,
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
            cpu: nproc - 1,
        }
    }

    pub fn describe(&self) -> String {
        let sizes: Vec<String> = self.sizes.iter().map(u32::to_string).collect();
        format!(
            "N = {} entries/rules; {} rounds × {} connects per case (each batch after {} untimed ones; first a {}-connect warm-up batch per case); clients on CPU {}{}",
            sizes.join(", "),
            self.reps,
            self.connects,
            self.client_warmup,
            self.warmup_batch,
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
            "client_cpu": self.cpu,
            "pod": format!("{POD_IP}:{POD_PORT}"),
            "local": format!("127.0.0.1:{LOCAL_PORT}"),
        })
    }
}

/// One timed batch of the client.
pub struct Measurement {
    pub entries: u32,
    pub case: Case,
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
    pub expected: u64,
    pub counted: Option<u64>,
}

pub struct Results {
    pub config: Config,
    pub measurements: Vec<Measurement>,
    pub redirect_counts: Vec<RedirectCount>,
    /// Seconds to set up each case at each size (namespace, session or rules).
    pub setup_s: Vec<(u32, Case, f64)>,
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

    /// How many connects beamredir redirected to the dialled pod address so far.
    fn redirected(&self) -> Option<u64> {
        let status = self.status()?;
        let pod = format!("{POD_IP}:{POD_PORT}");
        status["redirects"].as_array()?.iter().find(|r| r["pod"] == pod.as_str())?["connects"].as_u64()
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

/// One case at one size: its namespace and whatever redirects in it. Fields drop in order:
/// the session ends before its namespace goes.
struct Env {
    case: Case,
    session: Option<Session>,
    ns: Netns,
}

impl Env {
    fn new(case: Case, entries: u32, beamredir: &Path) -> Result<Self> {
        let ns = Netns::new(match case {
            Case::Loopback => "brbl",
            Case::Beamredir => "brbb",
            Case::Iptables => "brbi",
        })?;
        let mut env = Env { case, session: None, ns };
        match case {
            Case::Loopback => {}
            Case::Beamredir => {
                let mut mappings: Vec<String> =
                    (0..entries - 1).map(|i| format!("{}:{POD_PORT}={LOCAL_PORT}", filler_ip(i))).collect();
                mappings.push(format!("{POD_IP}:{POD_PORT}={LOCAL_PORT}"));
                env.session = Some(Session::start(&env.ns, beamredir, &mappings)?);
            }
            Case::Iptables => {
                let ns = env.ns.name().to_string();
                // What DNAT to loopback needs besides the rule: a route to the pod IP, and
                // permission to route 127/8 (both only inside this namespace).
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
                ensure!(n == entries as usize, "expected {entries} rules in nat OUTPUT, iptables-save shows {n}");
            }
        }
        Ok(env)
    }

    fn target(&self) -> SocketAddrV4 {
        match self.case {
            Case::Loopback => SocketAddrV4::new(Ipv4Addr::LOCALHOST, LOCAL_PORT),
            Case::Beamredir | Case::Iptables => SocketAddrV4::new(POD_IP, POD_PORT),
        }
    }

    /// Starts this case's persistent client: in the namespace, and for beamredir inside the
    /// session (`beamredir exec`).
    fn start_client(&self, client: &Path, cfg: &Config) -> Result<Client> {
        let mut cmd = match &self.session {
            Some(session) => {
                let mut cmd = session.beamredir();
                cmd.args(["-q", "exec", "--session", &session.name, "--"]).arg(client);
                cmd
            }
            None => self.ns.command(client),
        };
        cmd.args(["--listen-port", &LOCAL_PORT.to_string(), "--target", &self.target().to_string()])
            .args(["--stdin", "--cpu", &cfg.cpu.to_string()]);
        Client::start(self.case, &mut cmd)
    }
}

/// A running `connect_bench --stdin`: asked for one batch at a time, so the cases can be
/// interleaved finely without starting a process per batch. Killed on drop.
struct Client {
    case: Case,
    stdin: std::process::ChildStdin,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    proc: Proc,
}

impl Client {
    fn start(case: Case, cmd: &mut Command) -> Result<Self> {
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
        let mut client = Client { case, stdin, lines, stderr, proc };
        // It checks that its target reaches its listener before it says it is ready.
        let ready = client.recv(Duration::from_secs(30))?;
        ensure!(ready["ready"] == true, "{} client: unexpected {ready}", case.key());
        Ok(client)
    }

    /// The next output line, as JSON, within `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            match self.lines.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => return serde_json::from_str(&line).with_context(|| format!("{} client said {line:?}", self.case.key())),
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
                    bail!("{} client: {what}: {}", self.case.key(), self.stderr.lock().unwrap().trim())
                }
            }
        }
    }

    /// One timed batch of `connects`, after `warmup` untimed ones.
    fn batch(&mut self, connects: u32, warmup: u32) -> Result<Value> {
        writeln!(self.stdin, "{connects} {warmup}").and_then(|_| self.stdin.flush()).context("asking the client for a batch")?;
        // Generous: even 1 ms per connection (5× the slowest case seen) finishes well within it.
        let v = self.recv(Duration::from_secs(30) + Duration::from_millis(u64::from(connects + warmup)))?;
        ensure!(v["count"].as_u64() == Some(u64::from(connects)), "{} client answered {v}", self.case.key());
        Ok(v)
    }
}

/// The nat table for iptables-restore: N-1 filler DNAT rules for other pod IPs, then the
/// dialled one, so the lookup walks the whole chain.
fn iptables_ruleset(entries: u32) -> String {
    let mut s = String::from("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    let rule = |s: &mut String, ip: Ipv4Addr| {
        let _ = writeln!(s, "-A OUTPUT -d {ip}/32 -p tcp -m tcp --dport {POD_PORT} -j DNAT --to-destination 127.0.0.1:{LOCAL_PORT}");
    };
    for i in 0..entries - 1 {
        rule(&mut s, filler_ip(i));
    }
    rule(&mut s, POD_IP);
    s.push_str("COMMIT\n");
    s
}

/// Orders of the three cases in successive rounds: each case takes every position, and plain
/// loopback and beamredir, whose ratio is the target, always run next to each other.
const ORDERS: [[Case; 3]; 4] = [
    [Case::Loopback, Case::Beamredir, Case::Iptables],
    [Case::Beamredir, Case::Loopback, Case::Iptables],
    [Case::Iptables, Case::Loopback, Case::Beamredir],
    [Case::Iptables, Case::Beamredir, Case::Loopback],
];

/// Everything for one size: its three namespaces and their clients (which go first on drop).
struct Group {
    entries: u32,
    clients: Vec<Client>,
    envs: Vec<Env>,
    /// Connects the beamredir client made so far, for checking beamredir's own counter.
    redirected: u64,
}

/// Sets up every size at once, then runs rounds: in each, every size (in rotating order) runs
/// its three cases back to back (in the order of [`ORDERS`]). So drift on the machine spreads
/// over sizes and cases alike, and each round gives a ratio per size from batches that ran
/// within a fraction of a second of each other.
pub fn run(cfg: &Config, client: &Path, beamredir: &Path) -> Result<Results> {
    ensure!(
        (1..=8).contains(&cfg.sizes.len()),
        "give 1 to 8 sizes (each one runs 3 namespaces and a beamredir session at once)"
    );
    let mut results = Results { config: cfg.clone(), measurements: Vec::new(), redirect_counts: Vec::new(), setup_s: Vec::new() };
    let mut groups = Vec::new();
    for &n in &cfg.sizes {
        let mut envs = Vec::new();
        for case in Case::ALL {
            check_interrupted()?;
            let t = Instant::now();
            envs.push(Env::new(case, n, beamredir).with_context(|| format!("setting up {} with N={n}", case.key()))?);
            results.setup_s.push((n, case, t.elapsed().as_secs_f64()));
        }
        let clients = envs.iter().map(|e| e.start_client(client, cfg)).collect::<Result<Vec<_>>>()?;
        // Each client checked one connection on start.
        groups.push(Group { entries: n, clients, envs, redirected: 1 });
    }
    println!("  set up {} namespaces; warming up", groups.len() * Case::ALL.len());
    for g in &mut groups {
        for c in &mut g.clients {
            c.batch(cfg.warmup_batch, cfg.client_warmup)?;
        }
        g.redirected += u64::from(cfg.warmup_batch + cfg.client_warmup);
    }
    let sizes = groups.len();
    for rep in 0..cfg.reps {
        let mut lines = Vec::new();
        for k in 0..sizes {
            let g = &mut groups[(rep as usize + k) % sizes];
            let mut line = format!("  round {:>2}/{} N={:<6}", rep + 1, cfg.reps, g.entries);
            for (position, &case) in ORDERS[rep as usize % ORDERS.len()].iter().enumerate() {
                let c = g.clients.iter_mut().find(|c| c.case == case).expect("a client per case");
                let m = Measurement { entries: g.entries, case, rep, position: position as u32, client: c.batch(cfg.connects, cfg.client_warmup)? };
                let _ = write!(line, "  {:<9} {:>9}", case.key(), report::us(m.get("per_connect_ns")));
                results.measurements.push(m);
            }
            g.redirected += u64::from(cfg.connects + cfg.client_warmup);
            lines.push((g.entries, line));
        }
        // Every round of a short run; every tenth of a long one.
        if cfg.reps <= 10 || (rep + 1) % 10 == 0 || rep + 1 == cfg.reps {
            lines.sort_by_key(|l| l.0);
            for (_, line) in lines {
                println!("{line}");
            }
        }
    }
    for mut g in groups {
        g.clients.clear();
        let counted = g.envs.iter().find_map(|e| e.session.as_ref()).and_then(Session::redirected);
        if counted != Some(g.redirected) {
            println!("  warning: at N={} beamredir counted {counted:?} redirected connects, the client made {}", g.entries, g.redirected);
        }
        results.redirect_counts.push(RedirectCount { entries: g.entries, expected: g.redirected, counted });
    }
    Ok(results)
}

/// One case at one size, summarised over its repetitions.
struct CaseSummary {
    case: Case,
    /// The batch figure (ns per connection).
    batch: Spread,
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

/// Per size: every case. Ratios are paired by round (the three batches of a round run back
/// to back), and their median is the ratio reported: drift on the machine that lasts longer
/// than a round cancels out.
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

fn rows(r: &Results) -> Vec<Row> {
    let get = |n: u32, case: Case, rep: u32, key: &str| {
        r.measurements.iter().find(|m| m.entries == n && m.case == case && m.rep == rep).map(|m| m.get(key))
    };
    r.config
        .sizes
        .iter()
        .map(|&n| Row {
            entries: n,
            cases: Case::ALL
                .iter()
                .map(|&case| {
                    let ms: Vec<&Measurement> = r.measurements.iter().filter(|m| m.entries == n && m.case == case).collect();
                    let batch: Vec<f64> = ms.iter().map(|m| m.get("per_connect_ns")).collect();
                    let call: Vec<f64> = ms.iter().map(|m| m.get("iter_median_ns")).collect();
                    let paired = |key: &str| -> Vec<f64> {
                        ms.iter().filter_map(|m| Some(m.get(key) / get(n, Case::Loopback, m.rep, key)?)).collect()
                    };
                    CaseSummary {
                        case,
                        batch: Spread::of(&batch),
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

/// The main table: per-connect cost (batch), median [min–max] over repetitions, and ratios.
pub fn markdown_table(r: &Results) -> String {
    let mut s = String::from(
        "| N entries / rules | plain loopback | beamredir (ratio to loopback) | iptables DNAT (ratio to loopback) |\n|---:|---:|---:|---:|\n",
    );
    for row in rows(r) {
        let (l, b, i) = (row.case(Case::Loopback).batch, row.case(Case::Beamredir).batch, row.case(Case::Iptables).batch);
        let _ = writeln!(
            s,
            "| {} | {} | {} (**{:.3}×**) | {} (**{:.2}×**) |",
            row.entries,
            l.markdown(),
            b.markdown(),
            row.ratio(Case::Beamredir),
            i.markdown(),
            row.ratio(Case::Iptables)
        );
    }
    s
}

/// Per-call medians: of the whole iteration, and of the connect() call alone.
fn per_call_table(r: &Results) -> String {
    let mut s = String::from(
        "| N | loopback | beamredir (ratio) | iptables DNAT (ratio) | connect() alone: loopback | beamredir (ratio) | iptables DNAT (ratio) |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows(r) {
        let (l, b, i) = (row.case(Case::Loopback), row.case(Case::Beamredir), row.case(Case::Iptables));
        let _ = writeln!(
            s,
            "| {} | {} | {} ({:.3}×) | {} ({:.2}×) | {} | {} ({:.3}×) | {} ({:.2}×) |",
            row.entries,
            report::us(l.call_median),
            report::us(b.call_median),
            row.call_ratio(Case::Beamredir),
            report::us(i.call_median),
            row.call_ratio(Case::Iptables),
            report::us(l.connect_median),
            report::us(b.connect_median),
            row.connect_ratio(Case::Beamredir),
            report::us(i.connect_median),
            row.connect_ratio(Case::Iptables),
        );
    }
    s
}

/// Whether beamredir stayed within 5% of plain loopback at every N, with the figures.
pub fn verdict(r: &Results) -> String {
    let rows = rows(r);
    let list = |f: &dyn Fn(&Row) -> String| rows.iter().map(f).collect::<Vec<_>>().join(", ");
    let misses: Vec<String> = rows
        .iter()
        .filter(|row| row.ratio(Case::Beamredir) > TARGET_RATIO)
        .map(|row| format!("N={} ({:.3}×)", row.entries, row.ratio(Case::Beamredir)))
        .collect();
    let mut s = String::from("Target, beamredir within 5% of plain loopback at every N: ");
    if misses.is_empty() {
        s.push_str("**met**.");
    } else {
        let _ = write!(s, "**missed** at {}.", misses.join(", "));
    }
    let _ = write!(
        s,
        " beamredir/loopback: {} (per-call medians: {}). iptables/loopback: {}.",
        list(&|row| format!("{:.3}× at N={}", row.ratio(Case::Beamredir), row.entries)),
        list(&|row| format!("{:.3}×", row.call_ratio(Case::Beamredir))),
        list(&|row| format!("{:.2}× at N={}", row.ratio(Case::Iptables), row.entries)),
    );
    if r.config.smoke {
        s.push_str(" (Smoke run: too short to mean anything.)");
    }
    s
}

/// The report section.
pub fn markdown(r: &Results, svg_name: &str) -> String {
    let c = &r.config;
    let mut s = String::from("## connect() cost: beamredir against plain loopback and the iptables recipe\n\n");
    let _ = writeln!(s, "{}.\n", c.describe());
    s.push_str(
        "Cost per connection in µs: the client's whole timed batch divided by its connections (one connection = \
         `socket`, `SO_LINGER 0`, `connect`, `accept`, `close` ×2), median over the repetitions, [min–max] in brackets. \
         Ratio: the case's batch over plain loopback's batch in the same round (the three run back to back), median over \
         the rounds; so drift on the machine that outlasts a round (a build on the other core) cancels out. Lower is better.\n\n",
    );
    s.push_str(&markdown_table(r));
    s.push('\n');
    s.push_str(&verdict(r));
    s.push_str("\n\n");
    let _ = writeln!(s, "![connect() cost against N]({svg_name})\n");
    s.push_str(
        "Per-call medians, median over the rounds (ratios paired by round as above): of the whole iteration, which is \
         insensitive to the rare multi-millisecond stalls that a shared virtual machine adds to a batch's mean, and of the \
         `connect()` call alone, where the difference between the cases lies (the rest of the iteration is the same work \
         in each; iptables also pays conntrack on the accept and close side).\n\n",
    );
    s.push_str(&per_call_table(r));
    s.push_str("\nbeamredir's own counter of redirected connects to the dialled address, against what the clients made:\n\n");
    for rc in &r.redirect_counts {
        let counted = rc.counted.map_or("unavailable".to_string(), |c| c.to_string());
        let _ = writeln!(
            s,
            "* N={}: {counted} counted, {} made{}",
            rc.entries,
            rc.expected,
            if rc.counted == Some(rc.expected) { "" } else { " (**mismatch**)" }
        );
    }
    s.push_str("\nSet-up time per case (namespace, then the session or the rules):\n\n| N | loopback | beamredir | iptables |\n|---:|---:|---:|---:|\n");
    for &n in &c.sizes {
        let t = |case| r.setup_s.iter().find(|x| x.0 == n && x.1 == case).map_or(f64::NAN, |x| x.2);
        let _ = writeln!(s, "| {n} | {:.2} s | {:.2} s | {:.2} s |", t(Case::Loopback), t(Case::Beamredir), t(Case::Iptables));
    }
    s.push_str(&format!(
        "\nHow: each case runs in its own network namespace with only loopback and no default route. Its client \
         (`xtask/bench/connect_bench.c`, `cc -O2`, pinned to one CPU) listens on 127.0.0.1:{LOCAL_PORT} and connects to \
         127.0.0.1:{LOCAL_PORT} (loopback) or to {POD_IP}:{POD_PORT} (beamredir: a `beamredir map` session with N entries, \
         the client started in it by `beamredir exec`; iptables: `iptables-restore` of N DNAT rules in nat OUTPUT with \
         the dialled one last, plus `ip route add {POD_IP}/32 dev lo` and `route_localnet=1`). All sizes are set up at once \
         and their clients stay up for the whole run; they run one batch at a time, never together, in rounds: each round \
         visits every size (in rotating order) and runs its three cases back to back, the order changing every round, \
         plain loopback and beamredir always next to each other.\n"
    ));
    s
}

/// Every repetition and the summary, machine-readable.
pub fn json(r: &Results) -> Value {
    let rows = rows(r);
    json!({
        "config": r.config.json(),
        "unit": "ns per connection",
        "target_ratio": TARGET_RATIO,
        "target_met": rows.iter().all(|row| row.ratio(Case::Beamredir) <= TARGET_RATIO),
        "summary": rows.iter().map(|row| {
            let mut o = json!({ "entries": row.entries });
            for case in Case::ALL {
                let summary = row.case(case);
                let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
                let mut c = json!({
                    "per_connect_ns": summary.batch.json(),
                    "per_call_median_ns": report::round1(summary.call_median),
                    "connect_call_median_ns": report::round1(summary.connect_median),
                });
                if case != Case::Loopback {
                    c["ratio"] = json!(r3(row.ratio(case)));
                    c["ratios_by_round"] = json!(summary.ratios.iter().map(|&x| r3(x)).collect::<Vec<_>>());
                    c["per_call_ratio"] = json!(r3(row.call_ratio(case)));
                    c["per_call_ratios_by_round"] = json!(summary.call_ratios.iter().map(|&x| r3(x)).collect::<Vec<_>>());
                    c["connect_call_ratio"] = json!(r3(row.connect_ratio(case)));
                }
                o[case.key()] = c;
            }
            o
        }).collect::<Vec<_>>(),
        "repetitions": r.measurements.iter().map(|m| json!({
            "entries": m.entries,
            "case": m.case.key(),
            "rep": m.rep,
            "position": m.position,
            "client": m.client,
        })).collect::<Vec<_>>(),
        "beamredir_redirect_counts": r.redirect_counts.iter().map(|c| json!({
            "entries": c.entries, "made": c.expected, "counted": c.counted,
        })).collect::<Vec<_>>(),
        "setup_s": r.setup_s.iter().map(|(n, case, t)| json!({
            "entries": n, "case": case.key(), "seconds": (t * 1000.0).round() / 1000.0,
        })).collect::<Vec<_>>(),
    })
}

/// The plot: cost per connection against N (log scale), one line per case.
pub fn plot(r: &Results, machine: &Machine) -> String {
    let rows = rows(r);
    let style = |case| match case {
        Case::Loopback => ("#555555", None, Marker::Circle),
        Case::Beamredir => ("#1f6fd1", Some("7 4"), Marker::Square),
        Case::Iptables => ("#d1341f", None, Marker::Triangle),
    };
    let series = Case::ALL
        .iter()
        .map(|&case| {
            let (color, dash, marker) = style(case);
            Series {
                name: case.label().to_string(),
                color,
                dash,
                marker,
                points: rows
                    .iter()
                    .map(|row| {
                        let s = row.case(case).batch;
                        Point { x: f64::from(row.entries), y: s.median / 1000.0, lo: s.min / 1000.0, hi: s.max / 1000.0 }
                    })
                    .collect(),
            }
        })
        .collect();
    plot::svg(&Chart {
        title: "connect() cost: beamredir vs plain loopback vs iptables DNAT".into(),
        subtitle: format!(
            "{} × {} connects per case and N{}; Linux {}, {} × {}",
            r.config.reps,
            r.config.connects,
            if r.config.smoke { " (smoke run)" } else { "" },
            machine.kernel,
            machine.nproc,
            machine.cpu_model
        ),
        x_label: "N: entries in beamredir's map / rules in the nat OUTPUT chain (log scale)".into(),
        y_label: "cost per connection (µs, log scale)".into(),
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
        }
        assert_eq!(filler_ip(0), Ipv4Addr::new(10, 244, 1, 1));
        assert_eq!(filler_ip(250), Ipv4Addr::new(10, 244, 2, 1));
    }

    #[test]
    fn ruleset_puts_the_dialled_rule_last() {
        let rules = iptables_ruleset(3);
        let lines: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A OUTPUT")).collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[2].contains("-d 10.244.0.5/32") && lines[2].contains("--to-destination 127.0.0.1:14369"));
        assert!(rules.ends_with("COMMIT\n"));
    }
}
