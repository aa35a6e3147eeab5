//! Benchmark 3: Erlang distribution through beamredir against a direct route, side by side.
//! A local hidden node `bench@127.0.0.1` connects to the pod node `app@POD_IP` (pod erl-0),
//! then times `rpc:call(Node, erlang, node, [])` round trips (p50/p99) and a 64 MiB binary
//! each way (`rpc:call(Node, erlang, byte_size, [Bin])` to the pod, `binary:copy/2` on the
//! pod back). beamredir: the node runs in the `up` session (`beamredir exec`); direct: in the
//! namespace with a veth route to the pod. One node per batch; the two cases alternate, the
//! order flipping every round.
use std::{fmt::Write as _, time::Duration};

use anyhow::{Context, Result};
use beamredir_testbed::TempDir;
use serde_json::{Value, json};

use super::{
    BenchArgs, check_interrupted,
    report::{self, Spread},
    sim::{Bed, COOKIE, run_client},
};

const TARGET_RTT: f64 = 2.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    Beamredir,
    Direct,
}

impl Case {
    const ALL: [Case; 2] = [Case::Beamredir, Case::Direct];
    fn key(self) -> &'static str {
        match self {
            Case::Beamredir => "beamredir",
            Case::Direct => "direct",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub smoke: bool,
    pub reps: u32,
    pub calls: u32,
    pub warmup: u32,
    pub transfer_bytes: u64,
}

impl Config {
    pub fn new(args: &BenchArgs) -> Self {
        if args.smoke {
            Config { smoke: true, reps: args.reps.unwrap_or(1).min(2), calls: 50, warmup: 10, transfer_bytes: 1 << 20 }
        } else {
            Config { smoke: false, reps: args.reps.unwrap_or(8).min(20), calls: 2000, warmup: 200, transfer_bytes: 64 << 20 }
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} rounds; per batch {} timed rpc:call round trips after {} untimed, and one {} MiB binary each way{}",
            self.reps,
            self.calls,
            self.warmup,
            self.transfer_bytes >> 20,
            if self.smoke { " [smoke: measures nothing useful]" } else { "" }
        )
    }
}

pub struct Measurement {
    pub case: Case,
    pub rep: u32,
    pub node: Value,
}

pub struct Results {
    pub config: Config,
    pub measurements: Vec<Measurement>,
}

/// The local node's program: prints one JSON line, then halts.
fn script(cfg: &Config, pod_ip: std::net::Ipv4Addr) -> String {
    format!(
        r#"Node = 'app@{pod_ip}',
pong = net_adm:ping(Node),
{timing}Size = {size},
Bin = binary:copy(<<7>>, Size),
1 = rpc:call(Node, erlang, byte_size, [<<1>>]),
Up = T(fun() -> Size = rpc:call(Node, erlang, byte_size, [Bin]) end),
Down = T(fun() -> Size = byte_size(rpc:call(Node, binary, copy, [<<7>>, Size])) end),
io:format("{{\"calls\":~b,\"min_ns\":~b,\"p50_ns\":~b,\"p99_ns\":~b,\"max_ns\":~b,\"transfer_bytes\":~b,\"to_pod_ns\":~b,\"from_pod_ns\":~b}}~n",
          [N, hd(Ts), P(50), P(99), lists:last(Ts), Size, Up, Down]),
halt()."#,
        timing = super::sim::erl_rpc_timing(cfg.warmup, cfg.calls),
        size = cfg.transfer_bytes,
    )
}

fn node(bed: &Bed, case: Case, cfg: &Config, home: &TempDir) -> Result<Value> {
    let mut cmd = match case {
        Case::Beamredir => bed.erl_session.exec(std::path::Path::new("erl")),
        Case::Direct => bed.direct.command("erl"),
    };
    cmd.args(["-name", "bench@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-noinput"])
        .args(["-eval", &script(cfg, bed.erl_ip)])
        .env("HOME", home.path());
    run_client(&mut cmd, Duration::from_secs(120))
        .with_context(|| format!("erlang {} (beamredir up said: {})", case.key(), bed.erl_session.log()))
}

pub fn run(cfg: &Config, bed: &Bed) -> Result<Results> {
    let home = TempDir::new("brbench-erl")?;
    let mut results = Results { config: cfg.clone(), measurements: Vec::new() };
    for case in Case::ALL {
        check_interrupted()?;
        node(bed, case, cfg, &home).context("warm-up")?;
    }
    for rep in 0..cfg.reps {
        let order = if rep % 2 == 0 { Case::ALL } else { [Case::Direct, Case::Beamredir] };
        let mut line = format!("  round {:>2}/{}", rep + 1, cfg.reps);
        for case in order {
            check_interrupted()?;
            let v = node(bed, case, cfg, &home)?;
            let _ = write!(
                line,
                "  {}: rpc p50 {} p99 {}, {} MiB up {:.0} ms down {:.0} ms",
                case.key(),
                report::us(v["p50_ns"].as_f64().unwrap_or(f64::NAN)),
                report::us(v["p99_ns"].as_f64().unwrap_or(f64::NAN)),
                cfg.transfer_bytes >> 20,
                v["to_pod_ns"].as_f64().unwrap_or(f64::NAN) / 1e6,
                v["from_pod_ns"].as_f64().unwrap_or(f64::NAN) / 1e6,
            );
            results.measurements.push(Measurement { case, rep, node: v });
        }
        println!("{line}");
    }
    Ok(results)
}

impl Results {
    fn values(&self, c: Case, key: &str) -> Vec<f64> {
        self.measurements.iter().filter(|m| m.case == c).map(|m| m.node[key].as_f64().unwrap_or(f64::NAN)).collect()
    }

    fn ratio(&self, key: &str) -> f64 {
        let get = |c: Case, rep: u32| self.measurements.iter().find(|m| m.case == c && m.rep == rep).and_then(|m| m.node[key].as_f64());
        report::median(&(0..self.config.reps).filter_map(|rep| Some(get(Case::Beamredir, rep)? / get(Case::Direct, rep)?)).collect::<Vec<_>>())
    }
}

fn ms(s: Spread) -> String {
    format!("{:.0} ms [{:.0}–{:.0}]", s.median / 1e6, s.min / 1e6, s.max / 1e6)
}

pub fn markdown_table(r: &Results) -> String {
    let mut md = String::from("| figure | beamredir | direct | beamredir / direct |\n|---|---:|---:|---:|\n");
    for (label, key) in [("`rpc:call` round trip, p50", "p50_ns"), ("`rpc:call` round trip, p99", "p99_ns")] {
        let cell = |c| Spread::of(&r.values(c, key)).markdown();
        let _ = writeln!(md, "| {label} | {} | {} | **{:.2}×** |", cell(Case::Beamredir), cell(Case::Direct), r.ratio(key));
    }
    let mib = r.config.transfer_bytes >> 20;
    for (label, key) in [("to the pod", "to_pod_ns"), ("from the pod", "from_pod_ns")] {
        let cell = |c| ms(Spread::of(&r.values(c, key)));
        let _ = writeln!(md, "| {mib} MiB binary {label} | {} | {} | {:.2}× |", cell(Case::Beamredir), cell(Case::Direct), r.ratio(key));
    }
    md
}

pub fn verdict(r: &Results) -> String {
    let (p50, p99) = (r.ratio("p50_ns"), r.ratio("p99_ns"));
    let mut v = format!(
        "Target, `rpc:call` round trips within {TARGET_RTT}× of direct: {} (p50 {p50:.2}×, p99 {p99:.2}×).",
        if p50 <= TARGET_RTT { "**met**" } else { "**missed**" }
    );
    if r.config.smoke {
        v.push_str(" (Smoke run: too short to mean anything.)");
    }
    v
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::from("## Erlang distribution: beamredir against a direct route\n\n");
    let _ = writeln!(s, "{}.\n", r.config.describe());
    s.push_str(
        "A hidden local node `bench@127.0.0.1` pings `app@POD_IP` (pod erl-0 of the simulated cluster), then times \
         `rpc:call(Node, erlang, node, [])` and a binary each way (`erlang:byte_size/1` of it on the pod; \
         `binary:copy/2` on the pod, returned). beamredir: the node runs in the `beamredir up` session (epmd lookup and \
         distribution connection both through port-forwards); direct: in a namespace with a veth route to the pod. \
         One fresh node per batch. Cells: median over the rounds [min–max]; ratios paired by round.\n\n",
    );
    s.push_str(&markdown_table(r));
    s.push('\n');
    s.push_str(&verdict(r));
    s.push('\n');
    s
}

pub fn json(r: &Results) -> Value {
    let mut summary = json!({});
    for key in ["p50_ns", "p99_ns", "to_pod_ns", "from_pod_ns"] {
        for c in Case::ALL {
            summary[key][c.key()] = Spread::of(&r.values(c, key)).json();
        }
        summary[key]["ratio_beamredir_to_direct"] = json!(r.ratio(key));
    }
    json!({
        "config": {"smoke": r.config.smoke, "reps": r.config.reps, "calls": r.config.calls, "warmup": r.config.warmup, "transfer_bytes": r.config.transfer_bytes},
        "target_rtt_ratio_max": TARGET_RTT,
        "summary": summary,
        "repetitions": r.measurements.iter().map(|m| json!({"case": m.case.key(), "rep": m.rep, "node": m.node})).collect::<Vec<_>>(),
    })
}
