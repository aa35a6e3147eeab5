//! Issue: the whole Erlang cluster. A StatefulSet of BEAM nodes with random distribution
//! ports, named by their cluster DNS names, with pods that restart; beamredir follows it all
//! with nothing but `up --statefulset app`.
use std::{process::Stdio, time::Duration};

use anyhow::{Context, Result};
use beamredir_testbed::{Interactive, TempDir, cluster::SimCluster, run, unique, wait_until};

const MANIFEST: &str = include_str!("../manifests/erlang-cluster.yaml");
const COOKIE: &str = "secret";

fn fqdn(i: u32) -> String {
    format!("app@app-{i}.app.default.svc.cluster.local")
}

fn status_of(cluster: &SimCluster, state: &TempDir, session: &str) -> Option<serde_json::Value> {
    cluster.session_status(state.path(), session)
}

/// Waits (through a hidden node, which global leaves alone) until the pods have meshed among
/// themselves, as a cluster someone joins usually has.
fn wait_until_pods_meshed(cluster: &SimCluster, state: &TempDir) -> Result<()> {
    let script = format!(
        "W = fun W(0) -> timeout; W(N) -> case [length(rpc:call(P, erlang, nodes, [])) || P <- ['{}', '{}', '{}']] of [2,2,2] -> meshed; _ -> timer:sleep(200), W(N-1) end end, \
         io:format(\"~p~n\", [W(150)]), halt().",
        fqdn(0), fqdn(1), fqdn(2)
    );
    let out = run(cluster
        .beamredir(state.path())
        .args(["-q", "up", "--statefulset", "app", "--session", &unique("mesh"), "--"])
        .args(["erl", "-name", "probe@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-eval", &script])
        .env("HOME", state.path())
        .stdin(Stdio::null()))?;
    anyhow::ensure!(String::from_utf8_lossy(&out.stdout).contains("meshed"), "pods did not mesh: {}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

#[test]
fn statefulset_with_random_dist_ports_full_mesh_by_dns_name() -> Result<()> {
    let cluster = SimCluster::start(MANIFEST)?;
    let state = TempDir::new("brstate")?;
    wait_until_pods_meshed(&cluster, &state)?;
    let run_node = |flags: &[&str], script: String| -> Result<(String, String)> {
        let out = run(cluster
            .beamredir(state.path())
            .args(["up", "--statefulset", "app", "--session", &unique("sts"), "--"])
            .args(["erl", "-name", "debug@127.0.0.1", "-setcookie", COOKIE, "-noshell"])
            .args(flags)
            .args(["-eval", &script])
            .env("HOME", state.path())
            .stdin(Stdio::null()))?;
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
    };
    let all = format!("['{}','{}','{}']", fqdn(0), fqdn(1), fqdn(2));

    // A hidden node (what the banner recommends) pings every pod by its DNS name.
    let (stdout, stderr) = run_node(
        &["-hidden"],
        format!("Pings = [net_adm:ping(N) || N <- {all}], io:format(\"pings=~p~nnodes=~w~n\", [Pings, lists:sort(nodes(hidden))]), halt()."),
    )?;
    assert!(stdout.contains("pings=[pong,pong,pong]"), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("nodes={all}")), "{stdout}");
    // The three dist ports were learned from epmd (the spec names none) and all differ.
    let dist_ports: std::collections::BTreeSet<String> = stderr
        .lines()
        .filter(|l| l.trim_start().starts_with("redirect"))
        .filter_map(|l| l.split_whitespace().nth(1)?.rsplit(':').next().map(String::from))
        .filter(|p| p != "4369")
        .collect();
    assert_eq!(dist_ports.len(), 3, "{stderr}");

    // A visible node that pings app-0 only: global then connects it to app-1 and app-2 by
    // itself, through the redirects and the DNS names. Watch the connections come up (pods
    // cannot dial back to a workstation, so OTP 25's partition prevention may drop some of
    // them again later; that is Erlang's business, not the redirect's).
    let (stdout, _) = run_node(
        &[],
        format!(
            "ok = net_kernel:monitor_nodes(true), pong = net_adm:ping('{}'), \
             C = fun C(Seen, 0) -> Seen; C(Seen, N) -> case length(Seen) >= 3 of true -> Seen; false -> \
               receive {{nodeup, Nd}} -> C(lists:usort([Nd | Seen]), N) after 200 -> C(Seen, N - 1) end end end, \
             io:format(\"nodeups=~w~n\", [C([], 100)]), halt().",
            fqdn(0)
        ),
    )?;
    assert!(stdout.contains(&format!("nodeups={all}")), "global did not reach every pod from the local node:\n{stdout}");
    Ok(())
}

#[test]
fn statefulset_pod_restart_is_followed_while_other_pods_stay_connected() -> Result<()> {
    let cluster = SimCluster::start(MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let session = unique("churn");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--statefulset", "app"], &log)?;

    // A hidden local node connected to app-0 that reports if the connection ever drops, and
    // pings whatever node it is told to.
    let watcher = format!(
        "ok = net_kernel:monitor_nodes(true), pong = net_adm:ping('{}'), io:format(\"connected~n\"), \
         Loop = fun L() -> receive {{nodedown, N}} -> io:format(\"nodedown ~p~n\", [N]), L(); {{nodeup, _}} -> L() \
         after 200 -> case io:get_line(\"\") of eof -> ok; Line -> Node = list_to_atom(string:trim(Line)), \
         io:format(\"ping ~p ~p~n\", [Node, net_adm:ping(Node)]), L() end end end, Loop().",
        fqdn(0)
    );
    let mut node = Interactive::spawn(
        cluster
            .beamredir(state.path())
            .args(["exec", "--session", &session, "--", "erl", "-name", "debug@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-eval", &watcher])
            .env("HOME", state.path()),
    )?;
    node.expect("connected", Duration::from_secs(30))?;

    let old_ip = cluster.pod_ip("app-1").context("app-1 IP")?;
    let started = std::time::Instant::now();
    cluster.delete_pod("app-1")?;
    // Its redirects go (the watch sees the deletion at once).
    wait_until("app-1's redirects to go", Duration::from_secs(3), || {
        status_of(&cluster, &state, &session).is_some_and(|s| {
            s["redirects"].as_array().is_some_and(|rs| rs.iter().all(|r| !r["pod"].as_str().unwrap_or("").starts_with(&format!("{old_ip}:"))))
        })
    })?;
    eprintln!("app-1's redirects were removed {:?} after the delete", started.elapsed());

    let new_ip = {
        let mut ip = old_ip;
        wait_until("app-1 back with a new IP", Duration::from_secs(60), || {
            ip = cluster.pod_ip("app-1").unwrap_or(old_ip);
            ip != old_ip
        })?;
        ip
    };
    cluster.wait_ready("default", "app-1", Duration::from_secs(60))?;
    wait_until("the session to follow app-1", Duration::from_secs(10), || {
        status_of(&cluster, &state, &session).is_some_and(|s| {
            s["redirects"].as_array().is_some_and(|rs| rs.iter().filter(|r| r["pod"].as_str().unwrap_or("").starts_with(&format!("{new_ip}:"))).count() >= 2)
        })
    })
    .with_context(|| std::fs::read_to_string(&log).unwrap_or_default())?;
    // The running local node resolves the new IP (the hosts file is re-read within ~5 s) and
    // reaches the new app-1 without beamredir restarting.
    // Ask again each time the previous answer is in (pang while it still has the old address).
    let (asked, pong) = (format!("ping '{}' ", fqdn(1)), format!("ping '{}' pong", fqdn(1)));
    let mut sent = 0;
    wait_until("the local node to reach the new app-1", Duration::from_secs(30), || {
        if node.output().matches(&asked).count() >= sent && node.send(&format!("{}\n", fqdn(1))).is_ok() {
            sent += 1;
        }
        node.output().contains(&pong)
    })
    .with_context(|| node.output())?;
    // app-0 stayed connected throughout.
    assert!(!node.output().contains(&format!("nodedown '{}'", fqdn(0))), "{}", node.output());
    let hosts = std::fs::read_to_string(state.path().join(format!("{session}.hosts")))?;
    assert!(hosts.contains(&format!("{new_ip} app-1.app.default.svc.cluster.local")), "{hosts}");
    assert!(!hosts.contains(&old_ip.to_string()), "{hosts}");
    let status = status_of(&cluster, &state, &session).unwrap();
    assert_eq!(status["pods"].as_array().unwrap().len(), 3, "{status:#}");
    Ok(())
}

#[test]
fn garbage_or_truncated_epmd_answers_do_not_kill_the_session() -> Result<()> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/fake_epmd.py");
    let manifest = format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: fake, namespace: default}}
spec:
  serviceName: fake
  replicas: 2
  selector: {{matchLabels: {{app: fake}}}}
  template:
    metadata: {{labels: {{app: fake}}}}
    spec:
      containers:
        - name: fake
          command: ["sh", "-c", "if [ ${{POD_NAME##*-}} = 0 ]; then exec python3 {script} garbage; else exec python3 {script} truncated; fi"]
          env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
          ports: [{{name: epmd, containerPort: 4369}}]
"#
    );
    let cluster = SimCluster::start(&manifest)?;
    let state = TempDir::new("brstate")?;
    let session = unique("fake");
    let mut up = cluster.start_up_session(state.path(), &session, &["-l", "app=fake"], &state.path().join("up.log"))?;
    for pod in ["fake-0", "fake-1"] {
        let ip = cluster.pod_ip(pod).unwrap();
        let script = format!("io:format(\"~p~n\", [[net_adm:ping('app@{ip}') || _ <- [1,2,3]]]), halt().");
        let out = run(cluster
            .beamredir(state.path())
            .args(["exec", "--session", &session, "--", "erl", "-name", "debug@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-eval", &script])
            .env("HOME", state.path())
            .stdin(Stdio::null()))?;
        assert!(String::from_utf8_lossy(&out.stdout).contains("[pang,pang,pang]"), "{}", String::from_utf8_lossy(&out.stdout));
    }
    // Still running, still answering, every pod still listed.
    assert!(up.0.try_wait()?.is_none(), "beamredir exited");
    let status = status_of(&cluster, &state, &session).context("status")?;
    assert_eq!(status["state"], "running");
    assert_eq!(status["pods"].as_array().unwrap().len(), 2);
    Ok(())
}

#[test]
fn several_pods_by_name_all_stay_redirected_once_the_watches_have_listed() -> Result<()> {
    let cluster = SimCluster::start(MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let session = unique("two");
    let _up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0", "--pod", "app-2"], &state.path().join("up.log"))?;
    let both_redirected = || {
        status_of(&cluster, &state, &session).is_some_and(|s| {
            let rs = s["redirects"].as_array().cloned().unwrap_or_default();
            ["app-0", "app-2"].iter().all(|p| {
                let ip = cluster.pod_ip(p).unwrap().to_string();
                rs.iter().filter(|r| r["pod"].as_str().unwrap_or("").starts_with(&format!("{ip}:"))).count() == 2
            })
        })
    };
    wait_until("both pods redirected", Duration::from_secs(30), both_redirected)?;
    // Each pod's watch lists, then watches (the API server sees both): neither relist may take
    // the other pod for deleted.
    wait_until("both watches to have listed and be watching", Duration::from_secs(30), || {
        let audit = cluster.audit();
        ["app-0", "app-2"].iter().all(|p| audit.iter().any(|a| a == &format!("watch pods default/{p}")))
    })?;
    assert!(both_redirected(), "{:#?}", status_of(&cluster, &state, &session));
    let script = format!("io:format(\"~p~n\", [[net_adm:ping(N) || N <- ['{}', '{}']]]), halt().", fqdn(0), fqdn(2));
    let out = run(cluster
        .beamredir(state.path())
        .args(["exec", "--session", &session, "--", "erl", "-name", "debug@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-eval", &script])
        .env("HOME", state.path())
        .stdin(Stdio::null()))?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("[pong,pong]"), "{}", String::from_utf8_lossy(&out.stdout));
    let log = std::fs::read_to_string(state.path().join("up.log"))?;
    assert!(!log.contains("its redirects are removed"), "a pod was taken for gone:\n{log}");
    Ok(())
}

/// A StatefulSet scaled down from 3 to 1: the controller deletes app-2, then app-1. The session
/// takes each one's redirects down, and once its names are no longer held (30 s) forgets it,
/// so a session that follows pods through many rollouts does not keep every pod it ever saw.
/// `status` then lists only app-0, whose redirects and node still work.
#[test]
fn a_scaled_down_statefulsets_pods_are_forgotten_and_the_rest_keep_working() -> Result<()> {
    let cluster = SimCluster::start(MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let session = unique("scale");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--statefulset", "app"], &log)?;
    let names = |s: &serde_json::Value| -> Vec<String> {
        s["pods"].as_array().into_iter().flatten().filter_map(|p| p["name"].as_str().map(String::from)).collect()
    };
    wait_until("three pods up", Duration::from_secs(60), || {
        status_of(&cluster, &state, &session).is_some_and(|s| names(&s) == ["app-0", "app-1", "app-2"] && s["redirects"].as_array().is_some_and(|r| r.len() == 6))
    })?;
    cluster.scale_statefulset("app", 1)?;
    wait_until("app-1 and app-2 to be forgotten", Duration::from_secs(180), || {
        status_of(&cluster, &state, &session).is_some_and(|s| names(&s) == ["app-0"])
    })
    .with_context(|| format!("status: {:#?}\nlog:\n{}", status_of(&cluster, &state, &session), std::fs::read_to_string(&log).unwrap_or_default()))?;
    let status = status_of(&cluster, &state, &session).context("status")?;
    let ip = cluster.pod_ip("app-0").context("app-0")?.to_string();
    let redirects = status["redirects"].as_array().cloned().unwrap_or_default();
    assert!(redirects.len() == 2 && redirects.iter().all(|r| r["pod"].as_str().unwrap_or("").starts_with(&format!("{ip}:"))), "{status:#}");
    assert!(cluster.pod("default", "app-1").is_none() && cluster.pod("default", "app-2").is_none(), "the controller deleted the surplus pods");
    let script = format!("io:format(\"~p~n\", [net_adm:ping('{}')]), halt().", fqdn(0));
    let out = run(cluster
        .beamredir(state.path())
        .args(["exec", "--session", &session, "--"])
        .args(["erl", "-name", "debug@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-eval", &script])
        .env("HOME", state.path())
        .stdin(Stdio::null()))?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("pong"), "{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
