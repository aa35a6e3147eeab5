//! End to end with real BEAM nodes: a local node in a beamredir session reaches `app@POD_IP`
//! through the connect4 rewrite and a relay standing in for the port-forward.
use std::{process::Stdio, time::Duration};

use anyhow::Result;
use beamredir_testbed::{COOKIE, Interactive, PodRuntime, TestBed, run};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn local_node_pings_and_rpcs_the_pod_node_while_local_epmd_keeps_working() -> Result<()> {
    let bed = TestBed::start()?;
    let pod_node = &bed.pod.node;
    let script = format!(
        "Ping = net_adm:ping('{pod_node}'), \
         Remote = rpc:call('{pod_node}', erlang, node, []), \
         {{ok, Local}} = erl_epmd:names({{127,0,0,1}}), \
         {{ok, Peer}} = rpc:call('{pod_node}', inet, getifaddrs, []), \
         io:format(\"ping=~p~nremote=~p~nlocal_epmd=~p~npod_has_ip=~p~n\", \
           [Ping, Remote, Local, lists:any(fun({{_, Opts}}) -> lists:member({{addr, {ip}}}, Opts) end, Peer)]), \
         halt().",
        ip = erlang_ip_tuple(bed.pod.ip)
    );
    let out = run(bed
        .beamredir()
        .args(["map", "--session", "erl"])
        .args(bed.mappings())
        .args(["--", "erl", "-name", "debug@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-eval", &script])
        .env("HOME", bed.erl_home())
        .stdin(Stdio::null()))?;
    let text = stdout(&out);
    assert!(text.contains("ping=pong"), "net_adm:ping through beamredir failed:\n{text}");
    assert!(text.contains(&format!("remote='{pod_node}'")), "rpc:call did not reach the pod node:\n{text}");
    // The local node registered with the workstation's own epmd on 127.0.0.1:4369, which
    // kept working next to the redirected pod epmd.
    assert!(text.contains("local_epmd=[{\"debug\","), "local epmd not usable:\n{text}");
    assert!(text.contains("pod_has_ip=true"), "rpc ran somewhere else than the pod:\n{text}");
    // Both relays carried traffic: the redirect went through the forwards.
    assert!(bed.epmd_relay.stats.connections.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    assert!(bed.dist_relay.stats.connections.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    Ok(())
}

/// 10.244.0.5 -> {10,244,0,5}
fn erlang_ip_tuple(ip: std::net::Ipv4Addr) -> String {
    format!("{{{}}}", ip.octets().map(|o| o.to_string()).join(","))
}

#[test]
fn iex_remsh_runs_an_expression_on_the_pod_node() -> Result<()> {
    let bed = TestBed::start_with(PodRuntime::Elixir)?;
    let pod_node = bed.pod.node.clone();
    // iex only honours --remsh on a terminal: `script` gives it a pty.
    let iex = format!("iex --name debug@127.0.0.1 --cookie {COOKIE} --hidden --remsh {pod_node}");
    let mut session = Interactive::spawn(
        bed.beamredir()
            .args(["map", "--session", "iex"])
            .args(bed.mappings())
            .args(["--", "script", "-qec", &iex, "/dev/null"])
            .env("HOME", bed.erl_home()),
    )?;
    session.expect(&format!("iex({pod_node})1>"), Duration::from_secs(60))?;
    session.send("IO.puts(\"REMOTE=\" <> Atom.to_string(node()))\n")?;
    session.expect(&format!("REMOTE={pod_node}"), Duration::from_secs(20))?;
    // Ctrl-G q leaves the remote shell without stopping the pod node.
    session.send("\x07")?;
    session.expect("-->", Duration::from_secs(10))?;
    session.send("q\n")?;
    assert_eq!(session.wait(Duration::from_secs(20))?, 0);
    // The pod node is still up.
    let names = run(bed.pod.ns.command("epmd").arg("-names"))?;
    assert!(String::from_utf8_lossy(&names.stdout).contains("name app at port"));
    Ok(())
}

#[test]
fn works_under_ip_netns_exec_where_no_cgroup2_is_mounted() -> Result<()> {
    let bed = TestBed::start()?;
    let pod_node = &bed.pod.node;
    let script = format!("io:format(\"ping=~p~n\", [net_adm:ping('{pod_node}')]), halt().");
    // `ip netns exec` remounts /sys: beamredir must mount cgroup2 privately and still work.
    let out = run(bed
        .ws
        .ip_netns_exec(beamredir_testbed::beamredir_bin())
        .args(["map", "--session", "ipnetns"])
        .args(bed.mappings())
        .args(["--", "erl", "-name", "debug@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-eval", &script])
        .env("BEAMREDIR_STATE_DIR", bed.state_dir.path())
        .env("HOME", bed.erl_home())
        .stdin(Stdio::null()))?;
    assert!(stdout(&out).contains("ping=pong"), "{}", stdout(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mounted one privately"));
    // The private mount point and the session's cgroup are gone again.
    let left: Vec<_> = std::fs::read_dir(bed.state_dir.path())?.filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert!(left.iter().all(|n| n == "home"), "left in the state dir: {left:?}");
    assert!(!beamredir_testbed::cgroup2_root()?.join("beamredir/ipnetns").exists());
    Ok(())
}
