//! Benchmark 2: throughput and latency of the tunnel, side by side:
//!
//! * **beamredir**: the client runs in a `beamredir up` session (`beamredir exec`) in the
//!   workstation namespace and dials `POD_IP:9100`; connect4 sends it to beamredir's local
//!   forward, which carries it over its own port-forward WebSocket (TLS) through the simulated
//!   API server, which dials 127.0.0.1:9100 inside the pod;
//! * **relay**: two plain TCP relays in a chain, the same hops (client → relay 1 → relay 2 →
//!   pod), no TLS, no WebSocket: what the path costs without beamredir's protocol;
//! * **direct**: a plain TCP connection over a veth to the pod: the floor.
//!
//! The client and the pod's server are `xtask/bench/tunnel_bench.c`. Three figures: bytes/s
//! with 1 stream and with 16 concurrent streams (to the pod, acknowledged by the server), and
//! round-trip times of 64-byte echoes on one connection. After one warm-up batch per case and
//! figure, rounds: in each, every figure runs its three cases back to back, in an order that
//! changes every round; ratios to the relay are paired by round.
use std::{fmt::Write as _, time::Duration};

use anyhow::{Context, Result, ensure};
use serde_json::{Value, json};

use super::{
    BenchArgs, check_interrupted,
    report::{self, Spread},
    sim::{Bed, TUNNEL_POD, TUNNEL_PORT, cpu_ticks, run_client, ticks_per_s},
};

/// Targets: beamredir ≥ 70% of the relay's throughput (issue 14; 50% before); round trips
/// within 2×.
const TARGET_THROUGHPUT: f64 = 0.7;
const TARGET_RTT: f64 = 2.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    Beamredir,
    Relay,
    Direct,
}

impl Case {
    const ALL: [Case; 3] = [Case::Beamredir, Case::Relay, Case::Direct];
    fn key(self) -> &'static str {
        match self {
            Case::Beamredir => "beamredir",
            Case::Relay => "relay",
            Case::Direct => "direct",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Figure {
    Stream1,
    Streams16,
    /// One stream from the pod (the other direction: beamredir reads the WebSocket).
    FromPod1,
    Rtt,
}

impl Figure {
    const ALL: [Figure; 4] = [Figure::Stream1, Figure::Streams16, Figure::FromPod1, Figure::Rtt];
    const THROUGHPUT: [Figure; 3] = [Figure::Stream1, Figure::Streams16, Figure::FromPod1];
    fn key(self) -> &'static str {
        match self {
            Figure::Stream1 => "throughput_1_stream",
            Figure::Streams16 => "throughput_16_streams",
            Figure::FromPod1 => "throughput_1_stream_from_pod",
            Figure::Rtt => "rtt_64_bytes",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Figure::Stream1 => "throughput to the pod, 1 stream",
            Figure::Streams16 => "throughput to the pod, 16 streams",
            Figure::FromPod1 => "throughput from the pod, 1 stream",
            Figure::Rtt => "64-byte round trip",
        }
    }
}

/// The six orders of three cases: each case takes every position equally often.
const ORDERS: [[Case; 3]; 6] = [
    [Case::Beamredir, Case::Relay, Case::Direct],
    [Case::Relay, Case::Direct, Case::Beamredir],
    [Case::Direct, Case::Beamredir, Case::Relay],
    [Case::Beamredir, Case::Direct, Case::Relay],
    [Case::Direct, Case::Relay, Case::Beamredir],
    [Case::Relay, Case::Beamredir, Case::Direct],
];

#[derive(Clone, Debug)]
pub struct Config {
    pub smoke: bool,
    pub reps: u32,
    /// Bytes per throughput batch (split over the streams).
    pub bytes: u64,
    pub rtt_count: u32,
    pub rtt_warmup: u32,
    pub rtt_size: u32,
}

impl Config {
    pub fn new(args: &BenchArgs) -> Self {
        if args.smoke {
            Config { smoke: true, reps: args.reps.unwrap_or(1).min(2), bytes: 4 << 20, rtt_count: 200, rtt_warmup: 20, rtt_size: 64 }
        } else {
            Config { smoke: false, reps: args.reps.unwrap_or(10).min(20), bytes: 256 << 20, rtt_count: 5000, rtt_warmup: 500, rtt_size: 64 }
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} rounds; throughput: {} MiB per batch; round trips: {} × {} bytes per batch after {} untimed{}",
            self.reps,
            self.bytes >> 20,
            self.rtt_count,
            self.rtt_size,
            self.rtt_warmup,
            if self.smoke { " [smoke: measures nothing useful]" } else { "" }
        )
    }

    fn json(&self) -> Value {
        json!({"smoke": self.smoke, "reps": self.reps, "bytes": self.bytes, "rtt_count": self.rtt_count, "rtt_warmup": self.rtt_warmup, "rtt_size": self.rtt_size})
    }
}

pub struct Measurement {
    pub figure: Figure,
    pub case: Case,
    pub rep: u32,
    pub client: Value,
}

pub struct Results {
    pub config: Config,
    pub measurements: Vec<Measurement>,
}

fn client(bed: &Bed, case: Case, figure: Figure, cfg: &Config) -> Result<Value> {
    let mut cmd = match case {
        Case::Beamredir => bed.session.exec(&bed.tunnel_bench),
        Case::Relay => bed.relay_ns.command(&bed.tunnel_bench),
        Case::Direct => bed.direct.command(&bed.tunnel_bench),
    };
    let target = match case {
        Case::Relay => format!("127.0.0.1:{}", bed.relay_port),
        Case::Beamredir | Case::Direct => format!("{}:{TUNNEL_PORT}", bed.tunnel_ip),
    };
    match figure {
        Figure::Stream1 | Figure::Streams16 | Figure::FromPod1 => {
            let streams = if figure == Figure::Streams16 { 16 } else { 1 };
            cmd.args(["throughput", "--target", &target, "--streams", &streams.to_string(), "--bytes", &cfg.bytes.to_string()]);
            if figure == Figure::FromPod1 {
                cmd.args(["--from-pod", "1"]);
            }
        }
        Figure::Rtt => {
            cmd.args(["rtt", "--target", &target, "--count", &cfg.rtt_count.to_string(), "--warmup", &cfg.rtt_warmup.to_string()])
                .args(["--size", &cfg.rtt_size.to_string()]);
        }
    }
    cmd.args(["--timeout-s", "60"]);
    // Throughput: the CPU time each process on the path used, from /proc (robust to whatever
    // else runs on the machine, unlike the bytes per second).
    let processes = if figure == Figure::Rtt { Vec::new() } else { cpu_processes(bed, case) };
    let before: Vec<u64> = processes.iter().map(|(_, pids)| pids.iter().map(|&p| cpu_ticks(p)).sum()).collect();
    let mut v = run_client(&mut cmd, Duration::from_secs(90)).with_context(|| {
        format!("{} {} (beamredir up said: {}; status: {:?})", case.key(), figure.key(), bed.session.log(), bed.session.status())
    })?;
    if !processes.is_empty() {
        let mut cpu = json!({ "client": v["cpu_s"].as_f64() });
        for ((name, pids), b) in processes.iter().zip(before) {
            let after: u64 = pids.iter().map(|&p| cpu_ticks(p)).sum();
            cpu[*name] = json!(after.saturating_sub(b) as f64 / ticks_per_s());
        }
        v["cpu"] = cpu;
    }
    Ok(v)
}

/// The processes on a case's path besides the client, by role: beamredir (the `up` process and
/// its network part), the simulated API server (this process: it runs in xtask), the relays, the
/// pod's server.
fn cpu_processes(bed: &Bed, case: Case) -> Vec<(&'static str, Vec<u32>)> {
    let server: Vec<u32> = bed.cluster.container_pid(TUNNEL_POD, "server").into_iter().collect();
    let mut v = match case {
        Case::Beamredir => vec![("beamredir", vec![bed.session.pid]), ("api_server", vec![std::process::id()])],
        Case::Relay => vec![("relays", bed._relays.iter().map(|r| r.pid).collect())],
        Case::Direct => vec![],
    };
    v.push(("pod_server", server));
    v
}

/// The roles of [`cpu_processes`], in table order.
const CPU_ROLES: [&str; 5] = ["client", "beamredir", "api_server", "relays", "pod_server"];

pub fn run(cfg: &Config, bed: &Bed) -> Result<Results> {
    let mut results = Results { config: cfg.clone(), measurements: Vec::new() };
    for figure in Figure::ALL {
        for case in Case::ALL {
            check_interrupted()?;
            client(bed, case, figure, cfg).context("warm-up")?;
        }
    }
    for rep in 0..cfg.reps {
        let mut line = format!("  round {:>2}/{}", rep + 1, cfg.reps);
        for k in 0..Figure::ALL.len() {
            let figure = Figure::ALL[(rep as usize + k) % Figure::ALL.len()];
            for &case in &ORDERS[(rep as usize + k) % ORDERS.len()] {
                check_interrupted()?;
                let v = client(bed, case, figure, cfg)?;
                ensure!(v["mode"].is_string(), "client answered {v}");
                results.measurements.push(Measurement { figure, case, rep, client: v });
            }
        }
        let s = summarize(&results);
        for f in Figure::ALL {
            let _ = write!(line, "  {}: {}", f.key(), Case::ALL.map(|c| s.short(f, c)).join(" / "));
        }
        if cfg.reps <= 10 || (rep + 1) % 5 == 0 || rep + 1 == cfg.reps {
            println!("{line}");
        }
    }
    Ok(results)
}

/// Per figure and case: the values of each round.
struct Summary<'a> {
    r: &'a Results,
}

fn summarize(r: &Results) -> Summary<'_> {
    Summary { r }
}

impl Summary<'_> {
    fn values(&self, f: Figure, c: Case, key: &str) -> Vec<f64> {
        self.r.measurements.iter().filter(|m| m.figure == f && m.case == c).map(|m| m.client[key].as_f64().unwrap_or(f64::NAN)).collect()
    }

    fn get(&self, f: Figure, c: Case, rep: u32, key: &str) -> Option<f64> {
        self.r.measurements.iter().find(|m| m.figure == f && m.case == c && m.rep == rep).and_then(|m| m.client[key].as_f64())
    }

    fn key(f: Figure) -> &'static str {
        if f == Figure::Rtt { "p50_ns" } else { "bytes_per_s" }
    }

    /// Ratios of case `c` over case `base`, paired by round.
    fn ratios(&self, f: Figure, c: Case, base: Case, key: &str) -> Vec<f64> {
        (0..self.r.config.reps).filter_map(|rep| Some(self.get(f, c, rep, key)? / self.get(f, base, rep, key)?)).collect()
    }

    fn ratio(&self, f: Figure, c: Case, base: Case, key: &str) -> f64 {
        report::median(&self.ratios(f, c, base, key))
    }

    fn short(&self, f: Figure, c: Case) -> String {
        let v = report::median(&self.values(f, c, Self::key(f)));
        if f == Figure::Rtt { report::us(v) } else { mib_s(v) }
    }
}

fn mib_s(bytes_per_s: f64) -> String {
    format!("{:.0} MiB/s", bytes_per_s / (1 << 20) as f64)
}

fn mib_spread(s: Spread) -> String {
    let m = (1 << 20) as f64;
    format!("{:.0} MiB/s [{:.0}–{:.0}]", s.median / m, s.min / m, s.max / m)
}

pub fn markdown_table(r: &Results) -> String {
    let s = summarize(r);
    let mut md = String::from(
        "| figure | beamredir (port-forward via API server) | plain relay, 2 hops | direct TCP | beamredir / relay | beamredir / direct |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for f in Figure::THROUGHPUT {
        let cell = |c| mib_spread(Spread::of(&s.values(f, c, "bytes_per_s")));
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | **{:.2}×** | {:.2}× |",
            f.label(),
            cell(Case::Beamredir),
            cell(Case::Relay),
            cell(Case::Direct),
            s.ratio(f, Case::Beamredir, Case::Relay, "bytes_per_s"),
            s.ratio(f, Case::Beamredir, Case::Direct, "bytes_per_s"),
        );
    }
    for (label, key) in [("p50", "p50_ns"), ("p99", "p99_ns")] {
        let cell = |c| Spread::of(&s.values(Figure::Rtt, c, key)).markdown();
        let _ = writeln!(
            md,
            "| {}-byte round trip, {label} | {} | {} | {} | **{:.2}×** | {:.2}× |",
            r.config.rtt_size,
            cell(Case::Beamredir),
            cell(Case::Relay),
            cell(Case::Direct),
            s.ratio(Figure::Rtt, Case::Beamredir, Case::Relay, key),
            s.ratio(Figure::Rtt, Case::Beamredir, Case::Direct, key),
        );
    }
    md
}

/// CPU seconds per GiB moved, by process, median over the rounds (throughput figures only).
pub fn cpu_table(r: &Results) -> String {
    let mut md = String::from("| figure | case |");
    for role in CPU_ROLES {
        let _ = write!(md, " {} |", role.replace('_', " "));
    }
    md.push_str(" all |\n|---|---|");
    md.push_str(&"---:|".repeat(CPU_ROLES.len() + 1));
    md.push('\n');
    for f in Figure::THROUGHPUT {
        for c in Case::ALL {
            let ms: Vec<&Measurement> = r.measurements.iter().filter(|m| m.figure == f && m.case == c).collect();
            let per_gib = |m: &Measurement, role: &str| -> Option<f64> {
                let gib = m.client["bytes"].as_f64()? / (1u64 << 30) as f64;
                Some(m.client["cpu"][role].as_f64()? / gib)
            };
            let _ = write!(md, "| {} | {} |", f.label().trim_start_matches("throughput "), c.key());
            for role in CPU_ROLES {
                let v: Vec<f64> = ms.iter().filter_map(|m| per_gib(m, role)).collect();
                let _ = write!(md, " {} |", if v.is_empty() { "–".into() } else { format!("{:.2}", report::median(&v)) });
            }
            let all: Vec<f64> = ms.iter().map(|m| CPU_ROLES.iter().filter_map(|role| per_gib(m, role)).sum()).collect();
            let _ = writeln!(md, " **{:.2}** |", report::median(&all));
        }
    }
    md
}

pub fn verdict(r: &Results) -> String {
    let s = summarize(r);
    let t1 = s.ratio(Figure::Stream1, Case::Beamredir, Case::Relay, "bytes_per_s");
    let t16 = s.ratio(Figure::Streams16, Case::Beamredir, Case::Relay, "bytes_per_s");
    let from = s.ratio(Figure::FromPod1, Case::Beamredir, Case::Relay, "bytes_per_s");
    let p50 = s.ratio(Figure::Rtt, Case::Beamredir, Case::Relay, "p50_ns");
    let p99 = s.ratio(Figure::Rtt, Case::Beamredir, Case::Relay, "p99_ns");
    let met = |ok: bool| if ok { "**met**" } else { "**missed**" };
    let mut v = format!(
        "Targets: throughput to the pod ≥ {:.0}% of the relay's: {} (1 stream {:.0}%, 16 streams {:.0}%; from the pod, not a target: {:.0}%). Round trip within {TARGET_RTT}× of the relay's: {} (p50 {:.2}×, p99 {:.2}×).",
        TARGET_THROUGHPUT * 100.0,
        met(t1 >= TARGET_THROUGHPUT && t16 >= TARGET_THROUGHPUT),
        t1 * 100.0,
        t16 * 100.0,
        from * 100.0,
        met(p50 <= TARGET_RTT),
        p50,
        p99
    );
    if r.config.smoke {
        v.push_str(" (Smoke run: too short to mean anything.)");
    }
    v
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::from("## Tunnel throughput and latency: beamredir against a plain 2-hop relay and direct TCP\n\n");
    let _ = writeln!(s, "{}.\n", r.config.describe());
    s.push_str(
        "Throughput: bytes sent to the pod per second, timed from the moment every stream is set up until the server \
         has acknowledged the last byte; 16 streams share the bytes. From the pod: the server sends, timed until the \
         client has the last byte. Round trip: one connection, 64-byte echoes, \
         the per-batch p50 and p99. Each cell: median over the rounds [min–max]. Ratios: paired by round (the three \
         cases of a figure run back to back), then the median. Higher throughput and lower round trips are better.\n\n",
    );
    s.push_str(&markdown_table(r));
    s.push('\n');
    s.push_str(&verdict(r));
    s.push_str(
        "\n\nCPU seconds per GiB moved, by process (from /proc: user + system time of each process and its \
         children, over the batch; the client's own from getrusage). *api server* is the whole xtask process, which runs \
         the simulated API server and kubelet. The throughput above depends on what else runs on the machine; these \
         figures much less:\n\n",
    );
    s.push_str(&cpu_table(r));
    s.push_str(
        "\n\nHow: beamredir: `beamredir up --pod tunnel-0` in the simulated cluster's workstation namespace, the \
         client started in it with `beamredir exec`, dialling `POD_IP:9100` (connect4 → local forward → one TLS WebSocket \
         per connection to the simulated API server → 127.0.0.1:9100 inside the pod). Relay: `tunnel_bench relay` twice \
         in a namespace of its own, 127.0.0.1:R1 → 127.0.0.1:R2 → 127.0.0.1:9100 dialled inside the pod's namespace (a \
         thread per direction, 128 KiB reads). Direct: a namespace with a veth pair to the pod and a /32 route. Client \
         and server: `xtask/bench/tunnel_bench.c` (`cc -O2`).\n",
    );
    s
}

pub fn json(r: &Results) -> Value {
    let s = summarize(r);
    let mut summary = json!({});
    for f in Figure::ALL {
        let keys: &[&str] = if f == Figure::Rtt { &["p50_ns", "p99_ns"] } else { &["bytes_per_s"] };
        let mut o = json!({});
        for &key in keys {
            for c in Case::ALL {
                o[c.key()][key] = Spread::of(&s.values(f, c, key)).json();
            }
            o["ratio_beamredir_to_relay"][key] = json!(s.ratio(f, Case::Beamredir, Case::Relay, key));
            o["ratio_beamredir_to_direct"][key] = json!(s.ratio(f, Case::Beamredir, Case::Direct, key));
        }
        summary[f.key()] = o;
    }
    json!({
        "config": r.config.json(),
        "targets": {"throughput_ratio_min": TARGET_THROUGHPUT, "rtt_ratio_max": TARGET_RTT},
        "summary": summary,
        "repetitions": r.measurements.iter().map(|m| json!({"figure": m.figure.key(), "case": m.case.key(), "rep": m.rep, "client": m.client})).collect::<Vec<_>>(),
    })
}
