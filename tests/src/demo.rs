//! The demo behind the README's first command (`cargo xtask demo`), also run by the tests:
//! a "pod" namespace runs `app@POD_IP`; a workstation namespace with no route to it runs a
//! local `erl` inside `beamredir map`, which pings and rpc-calls the pod node.
use std::process::Stdio;

use anyhow::{Result, ensure};

use crate::{COOKIE, TestBed};

/// Runs the demo, printing what happens; fails if the local node did not get through.
pub fn run() -> Result<()> {
    let bed = TestBed::start()?;
    let pod = &bed.pod;
    println!("== beamredir demo ==");
    println!("pod:          node {} in network namespace {} (its own epmd on 4369, dist port {})", pod.node, pod.ns.name(), pod.dist_port);
    println!("workstation:  network namespace {} with no route to {}", bed.ws.name(), pod.ip);
    println!("port-forwards (stand-ins): 127.0.0.1:{} -> pod:4369, 127.0.0.1:{} -> pod:{}", bed.epmd_relay.port, bed.dist_relay.port, pod.dist_port);
    let mappings = bed.mappings();
    println!("\n$ sudo beamredir map {} -- erl -name debug@127.0.0.1 -hidden -setcookie … -eval …", mappings.join(" "));
    let node = &pod.node;
    let script = format!(
        "io:format(\"net_adm:ping('{node}') -> ~p~n\", [net_adm:ping('{node}')]), \
         io:format(\"rpc:call('{node}', erlang, node, []) -> ~p~n\", [rpc:call('{node}', erlang, node, [])]), \
         io:format(\"rpc:call('{node}', erlang, system_info, [otp_release]) -> ~p~n\", [rpc:call('{node}', erlang, system_info, [otp_release])]), \
         halt()."
    );
    let out = crate::run(bed
        .beamredir()
        .args(["map", "--session", &crate::unique("demo")])
        .args(&mappings)
        .args(["--", "erl", "-name", "debug@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-eval", &script])
        .env("HOME", bed.erl_home())
        .stdin(Stdio::null()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    print!("{text}");
    ensure!(text.contains("-> pong"), "the local node did not reach the pod node");
    println!("\nThe local node reached {node} through the eBPF connect() redirect: no iptables, no route, only this session's processes redirected.");
    Ok(())
}
