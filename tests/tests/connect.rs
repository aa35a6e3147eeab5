//! `remsh`, `rpc` and `observer` (issue 12): from a pod name to the right node, with no node
//! name or cookie to look up. Real Erlang and Elixir nodes run in the simulated cluster's pods;
//! the real `beamredir` binary runs in the workstation namespace, which reaches the pods only
//! through port-forwards. Remote shells run under `script` (they want a terminal), observer
//! under a real Xvfb.
use std::{
    io::{BufRead, BufReader, Read},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use beamredir::erlang::handshake::PROBE_NAME;
use beamredir_testbed::{
    Graceful, Interactive, Proc, TempDir, beamredir_bin,
    cluster::{EXAMPLE_MANIFEST, SimCluster},
    run, unique, wait_until,
};

/// How long a remote shell may take to show its prompt (a session, a port-forward, a BEAM
/// start, on a busy 2-core machine).
const PROMPT: Duration = Duration::from_secs(90);

/// What a command printed and how it ended.
#[derive(Debug)]
struct Outcome {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn of(out: Output) -> Self {
        Outcome {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The lines beamredir reported as errors.
    fn errors(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| l.starts_with("beamredir: error: "))
            .collect()
    }

    /// Failed (non-zero exit) with exactly one error line, which says `says`, and no warning;
    /// returns the line. (A session start that takes over a second also says what it is
    /// doing, on lines of their own.)
    fn fails_saying(&self, says: &str) -> &str {
        assert_ne!(self.code, 0, "expected a failure: {self:#?}");
        let errors = self.errors();
        assert_eq!(errors.len(), 1, "expected one error line: {self:#?}");
        assert!(
            !self
                .stderr
                .lines()
                .any(|l| l.starts_with("beamredir: warn")),
            "{self:#?}"
        );
        assert!(
            errors[0].contains(says),
            "expected {says:?} in the error: {self:#?}"
        );
        errors[0]
    }
}

/// `beamredir SUBCOMMAND ARGS` as the admin, or as the user of `kubeconfig`, with no terminal.
fn run_as(
    cluster: &SimCluster,
    state: &Path,
    kubeconfig: Option<&Path>,
    subcommand: &str,
    args: &[&str],
) -> Result<Outcome> {
    let mut cmd = cluster.beamredir(state);
    if let Some(kc) = kubeconfig {
        cmd.env("KUBECONFIG", kc);
    }
    Ok(Outcome::of(
        cmd.arg(subcommand).args(args).stdin(Stdio::null()).output()?,
    ))
}

/// `beamredir rpc ARGS` as the admin, or as the user of `kubeconfig`.
fn rpc(
    cluster: &SimCluster,
    state: &Path,
    kubeconfig: Option<&Path>,
    args: &[&str],
) -> Result<Outcome> {
    run_as(cluster, state, kubeconfig, "rpc", args)
}

/// `beamredir rpc POD EXPR` that must print a value: its stdout.
fn rpc_value(cluster: &SimCluster, state: &Path, pod: &str, expr: &str) -> Result<String> {
    let out = rpc(cluster, state, None, &[pod, expr])?;
    ensure!(out.code == 0, "rpc {pod} {expr:?} failed: {out:#?}");
    Ok(out.stdout)
}

/// `beamredir remsh ARGS` without a terminal, for the cases that fail before any shell starts.
fn remsh_output(
    cluster: &SimCluster,
    state: &Path,
    kubeconfig: Option<&Path>,
    args: &[&str],
) -> Result<Outcome> {
    run_as(cluster, state, kubeconfig, "remsh", args)
}

/// `beamredir remsh ARGS` under `script`, which gives the remote shell a terminal (as
/// tests/kube.rs drives iex).
fn remsh(
    cluster: &SimCluster,
    state: &Path,
    kubeconfig: Option<&Path>,
    args: &[&str],
) -> Result<Interactive> {
    let line = std::iter::once(beamredir_bin().display().to_string())
        .chain(std::iter::once("remsh".to_string()))
        .chain(args.iter().map(|a| a.to_string()))
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    Interactive::spawn(
        cluster
            .ws
            .command("script")
            .args(["-qec", &line, "/dev/null"])
            .env("KUBECONFIG", kubeconfig.unwrap_or(&cluster.kubeconfig))
            .env("BEAMREDIR_STATE_DIR", state),
    )
}

/// Leaves a remote shell the way a user does (Ctrl-G, q: `halt().` would stop the pod's node);
/// returns the exit code of `beamredir remsh` and everything it printed.
fn leave(mut shell: Interactive) -> Result<(i32, String)> {
    shell.send("\x07")?;
    shell.expect("-->", Duration::from_secs(20))?;
    shell.send("q\n")?;
    let output = shell.output();
    Ok((shell.wait(Duration::from_secs(30))?, output))
}

/// The prompt, an expression and its printed value in the remote shell of `node` on `pod`:
/// the node's name and the pod's host name, so the answer can only come from that node.
fn shell_check(node: &str, pod: &str, elixir: bool) -> (String, &'static str, String) {
    if elixir {
        (
            format!("iex({node})1>"),
            "{node(), System.get_env(\"HOSTNAME\")}\n",
            format!("{{:\"{node}\", \"{pod}\"}}"),
        )
    } else {
        (
            format!("({node})1>"),
            "{node(), os:getenv(\"HOSTNAME\")}.\n",
            format!("{{'{node}',\"{pod}\"}}"),
        )
    }
}

/// `beamredir remsh ARGS` (as the admin, or the user of `kubeconfig`): the prompt of `node`,
/// an expression evaluated there, then out; returns what it printed.
fn remsh_runs(
    cluster: &SimCluster,
    state: &Path,
    kubeconfig: Option<&Path>,
    args: &[&str],
    node: &str,
    pod: &str,
    elixir: bool,
) -> Result<String> {
    let (prompt, expr, answer) = shell_check(node, pod, elixir);
    let mut shell = remsh(cluster, state, kubeconfig, args)?;
    shell.expect(&prompt, PROMPT)?;
    shell.send(expr)?;
    shell.expect(&answer, Duration::from_secs(30))?;
    let (code, output) = leave(shell)?;
    assert_eq!(code, 0, "remsh {args:?}:\n{output}");
    Ok(output)
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// What the kubelet wrote of a container's stdout and stderr so far (the simulated kubelet
/// appends both to `NAMESPACE_POD_UID_CONTAINER.log` in the cluster's directory, as a real
/// one does under /var/log/pods).
fn container_log(cluster: &SimCluster, pod: &str, container: &str) -> Result<String> {
    let uid = cluster
        .pod("default", pod)
        .and_then(|p| p.metadata.uid)
        .with_context(|| format!("no pod {pod}"))?;
    let path = cluster
        .dir
        .path()
        .join(format!("default_{pod}_{uid}_{container}.log"));
    std::fs::read_to_string(&path)
        .with_context(|| format!("the log of {pod}/{container}: {}", path.display()))
}

/// A cookie no other process on the machine has in its argv.
fn random_cookie(prefix: &str) -> Result<String> {
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!(
        "{prefix}-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// The inode of a pod's network namespace (how its processes are told apart).
fn pod_netns(cluster: &SimCluster, pod: &str) -> Result<u64> {
    let path = cluster
        .kubelet
        .netns_of("default", pod)
        .with_context(|| format!("pod {pod} is not running"))?;
    Ok(std::fs::metadata(path)?.ino())
}

/// Reads every `/proc/*/cmdline` over and over, until finished, and notes each process whose
/// argv holds the needle, except those in the given network namespaces: the pods, whose nodes
/// the simulated kubelet starts with `-setcookie` (they stand for the far side).
struct ArgvWatch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<(u64, Vec<String>)>,
}

impl ArgvWatch {
    fn start(needle: &str, excluded_netns: Vec<u64>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, needle) = (stop.clone(), needle.as_bytes().to_vec());
        let thread = std::thread::spawn(move || {
            let (mut scans, mut leaks) = (0u64, Vec::new());
            loop {
                let last = flag.load(Ordering::SeqCst);
                for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                        continue;
                    };
                    let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                        continue;
                    };
                    if !cmdline
                        .windows(needle.len())
                        .any(|w| w == needle.as_slice())
                    {
                        continue;
                    }
                    match std::fs::metadata(entry.path().join("ns/net")) {
                        Ok(ns) if excluded_netns.contains(&ns.ino()) => {}
                        _ => {
                            let seen = format!(
                                "pid {pid}: {}",
                                String::from_utf8_lossy(&cmdline).replace('\0', " ")
                            );
                            if !leaks.contains(&seen) {
                                leaks.push(seen);
                            }
                        }
                    }
                }
                scans += 1;
                if last {
                    return (scans, leaks);
                }
                // Every process that matters (erl, beam.smp, beamredir's parts) lives far longer.
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        ArgvWatch { stop, thread }
    }

    /// Stops after one more full scan; returns (scans, processes seen with the needle).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("the /proc watch panicked")
    }
}

/// Every file under `dir` (recursively; sockets and the like skipped): (files read, files
/// holding `needle`).
fn files_holding(dir: &Path, needle: &str) -> (usize, Vec<PathBuf>) {
    let (mut read, mut holding) = (0, Vec::new());
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                todo.push(entry.path());
            } else if kind.is_file() {
                if let Ok(bytes) = std::fs::read(entry.path()) {
                    read += 1;
                    if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                        holding.push(entry.path());
                    }
                }
            }
        }
    }
    (read, holding)
}

/// Four single-pod StatefulSets, one per way of naming a node: by pod IP (Elixir, the example
/// manifest's node), by pod A record (`sh -c` works the name out), by StatefulSet DNS name
/// (headless Service `fq`), and by short name (`-sname app` on pod `app-0`: `app@app-0`).
/// Distribution ports come from epmd, except for the Elixir node's named port.
const NAMING: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: fq, namespace: default}
spec:
  clusterIP: None
  selector: {app: fq}
  ports: [{name: epmd, port: 4369}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: ip, namespace: default}
spec:
  serviceName: ip
  replicas: 1
  selector: {matchLabels: {app: ip}}
  template:
    metadata: {labels: {app: ip, group: conn}}
    spec:
      containers:
        - name: app
          image: elixir:1.14
          command: ["elixir"]
          args: ["--name", "app@$(HOST)", "--cookie", "$(RELEASE_COOKIE)", "--erl",
                 "-kernel inet_dist_listen_min 9000 inet_dist_listen_max 9000", "--no-halt", "-e", ":ok"]
          env:
            - {name: HOST, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
            - {name: RELEASE_COOKIE, value: "naming-cookie"}
          ports: [{name: epmd, containerPort: 4369}, {name: erlang, containerPort: 9000}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: arec, namespace: default}
spec:
  serviceName: arec
  replicas: 1
  selector: {matchLabels: {app: arec}}
  template:
    metadata: {labels: {app: arec, group: conn}}
    spec:
      containers:
        - name: app
          image: erlang:25
          command: ["sh", "-c"]
          args:
            - exec erl -name "app@$(echo "$POD_IP" | tr . -).$(POD_NAMESPACE).pod.cluster.local" -setcookie naming-cookie -noshell -noinput
          env:
            - {name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
            - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
          ports: [{name: epmd, containerPort: 4369}]
          readinessProbe:
            exec: {command: ["sh", "-c", "epmd -names | grep -q 'name app at port'"]}
            periodSeconds: 2
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: fq, namespace: default}
spec:
  serviceName: fq
  replicas: 1
  selector: {matchLabels: {app: fq}}
  template:
    metadata: {labels: {app: fq, group: conn}}
    spec:
      containers:
        - name: app
          image: erlang:25
          command: ["erl"]
          args: ["-name", "app@$(POD_NAME).fq.$(POD_NAMESPACE).svc.cluster.local", "-setcookie", "naming-cookie", "-noshell", "-noinput"]
          env:
            - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
            - {name: POD_NAMESPACE, valueFrom: {fieldRef: {fieldPath: metadata.namespace}}}
          ports: [{name: epmd, containerPort: 4369}]
          readinessProbe:
            exec: {command: ["sh", "-c", "epmd -names | grep -q 'name app at port'"]}
            periodSeconds: 2
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: app, namespace: default}
spec:
  serviceName: app
  replicas: 1
  selector: {matchLabels: {app: app}}
  template:
    metadata: {labels: {app: app, group: conn}}
    spec:
      containers:
        - name: app
          image: erlang:25
          command: ["erl"]
          args: ["-sname", "app", "-setcookie", "naming-cookie", "-noshell", "-noinput"]
          ports: [{name: epmd, containerPort: 4369}]
          readinessProbe:
            exec: {command: ["sh", "-c", "epmd -names | grep -q 'name app at port'"]}
            periodSeconds: 2
"#;

/// Names by pod IP, pod A record, StatefulSet DNS name and `-sname`: with only the pod's name,
/// `up` and `rpc` find each node's exact name (the silent handshake probe), `rpc` evaluates
/// `node()` there, and `remsh` opens the right shell (iex on the Elixir node, erl elsewhere)
/// with the right name mode. The probes leave nothing in any node's log and never show in
/// `nodes(connected)`; neither do the rpc and shell connections.
#[test]
fn every_naming_scheme_from_the_pod_name_alone_and_the_probes_leave_no_trace() -> Result<()> {
    let cluster = SimCluster::start(NAMING)?;
    let state = TempDir::new("brstate")?;
    let ip = |pod: &str| {
        cluster
            .pod_ip(pod)
            .with_context(|| format!("{pod} has no IP"))
    };
    let dashed = ip("arec-0")?.to_string().replace('.', "-");
    let nodes = [
        ("ip-0", format!("app@{}", ip("ip-0")?), true),
        (
            "arec-0",
            format!("app@{dashed}.default.pod.cluster.local"),
            false,
        ),
        (
            "fq-0",
            "app@fq-0.fq.default.svc.cluster.local".to_string(),
            false,
        ),
        ("app-0", "app@app-0".to_string(), false),
    ];

    // `up` asks every node of the session its name; the banner shows what each said.
    let out = run(cluster
        .beamredir(state.path())
        .args([
            "up",
            "-l",
            "group=conn",
            "--session",
            &unique("names"),
            "--",
            "true",
        ])
        .stdin(Stdio::null()))?;
    let banner = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (pod, node, _) in &nodes {
        let row = banner
            .lines()
            .find(|l| l.trim_start().starts_with(&format!("pod       {pod} ")))
            .with_context(|| format!("{pod} in:\n{banner}"))?;
        assert!(row.ends_with(&format!("node {node}")), "{row}");
    }
    // `rpc` with only the pod's name: the exact name, and nothing else said.
    for (pod, node, _) in &nodes {
        let out = rpc(&cluster, state.path(), None, &[pod, "node()."])?;
        assert_eq!(
            (out.code, out.stdout.as_str(), out.stderr.as_str()),
            (0, format!("'{node}'\n").as_str(), ""),
            "{pod}"
        );
    }
    // The probes were silent: nothing in any node's log, never in nodes(connected).
    let connected = "[atom_to_list(N) || N <- nodes(connected)].";
    for (pod, ..) in &nodes {
        assert_eq!(
            container_log(&cluster, pod, "app")?,
            "",
            "{pod}: the probes must leave the node's log empty"
        );
        let seen = rpc_value(&cluster, state.path(), pod, connected)?;
        assert!(
            seen.starts_with('[') && !seen.contains(PROBE_NAME),
            "{pod}: {seen}"
        );
    }

    // `remsh` with only the pod's name: the shell the node runs, on the node.
    for (pod, node, elixir) in &nodes {
        let output = remsh_runs(&cluster, state.path(), None, &[pod], node, pod, *elixir)?;
        let program = if *elixir { "iex" } else { "erl" };
        assert!(
            output.contains(&format!("running \"/usr/bin/{program}\"")),
            "{pod}:\n{output}"
        );
    }
    // Four remote shells later: still nothing in any log, and no probe connected.
    for (pod, ..) in &nodes {
        assert_eq!(
            container_log(&cluster, pod, "app")?,
            "",
            "{pod}: remote shells must leave the node's log empty"
        );
        let seen = rpc_value(&cluster, state.path(), pod, connected)?;
        assert!(!seen.contains(PROBE_NAME), "{pod}: {seen}");
    }
    Ok(())
}

/// The cookie in a Secret, as `env[].valueFrom.secretKeyRef` (an Elixir node) and as
/// `envFrom[].secretRef` (an Erlang node). Both nodes get it from the kubelet; beamredir reads
/// the same Secret with the user's own credentials.
fn cookie_manifest(cookie: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Secret
metadata: {{name: conn-cookie, namespace: default}}
type: Opaque
stringData: {{cookie: "{cookie}"}}
---
apiVersion: v1
kind: Secret
metadata: {{name: conn-env, namespace: default}}
type: Opaque
stringData: {{RELEASE_COOKIE: "{cookie}"}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: skr, namespace: default}}
spec:
  serviceName: skr
  replicas: 1
  selector: {{matchLabels: {{app: skr}}}}
  template:
    metadata: {{labels: {{app: skr}}}}
    spec:
      containers:
        - name: app
          image: elixir:1.14
          command: ["elixir"]
          args: ["--name", "app@$(HOST)", "--cookie", "$(RELEASE_COOKIE)", "--erl",
                 "-kernel inet_dist_listen_min 9000 inet_dist_listen_max 9000", "--no-halt", "-e", ":ok"]
          env:
            - {{name: HOST, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
            - {{name: RELEASE_COOKIE, valueFrom: {{secretKeyRef: {{name: conn-cookie, key: cookie}}}}}}
          ports: [{{name: epmd, containerPort: 4369}}, {{name: erlang, containerPort: 9000}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: envfrom, namespace: default}}
spec:
  serviceName: envfrom
  replicas: 1
  selector: {{matchLabels: {{app: envfrom}}}}
  template:
    metadata: {{labels: {{app: envfrom}}}}
    spec:
      containers:
        - name: app
          image: erlang:25
          command: ["erl"]
          args: ["-name", "app@$(HOST)", "-setcookie", "$(RELEASE_COOKIE)", "-noshell", "-noinput",
                 "-kernel", "inet_dist_listen_min", "9000", "inet_dist_listen_max", "9000"]
          envFrom:
            - secretRef: {{name: conn-env}}
          env:
            - {{name: HOST, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
          ports: [{{name: epmd, containerPort: 4369}}, {{name: erlang, containerPort: 9000}}]
"#
    )
}

/// `dev` may read pods and port-forward to them, and nothing else: no Secrets.
const PORT_FORWARD_ONLY: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: port-forward, namespace: default}
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
metadata: {name: dev-port-forward, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: port-forward}
subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User, name: dev}]
"#;

/// A remote shell whose argv and state files are watched the whole time it is open: returns
/// what it printed. `pods` are the pods whose own processes may hold the cookie.
#[allow(clippy::too_many_arguments)]
fn watched_remsh(
    cluster: &SimCluster,
    state: &Path,
    kubeconfig: Option<&Path>,
    args: &[&str],
    node: &str,
    pod: &str,
    elixir: bool,
    cookie: &str,
    pods: &[&str],
) -> Result<String> {
    let excluded = pods
        .iter()
        .map(|p| pod_netns(cluster, p))
        .collect::<Result<Vec<_>>>()?;
    let watch = ArgvWatch::start(cookie, excluded);
    let (prompt, expr, answer) = shell_check(node, pod, elixir);
    let mut shell = remsh(cluster, state, kubeconfig, args)?;
    shell.expect(&prompt, PROMPT)?;
    // While the shell is open: the session's files (record, control socket, inetrc, hosts)
    // are there, and none holds the cookie.
    let (read, holding) = files_holding(state, cookie);
    assert!(read > 0, "no session files under {}", state.display());
    assert!(holding.is_empty(), "the cookie is in {holding:?}");
    shell.send(expr)?;
    shell.expect(&answer, Duration::from_secs(30))?;
    let (code, output) = leave(shell)?;
    let (scans, leaks) = watch.finish();
    assert_eq!(code, 0, "{output}");
    assert!(scans >= 20, "/proc was read only {scans} times");
    assert!(
        leaks.is_empty(),
        "the cookie was in the argv of: {leaks:#?}"
    );
    assert!(files_holding(state, cookie).1.is_empty());
    Ok(output)
}

/// The cookie comes from the pod's Secret (secretKeyRef or envFrom) with the user's own
/// credentials, or from `--cookie-file`; it never shows in any process's argv or in a file of
/// the session. A user who may port-forward but not read Secrets gets one line naming the Role
/// rule that would allow it, and `--cookie-file` still works for them.
#[test]
fn the_cookie_from_a_secret_or_a_file_never_in_argv_and_one_line_when_forbidden() -> Result<()> {
    let cookie = random_cookie("conn")?;
    let cluster = SimCluster::options()
        .rbac(PORT_FORWARD_ONLY)
        .start(&cookie_manifest(&cookie))?;
    let state = TempDir::new("brstate")?;
    let files = TempDir::new("brcookie")?;
    let cookie_file = files.path().join("cookie");
    std::fs::write(&cookie_file, format!("{cookie}\n"))?;
    let cookie_file = cookie_file.display().to_string();
    let pods = ["skr-0", "envfrom-0"];
    let node = |pod: &str| {
        cluster
            .pod_ip(pod)
            .map(|ip| format!("app@{ip}"))
            .with_context(|| format!("{pod} has no IP"))
    };
    let (skr, envfrom) = (node("skr-0")?, node("envfrom-0")?);

    // The /proc watch sees a process that does hold the cookie in its argv.
    let watch = ArgvWatch::start(&cookie, Vec::new());
    let holder = Proc(
        cluster
            .ws
            .command("sh")
            .args(["-c", "read line", &cookie])
            .stdin(Stdio::piped())
            .spawn()?,
    );
    // (finish() reads /proc once more, with the holder running.)
    let (_, seen) = watch.finish();
    drop(holder);
    assert!(
        seen.iter().any(|l| l.contains("read line")),
        "the watch missed a process: {seen:?}"
    );

    // The admin: the cookie from each Secret.
    for (pod, n) in [("skr-0", &skr), ("envfrom-0", &envfrom)] {
        assert_eq!(
            rpc_value(&cluster, state.path(), pod, "node().")?,
            format!("'{n}'\n")
        );
    }
    let out = watched_remsh(
        &cluster,
        state.path(),
        None,
        &["skr-0"],
        &skr,
        "skr-0",
        true,
        &cookie,
        &pods,
    )?;
    assert!(out.contains(&format!("the cookie for {skr}: from RELEASE_COOKIE of container app (Secret conn-cookie, key cookie)")), "{out}");
    let out = watched_remsh(
        &cluster,
        state.path(),
        None,
        &["envfrom-0"],
        &envfrom,
        "envfrom-0",
        false,
        &cookie,
        &pods,
    )?;
    assert!(out.contains(&format!("the cookie for {envfrom}: from RELEASE_COOKIE of container app (Secret conn-env, key RELEASE_COOKIE)")), "{out}");

    // `dev` may port-forward but not read Secrets (as kubectl sees it too).
    let dev = cluster.kubeconfig_for("dev")?;
    for (what, allowed) in [("pods/portforward", "yes"), ("secrets", "no")] {
        let verb = if what == "secrets" { "get" } else { "create" };
        let out = cluster
            .kubectl(&dev)
            .args(["auth", "can-i", verb, what])
            .output()?;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            allowed,
            "can-i {verb} {what}"
        );
    }
    for (pod, secret) in [("skr-0", "conn-cookie"), ("envfrom-0", "conn-env")] {
        let rule = format!(
            "cannot read Secret {secret} in namespace default (forbidden), which holds the cookie; a Role in default with \
             `apiGroups: [\"\"], resources: [\"secrets\"], verbs: [\"get\"], resourceNames: [\"{secret}\"]` allows it, or pass --cookie-file"
        );
        let out = rpc(&cluster, state.path(), Some(&dev), &[pod, "node()."])?;
        out.fails_saying(&rule);
        assert_eq!(
            (out.code, out.stderr.lines().count(), out.stdout.as_str()),
            (3, 1, ""),
            "{out:#?}"
        );
        remsh_output(&cluster, state.path(), Some(&dev), &[pod])?.fails_saying(&rule);
    }
    // ...and with --cookie-file, dev gets there.
    let out = rpc(
        &cluster,
        state.path(),
        Some(&dev),
        &["skr-0", "--cookie-file", &cookie_file, "node()."],
    )?;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, format!("'{skr}'\n").as_str()),
        "{out:#?}"
    );
    let out = watched_remsh(
        &cluster,
        state.path(),
        Some(&dev),
        &["envfrom-0", "--cookie-file", &cookie_file],
        &envfrom,
        "envfrom-0",
        false,
        &cookie,
        &pods,
    )?;
    assert!(
        out.contains(&format!(
            "the cookie for {envfrom}: from file {cookie_file}"
        )),
        "{out}"
    );
    // Every session is gone, and left no file behind.
    let left: Vec<_> = std::fs::read_dir(state.path())?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

/// An Erlang node next to the example manifest's Elixir node.
const ERLANG_POD: &str = r#"
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: erl, namespace: default}
spec:
  serviceName: erl
  replicas: 1
  selector: {matchLabels: {app: erl}}
  template:
    metadata: {labels: {app: erl}}
    spec:
      containers:
        - name: app
          image: erlang:25
          command: ["erl"]
          args: ["-name", "app@$(HOST)", "-setcookie", "secret", "-noshell", "-noinput"]
          env:
            - {name: HOST, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
          ports: [{name: epmd, containerPort: 4369}]
          readinessProbe:
            exec: {command: ["sh", "-c", "epmd -names | grep -q 'name app at port'"]}
            periodSeconds: 2
"#;

/// `rpc`'s exit codes as the README gives them (0 value, 1 raised, 2 does not parse, 3 did not
/// get there), in Erlang and Elixir; and a wrong `--cookie-file`: `rpc` and `remsh` fail in
/// plain words, quoting the line the pod's log then shows, which it does.
#[test]
fn rpc_exit_codes_and_a_wrong_cookie_in_plain_words() -> Result<()> {
    let cluster = SimCluster::start(&format!("{EXAMPLE_MANIFEST}{ERLANG_POD}"))?;
    let state = TempDir::new("brstate")?;
    let erl = |args: &[&str]| rpc(&cluster, state.path(), None, &[&["erl-0"], args].concat());
    let out = erl(&["lists:seq(1, 3)."])?;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, "[1,2,3]\n"),
        "{out:#?}"
    );
    let out = erl(&["io:format(\"hello~n\"), {ok, node()}."])?;
    let ip = cluster.pod_ip("erl-0").context("erl-0's IP")?;
    assert_eq!(
        (out.code, out.stdout.clone()),
        (0, format!("hello\n{{ok,'app@{ip}'}}\n")),
        "{out:#?}"
    );
    // A long expression (nested, several KiB) is no different.
    let long = format!(
        "length([{}]).",
        vec!["{a, [b, {c, \"d\"}]}"; 400].join(", ")
    );
    let out = erl(&[&long])?;
    assert_eq!((out.code, out.stdout.as_str()), (0, "400\n"), "{out:#?}");
    let out = erl(&["1/0."])?;
    assert_eq!(out.code, 1, "{out:#?}");
    assert!(
        out.stderr.starts_with(
            "** exception error: an error occurred when evaluating an arithmetic expression"
        ),
        "{out:#?}"
    );
    let out = erl(&["lists:seq(1,"])?;
    assert_eq!(out.code, 2, "{out:#?}");
    assert!(out.stderr.contains("syntax error"), "{out:#?}");
    let elixir = |args: &[&str]| {
        rpc(
            &cluster,
            state.path(),
            None,
            &[&["app-0", "--elixir"], args].concat(),
        )
    };
    let out = elixir(&["Enum.sum([1, 2, 3])"])?;
    assert_eq!((out.code, out.stdout.as_str()), (0, "6\n"), "{out:#?}");
    let out = elixir(&["raise \"boom\""])?;
    assert_eq!(
        (out.code, out.stderr.trim()),
        (1, "** (RuntimeError) boom"),
        "{out:#?}"
    );
    let out = elixir(&["Enum.sum([1, 2"])?;
    assert_eq!(out.code, 2, "{out:#?}");
    let out = rpc(&cluster, state.path(), None, &["app-9", "node()."])?;
    out.fails_saying("app-9");
    assert_eq!(out.code, 3);

    // A wrong cookie, for rpc and for remsh: the error says what the node's log now shows.
    let files = TempDir::new("brcookie")?;
    let wrong = files.path().join("wrong");
    std::fs::write(&wrong, "not-the-cookie\n")?;
    let wrong = wrong.display().to_string();
    let rpc_out = rpc(
        &cluster,
        state.path(),
        None,
        &["erl-0", "--cookie-file", &wrong, "node()."],
    )?;
    let remsh_out = remsh_output(
        &cluster,
        state.path(),
        None,
        &["erl-0", "--cookie-file", &wrong],
    )?;
    for out in [&rpc_out, &remsh_out] {
        let line = out.fails_saying("the node rejected the cookie");
        assert!(line.contains("give the right cookie (--cookie-file, ERLANG_COOKIE/RELEASE_COOKIE, or the pod's RELEASE_COOKIE)"), "{line}");
        let report = line.split('"').nth(1).context("the quoted log line")?;
        assert!(
            report.starts_with("** Connection attempt from node '")
                && report.ends_with("' rejected. Invalid challenge reply. **"),
            "{report}"
        );
        wait_until(
            "the report in the node's log",
            Duration::from_secs(10),
            || {
                container_log(&cluster, "erl-0", "app")
                    .is_ok_and(|log| log.lines().any(|l| l == report))
            },
        )
        .with_context(|| container_log(&cluster, "erl-0", "app").unwrap_or_default())?;
    }
    assert_eq!(rpc_out.code, 3);
    Ok(())
}

/// A node running TLS distribution (mutual TLS with certificates the test makes), named by its
/// StatefulSet DNS name, which its certificate carries. It starts once they are in its home.
const TLS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: tls, namespace: default}
spec:
  clusterIP: None
  selector: {app: tls}
  ports: [{name: epmd, port: 4369}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: tls, namespace: default}
spec:
  serviceName: tls
  replicas: 1
  selector: {matchLabels: {app: tls}}
  template:
    metadata: {labels: {app: tls}}
    spec:
      containers:
        - name: app
          image: erlang:25
          command: ["sh", "-c"]
          args:
            - |
              while [ ! -f "$HOME/tls/ready" ]; do sleep 0.1; done
              exec erl -name "app@$(POD_NAME).tls.default.svc.cluster.local" -setcookie tls-cookie \
                -proto_dist inet_tls -ssl_dist_optfile "$HOME/tls/ssl_dist.conf" \
                -kernel inet_dist_listen_min 9000 inet_dist_listen_max 9000 -noshell -noinput
          env:
            - {name: POD_NAME, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
          ports: [{name: epmd, containerPort: 4369}, {name: erlang, containerPort: 9000}]
"#;

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    run(Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null()))?;
    Ok(())
}

/// A CA, and a certificate for `server_name` and one for a client, signed by it (P-256 keys):
/// `ca.pem`, `server.pem`/`server.key`, `client.pem`/`client.key` in `dir`.
fn make_certificates(dir: &Path, server_name: &str) -> Result<()> {
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"][..],
            &key,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=beamredir test CA",
            ],
        ]
        .concat(),
    )?;
    for (who, san) in [
        ("server", format!("DNS:{server_name}")),
        ("client", "DNS:beamredir-test-client".to_string()),
    ] {
        let (keyfile, csr, ext, pem) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.ext"),
            format!("{who}.pem"),
        );
        openssl(
            dir,
            &[
                &["req"][..],
                &key,
                &[
                    "-keyout",
                    &keyfile,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={who}"),
                ],
            ]
            .concat(),
        )?;
        std::fs::write(dir.join(&ext), format!("subjectAltName={san}\n"))?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &pem,
                "-extfile",
                &ext,
            ],
        )?;
    }
    Ok(())
}

/// An `-ssl_dist_optfile`: this certificate for both sides, peers verified against the CA.
fn ssl_dist_conf(cert: &Path, key: &Path, ca: &Path) -> String {
    let opts = format!(
        "{{certfile, \"{}\"}}, {{keyfile, \"{}\"}}, {{cacertfile, \"{}\"}}, {{verify, verify_peer}}",
        cert.display(),
        key.display(),
        ca.display()
    );
    format!("[{{server, [{opts}, {{fail_if_no_peer_cert, true}}]}},\n {{client, [{opts}]}}].\n")
}

/// A TLS-distribution node is reached through `remsh POD --cookie-file F -- -proto_dist inet_tls
/// -ssl_dist_optfile FILE`: the redirect is plain L4, so TLS (both certificates verified, the
/// server's against the node's DNS name) runs end to end through the port-forward. Without the
/// flags, `remsh` says which to pass; `rpc` says it cannot speak TLS. The spec shows TLS, so no
/// plain probe is sent: the node logs nothing.
#[test]
fn tls_distribution_through_the_redirect_with_the_flags_passed_on() -> Result<()> {
    let cluster = SimCluster::options().wait_ready(false).start(TLS)?;
    let node = "app@tls-0.tls.default.svc.cluster.local";
    let mut home = None;
    wait_until("tls-0's home", Duration::from_secs(60), || {
        home = cluster.pod_home("tls-0");
        home.is_some()
    })?;
    let pod_tls = home.unwrap().join("tls");
    std::fs::create_dir_all(&pod_tls)?;
    let certs = TempDir::new("brcerts")?;
    make_certificates(certs.path(), "tls-0.tls.default.svc.cluster.local")?;
    for f in ["ca.pem", "server.pem", "server.key"] {
        std::fs::copy(certs.path().join(f), pod_tls.join(f))?;
    }
    std::fs::write(
        pod_tls.join("ssl_dist.conf"),
        ssl_dist_conf(
            &pod_tls.join("server.pem"),
            &pod_tls.join("server.key"),
            &pod_tls.join("ca.pem"),
        ),
    )?;
    std::fs::write(pod_tls.join("ready"), "")?;
    let local_conf = certs.path().join("ssl_dist.conf");
    std::fs::write(
        &local_conf,
        ssl_dist_conf(
            &certs.path().join("client.pem"),
            &certs.path().join("client.key"),
            &certs.path().join("ca.pem"),
        ),
    )?;
    cluster.wait_ready("default", "tls-0", Duration::from_secs(60))?;
    let cookie_file = certs.path().join("cookie");
    std::fs::write(&cookie_file, "tls-cookie\n")?;
    let cookie_file = cookie_file.display().to_string();
    let state = TempDir::new("brstate")?;

    let out = rpc(
        &cluster,
        state.path(),
        None,
        &["tls-0", "--cookie-file", &cookie_file, "node()."],
    )?;
    out.fails_saying("the node on pod tls-0 runs TLS distribution, which `rpc` cannot speak; use `beamredir remsh` with its TLS flags");
    assert_eq!((out.code, out.stderr.lines().count()), (3, 1), "{out:#?}");
    let out = remsh_output(
        &cluster,
        state.path(),
        None,
        &["tls-0", "--cookie-file", &cookie_file],
    )?;
    out.fails_saying(&format!(
        "node {node} runs TLS distribution: pass its flags to the local node after --, e.g. -- -proto_dist inet_tls -ssl_dist_optfile FILE"
    ));

    // With the flags: a shell on the node, over a TLS connection (as the node sees it).
    let local_conf = local_conf.display().to_string();
    let args = [
        "tls-0",
        "--cookie-file",
        &cookie_file,
        "--",
        "-proto_dist",
        "inet_tls",
        "-ssl_dist_optfile",
        &local_conf,
    ];
    let mut shell = remsh(&cluster, state.path(), None, &args)?;
    shell.expect(&format!("({node})1>"), PROMPT)?;
    shell.send(
        "{os:getenv(\"HOSTNAME\"), [element(4, proplists:get_value(address, I)) || N <- nodes(hidden), {ok, I} <- [net_kernel:node_info(N)]]}.\n",
    )?;
    // #net_address.protocol of the shell's connection.
    shell.expect("{\"tls-0\",[tls]}", Duration::from_secs(30))?;
    let (code, output) = leave(shell)?;
    assert_eq!(code, 0, "{output}");
    assert_eq!(
        container_log(&cluster, "tls-0", "app")?,
        "",
        "no plain probe, no TLS alert, nothing logged"
    );
    Ok(())
}

/// A pod whose epmd lists two nodes (two containers, one epmd in the shared network).
const TWO_NODES: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: duo, namespace: default}
spec:
  serviceName: duo
  replicas: 1
  selector: {matchLabels: {app: duo}}
  template:
    metadata: {labels: {app: duo}}
    spec:
      containers:
        - name: app
          image: erlang:25
          command: ["erl"]
          args: ["-name", "app@$(HOST)", "-setcookie", "duo-cookie", "-noshell", "-noinput"]
          env:
            - {name: HOST, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
          ports: [{name: epmd, containerPort: 4369}]
          readinessProbe:
            exec: {command: ["sh", "-c", "epmd -names | grep -q 'name app at port'"]}
            periodSeconds: 2
        - name: worker
          image: erlang:25
          command: ["erl"]
          args: ["-name", "worker@$(HOST)", "-setcookie", "duo-cookie", "-noshell", "-noinput"]
          env:
            - {name: HOST, valueFrom: {fieldRef: {fieldPath: status.podIP}}}
          readinessProbe:
            exec: {command: ["sh", "-c", "epmd -names | grep -q 'name worker at port'"]}
            periodSeconds: 2
"#;

/// Two nodes on one pod: without `--node`, `remsh` and `rpc` say to pick one and name both;
/// `--node` (short or exact) reaches the chosen one; a `--node` that matches no node, or whose
/// host differs from what the node calls itself, says so.
#[test]
fn several_nodes_on_one_pod_pick_one_with_node() -> Result<()> {
    let cluster = SimCluster::start(TWO_NODES)?;
    let state = TempDir::new("brstate")?;
    let ip = cluster.pod_ip("duo-0").context("duo-0's IP")?;
    let (app, worker) = (format!("app@{ip}"), format!("worker@{ip}"));

    let out = remsh_output(&cluster, state.path(), None, &["duo-0"])?;
    let line = out
        .fails_saying("pod duo-0 runs several nodes (")
        .to_string();
    assert!(
        line.contains(&app)
            && line.contains(&worker)
            && line.ends_with("); pick one with --node NAME"),
        "{line}"
    );
    let out = rpc(&cluster, state.path(), None, &["duo-0", "node()."])?;
    assert_eq!(out.fails_saying("pod duo-0 runs several nodes ("), line);
    assert_eq!(out.code, 3);

    let out = rpc(
        &cluster,
        state.path(),
        None,
        &["duo-0", "--node", "worker", "node()."],
    )?;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (0, format!("'{worker}'\n").as_str()),
        "{out:#?}"
    );
    remsh_runs(
        &cluster,
        state.path(),
        None,
        &["duo-0", "--node", &worker],
        &worker,
        "duo-0",
        false,
    )?;

    let out = remsh_output(
        &cluster,
        state.path(),
        None,
        &["duo-0", "--node", "worker@10.9.9.9"],
    )?;
    out.fails_saying(&format!(
        "the node calls itself {worker}, not worker@10.9.9.9"
    ));
    let out = remsh_output(&cluster, state.path(), None, &["duo-0", "--node", "nope"])?;
    let line = out.fails_saying("pod duo-0 runs no node named nope (its nodes: ");
    assert!(line.contains(&app) && line.contains(&worker), "{line}");
    Ok(())
}

/// A real X server of our own: Xvfb in the workstation namespace, no TCP, clients admitted
/// only with its MIT-MAGIC-COOKIE-1 (as a desktop's X server does).
struct X {
    _server: Proc,
    /// `:N`
    display: String,
    /// The client's authority file: `HOME/.Xauthority` of the home it was made for.
    authority: PathBuf,
}

impl X {
    /// Starts the server; the client's cookie goes to `home/.Xauthority`, where Xlib looks
    /// when `XAUTHORITY` is not set.
    fn start(cluster: &SimCluster, home: &Path) -> Result<X> {
        let mut bytes = [0u8; 16];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        // The server takes every cookie of its -auth file, whatever display it names.
        let server_auth = home.join("xvfb.auth");
        run(Command::new("xauth")
            .arg("-f")
            .arg(&server_auth)
            .args(["add", ":0", ".", &hex]))?;
        let mut child = cluster
            .ws
            .command("Xvfb")
            .args([
                "-displayfd",
                "1",
                "-nolisten",
                "tcp",
                "-screen",
                "0",
                "1024x700x24",
                "-auth",
            ])
            .arg(&server_auth)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting Xvfb (is xvfb installed? run scripts/setup.sh)")?;
        let stdout = child.stdout.take().context("Xvfb's stdout")?;
        let server = Proc(child);
        // It writes the display it took once it listens.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("Xvfb did not say which display it took")?;
        let n: u32 = line
            .trim()
            .parse()
            .with_context(|| format!("Xvfb said {line:?} for its display"))?;
        let display = format!(":{n}");
        let authority = home.join(".Xauthority");
        run(Command::new("xauth")
            .arg("-f")
            .arg(&authority)
            .args(["add", &display, ".", &hex]))?;
        Ok(X {
            _server: server,
            display,
            authority,
        })
    }

    /// An X client in the workstation namespace, with the cookie.
    fn client(&self, cluster: &SimCluster, program: &str) -> Command {
        let mut cmd = cluster.ws.command(program);
        cmd.args(["-display", &self.display])
            .env("XAUTHORITY", &self.authority);
        cmd
    }

    /// The id of the window titled `title`, if there is one.
    fn window_id(&self, cluster: &SimCluster, title: &str) -> Option<String> {
        let out = self
            .client(cluster, "xwininfo")
            .args(["-name", title])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
            l.trim()
                .strip_prefix("xwininfo: Window id: ")
                .and_then(|r| r.split_whitespace().next())
                .map(String::from)
        })
    }
}

/// Where the test keeps its screenshot: the workspace's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .join("target")
        })
}

/// `beamredir observer POD` under Xvfb: observer starts connected to the pod's node, its window
/// names that node, and the node loads and runs `observer_backend` (checked with a call trace
/// set up on the node beforehand). A screenshot of the window goes to target/observer.png.
#[test]
fn observer_under_xvfb_shows_the_pod_node() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let state = TempDir::new("brstate")?;
    let node = format!("app@{}", cluster.pod_ip("app-0").context("app-0's IP")?);
    assert_eq!(
        rpc_value(
            &cluster,
            state.path(),
            "app-0",
            "code:is_loaded(observer_backend)."
        )?,
        "false\n"
    );
    // A call trace on the node for every module loaded from now on, collected by a process of
    // its own.
    let trace = "C = spawn(fun() -> Loop = fun L(Calls) -> receive {trace, _, call, {M, F, _}} -> L([{M, F} | Calls]); \
                 {calls, From} -> From ! {calls, Calls}, L(Calls) end end, Loop([]) end), \
                 true = register(beamredir_test_calls, C), erlang:trace_pattern(on_load, true, [local]), \
                 erlang:trace(all, true, [call, {tracer, C}]), ok.";
    assert_eq!(rpc_value(&cluster, state.path(), "app-0", trace)?, "ok\n");
    let calls = "beamredir_test_calls ! {calls, self()}, receive {calls, Cs} -> lists:usort([F || {observer_backend, F} <- Cs]) after 5000 -> timeout end.";

    // Your HOME, with the X server's cookie in ~/.Xauthority and no XAUTHORITY (as after
    // `ssh -X` or `startx`): the local node, whose HOME is a private one, must still find it.
    let home = TempDir::new("brhome")?;
    let x = X::start(&cluster, home.path())?;
    let log = state.path().join("observer.log");
    let child = cluster
        .beamredir(state.path())
        .args(["observer", "app-0"])
        .env("DISPLAY", &x.display)
        .env("HOME", home.path())
        .env_remove("XAUTHORITY")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(state.path().join("observer.err"))?)
        .spawn()?;
    let mut observer = Graceful(child);
    let said = || {
        let read = |f: &str| std::fs::read_to_string(state.path().join(f)).unwrap_or_default();
        format!("{}{}", read("observer.log"), read("observer.err"))
    };
    wait_until("observer to connect", Duration::from_secs(120), || {
        if let Ok(Some(st)) = observer.0.try_wait() {
            panic!("beamredir observer exited ({st}):\n{}", said());
        }
        said().contains(&format!("observer connected to '{node}'"))
    })
    .with_context(said)?;
    // The pod's node serves observer: observer_backend loaded, and called (the System tab
    // asks for sys_info).
    let mut seen = String::new();
    wait_until(
        "observer_backend calls on the node",
        Duration::from_secs(60),
        || {
            seen = rpc_value(&cluster, state.path(), "app-0", calls).unwrap_or_default();
            seen.contains("sys_info")
        },
    )
    .with_context(|| format!("calls seen: {seen}"))?;
    assert!(
        rpc_value(
            &cluster,
            state.path(),
            "app-0",
            "code:is_loaded(observer_backend)."
        )?
        .starts_with("{file,")
    );
    // The window is about the pod's node.
    let title = format!("Observer - {node}");
    let mut id = None;
    wait_until("the observer window", Duration::from_secs(30), || {
        id = x.window_id(&cluster, &title);
        id.is_some()
    })?;
    let id = id.unwrap();
    // A screenshot once two in a row are the same (the window has drawn its first data).
    let dump = state.path().join("observer.xwd");
    let mut last = Vec::new();
    wait_until("the window to settle", Duration::from_secs(30), || {
        let out = x
            .client(&cluster, "xwd")
            .args(["-silent", "-id", &id])
            .output();
        let Some(out) = out
            .ok()
            .filter(|o| o.status.success() && !o.stdout.is_empty())
        else {
            return false;
        };
        let same = out.stdout == last;
        last = out.stdout;
        same
    })?;
    std::fs::write(&dump, &last)?;
    let png = target_dir().join("observer.png");
    run(Command::new("convert")
        .arg(format!("xwd:{}", dump.display()))
        .arg(format!("png:{}", png.display())))?;
    assert!(std::fs::metadata(&png)?.len() > 1000);

    // Ending the session ends observer's node; nothing stays behind.
    let pid = nix::unistd::Pid::from_raw(observer.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    wait_until("beamredir observer to end", Duration::from_secs(30), || {
        matches!(observer.0.try_wait(), Ok(Some(_)))
    })?;
    // Without a display it can use, observer says so (and the session ends with it).
    let out = Outcome::of(
        cluster
            .beamredir(state.path())
            .args(["observer", "app-0"])
            .env("DISPLAY", ":64999")
            .env("HOME", home.path())
            .stdin(Stdio::null())
            .output()?,
    );
    assert_eq!(out.code, 5, "{out:#?}");
    assert!(
        out.stderr.contains(
            "beamredir: observer did not start (can this user open a window on DISPLAY?): {error,"
        ),
        "{out:#?}"
    );
    let left: Vec<_> = std::fs::read_dir(state.path())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("observer."))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}
