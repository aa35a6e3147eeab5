//! The real kubectl (1.32, /usr/bin/kubectl) against the simulated API server: its own
//! port-forward protocol (SPDY/3.1, tunnelled in WebSocket or plain), and the manual recipe
//! beamredir replaces (kubectl port-forward + route + route_localnet + iptables DNAT), end to
//! end with a real local Erlang node and no beamredir at all.
use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddrV4, TcpStream},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use beamredir_testbed::{
    TempDir,
    cluster::{EXAMPLE_MANIFEST, SimCluster},
    recipe::{KubectlRecipe, PortForward, free_local_ports, nat_output_rules, probe_local},
    run, wait_until,
};

/// The example's Elixir node plus a TCP echo on 7777, in pod app-0.
const ECHO_MANIFEST: &str = include_str!("../manifests/echo.yaml");
const ECHO_PORT: u16 = 7777;
const EPMD: u16 = 4369;
const DIST: u16 = 9000;

/// Sends 20 MiB through 127.0.0.1:`port` to the pod's echo while reading the echo back, then
/// half-closes; the echo must come back byte for byte, then EOF.
fn echo_20_mib(cluster: &SimCluster, port: u16) -> Result<()> {
    cluster.ws.in_ns(move || -> Result<()> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let data: Vec<u8> = (0..20 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        let mut conn = TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))?;
        conn.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut w = conn.try_clone()?;
        let sent = data.clone();
        let writer = std::thread::spawn(move || -> std::io::Result<()> {
            w.write_all(&sent)?;
            w.shutdown(Shutdown::Write)
        });
        let mut got = Vec::with_capacity(data.len());
        let read = conn.read_to_end(&mut got);
        writer.join().expect("writer thread")?;
        read?;
        ensure!(got.len() == data.len(), "echoed {} of {} bytes", got.len(), data.len());
        ensure!(got == data, "the echo differs from what was sent");
        Ok(())
    })?
}

fn epmd_names(cluster: &SimCluster, port: u16) -> Result<String> {
    cluster.ws.in_ns(move || probe_local(port, true))
}

/// 20 MiB both ways through the echo port and EPMD NAMES through the epmd port, both in one
/// `kubectl port-forward pod/app-0` (so in one SPDY connection).
fn forward_and_check(cluster: &SimCluster, env: &[(&str, &str)]) -> Result<PortForward> {
    let locals = free_local_ports(cluster, 2)?;
    let pf = PortForward::start(cluster, "app-0", &[(locals[0], ECHO_PORT), (locals[1], EPMD)], env)?;
    echo_20_mib(cluster, locals[0]).with_context(|| pf.output())?;
    let names = epmd_names(cluster, locals[1])?;
    ensure!(names.contains("name app at port 9000"), "NAMES answered {names:?}; kubectl: {}", pf.output());
    Ok(pf)
}

#[test]
fn kubectl_port_forward_tunnelled_in_websocket_carries_20_mib_both_ways_and_epmd() -> Result<()> {
    let cluster = SimCluster::start(ECHO_MANIFEST)?;
    let mut pf = forward_and_check(&cluster, &[])?;
    // kubectl 1.32 asks for the tunnel first (WebSocket, GET) and got it.
    assert_eq!(cluster.spdy_connections(), (1, 0));
    assert_eq!(cluster.active_port_forwards(), 1);

    // Nothing listens on 9999 in the pod: the kubelet's error comes on the error stream, and
    // kubectl 1.32 then gives up the whole forward.
    let local = free_local_ports(&cluster, 1)?[0];
    let mut refused = PortForward::start(&cluster, "app-0", &[(local, 9999)], &[])?;
    let answer = cluster.ws.in_ns(move || probe_local(local, false))?;
    assert_eq!(answer, "");
    let status = refused.wait_exit(Duration::from_secs(30)).context("kubectl goes on after the error")?;
    let out = refused.output();
    assert!(!status.success(), "{out}");
    assert!(out.contains("error forwarding port 9999 to pod app-0") && out.contains("connection refused"), "{out}");
    assert!(out.contains("lost connection to pod"), "{out}");

    // SPDY connections are the API server's port-forwards: dropping them ends kubectl's.
    wait_until("the refused forward's connection to end", Duration::from_secs(10), || cluster.active_port_forwards() == 1)?;
    assert!(pf.is_running(), "{}", pf.output());
    assert_eq!(cluster.drop_port_forwards(), 1);
    assert!(pf.wait_exit(Duration::from_secs(30)).is_some(), "kubectl survived a dropped connection: {}", pf.output());
    assert!(pf.output().contains("lost connection to pod"), "{}", pf.output());
    Ok(())
}

#[test]
fn kubectl_port_forward_over_plain_spdy_when_the_tunnel_is_refused_or_switched_off() -> Result<()> {
    let cluster = SimCluster::start(ECHO_MANIFEST)?;
    // An API server before 1.30 answers the tunnel with an error: kubectl retries with POST.
    cluster.refuse_spdy_over_websocket(true);
    let pf = forward_and_check(&cluster, &[])?;
    assert_eq!(cluster.spdy_connections(), (0, 1), "{}", pf.output());
    drop(pf);
    // kubectl's own switch (honoured by 1.32): straight to POST, no WebSocket attempt.
    cluster.refuse_spdy_over_websocket(false);
    let audit_before = cluster.audit().len();
    let pf = forward_and_check(&cluster, &[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")])?;
    assert_eq!(cluster.spdy_connections(), (0, 2), "{}", pf.output());
    let forwards = cluster.audit()[audit_before..].iter().filter(|a| a.contains("pods/portforward")).count();
    assert_eq!(forwards, 1, "one port-forward request: {:?}", cluster.audit());
    Ok(())
}

/// What a local Erlang node prints after pinging and calling `node` through the pod address.
fn erl_through(cluster: &SimCluster, node: &str, home: &std::path::Path) -> Result<String> {
    let script = format!(
        "N = '{node}', Ping = net_adm:ping(N), Remote = rpc:call(N, erlang, node, []), \
         Sum = rpc:call(N, lists, sum, [lists:seq(1, 100)]), B = rand:bytes(1 bsl 20), \
         Back = rpc:call(N, erlang, iolist_to_binary, [B], 60000), \
         io:format(\"ping=~p remote=~p sum=~p big_ok=~p~n\", [Ping, Remote, Sum, Back =:= B]), halt()."
    );
    let out = run(cluster
        .ws
        .command("timeout")
        .args(["120", "erl", "-name", "debug@127.0.0.1", "-setcookie", "secret", "-hidden", "-noshell", "-eval", &script])
        .env("HOME", home))?;
    Ok(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The workstation's routes and addresses.
fn routes(cluster: &SimCluster) -> Result<String> {
    let ip = |args: &[&str]| -> Result<String> { Ok(String::from_utf8(run(Command::new("ip").args(["-n", cluster.ws.name()]).args(args))?.stdout)?) };
    Ok(ip(&["route", "show"])? + &ip(&["-4", "addr", "show"])?)
}

fn route_localnet(cluster: &SimCluster) -> Result<String> {
    let out = run(cluster.ws.command("sysctl").args(["-n", "net.ipv4.conf.all.route_localnet"]))?;
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

#[test]
fn the_seed_recipe_gets_a_local_erlang_node_to_the_pod_and_is_undone_on_drop() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let ip = cluster.pod_ip("app-0").context("pod IP")?;
    let (rules_before, routes_before, localnet_before) = (nat_output_rules(&cluster)?, routes(&cluster)?, route_localnet(&cluster)?);
    // Without the recipe the workstation has no route to the pod.
    let direct = cluster.ws.in_ns(move || TcpStream::connect_timeout(&SocketAddrV4::new(ip, EPMD).into(), Duration::from_secs(2)).map(|_| ()))?;
    assert_eq!(direct.unwrap_err().raw_os_error(), Some(libc::ENETUNREACH));
    let home = TempDir::new("brerl")?;
    {
        let recipe = KubectlRecipe::start(&cluster, "app-0", &[EPMD, DIST])?;
        assert_eq!(recipe.pod_ip, ip);
        let t = erl_through(&cluster, &format!("app@{ip}"), home.path())?;
        assert!(t.contains(&format!("ping=pong remote='app@{ip}' sum=5050 big_ok=true")), "{t}");
        // It took the DNAT rules, the route and the sysctl (no beamredir ran).
        assert_eq!(nat_output_rules(&cluster)?.len(), rules_before.len() + 2);
        assert!(routes(&cluster)?.contains(&format!("{ip} dev lo")));
        assert_eq!(route_localnet(&cluster)?, "1");
    }
    assert_eq!(nat_output_rules(&cluster)?, rules_before);
    assert_eq!(routes(&cluster)?, routes_before);
    assert_eq!(route_localnet(&cluster)?, localnet_before);
    let kubectl_left = run(Command::new("ip").args(["netns", "pids", cluster.ws.name()]))?;
    let left: Vec<String> = String::from_utf8_lossy(&kubectl_left.stdout)
        .lines()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{}/comm", pid.trim())).ok())
        .filter(|comm| comm.starts_with("kubectl"))
        .collect();
    assert!(left.is_empty(), "kubectl still running: {left:?}");
    Ok(())
}

#[test]
fn the_recipes_forward_does_not_recover_when_the_pod_is_deleted() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let mut recipe = KubectlRecipe::start(&cluster, "app-0", &[EPMD, DIST])?;
    let epmd_local = recipe.forward().local_port(EPMD).unwrap();
    assert!(epmd_names(&cluster, epmd_local)?.contains("name app at port 9000"));
    let fate = recipe.delete_pod_and_watch(&cluster, Duration::from_secs(5))?;
    // kubectl does not notice the pod went away...
    assert!(!fate.exited_by_itself, "{fate:?}");
    // ...the next connection through it reaches nothing (not the recreated pod)...
    assert!(!fate.answer.contains("name app"), "{fate:?}");
    assert_ne!(fate.new_pod_ip, Some(recipe.pod_ip));
    // ...and makes kubectl give up: the forward is gone until someone runs the recipe again.
    let status = fate.exit.with_context(|| format!("kubectl still running: {fate:?}"))?;
    assert!(!status.success(), "{fate:?}");
    assert!(fate.output.contains("error forwarding port 4369 to pod app-0") && fate.output.contains("lost connection to pod"), "{fate:?}");
    Ok(())
}
