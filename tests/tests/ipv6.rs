//! Issue: IPv6-only and dual-stack clusters. Real Elixir/Erlang nodes with `-proto_dist
//! inet6_tcp` in IPv6-only pods, dual-stack pods reached over either family, and the kernel
//! side's IPv6 translation (connect6/getpeername6 on native IPv6 pod endpoints).
use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    process::Stdio,
    time::Duration,
};

use anyhow::{Context, Result};
use beamredir_testbed::{
    TempDir,
    cluster::{IpFamily, SimCluster},
    cgroup2_root, bpftool_cgroup_programs, run, text, unique, wait_until,
};

const IPV6_MANIFEST: &str = include_str!("../manifests/ipv6-elixir.yaml");

/// A local Erlang node over IPv6 (`inet6_tcp`, long names) in an `up` session, running `script`.
fn inet6_node(script: &str) -> Vec<String> {
    ["erl", "-proto_dist", "inet6_tcp", "-name", "debug@localhost6.localdomain6", "-setcookie", "secret", "-hidden", "-noshell", "-eval", script]
        .map(String::from)
        .to_vec()
}

#[test]
fn an_inet6_node_in_an_ipv6_only_pod_is_reached_by_ip_and_by_fqdn() -> Result<()> {
    let cluster = SimCluster::options().ip_family(IpFamily::Ipv6).start(IPV6_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let ip = cluster.pod_ips("app-0")[0];
    assert!(ip.is_ipv6());
    let fqdn = "app@app-0.app.default.svc.cluster.local";
    let script = format!(
        "N = '{fqdn}', Ping = net_adm:ping(N), Remote = rpc:call(N, erlang, node, []), \
         B = rand:bytes(32 bsl 20), Back = rpc:call(N, erlang, iolist_to_binary, [B], 120000), \
         {{ok, Peer}} = rpc:call(N, inet, getaddr, [\"app-0.app.default.svc.cluster.local\", inet6]), \
         io:format(\"ping=~p remote=~p big_ok=~p pod_addr=~s~n\", [Ping, Remote, Back =:= B, inet:ntoa(Peer)]), halt()."
    );
    let out = run(cluster
        .beamredir(state.path())
        .args(["up", "--pod", "app-0", "--session", &unique("v6"), "--"])
        .args(inet6_node(&script))
        .env("HOME", state.path())
        .stdin(Stdio::null()))?;
    let t = text(&out);
    assert!(t.contains(&format!("ping=pong remote='{fqdn}' big_ok=true pod_addr={ip}")), "{t}");
    // The redirects are IPv6 pod endpoints to [::1] forwards.
    assert!(t.contains(&format!("redirect  [{ip}]:4369 -> [::1]:")), "{t}");
    Ok(())
}

#[test]
fn dual_stack_pods_are_reached_over_both_families_and_getpeername_reports_the_pod() -> Result<()> {
    let cluster = SimCluster::options().ip_family(IpFamily::DualStackV6Primary).start(IPV6_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let ips = cluster.pod_ips("app-0");
    let (v6, v4) = (ips[0], ips[1]);
    assert!(v6.is_ipv6() && v4.is_ipv4(), "{ips:?}");
    let session = unique("ds");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0"], &log)?;
    // The node is named by its DNS name, which the session's hosts file gives both addresses:
    // a local node using IPv4 (inet_tcp) and one using IPv6 (inet6_tcp) both reach it.
    let fqdn = "app@app-0.app.default.svc.cluster.local";
    let script = format!("io:format(\"ping=~p~n\", [net_adm:ping('{fqdn}')]), halt().");
    for (family, node) in [("inet_tcp", "debug@127.0.0.1"), ("inet6_tcp", "debug@localhost6.localdomain6")] {
        let out = run(cluster
            .beamredir(state.path())
            .args(["exec", "--session", &session, "--", "erl", "-proto_dist", family, "-name", node, "-setcookie", "secret", "-hidden", "-noshell", "-eval", &script])
            .env("HOME", state.path())
            .stdin(Stdio::null()))?;
        assert!(text(&out).contains("ping=pong"), "{family}: {}", text(&out));
    }
    // Over each family the pod's epmd answers through the redirect, and getpeername says the
    // pod's endpoint in that family, not the forward's.
    let probe = "import socket,sys; s=socket.create_connection((sys.argv[1], 4369)); print('peer', s.getpeername()[0], s.getpeername()[1]); s.sendall(b'\\x00\\x01n'); d=b''\nwhile True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\nprint(d[4:].decode())";
    for ip in [v6, v4] {
        let out = run(cluster.beamredir(state.path()).args(["exec", "--session", &session, "--", "python3", "-c", probe, &ip.to_string()]))?;
        let t = text(&out);
        assert!(t.contains(&format!("peer {ip} 4369")) && t.contains("name app at port 9000"), "{ip}: {t}");
    }
    let status = cluster.session_status(state.path(), &session).context("status")?;
    let pods: Vec<String> = status["redirects"].as_array().unwrap().iter().map(|r| r["pod"].as_str().unwrap().to_string()).collect();
    assert!(pods.contains(&format!("[{v6}]:4369")) && pods.contains(&format!("{v4}:4369")), "{pods:?}");
    Ok(())
}

#[test]
fn ipv6_redirects_only_the_session_and_end_with_the_process() -> Result<()> {
    let cluster = SimCluster::options().ip_family(IpFamily::Ipv6).start(IPV6_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let ip: IpAddr = cluster.pod_ips("app-0")[0];
    let session = unique("v6k");
    let log = state.path().join("up.log");
    let mut up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0"], &log)?;
    // Outside the session: the workstation has no route to the pod, so the normal error.
    let outside = cluster.ws.in_ns(move || TcpStream::connect_timeout(&SocketAddr::new(ip, 4369), Duration::from_secs(3)).map(|_| ()).map_err(|e| e.kind()))?;
    assert!(outside.is_err(), "a process outside the session reached {ip}");
    // UDP and an unmapped port on the pod IP pass through untouched (and so fail).
    let out = cluster.beamredir(state.path()).args(["exec", "--session", &session, "--", "python3", "-c",
        "import socket,sys\ntry:\n  socket.create_connection((sys.argv[1], 9999), timeout=3); print('connected')\nexcept OSError as e: print('refused', e.errno)", &ip.to_string()]).output()?;
    assert!(text(&out).contains("refused"), "{}", text(&out));
    // SIGKILL: the kernel detaches the programs, the reaper removes the cgroup.
    let cgroup = cgroup2_root()?.join("beamredir").join(&session);
    assert!(!bpftool_cgroup_programs(&cgroup)?.is_empty());
    up.0.kill()?;
    up.0.wait()?;
    wait_until("nothing attached and no cgroup", Duration::from_secs(10), || !cgroup.exists() || bpftool_cgroup_programs(&cgroup).is_ok_and(|p| p.is_empty()))?;
    wait_until("the reaper to remove the cgroup", Duration::from_secs(10), || !cgroup.exists())?;
    Ok(())
}
