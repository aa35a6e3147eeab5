//! Issue 11: beamredir holds under load and faults, in figures. Each test is one row of the fault
//! matrix in docs/reliability.md: it asserts behaviour (counts, leaks, convergence), never a
//! wall-clock target, and prints its figures as `faults: …` lines (run with `--nocapture`).
//!
//! Everything runs inside the test bed's namespaces against the simulated cluster. The load
//! comes from `beamredir-load` (tests/src/bin/load.rs) started in the session with
//! `beamredir exec`: the forwards admit only sockets created in the session's cgroup.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use beamredir_testbed::{
    Graceful, Interactive, TempDir, bpftool_cgroup_programs,
    cluster::{Hang, SimCluster},
    hidden_node_args,
    procfs::{fd_count, network_part_of, status_kib},
    unique, wait_until,
};
use serde_json::Value;

/// An Elixir node plus a TCP echo on 7777 in pod app-0 (`--dist-port 7777` makes beamredir
/// forward the echo port too).
const ECHO_MANIFEST: &str = include_str!("../manifests/echo.yaml");
const ECHO_PORT: u16 = 7777;
/// Five Erlang nodes named by DNS name, distribution on 9000.
const ROLLING_MANIFEST: &str = include_str!("../manifests/rolling.yaml");
const COOKIE: &str = "secret";
const LOAD: &str = env!("CARGO_BIN_EXE_beamredir-load");

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Thousands of sockets in this process (the simulated API server's side of every connection).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Runs a command to completion within `timeout` (killed after it); returns its output.
fn output_within(cmd: &mut Command, timeout: Duration) -> Result<std::process::Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            bail!("{cmd:?} did not finish within {timeout:?}")
        }
    }
}

/// The last JSON line a load client printed.
fn last_json(stdout: &str) -> Result<Value> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("no JSON in {stdout:?}"))?;
    Ok(serde_json::from_str(line)?)
}

// ---- the network part, seen from /proc ----

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
}

/// Samples a process's descriptors and RSS every 20 ms until stopped; keeps the peaks.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<(usize, u64)>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::spawn(move || {
            let (mut fds, mut rss) = (0, 0);
            while !stop2.load(Ordering::Relaxed) {
                fds = fds.max(fd_count(pid));
                rss = rss.max(status_kib(pid, "VmRSS:"));
                thread::sleep(Duration::from_millis(20));
            }
            (fds, rss)
        });
        Sampler { stop, thread }
    }

    /// (peak descriptors, peak RSS in KiB).
    fn finish(self) -> (usize, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or((0, 0))
    }
}

// ---- a session ----

/// A `beamredir up` session in the cluster's workstation namespace, with a state dir of its own.
struct Session<'a> {
    // Drop order: the session first, then its state dir.
    up: Graceful,
    cluster: &'a SimCluster,
    name: String,
    log: PathBuf,
    state: TempDir,
}

impl<'a> Session<'a> {
    fn start(cluster: &'a SimCluster, args: &[&str]) -> Result<Self> {
        let state = TempDir::new("brstate")?;
        let name = unique("flt");
        let log = state.path().join("up.log");
        let up = cluster.start_up_session(state.path(), &name, args, &log)?;
        Ok(Session {
            up,
            cluster,
            name,
            log,
            state,
        })
    }

    /// A session for pod app-0 of ECHO_MANIFEST that forwards its echo port too (`EXTRA` after
    /// that), once the echo port's redirect is in place; returns it and the echo's IP:PORT.
    fn echo(cluster: &'a SimCluster, extra: &[&str]) -> Result<(Self, String)> {
        let port = ECHO_PORT.to_string();
        let args = [&["--pod", "app-0", "--dist-port", &port][..], extra].concat();
        let s = Session::start(cluster, &args)?;
        let addr = format!("{}:{ECHO_PORT}", cluster.pod_ip("app-0").context("pod IP")?);
        s.wait_redirect(&addr, Duration::from_secs(30))?;
        Ok((s, addr))
    }

    fn pid(&self) -> u32 {
        self.up.0.id()
    }

    fn net_pid(&self) -> Result<u32> {
        network_part_of(self.pid()).context("no network part")
    }

    fn status(&self) -> Option<Value> {
        self.cluster.session_status(self.state.path(), &self.name)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `beamredir -q exec --session NAME -- PROGRAM`.
    fn exec(&self, program: &str) -> Command {
        let mut cmd = self.cluster.beamredir(self.state.path());
        cmd.args(["-q", "exec", "--session", &self.name, "--", program])
            .env("HOME", self.state.path());
        cmd
    }

    /// Runs the load client in the session to completion; returns its summary.
    fn load(&self, args: &[&str], timeout: Duration) -> Result<Value> {
        let out = output_within(self.exec(LOAD).args(args), timeout)?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        last_json(&stdout)
            .with_context(|| format!("load client: {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// Starts the load client in the session (its output streams in).
    fn spawn_load(&self, args: &[&str]) -> Result<Interactive> {
        Interactive::spawn(self.exec(LOAD).args(args))
    }

    /// The session's `connections` counters.
    fn connections(&self) -> Value {
        self.status()
            .map(|s| s["connections"].clone())
            .unwrap_or(Value::Null)
    }

    /// The forward counters of the redirect of `pod` (IP:PORT).
    fn forward(&self, pod: &str) -> Value {
        self.status()
            .and_then(|s| {
                s["redirects"]
                    .as_array()?
                    .iter()
                    .find(|r| r["pod"] == pod)
                    .map(|r| r["forward"].clone())
            })
            .unwrap_or(Value::Null)
    }

    /// Waits until the redirect of `pod` (IP:PORT) is in place.
    fn wait_redirect(&self, pod: &str, timeout: Duration) -> Result<()> {
        wait_until(&format!("a redirect for {pod}"), timeout, || {
            self.status().is_some_and(|s| {
                s["redirects"]
                    .as_array()
                    .is_some_and(|rs| rs.iter().any(|r| r["pod"] == pod))
            })
        })
        .with_context(|| format!("status: {:#?}\nlog:\n{}", self.status(), self.log_text()))
    }

    /// Waits until no connection is carried, then for the descriptors and RSS to settle; returns
    /// (descriptors, RSS KiB) of the network part.
    fn settled_baseline(&self) -> Result<(usize, u64)> {
        let net = self.net_pid()?;
        wait_until("connections to end", Duration::from_secs(30), || {
            self.connections()["active"] == 0
        })?;
        let mut last = fd_count(net);
        wait_until("descriptors to settle", Duration::from_secs(30), || {
            thread::sleep(Duration::from_millis(500));
            let now = fd_count(net);
            std::mem::replace(&mut last, now) == now
        })?;
        Ok((fd_count(net), status_kib(net, "VmRSS:")))
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Waits (bounded) until the network part's descriptors are back to `baseline` (+ `slack`);
/// returns how long that took.
fn wait_fds_back(net: u32, baseline: usize, slack: usize, timeout: Duration) -> Result<Duration> {
    let t = Instant::now();
    wait_until(
        &format!("the network part's descriptors back to {baseline} (+{slack})"),
        timeout,
        || fd_count(net) <= baseline + slack,
    )
    .with_context(|| {
        format!(
            "{} descriptors open: {:?}",
            fd_count(net),
            std::fs::read_dir(format!("/proc/{net}/fd")).map(|d| d
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .collect::<Vec<_>>())
        )
    })?;
    Ok(t.elapsed())
}

// ---- 1. load ----

#[test]
fn load_1000_concurrent_64k_echoes_lose_nothing_and_fds_and_rss_come_back() -> Result<()> {
    raise_fd_limit();
    let cluster = SimCluster::start(ECHO_MANIFEST)?;
    let (s, addr) = Session::echo(&cluster, &[])?;
    let net = s.net_pid()?;
    // Warm-up (lazily built state: TLS, the connection pool), then the baseline.
    let warm = s.load(
        &[
            "burst", "--addr", &addr, "--conns", "20", "--bytes", "65536",
        ],
        Duration::from_secs(120),
    )?;
    ensure!(warm["ok"] == 20, "warm-up: {warm}");
    let (fds0, rss0) = s.settled_baseline()?;

    let sampler = Sampler::start(net);
    let t = Instant::now();
    let r = s.load(
        &[
            "burst", "--addr", &addr, "--conns", "1000", "--bytes", "65536",
        ],
        Duration::from_secs(600),
    )?;
    let took = t.elapsed();
    let (fds_peak, rss_peak) = sampler.finish();
    let hwm = status_kib(net, "VmHWM:");
    eprintln!("faults: load 1000 x 64 KiB: {r}");
    eprintln!(
        "faults: load 1000 x 64 KiB: took {:.1} s; network part fds {fds0} -> peak {fds_peak}; RSS {:.1} MiB -> peak {:.1} MiB (VmHWM {:.1} MiB)",
        took.as_secs_f64(),
        mib(rss0),
        mib(rss_peak),
        mib(hwm)
    );
    ensure!(
        r["ok"] == 1000 && r["lost"] == 0 && r["corrupted"] == 0,
        "echoes lost or corrupted: {r}\nlog:\n{}",
        s.log_text()
    );
    // Two descriptors per carried connection at the peak: they were all open at once.
    ensure!(
        fds_peak >= fds0 + 1000,
        "the connections were not concurrent: peak {fds_peak} descriptors (baseline {fds0})"
    );

    // Afterwards: every connection gone, descriptors back, memory back near the baseline.
    let fds_back = wait_fds_back(net, fds0, 4, Duration::from_secs(30))?;
    // The allocator keeps some of the peak: "near" is within a quarter of the growth (and 16 MiB).
    let rss_bound = rss0 + ((rss_peak.saturating_sub(rss0)) / 4).max(16 * 1024);
    let t = Instant::now();
    let rss_ok = wait_until(
        "RSS back near the baseline",
        Duration::from_secs(30),
        || status_kib(net, "VmRSS:") <= rss_bound,
    );
    let rss_after = status_kib(net, "VmRSS:");
    eprintln!(
        "faults: load 1000 x 64 KiB: descriptors back to {} within {:.1} s; RSS {:.1} MiB after {:.1} s (bound {:.1} MiB)",
        fd_count(net),
        fds_back.as_secs_f64(),
        mib(rss_after),
        t.elapsed().as_secs_f64(),
        mib(rss_bound)
    );
    rss_ok?;
    let conns = s.connections();
    ensure!(
        conns["active"] == 0 && conns["over_limit"] == 0 && conns["refused"] == 0,
        "{conns}"
    );
    let fwd = s.forward(&addr);
    ensure!(
        fwd["errors"] == 0 && fwd["total"].as_u64() >= Some(1020),
        "{fwd}"
    );
    Ok(())
}

#[test]
fn load_2000_connections_against_a_cap_of_512_wait_or_are_refused_and_status_keeps_answering()
-> Result<()> {
    raise_fd_limit();
    let cluster = SimCluster::start(ECHO_MANIFEST)?;
    let (s, addr) = Session::echo(&cluster, &["--max-connections", "512"])?;

    // `status` asked over and over during the load, each answer within 10 s.
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (stop, kubeconfig, state, name, ws) = (
            stop.clone(),
            cluster.kubeconfig.clone(),
            s.state.path().to_path_buf(),
            s.name.clone(),
            cluster.ws.path(),
        );
        thread::spawn(move || {
            let mut answers: Vec<f64> = Vec::new();
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", ws.display()))
                    .arg("--")
                    .arg(beamredir_testbed::beamredir_bin())
                    .args(["status", "--json"]);
                cmd.env("KUBECONFIG", &kubeconfig)
                    .env("BEAMREDIR_STATE_DIR", &state);
                match output_within(&mut cmd, Duration::from_secs(10)) {
                    Ok(out) => {
                        let v: Option<Value> = serde_json::from_slice(&out.stdout).ok();
                        let running = v.as_ref().and_then(|v| {
                            v.as_array()?
                                .iter()
                                .find(|x| x["name"] == name.as_str())
                                .map(|x| x["state"] == "running" && x["connections"].is_object())
                        });
                        if running == Some(true) {
                            answers.push(t.elapsed().as_secs_f64() * 1000.0);
                        } else {
                            failures.push(format!("{}", String::from_utf8_lossy(&out.stdout)));
                        }
                    }
                    Err(e) => failures.push(e.to_string()),
                }
                thread::sleep(Duration::from_millis(200));
            }
            (answers, failures)
        })
    };
    let t = Instant::now();
    let r = s.load(
        &[
            "burst", "--addr", &addr, "--conns", "2000", "--bytes", "65536",
        ],
        Duration::from_secs(600),
    );
    let took = t.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (mut answers, failures) = poller.join().expect("status poller");
    let r = r?;
    answers.sort_by(f64::total_cmp);
    let conns = s.connections();
    eprintln!("faults: cap 512, 2000 x 64 KiB: {r}");
    eprintln!(
        "faults: cap 512, 2000 x 64 KiB: took {:.1} s; connections {conns}; status answered {} times during the load (median {:.0} ms, max {:.0} ms), {} failures",
        took.as_secs_f64(),
        answers.len(),
        answers.get(answers.len() / 2).copied().unwrap_or(0.0),
        answers.last().copied().unwrap_or(0.0),
        failures.len()
    );
    ensure!(
        failures.is_empty(),
        "status did not answer during the load: {failures:?}"
    );
    ensure!(
        answers.len() >= 2,
        "status was asked only {} times",
        answers.len()
    );
    ensure!(r["corrupted"] == 0, "{r}");
    ensure!(
        r["ok"].as_u64().unwrap() + r["lost"].as_u64().unwrap() == 2000,
        "{r}"
    );
    // Past the cap, connections waited; those that found no slot in time were closed, and
    // each of those is counted: the client lost exactly the connections beamredir refused.
    ensure!(
        conns["waited"].as_u64() > Some(0)
            && conns["waited"].as_u64() >= conns["over_limit"].as_u64(),
        "{conns}"
    );
    ensure!(
        r["lost"] == conns["over_limit"],
        "client lost {} connections, status counts {} over the limit: {r}",
        r["lost"],
        conns["over_limit"]
    );
    for (why, _) in r["lost_by"].as_object().unwrap() {
        ensure!(
            [
                "early EOF after 0 bytes",
                "read: reset",
                "write: reset",
                "write: broken pipe"
            ]
            .contains(&why.as_str()),
            "a connection was lost otherwise than by the cap: {why} ({r})"
        );
    }
    if conns["over_limit"].as_u64() > Some(0) {
        ensure!(
            s.log_text().contains(
                "connection closed: 512 connections are open already (--max-connections)"
            ),
            "{}",
            s.log_text()
        );
    }
    // Nothing else broke: no connection left counted, and a fresh one works.
    wait_until("connections to end", Duration::from_secs(30), || {
        s.connections()["active"] == 0
    })?;
    let fresh = s.load(
        &["burst", "--addr", &addr, "--conns", "1", "--bytes", "65536"],
        Duration::from_secs(60),
    )?;
    ensure!(
        fresh["ok"] == 1,
        "a fresh connection after the load: {fresh}"
    );
    Ok(())
}

// ---- 1c. the wait past the cap ----

/// `--connection-wait` decides what a connection past the cap gets: with a wait, a slot once a
/// carried echo ends; with 0, a close at once. Same burst, same cap, both settings.
#[test]
fn connection_wait_decides_whether_a_connection_past_the_cap_waits_or_is_closed() -> Result<()> {
    let cluster = SimCluster::start(ECHO_MANIFEST)?;
    for wait in ["10s", "0"] {
        let (s, addr) = Session::echo(
            &cluster,
            &["--max-connections", "2", "--connection-wait", wait],
        )?;
        let r = s.load(
            &["burst", "--addr", &addr, "--conns", "20", "--bytes", "65536"],
            Duration::from_secs(120),
        )?;
        let conns = s.connections();
        eprintln!("faults: cap 2, --connection-wait {wait}, 20 x 64 KiB: {r}; {conns}");
        ensure!(r["corrupted"] == 0, "{r}");
        ensure!(
            r["ok"].as_u64().unwrap() + r["lost"].as_u64().unwrap() == 20,
            "{r}"
        );
        ensure!(r["lost"] == conns["over_limit"], "{r} {conns}");
        ensure!(conns["waited"].as_u64() > Some(0), "nobody met the cap: {conns}");
        if wait == "0" {
            // 20 at once against 2 slots: at least one found none and was closed at once.
            ensure!(conns["over_limit"].as_u64() > Some(0), "{conns}");
            ensure!(
                s.log_text().contains(
                    "2 connections are open already (--max-connections) and --connection-wait is 0"
                ),
                "{}",
                s.log_text()
            );
        } else {
            // Each echo takes milliseconds: every waiting connection got its slot.
            ensure!(r["ok"] == 20, "with a wait, none is closed: {r} {conns}");
        }
    }
    Ok(())
}

// ---- 2. hung API server ----

#[test]
fn hung_api_server_each_upgrade_times_out_with_one_line_and_nothing_leaks() -> Result<()> {
    raise_fd_limit();
    let cluster = SimCluster::start(ECHO_MANIFEST)?;
    let (s, addr) = Session::echo(&cluster, &["--upgrade-timeout", "2s"])?;
    let net = s.net_pid()?;
    let warm = s.load(
        &["burst", "--addr", &addr, "--conns", "5", "--bytes", "1024"],
        Duration::from_secs(60),
    )?;
    ensure!(warm["ok"] == 5, "{warm}");
    let (fds0, _) = s.settled_baseline()?;

    cluster.hang_api_server(Hang::PortForward);
    // 100 clients that wait: beamredir gives each upgrade up after 2 s and closes it.
    let sampler = Sampler::start(net);
    let r = s.load(
        &[
            "hold",
            "--addr",
            &addr,
            "--conns",
            "100",
            "--probe",
            "0",
            "--wait-ms",
            "30000",
        ],
        Duration::from_secs(120),
    )?;
    let (peak, _) = sampler.finish();
    eprintln!(
        "faults: hung upgrades, clients waiting: {r}; network part fds {fds0} -> peak {peak}"
    );
    ensure!(
        r["held"] == 100 && r["ended_by"]["eof"] == 100,
        "every connection ends with EOF: {r}"
    );
    let timeout_line = "the API server did not complete the port-forward upgrade within 2s";
    wait_until("a line per upgrade", Duration::from_secs(10), || {
        s.log_text().matches(timeout_line).count() == 100
    })
    .with_context(|| {
        format!(
            "{} lines:\n{}",
            s.log_text().matches(timeout_line).count(),
            s.log_text()
        )
    })?;
    let back = wait_fds_back(net, fds0, 0, Duration::from_secs(20))?;
    eprintln!(
        "faults: hung upgrades, clients waiting: descriptors back to {} {:.1} s after the last close",
        fd_count(net),
        back.as_secs_f64()
    );

    // 100 clients that give up after 500 ms, before the upgrade timeout: given up at once.
    let r = s.load(
        &[
            "hold",
            "--addr",
            &addr,
            "--conns",
            "100",
            "--probe",
            "0",
            "--give-up-ms",
            "500",
        ],
        Duration::from_secs(120),
    )?;
    eprintln!("faults: hung upgrades, clients giving up after 0.5 s: {r}");
    ensure!(r["ended_by"]["gave up"] == 100, "{r}");
    let gave_up_line = "the local side closed before the port-forward was set up";
    wait_until(
        "a line per abandoned upgrade",
        Duration::from_secs(10),
        || s.log_text().matches(gave_up_line).count() == 100,
    )
    .with_context(|| {
        format!(
            "{} lines:\n{}",
            s.log_text().matches(gave_up_line).count(),
            s.log_text()
        )
    })?;
    let back = wait_fds_back(net, fds0, 0, Duration::from_secs(20))?;
    eprintln!(
        "faults: hung upgrades, clients giving up: descriptors back to {} {:.1} s after the clients gave up",
        fd_count(net),
        back.as_secs_f64()
    );
    // Every connection task ended (each held a slot until it did), each counted as an error.
    let conns = s.connections();
    ensure!(conns["active"] == 0, "{conns}");
    ensure!(s.forward(&addr)["errors"] == 200, "{}", s.forward(&addr));

    cluster.hang_api_server(Hang::None);
    let fresh = s.load(
        &["burst", "--addr", &addr, "--conns", "5", "--bytes", "1024"],
        Duration::from_secs(60),
    )?;
    ensure!(fresh["ok"] == 5, "after the hang: {fresh}");
    Ok(())
}

/// An API server that accepts connections and never answers (not even TLS): `up` and `rpc`
/// each end with one line naming `--request-timeout`, a failing exit and nothing left; once
/// the server answers again, the same commands work.
#[test]
fn an_api_server_that_never_answers_fails_up_and_rpc_with_one_line_and_leaves_nothing() -> Result<()> {
    let cluster = SimCluster::start(ECHO_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let session = unique("hung");
    let up: Vec<&str> = vec!["up", "--session", &session, "--pod", "app-0", "--request-timeout", "2s", "--", "true"];
    let rpc: Vec<&str> = vec!["rpc", "app-0", "node().", "--request-timeout", "2s"];
    let cgroup = beamredir_testbed::cgroup2_root()?.join("beamredir").join(&session);
    cluster.hang_api_server(Hang::Everything);
    for args in [&up, &rpc] {
        let out = output_within(cluster.beamredir(state.path()).args(args), Duration::from_secs(60))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("faults: hung API server, {}: {}", args[0], stderr.trim());
        ensure!(!out.status.success(), "{args:?} succeeded");
        ensure!(
            stderr.trim().lines().count() == 1
                && stderr.contains("cannot reach the Kubernetes API server at")
                && stderr.contains("no answer within 2s (--request-timeout)"),
            "{args:?}: {stderr}"
        );
        let left: Vec<_> = std::fs::read_dir(state.path())?.filter_map(Result::ok).map(|e| e.file_name()).collect();
        ensure!(left.is_empty(), "{args:?} left {left:?}");
        ensure!(!cgroup.exists(), "{args:?} left its cgroup");
    }
    cluster.hang_api_server(Hang::None);
    for args in [&up, &rpc] {
        let out = output_within(cluster.beamredir(state.path()).args(args), Duration::from_secs(120))?;
        ensure!(out.status.success(), "{args:?} once the server answers: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

// ---- 3. blackholed API server ----

#[test]
fn blackholed_api_server_relays_end_within_90s_and_the_session_recovers() -> Result<()> {
    raise_fd_limit();
    let cluster = SimCluster::start(ECHO_MANIFEST)?;
    let (s, addr) = Session::echo(&cluster, &[])?;
    let net = s.net_pid()?;
    let (fds0, _) = s.settled_baseline()?;

    // 20 connections carried end to end, then every packet to the API server dropped.
    let holder = s.spawn_load(&[
        "hold",
        "--addr",
        &addr,
        "--conns",
        "20",
        "--probe",
        "4096",
        "--wait-ms",
        "150000",
    ])?;
    holder.expect("\"ready\":true", Duration::from_secs(60))?;
    ensure!(
        holder.output().contains("\"open\":20"),
        "{}",
        holder.output()
    );
    let t0 = unix_ms();
    cluster.blackhole_api_server(true)?;
    // The session answers throughout (status never waits for the API server).
    thread::sleep(Duration::from_secs(5));
    let during = s.status();
    let ended = holder.expect("\"held\"", Duration::from_secs(160));
    cluster.blackhole_api_server(false)?;
    ended?;
    let out = last_json(&holder.output())?;
    let last = out["last_end_unix_ms"]
        .as_u64()
        .context("no end time")?
        .saturating_sub(t0);
    let first = out["first_end_unix_ms"]
        .as_u64()
        .context("no end time")?
        .saturating_sub(t0);
    eprintln!(
        "faults: blackhole: {out}; the 20 relays ended {:.1}-{:.1} s after the blackhole",
        first as f64 / 1000.0,
        last as f64 / 1000.0
    );
    ensure!(
        out["held"] == 20 && out["ended_by"]["still open"].is_null(),
        "{out}"
    );
    ensure!(
        last <= 90_000,
        "a relay outlived the blackhole by {last} ms"
    );
    ensure!(
        s.log_text()
            .contains("no data and no pong from the API server for 50s"),
        "{}",
        s.log_text()
    );
    ensure!(
        during.is_some_and(|st| st["state"] == "running" && st["connections"]["active"] == 20),
        "status during the blackhole"
    );
    // The session survived: same process, still answering.
    ensure!(
        alive(s.pid()) && s.status().is_some_and(|st| st["state"] == "running"),
        "the session did not survive"
    );

    // Packets flow again: new connections work.
    let t1 = Instant::now();
    let mut attempts = 0;
    wait_until(
        "a fresh echo after the blackhole",
        Duration::from_secs(90),
        || {
            attempts += 1;
            s.load(
                &[
                    "burst",
                    "--addr",
                    &addr,
                    "--conns",
                    "5",
                    "--bytes",
                    "4096",
                    "--io-timeout-ms",
                    "20000",
                ],
                Duration::from_secs(60),
            )
            .is_ok_and(|r| r["ok"] == 5)
        },
    )?;
    eprintln!(
        "faults: blackhole: new connections work {:.1} s after the packets flow again ({attempts} attempt(s))",
        t1.elapsed().as_secs_f64()
    );
    let back = wait_fds_back(net, fds0, 4, Duration::from_secs(30))?;
    eprintln!(
        "faults: blackhole: descriptors {} (baseline {fds0}) {:.1} s later",
        fd_count(net),
        back.as_secs_f64()
    );
    Ok(())
}

// ---- 4. API server restart, expired watch history ----

#[test]
fn api_server_restart_and_expired_history_under_load_converge_without_restarting_beamredir()
-> Result<()> {
    raise_fd_limit();
    let cluster = SimCluster::start(ECHO_MANIFEST)?;
    let s = Session::start(
        &cluster,
        &[
            "--statefulset",
            "app",
            "--dist-port",
            &ECHO_PORT.to_string(),
        ],
    )?;
    let old_ip = cluster.pod_ip("app-0").context("pod IP")?;
    let old_addr = format!("{old_ip}:{ECHO_PORT}");
    s.wait_redirect(&old_addr, Duration::from_secs(30))?;
    let pid = s.pid();

    // Steady load: 20 echoes a second.
    let load = s.spawn_load(&[
        "loop",
        "--addr",
        &old_addr,
        "--workers",
        "8",
        "--rate",
        "20",
        "--bytes",
        "4096",
        // It dials the old address throughout: once the session has followed the pod, that
        // address reaches the new pod for 30 s more (the alias), longer than the load runs.
        "--duration-ms",
        "25000",
        "--io-timeout-ms",
        "5000",
    ])?;
    load.expect("\"ok\":", Duration::from_secs(20))?;
    thread::sleep(Duration::from_secs(2));

    // The API server goes away; meanwhile the pod is replaced and the history compacted, so the
    // watch cannot resume where it was (410 Expired) and has to list again.
    let old_uid = cluster.pod("default", "app-0").and_then(|p| p.metadata.uid);
    let audit_before = cluster.audit().len();
    let t_stop = Instant::now();
    let stop_ms = unix_ms();
    cluster.stop_api_server();
    cluster.force_delete_pod("app-0")?;
    let pod = cluster.wait_replaced("app-0", old_uid.as_deref(), Duration::from_secs(60))?;
    let new_ip = cluster.pod_ip("app-0").context("new pod IP")?;
    ensure!(new_ip != old_ip, "the replacement kept its address");
    let rv = cluster.compact_now();
    eprintln!(
        "faults: restart+410: history compacted at resourceVersion {rv} while the API server was down"
    );
    thread::sleep(Duration::from_secs(2).saturating_sub(t_stop.elapsed()));
    let down_for = t_stop.elapsed();
    cluster.start_api_server()?;
    let start_ms = unix_ms();
    let t_start = Instant::now();
    let new_addr = format!("{new_ip}:{ECHO_PORT}");
    s.wait_redirect(&new_addr, Duration::from_secs(90))?;
    let converged = t_start.elapsed();
    // Followed: the new incarnation at its new address, by the same beamredir process.
    ensure!(s.pid() == pid && alive(pid), "beamredir restarted");
    let st = s.status().context("status")?;
    ensure!(st["pods"][0]["ip"] == new_ip.to_string(), "{st:#}");
    ensure!(pod.metadata.uid != old_uid, "not replaced");
    // The watch could not resume from its resourceVersion (compacted): it listed again.
    let relisted = cluster.audit()[audit_before..]
        .iter()
        .any(|a| a.starts_with("list pods default/"));
    ensure!(
        relisted,
        "no relist after the restart: {:?}",
        &cluster.audit()[audit_before..]
    );
    let fresh = s.load(
        &[
            "burst", "--addr", &new_addr, "--conns", "10", "--bytes", "65536",
        ],
        Duration::from_secs(60),
    )?;
    ensure!(fresh["ok"] == 10, "{fresh}");

    // The load through the whole episode, second by second.
    load.expect("\"done\":true", Duration::from_secs(90))?;
    let lines: Vec<Value> = load
        .output()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .collect();
    let summary = lines.last().context("no summary")?.clone();
    let seconds: Vec<(u64, u64, u64)> = lines
        .iter()
        .filter(|v| v["t"].is_u64())
        .map(|v| {
            (
                v["t"].as_u64().unwrap(),
                v["ok"].as_u64().unwrap(),
                v["fail"].as_u64().unwrap(),
            )
        })
        .collect();
    // Recovered: the first second after the restart from which no echo failed.
    let last_fail = seconds
        .iter()
        .filter(|(_, _, f)| *f > 0)
        .map(|(t, _, _)| *t)
        .max()
        .unwrap_or(stop_ms);
    let recovered = seconds
        .iter()
        .find(|(t, ok, f)| *t > last_fail && *t > start_ms && *ok > 0 && *f == 0)
        .map(|(t, _, _)| *t);
    eprintln!(
        "faults: restart+410: API server down {:.1} s; redirects at the new address {:.1} s after it was back; load {summary}; load clean again {} after it was back",
        down_for.as_secs_f64(),
        converged.as_secs_f64(),
        recovered
            .map(|t| format!("{:.1} s", t.saturating_sub(start_ms) as f64 / 1000.0))
            .unwrap_or("never".into())
    );
    ensure!(summary["corrupt"] == 0, "{summary}");
    ensure!(recovered.is_some(), "the load never recovered: {seconds:?}");
    Ok(())
}

// ---- 5. rolling restart ----

#[test]
fn rolling_restart_of_five_pods_under_rpc_load_recovers_each_and_spares_the_others() -> Result<()> {
    raise_fd_limit();
    let cluster = SimCluster::start(ROLLING_MANIFEST)?;
    let s = Session::start(&cluster, &["--statefulset", "app"])?;
    wait_until("all five pods redirected", Duration::from_secs(60), || {
        s.status().is_some_and(|st| {
            (0..5).all(|i| {
                cluster.pod_ip(&format!("app-{i}")).is_some_and(|ip| {
                    st["redirects"]
                        .as_array()
                        .is_some_and(|rs| rs.iter().any(|r| r["pod"] == format!("{ip}:9000")))
                })
            })
        })
    })?;
    // A hidden local node calls every pod every 100 ms (one process per pod, each call with a
    // 5 s timeout) and prints one line per call: "call I UNIX_MS ok|fail [WHY]".
    let nodes: Vec<String> = (0..5)
        .map(|i| format!("'app@app-{i}.app.default.svc.cluster.local'"))
        .collect();
    let script = format!(
        "Nodes = [{}], \
         Loop = fun L(I, N) -> T = os:system_time(millisecond), \
           {{R, Why}} = case rpc:call(N, erlang, node, [], 5000) of N -> {{ok, ''}}; E -> {{fail, E}} end, \
           case R of ok -> io:format(\"call ~p ~p ok~n\", [I, T]); fail -> io:format(\"call ~p ~p fail ~0p~n\", [I, T, Why]) end, \
           timer:sleep(max(0, 100 - (os:system_time(millisecond) - T))), L(I, N) end, \
         [spawn(fun() -> Loop(I, N) end) || {{I, N}} <- lists:zip(lists:seq(0, 4), Nodes)], \
         io:get_line(\"\"), io:format(\"stopped~n\"), halt().",
        nodes.join(",")
    );
    let mut caller = Interactive::spawn(s.exec("erl").args(hidden_node_args(
        "debug@127.0.0.1",
        COOKIE,
        &script,
    )))?;
    // Every pod answers before the restarts begin.
    wait_until("every pod answering", Duration::from_secs(60), || {
        (0..5).all(|i| {
            caller.output().contains(&format!("call {i} "))
                && caller
                    .output()
                    .lines()
                    .any(|l| l.starts_with(&format!("call {i} ")) && l.ends_with(" ok"))
        })
    })
    .with_context(|| caller.output())?;
    thread::sleep(Duration::from_secs(1));

    // The StatefulSet's rolling order: highest ordinal first, each pod Ready before the next.
    struct Restart {
        pod: usize,
        deleted: u64,
        ready: u64,
        redirected: u64,
        answered: u64,
    }
    let mut restarts = Vec::new();
    for i in (0..5).rev() {
        let name = format!("app-{i}");
        let old_uid = cluster.pod("default", &name).and_then(|p| p.metadata.uid);
        let deleted = unix_ms();
        cluster.delete_pod(&name)?;
        cluster.wait_replaced(&name, old_uid.as_deref(), Duration::from_secs(90))?;
        let ready = unix_ms();
        let new_ip = cluster.pod_ip(&name).context("new IP")?;
        // Followed: the session redirects the new address; recovered: a call to the new pod
        // succeeded.
        let (mut redirected, mut confirmed) = (None, None);
        wait_until(
            &format!("{name} redirected and answering again"),
            Duration::from_secs(90),
            || {
                if redirected.is_none()
                    && s.status().is_some_and(|st| {
                        st["redirects"].as_array().is_some_and(|rs| {
                            rs.iter().any(|r| r["pod"] == format!("{new_ip}:9000"))
                        })
                    })
                {
                    redirected = Some(unix_ms());
                }
                confirmed = caller
                    .output()
                    .lines()
                    .filter_map(parse_call)
                    .find(|&(p, t, ok)| p == i && ok && t > ready)
                    .map(|(_, t, _)| t);
                redirected.is_some() && confirmed.is_some()
            },
        )
        .with_context(|| format!("log:\n{}", s.log_text()))?;
        // The outage ends with the first successful call after the last failed one.
        let calls: Vec<(usize, u64, bool)> =
            caller.output().lines().filter_map(parse_call).collect();
        let confirmed = confirmed.unwrap();
        let last_fail = calls
            .iter()
            .filter(|&&(p, t, ok)| p == i && !ok && t >= deleted && t <= confirmed)
            .map(|&(_, t, _)| t)
            .max();
        let answered = match last_fail {
            None => deleted,
            Some(f) => calls
                .iter()
                .filter(|&&(p, t, ok)| p == i && ok && t > f)
                .map(|&(_, t, _)| t)
                .min()
                .unwrap_or(confirmed),
        };
        restarts.push(Restart {
            pod: i,
            deleted,
            ready,
            redirected: redirected.unwrap(),
            answered,
        });
    }
    // A second more of calls to every pod, then the caller stops.
    thread::sleep(Duration::from_secs(1));
    caller.send("stop\n")?;
    caller.expect("stopped", Duration::from_secs(20))?;
    let calls: Vec<(usize, u64, bool)> = caller.output().lines().filter_map(parse_call).collect();
    eprintln!("faults: rolling restart ({} calls in all):", calls.len());
    eprintln!(
        "faults: | pod | deleted -> new pod Ready | -> redirected | -> answering again | failed calls to it | failed calls to the others meanwhile |"
    );
    eprintln!("faults: |---|---:|---:|---:|---:|---:|");
    let mut others_failed = 0;
    for r in &restarts {
        let window = |t: u64| t >= r.deleted && t <= r.answered;
        let own = calls
            .iter()
            .filter(|&&(p, t, ok)| p == r.pod && !ok && window(t))
            .count();
        let others = calls
            .iter()
            .filter(|&&(p, t, ok)| p != r.pod && !ok && window(t))
            .count();
        others_failed += others;
        let secs = |t: u64| t.saturating_sub(r.deleted) as f64 / 1000.0;
        eprintln!(
            "faults: | app-{} | {:.1} s | {:.1} s | {:.1} s | {own} | {others} |",
            r.pod,
            secs(r.ready),
            secs(r.redirected),
            secs(r.answered)
        );
    }
    // Why calls failed (badrpc reasons), per pod.
    let mut why: std::collections::BTreeMap<(String, String), usize> = Default::default();
    for l in caller.output().lines().filter(|l| l.starts_with("call ")) {
        let w: Vec<&str> = l.splitn(5, ' ').collect();
        if w.len() == 5 && w[3] == "fail" {
            *why.entry((format!("app-{}", w[1]), w[4].to_string()))
                .or_default() += 1;
        }
    }
    eprintln!("faults: rolling restart: failed calls by reason: {why:?}");
    let failed_outside: Vec<_> = calls
        .iter()
        .filter(|&&(p, t, ok)| {
            !ok && !restarts
                .iter()
                .any(|r| r.pod == p && t >= r.deleted && t <= r.answered)
        })
        .collect();
    ensure!(
        others_failed == 0,
        "calls to pods that were not restarting failed"
    );
    ensure!(
        failed_outside.is_empty(),
        "calls failed outside their pod's restart: {failed_outside:?}"
    );
    // After the rollout every pod answers.
    let end = restarts.iter().map(|r| r.answered).max().unwrap();
    for i in 0..5 {
        ensure!(
            calls.iter().any(|&(p, t, ok)| p == i && ok && t > end),
            "app-{i} did not answer after the rollout"
        );
    }
    Ok(())
}

/// "call I UNIX_MS ok|fail [WHY]" → (pod, time, ok).
fn parse_call(line: &str) -> Option<(usize, u64, bool)> {
    let mut w = line.strip_prefix("call ")?.split_whitespace();
    Some((
        w.next()?.parse().ok()?,
        w.next()?.parse().ok()?,
        w.next()? == "ok",
    ))
}

// ---- 6. signals under load ----

#[derive(Clone, Copy, Debug)]
enum Kill {
    Root(nix::sys::signal::Signal),
    NetworkPart,
}

#[test]
fn signals_under_load_leave_nothing_attached_and_nothing_behind() -> Result<()> {
    use nix::sys::signal::Signal::{SIGHUP, SIGKILL, SIGTERM};
    raise_fd_limit();
    let cluster = SimCluster::start(ECHO_MANIFEST)?;
    for kill in [
        Kill::Root(SIGTERM),
        Kill::Root(SIGHUP),
        Kill::Root(SIGKILL),
        Kill::NetworkPart,
    ] {
        let (mut s, addr) = Session::echo(&cluster, &[])?;
        let (pid, net) = (s.pid(), s.net_pid()?);
        let cgroup = PathBuf::from(
            s.status().context("status")?["cgroup_path"]
                .as_str()
                .context("cgroup path")?,
        );
        ensure!(
            bpftool_cgroup_programs(&cgroup)?.len() == 4,
            "programs not attached"
        );
        // Busy: held connections plus a steady stream of echoes.
        let holder = s.spawn_load(&[
            "hold",
            "--addr",
            &addr,
            "--conns",
            "20",
            "--probe",
            "1024",
            "--wait-ms",
            "60000",
        ])?;
        let stream = s.spawn_load(&[
            "loop",
            "--addr",
            &addr,
            "--workers",
            "8",
            "--rate",
            "50",
            "--bytes",
            "16384",
            "--duration-ms",
            "60000",
        ])?;
        holder.expect("\"ready\":true", Duration::from_secs(30))?;
        stream.expect("\"ok\":", Duration::from_secs(30))?;
        let active = s.connections()["active"].as_u64().unwrap_or(0);
        ensure!(active >= 20, "not busy: {} active", active);

        let t = Instant::now();
        match kill {
            Kill::Root(sig) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)?,
            Kill::NetworkPart => {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(net as i32), SIGKILL)?
            }
        }
        let code = {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Some(st) = s.up.0.try_wait()? {
                    break st;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{kill:?}: beamredir still runs 20 s later:\n{}",
                    s.log_text()
                );
                thread::sleep(Duration::from_millis(10));
            }
        };
        let exited = t.elapsed();
        // The network part goes with the root part (parent-death signal).
        wait_until("the network part to end", Duration::from_secs(5), || {
            !alive(net)
        })?;
        // Nothing attached: bpftool sees no program on the session's cgroup (or no cgroup).
        let detached =
            |c: &Path| !c.exists() || bpftool_cgroup_programs(c).is_ok_and(|p| p.is_empty());
        wait_until("nothing attached", Duration::from_secs(5), || {
            detached(&cgroup)
        })?;
        let leftovers = |s: &Session| -> Vec<String> {
            std::fs::read_dir(s.state.path())
                .map(|d| {
                    d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                        .filter(|n| n.contains(&s.name))
                        .collect()
                })
                .unwrap_or_default()
        };
        let cleaned = match kill {
            Kill::Root(SIGKILL) => {
                // Nothing of the session ran its teardown: the reaper cleans up.
                let t = Instant::now();
                wait_until(
                    "the reaper to remove the cgroup and files",
                    Duration::from_secs(15),
                    || !cgroup.exists() && leftovers(&s).is_empty(),
                )
                .with_context(|| {
                    format!("left: {:?}, cgroup {}", leftovers(&s), cgroup.exists())
                })?;
                format!(
                    "the reaper removed the cgroup and files {:.2} s after the exit",
                    t.elapsed().as_secs_f64()
                )
            }
            _ => {
                ensure!(
                    !cgroup.exists(),
                    "{kill:?}: cgroup {} left",
                    cgroup.display()
                );
                ensure!(
                    leftovers(&s).is_empty(),
                    "{kill:?}: left behind: {:?}",
                    leftovers(&s)
                );
                "cgroup and files gone at exit".to_string()
            }
        };
        if let Kill::NetworkPart = kill {
            ensure!(
                s.log_text()
                    .contains(&format!("the network part of session {}", s.name)),
                "{}",
                s.log_text()
            );
        }
        ensure!(
            s.status().is_none(),
            "{kill:?}: the session is still listed: {:?}",
            s.status()
        );
        eprintln!(
            "faults: signals: {kill:?} with {active} connections carried: beamredir exited ({code}) after {:.2} s; {cleaned}",
            exited.as_secs_f64()
        );
        drop((holder, stream));
        s.up.0.wait().ok();
        drop(s);
    }
    Ok(())
}
