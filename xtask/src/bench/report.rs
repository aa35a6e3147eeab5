//! What every benchmark report shares: the machine it ran on, the Markdown page and the JSON
//! document that hold each benchmark's section, and number formatting.
use std::{process::Command, time::Duration};

use serde_json::{Value, json};

/// The machine a run happened on. Load averages are read before and after, because a busy
/// machine (another build on the same cores) moves the figures.
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub nproc: usize,
    pub date_utc: String,
    pub iptables: String,
    pub git_commit: String,
    pub loadavg_before: String,
    pub loadavg_after: String,
}

fn command_output(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

impl Machine {
    /// Reads everything but the closing load average (see [`Machine::finish`]).
    pub fn collect() -> Self {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let root = crate::workspace_root();
        let root = root.to_string_lossy();
        let mut git_commit = command_output("git", &["-C", &root, "rev-parse", "--short", "HEAD"]);
        let changes = command_output("git", &["-C", &root, "status", "--porcelain", "--untracked-files=no"]);
        if !changes.is_empty() && changes != "unknown" {
            git_commit.push_str(" (with uncommitted changes)");
        }
        Machine {
            kernel: command_output("uname", &["-r"]),
            cpu_model,
            nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            date_utc: command_output("date", &["-u", "+%Y-%m-%d %H:%M:%S UTC"]),
            iptables: command_output("iptables", &["--version"]),
            git_commit,
            loadavg_before: loadavg(),
            loadavg_after: String::new(),
        }
    }

    /// Records the load average at the end of the run.
    pub fn finish(mut self) -> Self {
        self.loadavg_after = loadavg();
        self
    }

    fn json(&self) -> Value {
        json!({
            "kernel": self.kernel,
            "cpu_model": self.cpu_model,
            "nproc": self.nproc,
            "date_utc": self.date_utc,
            "iptables": self.iptables,
            "git_commit": self.git_commit,
            "loadavg_before": self.loadavg_before,
            "loadavg_after": self.loadavg_after,
        })
    }

    fn markdown(&self) -> String {
        format!(
            "| | |\n|---|---|\n\
             | kernel | `{}` |\n| CPU | {} |\n| CPUs (nproc) | {} |\n| date | {} |\n\
             | iptables | {} |\n| beamredir commit | {} |\n| load average (1/5/15 min) before → after | {} → {} |\n",
            self.kernel,
            self.cpu_model,
            self.nproc,
            self.date_utc,
            self.iptables,
            self.git_commit,
            self.loadavg_before,
            self.loadavg_after
        )
    }
}

/// The whole Markdown report: a header, the machine, then each benchmark's section.
pub fn markdown(machine: &Machine, command: &str, elapsed: Duration, sections: &[String]) -> String {
    let mut md = String::from("# beamredir benchmarks\n\n");
    md.push_str(&format!(
        "Reproduce (as root, from the repository): `{command}` ({:.0} s for this run).\n\n",
        elapsed.as_secs_f64()
    ));
    md.push_str("## Machine\n\n");
    md.push_str(&machine.markdown());
    for s in sections {
        md.push('\n');
        md.push_str(s);
    }
    md
}

/// The whole JSON document: the machine, the command, and one key per benchmark.
pub fn json(machine: &Machine, command: &str, elapsed: Duration, benchmarks: Vec<(&str, Value)>) -> Value {
    let mut doc = json!({
        "machine": machine.json(),
        "command": command,
        "elapsed_s": (elapsed.as_secs_f64() * 10.0).round() / 10.0,
    });
    for (name, value) in benchmarks {
        doc[name] = value;
    }
    doc
}

/// Nanoseconds as microseconds with one decimal, e.g. `18.3 µs`.
pub fn us(ns: f64) -> String {
    format!("{:.1} µs", ns / 1000.0)
}

/// The median of some values (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Median, minimum and maximum of repetitions.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    pub fn of(values: &[f64]) -> Self {
        Spread {
            median: median(values),
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }

    pub fn json(&self) -> Value {
        json!({ "median": round1(self.median), "min": round1(self.min), "max": round1(self.max) })
    }

    /// `18.3 µs [17.9–19.0]`
    pub fn markdown(&self) -> String {
        format!("{} [{:.1}–{:.1}]", us(self.median), self.min / 1000.0, self.max / 1000.0)
    }
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        let s = Spread::of(&[5.0, 1.0, 3.0]);
        assert_eq!((s.median, s.min, s.max), (3.0, 1.0, 5.0));
    }
}
