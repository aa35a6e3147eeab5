//! `beamredir up` against the simulated cluster: real WebSocket port-forwards through an
//! HTTPS API server, real BEAM nodes in pod namespaces, the eBPF redirect in a session.
use std::{
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result};
use beamredir_testbed::{
    Interactive, TempDir,
    cluster::{EXAMPLE_MANIFEST, SimCluster},
    run, text, unique, wait_until,
};

/// The cookie the example manifest gives its nodes.
const COOKIE: &str = "secret";

fn erl(script: &str) -> Vec<String> {
    ["erl", "-name", "debug@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-eval", script].map(String::from).to_vec()
}

#[test]
fn up_pod_pings_rpcs_and_round_trips_32_mib() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let node = format!("app@{}", cluster.pod_ip("app-0").context("pod IP")?);
    let script = format!(
        "N = '{node}', Ping = net_adm:ping(N), Remote = rpc:call(N, erlang, node, []), \
         B = rand:bytes(32 bsl 20), Back = rpc:call(N, erlang, iolist_to_binary, [B], 120000), \
         io:format(\"ping=~p remote=~p big_ok=~p size=~p~n\", [Ping, Remote, Back =:= B, byte_size(Back)]), halt()."
    );
    let out = run(cluster
        .beamredir(state.path())
        // kubectl's TYPE/NAME form works too.
        .args(["up", "--pod", "pod/app-0", "--session", &unique("up"), "--"])
        .args(erl(&script))
        .env("HOME", state.path())
        .stdin(Stdio::null()))?;
    let t = text(&out);
    assert!(t.contains(&format!("ping=pong remote='{node}' big_ok=true size=33554432")), "{t}");
    // The banner names the pod, its redirects and the exact command to connect.
    assert!(t.contains(&format!("pod       app-0  {}", cluster.pod_ip("app-0").unwrap())), "{t}");
    assert!(t.contains(&format!("--hidden --remsh {node}")), "{t}");
    assert!(!t.contains(COOKIE), "the banner must not print the cookie:\n{t}");
    // The bytes went through the API server's port-forward subresource.
    assert!(cluster.audit().iter().filter(|a| a.starts_with("create pods/portforward default/app-0")).count() >= 3);
    // Nothing is left: no record, socket, lock, inetrc or hosts file, no session cgroup.
    let left: Vec<_> = std::fs::read_dir(state.path())?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with(".erlang.cookie"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

#[test]
fn up_by_service_reaches_the_pods_behind_it() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let node = format!("app@{}", cluster.pod_ip("app-0").context("pod IP")?);
    let script = format!("io:format(\"ping=~p~n\", [net_adm:ping('{node}')]), halt().");
    let out = run(cluster
        .beamredir(state.path())
        .args(["up", "--service", "app", "--session", &unique("svc"), "--"])
        .args(erl(&script))
        .env("HOME", state.path())
        .stdin(Stdio::null()))?;
    assert!(text(&out).contains("ping=pong"), "{}", text(&out));
    Ok(())
}

#[test]
fn iex_remsh_through_up_runs_an_expression_on_the_pod_node() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let node = format!("app@{}", cluster.pod_ip("app-0").context("pod IP")?);
    let iex = format!("iex --name debug@127.0.0.1 --cookie {COOKIE} --hidden --remsh {node}");
    let mut session = Interactive::spawn(
        cluster
            .beamredir(state.path())
            .args(["up", "--pod", "app-0", "--session", &unique("iex"), "--", "script", "-qec", &iex, "/dev/null"])
            .env("HOME", state.path()),
    )?;
    session.expect(&format!("iex({node})1>"), Duration::from_secs(60))?;
    session.send("IO.puts(\"HOSTNAME=\" <> System.get_env(\"HOSTNAME\"))\n")?;
    session.expect("HOSTNAME=app-0", Duration::from_secs(20))?;
    session.send("\x07")?;
    session.expect("-->", Duration::from_secs(10))?;
    session.send("q\n")?;
    assert_eq!(session.wait(Duration::from_secs(20))?, 0);
    Ok(())
}

fn status_of(cluster: &SimCluster, state: &TempDir, session: &str) -> Option<serde_json::Value> {
    cluster.session_status(state.path(), session)
}

/// `erl` in the session: ping NODE, print the answer.
fn ping_in_session(cluster: &SimCluster, state: &TempDir, session: &str, ip: Ipv4Addr) -> Result<String> {
    let script = format!("io:format(\"ping=~p~n\", [net_adm:ping('app@{ip}')]), halt().");
    let out = cluster
        .beamredir(state.path())
        .args(["exec", "--session", session, "--"])
        .args(erl(&script))
        .env("HOME", state.path())
        .stdin(Stdio::null())
        .output()?;
    Ok(text(&out))
}

#[test]
fn pod_deleted_mid_session_comes_back_with_a_new_ip_and_new_connections_work() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let session = unique("churn");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0"], &log)?;
    let old_ip = cluster.pod_ip("app-0").unwrap();
    assert!(ping_in_session(&cluster, &state, &session, old_ip)?.contains("ping=pong"));

    cluster.delete_pod("app-0")?;
    let new_ip = wait_for_new_ip(&cluster, "app-0", old_ip)?;
    cluster.wait_ready("default", "app-0", Duration::from_secs(60))?;
    wait_until("the session to follow the new IP", Duration::from_secs(10), || {
        status_of(&cluster, &state, &session).is_some_and(|s| {
            let pods = &s["pods"];
            let redirects = s["redirects"].as_array().cloned().unwrap_or_default();
            let at = |ip: Ipv4Addr| redirects.iter().filter(|r| r["pod"].as_str().unwrap().starts_with(&format!("{ip}:"))).map(|r| r["local"].clone()).collect::<Vec<_>>();
            // The new address has both redirects; the old one, for a while, reaches the same
            // forwards (running nodes still resolve the pod's name to it until they re-read the
            // hosts file).
            pods[0]["ip"] == new_ip.to_string() && at(new_ip).len() == 2 && at(old_ip).iter().all(|l| at(new_ip).contains(l))
        })
    })
    .with_context(|| format!("status: {:#?}\nlog:\n{}", status_of(&cluster, &state, &session), std::fs::read_to_string(&log).unwrap_or_default()))?;
    let answer = ping_in_session(&cluster, &state, &session, new_ip)?;
    assert!(answer.contains("ping=pong"), "{answer}");
    let log_text = std::fs::read_to_string(&log)?;
    assert!(log_text.contains("pod default/app-0 is not running: it is being deleted; its redirects are removed until it runs again"), "{log_text}");
    assert!(log_text.contains(&format!("pod default/app-0 moved from {old_ip} to {new_ip}; redirects updated")), "{log_text}");
    Ok(())
}

fn wait_for_new_ip(cluster: &SimCluster, pod: &str, old: Ipv4Addr) -> Result<Ipv4Addr> {
    let mut ip = old;
    wait_until("the pod to come back with a new IP", Duration::from_secs(60), || {
        ip = cluster.pod_ip(pod).unwrap_or(old);
        ip != old
    })?;
    Ok(ip)
}

#[test]
fn one_dropped_stream_or_an_api_server_restart_does_not_kill_the_forward() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let session = unique("faults");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0"], &log)?;
    let ip = cluster.pod_ip("app-0").unwrap();

    // A connection held open through the dist forward (a TCP client in the session, waiting).
    let holder = "import socket,sys; s=socket.create_connection((sys.argv[1], 9000)); print('open', flush=True); d=s.recv(1); print('closed' if d==b'' else 'data', flush=True)";
    let held = Interactive::spawn(
        cluster.beamredir(state.path()).args(["exec", "--session", &session, "--", "python3", "-c", holder, &ip.to_string()]),
    )?;
    held.expect("open", Duration::from_secs(20))?;
    wait_until("the port-forward stream", Duration::from_secs(10), || cluster.active_port_forwards() >= 1)?;
    // Reset that stream (client-go#329): the held connection ends cleanly...
    assert!(cluster.drop_port_forwards() >= 1);
    held.expect("closed", Duration::from_secs(20))?;
    // ...and the forward keeps serving new connections.
    assert!(ping_in_session(&cluster, &state, &session, ip)?.contains("ping=pong"));

    // The API server goes away for a second; new connections work once it is back.
    cluster.restart_api_server(Duration::from_secs(1))?;
    let answer = ping_in_session(&cluster, &state, &session, ip)?;
    assert!(answer.contains("ping=pong"), "{answer}");
    // Many connections one after another (kubectl#1169: dead after the first): all served.
    let status = status_of(&cluster, &state, &session).unwrap();
    let epmd = status["redirects"].as_array().unwrap().iter().find(|r| r["pod"] == format!("{ip}:4369")).unwrap().clone();
    assert!(epmd["forward"]["total"].as_u64().unwrap() >= 2, "{status:#}");
    Ok(())
}

/// A local node's epmd lookup has beamredir open the distribution port-forward ahead of the
/// connection (carrier::Prepared). Here the lookup comes without a connection, and then the API
/// server restarts, which drops every connection, that prepared stream included. The next
/// node to connect must not be handed that dead stream: its ping gets pong.
#[test]
fn a_port_forward_prepared_before_an_api_server_restart_is_not_handed_out() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let session = unique("prep");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0"], &log)?;
    let ip = cluster.pod_ip("app-0").unwrap();
    assert!(ping_in_session(&cluster, &state, &session, ip)?.contains("ping=pong"));
    // PORT_PLEASE2_REQ for node "app", answered, and no connection follows.
    let lookup = "import socket,sys; s=socket.create_connection((sys.argv[1], 4369)); s.sendall(b'\\x00\\x04zapp'); print(s.recv(64)[:2])";
    let out = run(cluster.beamredir(state.path()).args(["exec", "--session", &session, "--", "python3", "-c", lookup, &ip.to_string()]))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "b'w\\x00'", "the pod's epmd knows app");
    // The prepared stream is open (it lives 3 s); the API server restarts meanwhile.
    std::thread::sleep(Duration::from_millis(300));
    cluster.restart_api_server(Duration::from_secs(1))?;
    let answer = ping_in_session(&cluster, &state, &session, ip)?;
    assert!(answer.contains("ping=pong"), "{answer}\nlog:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    Ok(())
}

#[test]
fn port_forward_errors_are_logged_with_pod_and_port_and_the_connection_closes_cleanly() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let session = unique("pferr");
    let log = state.path().join("up.log");
    // Nothing listens on 9999 in the pod: the kubelet reports it on the error channel.
    let _up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0", "--dist-port", "9999"], &log)?;
    let ip = cluster.pod_ip("app-0").unwrap();
    let probe = "import socket,sys; s=socket.create_connection((sys.argv[1], 9999), timeout=20); print('eof' if s.recv(1)==b'' else 'data')";
    let out = run(cluster.beamredir(state.path()).args(["exec", "--session", &session, "--", "python3", "-c", probe, &ip.to_string()]))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "eof");
    wait_until("the error in the log", Duration::from_secs(10), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("pod default/app-0 port 9999: error forwarding port 9999")
    })
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    let status = status_of(&cluster, &state, &session).unwrap();
    let dist = status["redirects"].as_array().unwrap().iter().find(|r| r["pod"] == format!("{ip}:9999")).unwrap().clone();
    assert_eq!(dist["forward"]["errors"], 1, "{status:#}");
    // The epmd forward next to it is unaffected.
    let names = "import socket,sys; s=socket.create_connection((sys.argv[1], 4369)); s.sendall(b'\\x00\\x01n'); d=b''\nwhile True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\nprint(d[4:].decode())";
    let out = run(cluster.beamredir(state.path()).args(["exec", "--session", &session, "--", "python3", "-c", names, &ip.to_string()]))?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("name app at port 9000"));
    Ok(())
}

/// Listening TCP ports in a namespace (to check nothing was left listening).
fn listening_ports(cluster: &SimCluster) -> Result<Vec<String>> {
    let out = run(cluster.ws.command("ss").args(["-Hltn"]))?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().nth(3).map(String::from)).collect())
}

#[test]
fn every_bad_kubernetes_input_gets_one_clear_line_and_leaves_nothing() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let dir = TempDir::new("brkc")?;
    let kubeconfig = std::fs::read_to_string(&cluster.kubeconfig)?;
    let port = cluster.url.rsplit(':').next().unwrap().to_string();
    // Variants of the kubeconfig: unreachable server, a CA that did not sign the server's cert, garbage.
    let unreachable = dir.path().join("unreachable");
    std::fs::write(&unreachable, kubeconfig.replace(&format!("127.0.0.1:{port}"), "127.0.0.1:1"))?;
    let wrong_ca = dir.path().join("wrong-ca");
    let other_ca = beamredir_testbed::cluster::pki::Pki::generate()?.ca_pem;
    let other_ca_b64 = base64_encode(other_ca.as_bytes());
    let ca_line = kubeconfig.lines().find(|l| l.contains("certificate-authority-data")).unwrap().to_string();
    std::fs::write(&wrong_ca, kubeconfig.replace(&ca_line, &format!("    certificate-authority-data: {other_ca_b64}")))?;
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "this: [is not: a kubeconfig")?;
    let listening_before = listening_ports(&cluster)?;
    let programs_before = beamredir_testbed::bpftool_cgroup_programs(&beamredir_testbed::cgroup2_root()?)?;
    let session = unique("bad");

    let cases: Vec<(Vec<String>, String)> = vec![
        (vec!["--pod".into(), "app-9".into()], "pod \"app-9\" not found in namespace \"default\"; did you mean app-0?".into()),
        (vec!["-n".into(), "nope".into(), "--pod".into(), "app-0".into()], "namespace \"nope\" not found".into()),
        (vec!["--context".into(), "nope".into(), "--pod".into(), "app-0".into()], "context \"nope\" not found in the kubeconfig (available: sim, sim-badtoken)".into()),
        (vec!["--kubeconfig".into(), "/nonexistent/kubeconfig".into(), "--pod".into(), "app-0".into()], "cannot read kubeconfig /nonexistent/kubeconfig".into()),
        (vec!["--kubeconfig".into(), garbage.display().to_string(), "--pod".into(), "app-0".into()], format!("cannot read kubeconfig {}", garbage.display())),
        (vec!["--kubeconfig".into(), unreachable.display().to_string(), "--pod".into(), "app-0".into()], "cannot reach the Kubernetes API server at https://127.0.0.1:1".into()),
        (vec!["--kubeconfig".into(), wrong_ca.display().to_string(), "--pod".into(), "app-0".into()], format!("TLS failure talking to the Kubernetes API server at https://127.0.0.1:{port}")),
        (vec!["--context".into(), "sim-badtoken".into(), "--pod".into(), "app-0".into()], "rejected our credentials (401 Unauthorized) for get pods".into()),
        (vec!["--pod".into(), "app-0".into(), "--dist-port".into(), "0".into()], "invalid value '0' for '--dist-port <PORT>'".into()),
        (vec!["--statefulset".into(), "nope".into()], "statefulset \"nope\" not found in namespace \"default\"".into()),
        (vec!["--service".into(), "nope".into()], "service \"nope\" not found in namespace \"default\"".into()),
        (vec!["-l".into(), "app=nope".into()], "no pods match selector \"app=nope\" in namespace \"default\"".into()),
        (vec!["-l".into(), "a in b".into()], "unable to parse requirement".into()),
        (vec!["--pod".into(), "app-0".into(), "--statefulset".into(), "app".into()], "the argument '--pod <NAME>' cannot be used with '--statefulset <NAME>'".into()),
        (vec![], "the following required arguments were not provided".into()),
    ];
    let check = |args: &[String], says: &str| -> Result<()> {
        let out = cluster.beamredir(state.path()).args(["up", "--session", &session]).args(args).args(["--", "true"]).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "{args:?} succeeded");
        let first = stderr.lines().next().unwrap_or("");
        assert!(first.contains(says), "{args:?}: expected {says:?}, got:\n{stderr}");
        if !first.starts_with("error: ") {
            assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: more than one line:\n{stderr}");
        }
        let left: Vec<_> = std::fs::read_dir(state.path())?.filter_map(Result::ok).map(|e| e.file_name()).collect();
        assert!(left.is_empty(), "{args:?} left {left:?}");
        assert!(!beamredir_testbed::cgroup2_root()?.join("beamredir").join(&session).exists(), "{args:?} left its cgroup");
        assert_eq!(beamredir_testbed::bpftool_cgroup_programs(&beamredir_testbed::cgroup2_root()?)?, programs_before, "{args:?} changed the root cgroup's programs");
        assert_eq!(listening_ports(&cluster)?, listening_before, "{args:?} left a listener");
        Ok(())
    };
    for (args, says) in &cases {
        check(args, says)?;
    }
    // 403s: on reading the pod, and on the port-forward subresource.
    cluster.forbid("get", "pods");
    check(
        &["--pod".into(), "app-0".into()],
        "forbidden (403): you may not get pods in namespace \"default\" (pods \"app-0\" is forbidden: User \"sim-admin\" cannot get resource \"pods\" in API group \"\" in the namespace \"default\"); grant it with a Role rule {apiGroups: [\"\"], resources: [\"pods\"], verbs: [\"get\"]}",
    )?;
    cluster.allow_all();
    cluster.forbid("create", "pods/portforward");
    check(
        &["--pod".into(), "app-0".into()],
        "forbidden (403): you may not create pods/portforward in namespace \"default\" (pods \"app-0\" is forbidden: User \"sim-admin\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"default\"); grant it with a Role rule {apiGroups: [\"\"], resources: [\"pods/portforward\"], verbs: [\"get\", \"create\"]}",
    )?;
    cluster.allow_all();
    Ok(())
}

#[test]
fn pods_without_a_known_dist_port_or_an_answering_epmd_are_refused() -> Result<()> {
    // `plain`: Ready, no named ports, no ERL_PORT and no Erlang node (so epmd knows no port).
    // `stuck`: declares epmd but nothing ever listens: Running, never Ready. Running is enough
    // to be tried (as kubectl port-forward), and the kubelet's refusal is what the user sees.
    let manifest = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: plain, namespace: default}
spec:
  serviceName: plain
  replicas: 1
  selector: {matchLabels: {app: plain}}
  template:
    metadata: {labels: {app: plain}}
    spec:
      containers:
        - name: main
          command: ["sh", "-c", "epmd -daemon && sleep 600"]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: stuck, namespace: default}
spec:
  serviceName: stuck
  replicas: 1
  selector: {matchLabels: {app: stuck}}
  template:
    metadata: {labels: {app: stuck}}
    spec:
      containers:
        - name: main
          command: ["sleep", "600"]
          ports: [{name: epmd, containerPort: 4369}]
"#;
    let cluster = SimCluster::start_with(manifest, false)?;
    cluster.wait_ready("default", "plain-0", Duration::from_secs(30))?;
    wait_until("stuck-0 to run", Duration::from_secs(30), || {
        cluster.pod("default", "stuck-0").and_then(|p| p.status?.phase).as_deref() == Some("Running")
    })?;
    let state = TempDir::new("brstate")?;
    for (pod, says) in [
        ("plain-0", "no Erlang distribution port known for pod default/plain-0"),
        ("stuck-0", "port-forward to stuck-0 port 4369: error forwarding port 4369 to pod stuck-0"),
    ] {
        let out = cluster.beamredir(state.path()).args(["up", "--pod", pod, "--", "true"]).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(stderr.lines().next().unwrap_or("").contains(says), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert_eq!(std::fs::read_dir(state.path())?.count(), 0);
    }
    Ok(())
}

/// A real unprivileged user with a home, to play the one who ran `sudo beamredir`:
/// (name, home, uid, gid). Created once per machine.
fn sudo_user() -> Result<(&'static str, std::path::PathBuf, String, String)> {
    let user = "beamredir-test";
    let home = std::path::PathBuf::from("/var/tmp/beamredir-test-home");
    if Command::new("id").arg(user).output()?.status.code() != Some(0) {
        run(Command::new("useradd").args(["--system", "--create-home", "--home-dir"]).arg(&home).args(["--shell", "/bin/sh", user]))?;
    }
    let id = |flag: &str| -> Result<String> { Ok(String::from_utf8(run(Command::new("id").args([flag, user]))?.stdout)?.trim().to_string()) };
    Ok((user, home, id("-u")?, id("-g")?))
}

#[test]
fn under_sudo_the_invoking_users_kubeconfig_is_used() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let (user, home, uid, gid) = sudo_user()?;
    std::fs::create_dir_all(home.join(".kube"))?;
    std::fs::copy(&cluster.kubeconfig, home.join(".kube/config"))?;
    let ip = cluster.pod_ip("app-0").unwrap();
    let script = format!("io:format(\"ping=~p~n\", [net_adm:ping('app@{ip}')]), halt().");
    // What `sudo beamredir up` sees: KUBECONFIG dropped, HOME=/root, SUDO_* set.
    let out = cluster
        .beamredir(state.path())
        .env_remove("KUBECONFIG")
        .env("HOME", "/root")
        .env("SUDO_USER", user)
        .env("SUDO_UID", &uid)
        .env("SUDO_GID", &gid)
        .args(["up", "--pod", "app-0", "--session", &unique("sudo"), "--", "sh", "-c", "id -un && exec \"$@\"", "sh"])
        .args(erl(&script))
        .stdin(Stdio::null())
        .output()?;
    let _ = std::fs::remove_file(home.join(".kube/config"));
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains(&format!("from {}/.kube/config", home.display())), "{t}");
    assert!(t.contains(&format!("{user}\n")) && t.contains("ping=pong"), "{t}");
    Ok(())
}

#[test]
fn under_sudo_kubeconfig_exec_plugins_run_as_the_invoking_user() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let (user, home, uid, gid) = sudo_user()?;
    // A credential plugin (as aws/gcloud/kubelogin are) that records who ran it and where.
    let dir = TempDir::new("brplugin")?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let token = std::fs::read_to_string(&cluster.kubeconfig)?
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: ").map(String::from))
        .context("token in kubeconfig")?;
    let witness = home.join("plugin-ran-as");
    let _ = std::fs::remove_file(&witness);
    let plugin = dir.path().join("plugin.sh");
    std::fs::write(&plugin, format!(
        "#!/bin/sh\necho \"$(id -u) $HOME\" > {}\necho '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{token}\"}}}}'\n",
        witness.display()
    ))?;
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let kubeconfig = std::fs::read_to_string(&cluster.kubeconfig)?.replace(
        &format!("    token: {token}"),
        &format!("    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never", plugin.display()),
    );
    let kc = dir.path().join("kubeconfig");
    std::fs::write(&kc, kubeconfig)?;
    let out = cluster
        .beamredir(state.path())
        .env("HOME", "/root")
        .env("SUDO_USER", user)
        .env("SUDO_UID", &uid)
        .env("SUDO_GID", &gid)
        .args(["up", "--kubeconfig"])
        .arg(&kc)
        .args(["--pod", "app-0", "--session", &unique("plugin"), "--", "true"])
        .stdin(Stdio::null())
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    let ran_as = std::fs::read_to_string(&witness).context("the plugin did not run")?;
    let _ = std::fs::remove_file(&witness);
    assert_eq!(ran_as.trim(), format!("{uid} {}", home.display()), "the plugin must run as the invoking user, with their HOME");
    Ok(())
}

#[test]
fn independent_clients_python_and_kubectl_agree_with_the_simulated_api_server() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let ip = cluster.pod_ip("app-0").unwrap().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/k8s_client_check.py");
    let out = run(cluster.ws.command("python3").arg(script).arg(&cluster.kubeconfig).arg("app-0"))?;
    let py = text(&out);
    assert!(py.contains(&format!("pod app-0 {ip} Running ready=True")), "{py}");
    assert!(py.contains("epmd port 4369") && py.contains("name app at port 9000"), "{py}");

    let out = run(cluster.ws.command("kubectl").arg("--kubeconfig").arg(&cluster.kubeconfig).args(["get", "pods", "-o", "wide"]))?;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let row = table.lines().find(|l| l.starts_with("app-0")).with_context(|| table.clone())?;
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&cells[..3], ["app-0", "1/1", "Running"], "{table}");
    assert!(cells.contains(&ip.as_str()), "{table}");
    Ok(())
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
