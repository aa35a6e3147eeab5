//! Benchmark 6: the pod restarts under a running `rpc:call` loop, beamredir and the kubectl
//! recipe side by side. In every workstation of benchmark 5 ([`Link`]: each tool at each RTT), a
//! local node calls `rpc:call(Node, erlang, node, [], 1000)` on the erl pod's node, then sleeps
//! 50 ms, forever, printing each outcome. Once every loop is succeeding, the erl pod is deleted
//! as `kubectl delete pod` does (graceful: Terminating, SIGTERM, then gone; its StatefulSet
//! recreates it, with the same address: the bed's IPAM reuses freed addresses, so the node name
//! `app@POD_IP` and the recipe's DNAT rules stay valid). The loops run on for an observation
//! window after the new pod is Ready. Reported per loop: when calls started failing, when (if
//! ever) they succeeded again, and for the recipe whether kubectl was still running.
use std::{
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::Path,
    process::Stdio,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use beamredir_testbed::{Proc, TempDir};
use serde_json::{Value, json};

use super::{
    BenchArgs, check_interrupted,
    sim::{Bed, COOKIE, ERL_POD, Link, Tool},
};

#[derive(Clone, Debug)]
pub struct Config {
    pub smoke: bool,
    /// How long the loops run on after the new pod is Ready.
    pub window: Duration,
    pub interval_ms: u32,
    pub call_timeout_ms: u32,
}

impl Config {
    pub fn new(args: &BenchArgs) -> Self {
        Config {
            smoke: args.smoke,
            window: Duration::from_secs(if args.smoke { 5 } else { 30 }),
            interval_ms: 50,
            call_timeout_ms: 1000,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "an rpc:call loop (timeout {} ms, then {} ms pause) per tool and RTT; the pod deleted once every loop succeeds; observed until {} s after the new pod is Ready{}",
            self.call_timeout_ms,
            self.interval_ms,
            self.window.as_secs(),
            if self.smoke { " [smoke]" } else { "" }
        )
    }
}

/// One loop's story, in seconds from the deletion.
pub struct Outcome {
    pub tool: Tool,
    pub rtt_ms: u32,
    pub calls: usize,
    pub ok_before: usize,
    /// The first failed call after the deletion.
    pub first_failure_s: Option<f64>,
    /// The first successful call after that failure.
    pub recovered_s: Option<f64>,
    pub failures: usize,
    pub ok_after_failure: usize,
    /// The last thing a failed call said.
    pub last_error: String,
    /// kubectl only: when its port-forward for the erl pod had exited (None: still running).
    pub kubectl_exited_s: Option<f64>,
    pub tool_log_tail: String,
}

pub struct Results {
    pub config: Config,
    pub outcomes: Vec<Outcome>,
    /// When the new pod was Ready, from the deletion.
    pub ready_s: f64,
    /// When the old pod's object was gone, from the deletion.
    pub gone_s: Option<f64>,
    pub same_ip: bool,
    pub end_s: f64,
}

/// A running loop: its lines (arrival time, text).
struct Loop {
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    _proc: Proc,
}

fn script(cfg: &Config, pod_ip: std::net::Ipv4Addr) -> String {
    format!(
        r#"Node = 'app@{pod_ip}',
Loop = fun Loop() ->
    case rpc:call(Node, erlang, node, [], {timeout}) of
        Node -> io:format("ok~n");
        Other -> io:format("fail ~0p~n", [Other])
    end,
    timer:sleep({interval}),
    Loop()
end,
Loop()."#,
        timeout = cfg.call_timeout_ms,
        interval = cfg.interval_ms
    )
}

fn start_loop(bed: &Bed, link: &Link, cfg: &Config, home: &Path) -> Result<Loop> {
    let mut cmd = link.command(Path::new("erl"));
    // A name of its own: the pod node refuses a second connection from a name it knows.
    let name = format!("loop_{}_{}@127.0.0.1", link.tool.key(), link.rtt.as_millis());
    cmd.args(["-name", &name, "-setcookie", COOKIE, "-hidden", "-noshell", "-noinput"])
        .args(["-eval", &script(cfg, bed.erl_ip)])
        .env("HOME", home)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().context("starting the rpc loop node")?;
    let stdout = child.stdout.take().unwrap();
    let lines: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let sink = lines.clone();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push((Instant::now(), line));
        }
    });
    Ok(Loop { lines, _proc: Proc(child) })
}

pub fn run(cfg: &Config, bed: &Bed, links: &mut [Link]) -> Result<Results> {
    let home = TempDir::new("brbench-rerl")?;
    let mut loops = Vec::new();
    for link in links.iter() {
        loops.push(start_loop(bed, link, cfg, home.path()).with_context(|| link.describe())?);
    }
    // Every loop warm: its last five calls succeeded.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        check_interrupted()?;
        let warm = |l: &Loop| {
            let lines = l.lines.lock().unwrap();
            lines.len() >= 5 && lines.iter().rev().take(5).all(|(_, s)| s == "ok")
        };
        if loops.iter().all(warm) {
            break;
        }
        if Instant::now() > deadline {
            let state: Vec<String> = links
                .iter_mut()
                .zip(&loops)
                .map(|(k, l)| format!("{}: {:?}; log: {}", k.describe(), l.lines.lock().unwrap().last().map(|x| &x.1), k.log()))
                .collect();
            anyhow::bail!("the rpc loops did not all succeed within 120 s:\n{}", state.join("\n"));
        }
        thread::sleep(Duration::from_millis(100));
    }
    let old_ip = bed.cluster.pod_ip(ERL_POD);
    let t0 = Instant::now();
    let old = bed.cluster.delete_pod(ERL_POD)?;
    let old_uid = old.metadata.uid.clone();
    println!("  deleted pod {ERL_POD} (uid {}); waiting for its replacement", old_uid.as_deref().unwrap_or("?"));
    let secs = |t: Instant| t.saturating_duration_since(t0).as_secs_f64();
    let mut kubectl_exited: Vec<Option<f64>> = vec![None; links.len()];
    let mut gone_s = None;
    let mut ready_at = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        check_interrupted()?;
        let now = Instant::now();
        for (i, link) in links.iter_mut().enumerate() {
            if kubectl_exited[i].is_none() {
                if let Some(recipe) = link.recipe(ERL_POD) {
                    if !recipe.forward().is_running() {
                        kubectl_exited[i] = Some(secs(now));
                    }
                }
            }
        }
        let pod = bed.cluster.pod("default", ERL_POD);
        if gone_s.is_none() && pod.as_ref().is_none_or(|p| p.metadata.uid != old_uid) {
            gone_s = Some(secs(now));
        }
        let ready = pod.as_ref().is_some_and(|p| {
            p.metadata.uid != old_uid
                && p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        if ready_at.is_none() && ready {
            ready_at = Some(now);
            println!("  the new pod is Ready after {:.1} s; observing for {} s", secs(now), cfg.window.as_secs());
        }
        if let Some(t) = ready_at {
            if now >= t + cfg.window {
                break;
            }
        }
        ensure!(now < deadline || ready_at.is_some(), "pod {ERL_POD} was not replaced within 120 s");
        thread::sleep(Duration::from_millis(50));
    }
    let end_s = secs(Instant::now());
    let new_ip = bed.cluster.pod_ip(ERL_POD);
    let same_ip = new_ip.is_some() && new_ip == old_ip;
    if !same_ip {
        println!("  warning: the pod came back at {new_ip:?}, not {old_ip:?}: node names differ, the loops cannot recover");
    }
    let mut outcomes = Vec::new();
    for ((link, l), exited) in links.iter_mut().zip(&loops).zip(kubectl_exited) {
        let lines = l.lines.lock().unwrap().clone();
        let before: Vec<&(Instant, String)> = lines.iter().filter(|(t, _)| *t < t0).collect();
        let after: Vec<&(Instant, String)> = lines.iter().filter(|(t, _)| *t >= t0).collect();
        let first_failure = after.iter().position(|(_, s)| s != "ok");
        let recovered = first_failure.and_then(|i| after[i..].iter().position(|(_, s)| s == "ok").map(|j| i + j));
        let log = link.log();
        let tail: Vec<&str> = log.lines().rev().take(4).collect();
        outcomes.push(Outcome {
            tool: link.tool,
            rtt_ms: link.rtt.as_millis() as u32,
            calls: after.len(),
            ok_before: before.iter().filter(|(_, s)| s == "ok").count(),
            first_failure_s: first_failure.map(|i| secs(after[i].0)),
            recovered_s: recovered.map(|i| secs(after[i].0)),
            failures: after.iter().filter(|(_, s)| s != "ok").count(),
            ok_after_failure: first_failure.map_or(0, |i| after[i..].iter().filter(|(_, s)| s == "ok").count()),
            last_error: after.iter().rev().find(|(_, s)| s != "ok").map(|(_, s)| s.trim_start_matches("fail ").to_string()).unwrap_or_default(),
            kubectl_exited_s: exited,
            tool_log_tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    drop(loops);
    let ready_s = ready_at.map(secs).unwrap_or(f64::NAN);
    for o in &outcomes {
        println!(
            "  {} at {} ms: first failure {}, recovered {}{}",
            o.tool.key(),
            o.rtt_ms,
            o.first_failure_s.map_or("never".into(), |t| format!("{t:.2} s")),
            o.recovered_s.map_or("never".into(), |t| format!("{t:.2} s")),
            o.kubectl_exited_s.map_or(String::new(), |t| format!("; kubectl exited at {t:.2} s")),
        );
    }
    Ok(Results { config: cfg.clone(), outcomes, ready_s, gone_s, same_ip, end_s })
}

fn secs(t: Option<f64>) -> String {
    t.map_or("never".into(), |t| format!("{t:.2} s"))
}

pub fn markdown_table(r: &Results) -> String {
    let mut md = String::from(
        "| tool | RTT | first failed call | first success after it | failure → recovery | new pod Ready → recovery | calls after the failure (ok / failed) | kubectl's port-forward |\n|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for o in &r.outcomes {
        let recovery = match (o.first_failure_s, o.recovered_s) {
            (Some(f), Some(s)) => format!("**{:.2} s**", s - f),
            (Some(_), None) => format!("**never** (within {:.0} s)", r.end_s),
            _ => "no failure".into(),
        };
        let after_ready = o.recovered_s.map_or("–".into(), |s| format!("{:+.2} s", s - r.ready_s));
        let kubectl = match (o.tool, o.kubectl_exited_s) {
            (Tool::Kubectl, Some(t)) => format!("exited at {t:.1} s"),
            (Tool::Kubectl, None) => "still running, forwarding nowhere".into(),
            _ => "–".into(),
        };
        let _ = writeln!(
            md,
            "| {} | {} ms | {} | {} | {recovery} | {after_ready} | {} / {} | {kubectl} |",
            o.tool.label(),
            o.rtt_ms,
            secs(o.first_failure_s),
            secs(o.recovered_s),
            o.ok_after_failure,
            o.failures
        );
    }
    md
}

pub fn verdict(r: &Results) -> String {
    let b: Vec<&Outcome> = r.outcomes.iter().filter(|o| o.tool != Tool::Kubectl).collect();
    let k: Vec<&Outcome> = r.outcomes.iter().filter(|o| o.tool == Tool::Kubectl).collect();
    let b_ok = b.iter().all(|o| o.recovered_s.is_some());
    let k_never = k.iter().all(|o| o.first_failure_s.is_some() && o.recovered_s.is_none());
    let recoveries: Vec<String> = b
        .iter()
        .filter_map(|o| Some(format!("{:.2} s at {} ms", o.recovered_s? - o.first_failure_s?, o.rtt_ms)))
        .collect();
    let mut v = format!(
        "The pod was deleted at 0 s, its object was gone at {}, the new pod Ready at {:.2} s{}. beamredir: calls {} (failure → first success: {}). kubectl recipe: {} ({}).",
        secs(r.gone_s),
        r.ready_s,
        if r.same_ip { " at the same address" } else { " at a **different** address (node name changed: not comparable)" },
        if b_ok { "recovered by themselves in every loop" } else { "did **not** recover in every loop" },
        if recoveries.is_empty() { "–".into() } else { recoveries.join(", ") },
        if k_never { format!("calls never succeeded again within the {:.0} s observed", r.end_s) } else { "**some calls succeeded again**".into() },
        k.iter()
            .map(|o| format!("{} ms: kubectl {}", o.rtt_ms, o.kubectl_exited_s.map_or("still running".into(), |t| format!("exited at {t:.1} s"))))
            .collect::<Vec<_>>()
            .join(", "),
    );
    if r.config.smoke {
        v.push_str(" (Smoke run.)");
    }
    v
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::from("## Pod restart under an rpc:call loop: beamredir against the kubectl recipe\n\n");
    let _ = writeln!(s, "{}.\n", r.config.describe());
    s.push_str(
        "In each workstation of the previous section (each tool at each RTT), a hidden local node calls \
         `rpc:call(Node, erlang, node, [], 1000)` on the erl pod's node in a loop, 50 ms apart. Once every loop \
         succeeds, the pod is deleted the way `kubectl delete pod` does it (graceful); its StatefulSet recreates it at \
         the same address (the bed's IPAM reuses addresses), so the node name and the recipe's DNAT rules stay valid and \
         only the forwards differ. Times from the deletion. Nobody restarts kubectl: that is the recipe's recovery, \
         by hand.\n\n",
    );
    s.push_str(&markdown_table(r));
    s.push('\n');
    s.push_str(&verdict(r));
    s.push_str("\n\nWhat each tool said last:\n\n");
    for o in &r.outcomes {
        let _ = writeln!(s, "* {} at {} ms: last error `{}`; log: `{}`", o.tool.key(), o.rtt_ms, o.last_error, o.tool_log_tail.replace('`', "'"));
    }
    s
}

pub fn json(r: &Results) -> Value {
    json!({
        "config": {"smoke": r.config.smoke, "window_s": r.config.window.as_secs(), "interval_ms": r.config.interval_ms, "call_timeout_ms": r.config.call_timeout_ms},
        "ready_s": r.ready_s,
        "gone_s": r.gone_s,
        "same_ip": r.same_ip,
        "end_s": r.end_s,
        "outcomes": r.outcomes.iter().map(|o| json!({
            "tool": o.tool.key(), "rtt_ms": o.rtt_ms, "calls": o.calls, "ok_before": o.ok_before,
            "first_failure_s": o.first_failure_s, "recovered_s": o.recovered_s,
            "recovery_s": o.first_failure_s.zip(o.recovered_s).map(|(f, s)| s - f),
            "failures": o.failures, "ok_after_failure": o.ok_after_failure, "last_error": o.last_error,
            "kubectl_exited_s": o.kubectl_exited_s, "tool_log_tail": o.tool_log_tail,
        })).collect::<Vec<_>>(),
    })
}
