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
    process::{Command, Output, Stdio},
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
    run, unique, unique_pod_ip, wait_until,
};
use serde_json::{Value, json};

const COOKIE: &str = "secret";
const RBAC_EXAMPLE: &str = include_str!("../../docs/examples/rbac.yaml");
const SECRET_MANIFEST: &str = include_str!("../manifests/secret-cookie.yaml");

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn status_of(cluster: &SimCluster, state: &TempDir, session: &str) -> Option<Value> {
    cluster.session_status(state.path(), session)
}

/// The session's redirects as (pod endpoint, local forward endpoint).
fn redirects(status: &Value) -> Vec<(String, String)> {
    status["redirects"]
        .as_array()
        .map(|rs| rs.iter().map(|r| (r["pod"].as_str().unwrap_or("").to_string(), r["local"].as_str().unwrap_or("").to_string())).collect())
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
    status["redirects"].as_array().into_iter().flatten().find(|r| r["pod"] == pod).and_then(|r| r["connects"].as_u64()).unwrap_or(0)
}

fn pod_info<'a>(status: &'a Value, name: &str) -> Option<&'a Value> {
    status["pods"].as_array()?.iter().find(|p| p["name"] == name)
}

/// `erl` in the session (hidden, the cluster's cookie), running SCRIPT; its output.
fn erl_in_session(cluster: &SimCluster, state: &TempDir, session: &str, flags: &[&str], script: &str) -> Result<String> {
    let out = cluster
        .beamredir(state.path())
        .args(["exec", "--session", session, "--", "erl", "-setcookie", COOKIE, "-hidden", "-noshell"])
        .args(flags)
        .args(["-eval", script])
        .env("HOME", state.path())
        .stdin(Stdio::null())
        .output()?;
    Ok(text(&out))
}

/// Pings each node and calls `erlang:node()` on it over rpc: `ping=[pong,…] rpc=[Node,…]`.
fn ping_and_rpc(nodes: &[String]) -> String {
    let list = nodes.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(",");
    format!(
        "Ns = [{list}], P = [net_adm:ping(N) || N <- Ns], R = [rpc:call(N, erlang, node, [], 10000) || N <- Ns], \
         io:format(\"ping=~w~nrpc=~w~n\", [P, R]), halt()."
    )
}

fn expect_pongs(out: &str, nodes: &[String]) {
    let pongs = vec!["pong"; nodes.len()].join(",");
    let names = nodes.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(",");
    assert!(out.contains(&format!("ping=[{pongs}]")) && out.contains(&format!("rpc=[{names}]")), "{out}");
}

/// Listening TCP ports in the workstation (to check nothing was left listening).
fn listening(cluster: &SimCluster) -> Result<Vec<String>> {
    let out = run(cluster.ws.command("ss").args(["-Hltn"]))?;
    Ok(String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().nth(3).map(String::from)).collect())
}

/// What a failed `up` must not leave: files in the state dir, the session's cgroup, programs
/// on the root cgroup (bpftool's view), listeners.
struct Leftovers {
    programs: Vec<(String, String)>,
    listening: Vec<String>,
}

impl Leftovers {
    fn before(cluster: &SimCluster) -> Result<Self> {
        Ok(Leftovers { programs: bpftool_cgroup_programs(&cgroup2_root()?)?, listening: listening(cluster)? })
    }

    fn check(&self, cluster: &SimCluster, state: &TempDir, session: &str, what: &str) -> Result<()> {
        let left: Vec<_> = std::fs::read_dir(state.path())?.filter_map(Result::ok).map(|e| e.file_name()).filter(|n| !n.to_string_lossy().starts_with(".erlang.cookie")).collect();
        ensure!(left.is_empty(), "{what} left {left:?}");
        ensure!(!cgroup2_root()?.join("beamredir").join(session).exists(), "{what} left its cgroup");
        ensure!(bpftool_cgroup_programs(&cgroup2_root()?)? == self.programs, "{what} changed the root cgroup's programs");
        ensure!(listening(cluster)? == self.listening, "{what} left a listener");
        Ok(())
    }
}

/// `beamredir up … -- true` that must fail: returns its one line of stderr.
fn up_fails(cluster: &SimCluster, state: &TempDir, session: &str, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let mut cmd = cluster.beamredir(state.path());
    for proxy_var in ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"] {
        cmd.env_remove(proxy_var);
    }
    let out = cmd.args(["up", "--session", session]).args(args).args(["--", "true"]).envs(env.iter().copied()).stdin(Stdio::null()).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    ensure!(!out.status.success(), "{args:?} succeeded:\n{}", text(&out));
    ensure!(stderr.lines().count() == 1, "{args:?}: not one line:\n{stderr}");
    Ok(stderr)
}

/// A real unprivileged user with a home, to play the one who ran `sudo beamredir`:
/// (name, home, uid, gid). Created once per machine.
fn sudo_user() -> Result<(&'static str, PathBuf, String, String)> {
    let user = "beamredir-test";
    let home = PathBuf::from("/var/tmp/beamredir-test-home");
    if Command::new("id").arg(user).output()?.status.code() != Some(0) {
        run(Command::new("useradd").args(["--system", "--create-home", "--home-dir"]).arg(&home).args(["--shell", "/bin/sh", user]))?;
    }
    let id = |flag: &str| -> Result<String> { Ok(String::from_utf8(run(Command::new("id").args([flag, user]))?.stdout)?.trim().to_string()) };
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
    let mut role = docs.iter().find(|d| d["kind"] == "Role" && d["metadata"]["name"] == "beamredir-up").cloned().context("no beamredir-up Role")?;
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
    ensure!(removed, "the example Role has no {verb} on {group}/{resource}");
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
        let cluster = SimCluster::options().version(minor).rbac(RBAC_EXAMPLE).wait_ready(false).start(SECRET_MANIFEST)?;
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
                .args(["--", "erl", "-name", "debug@127.0.0.1", "-setcookie", cookie, "-hidden", "-noshell", "-eval", &ping_and_rpc(std::slice::from_ref(&node))])
                .env("HOME", state.path())
                .stdin(Stdio::null())
                .output()?;
            assert!(out.status.success(), "1.{minor} {source:?}: {}", text(&out));
            expect_pongs(&text(&out), std::slice::from_ref(&node));
        }

        // Each verb missing in turn.
        let before = Leftovers::before(&cluster)?;
        let session = unique("rbac");
        let rule = |group: &str, resource: &str, verbs: &str| format!("grant it with a Role rule {{apiGroups: [\"{group}\"], resources: [\"{resource}\"], verbs: [{verbs}]}} (see docs/examples/rbac.yaml)");
        let cases: Vec<(&str, &str, &str, Vec<&str>, Option<String>)> = vec![
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
                    assert_eq!(line, format!("beamredir: error: forbidden (403): {says}"), "{what}");
                    before.check(&cluster, &state, &session, &what)?;
                }
                None => {
                    // 1.34: `get` is all a WebSocket port-forward needs.
                    let out = cluster.beamredir(state.path()).args(["up", "--session", &session]).args(&full).args(["--", "true"]).stdin(Stdio::null()).output()?;
                    assert!(out.status.success(), "{what}: {}", text(&out));
                }
            }
        }
        if minor >= 35 {
            // The port-forward's refusal was explained by asking the API server.
            assert!(cluster.audit().iter().any(|a| a.starts_with("create selfsubjectaccessreviews")), "{:?}", cluster.audit());
        }

        // rpc finds the cookie in the pod's Secret: the up Role may not read it (one line
        // naming the Secret and the rule), the remsh Role may.
        let rpc = |kc: &Path| cluster.beamredir(state.path()).args(["rpc", "--kubeconfig"]).arg(kc).args(["app-0", "node()."]).stdin(Stdio::null()).output();
        let out = rpc(&dev)?;
        assert_eq!(out.status.code(), Some(3), "{}", text(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stderr).trim(),
            "beamredir: error: cannot read Secret erlang-cookie in namespace default (forbidden), which holds the cookie; a Role in default with `apiGroups: [\"\"], resources: [\"secrets\"], verbs: [\"get\"], resourceNames: [\"erlang-cookie\"]` allows it, or pass --cookie-file"
        );
        let out = rpc(&ops)?;
        assert!(out.status.success(), "1.{minor}: {}", text(&out));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("'{node}'"));
    }
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
    let cluster = SimCluster::options().api_access(ApiAccess::Proxy).start(EXAMPLE_MANIFEST)?;
    let proxy = cluster.proxy_url.clone().context("proxy URL")?;
    let api_host = "172.31.0.2";
    let ip = cluster.pod_ip("app-0").context("pod IP")?;
    let node = format!("app@{ip}");
    let state = TempDir::new("brstate")?;
    let tinyproxy_log = || std::fs::read_to_string(cluster.dir.path().join("tinyproxy.log")).unwrap_or_default();
    let up_pings = |kubeconfig: &Path, env: &[(&str, &str)]| -> Result<String> {
        let out = cluster
            .beamredir(state.path())
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env("KUBECONFIG", kubeconfig)
            .envs(env.iter().copied())
            .args(["up", "--pod", "app-0", "--session", &unique("proxy"), "--", "erl", "-name", "debug@127.0.0.1", "-setcookie", COOKIE, "-hidden", "-noshell", "-eval", &ping_and_rpc(std::slice::from_ref(&node))])
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
    assert!(tinyproxy_log().matches("CONNECT").count() >= connects_before + 5, "{}", tinyproxy_log());
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
    let line = up_fails(&cluster, &state, &session, &["--kubeconfig", no_proxy_kc, "--pod", "app-0"], &[])?;
    assert!(
        line.starts_with(&format!(
            "beamredir: error: cannot reach the Kubernetes API server at https://{api_host}:6443 (directly: no proxy is set; if the API server is only reachable through one, set proxy-url in the kubeconfig's cluster or HTTPS_PROXY): "
        )) && line.contains("Network is unreachable"),
        "{line}"
    );
    before.check(&cluster, &state, &session, "no proxy")?;
    // NO_PROXY matching the API server (by address, by network, or `*`): direct, and so the same failure.
    for no_proxy in [api_host, "172.31.0.0/16", "*"] {
        let line = up_fails(&cluster, &state, &session, &["--kubeconfig", no_proxy_kc, "--pod", "app-0"], &[("HTTPS_PROXY", &proxy), ("NO_PROXY", no_proxy)])?;
        assert!(
            line.starts_with(&format!("beamredir: error: cannot reach the Kubernetes API server at https://{api_host}:6443 (directly: NO_PROXY matches it): ")) && line.contains("Network is unreachable"),
            "NO_PROXY={no_proxy}: {line}"
        );
        before.check(&cluster, &state, &session, "NO_PROXY")?;
    }
    // NO_PROXY naming something else (here: the proxy itself) leaves the proxy in use.
    let out = up_pings(&cluster.kubeconfig_no_proxy, &[("HTTPS_PROXY", &proxy), ("NO_PROXY", "172.30.0.1,example.com")])?;
    expect_pongs(&out, std::slice::from_ref(&node));

    // The credential plugin, by bare name, only in the invoking user's ~/bin.
    let (user, home, uid, gid) = sudo_user()?;
    let plugin = unique("beamredir-test-cred-");
    let bin = home.join("bin");
    std::fs::create_dir_all(&bin)?;
    let chown = |p: &Path| run(Command::new("chown").arg(format!("{uid}:{gid}")).arg(p)).map(|_| ());
    chown(&bin)?;
    let token = std::fs::read_to_string(&cluster.kubeconfig)?.lines().find_map(|l| l.trim().strip_prefix("token: ").map(String::from)).context("token")?;
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
    std::fs::set_permissions(kc_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let exec = |command: &str| {
        format!(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {command}\n      env:\n        - name: FROM_THE_KUBECONFIG\n          value: set-in-kubeconfig\n      interactiveMode: Never"
        )
    };
    let kubeconfig = std::fs::read_to_string(&cluster.kubeconfig)?;
    let kc = kc_dir.path().join("kubeconfig");
    std::fs::write(&kc, kubeconfig.replace(&format!("    token: {token}"), &exec(&plugin)))?;
    let missing_kc = kc_dir.path().join("kubeconfig-missing");
    std::fs::write(&missing_kc, kubeconfig.replace(&format!("    token: {token}"), &exec("no-such-credential-plugin")))?;
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
            .args(["--pod", "app-0", "--session", &unique("plugin"), "--", "true"])
            .stdin(Stdio::null());
        cmd
    };
    let out = sudo(&kc).output()?;
    assert!(out.status.success(), "{}", text(&out));
    let seen = std::fs::read_to_string(&witness).context("the plugin did not run")?;
    eprintln!("the credential plugin's environment:\n{seen}");
    let vars: Vec<&str> = seen.lines().collect();
    for want in [format!("UID={uid}"), format!("HOME={}", home.display()), format!("USER={user}"), "FROM_THE_KUBECONFIG=set-in-kubeconfig".into()] {
        assert!(vars.contains(&want.as_str()), "{want} not in the plugin's environment:\n{seen}");
    }
    let path = vars.iter().find_map(|v| v.strip_prefix("PATH=")).context("no PATH")?;
    assert!(path.split(':').any(|d| Path::new(d) == bin), "the user's ~/bin is on the plugin's PATH: {path}");
    assert!(!vars.iter().any(|v| v.starts_with("SUDO_") || *v == "HOME=/root" || v.starts_with("MAIL=")), "root's environment leaked:\n{seen}");
    // A plugin found nowhere: one line naming it and where it was looked for.
    let out = sudo(&missing_kc).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert!(!out.status.success() && stderr.lines().count() == 1, "{stderr}");
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
