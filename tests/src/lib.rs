//! beamredir's privileged test bed, shared by the integration tests and `cargo xtask demo`.
//!
//! * [`Netns`]: a uniquely named network namespace, removed (with every process in it) on drop.
//! * [`Pod`]: a "pod" namespace with its own IP, its own epmd and a real
//!   `erl` node named `app@POD_IP`.
//! * [`Relay`]: the stand-in for a port-forward: listens on 127.0.0.1 in the workstation
//!   namespace and, per connection, dials `127.0.0.1:PORT` *inside* the pod namespace, as the
//!   kubelet does.
//! * [`Workstation`]: a namespace with only loopback: no route to any pod IP, so anything the
//!   redirect misses fails with ENETUNREACH instead of leaving the machine.
//! * [`recipe`]: the manual `kubectl port-forward` + iptables recipe beamredir replaces, run for
//!   real as a baseline.
//!
//! Names are unique per process and call so tests can run concurrently.
use std::{
    fs::File,
    io::{self, Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

pub mod cluster;
pub mod demo;
pub mod procfs;
pub mod recipe;

use anyhow::{Context, Result, bail, ensure};

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call, e.g. `t1234-7`.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}-{}", std::process::id() % 100_000, NEXT_ID.fetch_add(1, Ordering::Relaxed))
}

/// A pod IP unique to this process and call, inside 10.244.0.0/16 (only ever reached inside
/// the test namespaces).
pub fn unique_pod_ip() -> Ipv4Addr {
    let n = (std::process::id() % 200) * 250 + NEXT_ID.fetch_add(1, Ordering::Relaxed) % 250;
    Ipv4Addr::new(10, 244, (n / 250 % 250) as u8 + 1, (n % 250) as u8 + 2)
}

/// Runs a command and fails with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// What a command printed, stdout then stderr, as text (for assertion messages).
pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The beamredir binary under test: $BEAMREDIR_BIN, else the workspace's debug build.
pub fn beamredir_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BEAMREDIR_BIN") {
        return p.into();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or(root.join("target"));
    target.join("debug/beamredir")
}

pub fn require_root() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "the beamredir test bed needs root (network namespaces, eBPF, cgroups): run `cargo xtask test` as root"
    );
    Ok(())
}

/// A network namespace with loopback up. Dropping it kills its processes and deletes it.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique(prefix);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Netns { name };
        run(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// A command run in this namespace with `nsenter --net` (mounts, and so /sys/fs/cgroup,
    /// stay as they are; `ip netns exec` would hide the cgroup2 mount).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display())).arg("--").arg(program);
        cmd
    }

    /// A command run with `ip netns exec` (fresh /sys: no cgroup2 mount visible).
    pub fn ip_netns_exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Moves the calling thread into this namespace (sockets it creates then live here).
    pub fn enter_current_thread(&self) -> Result<()> {
        let f = File::open(self.path())?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(())
    }

    /// Runs `f` on a fresh thread inside this namespace.
    pub fn in_ns<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.path();
        thread::spawn(move || -> Result<T> {
            nix::sched::setns(File::open(path)?, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread panicked"))?
    }

    /// Gives the namespace an address (on its loopback: this kernel has no dummy driver, and
    /// the address needs no route beyond the namespace).
    pub fn add_address(&self, ip: Ipv4Addr) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.name, "addr", "add", &format!("{ip}/32"), "dev", "lo"]))?;
        Ok(())
    }

    /// Processes in this namespace.
    pub fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for _ in 0..20 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A child process killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A beamredir session process ended on drop the way a user ends it: SIGTERM, so it removes
/// its cgroup and files; SIGKILL only if it is still there after 5 s.
pub struct Graceful(pub Child);

impl Drop for Graceful {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && matches!(self.0.try_wait(), Ok(None)) {
                thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `f` returns true or the timeout passes.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub const COOKIE: &str = "beamredir-test-cookie";
pub const EPMD_PORT: u16 = 4369;

/// `erl` flags for a hidden local node `name` that runs `script` with no shell: it calls the
/// pod's nodes without joining their cluster, and ends when the script halts.
pub fn hidden_node_args<'a>(name: &'a str, cookie: &'a str, script: &'a str) -> [&'a str; 8] {
    ["-name", name, "-setcookie", cookie, "-hidden", "-noshell", "-eval", script]
}

/// What the pod's node runs: plain Erlang, or Elixir (needed on the far side of `iex --remsh`).
#[derive(Clone, Copy, Debug)]
pub enum PodRuntime {
    Erlang,
    Elixir,
}

/// How the pod's node names itself: `-name app@IP`, or `-sname app@HOST` with a host name
/// that an inetrc file in the pod's home maps to the pod IP (as a StatefulSet pod's hostname).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNames {
    Long,
    Short,
}

/// A "pod": its own namespace and IP, running a real Erlang node `app@IP` (and its epmd).
pub struct Pod {
    pub ip: Ipv4Addr,
    pub dist_port: u16,
    pub node: String,
    erl: Proc,
    home: TempDir,
    pub ns: Netns,
}

impl Pod {
    /// Starts `erl -name app@IP` with its distribution listener fixed on `dist_port`.
    pub fn start_erlang(ip: Ipv4Addr, dist_port: u16) -> Result<Self> {
        Self::start(ip, dist_port, PodRuntime::Erlang)
    }

    pub fn start(ip: Ipv4Addr, dist_port: u16, runtime: PodRuntime) -> Result<Self> {
        Self::start_named(ip, dist_port, runtime, PodNames::Long, &[])
    }

    /// Starts the pod's node in a name mode, with extra `erl` flags (for elixir: `--erl` flags).
    /// Its stdout and stderr go to [`Pod::log`].
    pub fn start_named(ip: Ipv4Addr, dist_port: u16, runtime: PodRuntime, names: PodNames, extra: &[&str]) -> Result<Self> {
        let ns = Netns::new("brpod")?;
        ns.add_address(ip)?;
        let home = TempDir::new("brpod-home")?;
        let (flag, node) = match names {
            PodNames::Long => ("name", format!("app@{ip}")),
            PodNames::Short => ("sname", format!("app@{}", ns.name())),
        };
        let inetrc = home.path().join("inetrc");
        let [a, b, c, d] = ip.octets();
        std::fs::write(&inetrc, format!("{{host, {{{a},{b},{c},{d}}}, [\"{}\"]}}.\n{{lookup, [file, native]}}.\n", ns.name()))?;
        let port = dist_port.to_string();
        let mut cmd = match runtime {
            PodRuntime::Erlang => {
                let mut cmd = ns.command("erl");
                cmd.args([&format!("-{flag}"), &node, "-setcookie", COOKIE, "-noinput", "-noshell"])
                    .args(["-kernel", "inet_dist_listen_min", &port, "inet_dist_listen_max", &port])
                    .args(extra);
                cmd
            }
            PodRuntime::Elixir => {
                let mut cmd = ns.command("elixir");
                let mut erl_flags = format!("-kernel inet_dist_listen_min {port} inet_dist_listen_max {port}");
                for e in extra {
                    erl_flags.push(' ');
                    erl_flags.push_str(e);
                }
                cmd.args([&format!("--{flag}"), &node, "--cookie", COOKIE, "--erl", &erl_flags, "--no-halt", "-e", ":ok"]);
                cmd
            }
        };
        let log = File::create(home.path().join("node.log"))?;
        let erl = cmd
            .env("HOME", home.path())
            .env("ERL_INETRC", &inetrc)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting erl in the pod namespace (is erlang-base installed? run scripts/setup.sh)")?;
        let pod = Pod { ip, dist_port, node, erl: Proc(erl), home, ns };
        // Ready when epmd knows the node and the distribution port accepts connections.
        wait_until(&format!("{} to register with its epmd", pod.node), Duration::from_secs(30), || {
            pod.ns
                .command("epmd")
                .arg("-names")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("name app at port {dist_port}")))
                .unwrap_or(false)
        })?;
        Ok(pod)
    }

    /// What the node wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.home.path().join("node.log")).unwrap_or_default()
    }

    /// The inetrc that maps the pod's host name to its IP (for `-sname` nodes).
    pub fn inetrc(&self) -> PathBuf {
        self.home.path().join("inetrc")
    }

    /// The pid of the node's process (nsenter execs erl, which execs the emulator).
    pub fn pid(&self) -> u32 {
        self.erl.0.id()
    }
}

/// Byte and connection counters of a relay.
#[derive(Default)]
pub struct RelayStats {
    pub connections: AtomicU64,
    pub bytes: AtomicU64,
}

/// A plain TCP relay: 127.0.0.1:port in `listen_ns` → 127.0.0.1:target_port in `target_ns`.
pub struct Relay {
    pub port: u16,
    pub stats: Arc<RelayStats>,
    stop: Arc<AtomicBool>,
    listen_ns: PathBuf,
}

impl Relay {
    pub fn start(listen_ns: &Netns, target_ns: &Netns, target_port: u16) -> Result<Self> {
        let listen_path = listen_ns.path();
        let target_path = target_ns.path();
        let listener = listen_ns.in_ns(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))??;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RelayStats::default());
        let (stop2, stats2) = (stop.clone(), stats.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                stats2.connections.fetch_add(1, Ordering::Relaxed);
                let (target_path, stats) = (target_path.clone(), stats2.clone());
                thread::spawn(move || {
                    let upstream = File::open(&target_path)
                        .and_then(|f| nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from))
                        .and_then(|_| TcpStream::connect((Ipv4Addr::LOCALHOST, target_port)));
                    if let Ok(upstream) = upstream {
                        pipe(client, upstream, stats);
                    }
                });
            }
        });
        Ok(Relay { port, stats, stop, listen_ns: listen_path })
    }

    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let (path, port) = (self.listen_ns.clone(), self.port);
        let _ = thread::spawn(move || {
            if nix::sched::setns(File::open(path)?, nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
            }
            Ok::<_, io::Error>(())
        })
        .join();
    }
}

/// Copies both ways until both sides are done, passing half-closes on.
fn pipe(a: TcpStream, b: TcpStream, stats: Arc<RelayStats>) {
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let s2 = stats.clone();
    let t = thread::spawn(move || copy_half(a2, b2, &s2));
    copy_half(b, a, &stats);
    let _ = t.join();
}

fn copy_half(mut from: TcpStream, mut to: TcpStream, stats: &RelayStats) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
                stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A TCP relay that adds latency, for a link this kernel cannot slow down (no netem, no fq):
/// 127.0.0.1:port in `listen_ns` → `target` dialled inside `target_ns`. Every chunk is held
/// for RTT/2 in its direction, and the client's first bytes one RTT more (standing in for the
/// TCP handshake a real link would cost). With RTT 0 it is a plain relay. Used for the
/// simulated API server and by benchmarks.
pub struct DelayRelay {
    pub port: u16,
    pub rtt: Duration,
    pub stats: Arc<RelayStats>,
    stop: Arc<AtomicBool>,
    listen_ns: PathBuf,
}

impl DelayRelay {
    pub fn start(listen_ns: &Netns, target_ns: &Path, target: std::net::SocketAddr, rtt: Duration) -> Result<Self> {
        let listener = listen_ns.in_ns(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))??;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(RelayStats::default());
        let (stop2, stats2, target_ns) = (stop.clone(), stats.clone(), target_ns.to_path_buf());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = conn else { continue };
                stats2.connections.fetch_add(1, Ordering::Relaxed);
                let (target_ns, stats) = (target_ns.clone(), stats2.clone());
                thread::spawn(move || {
                    let upstream = File::open(&target_ns)
                        .and_then(|f| nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from))
                        .and_then(|_| TcpStream::connect_timeout(&target, Duration::from_secs(30)));
                    let Ok(upstream) = upstream else { return };
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let (c2, u2) = (client.try_clone(), upstream.try_clone());
                    let (Ok(c2), Ok(u2)) = (c2, u2) else { return };
                    let s2 = stats.clone();
                    let t = thread::spawn(move || delayed_copy(c2, u2, rtt / 2, rtt, &s2));
                    delayed_copy(upstream, client, rtt / 2, Duration::ZERO, &stats);
                    let _ = t.join();
                });
            }
        });
        Ok(DelayRelay { port, rtt, stats, stop, listen_ns: listen_ns.path() })
    }

    pub fn addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port)
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let (path, port) = (self.listen_ns.clone(), self.port);
        let _ = thread::spawn(move || {
            if nix::sched::setns(File::open(path)?, nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                let _ = TcpStream::connect((Ipv4Addr::LOCALHOST, port));
            }
            Ok::<_, io::Error>(())
        })
        .join();
    }
}

/// Copies `from` → `to`, each chunk delivered `delay` after it was read (the first one
/// `first_extra` later still); EOF passes on as a half-close, after the same delay.
fn delayed_copy(mut from: TcpStream, mut to: TcpStream, delay: Duration, first_extra: Duration, stats: &RelayStats) {
    // Bounded: at most 256 chunks (16 MiB) in flight per direction.
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Option<Vec<u8>>)>(256);
    let writer_from = from.try_clone().ok();
    let writer = thread::spawn(move || {
        while let Ok((due, chunk)) = rx.recv() {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            match chunk {
                Some(c) => {
                    if to.write_all(&c).is_err() {
                        // The far side is gone: stop reading too.
                        if let Some(f) = &writer_from {
                            let _ = f.shutdown(Shutdown::Read);
                        }
                        return;
                    }
                }
                None => break,
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut extra = first_extra;
    let mut last_due = Instant::now();
    loop {
        let n = from.read(&mut buf).unwrap_or(0);
        // Never deliver out of order, whatever the clock does.
        let due = (Instant::now() + delay + extra).max(last_due);
        extra = Duration::ZERO;
        last_due = due;
        if n == 0 {
            let _ = tx.send((due, None));
            break;
        }
        stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
        if tx.send((due, Some(buf[..n].to_vec()))).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}

/// The whole bed for one test: a pod running `app@IP`, a workstation namespace with no route
/// to it, relays for epmd and the distribution port, and a private beamredir state dir.
pub struct TestBed {
    pub epmd_relay: Relay,
    pub dist_relay: Relay,
    pub ws: Netns,
    pub pod: Pod,
    pub state_dir: TempDir,
}

impl TestBed {
    pub fn start() -> Result<Self> {
        Self::start_with(PodRuntime::Erlang)
    }

    pub fn start_with(runtime: PodRuntime) -> Result<Self> {
        require_root()?;
        let pod = Pod::start(unique_pod_ip(), 5555, runtime)?;
        let ws = Netns::new("brws")?;
        let epmd_relay = Relay::start(&ws, &pod.ns, EPMD_PORT)?;
        let dist_relay = Relay::start(&ws, &pod.ns, pod.dist_port)?;
        let state_dir = TempDir::new("brstate")?;
        Ok(TestBed { epmd_relay, dist_relay, ws, pod, state_dir })
    }

    /// The `map` arguments that point the pod's epmd and dist ports at the relays.
    pub fn mappings(&self) -> Vec<String> {
        vec![
            format!("{}:{}={}", self.pod.ip, EPMD_PORT, self.epmd_relay.port),
            format!("{}:{}={}", self.pod.ip, self.pod.dist_port, self.dist_relay.port),
        ]
    }

    /// `beamredir ARGS` run in the workstation namespace, with this bed's state dir.
    pub fn beamredir(&self) -> Command {
        let mut cmd = self.ws.command(beamredir_bin());
        cmd.env("BEAMREDIR_STATE_DIR", self.state_dir.path());
        cmd
    }

    /// A HOME for local Erlang nodes (erl wants one for its cookie file).
    pub fn erl_home(&self) -> PathBuf {
        let p = self.state_dir.path().join("home");
        let _ = std::fs::create_dir_all(&p);
        p
    }
}

/// An interactive child (e.g. `iex` under `script` for a pty): send input, wait for output.
pub struct Interactive {
    child: Proc,
    stdin: std::process::ChildStdin,
    output: Arc<std::sync::Mutex<String>>,
}

impl Interactive {
    pub fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        let stdin = child.stdin.take().unwrap();
        let output = Arc::new(std::sync::Mutex::new(String::new()));
        for mut stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    output.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]).replace('\r', ""));
                }
            });
        }
        Ok(Interactive { child: Proc(child), stdin, output })
    }

    pub fn send(&mut self, text: &str) -> Result<()> {
        self.stdin.write_all(text.as_bytes())?;
        self.stdin.flush()?;
        Ok(())
    }

    /// Waits until the output so far contains `needle`.
    pub fn expect(&self, needle: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("{needle:?} in the output"), timeout, || self.output().contains(needle))
            .with_context(|| format!("output so far:\n{}", self.output()))
    }

    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Waits for the child to exit and returns its exit code.
    pub fn wait(mut self, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.0.try_wait()? {
                return Ok(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                bail!("child did not exit within {timeout:?}; output:\n{}", self.output());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestBed {
    /// Even when a test fails half-way: end this bed's sessions and clean stale ones, so no
    /// cgroup or attached program outlives the test.
    fn drop(&mut self) {
        let _ = self.beamredir().args(["-q", "down", "--all"]).stdout(Stdio::null()).status();
    }
}

impl TestBed {
    /// Starts `beamredir map` for this bed in the foreground (no command) and waits until the
    /// session answers `status`. Extra arguments go before the mappings.
    pub fn start_session(&self, session: &str, extra: &[&str]) -> Result<Graceful> {
        let child = self
            .beamredir()
            .args(["map", "--session", session])
            .args(extra)
            .args(self.mappings())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()?;
        let mut proc = Graceful(child);
        wait_until(&format!("session {session} to come up"), Duration::from_secs(20), || {
            if let Ok(Some(status)) = proc.0.try_wait() {
                panic!("beamredir map exited early: {status}");
            }
            self.session_status(session).is_some_and(|s| s["state"] == "running")
        })?;
        Ok(proc)
    }

    /// The `beamredir status --json` entry of a session.
    pub fn session_status(&self, session: &str) -> Option<serde_json::Value> {
        let out = self.beamredir().args(["status", "--json"]).output().ok()?;
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        all.as_array()?.iter().find(|s| s["name"] == session).cloned()
    }
}

/// Attachments of one cgroup as bpftool (an independent tool) sees them: (attach type, name).
pub fn bpftool_cgroup_programs(cgroup: &Path) -> Result<Vec<(String, String)>> {
    let out = run(Command::new("bpftool").args(["-j", "cgroup", "show"]).arg(cgroup))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|p| (p["attach_type"].as_str().unwrap_or("").to_string(), p["name"].as_str().unwrap_or("").to_string()))
                .collect()
        })
        .unwrap_or_default())
}

/// The cgroup2 mount point as this process sees it.
pub fn cgroup2_root() -> Result<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    text.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap()))
        })
        .context("no cgroup2 mount")
}
