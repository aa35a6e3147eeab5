//! The demo behind the README's first command (`cargo xtask demo`): a simulated Kubernetes
//! cluster runs docs/examples/statefulset.yaml (pod app-0, a real Elixir node with its own
//! IP and epmd); the workstation namespace reaches only the API server. `beamredir up --pod
//! app-0` port-forwards through the API server and redirects the pod IP, and a local `erl`
//! pings and rpc-calls the pod node.
use std::process::Stdio;

use anyhow::{Context, Result, ensure};

use crate::{TempDir, cluster::{EXAMPLE_MANIFEST, SimCluster}};

/// Runs the demo, printing what happens; fails if the local node did not get through.
pub fn run() -> Result<()> {
    println!("== beamredir demo: a local Erlang node joins a pod of a (simulated) Kubernetes cluster ==\n");
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brdemo")?;
    let ip = cluster.pod_ip("app-0").context("pod app-0 has no IP")?;
    let node = format!("app@{ip}");
    println!("API server {} (kubeconfig {}), reachable from workstation namespace {} only.", cluster.url, cluster.kubeconfig.display(), cluster.ws.name());
    println!("The workstation has no route to {ip}.\n");
    println!("$ kubectl get pods -o wide");
    let out = cluster.ws.command("kubectl").arg("--kubeconfig").arg(&cluster.kubeconfig).args(["get", "pods", "-o", "wide"]).output();
    match out {
        Ok(o) => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Err(e) => println!("(kubectl not available: {e})"),
    }
    let script = format!(
        "io:format(\"net_adm:ping('{node}') -> ~p~n\", [net_adm:ping('{node}')]), \
         io:format(\"rpc:call('{node}', erlang, node, []) -> ~p~n\", [rpc:call('{node}', erlang, node, [])]), \
         io:format(\"rpc:call('{node}', 'Elixir.System', version, []) -> ~p~n\", [rpc:call('{node}', 'Elixir.System', version, [])]), \
         halt()."
    );
    // The cookie stays out of every command line (README): the local node reads it from
    // $HOME/.erlang.cookie.
    let home = TempDir::new("brdemo-home")?;
    {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o400).open(home.path().join(".erlang.cookie"))?;
        f.write_all(b"secret")?;
    }
    println!("\n$ (umask 077; printf %s \"$COOKIE\" > ~/.erlang.cookie)");
    println!("$ sudo beamredir up --pod app-0 -- erl -name debug@127.0.0.1 -hidden -eval …");
    let out = cluster
        .beamredir(state.path())
        .args(["up", "--pod", "app-0", "--session", &crate::unique("demo"), "--"])
        .args(["erl", "-name", "debug@127.0.0.1", "-hidden", "-noshell", "-eval", &script])
        .env("HOME", home.path())
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    ensure!(out.status.success() && text.contains("-> pong"), "the local node did not reach {node}");
    println!("\nThe local node reached {node} through a WebSocket port-forward and the eBPF connect() redirect:");
    println!("no iptables, no route, only that session's processes redirected, nothing left behind.");
    Ok(())
}
