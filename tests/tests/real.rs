//! Issue 9, "Real clusters, not just ours": what EKS, GKE, AKS and kind users meet that the
//! happy path does not. Least-privilege RBAC on 1.34 and 1.35, pods Running but not Ready,
//! nodes without epmd, an API server behind a proxy, credential plugins under sudo, dual-stack
//! pods, every naming scheme, sidecars, watches that expire while the API server is away, pods
//! that move while a node still has their old address, many pods over a slow link, and the
//! kernel side's corner cases. Everything runs against the simulated cluster
//! (docs/simulated-cluster.md) or a `map` session, as root.
use std::{
    collections::BTreeSet,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use beamredir_testbed::{
    Graceful, Interactive, Netns, TempDir, beamredir_bin, bpftool_cgroup_programs, cgroup2_root,
    cluster::{ApiAccess, EXAMPLE_MANIFEST, HistoryWindow, IpAllocation, IpFamily, SimCluster},
    hidden_node_args, run, text, unique, unique_pod_ip, wait_until,
};
use serde_json::{Value, json};

const COOKIE: &str = "secret";
/// The long name of the local node that calls the pods.
const DEBUG: &[&str] = &["-name", "debug@127.0.0.1"];
const RBAC_EXAMPLE: &str = include_str!("../../docs/examples/rbac.yaml");
const SECRET_MANIFEST: &str = include_str!("../manifests/secret-cookie.yaml");

fn status_of(cluster: &SimCluster, state: &TempDir, session: &str) -> Option<Value> {
    cluster.session_status(state.path(), session)
}

/// The session's redirects as (pod endpoint, local forward endpoint).
fn redirects(status: &Value) -> Vec<(String, String)> {
    status["redirects"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    (
                        r["pod"].as_str().unwrap_or("").to_string(),
                        r["local"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The redirects at one pod address, by port.
fn redirects_at(status: &Value, ip: IpAddr) -> Vec<(u16, String)> {
    redirects(status)
        .into_iter()
        .filter_map(|(pod, local)| {
            let pod: SocketAddr = pod.parse().ok()?;
            (pod.ip() == ip).then_some((pod.port(), local))
        })
        .collect()
}

fn connects_at(status: &Value, pod: &str) -> u64 {
    status["redirects"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["pod"] == pod)
        .and_then(|r| r["connects"].as_u64())
        .unwrap_or(0)
}

fn pod_info<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["pods"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name)
}

/// `erl` in the session (hidden, the cluster's cookie), running SCRIPT; its output.
fn erl_in_session(
    cluster: &SimCluster,
    state: &TempDir,
    session: &str,
    flags: &[&str],
    script: &str,
) -> Result<String> {
    let out = cluster
        .beamredir(state.path())
        .args([
            "exec",
            "--session",
            session,
            "--",
            "erl",
            "-setcookie",
            COOKIE,
            "-hidden",
            "-noshell",
        ])
        .args(flags)
        .args(["-eval", script])
        .env("HOME", state.path())
        .stdin(Stdio::null())
        .output()?;
    Ok(text(&out))
}

/// Pings each node and calls `erlang:node()` on it over rpc: `ping=[pong,…] rpc=[Node,…]`.
fn ping_and_rpc(nodes: &[String]) -> String {
    let list = nodes
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(",");
    format!(
        "Ns = [{list}], P = [net_adm:ping(N) || N <- Ns], R = [rpc:call(N, erlang, node, [], 10000) || N <- Ns], \
         io:format(\"ping=~w~nrpc=~w~n\", [P, R]), halt()."
    )
}

/// A hidden local node in the session (`flags` name it) pings each of `nodes` and calls
/// `erlang:node()` there over rpc: every ping answers pong, every call the node's own name.
fn expect_reached(
    cluster: &SimCluster,
    state: &TempDir,
    session: &str,
    flags: &[&str],
    nodes: &[String],
) -> Result<()> {
    let out = erl_in_session(cluster, state, session, flags, &ping_and_rpc(nodes))?;
    expect_pongs(&out, nodes);
    Ok(())
}

fn expect_pongs(out: &str, nodes: &[String]) {
    let pongs = vec!["pong"; nodes.len()].join(",");
    let names = nodes
        .iter()
        .map(|n| format!("'{n}'"))
        .collect::<Vec<_>>()
        .join(",");
    assert!(
        out.contains(&format!("ping=[{pongs}]")) && out.contains(&format!("rpc=[{names}]")),
        "{out}"
    );
}

/// Listening TCP ports in the workstation (to check nothing was left listening).
fn listening(cluster: &SimCluster) -> Result<Vec<String>> {
    let out = run(cluster.ws.command("ss").args(["-Hltn"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3).map(String::from))
        .collect())
}

/// What a failed `up` must not leave: files in the state dir, the session's cgroup, programs
/// on the root cgroup (bpftool's view), listeners.
struct Leftovers {
    programs: Vec<(String, String)>,
    listening: Vec<String>,
}

impl Leftovers {
    fn before(cluster: &SimCluster) -> Result<Self> {
        Ok(Leftovers {
            programs: bpftool_cgroup_programs(&cgroup2_root()?)?,
            listening: listening(cluster)?,
        })
    }

    fn check(
        &self,
        cluster: &SimCluster,
        state: &TempDir,
        session: &str,
        what: &str,
    ) -> Result<()> {
        let left: Vec<_> = std::fs::read_dir(state.path())?
            .filter_map(Result::ok)
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().starts_with(".erlang.cookie"))
            .collect();
        ensure!(left.is_empty(), "{what} left {left:?}");
        ensure!(
            !cgroup2_root()?.join("beamredir").join(session).exists(),
            "{what} left its cgroup"
        );
        ensure!(
            bpftool_cgroup_programs(&cgroup2_root()?)? == self.programs,
            "{what} changed the root cgroup's programs"
        );
        ensure!(
            listening(cluster)? == self.listening,
            "{what} left a listener"
        );
        Ok(())
    }
}

/// `beamredir up … -- true` that must fail: returns its one line of stderr.
fn up_fails(
    cluster: &SimCluster,
    state: &TempDir,
    session: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<String> {
    let mut cmd = cluster.beamredir(state.path());
    for proxy_var in ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"] {
        cmd.env_remove(proxy_var);
    }
    let out = cmd
        .args(["up", "--session", session])
        .args(args)
        .args(["--", "true"])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    ensure!(!out.status.success(), "{args:?} succeeded:\n{}", text(&out));
    ensure!(
        stderr.lines().count() == 1,
        "{args:?}: not one line:\n{stderr}"
    );
    Ok(stderr)
}

/// A real unprivileged user with a home, to play the one who ran `sudo beamredir`:
/// (name, home, uid, gid). Created once per machine.
fn sudo_user() -> Result<(&'static str, PathBuf, String, String)> {
    let user = "beamredir-test";
    let home = PathBuf::from("/var/tmp/beamredir-test-home");
    if Command::new("id").arg(user).output()?.status.code() != Some(0) {
        run(Command::new("useradd")
            .args(["--system", "--create-home", "--home-dir"])
            .arg(&home)
            .args(["--shell", "/bin/sh", user]))?;
    }
    let id = |flag: &str| -> Result<String> {
        Ok(
            String::from_utf8(run(Command::new("id").args([flag, user]))?.stdout)?
                .trim()
                .to_string(),
        )
    };
    Ok((user, home, id("-u")?, id("-g")?))
}

/// sudo's `secure_path` on Debian and Ubuntu.
const SECURE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

// ---------------------------------------------------------------------------------------------
// 1. Authorization of port-forward.

/// docs/examples/rbac.yaml's `beamredir-up` Role without `verb` on `resource` (in `group`),
/// as a Role and a RoleBinding for `user` (JSON, which is YAML).
fn up_role_without(user: &str, group: &str, resource: &str, verb: &str) -> Result<String> {
    let docs = beamredir_testbed::cluster::kubelet::parse_manifest(RBAC_EXAMPLE)?;
    let mut role = docs
        .iter()
        .find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "beamredir-up")
        .cloned()
        .context("no beamredir-up Role")?;
    let name = format!("beamredir-up-{}", user.replace(['@', '.'], "-"));
    role["metadata"]["name"] = json!(name);
    let mut removed = false;
    for rule in role["rules"].as_array_mut().context("rules")? {
        if rule["apiGroups"] == json!([group]) && rule["resources"] == json!([resource]) {
            let verbs = rule["verbs"].as_array_mut().context("verbs")?;
            let before = verbs.len();
            verbs.retain(|v| v != verb);
            removed = verbs.len() < before;
        }
    }
    ensure!(
        removed,
        "the example Role has no {verb} on {group}/{resource}"
    );
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": name, "namespace": "default"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    });
    Ok(format!("{role}\n---\n{binding}\n"))
}

/// The shipped Role is enough for `up` (by StatefulSet, Service and name) and the remsh Role
/// for `rpc`, on 1.34 and 1.35. With each verb missing in turn, `up` fails with one line that
/// names exactly that verb and resource and the rule to add, and leaves nothing behind. A
/// refused port-forward carries no reason, so beamredir asks the API server
/// (SelfSubjectAccessReview) which verb is missing: on 1.35 a Role with `get` only on
/// pods/portforward is refused for want of `create`, and the message says why; on 1.34 the
/// same Role works.
#[test]
fn least_privilege_roles_work_and_each_missing_verb_is_named_with_its_rule() -> Result<()> {
    for minor in [34, 35] {
        let cluster = SimCluster::options()
            .version(minor)
            .rbac(RBAC_EXAMPLE)
            .wait_ready(false)
            .start(SECRET_MANIFEST)?;
        let pod = cluster.wait_ready("default", "app-0", Duration::from_secs(90))?;
        let ip = pod.status.and_then(|s| s.pod_ip).context("pod IP")?;
        let node = format!("app@{ip}");
        let state = TempDir::new("brstate")?;
        let dev = cluster.kubeconfig_for("dev@example.com")?;
        let ops = cluster.kubeconfig_for("ops@example.com")?;
        let dev_kc = dev.to_str().unwrap();

        // The Role as shipped: up by StatefulSet and by Service, and a local node reaches the pod.
        let cookie = "cookie-from-a-secret";
        for source in [["--statefulset", "app"], ["--service", "app"]] {
            let out = cluster
                .beamredir(state.path())
                .args(["up", "--kubeconfig", dev_kc, "--session", &unique("rbac")])
                .args(source)
                .args(["--", "erl"])
                .args(hidden_node_args(
                    "debug@127.0.0.1",
                    cookie,
                    &ping_and_rpc(std::slice::from_ref(&node)),
                ))
                .env("HOME", state.path())
                .stdin(Stdio::null())
                .output()?;
            assert!(out.status.success(), "1.{minor} {source:?}: {}", text(&out));
            expect_pongs(&text(&out), std::slice::from_ref(&node));
        }

        // Each verb missing in turn.
        let before = Leftovers::before(&cluster)?;
        let session = unique("rbac");
        let rule = |group: &str, resource: &str, verbs: &str| {
            format!(
                "grant it with a Role rule {{apiGroups: [\"{group}\"], resources: [\"{resource}\"], verbs: [{verbs}]}} (see docs/examples/rbac.yaml)"
            )
        };
        // (API group, resource, the verb taken away, up's pod flags, the 403 line expected, or
        // None where up succeeds without that verb)
        type Case<'a> = (&'a str, &'a str, &'a str, Vec<&'a str>, Option<String>);
        let cases: Vec<Case> = vec![
            ("", "pods", "get", vec!["--pod", "app-0"], Some(format!("you may not get pods in namespace \"default\" (pods \"app-0\" is forbidden: User \"dev-get@example.com\" cannot get resource \"pods\" in API group \"\" in the namespace \"default\"); {}", rule("", "pods", "\"get\"")))),
            ("", "pods", "list", vec!["--pod", "app-0"], Some(format!("you may not list pods in namespace \"default\" ({}); {}", "pods \"app-0\" is forbidden: User \"dev-list@example.com\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\"", rule("", "pods", "\"list\"")))),
            ("", "pods", "list", vec!["--statefulset", "app"], Some(format!("you may not list pods in namespace \"default\" (pods is forbidden: User \"dev-list@example.com\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\"); {}", rule("", "pods", "\"list\"")))),
            ("", "pods", "watch", vec!["--pod", "app-0"], Some(format!("you may not watch pods in namespace \"default\" (pods \"app-0\" is forbidden: User \"dev-watch@example.com\" cannot watch resource \"pods\" in API group \"\" in the namespace \"default\"); {}", rule("", "pods", "\"watch\"")))),
            ("", "pods", "watch", vec!["--statefulset", "app"], Some(format!("you may not watch pods in namespace \"default\" (pods is forbidden: User \"dev-watch@example.com\" cannot watch resource \"pods\" in API group \"\" in the namespace \"default\"); {}", rule("", "pods", "\"watch\"")))),
            ("", "pods/portforward", "get", vec!["--pod", "app-0"], Some(format!("you may not get pods/portforward in namespace \"default\" (pods \"app-0\" is forbidden: User \"dev-get@example.com\" cannot get resource \"pods/portforward\" in API group \"\" in the namespace \"default\"); {}", rule("", "pods/portforward", "\"get\", \"create\"")))),
            (
                "",
                "pods/portforward",
                "create",
                vec!["--pod", "app-0"],
                (minor >= 35).then(|| {
                    format!(
                        "you may not create pods/portforward in namespace \"default\" (pods \"app-0\" is forbidden: User \"dev-create@example.com\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"default\"); {}",
                        rule("", "pods/portforward", "\"get\", \"create\"").replace("(see", "(Kubernetes 1.35 and later also require create for WebSocket port-forwards; see")
                    )
                }),
            ),
            ("apps", "statefulsets", "get", vec!["--statefulset", "app"], Some(format!("you may not get statefulsets.apps in namespace \"default\" (statefulsets.apps \"app\" is forbidden: User \"dev-get@example.com\" cannot get resource \"statefulsets\" in API group \"apps\" in the namespace \"default\"); {}", rule("apps", "statefulsets", "\"get\"")))),
            ("", "services", "get", vec!["--service", "app"], Some(format!("you may not get services in namespace \"default\" (services \"app\" is forbidden: User \"dev-get@example.com\" cannot get resource \"services\" in API group \"\" in the namespace \"default\"); {}", rule("", "services", "\"get\"")))),
        ];
        for (group, resource, verb, args, says) in cases {
            // One user per Role, named after the verb it lacks (the 403 messages name the user).
            let user = format!("dev-{verb}-{}@example.com", resource.replace('/', "-"));
            cluster.apply_rbac(&up_role_without(&user, group, resource, verb)?)?;
            let kc = cluster.kubeconfig_for(&user)?;
            let mut full: Vec<&str> = vec!["--kubeconfig", kc.to_str().unwrap()];
            full.extend(&args);
            let what = format!("1.{minor} without {verb} on {resource} ({args:?})");
            match says {
                Some(says) => {
                    let says = says.replace(&format!("dev-{verb}@example.com"), &user);
                    let line = up_fails(&cluster, &state, &session, &full, &[])?;
                    eprintln!("{what}: {line}");
                    assert_eq!(
                        line,
                        format!("beamredir: error: forbidden (403): {says}"),
                        "{what}"
                    );
                    before.check(&cluster, &state, &session, &what)?;
                }
                None => {
                    // 1.34: `get` is all a WebSocket port-forward needs.
                    let out = cluster
                        .beamredir(state.path())
                        .args(["up", "--session", &session])
                        .args(&full)
                        .args(["--", "true"])
                        .stdin(Stdio::null())
                        .output()?;
                    assert!(out.status.success(), "{what}: {}", text(&out));
                }
            }
        }
        if minor >= 35 {
            // The port-forward's refusal was explained by asking the API server.
            assert!(
                cluster
                    .audit()
                    .iter()
                    .any(|a| a.starts_with("create selfsubjectaccessreviews")),
                "{:?}",
                cluster.audit()
            );
        }

        // rpc finds the cookie in the pod's Secret: the up Role may not read it (one line
        // naming the Secret and the rule), the remsh Role may.
        let rpc = |kc: &Path| {
            cluster
                .beamredir(state.path())
                .args(["rpc", "--kubeconfig"])
                .arg(kc)
                .args(["app-0", "node()."])
                .stdin(Stdio::null())
                .output()
        };
        let out = rpc(&dev)?;
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            "beamredir: error: cannot read Secret erlang-cookie in namespace default (forbidden), which holds the cookie; a Role in default with `apiGroups: [\"\"], resources: [\"secrets\"], verbs: [\"get\"], resourceNames: [\"erlang-cookie\"]` allows it, or pass --cookie-file"
        );
        let out = rpc(&ops)?;
        assert!(out.status.success(), "1.{minor}: {}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("'{node}'")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 2. Running but not Ready; 3. nodes without epmd.

/// One Erlang node per pod, named `app@POD_IP`, with `ARGS` (YAML flow list items) after its
/// name and cookie, and `EXTRA` container fields.
fn erl_statefulset(name: &str, replicas: u32, args: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: {name}, namespace: default}}
spec:
  serviceName: {name}
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
        - name: app
          command: ["erl"]
          args: ["-name", "app@$(HOST)", "-setcookie", "{COOKIE}", "-noshell", "-noinput", {args}]
          env: [{{name: HOST, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}]
{extra}
"#
    )
}

/// A pod whose readiness probe fails is still reachable (Running is what port-forward needs);
/// the banner and `status` say it is not Ready. Readiness flapping while a local node is
/// connected never touches the redirects (sampled from `status -o json` all along) and never
/// interrupts the node's rpc calls.
#[test]
fn running_but_not_ready_pods_are_reached_and_readiness_flaps_leave_the_redirects_alone()
-> Result<()> {
    let manifest = erl_statefulset(
        "app",
        1,
        r#""-kernel", "inet_dist_listen_min", "9000", "inet_dist_listen_max", "9000""#,
        r#"          ports: [{name: epmd, containerPort: 4369}, {name: erlang, containerPort: 9000}]
          readinessProbe:
            exec: {command: ["sh", "-c", "test ! -e \"$HOME/unready\""]}
            periodSeconds: 1
            failureThreshold: 1"#,
    );
    let cluster = SimCluster::start(&manifest)?;
    let ip = cluster.pod_ip("app-0").context("pod IP")?;
    let node = format!("app@{ip}");
    let unready = cluster
        .pod_home("app-0")
        .context("pod home")?
        .join("unready");
    std::fs::write(&unready, "")?;
    cluster.wait_not_ready("app-0", Duration::from_secs(30))?;

    let state = TempDir::new("brstate")?;
    let session = unique("ready");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0"], &log)?;
    let banner = std::fs::read_to_string(&log)?;
    assert!(
        banner.contains(&format!(
            "pod       app-0  {ip}  not Ready  epmd 4369  dist 9000"
        )),
        "{banner}"
    );
    let status = status_of(&cluster, &state, &session).context("status")?;
    let pod = pod_info(&status, "app-0").context("app-0 in status")?;
    assert_eq!(
        (pod["ready"].as_bool(), pod["state"].as_str()),
        (Some(false), Some("Running")),
        "{status:#}"
    );
    let table =
        String::from_utf8_lossy(&run(cluster.beamredir(state.path()).arg("status"))?.stdout)
            .to_string();
    assert!(
        table.contains(&format!("pod default/app-0  {ip}  not Ready  Running")),
        "{table}"
    );
    let initial: BTreeSet<(String, String)> = redirects(&status).into_iter().collect();
    assert_eq!(initial.len(), 2, "{status:#}");

    // A local node connected to the pod, calling it every 200 ms and reporting any nodedown.
    let script = format!(
        "N = '{node}', pong = net_adm:ping(N), ok = net_kernel:monitor_nodes(true), io:format(\"connected~n\"), \
         L = fun L(K) -> receive {{nodedown, D}} -> io:format(\"nodedown ~p~n\", [D]), L(K) after 200 -> \
         io:format(\"rpc ~p ~p~n\", [K, rpc:call(N, erlang, node, [], 2000)]), L(K + 1) end end, L(0)."
    );
    let local = Interactive::spawn(
        cluster
            .beamredir(state.path())
            .args(["exec", "--session", &session, "--", "erl"])
            .args(hidden_node_args("debug@127.0.0.1", COOKIE, &script))
            .env("HOME", state.path()),
    )?;
    local.expect("connected", Duration::from_secs(30))?;

    // Ready, not Ready, Ready again, each seen by the session, while a sampler reads `status`.
    let samples = std::sync::Mutex::new(Vec::new());
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<()> {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if let Some(s) = status_of(&cluster, &state, &session) {
                    let ready = pod_info(&s, "app-0").and_then(|p| p["ready"].as_bool());
                    samples
                        .lock()
                        .unwrap()
                        .push((ready, redirects(&s).into_iter().collect::<BTreeSet<_>>()));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let seen = |needle: &str, times: usize| {
            wait_until(
                &format!("the session to log {needle:?} {times} time(s)"),
                Duration::from_secs(30),
                || {
                    std::fs::read_to_string(&log)
                        .unwrap_or_default()
                        .matches(needle)
                        .count()
                        >= times
                },
            )
        };
        let flap = || -> Result<()> {
            std::fs::remove_file(&unready)?;
            cluster.wait_ready("default", "app-0", Duration::from_secs(30))?;
            seen("pod default/app-0 is Ready", 1)?;
            std::fs::write(&unready, "")?;
            cluster.wait_not_ready("app-0", Duration::from_secs(30))?;
            seen(
                "pod default/app-0 is not Ready (still redirected: it is Running)",
                1,
            )?;
            std::fs::remove_file(&unready)?;
            cluster.wait_ready("default", "app-0", Duration::from_secs(30))?;
            seen("pod default/app-0 is Ready", 2)?;
            Ok(())
        };
        let result = flap();
        stop.store(true, Ordering::Relaxed);
        result
    })?;
    let samples = samples.into_inner().unwrap();
    assert!(
        samples.iter().any(|(r, _)| *r == Some(false))
            && samples.iter().any(|(r, _)| *r == Some(true)),
        "the sampler saw both states: {samples:?}"
    );
    for (ready, set) in &samples {
        assert_eq!(set, &initial, "the redirects changed while ready={ready:?}");
    }
    // The node stayed connected and every call was answered.
    let out = local.output();
    let calls: Vec<&str> = out.lines().filter(|l| l.starts_with("rpc ")).collect();
    assert!(calls.len() >= 5, "{out}");
    assert!(
        calls.iter().all(|l| l.ends_with(&format!("'{node}'"))),
        "{out}"
    );
    assert!(!out.contains("nodedown"), "{out}");
    Ok(())
}

/// A node started with `-start_epmd false -erl_epmd_port PORT` has no epmd: `up` takes the
/// distribution port from the spec, probes no epmd, and the banner prints the flags a local
/// node needs to do the same; a local node started with exactly those flags pings the pod's
/// node and calls it.
#[test]
fn epmd_less_nodes_are_reached_with_the_flags_the_banner_prints() -> Result<()> {
    let manifest = erl_statefulset(
        "app",
        1,
        r#""-start_epmd", "false", "-erl_epmd_port", "9100""#,
        "          ports: [{containerPort: 9100}]",
    );
    let cluster = SimCluster::start(&manifest)?;
    let ip = cluster.pod_ip("app-0").context("pod IP")?;
    let node = format!("app@{ip}");
    // No epmd in the pod.
    let ss = String::from_utf8_lossy(&run(cluster.pod_exec("app-0", "ss")?.arg("-Hltn"))?.stdout)
        .to_string();
    assert!(ss.contains(":9100") && !ss.contains(":4369"), "{ss}");

    let state = TempDir::new("brstate")?;
    let session = unique("noepmd");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0"], &log)?;
    let banner = std::fs::read_to_string(&log)?;
    assert!(
        banner.contains(&format!(
            "pod       app-0  {ip}  Ready  no epmd  dist 9100  node {node}"
        )),
        "{banner}"
    );
    let hint = banner
        .lines()
        .find(|l| {
            l.trim_start()
                .starts_with("erl -name debug@127.0.0.1 -hidden")
        })
        .with_context(|| banner.clone())?;
    let words: Vec<&str> = hint.split_whitespace().collect();
    let (from, to) = (
        words.iter().position(|w| *w == "-hidden").unwrap() + 1,
        words
            .iter()
            .position(|w| *w == "-remsh")
            .with_context(|| hint.to_string())?,
    );
    let flags = &words[from..to];
    assert_eq!(
        flags,
        ["-start_epmd", "false", "-erl_epmd_port", "9100"],
        "{hint}"
    );
    assert_eq!(words[to + 1], node, "{hint}");
    // Only the dist port is redirected: no epmd port.
    let status = status_of(&cluster, &state, &session).context("status")?;
    assert_eq!(
        redirects_at(&status, IpAddr::V4(ip))
            .into_iter()
            .map(|(p, _)| p)
            .collect::<Vec<_>>(),
        [9100],
        "{status:#}"
    );

    let mut erl_flags = DEBUG.to_vec();
    erl_flags.extend(flags);
    expect_reached(
        &cluster,
        &state,
        &session,
        &erl_flags,
        std::slice::from_ref(&node),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 4. Proxies; 5. credential plugins named without a path.

/// A corporate laptop: the API server is reachable only through an HTTP CONNECT proxy
/// (tinyproxy), and credentials come from a plugin in the user's own ~/bin, run under sudo.
///
/// * `up` works through the kubeconfig's `proxy-url`, and through `HTTPS_PROXY` with a
///   kubeconfig that has none; with neither it fails with one line that says it went direct;
///   `NO_PROXY` naming the API server (or its network) makes it go direct, and fail, as kubectl
///   does (and as kube-client alone did not: it matched NO_PROXY against the proxy's address);
/// * under sudo (HOME=/root, sudo's secure_path, SUDO_UID/SUDO_GID/SUDO_USER of a real user) a
///   plugin named by bare name in the kubeconfig, present only in that user's ~/bin, is found
///   and runs as the user, with the user's HOME, the kubeconfig's `env`, and not root's
///   environment.
#[test]
fn behind_a_proxy_with_a_credential_plugin_in_the_users_own_bin_under_sudo() -> Result<()> {
    let cluster = SimCluster::options()
        .api_access(ApiAccess::Proxy)
        .start(EXAMPLE_MANIFEST)?;
    let proxy = cluster.proxy_url.clone().context("proxy URL")?;
    let api_host = "172.31.0.2";
    let ip = cluster.pod_ip("app-0").context("pod IP")?;
    let node = format!("app@{ip}");
    let state = TempDir::new("brstate")?;
    let tinyproxy_log =
        || std::fs::read_to_string(cluster.dir.path().join("tinyproxy.log")).unwrap_or_default();
    let up_pings = |kubeconfig: &Path, env: &[(&str, &str)]| -> Result<String> {
        let out = cluster
            .beamredir(state.path())
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env("KUBECONFIG", kubeconfig)
            .envs(env.iter().copied())
            .args([
                "up",
                "--pod",
                "app-0",
                "--session",
                &unique("proxy"),
                "--",
                "erl",
            ])
            .args(hidden_node_args(
                "debug@127.0.0.1",
                COOKIE,
                &ping_and_rpc(std::slice::from_ref(&node)),
            ))
            .env("HOME", state.path())
            .stdin(Stdio::null())
            .output()?;
        ensure!(out.status.success(), "{}", text(&out));
        Ok(text(&out))
    };

    // proxy-url in the kubeconfig.
    let connects_before = tinyproxy_log().matches("CONNECT").count();
    let out = up_pings(&cluster.kubeconfig, &[])?;
    expect_pongs(&out, std::slice::from_ref(&node));
    assert!(out.contains(&format!("  cluster   https://{api_host}:6443 (from KUBECONFIG={}), namespace default, through proxy {proxy}", cluster.kubeconfig.display())), "{out}");
    // Every API request and port-forward went through tinyproxy (the lookup, the epmd probe,
    // the node probe, the local node's epmd and distribution connections).
    assert!(
        tinyproxy_log().matches("CONNECT").count() >= connects_before + 5,
        "{}",
        tinyproxy_log()
    );
    // A NO_PROXY naming the API server does not apply to a kubeconfig's proxy-url (client-go).
    let out = up_pings(&cluster.kubeconfig, &[("NO_PROXY", api_host)])?;
    expect_pongs(&out, std::slice::from_ref(&node));

    // HTTPS_PROXY with a kubeconfig that names no proxy.
    let out = up_pings(&cluster.kubeconfig_no_proxy, &[("HTTPS_PROXY", &proxy)])?;
    expect_pongs(&out, std::slice::from_ref(&node));
    assert!(out.contains(&format!("through proxy {proxy}")), "{out}");

    // Neither: the workstation has no route to the API server. One line, saying it went direct.
    let session = unique("proxy");
    let before = Leftovers::before(&cluster)?;
    let no_proxy_kc = cluster.kubeconfig_no_proxy.to_str().unwrap();
    let line = up_fails(
        &cluster,
        &state,
        &session,
        &["--kubeconfig", no_proxy_kc, "--pod", "app-0"],
        &[],
    )?;
    assert!(
        line.starts_with(&format!(
            "beamredir: error: cannot reach the Kubernetes API server at https://{api_host}:6443 (directly: no proxy is set; if the API server is only reachable through one, set proxy-url in the kubeconfig's cluster or HTTPS_PROXY): "
        )) && line.contains("Network is unreachable"),
        "{line}"
    );
    before.check(&cluster, &state, &session, "no proxy")?;
    // NO_PROXY matching the API server (by address, by network, or `*`): direct, and so the same failure.
    for no_proxy in [api_host, "172.31.0.0/16", "*"] {
        let line = up_fails(
            &cluster,
            &state,
            &session,
            &["--kubeconfig", no_proxy_kc, "--pod", "app-0"],
            &[("HTTPS_PROXY", &proxy), ("NO_PROXY", no_proxy)],
        )?;
        assert!(
            line.starts_with(&format!("beamredir: error: cannot reach the Kubernetes API server at https://{api_host}:6443 (directly: NO_PROXY matches it): ")) && line.contains("Network is unreachable"),
            "NO_PROXY={no_proxy}: {line}"
        );
        before.check(&cluster, &state, &session, "NO_PROXY")?;
    }
    // NO_PROXY naming something else (here: the proxy itself) leaves the proxy in use.
    let out = up_pings(
        &cluster.kubeconfig_no_proxy,
        &[
            ("HTTPS_PROXY", &proxy),
            ("NO_PROXY", "172.30.0.1,example.com"),
        ],
    )?;
    expect_pongs(&out, std::slice::from_ref(&node));

    // The credential plugin, by bare name, only in the invoking user's ~/bin.
    let (user, home, uid, gid) = sudo_user()?;
    let plugin = unique("beamredir-test-cred-");
    let bin = home.join("bin");
    std::fs::create_dir_all(&bin)?;
    let chown =
        |p: &Path| run(Command::new("chown").arg(format!("{uid}:{gid}")).arg(p)).map(|_| ());
    chown(&bin)?;
    let token = std::fs::read_to_string(&cluster.kubeconfig)?
        .lines()
        .find_map(|l| l.trim().strip_prefix("token: ").map(String::from))
        .context("token")?;
    let witness = home.join(format!("{plugin}.env"));
    let script = bin.join(&plugin);
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{{ echo \"UID=$(id -u)\"; env; }} > \"$HOME/{plugin}.env\"\n\
             echo '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{token}\"}}}}'\n"
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    chown(&script)?;
    let _cleanup = RemoveOnDrop(vec![script.clone(), witness.clone()]);
    let kc_dir = TempDir::new("brkc")?;
    std::fs::set_permissions(
        kc_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let exec = |command: &str| {
        format!(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {command}\n      env:\n        - name: FROM_THE_KUBECONFIG\n          value: set-in-kubeconfig\n      interactiveMode: Never"
        )
    };
    let kubeconfig = std::fs::read_to_string(&cluster.kubeconfig)?;
    let kc = kc_dir.path().join("kubeconfig");
    std::fs::write(
        &kc,
        kubeconfig.replace(&format!("    token: {token}"), &exec(&plugin)),
    )?;
    let missing_kc = kc_dir.path().join("kubeconfig-missing");
    std::fs::write(
        &missing_kc,
        kubeconfig.replace(
            &format!("    token: {token}"),
            &exec("no-such-credential-plugin"),
        ),
    )?;
    // Exactly what `sudo beamredir up` passes on (Debian's sudoers: env_reset, secure_path).
    let sudo = |kubeconfig: &Path| {
        let mut cmd = cluster.ws.command(beamredir_bin());
        cmd.env_clear()
            .envs([
                ("PATH", SECURE_PATH),
                ("HOME", "/root"),
                ("USER", "root"),
                ("LOGNAME", "root"),
                ("SHELL", "/bin/bash"),
                ("TERM", "dumb"),
                ("MAIL", "/var/mail/root"),
                ("SUDO_USER", user),
                ("SUDO_UID", &uid),
                ("SUDO_GID", &gid),
                ("SUDO_COMMAND", "/usr/local/bin/beamredir up"),
            ])
            .env("BEAMREDIR_STATE_DIR", state.path())
            .args(["up", "--kubeconfig"])
            .arg(kubeconfig)
            .args([
                "--pod",
                "app-0",
                "--session",
                &unique("plugin"),
                "--",
                "true",
            ])
            .stdin(Stdio::null());
        cmd
    };
    let out = sudo(&kc).output()?;
    assert!(out.status.success(), "{}", text(&out));
    let seen = std::fs::read_to_string(&witness).context("the plugin did not run")?;
    eprintln!("the credential plugin's environment:\n{seen}");
    let vars: Vec<&str> = seen.lines().collect();
    for want in [
        format!("UID={uid}"),
        format!("HOME={}", home.display()),
        format!("USER={user}"),
        "FROM_THE_KUBECONFIG=set-in-kubeconfig".into(),
    ] {
        assert!(
            vars.contains(&want.as_str()),
            "{want} not in the plugin's environment:\n{seen}"
        );
    }
    let path = vars
        .iter()
        .find_map(|v| v.strip_prefix("PATH="))
        .context("no PATH")?;
    assert!(
        path.split(':').any(|d| Path::new(d) == bin),
        "the user's ~/bin is on the plugin's PATH: {path}"
    );
    assert!(
        !vars
            .iter()
            .any(|v| v.starts_with("SUDO_") || *v == "HOME=/root" || v.starts_with("MAIL=")),
        "root's environment leaked:\n{seen}"
    );
    // A plugin found nowhere: one line naming it and where it was looked for.
    let out = sudo(&missing_kc).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(
        !out.status.success() && stderr.lines().count() == 1,
        "{stderr}"
    );
    assert!(
        stderr.starts_with("beamredir: error: credential plugin \"no-such-credential-plugin\" (kubeconfig user \"sim-admin\") was not found in your PATH (looked in ")
            && stderr.contains(&bin.display().to_string()),
        "{stderr}"
    );
    Ok(())
}

/// Files removed when dropped (also when the test fails).
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Dual-stack pods; 7. naming schemes; 8. several containers.

/// A dual-stack pod whose primary address is IPv6 (status.podIP) with an IPv4 one in
/// status.podIPs: `up` redirects both families, the hosts file maps its DNS name to both, and
/// a local node on IPv4 distribution reaches it by that name. A raw IPv6 connection to the pod's
/// IPv6 address reaches its epmd too (the inet6 node case is tested with the IPv6 work).
#[test]
fn dual_stack_pods_are_redirected_in_both_families_and_reached_over_ipv4() -> Result<()> {
    let manifest = r#"
apiVersion: v1
kind: Service
metadata: {name: app, namespace: default}
spec:
  clusterIP: None
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv6, IPv4]
  selector: {app: app}
  ports: [{name: epmd, port: 4369}]
---
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
          command: ["erl"]
          args: ["-name", "app@$(POD_NAME).app.default.svc.cluster.local", "-setcookie", "secret", "-noshell", "-noinput",
                 "-kernel", "inet_dist_listen_min", "9000", "inet_dist_listen_max", "9000"]
          env: [{name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}]
          ports: [{name: epmd, containerPort: 4369}, {name: erlang, containerPort: 9000}]
"#;
    let cluster = SimCluster::options()
        .ip_family(IpFamily::DualStackV6Primary)
        .start(manifest)?;
    let ips = cluster.pod_ips("app-0");
    let (v6, v4) = match ips[..] {
        [v6 @ IpAddr::V6(_), v4 @ IpAddr::V4(_)] => (v6, v4),
        _ => bail!("not IPv6-primary dual-stack: {ips:?}"),
    };
    let state = TempDir::new("brstate")?;
    let session = unique("dual");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--statefulset", "app"], &log)?;
    let status = status_of(&cluster, &state, &session).context("status")?;
    for ip in [v6, v4] {
        let ports: BTreeSet<u16> = redirects_at(&status, ip)
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(ports, [4369, 9000].into(), "{ip}: {status:#}");
    }
    let pod = pod_info(&status, "app-0").context("pod")?;
    assert_eq!(
        pod["ips"],
        json!([v6.to_string(), v4.to_string()]),
        "{status:#}"
    );
    let hosts = std::fs::read_to_string(state.path().join(format!("{session}.hosts")))?;
    for ip in [v6, v4] {
        let line = hosts
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&ip.to_string()))
            .with_context(|| hosts.clone())?;
        assert!(
            line.split_whitespace()
                .any(|n| n == "app-0.app.default.svc.cluster.local"),
            "{hosts}"
        );
    }
    let node = "app@app-0.app.default.svc.cluster.local".to_string();
    expect_reached(&cluster, &state, &session, DEBUG, std::slice::from_ref(&node))?;
    // IPv6 still reaches the pod: NAMES to its epmd at [v6]:4369.
    let names = "import socket,sys; s=socket.create_connection((sys.argv[1], 4369), timeout=10); s.sendall(b'\\x00\\x01n'); d=b''\nwhile True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\nprint(d[4:].decode())";
    let out = run(cluster.beamredir(state.path()).args([
        "exec",
        "--session",
        &session,
        "--",
        "python3",
        "-c",
        names,
        &v6.to_string(),
    ]))?;
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("name app at port 9000"),
        "{}",
        text(&out)
    );
    Ok(())
}

/// The session's hosts file line for `ip`, as its names.
fn host_names(state: &TempDir, session: &str, ip: IpAddr) -> Result<Vec<String>> {
    let hosts = std::fs::read_to_string(state.path().join(format!("{session}.hosts")))?;
    let line = hosts
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&ip.to_string()))
        .with_context(|| format!("{ip} not in:\n{hosts}"))?;
    Ok(line.split_whitespace().skip(1).map(String::from).collect())
}

/// A real 3-node `-sname` cluster (app@app-0…2): the session's hosts file has the short host
/// names (and the StatefulSet FQDN and the pod A record for each pod), the banner suggests
/// `-sname`, and a local hidden `-sname` node in the session pings all three by name.
#[test]
fn sname_cluster_is_reached_by_short_host_names() -> Result<()> {
    let cluster = SimCluster::start(include_str!("../manifests/sname-cluster.yaml"))?;
    let state = TempDir::new("brstate")?;
    let session = unique("sname");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--statefulset", "app"], &log)?;
    for i in 0..3 {
        let ip = cluster.pod_ip(&format!("app-{i}")).context("pod IP")?;
        let names = host_names(&state, &session, IpAddr::V4(ip))?;
        for want in [
            format!("app-{i}"),
            format!("app-{i}.app.default.svc.cluster.local"),
            format!(
                "{}.default.pod.cluster.local",
                ip.to_string().replace('.', "-")
            ),
        ] {
            assert!(names.contains(&want), "{want} not in {names:?}");
        }
    }
    let banner = std::fs::read_to_string(&log)?;
    assert!(
        banner.contains("erl -sname debug -hidden -remsh app@app-0"),
        "{banner}"
    );
    let nodes: Vec<String> = (0..3).map(|i| format!("app@app-{i}")).collect();
    expect_reached(
        &cluster,
        &state,
        &session,
        &["-sname", "debug"],
        &nodes,
    )?;
    Ok(())
}

/// A real 3-node cluster named by pod A records (app@10-244-S-N.default.pod.cluster.local,
/// libcluster's `:dns`): a local hidden `-name` node in the session pings all three.
#[test]
fn pod_a_record_cluster_is_reached_by_its_dashed_names() -> Result<()> {
    let cluster = SimCluster::start(include_str!("../manifests/pod-a-records.yaml"))?;
    let state = TempDir::new("brstate")?;
    let session = unique("arec");
    let _up = cluster.start_up_session(
        state.path(),
        &session,
        &["--statefulset", "app"],
        &state.path().join("up.log"),
    )?;
    let nodes: Vec<String> = (0..3)
        .map(|i| {
            format!(
                "app@{}.default.pod.cluster.local",
                cluster
                    .pod_ip(&format!("app-{i}"))
                    .unwrap()
                    .to_string()
                    .replace('.', "-")
            )
        })
        .collect();
    expect_reached(&cluster, &state, &session, DEBUG, &nodes)?;
    Ok(())
}

/// A pod whose first container is a sidecar: the Erlang container (second) is found by its
/// ports and environment. `rpc` proves which one was chosen: the cookie is read from the chosen
/// container's arguments (`--cookie secret`), which the sidecar does not have.
#[test]
fn the_erlang_container_is_found_behind_a_sidecar() -> Result<()> {
    let cluster = SimCluster::start(include_str!("../manifests/sidecar-first.yaml"))?;
    let ip = cluster.pod_ip("app-0").context("pod IP")?;
    let node = format!("app@{ip}");
    let state = TempDir::new("brstate")?;
    let out = cluster
        .beamredir(state.path())
        .args(["rpc", "app-0", "node()."])
        .env_remove("ERLANG_COOKIE")
        .env_remove("RELEASE_COOKIE")
        .env("HOME", state.path())
        .stdin(Stdio::null())
        .output()?;
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("'{node}'")
    );
    let session = unique("sidecar");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--pod", "app-0"], &log)?;
    let banner = std::fs::read_to_string(&log)?;
    assert!(
        banner.contains(&format!(
            "pod       app-0  {ip}  Ready  epmd 4369  dist 9000  node {node}"
        )),
        "{banner}"
    );
    expect_reached(&cluster, &state, &session, DEBUG, std::slice::from_ref(&node))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 9. Watches over time; 10. no stale window after a pod moves.

/// Two nodes named `app@POD_IP`, each on a distribution port picked at random at start (the
/// spec names none: epmd tells), Ready once registered with epmd.
const RANDOM_PORT_NODES: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: app, namespace: default}
spec:
  serviceName: app
  replicas: 2
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app}}
    spec:
      containers:
        - name: app
          command: ["sh", "-c"]
          args:
            - |
              port=$(( 20000 + $(od -An -N2 -tu2 /dev/urandom) % 20000 ))
              exec erl -name "app@$(HOST)" -setcookie secret -noshell -noinput -kernel inet_dist_listen_min $port inet_dist_listen_max $port
          env: [{name: HOST, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
          ports: [{name: epmd, containerPort: 4369}]
          readinessProbe:
            exec: {command: ["sh", "-c", "epmd -names | grep -q 'name app at port'"]}
"#;

/// A pod as the session should hold it: its address, its uid, its redirected ports and the
/// forward each port goes to.
#[derive(Debug)]
struct Seen {
    ip: IpAddr,
    uid: String,
    ports: Vec<(u16, String)>,
}

fn seen(cluster: &SimCluster, status: &Value, pod: &str) -> Option<Seen> {
    let p = cluster.pod("default", pod)?;
    let ip = IpAddr::V4(cluster.pod_ip(pod)?);
    let mut ports = redirects_at(status, ip);
    ports.sort();
    Some(Seen {
        ip,
        uid: p.metadata.uid?,
        ports,
    })
}

/// The pod's distribution port, from its own epmd.
fn dist_port(cluster: &SimCluster, pod: &str) -> Result<u16> {
    let out = run(cluster.pod_exec(pod, "epmd")?.arg("-names"))?;
    let t = String::from_utf8_lossy(&out.stdout).to_string();
    t.lines()
        .find_map(|l| l.strip_prefix("name app at port ")?.trim().parse().ok())
        .with_context(|| t.clone())
}

/// app-0 and app-1 as they are now, for [`converged`]: each at its address, with epmd and the
/// dist port its epmd gives.
fn both_as_they_are(cluster: &SimCluster) -> Result<Vec<(&'static str, IpAddr, BTreeSet<u16>)>> {
    ["app-0", "app-1"]
        .into_iter()
        .map(|pod| {
            let ip = IpAddr::V4(cluster.pod_ip(pod).unwrap());
            Ok((pod, ip, [4369, dist_port(cluster, pod)?].into()))
        })
        .collect()
}

/// Stops the API server, runs `change` (pods replaced meanwhile), waits until `settled` says the
/// cluster is where the test wants it, compacts the history (any watch resuming from before
/// gets 410 Expired), starts the API server again. Returns the audit position of the restart.
fn while_the_api_server_is_away(
    cluster: &SimCluster,
    change: impl FnOnce() -> Result<()>,
) -> Result<usize> {
    cluster.stop_api_server();
    let changed = change();
    cluster.compact_now();
    let mark = cluster.audit().len();
    cluster.start_api_server()?;
    changed?;
    Ok(mark)
}

/// Waits until the session holds exactly `want` (pod → its address and ports) and returns the
/// status; the new incarnations reached it only through a relist.
fn converged(
    cluster: &SimCluster,
    state: &TempDir,
    session: &str,
    log: &Path,
    want: &[(&str, IpAddr, BTreeSet<u16>)],
) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(
        "the session to follow the pods' new incarnations",
        Duration::from_secs(90),
        || {
            let Some(status) = status_of(cluster, state, session) else {
                return false;
            };
            last = status.clone();
            want.iter().all(|(pod, ip, ports)| {
                let have: BTreeSet<u16> = redirects_at(&status, *ip)
                    .into_iter()
                    .map(|(p, _)| p)
                    .collect();
                pod_info(&status, pod).is_some_and(|p| p["ip"] == ip.to_string()) && &have == ports
            })
        },
    )
    .with_context(|| {
        format!(
            "status: {last:#}\nlog:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    Ok(last)
}

/// The session loses the API server for longer than its history window; meanwhile a pod is
/// replaced (new uid, new IP, new random dist port). Back, the watch resumes from a compacted
/// resourceVersion, gets 410 Expired and relists: the new incarnation is seen only in that
/// relist, so a reconciler that took every known pod for unchanged would keep the old address
/// and port. The session converges: redirects at the new IP with the new port (the old port
/// gone), and a local node reaches the new node.
#[test]
fn a_pod_replaced_while_the_api_server_was_away_is_followed_after_the_relist() -> Result<()> {
    let cluster = SimCluster::options()
        .history(HistoryWindow::Events(20))
        .start(RANDOM_PORT_NODES)?;
    let state = TempDir::new("brstate")?;
    let session = unique("relist");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--statefulset", "app"], &log)?;
    let status = converged(&cluster, &state, &session, &log, &both_as_they_are(&cluster)?)?;
    let old = seen(&cluster, &status, "app-0").context("app-0")?;
    let old_port = dist_port(&cluster, "app-0")?;

    let mark = while_the_api_server_is_away(&cluster, || {
        cluster.delete_pod("app-0")?;
        cluster.wait_replaced("app-0", Some(&old.uid), Duration::from_secs(60))?;
        Ok(())
    })?;
    let new_ip = IpAddr::V4(cluster.pod_ip("app-0").context("app-0")?);
    assert_ne!(new_ip, old.ip, "round-robin IPAM gives a new address");
    let new_port = dist_port(&cluster, "app-0")?;
    let status = converged(
        &cluster,
        &state,
        &session,
        &log,
        &[("app-0", new_ip, [4369, new_port].into())],
    )?;
    if new_port != old_port {
        assert!(
            redirects(&status)
                .iter()
                .all(|(pod, _)| !pod.ends_with(&format!(":{old_port}"))),
            "the old dist port's forward went: {status:#}"
        );
    }
    // It was a relist: the pods were listed again after the API server came back.
    assert!(
        cluster.audit()[mark..]
            .iter()
            .any(|a| a.starts_with("list pods default/")),
        "{:?}",
        &cluster.audit()[mark..]
    );
    let node = format!("app@{new_ip}");
    expect_reached(&cluster, &state, &session, DEBUG, std::slice::from_ref(&node))?;
    Ok(())
}

/// The same with IP reuse (lowest-free IPAM), twice: (1) app-0 and app-1 swap addresses while
/// the API server is away, so each old address now belongs to the other pod: after the relist
/// each address goes to its new owner's forwards (an alias never outbids the owner), and both
/// nodes answer by their new names; (2) app-0 comes back at its own address with a new uid
/// and a new dist port: same address, so only the uid says it is new, and its redirects still
/// change to the new port.
#[test]
fn ip_reuse_while_the_api_server_was_away_swaps_or_keeps_addresses_and_the_session_follows()
-> Result<()> {
    let cluster = SimCluster::options()
        .history(HistoryWindow::Events(20))
        .ip_allocation(IpAllocation::LowestFree)
        .start(RANDOM_PORT_NODES)?;
    let state = TempDir::new("brstate")?;
    let session = unique("reuse");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--statefulset", "app"], &log)?;
    let status = converged(&cluster, &state, &session, &log, &both_as_they_are(&cluster)?)?;
    let (old0, old1) = (
        seen(&cluster, &status, "app-0").context("app-0")?,
        seen(&cluster, &status, "app-1").context("app-1")?,
    );
    let epmd_forward = |s: &Seen| {
        s.ports
            .iter()
            .find(|(p, _)| *p == 4369)
            .map(|(_, l)| l.clone())
            .unwrap()
    };
    let (forward0, forward1) = (epmd_forward(&old0), epmd_forward(&old1));

    // (1) The swap.
    while_the_api_server_is_away(&cluster, || {
        let (taker_old, freed_old) = cluster.replace_reusing_ip("app-1", "app-0")?;
        ensure!(
            (taker_old, freed_old) == (old0.ip, old1.ip),
            "{taker_old} {freed_old}"
        );
        cluster.wait_replaced("app-0", Some(&old0.uid), Duration::from_secs(60))?;
        cluster.wait_replaced("app-1", Some(&old1.uid), Duration::from_secs(60))?;
        Ok(())
    })?;
    assert_eq!(
        (
            IpAddr::V4(cluster.pod_ip("app-0").unwrap()),
            IpAddr::V4(cluster.pod_ip("app-1").unwrap())
        ),
        (old1.ip, old0.ip),
        "swapped"
    );
    let status = converged(
        &cluster,
        &state,
        &session,
        &log,
        &[
            (
                "app-0",
                old1.ip,
                [4369, dist_port(&cluster, "app-0")?].into(),
            ),
            (
                "app-1",
                old0.ip,
                [4369, dist_port(&cluster, "app-1")?].into(),
            ),
        ],
    )?;
    let at = |ip: IpAddr| {
        redirects_at(&status, ip)
            .into_iter()
            .find(|(p, _)| *p == 4369)
            .map(|(_, l)| l)
            .unwrap()
    };
    assert_eq!(
        (at(old1.ip), at(old0.ip)),
        (forward0, forward1),
        "each address goes to its new owner's forward: {status:#}"
    );
    let nodes = vec![format!("app@{}", old1.ip), format!("app@{}", old0.ip)];
    expect_reached(&cluster, &state, &session, DEBUG, &nodes)?;

    // (2) Back at its own address.
    let before = seen(&cluster, &status, "app-0").context("app-0")?;
    let old_port = dist_port(&cluster, "app-0")?;
    while_the_api_server_is_away(&cluster, || {
        cluster.delete_pod("app-0")?;
        cluster.wait_replaced("app-0", Some(&before.uid), Duration::from_secs(60))?;
        Ok(())
    })?;
    assert_eq!(
        IpAddr::V4(cluster.pod_ip("app-0").unwrap()),
        before.ip,
        "lowest-free IPAM gives the address back"
    );
    let new_port = dist_port(&cluster, "app-0")?;
    let status = converged(
        &cluster,
        &state,
        &session,
        &log,
        &[("app-0", before.ip, [4369, new_port].into())],
    )?;
    if new_port == old_port {
        eprintln!(
            "the new incarnation drew the same random port {new_port}; only the ping below checks it"
        );
    }
    let _ = status;
    let node = format!("app@{}", before.ip);
    expect_reached(&cluster, &state, &session, DEBUG, std::slice::from_ref(&node))?;
    Ok(())
}

/// FQDN-named nodes (app@app-N.app.default.svc.cluster.local): app-1 is deleted and comes back
/// at a new address. Right after the session has the new address, a local node that still
/// resolves the name to the old one (its resolver read the hosts file before the move; OTP
/// re-reads it only every 5 s) pings app-1 and gets pong: the old address stays redirected to
/// app-1's forwards for 30 s. `status` shows that alias and when it expires.
#[test]
fn a_node_that_still_has_the_old_address_of_a_moved_pod_reaches_it() -> Result<()> {
    let manifest =
        include_str!("../manifests/erlang-cluster.yaml").replace("replicas: 3", "replicas: 2");
    let cluster = SimCluster::start(&manifest)?;
    let state = TempDir::new("brstate")?;
    let session = unique("alias");
    let log = state.path().join("up.log");
    let _up = cluster.start_up_session(state.path(), &session, &["--statefulset", "app"], &log)?;
    let old_ip = IpAddr::V4(cluster.pod_ip("app-1").context("app-1")?);
    converged(
        &cluster,
        &state,
        &session,
        &log,
        &[(
            "app-1",
            old_ip,
            [4369, dist_port(&cluster, "app-1")?].into(),
        )],
    )?;
    // The local node's resolver, as it was before the move.
    let frozen = TempDir::new("brfrozen")?;
    let hosts = frozen.path().join("hosts");
    std::fs::copy(state.path().join(format!("{session}.hosts")), &hosts)?;
    let inetrc = frozen.path().join("inetrc");
    std::fs::write(
        &inetrc,
        format!(
            "{{hosts_file, \"{}\"}}.\n{{lookup, [file]}}.\n",
            hosts.display()
        ),
    )?;

    let uid = cluster.pod("default", "app-1").and_then(|p| p.metadata.uid);
    cluster.delete_pod("app-1")?;
    cluster.wait_replaced("app-1", uid.as_deref(), Duration::from_secs(60))?;
    let new_ip = IpAddr::V4(cluster.pod_ip("app-1").context("app-1")?);
    assert_ne!(new_ip, old_ip);
    let status = converged(
        &cluster,
        &state,
        &session,
        &log,
        &[(
            "app-1",
            new_ip,
            [4369, dist_port(&cluster, "app-1")?].into(),
        )],
    )?;
    let alias = &pod_info(&status, "app-1").context("app-1")?["aliases"];
    assert_eq!(alias[0]["ip"], old_ip.to_string(), "{status:#}");
    let expires = alias[0]["expires_in_secs"].as_u64().context("expiry")?;
    assert!(expires > 0 && expires <= 30, "{status:#}");
    let table =
        String::from_utf8_lossy(&run(cluster.beamredir(state.path()).arg("status"))?.stdout)
            .to_string();
    assert!(
        table.contains(&format!("old IP {old_ip} still reaches this pod for ")),
        "{table}"
    );
    // The old address goes to the same forwards as the new one.
    let by_port = |ip: IpAddr| {
        redirects_at(&status, ip)
            .into_iter()
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    assert_eq!(by_port(old_ip), by_port(new_ip), "{status:#}");

    let node = "app@app-1.app.default.svc.cluster.local";
    let script = format!(
        "{{ok, A}} = inet:getaddr(\"app-1.app.default.svc.cluster.local\", inet), io:format(\"resolved=~s~n\", [inet:ntoa(A)]), {}",
        ping_and_rpc(&[node.to_string()])
    );
    let out = cluster
        .beamredir(state.path())
        .args([
            "exec",
            "--session",
            &session,
            "--",
            "env",
            &format!("ERL_INETRC={}", inetrc.display()),
        ])
        .arg("erl")
        .args(hidden_node_args("debug@127.0.0.1", COOKIE, &script))
        .env("HOME", state.path())
        .stdin(Stdio::null())
        .output()?;
    let out = text(&out);
    assert!(out.contains(&format!("resolved={old_ip}")), "{out}");
    expect_pongs(&out, &[node.to_string()]);
    let after = status_of(&cluster, &state, &session).context("status")?;
    assert!(
        connects_at(&after, &format!("{old_ip}:4369")) >= 1,
        "the node went through the old address: {after:#}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 11. Many pods at once.

/// A StatefulSet of `replicas` small Erlang nodes (Parallel: all start at once), labelled
/// `group: GROUP`, on fixed port 9000.
fn small_nodes(name: &str, replicas: u32, group: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: {name}, namespace: default}}
spec:
  serviceName: {name}
  replicas: {replicas}
  podManagementPolicy: Parallel
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}, group: {group}}}}}
    spec:
      containers:
        - name: app
          command: ["erl"]
          args: ["+S", "1:1", "+A", "1", "-name", "app@$(HOST)", "-setcookie", "secret", "-noshell", "-noinput",
                 "-kernel", "inet_dist_listen_min", "9000", "inet_dist_listen_max", "9000"]
          env: [{{name: HOST, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}]
          ports: [{{name: epmd, containerPort: 4369}}, {{name: erlang, containerPort: 9000}}]
"#
    )
}

/// A pod whose epmd accepts connections and never answers.
const SILENT_EPMD: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: silent, namespace: default}
spec:
  serviceName: silent
  replicas: 1
  selector: {matchLabels: {app: silent}}
  template:
    metadata: {labels: {app: silent, group: ten}}
    spec:
      containers:
        - name: app
          command: ["python3", "-c"]
          args:
            - |
              import socket
              s = socket.socket()
              s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
              s.bind(("0.0.0.0", 4369))
              s.listen(64)
              held = []
              while True:
                  held.append(s.accept())
          ports: [{name: epmd, containerPort: 4369}]
"#;

/// With 80 ms between the workstation and the API server, `up --statefulset` over 1, 10 and
/// 20 pods brings every pod up (each gets its epmd and dist redirects). The time to ready is
/// printed, not asserted (speed targets belong to `cargo xtask bench`). Then a pod whose epmd
/// never answers, in a session with ten healthy ones: the session starts without waiting for
/// it (it is still "starting" when the session runs), the ten are redirected, and they stay so
/// while it fails and is retried.
#[test]
fn many_pods_over_a_slow_link_all_come_up_and_a_silent_pod_delays_none() -> Result<()> {
    let manifest = [
        small_nodes("one", 1, "one"),
        small_nodes("ten", 10, "ten"),
        small_nodes("twenty", 20, "twenty"),
        SILENT_EPMD.to_string(),
    ]
    .join("\n---\n");
    let cluster = SimCluster::options()
        .api_access(ApiAccess::Delayed(Duration::from_millis(80)))
        .wait_ready(false)
        .start(&manifest)?;
    for (sts, n) in [("one", 1), ("ten", 10), ("twenty", 20)] {
        for i in 0..n {
            cluster.wait_ready("default", &format!("{sts}-{i}"), Duration::from_secs(180))?;
        }
    }
    cluster.wait_ready("default", "silent-0", Duration::from_secs(60))?;
    let state = TempDir::new("brstate")?;
    let mut timings = Vec::new();
    for (sts, n) in [
        ("one", 1usize),
        ("ten", 10),
        ("twenty", 20),
        ("one", 1),
        ("ten", 10),
        ("twenty", 20),
    ] {
        let session = unique(sts);
        let log = state.path().join(format!("{session}.log"));
        let started = Instant::now();
        let up = cluster.start_up_session(state.path(), &session, &["--statefulset", sts], &log)?;
        let ready = started.elapsed();
        let status = status_of(&cluster, &state, &session).context("status")?;
        let pods = status["pods"].as_array().context("pods")?;
        assert_eq!(pods.len(), n, "{status:#}");
        assert!(pods.iter().all(|p| p["state"] == "Running"), "{status:#}");
        assert_eq!(redirects(&status).len(), 2 * n, "{status:#}");
        timings.push(format!("{n} pod(s): {} ms", ready.as_millis()));
        drop(up);
    }
    eprintln!(
        "time to ready (spawn to a running session), 80 ms RTT to the API server: {}",
        timings.join(", ")
    );

    // The silent pod among ten healthy ones.
    let session = unique("silent");
    let log = state.path().join("silent.log");
    let _up = cluster.start_up_session(
        state.path(),
        &session,
        &["-l", "group=ten", "--upgrade-timeout", "10s"],
        &log,
    )?;
    let ten_redirected = |status: &Value| {
        (0..10).all(|i| {
            redirects_at(
                status,
                IpAddr::V4(cluster.pod_ip(&format!("ten-{i}")).unwrap()),
            )
            .len()
                == 2
        })
    };
    let status = status_of(&cluster, &state, &session).context("status")?;
    assert!(ten_redirected(&status), "{status:#}");
    assert_eq!(
        pod_info(&status, "silent-0").context("silent-0")?["state"],
        "starting",
        "the session waited for the silent pod: {status:#}"
    );
    let log_text = std::fs::read_to_string(&log)?;
    assert!(log_text.contains("pod default/silent-0 is still being brought up; the session starts without it and follows it"), "{log_text}");
    let mut last = Value::Null;
    wait_until(
        "the silent pod's first attempt to fail",
        Duration::from_secs(60),
        || {
            last = status_of(&cluster, &state, &session).unwrap_or(Value::Null);
            pod_info(&last, "silent-0")
                .and_then(|p| p["state"].as_str())
                .is_some_and(|s| s.starts_with("unreachable: "))
        },
    )
    .with_context(|| format!("{last:#}"))?;
    assert!(ten_redirected(&last), "{last:#}");
    let silent = pod_info(&last, "silent-0").unwrap();
    assert_eq!(
        silent["state"],
        "unreachable: port-forward to silent-0 port 4369: no answer from the pod's epmd within 20s",
        "{last:#}"
    );
    assert!(
        redirects_at(&last, IpAddr::V4(cluster.pod_ip("silent-0").unwrap())).is_empty(),
        "{last:#}"
    );
    let node = format!("app@{}", cluster.pod_ip("ten-9").unwrap());
    expect_reached(&cluster, &state, &session, DEBUG, std::slice::from_ref(&node))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// 12. The kernel side stays right.

/// A workstation namespace with a `map` session: POD:4369 goes to a local port where nothing
/// listens, POD:9000 to a listener that accepts and closes; and a listener nothing maps to.
struct KernelBed {
    pod: Ipv4Addr,
    ws: Netns,
    state: TempDir,
    session: String,
    forward: TcpListenerThread,
    unmapped: TcpListenerThread,
    dead_port: u16,
    _map: Option<Graceful>,
}

/// A listener in a namespace that accepts and closes, counting.
struct TcpListenerThread {
    port: u16,
    accepted: Arc<AtomicU64>,
}

impl TcpListenerThread {
    fn start(ns: &Netns) -> Result<Self> {
        let listener = ns.in_ns(|| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))??;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        // Ends with the test process (the namespace goes with the bed).
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if conn.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok(TcpListenerThread { port, accepted })
    }
}

impl KernelBed {
    fn start() -> Result<Self> {
        beamredir_testbed::require_root()?;
        let ws = Netns::new("brws")?;
        let state = TempDir::new("brstate")?;
        let forward = TcpListenerThread::start(&ws)?;
        let unmapped = TcpListenerThread::start(&ws)?;
        let dead_port = ws.in_ns(|| {
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map(|l| l.local_addr().unwrap().port())
        })??;
        let mut bed = KernelBed {
            pod: unique_pod_ip(),
            ws,
            state,
            session: unique("k"),
            forward,
            unmapped,
            dead_port,
            _map: None,
        };
        let child = bed
            .beamredir()
            .args(["map", "--session", &bed.session])
            .arg(format!("{}:4369={}", bed.pod, bed.dead_port))
            .arg(format!("{}:9000={}", bed.pod, bed.forward.port))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(bed.state.path().join("map.log"))?)
            .spawn()?;
        let mut map = Graceful(child);
        wait_until("the map session", Duration::from_secs(20), || {
            if let Ok(Some(st)) = map.0.try_wait() {
                panic!("beamredir map exited early: {st}");
            }
            bed.status().is_some_and(|s| s["state"] == "running")
        })?;
        bed._map = Some(map);
        Ok(bed)
    }

    fn beamredir(&self) -> Command {
        let mut cmd = self.ws.command(beamredir_bin());
        cmd.env("BEAMREDIR_STATE_DIR", self.state.path());
        cmd
    }

    fn status(&self) -> Option<Value> {
        let out = self.beamredir().args(["status", "--json"]).output().ok()?;
        let all: Value = serde_json::from_slice(&out.stdout).ok()?;
        all.as_array()?
            .iter()
            .find(|s| s["name"] == self.session.as_str())
            .cloned()
    }

    fn connects(&self, port: u16) -> u64 {
        self.status()
            .map(|s| connects_at(&s, &format!("{}:{port}", self.pod)))
            .unwrap_or(u64::MAX)
    }

    /// `python3 -c SCRIPT ARGS` in the session (optionally through `nsenter --net=NS` first).
    fn python(&self, netns: Option<&Netns>, script: &str, args: &[String]) -> Result<String> {
        let mut cmd = self.beamredir();
        cmd.args(["exec", "--session", &self.session, "--"]);
        if let Some(ns) = netns {
            cmd.arg("nsenter")
                .arg(format!("--net={}", ns.path().display()))
                .arg("--");
        }
        let out = run(cmd
            .args(["python3", "-c", script])
            .args(args)
            .stdin(Stdio::null()))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for KernelBed {
    fn drop(&mut self) {
        self._map.take();
        let _ = self
            .beamredir()
            .args(["-q", "down", "--all"])
            .stdout(Stdio::null())
            .status();
    }
}

const CONNECT_ERRNO: &str = "import socket,sys,errno\ns=socket.socket(); s.settimeout(5)\ntry:\n  s.connect((sys.argv[1], int(sys.argv[2]))); print('connected %s:%d' % s.getpeername())\nexcept OSError as e:\n  print(errno.errorcode.get(e.errno, e.errno))";

/// (a) A socket whose redirected connect failed (the forward's port refused it) and that then
/// connected to an address the map does not cover reports its real peer: the reverse
/// translation is keyed by the socket's current peer, not by what it once dialled.
#[test]
fn a_redirected_connect_that_failed_then_connected_elsewhere_reports_its_real_peer() -> Result<()> {
    let bed = KernelBed::start()?;
    let script = "import socket,sys,errno\ns=socket.socket()\ntry:\n  s.connect((sys.argv[1], 4369)); print('connected')\nexcept OSError as e:\n  print(errno.errorcode[e.errno])\ns.connect(('127.0.0.1', int(sys.argv[2])))\nprint('%s:%d' % s.getpeername())";
    let out = bed.python(
        None,
        script,
        &[bed.pod.to_string(), bed.unmapped.port.to_string()],
    )?;
    assert_eq!(
        out,
        format!("ECONNREFUSED\n127.0.0.1:{}", bed.unmapped.port)
    );
    assert_eq!(bed.connects(4369), 1, "the failed connect was redirected");
    // A redirected connect that succeeds still reports the pod endpoint.
    let out = bed.python(None, CONNECT_ERRNO, &[bed.pod.to_string(), "9000".into()])?;
    assert_eq!(out, format!("connected {}:9000", bed.pod));
    Ok(())
}

/// (b) The per-CPU counter loses no counts: 4 processes × 8 threads × 100 connects at once
/// through one redirect, and `status` reports exactly that many.
#[test]
fn concurrent_connects_through_one_redirect_are_all_counted() -> Result<()> {
    let bed = KernelBed::start()?;
    let script = "import socket,sys,threading\npod,n,t=sys.argv[1],int(sys.argv[2]),int(sys.argv[3])\nres=[0]*t\ndef run(i):\n  for _ in range(n):\n    s=socket.socket()\n    try:\n      s.connect((pod,9000)); res[i]+=1\n    except OSError:\n      pass\n    finally:\n      s.close()\nts=[threading.Thread(target=run,args=(i,)) for i in range(t)]\n[x.start() for x in ts]\n[x.join() for x in ts]\nprint(sum(res))";
    let (procs, threads, each) = (4, 8, 100);
    let before = bed.connects(9000);
    let children: Vec<_> = (0..procs)
        .map(|_| {
            bed.beamredir()
                .args([
                    "exec",
                    "--session",
                    &bed.session,
                    "--",
                    "python3",
                    "-c",
                    script,
                    &bed.pod.to_string(),
                    &each.to_string(),
                    &threads.to_string(),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    let mut made = 0u64;
    for child in children {
        let out = child.wait_with_output()?;
        ensure!(out.status.success(), "{}", text(&out));
        made += String::from_utf8_lossy(&out.stdout).trim().parse::<u64>()?;
    }
    assert_eq!(made, procs * threads * each, "every connect succeeded");
    assert_eq!(bed.connects(9000) - before, made);
    wait_until(
        "the listener to accept them all",
        Duration::from_secs(20),
        || bed.forward.accepted.load(Ordering::Relaxed) >= made,
    )?;
    Ok(())
}

/// (c) A session process that enters another network namespace (the cgroup comes along) is
/// not redirected there: the pod endpoint gives the normal error, and a listener on the
/// forward's port in that namespace gets nothing.
#[test]
fn a_session_process_in_another_netns_is_not_redirected() -> Result<()> {
    let bed = KernelBed::start()?;
    let elsewhere = Netns::new("brelse")?;
    let decoy = elsewhere.in_ns({
        let port = bed.forward.port;
        move || TcpListener::bind((Ipv4Addr::LOCALHOST, port))
    })??;
    decoy.set_nonblocking(true)?;
    let before = bed.connects(9000);
    let out = bed.python(
        Some(&elsewhere),
        CONNECT_ERRNO,
        &[bed.pod.to_string(), "9000".into()],
    )?;
    assert_eq!(out, "ENETUNREACH");
    assert_eq!(
        decoy.accept().map(|_| ()).unwrap_err().kind(),
        ErrorKind::WouldBlock,
        "a connection reached the decoy"
    );
    assert_eq!(bed.connects(9000), before, "counted as redirected");
    // The same process type, in the session's own namespace, is redirected.
    let out = bed.python(None, CONNECT_ERRNO, &[bed.pod.to_string(), "9000".into()])?;
    assert_eq!(out, format!("connected {}:9000", bed.pod));
    Ok(())
}

/// (d) UDP to the pod's epmd port and TCP to a port the map does not cover pass through
/// untouched: the workstation has no route to the pod (ENETUNREACH), and nothing is counted.
#[test]
fn udp_and_unmapped_ports_pass_through_untouched() -> Result<()> {
    let bed = KernelBed::start()?;
    let script = "import socket,sys,errno\npod=sys.argv[1]\ndef err(f):\n  try:\n    f(); return 'ok'\n  except OSError as e:\n    return errno.errorcode.get(e.errno, str(e.errno))\nu=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nprint('udp-sendto', err(lambda: u.sendto(b'x', (pod, 4369))))\nv=socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\nprint('udp-connect', err(lambda: v.connect((pod, 4369))))\nt=socket.socket(); t.settimeout(5)\nprint('tcp-5555', err(lambda: t.connect((pod, 5555))))";
    let before = (bed.connects(4369), bed.connects(9000));
    let out = bed.python(None, script, &[bed.pod.to_string()])?;
    assert_eq!(
        out,
        "udp-sendto ENETUNREACH\nudp-connect ENETUNREACH\ntcp-5555 ENETUNREACH"
    );
    assert_eq!((bed.connects(4369), bed.connects(9000)), before);
    Ok(())
}
