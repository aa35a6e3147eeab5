//! What `up` prints once the session is up: the cluster and its pods (with readiness and the
//! nodes' names), and how to connect. The cookie is never printed, and the hints keep it out of
//! argv (where every local user can read it in /proc/PID/cmdline).
use std::fmt::Write as _;

use super::Up;
use crate::k8s::pod::PodTarget;

/// The cluster and pod lines.
pub fn pods(up: &Up) -> String {
    let c = &up.cluster;
    let mut out = format!(
        "  cluster   {} (from {}), namespace {}",
        c.url, c.source, c.namespace
    );
    if let Some(proxy) = &c.proxy {
        let _ = write!(out, ", through proxy {proxy}");
    }
    out.push('\n');
    let table = up.table.lock().unwrap();
    for name in table.names() {
        let entry = table.get(&name).expect("listed");
        match &entry.target {
            Some(t) => {
                let ips = t
                    .ips
                    .iter()
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                let ports = describe_ports(t, &entry.ports);
                let nodes = if entry.nodes.is_empty() {
                    String::new()
                } else {
                    format!("  node {}", entry.nodes.join(", "))
                };
                let _ = writeln!(
                    out,
                    "  pod       {name}  {ips}  {}  {ports}{nodes}",
                    if t.ready { "Ready" } else { "not Ready" }
                );
            }
            None => {
                let _ = writeln!(out, "  pod       {name}  -  {}", entry.state);
            }
        }
    }
    out.trim_end().to_string()
}

fn describe_ports(t: &PodTarget, ports: &std::collections::BTreeSet<u16>) -> String {
    let dist: Vec<String> = ports
        .iter()
        .filter(|p| t.epmdless || **p != t.epmd_port)
        .map(u16::to_string)
        .collect();
    let epmd = if t.epmdless {
        "no epmd".to_string()
    } else {
        format!("epmd {}", t.epmd_port)
    };
    format!(
        "{epmd}  dist {}",
        if dist.is_empty() {
            "?".into()
        } else {
            dist.join(",")
        }
    )
}

/// How to connect, for the first pod that is up.
pub fn hints(up: &Up) -> String {
    let table = up.table.lock().unwrap();
    let Some((name, entry)) = table.names().into_iter().find_map(|n| {
        table
            .get(&n)
            .filter(|e| e.target.is_some())
            .cloned()
            .map(|e| (n, e))
    }) else {
        return String::new();
    };
    let t = entry.target.as_ref().expect("filtered");
    let node = entry
        .nodes
        .first()
        .cloned()
        .unwrap_or_else(|| format!("NAME@{}", t.primary_ip()));
    let short = node
        .split_once('@')
        .is_some_and(|(_, host)| !host.contains('.') && host.parse::<std::net::IpAddr>().is_err());
    let (erl_mode, iex_mode) = if short {
        ("-sname debug", "--sname debug")
    } else {
        ("-name debug@127.0.0.1", "--name debug@127.0.0.1")
    };
    let mut out = String::from(
        "Connect (in the session: the command after `--`, `beamredir shell` or `beamredir exec`):\n",
    );
    let mut extra = String::new();
    if t.epmdless {
        if let Some((port, _)) = t.dist_port {
            // A node without epmd assumes every node listens on the same port.
            extra = format!(" -start_epmd false -erl_epmd_port {port}");
        }
    }
    let _ = writeln!(out, "  erl {erl_mode} -hidden{extra} -remsh {node}");
    let iex_extra = if extra.is_empty() {
        String::new()
    } else {
        format!(" --erl \"{}\"", extra.trim())
    };
    let _ = writeln!(out, "  iex {iex_mode} --hidden{iex_extra} --remsh {node}");
    out.push_str(
        "  -hidden: your node does not join the cluster (global would mesh it with every pod).\n",
    );
    if t.epmdless {
        out.push_str(
            "  The pod's node runs without epmd: the flags above make yours do the same.\n",
        );
    }
    // Not -args_file, --cookie, -setcookie or ERL_FLAGS: erlexec copies each into beam.smp's
    // argv, which every local user can read in /proc/PID/cmdline.
    out.push_str("  The cookie: keep it out of the command line (any user can read that): put it in ~/.erlang.cookie\n");
    out.push_str("  (mode 400 or 600: `(umask 077; printf %s \"$COOKIE\" > ~/.erlang.cookie)`), or in DIR/.erlang.cookie with HOME=DIR.\n");
    let _ = writeln!(
        out,
        "  Or let beamredir find the name and the cookie: sudo beamredir remsh {name}"
    );
    out.trim_end().to_string()
}
