//! `cargo xtask bench`: benchmarks run side by side in one run, reported under
//! `$CARGO_TARGET_DIR/bench/` (default `target/bench/`):
//!
//! * `report.md`: Markdown tables and the machine they ran on;
//! * `results.json`: every repetition, machine-readable;
//! * SVG plots: `connect_cost.svg`, `connect_closed.svg` (cost against N),
//!   `kubectl_latency.svg`, `kubectl_throughput.svg` (against the API server's RTT).
//!
//! Each benchmark is a sibling module that returns its results, a Markdown section and a JSON
//! value; [`report`] (machine info, Markdown, JSON) and [`plot`] (SVG charts) are shared:
//!
//! 1. [`connect`]: the cost of one `connect()` to a pod address redirected by beamredir,
//!    against plain loopback and against the iptables DNAT recipe;
//! 2. [`tunnel`]: throughput and round trips through beamredir's port-forward (simulated API
//!    server), against a plain 2-hop TCP relay and a direct route;
//! 3. [`erlang`]: `rpc:call` round trips and a 64 MiB binary, beamredir against direct;
//! 4. [`startup`]: `beamredir up` start-up time and resident memory;
//! 5. [`kubectl`]: beamredir against the seed recipe (`kubectl port-forward` + iptables) with
//!    a delay relay on the link to the API server (0, 20, 80 ms RTT): first byte, ping, rpc,
//!    throughput;
//! 6. [`restart`]: the pod restarts under an `rpc:call` loop, both tools side by side;
//! 7. [`pods`]: `beamredir up --statefulset` over 1, 10 and 20 pods with 80 ms to the API server.
//!
//! 2-6 share one simulated cluster and its namespaces ([`sim`]); 5 and 6 share the
//! workstations with delay relays ([`sim::Link`]); 7 starts its own cluster.
//!
//! Benchmarks assert nothing about time: they measure and report. Every namespace, session
//! and rule they create is removed on the way out, also on error or Ctrl-C.
use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

mod connect;
mod erlang;
mod kubectl;
mod plot;
mod pods;
mod report;
mod restart;
mod sim;
mod startup;
mod tunnel;

/// The benchmarks, in the order they run.
const PARTS: [&str; 7] = ["connect", "tunnel", "erlang", "startup", "kubectl", "restart", "pods"];

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Tiny sizes and few repetitions: checks the benchmark runs (CI), measures nothing useful.
    #[arg(long)]
    pub smoke: bool,
    /// Rounds: repetitions of each case at each size, run round-robin (default 50; --smoke 2).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub reps: Option<u32>,
    /// Connections per repetition (default 2000; --smoke 200).
    #[arg(long, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    pub connects: Option<u32>,
    /// Numbers of map entries / iptables rules, comma-separated (default 1,100,1000,10000;
    /// --smoke 1,10).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=16_000))]
    pub sizes: Vec<u32>,
    /// Run only these benchmarks (comma-separated: connect, tunnel, erlang, startup, kubectl,
    /// restart, pods; default all).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(PARTS))]
    pub only: Vec<String>,
    /// connect: runs of the closed-port measure (default 5; --smoke 1).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=50))]
    pub closed_runs: Option<u32>,
    /// connect: connects per closed-port run (default 50000; --smoke 2000).
    #[arg(long, value_parser = clap::value_parser!(u32).range(10..=1_000_000))]
    pub closed_connects: Option<u32>,
    /// kubectl, restart: RTTs of the link to the API server in ms, comma-separated (default
    /// 0,20,80; --smoke 0,20).
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub rtts: Vec<u32>,
    /// kubectl, restart: leave out beamredir without spare API-server connections (the
    /// before/after of that change; never in --smoke).
    #[arg(long)]
    pub no_spares_baseline: bool,
}

impl BenchArgs {
    /// The command line that reproduces this run.
    fn command_line(&self) -> String {
        let mut cmd = String::from("cargo xtask bench");
        if self.smoke {
            cmd.push_str(" --smoke");
        }
        if let Some(r) = self.reps {
            cmd.push_str(&format!(" --reps {r}"));
        }
        if let Some(c) = self.connects {
            cmd.push_str(&format!(" --connects {c}"));
        }
        if !self.sizes.is_empty() {
            let sizes: Vec<String> = self.sizes.iter().map(u32::to_string).collect();
            cmd.push_str(&format!(" --sizes {}", sizes.join(",")));
        }
        if !self.only.is_empty() {
            cmd.push_str(&format!(" --only {}", self.only.join(",")));
        }
        if let Some(r) = self.closed_runs {
            cmd.push_str(&format!(" --closed-runs {r}"));
        }
        if let Some(c) = self.closed_connects {
            cmd.push_str(&format!(" --closed-connects {c}"));
        }
        if !self.rtts.is_empty() {
            let rtts: Vec<String> = self.rtts.iter().map(u32::to_string).collect();
            cmd.push_str(&format!(" --rtts {}", rtts.join(",")));
        }
        if self.no_spares_baseline {
            cmd.push_str(" --no-spares-baseline");
        }
        cmd
    }

    fn wants(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// Where the results go: `bench/` in the cargo target directory.
fn out_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target"))
        .join("bench")
}

pub fn run(args: BenchArgs) -> Result<()> {
    let out = out_dir();
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // No stale results from an earlier run if this one fails.
    for old in ["report.md", "results.json", "connect_cost.svg", "connect_closed.svg", "kubectl_latency.svg", "kubectl_throughput.svg"] {
        let _ = std::fs::remove_file(out.join(old));
    }
    let beamredir = PathBuf::from(std::env::var_os("BEAMREDIR_BIN").context("BEAMREDIR_BIN is not set")?);
    ensure!(beamredir.is_file(), "no beamredir binary at {}", beamredir.display());
    install_interrupt_handler();

    let root = crate::workspace_root();
    let client = compile_c(&root.join("xtask/bench/connect_bench.c"), &out.join("connect_bench"))?;
    let tunnel_bench = compile_c(&root.join("xtask/bench/tunnel_bench.c"), &out.join("tunnel_bench"))?;
    let command = format!("sudo -E env PATH=\"$PATH\" {}", args.command_line());
    let before = report::Machine::collect();
    let started = Instant::now();

    let mut sections = Vec::new();
    let mut json_parts = Vec::new();
    let mut console = Vec::new();
    let mut files = vec![];
    let write_svg = |files: &mut Vec<String>, name: &str, svg: String| -> Result<()> {
        let path = out.join(name);
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        files.push(path.display().to_string());
        Ok(())
    };
    if args.wants("connect") {
        let config = connect::Config::new(&args);
        println!("bench 1/7: connect() cost, {}", config.describe());
        let results = connect::run(&config, &client, &beamredir)?;
        let machine = report::Machine::collect();
        write_svg(&mut files, "connect_cost.svg", connect::plot(&results, connect::Measure::Open, &machine))?;
        write_svg(&mut files, "connect_closed.svg", connect::plot(&results, connect::Measure::Closed, &machine))?;
        sections.push(connect::markdown(&results, "connect_cost.svg", "connect_closed.svg"));
        json_parts.push(("connect", connect::json(&results)));
        console.push(connect::console(&results));
    }
    if ["tunnel", "erlang", "startup", "kubectl", "restart"].iter().any(|p| args.wants(p)) {
        check_interrupted()?;
        println!("bench: starting the simulated cluster (pods tunnel-0, erl-0), the relay and direct namespaces, `beamredir up`");
        let bed = sim::Bed::start(&tunnel_bench, &beamredir)?;
        if args.wants("tunnel") {
            let config = tunnel::Config::new(&args);
            println!("bench 2/7: tunnel throughput and latency, {}", config.describe());
            let results = tunnel::run(&config, &bed)?;
            sections.push(tunnel::markdown(&results));
            json_parts.push(("tunnel", tunnel::json(&results)));
            console.push(format!("{}\n{}\n\nCPU seconds per GiB:\n{}", tunnel::markdown_table(&results), tunnel::verdict(&results), tunnel::cpu_table(&results)));
        }
        if args.wants("erlang") {
            let config = erlang::Config::new(&args);
            println!("bench 3/7: Erlang distribution, {}", config.describe());
            let results = erlang::run(&config, &bed)?;
            sections.push(erlang::markdown(&results));
            json_parts.push(("erlang", erlang::json(&results)));
            console.push(format!("{}\n{}", erlang::markdown_table(&results), erlang::verdict(&results)));
        }
        if args.wants("startup") {
            let config = startup::Config::new(&args);
            println!("bench 4/7: start-up and footprint, {}", config.describe());
            let results = startup::run(&config, &bed)?;
            sections.push(startup::markdown(&results));
            json_parts.push(("startup", startup::json(&results)));
            console.push(format!("{}\n{}", startup::markdown_table(&results), startup::verdict(&results)));
        }
        if args.wants("kubectl") || args.wants("restart") {
            check_interrupted()?;
            let config = kubectl::Config::new(&args);
            println!("bench: starting a workstation with a delay relay per tool and RTT ({} ms)", config.rtts_ms.iter().map(u32::to_string).collect::<Vec<_>>().join(", "));
            let mut links = sim::start_links(&bed, &config.tools, &config.rtts())?;
            if args.wants("kubectl") {
                println!("bench 5/7: beamredir against the kubectl recipe over a link with latency, {}", config.describe());
                let results = kubectl::run(&config, &bed, &mut links)?;
                let machine = report::Machine::collect();
                write_svg(&mut files, "kubectl_latency.svg", kubectl::plot_latency(&results, &machine))?;
                write_svg(&mut files, "kubectl_throughput.svg", kubectl::plot_throughput(&results, &machine))?;
                sections.push(kubectl::markdown(&results, "kubectl_latency.svg", "kubectl_throughput.svg"));
                json_parts.push(("kubectl", kubectl::json(&results)));
                console.push(format!("{}\n{}", kubectl::markdown_table(&results), kubectl::verdict(&results)));
            }
            if args.wants("restart") {
                check_interrupted()?;
                let config = restart::Config::new(&args);
                println!("bench 6/7: pod restart under an rpc:call loop, {}", config.describe());
                let results = restart::run(&config, &bed, &mut links)?;
                sections.push(restart::markdown(&results));
                json_parts.push(("restart", restart::json(&results)));
                console.push(format!("{}\n{}", restart::markdown_table(&results), restart::verdict(&results)));
            }
            println!("bench: tearing down the workstations");
            drop(links);
        }
        println!("bench: tearing down the simulated cluster");
    }
    if args.wants("pods") {
        check_interrupted()?;
        let config = pods::Config::new(&args);
        println!("bench 7/7: many pods at once, {}", config.describe());
        let results = pods::run(&config)?;
        sections.push(pods::markdown(&results));
        json_parts.push(("pods", pods::json(&results)));
        console.push(pods::markdown_table(&results));
    }

    let machine = before.finish();
    let elapsed = started.elapsed();
    let md = report::markdown(&machine, &command, elapsed, &sections);
    let json = report::json(&machine, &command, elapsed, json_parts);
    let md_path = out.join("report.md");
    let json_path = out.join("results.json");
    std::fs::write(&md_path, &md).with_context(|| format!("writing {}", md_path.display()))?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&json)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;

    for c in console {
        println!("\n{c}");
    }
    files.insert(0, json_path.display().to_string());
    files.insert(0, md_path.display().to_string());
    println!("bench: done in {:.0} s: {}", elapsed.as_secs_f64(), files.join(", "));
    Ok(())
}

/// Compiles a C benchmark client with `cc -O2`.
fn compile_c(src: &Path, bin: &Path) -> Result<PathBuf> {
    crate::run(Command::new("cc").args(["-O2", "-Wall", "-Wextra", "-pthread", "-o"]).arg(bin).arg(src))
        .with_context(|| format!("compiling {} (is a C compiler installed?)", src.display()))?;
    Ok(bin.to_path_buf())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C/SIGTERM set a flag instead of killing xtask, so the benchmark stops at the next check
/// and its guards remove namespaces and sessions.
fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Fails if Ctrl-C (or SIGTERM) was received.
fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Runs a command to completion within `timeout` (killing it if it overruns, or on Ctrl-C)
/// and returns its stdout; fails with its stderr if it fails.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<String> {
    run_with_deadline(cmd, timeout, true)
}

/// [`run_bounded`] for clean-up: Ctrl-C does not cut it short (only the timeout does).
fn run_cleanup(cmd: &mut Command, timeout: Duration) -> Result<String> {
    run_with_deadline(cmd, timeout, false)
}

fn run_with_deadline(cmd: &mut Command, timeout: Duration, interruptible: bool) -> Result<String> {
    use std::{io::Read, process::Stdio};
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline || (interruptible && INTERRUPTED.load(Ordering::SeqCst)) {
            let _ = child.kill();
            let _ = child.wait();
            if interruptible {
                check_interrupted()?;
            }
            bail!("{cmd:?} did not finish within {timeout:?}: killed");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let (out, err) = (out_t.join().unwrap_or_default(), err_t.join().unwrap_or_default());
    ensure!(status.success(), "{cmd:?} failed ({status}): {}{}", out.trim(), err.trim());
    Ok(out)
}
