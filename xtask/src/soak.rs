//! `cargo xtask soak --minutes N`: a steady connect-and-rpc load through one `beamredir up`
//! session against the simulated cluster, for N minutes, with the network part's resident
//! memory and open descriptors sampled every few seconds. The report
//! (`$CARGO_TARGET_DIR/soak/report.md`, default `target/soak/`, plus `samples.csv`) gives the
//! least-squares slope of each: flat is the goal. It fails if the session dies or any echo or
//! call fails or comes back corrupted; the slopes are reported, not judged.
//!
//! The load, both in the session (`beamredir exec`), both bounded:
//! * `beamredir-load loop` (tests/src/bin/load.rs): `--rate` new connections a second (default
//!   20), each a 16 KiB echo through the pod's echo port, checked byte for byte;
//! * a hidden local Erlang node: an `rpc:call` to the pod's node every 100 ms, and every 50th
//!   call a fresh distribution connection (disconnect, then epmd lookup and handshake again
//!   through the forwards).
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use beamredir_testbed::{
    TempDir,
    cluster::SimCluster,
    hidden_node_args,
    procfs::{fd_count, network_part_of, status_kib},
    unique,
};

const ECHO_MANIFEST: &str = include_str!("../../tests/manifests/echo.yaml");
const ECHO_PORT: u16 = 7777;
const COOKIE: &str = "secret";

#[derive(clap::Args, Debug)]
pub struct SoakArgs {
    /// How long the load runs.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1440))]
    pub minutes: u32,
    /// Instead of --minutes: seconds (for short checks).
    #[arg(long, conflicts_with = "minutes", value_parser = clap::value_parser!(u32).range(10..=86400))]
    pub seconds: Option<u32>,
    /// New connections a second (each a 16 KiB echo).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    pub rate: u32,
}

impl SoakArgs {
    fn duration(&self) -> Duration {
        Duration::from_secs(
            self.seconds
                .map(u64::from)
                .unwrap_or(self.minutes as u64 * 60),
        )
    }

    fn command_line(&self) -> String {
        match self.seconds {
            Some(s) => format!("cargo xtask soak --seconds {s} --rate {}", self.rate),
            None => format!(
                "cargo xtask soak --minutes {} --rate {}",
                self.minutes, self.rate
            ),
        }
    }
}

/// One sample of the network part.
#[derive(Clone, Copy, Debug)]
struct Sample {
    secs: f64,
    rss_kib: u64,
    fds: usize,
}

/// Least-squares slope of `y` against `x` (per unit of x); 0 with fewer than two points.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let (sx, sy) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// A child whose stdout lines are collected as they come; killed on drop.
struct Lines {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl Lines {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr: Arc<Mutex<String>> = Arc::default();
        let (out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let l = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        let e = stderr.clone();
        thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            e.lock().unwrap().push_str(&s);
        });
        Ok(Lines {
            child,
            lines,
            stderr,
        })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits for the child to exit by itself (bounded).
    fn wait(&mut self, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait()? {
                thread::sleep(Duration::from_millis(100)); // the reader threads catch up
                return Ok(st.code().unwrap_or(-1));
            }
            ensure!(Instant::now() < deadline, "did not exit within {timeout:?}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn out_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"))
        .join("soak")
}

pub fn run(args: SoakArgs, beamredir: &Path, load: &Path) -> Result<()> {
    let duration = args.duration();
    let out = out_dir();
    std::fs::create_dir_all(&out)?;
    for old in ["report.md", "samples.csv"] {
        let _ = std::fs::remove_file(out.join(old));
    }
    // SAFETY: single-threaded at this point.
    unsafe { std::env::set_var("BEAMREDIR_BIN", beamredir) };
    let load_before = loadavg();
    let started_at = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    // The commit the binary under test was built from: read now, not when the report is
    // written an hour later (the tree may have moved on meanwhile).
    let root = crate::workspace_root();
    let root = root.to_string_lossy();
    let mut commit = command_output("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
    let changes = command_output(
        "git",
        &["-C", &root, "status", "--porcelain", "--untracked-files=no"],
    );
    if !changes.is_empty() {
        commit.push_str(" (with uncommitted changes)");
    }
    println!("soak: starting the simulated cluster (pod app-0: an Elixir node and a TCP echo)");
    let cluster = SimCluster::start(ECHO_MANIFEST).context("starting the simulated cluster")?;
    let ip = cluster.pod_ip("app-0").context("pod IP")?;
    let state = TempDir::new("brsoak")?;
    let session = unique("soak");
    let log = state.path().join("up.log");
    let mut up = cluster.start_up_session(
        state.path(),
        &session,
        &["--pod", "app-0", "--dist-port", &ECHO_PORT.to_string()],
        &log,
    )?;
    let root = up.0.id();
    let net = network_part_of(root).context("no network part")?;
    let exec = |program: &Path| {
        let mut cmd = cluster.beamredir(state.path());
        cmd.args(["-q", "exec", "--session", &session, "--"])
            .arg(program)
            .env("HOME", state.path());
        cmd
    };
    let addr = format!("{ip}:{ECHO_PORT}");
    wait_for(Duration::from_secs(30), || {
        cluster
            .session_status(state.path(), &session)
            .is_some_and(|s| {
                s["redirects"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|r| r["pod"] == addr.as_str()))
            })
    })
    .context("the echo port's redirect")?;

    println!(
        "soak: {} of load: {} echoes/s of 16 KiB to {addr}, an rpc:call every 100 ms to app@{ip}; sampling the network part (pid {net})",
        human(duration),
        args.rate
    );
    let mut echoes = Lines::spawn(
        exec(load)
            .args([
                "loop",
                "--addr",
                &addr,
                "--workers",
                "8",
                "--rate",
                &args.rate.to_string(),
                "--bytes",
                "16384",
                "--io-timeout-ms",
                "10000",
            ])
            .arg("--duration-ms")
            .arg((duration.as_millis() as u64).to_string()),
    )?;
    let node = format!("app@{ip}");
    let script = format!(
        "N = '{node}', End = erlang:monotonic_time(millisecond) + {ms}, \
         Loop = fun L(I, Ok, Fail) -> case erlang:monotonic_time(millisecond) >= End of true -> {{Ok, Fail}}; false -> \
           T = erlang:monotonic_time(millisecond), \
           {{Ok1, Fail1}} = case rpc:call(N, erlang, node, [], 5000) of N -> {{Ok + 1, Fail}}; Other -> io:format(\"rpc failed: ~p~n\", [Other]), {{Ok, Fail + 1}} end, \
           case I rem 50 of 0 -> erlang:disconnect_node(N); _ -> ok end, \
           timer:sleep(max(0, 100 - (erlang:monotonic_time(millisecond) - T))), L(I + 1, Ok1, Fail1) end end, \
         {{Ok, Fail}} = Loop(1, 0, 0), io:format(\"rpc ok=~p fail=~p~n\", [Ok, Fail]), halt().",
        ms = duration.as_millis()
    );
    let mut rpc = Lines::spawn(exec(Path::new("erl")).args(hidden_node_args(
        "soak@127.0.0.1",
        COOKIE,
        &script,
    )))?;

    let every = if duration >= Duration::from_secs(300) {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(3)
    };
    let t0 = Instant::now();
    let mut samples = Vec::new();
    while t0.elapsed() < duration {
        if let Some(st) = up.0.try_wait()? {
            bail!(
                "the session ended during the soak ({st}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        samples.push(Sample {
            secs: t0.elapsed().as_secs_f64(),
            rss_kib: status_kib(net, "VmRSS:"),
            fds: fd_count(net),
        });
        thread::sleep(
            every
                .min(duration.saturating_sub(t0.elapsed()))
                .max(Duration::from_millis(10)),
        );
    }
    let echo_code = echoes
        .wait(Duration::from_secs(60))
        .context("the echo client")?;
    let rpc_code = rpc.wait(Duration::from_secs(60)).context("the rpc node")?;
    // After the load: every connection ended, the descriptors where they started.
    let settle = Instant::now();
    let _ = wait_for(Duration::from_secs(30), || fd_count(net) <= samples[0].fds);
    let after = Sample {
        secs: t0.elapsed().as_secs_f64(),
        rss_kib: status_kib(net, "VmRSS:"),
        fds: fd_count(net),
    };
    let settled_in = settle.elapsed();
    let status = cluster.session_status(state.path(), &session);
    let alive = up.0.try_wait()?.is_none();
    drop(up);
    let load_after = loadavg();

    let summary: serde_json::Value = echoes
        .lines()
        .iter()
        .rev()
        .find_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .filter(|v| v["done"] == true)
        })
        .unwrap_or_default();
    let rpc_line = rpc
        .lines()
        .into_iter()
        .find(|l| l.starts_with("rpc ok="))
        .unwrap_or_default();
    let num = |k: &str| {
        rpc_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(k)?.parse::<u64>().ok())
    };
    let (rpc_ok, rpc_fail) = (num("ok="), num("fail="));
    let rpc_errors: Vec<String> = rpc
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("rpc failed"))
        .take(5)
        .collect();

    // Slopes: over every sample, and after the first fifth (warm-up: pools, caches, allocator).
    let per_min = |pts: Vec<(f64, f64)>| slope(&pts) * 60.0;
    let warm = samples.len() / 5;
    let rss_all = per_min(samples.iter().map(|s| (s.secs, s.rss_kib as f64)).collect());
    let rss_warm = per_min(
        samples[warm..]
            .iter()
            .map(|s| (s.secs, s.rss_kib as f64))
            .collect(),
    );
    let fds_all = per_min(samples.iter().map(|s| (s.secs, s.fds as f64)).collect());
    let fds_warm = per_min(
        samples[warm..]
            .iter()
            .map(|s| (s.secs, s.fds as f64))
            .collect(),
    );
    let (rss_min, rss_max) = (
        samples.iter().map(|s| s.rss_kib).min().unwrap_or(0),
        samples.iter().map(|s| s.rss_kib).max().unwrap_or(0),
    );
    let (fds_min, fds_max) = (
        samples.iter().map(|s| s.fds).min().unwrap_or(0),
        samples.iter().map(|s| s.fds).max().unwrap_or(0),
    );

    let mut md = String::new();
    let _ = writeln!(md, "# Soak\n");
    let _ = writeln!(
        md,
        "`{}` on {started_at}: {} of load, the network part sampled every {} s ({} samples).\n",
        args.command_line(),
        human(duration),
        every.as_secs(),
        samples.len()
    );
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| kernel | `{}` |", command_output("uname", &["-r"]));
    let _ = writeln!(
        md,
        "| CPUs | {} |",
        thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let _ = writeln!(
        md,
        "| load average (1, 5, 15 min) | {load_before} before, {load_after} after |"
    );
    let _ = writeln!(md, "| commit | {commit} |\n");
    let _ = writeln!(md, "## Load\n");
    let _ = writeln!(md, "| | ok | failed | corrupted |\n|---|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| echoes (16 KiB, new connection each, {}/s) | {} | {} | {} |",
        args.rate, summary["ok"], summary["fail"], summary["corrupt"]
    );
    let _ = writeln!(
        md,
        "| rpc:call (every 100 ms; a new distribution connection every 50th) | {} | {} | - |\n",
        rpc_ok.map(|v| v.to_string()).unwrap_or("?".into()),
        rpc_fail.map(|v| v.to_string()).unwrap_or("?".into())
    );
    if summary["errors"].as_object().is_some_and(|e| !e.is_empty()) {
        let _ = writeln!(md, "Echo failures by kind: `{}`\n", summary["errors"]);
    }
    for e in &rpc_errors {
        let _ = writeln!(md, "- `{e}`");
    }
    let _ = writeln!(md, "## The network part\n");
    let _ = writeln!(
        md,
        "| | first sample | min | max | last sample | slope, all samples | slope after the first fifth |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    let first = samples.first().copied().unwrap_or(after);
    let last = samples.last().copied().unwrap_or(after);
    let _ = writeln!(
        md,
        "| RSS | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:+.1} KiB/min | {:+.1} KiB/min |",
        mib(first.rss_kib),
        mib(rss_min),
        mib(rss_max),
        mib(last.rss_kib),
        rss_all,
        rss_warm
    );
    let _ = writeln!(
        md,
        "| open descriptors | {} | {fds_min} | {fds_max} | {} | {:+.2}/min | {:+.2}/min |\n",
        first.fds, last.fds, fds_all, fds_warm
    );
    let _ = writeln!(
        md,
        "After the load: {} descriptors ({:.1} s after it ended), RSS {:.1} MiB. The session {} and answered `status`: {}.\n",
        after.fds,
        settled_in.as_secs_f64(),
        mib(after.rss_kib),
        if alive {
            "was still running"
        } else {
            "had ended"
        },
        status
            .as_ref()
            .map(|s| s["connections"].to_string())
            .unwrap_or("no".into())
    );
    let _ = writeln!(
        md,
        "Every sample is in `samples.csv` (seconds, RSS KiB, descriptors)."
    );
    let mut csv = String::from("secs,rss_kib,fds\n");
    for s in &samples {
        let _ = writeln!(csv, "{:.1},{},{}", s.secs, s.rss_kib, s.fds);
    }
    std::fs::write(out.join("report.md"), &md)?;
    std::fs::write(out.join("samples.csv"), &csv)?;
    println!("\n{md}");
    println!("soak: report in {}", out.join("report.md").display());

    ensure!(alive, "the session ended during the soak");
    ensure!(
        echo_code == 0 && summary["done"] == true,
        "the echo client failed ({echo_code}): {}",
        echoes.stderr.lock().unwrap()
    );
    ensure!(
        rpc_code == 0 && rpc_ok.is_some(),
        "the rpc node failed ({rpc_code}): {}",
        rpc.stderr.lock().unwrap()
    );
    ensure!(summary["corrupt"] == 0, "corrupted echoes: {summary}");
    ensure!(summary["fail"] == 0, "failed echoes: {summary}");
    ensure!(
        rpc_fail == Some(0),
        "failed rpc calls: {rpc_line} {rpc_errors:?}"
    );
    Ok(())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn human(d: Duration) -> String {
    if d.as_secs().is_multiple_of(60) {
        format!("{} min", d.as_secs() / 60)
    } else {
        format!("{} s", d.as_secs())
    }
}

fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {timeout:?}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn least_squares_slope() {
        assert_eq!(super::slope(&[]), 0.0);
        assert_eq!(super::slope(&[(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]), 2.0);
        assert_eq!(super::slope(&[(0.0, 4.0), (1.0, 4.0), (5.0, 4.0)]), 0.0);
    }
}
