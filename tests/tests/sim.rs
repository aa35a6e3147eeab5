//! The simulated cluster itself, checked against clients nobody here wrote (kubectl 1.32, the
//! official Python client, kube-rs's watcher) and against real BEAM nodes: it must fail the
//! way a real cluster fails.
use std::{
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    process::{Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use beamredir_testbed::{
    DelayRelay, Netns, TempDir,
    cluster::{ApiAccess, EXAMPLE_MANIFEST, Hang, HistoryWindow, IpAllocation, IpFamily, SimCluster},
    run, text, unique, wait_until,
};
use k8s_openapi::api::core::v1::Pod;

const PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/python/sim_check.py");

/// `python3 sim_check.py ARGS` in the workstation namespace.
fn py(cluster: &SimCluster, args: &[&str]) -> Result<Output> {
    Ok(cluster.ws.command("python3").arg(PY).args(args).stdin(Stdio::null()).output()?)
}

fn kubectl(cluster: &SimCluster, kubeconfig: &std::path::Path, args: &[&str]) -> Result<Output> {
    Ok(cluster.kubectl(kubeconfig).args(args).stdin(Stdio::null()).output()?)
}

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// Pods that only sleep: Ready as soon as they run (no ports, no probe).
fn sleepers(replicas: u32) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: app, namespace: default}}
spec:
  serviceName: app
  replicas: {replicas}
  selector: {{matchLabels: {{app: app}}}}
  template:
    metadata: {{labels: {{app: app}}}}
    spec:
      containers:
        - name: app
          command: ["sleep", "3600"]
          env: [{{name: POD_IPS, valueFrom: {{fieldRef: {{fieldPath: status.podIPs}}}}}}]
"#
    )
}

const RBAC: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pf-get, namespace: default}
rules:
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get", "list", "watch"]
  - apiGroups: [""]
    resources: ["pods/portforward"]
    verbs: ["get"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pf-both, namespace: default}
rules:
  - apiGroups: [""]
    resources: ["pods"]
    verbs: ["get", "list", "watch"]
  - apiGroups: [""]
    resources: ["pods/portforward"]
    verbs: ["get", "create"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: dev-pf-get, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pf-get}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: dev}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: ops-pf-both, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pf-both}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: ops}]
"#;

const SECRET_MANIFEST: &str = include_str!("../manifests/secret-cookie.yaml");

/// RBAC as a real API server applies it, checked with `kubectl auth can-i`, kubectl's own
/// 403s and the Python client's port-forward: before 1.35 a WebSocket port-forward needs
/// `get` on pods/portforward, from 1.35 `create` too. Secrets are authorized like the rest,
/// and the kubelet feeds a pod its cookie from one.
#[test]
fn rbac_decides_port_forwards_by_cluster_version_and_the_cookie_comes_from_a_secret() -> Result<()> {
    for minor in [32, 35] {
        let cluster = SimCluster::options().version(minor).rbac(RBAC).wait_ready(false).start(SECRET_MANIFEST)?;
        cluster.wait_ready("default", "app-0", Duration::from_secs(90))?;
        let (dev, ops, nobody) = (cluster.kubeconfig_for("dev")?, cluster.kubeconfig_for("ops")?, cluster.kubeconfig_for("nobody")?);
        let can_i = |kc: &std::path::Path, verb: &str, what: &str| -> Result<(bool, String)> {
            let out = kubectl(&cluster, kc, &["auth", "can-i", verb, what])?;
            let answer = String::from_utf8_lossy(&out.stdout).trim().to_string();
            anyhow::ensure!(answer == "yes" || answer == "no", "kubectl auth can-i {verb} {what}: {}", text(&out));
            Ok((out.status.success(), answer))
        };
        assert_eq!(can_i(&dev, "get", "pods/portforward")?, (true, "yes".into()));
        assert_eq!(can_i(&dev, "create", "pods/portforward")?, (false, "no".into()));
        assert_eq!(can_i(&ops, "create", "pods/portforward")?, (true, "yes".into()));
        assert_eq!(can_i(&dev, "get", "secrets")?, (false, "no".into()));
        assert_eq!(can_i(&cluster.kubeconfig, "create", "pods/portforward")?, (true, "yes".into()), "the admin (system:masters)");

        // The Python client's port-forward (a WebSocket GET) as dev: allowed by `get` alone
        // before 1.35, refused for want of `create` from 1.35 on.
        let before = cluster.portforward_requests().get("default/app-0").copied().unwrap_or(0);
        let out = py(&cluster, &["portforward", path(&dev), "app-0", "4369"])?;
        if minor < 35 {
            assert!(out.status.success() && text(&out).contains("name app at port 9000"), "1.{minor}: {}", text(&out));
        } else {
            assert!(!out.status.success(), "{}", text(&out));
            assert!(
                text(&out).contains(r#"403 Forbidden: pods "app-0" is forbidden: User "dev" cannot create resource "pods/portforward" in API group "" in the namespace "default""#),
                "{}",
                text(&out)
            );
        }
        let out = py(&cluster, &["portforward", path(&ops), "app-0", "4369"])?;
        assert!(out.status.success() && text(&out).contains("name app at port 9000"), "1.{minor} ops: {}", text(&out));
        assert_eq!(cluster.portforward_requests()["default/app-0"], before + 2, "refused upgrades are counted too");

        // kubectl's own 403s carry the real messages.
        let out = kubectl(&cluster, &nobody, &["get", "pods"])?;
        assert!(
            text(&out).contains(r#"pods is forbidden: User "nobody" cannot list resource "pods" in API group "" in the namespace "default""#),
            "{}",
            text(&out)
        );
        let out = kubectl(&cluster, &dev, &["get", "secret", "erlang-cookie"])?;
        assert!(
            text(&out).contains(r#"Error from server (Forbidden): secrets "erlang-cookie" is forbidden: User "dev" cannot get resource "secrets" in API group "" in the namespace "default""#),
            "{}",
            text(&out)
        );
        if minor < 35 {
            continue;
        }

        // The cookie: the kubelet resolved secretKeyRef and envFrom (with its prefix) ...
        let pid = cluster.container_pid("app-0", "app").context("app-0's container")?;
        let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
        let env: Vec<String> = environ.split(|b| *b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
        for want in ["RELEASE_COOKIE=cookie-from-a-secret", "CFG_MODE=simulated", "CFG_DIST_PORT=9000"] {
            assert!(env.iter().any(|e| e == want), "{want} not in {env:?}");
        }
        // ... the admin reads it from the Secret with kubectl, and a local node uses it.
        let out = run(cluster.kubectl(&cluster.kubeconfig).args(["get", "secret", "erlang-cookie", "-o", "jsonpath={.data.cookie}"]))?;
        let cookie = String::from_utf8(base64_decode(&String::from_utf8_lossy(&out.stdout)))?;
        assert_eq!(cookie, "cookie-from-a-secret");
        let state = TempDir::new("brstate")?;
        let node = format!("app@{}", cluster.pod_ip("app-0").unwrap());
        let out = run(cluster
            .beamredir(state.path())
            .args(["up", "--pod", "app-0", "--session", &unique("cookie"), "--"])
            .args(["erl", "-name", "debug@127.0.0.1", "-setcookie", &cookie, "-hidden", "-noshell", "-eval"])
            .arg(format!("io:format(\"ping=~p~n\", [net_adm:ping('{node}')]), halt()."))
            .env("HOME", state.path())
            .stdin(Stdio::null()))?;
        assert!(text(&out).contains("ping=pong"), "{}", text(&out));

        // A missing Secret: the container waits in CreateContainerConfigError, the pod is
        // Pending with its IP, and kubectl shows the reason as the pod's status.
        wait_until("broken-0 to report its missing secret", Duration::from_secs(30), || {
            cluster.pod("default", "broken-0").and_then(|p| p.status?.container_statuses).is_some_and(|cs| {
                cs[0].state.as_ref().and_then(|s| s.waiting.as_ref()).is_some_and(|w| {
                    w.reason.as_deref() == Some("CreateContainerConfigError") && w.message.as_deref() == Some("secret \"no-such-secret\" not found")
                })
            })
        })?;
        let broken = cluster.pod("default", "broken-0").unwrap().status.unwrap();
        assert_eq!(broken.phase.as_deref(), Some("Pending"));
        assert!(broken.pod_ip.is_some());
        let out = run(cluster.kubectl(&cluster.kubeconfig).args(["get", "pods"]))?;
        let row = String::from_utf8_lossy(&out.stdout).lines().find(|l| l.starts_with("broken-0")).map(String::from).unwrap_or_default();
        assert_eq!(row.split_whitespace().take(3).collect::<Vec<_>>(), ["broken-0", "0/1", "CreateContainerConfigError"], "{row}");
    }
    Ok(())
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s.trim()).unwrap_or_default()
}

/// A kube-rs watcher (what beamredir uses) on the default namespace's pods, run in the
/// workstation namespace; every event as one line.
fn kube_rs_watcher(cluster: &SimCluster, streaming: bool, stop: Arc<AtomicBool>) -> (mpsc::Receiver<String>, std::thread::JoinHandle<()>) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let (tx, rx) = mpsc::channel();
    let (kc, ns) = (cluster.kubeconfig.clone(), cluster.ws.path());
    let handle = std::thread::spawn(move || {
        nix::sched::setns(std::fs::File::open(ns).unwrap(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let kubeconfig = kube::config::Kubeconfig::read_from(&kc).unwrap();
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
            let api: kube::Api<Pod> = kube::Api::namespaced(kube::Client::try_from(config).unwrap(), "default");
            // streaming_lists(): the initial list as a watch (sendInitialEvents), ended by the
            // initial-events-end bookmark.
            let config = if streaming { watcher::Config::default().streaming_lists() } else { watcher::Config::default() };
            let mut events = std::pin::pin!(watcher(api, config).default_backoff());
            let describe = |p: &Pod| format!("{} {}", p.metadata.name.as_deref().unwrap_or(""), p.metadata.uid.as_deref().unwrap_or(""));
            while !stop.load(Ordering::Relaxed) {
                let line = match tokio::time::timeout(Duration::from_millis(200), events.next()).await {
                    Err(_) => continue,
                    Ok(None) => return,
                    Ok(Some(Ok(watcher::Event::Init))) => "init".to_string(),
                    Ok(Some(Ok(watcher::Event::InitApply(p)))) => format!("initapply {}", describe(&p)),
                    Ok(Some(Ok(watcher::Event::InitDone))) => "initdone".to_string(),
                    Ok(Some(Ok(watcher::Event::Apply(p)))) => format!("apply {}", describe(&p)),
                    Ok(Some(Ok(watcher::Event::Delete(p)))) => format!("delete {}", describe(&p)),
                    Ok(Some(Err(e))) => format!("error {e}"),
                };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
    });
    (rx, handle)
}

/// Collects lines from `rx` until `done` says so (or the timeout); returns them.
fn collect_until(rx: &mpsc::Receiver<String>, timeout: Duration, mut done: impl FnMut(&[String]) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    while Instant::now() < deadline && !done(&lines) {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
    }
    lines
}

/// Watches over time: bookmarks carry only a resourceVersion; a client that was away while
/// pods changed and the history was compacted gets `ERROR` 410 Expired on resuming and must
/// relist (the Python client, kube-rs's watcher and kubectl's raw requests all see it).
#[test]
fn watch_history_expires_with_410_bookmarks_carry_a_resource_version_and_clients_relist() -> Result<()> {
    let cluster = SimCluster::options().bookmark_interval(Duration::from_secs(1)).history(HistoryWindow::Events(100)).start(EXAMPLE_MANIFEST)?;
    let kc = path(&cluster.kubeconfig).to_string();
    let rv0 = cluster.state.store.resource_version();
    let old_uid = cluster.pod("default", "app-0").and_then(|p| p.metadata.uid).unwrap();

    // Bookmarks, as the Python client receives them raw: an empty Pod with a resourceVersion.
    let out = py(&cluster, &["watch-raw", &kc, &rv0.to_string(), "3", "bookmarks"])?;
    let bookmark = text(&out).lines().find_map(|l| l.strip_prefix("BOOKMARK ").map(String::from)).with_context(|| text(&out))?;
    let b: serde_json::Value = serde_json::from_str(&bookmark)?;
    assert_eq!(b["kind"], "Pod");
    assert_eq!(b["metadata"].as_object().unwrap().keys().collect::<Vec<_>>(), ["creationTimestamp", "resourceVersion"], "{b}");
    assert!(b["metadata"]["resourceVersion"].as_str().unwrap().parse::<u64>()? >= rv0);
    // A streamed initial list (sendInitialEvents) ends with the initial-events-end bookmark.
    let out = run(cluster.kubectl(&cluster.kubeconfig).args([
        "get",
        "--raw",
        "/api/v1/namespaces/default/pods?watch=1&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=1",
    ]))?;
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(lines[0]["type"], "ADDED");
    let end = lines.iter().find(|l| l["type"] == "BOOKMARK").context("no bookmark")?;
    assert_eq!(end["object"]["metadata"]["annotations"]["k8s.io/initial-events-end"], "true", "{lines:?}");

    // A kube-rs watcher, listed and watching.
    let stop = Arc::new(AtomicBool::new(false));
    let (events, watcher) = kube_rs_watcher(&cluster, false, stop.clone());
    let first = collect_until(&events, Duration::from_secs(30), |l| l.iter().any(|l| l == "initdone"));
    assert!(first.contains(&format!("initapply app-0 {old_uid}")), "{first:?}");
    // kube-rs's streaming list (WatchList) ends its initial list on the server's bookmark.
    let (streamed, streaming_watcher) = kube_rs_watcher(&cluster, true, stop.clone());
    let lines = collect_until(&streamed, Duration::from_secs(30), |l| l.iter().any(|l| l == "initdone"));
    assert_eq!(lines, ["init".to_string(), format!("initapply app-0 {old_uid}"), "initdone".to_string()]);
    assert!(cluster.audit().iter().any(|a| a.starts_with("watch pods default/")), "streamed, not listed");
    drop(streamed);

    // The API server goes away; meanwhile app-0 is replaced and etcd compacts.
    cluster.stop_api_server();
    cluster.delete_pod("app-0")?;
    let new = cluster.wait_replaced("app-0", Some(&old_uid), Duration::from_secs(60))?;
    let new_uid = new.metadata.uid.unwrap();
    let compacted = cluster.compact_now();
    cluster.start_api_server()?;

    // Raw: 200, then one ERROR event with the watch cache's 410 Status.
    let out = py(&cluster, &["watch-raw", &kc, &rv0.to_string(), "3"])?;
    let t = text(&out);
    let error = t.lines().find_map(|l| l.strip_prefix("ERROR ")).with_context(|| t.clone())?;
    let status: serde_json::Value = serde_json::from_str(error)?;
    assert_eq!(
        status,
        serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "code": 410, "reason": "Expired",
                           "message": format!("too old resource version: {rv0} ({compacted})")})
    );
    // The Python client's watch gives up with 410 (after its one retry); its relist sees the new pod.
    let out = py(&cluster, &["watch-resume", &kc, &rv0.to_string()])?;
    let t = text(&out);
    assert!(t.contains("ApiException status=410 reason=Expired: too old resource version"), "{t}");
    assert!(t.contains(&format!("pod app-0 {new_uid}")), "{t}");
    // kube-rs: the watch resumes, gets 410, and the watcher relists to the new pod.
    let after = collect_until(&events, Duration::from_secs(60), |l| l.iter().any(|l| l == &format!("initapply app-0 {new_uid}")));
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    let _ = streaming_watcher.join();
    assert!(after.contains(&format!("initapply app-0 {new_uid}")), "{after:?}");
    let expired = after.iter().position(|l| l.starts_with("error") && l.contains("too old resource version") && l.contains("Expired"));
    assert!(expired.is_some(), "the watcher saw the 410: {after:?}");
    assert!(after.iter().position(|l| l == "init") > expired, "relisted after the 410: {after:?}");

    // LIST: an exact compacted resourceVersion is gone (410), NotOlderThan is served, a future one times out.
    let list = |q: &str| cluster.kubectl(&cluster.kubeconfig).args(["get", "--raw", &format!("/api/v1/namespaces/default/pods?{q}")]).output();
    let out = list(&format!("resourceVersion={rv0}&resourceVersionMatch=Exact"))?;
    assert!(text(&out).contains("Error from server (Expired): The resourceVersion for the provided list is too old."), "{}", text(&out));
    let out = list(&format!("resourceVersion={rv0}&resourceVersionMatch=NotOlderThan"))?;
    assert!(out.status.success() && text(&out).contains(&new_uid), "{}", text(&out));
    let out = list(&format!("resourceVersion={}", compacted + 1000))?;
    assert!(text(&out).contains("Too large resource version"), "{}", text(&out));
    Ok(())
}

/// Pod IPs are reused: with the lowest-free IPAM a replaced pod can get another pod's old
/// address (deterministically: app-0 force-deleted while app-1 goes).
#[test]
fn freed_pod_ips_are_reused_by_other_pods() -> Result<()> {
    let cluster = SimCluster::options().ip_allocation(IpAllocation::LowestFree).start(&sleepers(3))?;
    let ip = |n: &str| cluster.pod_ip(n).unwrap();
    let host = |n: &str| ip(n).octets()[3];
    assert_eq!([host("app-0"), host("app-1"), host("app-2")], [2, 3, 4], "lowest free, in ordinal order");
    let (old0, old1) = cluster.replace_reusing_ip("app-1", "app-0")?;
    cluster.wait_ready("default", "app-0", Duration::from_secs(30))?;
    cluster.wait_ready("default", "app-1", Duration::from_secs(30))?;
    assert_eq!(IpAddr::V4(ip("app-0")), old1, "app-0 got app-1's old address");
    assert_eq!(IpAddr::V4(ip("app-1")), old0, "and app-1 app-0's");
    // A plain delete: the freed address is the lowest free one, so it comes straight back.
    let old2 = ip("app-2");
    let old_uid = cluster.delete_pod("app-2")?.metadata.uid;
    wait_until("app-2 back", Duration::from_secs(30), || {
        cluster.pod("default", "app-2").is_some_and(|p| p.metadata.uid != old_uid && p.status.and_then(|s| s.pod_ip).is_some())
    })?;
    assert_eq!(ip("app-2"), old2);
    let out = run(cluster.kubectl(&cluster.kubeconfig).args(["get", "pods", "-o", "wide"]))?;
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    let row = table.lines().find(|l| l.starts_with("app-0")).unwrap_or_default();
    assert!(row.contains(&old1.to_string()), "{table}");
    Ok(())
}

/// Readiness keeps being probed: Ready follows an exec probe both ways with the kubelet's
/// conditions (kubectl wait sees them through its watch), the test hook forces it, and a pod
/// that never gets ready stays Running with its IP.
#[test]
fn readiness_flaps_both_ways_and_unready_pods_keep_running() -> Result<()> {
    let manifest = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: app, namespace: default}
spec:
  serviceName: app
  replicas: 1
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app}}
    spec:
      containers:
        - name: app
          command: ["sleep", "3600"]
          readinessProbe:
            exec: {command: ["sh", "-c", "test ! -e \"$HOME/unready\""]}
            periodSeconds: 1
            failureThreshold: 1
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: never, namespace: default}
spec:
  serviceName: never
  replicas: 1
  selector: {matchLabels: {app: never}}
  template:
    metadata: {labels: {app: never}}
    spec:
      containers:
        - name: app
          command: ["sleep", "3600"]
          readinessProbe:
            exec: {command: ["false"]}
            periodSeconds: 1
"#;
    let cluster = SimCluster::options().wait_ready(false).start(manifest)?;
    let ready = cluster.wait_ready("default", "app-0", Duration::from_secs(30))?;
    let ip = ready.status.unwrap().pod_ip;
    let kc = path(&cluster.kubeconfig).to_string();
    let kwait = |cond: &str| run(cluster.kubectl(&cluster.kubeconfig).args(["wait", &format!("--for=condition={cond}"), "pod/app-0", "--timeout=30s"]));

    let flag = cluster.pod_home("app-0").unwrap().join("unready");
    std::fs::write(&flag, "")?;
    kwait("Ready=false")?;
    let pod = cluster.pod("default", "app-0").unwrap();
    let st = pod.status.unwrap();
    assert_eq!(st.phase.as_deref(), Some("Running"));
    assert_eq!(st.pod_ip, ip, "the same pod, the same IP");
    for t in ["Ready", "ContainersReady"] {
        let c = st.conditions.iter().flatten().find(|c| c.type_ == t).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_deref(), c.message.as_deref()), ("False", Some("ContainersNotReady"), Some("containers with unready status: [app]")));
    }
    let cs = &st.container_statuses.unwrap()[0];
    assert!(!cs.ready && cs.state.as_ref().unwrap().running.is_some() && cs.restart_count == 0);
    let out = run(cluster.kubectl(&cluster.kubeconfig).args(["get", "pods", "app-0", "--no-headers"]))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().take(3).collect::<Vec<_>>(), ["app-0", "0/1", "Running"]);

    std::fs::remove_file(&flag)?;
    kwait("Ready")?;
    cluster.force_readiness("app-0", Some(false));
    kwait("Ready=false")?;
    cluster.force_readiness("app-0", None);
    kwait("Ready")?;
    let _ = kc;

    // never-0 was probed all along and never passed: Running, an IP, not Ready.
    let never = cluster.pod("default", "never-0").unwrap().status.unwrap();
    assert_eq!(never.phase.as_deref(), Some("Running"));
    assert!(never.pod_ip.is_some());
    assert!(!never.container_statuses.unwrap()[0].ready);
    assert!(never.conditions.unwrap().iter().any(|c| c.type_ == "Ready" && c.status == "False"));
    Ok(())
}

/// A container that exits is restarted in place (same sandbox, same IP), at once the first
/// time and then after the kubelet's back-off, which kubectl shows as CrashLoopBackOff.
#[test]
fn crashed_containers_restart_in_place_with_back_off() -> Result<()> {
    let manifest = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: app, namespace: default}
spec:
  serviceName: app
  replicas: 1
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app}}
    spec:
      containers:
        - name: app
          command: ["sh", "-c", "echo started >> \"$HOME/starts\"; sleep 1; exit 3"]
"#;
    let cluster = SimCluster::options().wait_ready(false).start(manifest)?;
    let status = || cluster.pod("default", "app-0").and_then(|p| p.status);
    wait_until("app-0 to be in CrashLoopBackOff", Duration::from_secs(30), || {
        status().and_then(|s| s.container_statuses).is_some_and(|cs| {
            cs[0].restart_count >= 1 && cs[0].state.as_ref().and_then(|s| s.waiting.as_ref()).and_then(|w| w.reason.as_deref()) == Some("CrashLoopBackOff")
        })
    })?;
    let st = status().unwrap();
    let cs = &st.container_statuses.clone().unwrap()[0];
    let last = cs.last_state.as_ref().and_then(|s| s.terminated.as_ref()).context("lastState.terminated")?;
    assert_eq!((last.exit_code, last.reason.as_deref()), (3, Some("Error")));
    assert!(cs.state.as_ref().unwrap().waiting.as_ref().unwrap().message.as_deref().unwrap_or("").starts_with("back-off 10s restarting failed container=app pod=app-0_default("));
    assert_eq!(st.phase.as_deref(), Some("Running"), "restartPolicy Always: still Running");
    let starts = std::fs::read_to_string(cluster.pod_home("app-0").unwrap().join("starts"))?;
    assert_eq!(starts.lines().count() as i32, cs.restart_count + 1, "the first restart came at once, in the same pod");
    let out = run(cluster.kubectl(&cluster.kubeconfig).args(["get", "pods", "app-0", "--no-headers"]))?;
    let cells: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
    assert_eq!(&cells[..3], ["app-0", "0/1", "CrashLoopBackOff"], "{cells:?}");
    Ok(())
}

/// Deleting a pod: Terminating (deletionTimestamp, SIGTERM) until its containers exit or the
/// grace period ends, then gone and recreated; `--grace-period=0 --force` at once. Checked
/// with kubectl delete (its DeleteOptions body, its wait on a watch).
#[test]
fn deleted_pods_terminate_gracefully_then_go() -> Result<()> {
    let manifest = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: app, namespace: default}
spec:
  serviceName: app
  replicas: 1
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app}}
    spec:
      containers:
        - name: app
          command: ["sh", "-c", "trap 'echo term >> \"$HOME/log\"; sleep 1; exit 0' TERM; while :; do sleep 0.1; done"]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: stubborn, namespace: default}
spec:
  serviceName: stubborn
  replicas: 1
  selector: {matchLabels: {app: stubborn}}
  template:
    metadata: {labels: {app: stubborn}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
        - name: app
          command: ["sh", "-c", "trap '' TERM; while :; do sleep 0.1; done"]
"#;
    let cluster = SimCluster::start(manifest)?;
    let uid = |n: &str| cluster.pod("default", n).and_then(|p| p.metadata.uid);
    let (old_uid, home) = (uid("app-0"), cluster.pod_home("app-0").unwrap());
    run(cluster.kubectl(&cluster.kubeconfig).args(["delete", "pod", "app-0", "--wait=false"]))?;
    let out = run(cluster.kubectl(&cluster.kubeconfig).args(["get", "pod", "app-0", "--no-headers"]))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().nth(2), Some("Terminating"), "{}", text(&out));
    let pod = cluster.pod("default", "app-0").unwrap();
    assert_eq!((pod.metadata.uid.clone(), pod.metadata.deletion_grace_period_seconds), (old_uid.clone(), Some(30)));
    assert!(pod.status.unwrap().pod_ip.is_some(), "a terminating pod keeps its IP");
    wait_until("app-0 replaced", Duration::from_secs(20), || uid("app-0").is_some_and(|u| Some(u) != old_uid))?;
    assert_eq!(std::fs::read_to_string(home.join("log"))?.trim(), "term", "SIGTERM, and the trap ran");

    // SIGTERM ignored: killed when the grace period (2 s) ends; kubectl waits for it.
    let t = Instant::now();
    run(cluster.kubectl(&cluster.kubeconfig).args(["delete", "pod", "stubborn-0"]))?;
    assert!(t.elapsed() >= Duration::from_secs(2) && t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());

    // Forced: gone at once.
    let old = uid("app-0");
    cluster.wait_ready("default", "app-0", Duration::from_secs(20))?;
    let t = Instant::now();
    run(cluster.kubectl(&cluster.kubeconfig).args(["delete", "pod", "app-0", "--grace-period=0", "--force"]))?;
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(uid("app-0") != old, "the old object is gone");
    Ok(())
}

/// Every container of a pod runs, in one network namespace; a sidecar listed first does not
/// hide the Erlang container from beamredir.
#[test]
fn every_container_runs_and_a_sidecar_first_does_not_hide_the_erlang_container() -> Result<()> {
    let cluster = SimCluster::start(include_str!("../manifests/sidecar-first.yaml"))?;
    let out = run(cluster.kubectl(&cluster.kubeconfig).args(["get", "pods", "app-0", "--no-headers"]))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().take(3).collect::<Vec<_>>(), ["app-0", "2/2", "Running"]);
    let (metrics, app) = (cluster.container_pid("app-0", "metrics").unwrap(), cluster.container_pid("app-0", "app").unwrap());
    assert_ne!(metrics, app);
    let netns = |pid: u32| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    assert_eq!(netns(metrics), netns(app), "one network per pod");
    let names: Vec<String> = cluster.pod("default", "app-0").unwrap().status.unwrap().container_statuses.unwrap().iter().map(|c| format!("{}:{}", c.name, c.ready)).collect();
    assert_eq!(names, ["metrics:true", "app:true"]);
    // The Erlang container reaches the sidecar on localhost.
    let out = run(cluster.pod_exec("app-0", "python3")?.args(["-c", "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/').status)"]))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "200");
    let state = TempDir::new("brstate")?;
    let node = format!("app@{}", cluster.pod_ip("app-0").unwrap());
    let out = run(cluster
        .beamredir(state.path())
        .args(["up", "--pod", "app-0", "--session", &unique("sidecar"), "--"])
        .args(["erl", "-name", "debug@127.0.0.1", "-setcookie", "secret", "-hidden", "-noshell", "-eval"])
        .arg(format!("io:format(\"ping=~p~n\", [net_adm:ping('{node}')]), halt()."))
        .env("HOME", state.path())
        .stdin(Stdio::null()))?;
    assert!(text(&out).contains("ping=pong"), "{}", text(&out));
    Ok(())
}

/// Runs `erl FLAGS -eval SCRIPT` inside pod app-0 (its network, host name and cluster DNS)
/// until every node in `nodes` sees the two others; returns the output.
fn mesh_probe(cluster: &SimCluster, flags: &[&str], nodes: &[String]) -> Result<String> {
    let list = nodes.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(",");
    let want = vec![(nodes.len() - 1).to_string(); nodes.len()].join(",");
    let script = format!(
        "W = fun W(0) -> timeout; W(N) -> case [catch length(rpc:call(P, erlang, nodes, [])) || P <- [{list}]] of [{want}] -> meshed; _ -> timer:sleep(200), W(N-1) end end, \
         R = W(300), io:format(\"~p ~p~n\", [R, [{{P, catch lists:sort(rpc:call(P, erlang, nodes, []))}} || P <- [{list}]]]), halt()."
    );
    let out = run(cluster.pod_exec("app-0", "erl")?.args(flags).args(["-setcookie", "secret", "-hidden", "-noshell", "-eval", &script]))?;
    Ok(text(&out))
}

/// `-sname` nodes (app@app-N) mesh: host names are the pod names and the search path from
/// dnsConfig resolves the other pods' short names.
#[test]
fn sname_cluster_meshes_by_short_host_names() -> Result<()> {
    let cluster = SimCluster::start(include_str!("../manifests/sname-cluster.yaml"))?;
    let out = run(&mut cluster.pod_exec("app-1", "hostname")?)?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "app-1");
    let nodes: Vec<String> = (0..3).map(|i| format!("app@app-{i}")).collect();
    let t = mesh_probe(&cluster, &["-sname", "probe"], &nodes)?;
    assert!(t.starts_with("meshed"), "{t}");
    Ok(())
}

/// Nodes named by pod A records (app@10-244-S-N.default.pod.cluster.local, libcluster `:dns`)
/// find each other through the headless Service's records and mesh.
#[test]
fn pod_a_record_cluster_meshes() -> Result<()> {
    let cluster = SimCluster::start(include_str!("../manifests/pod-a-records.yaml"))?;
    let nodes: Vec<String> = (0..3).map(|i| format!("app@{}.default.pod.cluster.local", cluster.pod_ip(&format!("app-{i}")).unwrap().to_string().replace('.', "-"))).collect();
    let t = mesh_probe(&cluster, &["-name", "probe@127.0.0.1"], &nodes)?;
    assert!(t.starts_with("meshed"), "{t}");
    Ok(())
}

/// IPv6-only pods: fd00:10:244:S::N on eth0, AAAA and dashed pod records, Elixir nodes with
/// inet6_tcp distribution meshing over IPv6, and a port-forward (Python client, channel
/// protocol) reaching a server that listens on [::1] only.
#[test]
fn ipv6_only_pods_mesh_with_inet6_tcp_and_port_forwards_reach_ipv6_loopback() -> Result<()> {
    let cluster = SimCluster::options().ip_family(IpFamily::Ipv6).start(include_str!("../manifests/ipv6-elixir.yaml"))?;
    let ips = cluster.pod_ips("app-0");
    assert!(ips.len() == 1 && ips[0].is_ipv6() && ips[0].to_string().starts_with("fd00:10:244:"), "{ips:?}");
    assert!(cluster.pod_ip("app-0").is_none());
    let out = run(cluster.kubectl(&cluster.kubeconfig).args(["get", "pod", "app-0", "-o", "jsonpath={.status.podIP} {.status.podIPs[*].ip}"]))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{} {}", ips[0], ips[0]));
    // Pod records for IPv6: colons become dashes.
    let inetrc = cluster.kubelet.pod_inetrc("default", "app-1").unwrap();
    let hosts = std::fs::read_to_string(inetrc.with_extension("hosts"))?;
    assert!(hosts.contains(&format!("{} {}.default.pod.cluster.local", ips[0], ips[0].to_string().replace(':', "-")).replace(' ', "\t")), "{hosts}");

    let nodes: Vec<String> = (0..2).map(|i| format!("app@app-{i}.app.default.svc.cluster.local")).collect();
    let t = mesh_probe(&cluster, &["-proto_dist", "inet6_tcp", "-name", "probe@app-0.app.default.svc.cluster.local"], &nodes)?;
    assert!(t.starts_with("meshed"), "{t}");

    let kc = path(&cluster.kubeconfig).to_string();
    let out = py(&cluster, &["portforward", &kc, "v6echo-0", "7777"])?;
    assert!(text(&out).contains("received: hello over [::1]"), "{}", text(&out));
    let out = py(&cluster, &["portforward", &kc, "app-0", "4369"])?;
    assert!(text(&out).contains("name app at port 9000"), "epmd over 127.0.0.1 in an IPv6-only pod: {}", text(&out));
    let out = py(&cluster, &["portforward", &kc, "v6echo-0", "7778"])?;
    assert!(
        text(&out).contains("IPv4: dial tcp4 127.0.0.1:7778: connect: connection refused IPv6 dial tcp6 [::1]:7778: connect: connection refused"),
        "{}",
        text(&out)
    );
    Ok(())
}

/// Dual-stack: status.podIP is the primary family's address and status.podIPs lists both,
/// primary first, as a real dual-stack cluster reports them.
#[test]
fn dual_stack_pods_list_the_primary_family_first() -> Result<()> {
    for (family, v6_first) in [(IpFamily::DualStackV4Primary, false), (IpFamily::DualStackV6Primary, true)] {
        let cluster = SimCluster::options().ip_family(family).start(&sleepers(1))?;
        let ips = cluster.pod_ips("app-0");
        assert_eq!(ips.len(), 2);
        assert_eq!((ips[0].is_ipv6(), ips[1].is_ipv6()), (v6_first, !v6_first), "{ips:?}");
        let out = run(cluster.kubectl(&cluster.kubeconfig).args(["get", "pod", "app-0", "-o", "jsonpath={.status.podIP} {.status.podIPs[*].ip}"]))?;
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{} {} {}", ips[0], ips[0], ips[1]));
        // The downward API's status.podIPs, as the container sees it.
        let pid = cluster.container_pid("app-0", "app").unwrap();
        let environ = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ"))?).into_owned();
        assert!(environ.contains(&format!("POD_IPS={},{}", ips[0], ips[1])), "{environ}");
        // Both addresses are on the pod's eth0.
        let out = run(cluster.pod_exec("app-0", "ip")?.args(["-o", "addr", "show", "dev", "eth0"]))?;
        for ip in &ips {
            assert!(String::from_utf8_lossy(&out.stdout).contains(&format!(" {ip}/")), "{ip}: {}", text(&out));
        }
    }
    Ok(())
}

/// Behind a real tinyproxy: the API server's namespace has no route from the workstation;
/// kubectl gets through with the kubeconfig's proxy-url, or HTTPS_PROXY, and not without.
#[test]
fn api_server_behind_an_http_connect_proxy() -> Result<()> {
    let cluster = SimCluster::options().api_access(ApiAccess::Proxy).start(&sleepers(1))?;
    let proxy = cluster.proxy_url.clone().unwrap();
    let out = kubectl(&cluster, &cluster.kubeconfig, &["get", "pods", "--no-headers"])?;
    assert!(out.status.success() && text(&out).starts_with("app-0"), "{}", text(&out));
    let out = kubectl(&cluster, &cluster.kubeconfig_no_proxy, &["get", "pods", "--request-timeout=3s"])?;
    assert!(!out.status.success(), "reached the API server without the proxy: {}", text(&out));
    let out = cluster
        .kubectl(&cluster.kubeconfig_no_proxy)
        .args(["get", "pods", "--no-headers"])
        .env("HTTPS_PROXY", &proxy)
        .stdin(Stdio::null())
        .output()?;
    assert!(out.status.success() && text(&out).starts_with("app-0"), "{}", text(&out));
    // The Python client honours proxy-url too.
    let out = py(&cluster, &["list", path(&cluster.kubeconfig)])?;
    assert!(text(&out).contains("pod app-0 "), "{}", text(&out));
    let log = std::fs::read_to_string(cluster.dir.path().join("tinyproxy.log"))?;
    assert!(log.contains("CONNECT") && log.contains("172.31.0.2:6443"), "{log}");
    Ok(())
}

/// The delay relay: every chunk held RTT/2 each way, the client's first bytes one RTT more.
#[test]
fn delay_relay_adds_the_round_trip_time() -> Result<()> {
    beamredir_testbed::require_root()?;
    let (client_ns, server_ns) = (Netns::new("brdl")?, Netns::new("brds")?);
    let listener = server_ns.in_ns(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))??;
    let addr = listener.local_addr()?;
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut c in listener.incoming().flatten().take(4) {
            let mut b = [0u8; 1];
            while c.read_exact(&mut b).is_ok() && c.write_all(&b).is_ok() {}
        }
    });
    for rtt_ms in [0u64, 20, 80] {
        let rtt = Duration::from_millis(rtt_ms);
        let relay = DelayRelay::start(&client_ns, &server_ns.path(), addr, rtt)?;
        let port = relay.port;
        let times = client_ns.in_ns(move || -> std::io::Result<Vec<Duration>> {
            use std::io::{Read, Write};
            let mut s = TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
            s.set_nodelay(true)?;
            let mut times = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                s.write_all(b"x")?;
                let mut b = [0u8; 1];
                s.read_exact(&mut b)?;
                times.push(t.elapsed());
            }
            Ok(times)
        })??;
        let slack = Duration::from_millis(100); // scheduling on a busy 2-core machine
        assert!(times[0] >= rtt * 2 && times[0] < rtt * 2 + slack, "rtt {rtt:?}: first exchange took {:?}", times[0]);
        for t in &times[1..] {
            assert!(*t >= rtt && *t < rtt + slack, "rtt {rtt:?}: later exchange took {t:?}");
        }
    }
    // The API server behind it: kubectl works, a request costs at least the RTT.
    let cluster = SimCluster::options().api_access(ApiAccess::Delayed(Duration::from_millis(80))).start(&sleepers(1))?;
    let t = Instant::now();
    let out = kubectl(&cluster, &cluster.kubeconfig, &["get", "pods", "--no-headers"])?;
    assert!(out.status.success() && text(&out).starts_with("app-0"), "{}", text(&out));
    assert!(t.elapsed() >= Duration::from_millis(240), "handshake + TLS + request: {:?}", t.elapsed());
    Ok(())
}

/// Faults: a server that accepts and never answers port-forward upgrades (or anything), a
/// blackholed one, a stopped one; each reversible, every port-forward request counted.
#[test]
fn api_server_faults_hang_blackhole_stop_and_recover() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let kc = path(&cluster.kubeconfig).to_string();
    let get_pods = |timeout: &str| -> Result<(bool, Duration, String)> {
        let t = Instant::now();
        let out = kubectl(&cluster, &cluster.kubeconfig, &["get", "pods", "--no-headers", &format!("--request-timeout={timeout}")])?;
        Ok((out.status.success(), t.elapsed(), text(&out)))
    };
    let count = || cluster.portforward_requests().get("default/app-0").copied().unwrap_or(0);

    cluster.hang_api_server(Hang::PortForward);
    let before = count();
    let out = py(&cluster, &["portforward-hangs", &kc, "app-0", "4369", "3"])?;
    assert_eq!(text(&out).trim(), "hung", "{}", text(&out));
    assert_eq!(count(), before + 1);
    assert!(get_pods("5s")?.0, "everything else is still served");
    cluster.hang_api_server(Hang::None);
    let out = py(&cluster, &["portforward", &kc, "app-0", "4369"])?;
    assert!(text(&out).contains("name app at port 9000"), "{}", text(&out));

    cluster.hang_api_server(Hang::Everything);
    let (ok, took, t) = get_pods("2s")?;
    assert!(!ok && took < Duration::from_secs(9), "{took:?} {t}");
    cluster.hang_api_server(Hang::None);
    assert!(get_pods("5s")?.0);

    cluster.blackhole_api_server(true)?;
    let (ok, took, t) = get_pods("2s")?;
    assert!(!ok && took < Duration::from_secs(9), "{took:?} {t}");
    cluster.blackhole_api_server(false)?;
    assert!(get_pods("5s")?.0);

    cluster.stop_api_server();
    let (ok, _, t) = get_pods("2s")?;
    assert!(!ok && t.contains(&format!("The connection to the server {} was refused", cluster.url.trim_start_matches("https://"))), "{t}");
    cluster.start_api_server()?;
    let (ok, _, t) = get_pods("5s")?;
    assert!(ok, "{t}");
    Ok(())
}



/// Hostile or malformed requests get a Status (400/404/410/422, as a real server answers
/// them) and the server keeps serving.
#[test]
fn malformed_requests_get_statuses_and_the_server_keeps_serving() -> Result<()> {
    let cluster = SimCluster::start(&sleepers(1))?;
    let long_selector = format!("labelSelector={}", "a=b,".repeat(5000));
    for (query, says) in [
        ("/api/v1/namespaces/default/pods?resourceVersion=abc", "invalid resource version: abc"),
        ("/api/v1/namespaces/default/pods?limit=1&continue=%25%25garbage", "continue key is not valid"),
        ("/api/v1/namespaces/default/pods?resourceVersionMatch=Exact", "resourceVersionMatch is forbidden unless resourceVersion is provided"),
        ("/api/v1/namespaces/default/pods?resourceVersion=1&resourceVersionMatch=Sometimes", "Unsupported value: \"Sometimes\""),
        ("/api/v1/namespaces/default/pods?watch=1&sendInitialEvents=true", "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan"),
        ("/api/v1/namespaces/default/pods?labelSelector=a%20in%20b", "unable to parse requirement"),
        ("/api/v1/namespaces/default/pods?fieldSelector=spec.secret=1", "field label not supported: spec.secret"),
        ("/api/v1/namespaces/default/pods/a/b/c/d/e/f", "the server could not find the requested resource"),
        ("/api/v1/namespaces/default/widgets", "the server could not find the requested resource"),
    ] {
        let out = cluster.kubectl(&cluster.kubeconfig).args(["get", "--raw", query]).output()?;
        assert!(!out.status.success() && text(&out).contains(says), "{query}: {}", text(&out));
    }
    let out = cluster.kubectl(&cluster.kubeconfig).args(["get", "--raw", &format!("/api/v1/namespaces/default/pods?{long_selector}")]).output()?;
    assert!(out.status.success(), "{}", text(&out));
    let out = cluster.kubectl(&cluster.kubeconfig).args(["get", "--raw", "/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=99999999999999999999999&resourceVersion=999999999"]).output()?;
    assert!(text(&out).contains("Too large resource version: 999999999"), "{}", text(&out));
    let garbage = cluster.dir.path().join("garbage.json");
    std::fs::write(&garbage, "{\"spec\": [1, 2, {")?;
    let out = cluster.kubectl(&cluster.kubeconfig).args(["create", "--raw", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", "-f", path(&garbage)]).output()?;
    assert!(!out.status.success() && text(&out).contains("BadRequest"), "{}", text(&out));
    std::fs::write(&garbage, vec![b'x'; 2 << 20])?;
    let out = cluster.kubectl(&cluster.kubeconfig).args(["create", "--raw", "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", "-f", path(&garbage)]).output()?;
    assert!(!out.status.success() && text(&out).contains("Request entity too large"), "{}", text(&out));
    let out = run(cluster.kubectl(&cluster.kubeconfig).args(["get", "pods", "--no-headers"]))?;
    assert!(text(&out).starts_with("app-0"));
    Ok(())
}
