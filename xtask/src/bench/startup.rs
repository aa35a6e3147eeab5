//! Benchmark 4: start-up and footprint of `beamredir up --pod tunnel-0`.
//!
//! Per repetition, a fresh session (its own state dir): the time from spawning `beamredir -v up`
//! until its banner line arrives on stderr (printed once the programs are attached and the
//! forwards listen), split by the API server's audit log, polled every millisecond in this
//! process: when the pod GET arrived (start-up before the lookup: process start, kubeconfig,
//! TLS), and from there to the banner (the lookup's answer, the epmd probe through a
//! port-forward, loading and attaching the eBPF programs, the forwards). Then beamredir's VmRSS
//! (the `up` process and its children: the network part holds the forwards), idle, and while a
//! client in the session holds 100 connections open through the tunnel's forward (each carried
//! end to end: one echo round trip each).
use std::{
    fmt::Write as _,
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use super::{
    BenchArgs, check_interrupted,
    report::{self, Spread},
    sim::{Bed, TUNNEL_POD, TUNNEL_PORT, UpSession},
};

const TARGET_READY_MS: f64 = 300.0;
const TARGET_RSS_MIB: f64 = 30.0;

#[derive(Clone, Debug)]
pub struct Config {
    pub smoke: bool,
    pub reps: u32,
    pub conns: u32,
}

impl Config {
    pub fn new(args: &BenchArgs) -> Self {
        if args.smoke {
            Config { smoke: true, reps: args.reps.unwrap_or(1).min(2), conns: 10 }
        } else {
            Config { smoke: false, reps: args.reps.unwrap_or(10).min(20), conns: 100 }
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} start-ups of `beamredir up --pod {TUNNEL_POD}` after one untimed; {} connections held for the loaded footprint{}",
            self.reps,
            self.conns,
            if self.smoke { " [smoke: measures nothing useful]" } else { "" }
        )
    }
}

pub struct Measurement {
    pub rep: u32,
    pub v: Value,
}

pub struct Results {
    pub config: Config,
    pub measurements: Vec<Measurement>,
}

/// When the first audit entry containing each needle arrived (polled every millisecond).
struct AuditWatch {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Vec<Option<Instant>>>>,
}

impl AuditWatch {
    fn start(bed: &Bed, needles: Vec<String>) -> Self {
        let state = bed.cluster.state.clone();
        let from = state.audit.lock().unwrap().len();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = thread::spawn(move || {
            let mut seen = vec![None; needles.len()];
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                let audit = state.audit.lock().unwrap();
                let now = Instant::now();
                for (i, n) in needles.iter().enumerate() {
                    if seen[i].is_none() && audit.iter().skip(from).any(|l| l.contains(n.as_str())) {
                        seen[i] = Some(now);
                    }
                }
                drop(audit);
                if seen.iter().all(Option::is_some) {
                    break;
                }
                thread::sleep(Duration::from_millis(1));
            }
            seen
        });
        AuditWatch { stop, thread: Some(thread) }
    }

    fn finish(mut self) -> Vec<Option<Instant>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap_or_default()
    }
}

impl Drop for AuditWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn one(bed: &Bed, cfg: &Config) -> Result<Value> {
    let needles = vec![format!("get pods default/{TUNNEL_POD}"), format!("create pods/portforward default/{TUNNEL_POD}")];
    let watch = AuditWatch::start(bed, needles);
    let mut session = UpSession::start(&bed.cluster, &bed.beamredir, &[TUNNEL_POD], true)?;
    let t0 = session.started;
    let ready = session.wait_up(Duration::from_secs(60))?;
    let seen = watch.finish();
    let ms = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1e3);
    let ready_ms = ready.duration_since(t0).as_secs_f64() * 1e3;
    let (get_ms, pf_ms) = (ms(seen[0]), ms(seen[1]));
    ensure!(session.status().is_some_and(|s| s["state"] == "running"), "session not running after its banner: {}", session.log());
    thread::sleep(Duration::from_millis(300));
    let idle = session.memory_kib()?;

    // 100 connections held open through the forward.
    let mut cmd = session.exec(&bed.tunnel_bench);
    cmd.args(["hold", "--target", &format!("{}:{TUNNEL_PORT}", bed.tunnel_ip), "--conns", &cfg.conns.to_string(), "--timeout-s", "60"]);
    let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("starting the hold client")?;
    let mut stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut child = beamredir_testbed::Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let t_hold = Instant::now();
    let line = loop {
        check_interrupted()?;
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => break line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if t_hold.elapsed() < Duration::from_secs(70) => {}
            Err(_) => {
                let mut err = String::new();
                if let Some(mut e) = child.0.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!("hold client: no ready line: {err}");
            }
        }
    };
    ensure!(line.contains("\"ready\":true"), "hold client said {line}");
    let open_ms = t_hold.elapsed().as_secs_f64() * 1e3;
    let active = session.status().and_then(|s| {
        s["forwards"].as_array()?.iter().map(|f| f["active"].as_u64().or(f["stats"]["active"].as_u64())).sum::<Option<u64>>()
    });
    let loaded = session.memory_kib()?;
    use std::io::Write;
    let _ = writeln!(stdin, "done");
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && matches!(child.0.try_wait(), Ok(None)) {
        thread::sleep(Duration::from_millis(20));
    }
    let log_lines = session.stderr.lock().unwrap().iter().map(|(t, l)| json!({"ms": report::round1(t.duration_since(t0).as_secs_f64() * 1e3), "line": l})).collect::<Vec<_>>();
    drop(session);
    Ok(json!({
        "ready_ms": ready_ms,
        "get_pod_ms": get_ms,
        "portforward_ms": pf_ms,
        "after_lookup_ms": get_ms.map(|g| ready_ms - g),
        "idle_pss_kib": idle.pss,
        "idle_rss_kib": idle.rss,
        "loaded_pss_kib": loaded.pss,
        "loaded_pss_anon_kib": loaded.pss_anon,
        "loaded_rss_kib": loaded.rss,
        "hwm_kib": loaded.hwm,
        "conns": cfg.conns,
        "open_conns_ms": open_ms,
        "forwards_active": active,
        "stderr": log_lines,
    }))
}

pub fn run(cfg: &Config, bed: &Bed) -> Result<Results> {
    let mut results = Results { config: cfg.clone(), measurements: Vec::new() };
    check_interrupted()?;
    one(bed, cfg).context("warm-up start-up")?;
    for rep in 0..cfg.reps {
        check_interrupted()?;
        let v = one(bed, cfg).with_context(|| format!("start-up {}", rep + 1))?;
        println!(
            "  start-up {:>2}/{}: ready {:.0} ms (pod GET at {:.0} ms, then {:.0} ms); Pss idle {:.1} MiB, {} connections {:.1} MiB",
            rep + 1,
            cfg.reps,
            v["ready_ms"].as_f64().unwrap_or(f64::NAN),
            v["get_pod_ms"].as_f64().unwrap_or(f64::NAN),
            v["after_lookup_ms"].as_f64().unwrap_or(f64::NAN),
            v["idle_pss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
            cfg.conns,
            v["loaded_pss_kib"].as_f64().unwrap_or(f64::NAN) / 1024.0,
        );
        results.measurements.push(Measurement { rep, v });
    }
    Ok(results)
}

impl Results {
    fn spread(&self, key: &str) -> Spread {
        Spread::of(&self.measurements.iter().map(|m| m.v[key].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>())
    }
}

fn ms(s: Spread) -> String {
    format!("{:.0} ms [{:.0}–{:.0}]", s.median, s.min, s.max)
}

fn mib(s: Spread) -> String {
    format!("{:.1} MiB [{:.1}–{:.1}]", s.median / 1024.0, s.min / 1024.0, s.max / 1024.0)
}

pub fn markdown_table(r: &Results) -> String {
    let mut md = String::from("| figure | median [min–max] |\n|---|---:|\n");
    let _ = writeln!(md, "| `beamredir up` started → ready (banner) | {} |", ms(r.spread("ready_ms")));
    let _ = writeln!(md, "| started → pod GET reaches the API server | {} |", ms(r.spread("get_pod_ms")));
    let _ = writeln!(md, "| started → epmd probe's port-forward reaches the API server | {} |", ms(r.spread("portforward_ms")));
    let _ = writeln!(md, "| **pod GET → ready** (≈ after the pod lookup returns) | {} |", ms(r.spread("after_lookup_ms")));
    let _ = writeln!(md, "| resident (Pss) idle (0.3 s after ready) | {} |", mib(r.spread("idle_pss_kib")));
    let _ = writeln!(md, "| **resident (Pss) with {} open forwarded connections** | {} |", r.config.conns, mib(r.spread("loaded_pss_kib")));
    let _ = writeln!(md, "| of which anonymous (heap, stacks: Pss_Anon) | {} |", mib(r.spread("loaded_pss_anon_kib")));
    let _ = writeln!(md, "| VmRSS sum (counts the shared binary once per process) | {} |", mib(r.spread("loaded_rss_kib")));
    let _ = writeln!(md, "| VmHWM sum (each process's peak) by then | {} |", mib(r.spread("hwm_kib")));
    let _ = writeln!(md, "| opening the {} connections (each with one round trip) | {} |", r.config.conns, ms(r.spread("open_conns_ms")));
    md
}

pub fn verdict(r: &Results) -> String {
    let after = r.spread("after_lookup_ms").median;
    let rss = r.spread("loaded_pss_kib").median / 1024.0;
    let met = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let mut v = format!(
        "Targets: ready within {TARGET_READY_MS:.0} ms after the pod lookup: {} ({after:.0} ms from the pod GET; {:.0} ms in all). Under {TARGET_RSS_MIB:.0} MiB resident (Pss, all of beamredir's processes) with {} connections: {} ({rss:.1} MiB).",
        met(after < TARGET_READY_MS),
        r.spread("ready_ms").median,
        r.config.conns,
        met(rss < TARGET_RSS_MIB),
    );
    if r.config.smoke {
        v.push_str(" (Smoke run: too short to mean anything.)");
    }
    v
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::from("## Start-up and footprint of `beamredir up`\n\n");
    let _ = writeln!(s, "{}.\n", r.config.describe());
    s.push_str(
        "Ready: from spawning `beamredir -v up` until its banner line arrives on stderr (printed once both programs are \
         attached and the forwards listen). The pod GET's arrival at the simulated API server (its audit log, polled \
         every ms in the bench process) splits it: before it, process start, kubeconfig and the TLS connection; after \
         it, the lookup's answer, the epmd probe (one NAMES round trip through a port-forward), loading and attaching \
         the eBPF programs, and the listeners. Memory: from /proc, summed over beamredir's processes (the `up` \
         process, its unprivileged network part, which holds the forwards and their connections, and the reaper). \
         The resident figure is Pss (smaps_rollup), which shares each page among the processes that map it: the \
         three map the same binary, which the VmRSS sum counts three times.\n\n",
    );
    s.push_str(&markdown_table(r));
    s.push('\n');
    s.push_str(&verdict(r));
    s.push('\n');
    s
}

pub fn json(r: &Results) -> Value {
    let mut summary = json!({});
    for key in ["ready_ms", "get_pod_ms", "portforward_ms", "after_lookup_ms", "idle_pss_kib", "idle_rss_kib", "loaded_pss_kib", "loaded_pss_anon_kib", "loaded_rss_kib", "hwm_kib", "open_conns_ms"] {
        summary[key] = r.spread(key).json();
    }
    json!({
        "config": {"smoke": r.config.smoke, "reps": r.config.reps, "conns": r.config.conns},
        "targets": {"ready_after_lookup_ms_max": TARGET_READY_MS, "rss_mib_max": TARGET_RSS_MIB},
        "summary": summary,
        "repetitions": r.measurements.iter().map(|m| json!({"rep": m.rep, "measurement": m.v})).collect::<Vec<_>>(),
    })
}
