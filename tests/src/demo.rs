//! The demo behind the README's first command (`cargo xtask demo`): a simulated Kubernetes
//! cluster runs docs/examples/statefulset.yaml (pod app-0, a real Elixir node with its own
//! IP and epmd); the workstation namespace reaches only the API server. `beamredir up --pod
//! app-0` port-forwards through the API server and redirects the pod IP, and a local `erl`
//! pings and rpc-calls the pod node. Then the same with nothing to look up: `beamredir rpc
//! app-0 EXPR` and `beamredir remsh app-0` (driven by a script: an expression, then out).
use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result, ensure};

use crate::{Interactive, TempDir, beamredir_bin, cluster::{EXAMPLE_MANIFEST, SimCluster}};

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

    println!("\nNo node name and no cookie to look up: both come from the pod.");
    for (shown, args) in [
        ("beamredir rpc app-0 'node().'", vec!["rpc", "app-0", "node()."]),
        ("beamredir rpc app-0 --elixir 'Enum.sum(1..10)'", vec!["rpc", "app-0", "--elixir", "Enum.sum(1..10)"]),
    ] {
        println!("\n$ {shown}");
        let out = cluster.beamredir(state.path()).args(&args).stdin(Stdio::null()).output()?;
        print!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        ensure!(out.status.success(), "`{shown}` failed");
    }
    println!("\n$ sudo beamredir remsh app-0");
    remsh(&cluster, &state, &node)?;
    println!("\nbeamredir asked the node its name, read the cookie from the pod's spec into a private file");
    println!("(never argv), and started iex hidden, with a name of its own, in a session of its own.");
    Ok(())
}

/// `beamredir remsh app-0` under `script` (the remote shell wants a terminal), a user typing
/// one expression, then leaving with Ctrl-G q.
fn remsh(cluster: &SimCluster, state: &TempDir, node: &str) -> Result<()> {
    let line = format!("'{}' remsh app-0", beamredir_bin().display());
    let mut shell = Interactive::spawn(
        cluster
            .ws
            .command("script")
            .args(["-qec", &line, "/dev/null"])
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("BEAMREDIR_STATE_DIR", state.path()),
    )?;
    let prompt = format!("iex({node})1>");
    let answered = shell.expect(&prompt, Duration::from_secs(90)).and_then(|_| {
        shell.send("{node(), System.get_env(\"HOSTNAME\"), System.version()}\n")?;
        shell.expect("\"app-0\"", Duration::from_secs(30))?;
        shell.send("\x07")?;
        shell.expect("-->", Duration::from_secs(10))
    });
    print!("{}", shell.output());
    answered?;
    shell.send("q\n")?;
    let code = shell.wait(Duration::from_secs(30))?;
    println!();
    ensure!(code == 0, "beamredir remsh exited with {code}");
    Ok(())
}
