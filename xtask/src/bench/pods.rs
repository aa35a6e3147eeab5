//! Benchmark 5: many pods at once over a slow link. `beamredir up --statefulset` over 1, 10 and
//! 20 pods (small Erlang nodes, all Ready), with the API server behind a delay relay of 80 ms
//! round trip (the simulated cluster's `ApiAccess::Delayed`). Measured: from spawning `beamredir
//! up` until `status` shows the session running with every pod's epmd and distribution port
//! redirected (polled every 20 ms, one `beamredir status --json` per poll). Sizes run
//! round-robin, one fresh session each.
use std::{fmt::Write as _, process::Stdio, thread, time::Duration, time::Instant};

use anyhow::{Context, Result, bail};
use beamredir_testbed::{
    Graceful, TempDir,
    cluster::{ApiAccess, SimCluster},
    unique,
};
use serde_json::{Value, json};

use super::{BenchArgs, check_interrupted, report::Spread};

#[derive(Clone, Debug)]
pub struct Config {
    pub smoke: bool,
    pub reps: u32,
    pub sizes: Vec<u32>,
    pub rtt: Duration,
}

impl Config {
    pub fn new(args: &BenchArgs) -> Self {
        let rtt = Duration::from_millis(80);
        if args.smoke {
            Config {
                smoke: true,
                reps: 1,
                sizes: vec![1, 2],
                rtt,
            }
        } else {
            Config {
                smoke: false,
                reps: args.reps.unwrap_or(5).min(10),
                sizes: vec![1, 10, 20],
                rtt,
            }
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} round(s) of `beamredir up --statefulset` over {} pods, {} ms round trip to the API server{}",
            self.reps,
            self.sizes
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            self.rtt.as_millis(),
            if self.smoke {
                " [smoke: measures nothing useful]"
            } else {
                ""
            }
        )
    }
}

pub struct Results {
    pub config: Config,
    /// (pods, round, ms)
    pub measurements: Vec<(u32, u32, f64)>,
}

/// A StatefulSet of `n` small Erlang nodes, all started at once.
fn statefulset(n: u32) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: p{n}, namespace: default}}
spec:
  serviceName: p{n}
  replicas: {n}
  podManagementPolicy: Parallel
  selector: {{matchLabels: {{app: p{n}}}}}
  template:
    metadata: {{labels: {{app: p{n}}}}}
    spec:
      containers:
        - name: app
          command: ["erl"]
          args: ["+S", "1:1", "+A", "1", "-name", "app@$(HOST)", "-setcookie", "bench", "-noshell", "-noinput",
                 "-kernel", "inet_dist_listen_min", "9000", "inet_dist_listen_max", "9000"]
          env: [{{name: HOST, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}]
          ports: [{{name: epmd, containerPort: 4369}}, {{name: erlang, containerPort: 9000}}]
"#
    )
}

fn one(cluster: &SimCluster, n: u32) -> Result<f64> {
    let state = TempDir::new("brbpods")?;
    let session = unique("pods");
    let started = Instant::now();
    let child = cluster
        .beamredir(state.path())
        .args([
            "-q",
            "up",
            "--statefulset",
            &format!("p{n}"),
            "--session",
            &session,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting beamredir up")?;
    let mut up = Graceful(child);
    loop {
        check_interrupted()?;
        if let Ok(Some(st)) = up.0.try_wait() {
            bail!("beamredir up over {n} pods exited: {st}");
        }
        if let Some(s) = cluster.session_status(state.path(), &session) {
            let redirects = s["redirects"].as_array().map_or(0, Vec::len);
            if s["state"] == "running" && redirects == 2 * n as usize {
                return Ok(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("beamredir up over {n} pods: not every pod redirected within 120 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub fn run(cfg: &Config) -> Result<Results> {
    let manifest = cfg
        .sizes
        .iter()
        .map(|n| statefulset(*n))
        .collect::<Vec<_>>()
        .join("\n---\n");
    let cluster = SimCluster::options()
        .api_access(ApiAccess::Delayed(cfg.rtt))
        .wait_ready(false)
        .start(&manifest)?;
    for n in &cfg.sizes {
        for i in 0..*n {
            check_interrupted()?;
            cluster.wait_ready("default", &format!("p{n}-{i}"), Duration::from_secs(300))?;
        }
    }
    let mut results = Results {
        config: cfg.clone(),
        measurements: Vec::new(),
    };
    // One untimed start-up first (page cache, the API server's first TLS handshakes).
    one(&cluster, cfg.sizes[0]).context("warm-up")?;
    for round in 0..cfg.reps {
        for n in &cfg.sizes {
            let ms = one(&cluster, *n).with_context(|| format!("{n} pods, round {}", round + 1))?;
            println!(
                "  {n:>2} pods, round {}/{}: ready in {ms:.0} ms",
                round + 1,
                cfg.reps
            );
            results.measurements.push((*n, round, ms));
        }
    }
    Ok(results)
}

impl Results {
    fn spread(&self, n: u32) -> Spread {
        Spread::of(
            &self
                .measurements
                .iter()
                .filter(|m| m.0 == n)
                .map(|m| m.2)
                .collect::<Vec<_>>(),
        )
    }
}

pub fn markdown_table(r: &Results) -> String {
    let mut md =
        String::from("| pods | spawn → every pod redirected, median [min–max] |\n|---:|---:|\n");
    for n in &r.config.sizes {
        let s = r.spread(*n);
        let _ = writeln!(
            md,
            "| {n} | {:.0} ms [{:.0}–{:.0}] |",
            s.median, s.min, s.max
        );
    }
    md
}

pub fn markdown(r: &Results) -> String {
    let mut s = String::from("## Many pods over a slow link\n\n");
    let _ = writeln!(s, "{}.\n", r.config.describe());
    s.push_str(
        "From spawning `beamredir up --statefulset` until `status` shows the session running with the epmd and \
         distribution ports of every pod redirected. Each pod costs a NAMES request and a node probe, each through \
         its own port-forward (a TCP connection, TLS and an upgrade through the delay relay); pods are brought up \
         concurrently.\n\n",
    );
    s.push_str(&markdown_table(r));
    if r.config.smoke {
        s.push_str("\n(Smoke run: too short to mean anything.)\n");
    }
    s
}

pub fn json(r: &Results) -> Value {
    json!({
        "config": {"smoke": r.config.smoke, "reps": r.config.reps, "sizes": r.config.sizes, "rtt_ms": r.config.rtt.as_millis() as u64},
        "summary": r.config.sizes.iter().map(|n| json!({"pods": n, "ready_ms": r.spread(*n).json()})).collect::<Vec<_>>(),
        "measurements": r.measurements.iter().map(|(n, round, ms)| json!({"pods": n, "round": round, "ready_ms": ms})).collect::<Vec<_>>(),
    })
}
