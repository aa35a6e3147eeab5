//! Benchmark 5: beamredir against the seed recipe (`kubectl port-forward` + iptables DNAT +
//! route + route_localnet, [`beamredir_testbed::recipe::KubectlRecipe`]) on its own ground: a
//! workstation whose link to the API server has latency. Each tool gets a workstation of its own
//! ([`Link`]) that reaches the *same* simulated API server (and pods) through a delay relay:
//! every chunk held RTT/2 per direction, and a connection's first bytes one RTT more (its TCP
//! handshake). At each RTT, for each tool:
//!
//! * **first byte**: `connect()` to the tunnel pod's server (it greets with one byte as it
//!   accepts) until that byte arrives, one connection after another;
//! * **ping**: `net_adm:ping` of the erl pod's node from a fresh local node (nothing cached:
//!   an epmd lookup, then the distribution connection and its handshake);
//! * **rpc**: `rpc:call(Node, erlang, node, [])` round trips on that connection (p50);
//! * **throughput** with 1 and 16 streams to the tunnel pod's sink.
//!
//! Rounds: in each, every RTT (in rotating order) runs every figure for every tool back to
//! back, the tools' order alternating, so the ratios are paired by round.
use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use beamredir_testbed::TempDir;
use serde_json::{Value, json};

use super::{
    BenchArgs, check_interrupted,
    plot::{self, Chart, Marker, Point, Series},
    report::{self, Machine, Spread},
    sim::{Bed, COOKIE, Link, TUNNEL_PORT, Tool, run_client},
};

/// A beamredir connection's first byte within this many RTTs of `connect()` (when warm).
const TARGET_TTFB_RTTS: f64 = 1.5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Figure {
    Ttfb,
    Ping,
    Rpc,
    Stream1,
    Streams16,
}

impl Figure {
    pub const ALL: [Figure; 5] = [Figure::Ttfb, Figure::Ping, Figure::Rpc, Figure::Stream1, Figure::Streams16];

    fn key(self) -> &'static str {
        match self {
            Figure::Ttfb => "first_byte",
            Figure::Ping => "ping",
            Figure::Rpc => "rpc",
            Figure::Stream1 => "throughput_1_stream",
            Figure::Streams16 => "throughput_16_streams",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Figure::Ttfb => "`connect()` → first byte from the pod, p50",
            Figure::Ping => "`net_adm:ping`, fresh local node",
            Figure::Rpc => "`rpc:call` round trip, p50",
            Figure::Stream1 => "throughput, 1 stream",
            Figure::Streams16 => "throughput, 16 streams",
        }
    }

    /// Higher is better (throughput) or lower is better (times).
    fn higher_is_better(self) -> bool {
        matches!(self, Figure::Stream1 | Figure::Streams16)
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub smoke: bool,
    pub rtts_ms: Vec<u32>,
    pub reps: u32,
    pub tools: Vec<Tool>,
    /// Connections per first-byte batch.
    pub ttfb_count: u32,
    pub rpc_warmup: u32,
    pub rpc_calls: u32,
    /// Bytes per throughput batch (split over the streams).
    pub bytes: u64,
}

impl Config {
    pub fn new(args: &BenchArgs) -> Self {
        let rtts_ms = if !args.rtts.is_empty() {
            args.rtts.clone()
        } else if args.smoke {
            vec![0, 20]
        } else {
            vec![0, 20, 80]
        };
        let mut tools = vec![Tool::Beamredir, Tool::Kubectl];
        if !args.smoke && !args.no_spares_baseline {
            tools.insert(1, Tool::BeamredirNoSpares);
        }
        if args.smoke {
            Config { smoke: true, rtts_ms, reps: args.reps.unwrap_or(1).min(2), tools, ttfb_count: 3, rpc_warmup: 2, rpc_calls: 5, bytes: 2 << 20 }
        } else {
            Config { smoke: false, rtts_ms, reps: args.reps.unwrap_or(5).min(20), tools, ttfb_count: 10, rpc_warmup: 5, rpc_calls: 20, bytes: 64 << 20 }
        }
    }

    pub fn rtts(&self) -> Vec<Duration> {
        self.rtts_ms.iter().map(|&ms| Duration::from_millis(u64::from(ms))).collect()
    }

    /// Time between two first-byte connections: 20 ms plus two RTTs, as a person or a script
    /// opens connections; back to back, each would also wait for the previous one's teardown.
    fn ttfb_gap_ms(rtt_ms: u32) -> u32 {
        20 + 2 * rtt_ms
    }

    pub fn describe(&self) -> String {
        format!(
            "RTT {} ms; tools: {}; {} rounds; per round and RTT: {} first-byte connections (20 ms + 2 RTT apart), one fresh node (ping, then {} timed rpc:calls after {}), {} MiB with 1 and with 16 streams{}",
            self.rtts_ms.iter().map(u32::to_string).collect::<Vec<_>>().join(", "),
            self.tools.iter().map(|t| t.key()).collect::<Vec<_>>().join(", "),
            self.reps,
            self.ttfb_count,
            self.rpc_calls,
            self.rpc_warmup,
            self.bytes >> 20,
            if self.smoke { " [smoke: measures nothing useful]" } else { "" }
        )
    }

    fn json(&self) -> Value {
        json!({
            "smoke": self.smoke, "rtts_ms": self.rtts_ms, "reps": self.reps,
            "tools": self.tools.iter().map(|t| t.key()).collect::<Vec<_>>(),
            "ttfb_count": self.ttfb_count, "rpc_warmup": self.rpc_warmup, "rpc_calls": self.rpc_calls, "bytes": self.bytes,
        })
    }
}

pub struct Measurement {
    pub rtt_ms: u32,
    pub tool: Tool,
    pub figure: Figure,
    pub rep: u32,
    /// ns for times, bytes/s for throughput.
    pub value: f64,
    pub client: Value,
}

pub struct Results {
    pub config: Config,
    pub measurements: Vec<Measurement>,
}

/// The local node's program: ping a pod node it never talked to, time rpc round trips, print
/// one JSON line, halt.
fn script(cfg: &Config, pod_ip: std::net::Ipv4Addr) -> String {
    format!(
        r#"Node = 'app@{pod_ip}',
T0 = erlang:monotonic_time(nanosecond),
Pong = net_adm:ping(Node),
Ping = erlang:monotonic_time(nanosecond) - T0,
pong = Pong,
{timing}io:format("{{\"ping_ns\":~b,\"calls\":~b,\"rpc_min_ns\":~b,\"rpc_p50_ns\":~b,\"rpc_max_ns\":~b}}~n", [Ping, N, hd(Ts), P(50), lists:last(Ts)]),
halt()."#,
        timing = super::sim::erl_rpc_timing(cfg.rpc_warmup, cfg.rpc_calls),
    )
}

/// What one client run measured: (figure, value) pairs and the client's JSON.
fn measure(bed: &Bed, link: &Link, what: Figure, cfg: &Config, home: &Path) -> Result<(Vec<(Figure, f64)>, Value)> {
    let rtt_ms = link.rtt.as_millis() as u32;
    // Every wait is bounded, generously for 80 ms links on a loaded machine.
    let slack = Duration::from_secs(60) + link.rtt * 200;
    match what {
        Figure::Ttfb => {
            let mut cmd = link.command(&bed.tunnel_bench);
            cmd.args(["ttfb", "--target", &format!("{}:{TUNNEL_PORT}", bed.tunnel_ip), "--count", &cfg.ttfb_count.to_string()])
                .args(["--gap-ms", &Config::ttfb_gap_ms(rtt_ms).to_string(), "--timeout-s", "30"]);
            let v = run_client(&mut cmd, slack)?;
            Ok((vec![(Figure::Ttfb, v["p50_ns"].as_f64().unwrap_or(f64::NAN))], v))
        }
        Figure::Ping | Figure::Rpc => {
            let mut cmd = link.command(Path::new("erl"));
            cmd.args(["-name", "bench@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-noinput"])
                .args(["-eval", &script(cfg, bed.erl_ip)])
                .env("HOME", home);
            let v = run_client(&mut cmd, slack)?;
            let get = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            Ok((vec![(Figure::Ping, get("ping_ns")), (Figure::Rpc, get("rpc_p50_ns"))], v))
        }
        Figure::Stream1 | Figure::Streams16 => {
            let streams = if what == Figure::Stream1 { 1 } else { 16 };
            let mut cmd = link.command(&bed.tunnel_bench);
            cmd.args(["throughput", "--target", &format!("{}:{TUNNEL_PORT}", bed.tunnel_ip), "--streams", &streams.to_string()])
                .args(["--bytes", &cfg.bytes.to_string(), "--timeout-s", "60"]);
            let v = run_client(&mut cmd, slack)?;
            Ok((vec![(what, v["bytes_per_s"].as_f64().unwrap_or(f64::NAN))], v))
        }
    }
}

/// The client runs of a round: ping and rpc come from one node.
const RUNS: [Figure; 4] = [Figure::Ttfb, Figure::Ping, Figure::Stream1, Figure::Streams16];

pub fn run(cfg: &Config, bed: &Bed, links: &mut [Link]) -> Result<Results> {
    let home = TempDir::new("brbench-kerl")?;
    let mut results = Results { config: cfg.clone(), measurements: Vec::new() };
    let find = |links: &[Link], tool: Tool, rtt_ms: u32| links.iter().position(|l| l.tool == tool && l.rtt.as_millis() as u32 == rtt_ms);
    // Warm-up: one of each, per link (the first node start, the first connections).
    for link in links.iter_mut() {
        if !cfg.tools.contains(&link.tool) || !cfg.rtts_ms.contains(&(link.rtt.as_millis() as u32)) {
            continue;
        }
        for what in RUNS {
            check_interrupted()?;
            measure(bed, link, what, cfg, home.path()).with_context(|| format!("warm-up {} {}: {}", link.describe(), what.key(), link.log()))?;
        }
    }
    for rep in 0..cfg.reps {
        let n = cfg.rtts_ms.len();
        for k in 0..n {
            let rtt_ms = cfg.rtts_ms[(rep as usize + k) % n];
            let mut line = format!("  round {:>2}/{} RTT {:>3} ms", rep + 1, cfg.reps, rtt_ms);
            for (i, what) in RUNS.into_iter().enumerate() {
                let mut tools = cfg.tools.clone();
                if (rep as usize + i) % 2 == 1 {
                    tools.reverse();
                }
                for tool in tools {
                    check_interrupted()?;
                    let idx = find(links, tool, rtt_ms).context("a link per tool and RTT")?;
                    let link = &mut links[idx];
                    let (values, client) = measure(bed, link, what, cfg, home.path())
                        .with_context(|| format!("{} {}: {}", link.describe(), what.key(), link.log()))?;
                    for (figure, value) in values {
                        ensure!(value.is_finite(), "{} {}: no {} in {client}", link.describe(), what.key(), figure.key());
                        results.measurements.push(Measurement { rtt_ms, tool, figure, rep, value, client: client.clone() });
                    }
                }
            }
            for f in Figure::ALL {
                let _ = write!(line, "  {}:", f.key());
                for &tool in &cfg.tools {
                    let v = results.measurements.iter().find(|m| m.rep == rep && m.rtt_ms == rtt_ms && m.tool == tool && m.figure == f).map(|m| m.value);
                    let _ = write!(line, " {}", v.map_or("-".into(), |v| short(f, v)));
                }
            }
            println!("{line}");
        }
    }
    Ok(results)
}

fn short(f: Figure, v: f64) -> String {
    if f.higher_is_better() { format!("{:.0}MiB/s", v / (1 << 20) as f64) } else { ms(v) }
}

/// Nanoseconds as milliseconds with a sensible number of decimals.
fn ms(ns: f64) -> String {
    let v = ns / 1e6;
    if v < 1.0 {
        format!("{v:.2} ms")
    } else if v < 100.0 {
        format!("{v:.1} ms")
    } else {
        format!("{v:.0} ms")
    }
}

fn cell(f: Figure, s: Spread) -> String {
    if f.higher_is_better() {
        let m = (1 << 20) as f64;
        format!("{:.0} MiB/s [{:.0}–{:.0}]", s.median / m, s.min / m, s.max / m)
    } else {
        format!("{} [{}–{}]", ms(s.median), ms(s.min).trim_end_matches(" ms"), ms(s.max).trim_end_matches(" ms"))
    }
}

impl Results {
    fn values(&self, rtt_ms: u32, tool: Tool, f: Figure) -> Vec<f64> {
        self.measurements.iter().filter(|m| m.rtt_ms == rtt_ms && m.tool == tool && m.figure == f).map(|m| m.value).collect()
    }

    fn get(&self, rtt_ms: u32, tool: Tool, f: Figure, rep: u32) -> Option<f64> {
        self.measurements.iter().find(|m| m.rtt_ms == rtt_ms && m.tool == tool && m.figure == f && m.rep == rep).map(|m| m.value)
    }

    /// beamredir's figure over kubectl's, paired by round, median.
    fn ratio(&self, rtt_ms: u32, tool: Tool, f: Figure) -> f64 {
        report::median(
            &(0..self.config.reps).filter_map(|rep| Some(self.get(rtt_ms, tool, f, rep)? / self.get(rtt_ms, Tool::Kubectl, f, rep)?)).collect::<Vec<_>>(),
        )
    }

    /// Whether beamredir is at least as fast as kubectl on `f` at `rtt_ms`.
    fn wins(&self, rtt_ms: u32, f: Figure) -> bool {
        let r = self.ratio(rtt_ms, Tool::Beamredir, f);
        if f.higher_is_better() { r >= 1.0 } else { r <= 1.0 }
    }
}

pub fn markdown_table(r: &Results) -> String {
    let tools = &r.config.tools;
    let mut md = String::from("| RTT | figure |");
    for t in tools {
        let _ = write!(md, " {} |", t.label());
    }
    md.push_str(" beamredir / kubectl |");
    if tools.contains(&Tool::BeamredirNoSpares) {
        md.push_str(" no spares / kubectl |");
    }
    md.push_str("\n|---:|---|");
    md.push_str(&"---:|".repeat(tools.len() + 1 + usize::from(tools.contains(&Tool::BeamredirNoSpares))));
    md.push('\n');
    for &rtt in &r.config.rtts_ms {
        for f in Figure::ALL {
            let _ = write!(md, "| {rtt} ms | {} |", f.label());
            for &t in tools {
                let _ = write!(md, " {} |", cell(f, Spread::of(&r.values(rtt, t, f))));
            }
            let _ = write!(md, " **{:.2}×**{} |", r.ratio(rtt, Tool::Beamredir, f), if r.wins(rtt, f) { "" } else { " ✗" });
            if tools.contains(&Tool::BeamredirNoSpares) {
                let _ = write!(md, " {:.2}× |", r.ratio(rtt, Tool::BeamredirNoSpares, f));
            }
            md.push('\n');
        }
    }
    md
}

pub fn verdict(r: &Results) -> String {
    let met = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let losses: Vec<String> = r
        .config
        .rtts_ms
        .iter()
        .flat_map(|&rtt| Figure::ALL.iter().filter(move |&&f| !r.wins(rtt, f)).map(move |&f| format!("{} at {rtt} ms ({:.2}×)", f.key(), r.ratio(rtt, Tool::Beamredir, f))))
        .collect();
    let ttfb: Vec<(u32, f64)> = r
        .config
        .rtts_ms
        .iter()
        .filter(|&&rtt| rtt > 0)
        .map(|&rtt| (rtt, report::median(&r.values(rtt, Tool::Beamredir, Figure::Ttfb)) / (f64::from(rtt) * 1e6)))
        .collect();
    let mut v = format!(
        "Target, beamredir at least as fast as the kubectl recipe on every figure at every RTT: {}{}. Target, a warm connection's first byte within {TARGET_TTFB_RTTS} RTT of `connect()`: {} ({}).",
        met(losses.is_empty()),
        if losses.is_empty() { String::new() } else { format!(" (slower: {})", losses.join(", ")) },
        if ttfb.is_empty() { "not measured (no RTT above 0)" } else { met(ttfb.iter().all(|&(_, x)| x <= TARGET_TTFB_RTTS)) },
        ttfb.iter().map(|(rtt, x)| format!("{x:.2} RTT at {rtt} ms")).collect::<Vec<_>>().join(", "),
    );
    if r.config.smoke {
        v.push_str(" (Smoke run: too short to mean anything.)");
    }
    v
}

pub fn markdown(r: &Results, svg_latency: &str, svg_throughput: &str) -> String {
    let mut s = String::from("## beamredir against the kubectl recipe, over a link with latency\n\n");
    let _ = writeln!(s, "{}.\n", r.config.describe());
    s.push_str(
        "Each tool runs in a workstation namespace of its own that reaches the same simulated API server (and the same \
         pods) through a delay relay: every chunk is held RTT/2 in each direction, and a connection's first bytes one RTT \
         more (its TCP handshake). *beamredir up*: `beamredir up --pod tunnel-0 --pod erl-0`, clients started in the \
         session. *kubectl recipe*: `kubectl port-forward` for each pod plus a DNAT rule per port, a route to the pod \
         IP and `route_localnet=1`, clients dialling the pod IP. *no spare connections*: beamredir with \
         `BEAMREDIR_NET_SPARE_CONNECTIONS=0`, i.e. without the API-server connections it opens ahead of need (what every \
         forwarded connection cost before). First byte: `connect()` to the tunnel pod's server, which greets as it \
         accepts, until that byte arrives. Ping: a fresh hidden node `bench@127.0.0.1` pings `app@POD_IP` (epmd lookup, \
         distribution connection and handshake). rpc: `rpc:call(Node, erlang, node, [])` on that connection. \
         Throughput: bytes to the pod's sink, acknowledged. Cells: median over the rounds [min–max]; ratios \
         beamredir/kubectl paired by round (< 1 is faster for times, > 1 for throughput; ✗ marks a loss).\n\n",
    );
    s.push_str(&markdown_table(r));
    s.push('\n');
    s.push_str(&verdict(r));
    let _ = write!(s, "\n\n![latency against RTT]({svg_latency})\n\n![throughput against RTT]({svg_throughput})\n");
    s
}

pub fn json(r: &Results) -> Value {
    let mut summary = json!({});
    for &rtt in &r.config.rtts_ms {
        for f in Figure::ALL {
            let mut o = json!({});
            for &t in &r.config.tools {
                o[t.key()] = Spread::of(&r.values(rtt, t, f)).json();
                if t != Tool::Kubectl {
                    o[format!("ratio_{}_to_kubectl", t.key())] = json!(r.ratio(rtt, t, f));
                }
            }
            o["beamredir_wins"] = json!(r.wins(rtt, f));
            summary[format!("{rtt}ms")][f.key()] = o;
        }
    }
    json!({
        "config": r.config.json(),
        "target_ttfb_rtts": TARGET_TTFB_RTTS,
        "summary": summary,
        "repetitions": r.measurements.iter().map(|m| json!({
            "rtt_ms": m.rtt_ms, "tool": m.tool.key(), "figure": m.figure.key(), "rep": m.rep, "value": m.value, "client": m.client,
        })).collect::<Vec<_>>(),
    })
}

/// A tool's name in a legend (which has room for about 30 characters).
fn short_label(t: Tool) -> &'static str {
    match t {
        Tool::Beamredir => "beamredir",
        Tool::BeamredirNoSpares => "beamredir, no spares",
        Tool::Kubectl => "kubectl recipe",
    }
}

fn tool_style(t: Tool) -> Option<&'static str> {
    match t {
        Tool::Beamredir => None,
        Tool::BeamredirNoSpares => Some("2 3"),
        Tool::Kubectl => Some("8 4"),
    }
}

fn subtitle(r: &Results, machine: &Machine) -> String {
    format!(
        "{} rounds{}; Linux {}, {} × {}",
        r.config.reps,
        if r.config.smoke { " (smoke run)" } else { "" },
        machine.kernel,
        machine.nproc,
        machine.cpu_model
    )
}

/// A series per (figure, tool) against RTT: a colour and marker per figure, a dash per tool;
/// values divided by `unit`.
fn series_against_rtt(r: &Results, figures: &[(Figure, &str, &'static str, Marker)], unit: f64) -> Vec<Series> {
    let mut series = Vec::new();
    for &(f, name, color, marker) in figures {
        for &t in &r.config.tools {
            series.push(Series {
                name: format!("{name}: {}", short_label(t)),
                color,
                dash: tool_style(t),
                marker,
                points: r
                    .config
                    .rtts_ms
                    .iter()
                    .map(|&rtt| {
                        let s = Spread::of(&r.values(rtt, t, f));
                        Point { x: f64::from(rtt), y: s.median / unit, lo: s.min / unit, hi: s.max / unit }
                    })
                    .collect(),
            });
        }
    }
    series
}

/// Times against RTT: first byte, ping, rpc.
pub fn plot_latency(r: &Results, machine: &Machine) -> String {
    let figures = [
        (Figure::Ttfb, "first byte", "#1f6fd1", Marker::Square),
        (Figure::Ping, "ping", "#d1341f", Marker::Triangle),
        (Figure::Rpc, "rpc", "#2a9d3a", Marker::Circle),
    ];
    plot::svg(&Chart {
        title: "beamredir vs the kubectl recipe: latency against the API server's RTT".into(),
        subtitle: subtitle(r, machine),
        x_label: "RTT between workstation and API server (ms)".into(),
        y_label: "time (ms, log scale)".into(),
        x_log: false,
        y_log: true,
        series: series_against_rtt(r, &figures, 1e6),
    })
}

/// Throughput against RTT, 1 and 16 streams.
pub fn plot_throughput(r: &Results, machine: &Machine) -> String {
    let figures = [(Figure::Stream1, "1 stream", "#1f6fd1", Marker::Square), (Figure::Streams16, "16 streams", "#7a3fb0", Marker::Diamond)];
    let series = series_against_rtt(r, &figures, f64::from(1u32 << 20));
    plot::svg(&Chart {
        title: "beamredir vs the kubectl recipe: throughput against the API server's RTT".into(),
        subtitle: subtitle(r, machine),
        x_label: "RTT between workstation and API server (ms)".into(),
        y_label: "throughput to the pod (MiB/s)".into(),
        x_log: false,
        y_log: false,
        series,
    })
}
