//! Issue 10, "the session is the only door, and root does only what needs root": the forwards
//! admit only the session, the network part runs unprivileged and either part's death ends
//! both and leaves nothing, root trusts no record it did not write, another user's session is
//! not yours, and the cookie appears nowhere beamredir writes or runs. docs/security.md says
//! which test proves which point.
//!
//! Every `up` here runs as `sudo beamredir up` run by the `beamredir-test` user would (SUDO_*
//! set, HOME=/root, KUBECONFIG dropped): the network part then runs as that user.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use beamredir_testbed::{
    Graceful, Interactive, Netns, Proc, TempDir, beamredir_bin, cgroup2_root,
    cluster::{EXAMPLE_MANIFEST, SimCluster},
    require_root, run, text, unique, wait_until,
};

// ---------------------------------------------------------------------------------------------
// The invoking user, and `up` as they run it.

/// The unprivileged user who "ran sudo" (the same one tests/kube.rs uses; created once per
/// machine).
struct User {
    name: String,
    home: PathBuf,
    uid: u32,
    gid: u32,
}

fn sudo_user() -> Result<User> {
    let name = "beamredir-test";
    let home = PathBuf::from("/var/tmp/beamredir-test-home");
    if Command::new("id").arg(name).output()?.status.code() != Some(0) {
        // Two tests may get here at once: the loser's useradd fails, the user exists all the same.
        let _ = Command::new("useradd")
            .args(["--system", "--create-home", "--home-dir"])
            .arg(&home)
            .args(["--shell", "/bin/sh", name])
            .output();
    }
    let id = |flag: &str| -> Result<u32> {
        Ok(
            String::from_utf8(run(Command::new("id").args([flag, name]))?.stdout)?
                .trim()
                .parse()?,
        )
    };
    Ok(User {
        name: name.into(),
        home,
        uid: id("-u")?,
        gid: id("-g")?,
    })
}

impl User {
    /// What beamredir sees when this user runs it with sudo.
    fn sudo<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("SUDO_USER", &self.name)
            .env("SUDO_UID", self.uid.to_string())
            .env("SUDO_GID", self.gid.to_string())
            .env("HOME", "/root")
            .env_remove("KUBECONFIG")
    }

    /// A copy of the cluster's kubeconfig that only this user can read.
    fn kubeconfig(&self, cluster: &SimCluster, dir: &TempDir) -> Result<PathBuf> {
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))?;
        let path = dir.path().join(format!("kubeconfig-{}", self.name));
        fs::copy(&cluster.kubeconfig, &path)?;
        std::os::unix::fs::chown(&path, Some(self.uid), Some(self.gid))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }

    /// `setpriv` as this user (no groups but their own), then `program`.
    fn setpriv(&self, ns: &Netns, program: &str) -> Command {
        as_uid(ns, self.uid, self.gid, program)
    }
}

/// A command run in `ns` as `uid:gid` with no supplementary groups.
fn as_uid(ns: &Netns, uid: u32, gid: u32, program: &str) -> Command {
    let mut cmd = ns.command("setpriv");
    cmd.args([
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
        program.into(),
    ]);
    cmd
}

/// Starts `sudo beamredir up --session SESSION ARGS…` as `user` (stderr to `log`) and waits
/// until the session answers `status`. SIGTERM on drop.
fn start_up(
    cluster: &SimCluster,
    user: &User,
    state: &Path,
    session: &str,
    args: &[&str],
    log: &Path,
) -> Result<Graceful> {
    let mut cmd = cluster.beamredir(state);
    // The soft open-file limit a login session usually gives (1024), whatever this harness has,
    // so a test can tell beamredir's own limits from the one its commands get back.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    let limit = libc::rlimit { rlim_cur: hard.min(1024), rlim_max: hard };
    // SAFETY: setrlimit is async-signal-safe; `limit` is copied into the closure.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    user.sudo(&mut cmd)
        .args(["up", "--session", session])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(log)?);
    let mut proc = Graceful(cmd.spawn()?);
    wait_until("the up session", Duration::from_secs(30), || {
        if let Ok(Some(st)) = proc.0.try_wait() {
            panic!(
                "beamredir up exited early ({st}): {}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        cluster
            .session_status(state, session)
            .is_some_and(|s| s["state"] == "running")
    })?;
    Ok(proc)
}

// ---------------------------------------------------------------------------------------------
// Probing a forward.

/// Connects, sends an EPMD NAMES request and reads to the end. One line out:
/// `connect-failed ERRNO`, `timeout N`, or `closed BYTES MILLISECONDS ANSWER`.
const PROBE: &str = r#"
import socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET)
s.settimeout(10)
t = time.monotonic()
try:
    s.connect((host, port))
except OSError as e:
    print('connect-failed', e.errno); sys.exit(0)
d = b''
try:
    s.sendall(b'\x00\x01n')
    while True:
        c = s.recv(4096)
        if not c: break
        d += c
except (ConnectionResetError, BrokenPipeError):
    pass
except socket.timeout:
    print('timeout', len(d)); sys.exit(0)
print('closed', len(d), int((time.monotonic() - t) * 1000), d[4:].decode(errors='replace').strip().replace('\n', '|'))
"#;

/// Runs a probe command (its args end with `python3 -c PROBE` or equivalent) against
/// `host port`; returns its one line.
fn probe(cmd: &mut Command, host: &str, port: u16) -> Result<String> {
    let out = cmd
        .args(["-c", PROBE, host, &port.to_string()])
        .stdin(Stdio::null())
        .output()?;
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    ensure!(!line.is_empty(), "the probe said nothing: {}", text(&out));
    Ok(line)
}

/// A refused connection: closed by the forward without a byte, at once.
fn assert_refused(who: &str, line: &str) {
    let f: Vec<&str> = line.split_whitespace().collect();
    assert!(
        f.len() >= 3 && f[0] == "closed" && f[1] == "0",
        "{who}: expected the forward to close the connection unanswered, got {line:?}"
    );
    let ms: u64 = f[2].parse().unwrap();
    assert!(
        ms < 2000,
        "{who}: the refused connection took {ms} ms to close"
    );
}

/// An admitted connection: the pod's epmd answered through the port-forward.
fn assert_answered(who: &str, line: &str) {
    assert!(
        line.starts_with("closed ") && line.contains("name app at port 9000"),
        "{who}: expected the pod's epmd to answer, got {line:?}"
    );
}

/// Port-forward upgrade requests the API server got for app-0 so far.
fn portforwards(cluster: &SimCluster) -> usize {
    cluster
        .portforward_requests()
        .get("default/app-0")
        .copied()
        .unwrap_or(0)
}

/// The redirect of `pod` in a session's status.
fn redirect_of(status: &serde_json::Value, pod: &str) -> serde_json::Value {
    status["redirects"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["pod"] == pod).cloned())
        .unwrap_or_else(|| panic!("no redirect for {pod}: {status:#}"))
}

/// The local port a forward listens on (from its redirect's `local`).
fn local_port(redirect: &serde_json::Value) -> u16 {
    redirect["local"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Log lines of refusals that name `uid`.
fn refusal_lines(log: &Path, uid: u32) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("refused a connection") && l.contains(&format!("(uid {uid})")))
        .map(String::from)
        .collect()
}

#[test]
fn forwards_admit_the_sessions_processes_and_refuse_everyone_else_before_the_api_server()
-> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let user = sudo_user()?;
    let (dir, state) = (TempDir::new("brsec")?, TempDir::new("brstate")?);
    let kubeconfig = user.kubeconfig(&cluster, &dir)?;
    let session = unique("gate");
    let log = dir.path().join("up.log");
    let _up = start_up(
        &cluster,
        &user,
        state.path(),
        &session,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--pod",
            "app-0",
        ],
        &log,
    )?;
    let ip = cluster.pod_ip("app-0").context("pod IP")?.to_string();
    let epmd = redirect_of(
        &cluster.session_status(state.path(), &session).unwrap(),
        &format!("{ip}:4369"),
    );
    let port = local_port(&epmd);
    let before = portforwards(&cluster);

    // Straight at the forward's loopback port, from outside the session's cgroup: nobody
    // (twice), root, and the invoking user themselves.
    let nobody = || as_uid(&cluster.ws, 65534, 65534, "/usr/bin/python3");
    assert_refused("uid 65534", &probe(&mut nobody(), "127.0.0.1", port)?);
    assert_refused("uid 65534 again", &probe(&mut nobody(), "127.0.0.1", port)?);
    assert_refused(
        "root outside the session",
        &probe(
            &mut cluster.ws.command("/usr/bin/python3"),
            "127.0.0.1",
            port,
        )?,
    );
    assert_refused(
        "the invoking user outside the session",
        &probe(
            &mut user.setpriv(&cluster.ws, "/usr/bin/python3"),
            "127.0.0.1",
            port,
        )?,
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        portforwards(&cluster),
        before,
        "a refused connection reached the API server"
    );
    let status = cluster.session_status(state.path(), &session).unwrap();
    assert_eq!(status["connections"]["refused"], 4, "{status:#}");
    assert_eq!(
        redirect_of(&status, &format!("{ip}:4369"))["forward"]["refused"],
        4,
        "{status:#}"
    );
    // One log line per peer uid, naming it.
    for uid in [65534, 0, user.uid] {
        let lines = refusal_lines(&log, uid);
        assert_eq!(
            lines.len(),
            1,
            "uid {uid}: {lines:#?}\n{}",
            fs::read_to_string(&log)?
        );
    }

    // In the session (`beamredir exec`), the same forward answers: by the pod's address, and
    // by its IPv4-mapped address from a dual-stack socket.
    let exec = || {
        let mut cmd = cluster.beamredir(state.path());
        user.sudo(&mut cmd)
            .args(["exec", "--session", &session, "--", "/usr/bin/python3"]);
        cmd
    };
    assert_answered("a session process", &probe(&mut exec(), &ip, 4369)?);
    assert_answered(
        "a session process (dual-stack socket)",
        &probe(&mut exec(), &format!("::ffff:{ip}"), 4369)?,
    );
    assert_eq!(portforwards(&cluster), before + 2);

    // A session process that enters another network namespace is neither redirected (the
    // programs translate only the session's namespace: no route to the pod there) nor can it
    // reach the forward's port (loopback is per namespace).
    let other = Netns::new("brother")?;
    let in_other = || {
        let mut cmd = cluster.beamredir(state.path());
        cmd.args([
            "exec",
            "--any-user",
            "--session",
            &session,
            "--",
            "nsenter",
            &format!("--net={}", other.path().display()),
            "--",
            "/usr/bin/python3",
        ]);
        cmd
    };
    assert_eq!(
        probe(&mut in_other(), &ip, 4369)?,
        format!("connect-failed {}", libc::ENETUNREACH)
    );
    assert_eq!(
        probe(&mut in_other(), "127.0.0.1", port)?,
        format!("connect-failed {}", libc::ECONNREFUSED)
    );
    assert_eq!(portforwards(&cluster), before + 2);
    Ok(())
}

#[test]
fn with_global_the_forwards_admit_the_invoking_users_processes_only() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let user = sudo_user()?;
    let (dir, state) = (TempDir::new("brsec")?, TempDir::new("brstate")?);
    let kubeconfig = user.kubeconfig(&cluster, &dir)?;
    let session = unique("global");
    let log = dir.path().join("up.log");
    let _up = start_up(
        &cluster,
        &user,
        state.path(),
        &session,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--pod",
            "app-0",
            "--global",
        ],
        &log,
    )?;
    let ip = cluster.pod_ip("app-0").context("pod IP")?.to_string();
    let before = portforwards(&cluster);
    // Every process of the workstation is redirected; only the invoking user's get through.
    assert_refused(
        "uid 65534",
        &probe(
            &mut as_uid(&cluster.ws, 65534, 65534, "/usr/bin/python3"),
            &ip,
            4369,
        )?,
    );
    assert_refused(
        "root",
        &probe(&mut cluster.ws.command("/usr/bin/python3"), &ip, 4369)?,
    );
    assert_eq!(
        portforwards(&cluster),
        before,
        "a refused connection reached the API server"
    );
    assert_answered(
        "the invoking user",
        &probe(
            &mut user.setpriv(&cluster.ws, "/usr/bin/python3"),
            &ip,
            4369,
        )?,
    );
    assert_eq!(portforwards(&cluster), before + 1);
    let status = cluster.session_status(state.path(), &session).unwrap();
    assert_eq!(status["connections"]["refused"], 2, "{status:#}");
    assert_eq!(
        refusal_lines(&log, 65534).len(),
        1,
        "{}",
        fs::read_to_string(&log)?
    );
    assert_eq!(
        refusal_lines(&log, 0).len(),
        1,
        "{}",
        fs::read_to_string(&log)?
    );
    assert!(refusal_lines(&log, user.uid).is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The two parts, seen from /proc.

/// Children of `pid`: (pid, command line with spaces).
fn children(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some(ppid) = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1)?.parse::<u32>().ok())
        else {
            continue;
        };
        if ppid == pid {
            let cmdline = fs::read(format!("/proc/{child}/cmdline")).unwrap_or_default();
            out.push((
                child,
                String::from_utf8_lossy(&cmdline)
                    .replace('\0', " ")
                    .trim()
                    .to_string(),
            ));
        }
    }
    out
}

fn child_running(pid: u32, what: &str) -> Result<u32> {
    children(pid)
        .into_iter()
        .find(|(_, c)| c.contains(what))
        .map(|(p, _)| p)
        .with_context(|| format!("no child of {pid} runs {what:?}: {:?}", children(pid)))
}

/// A field of /proc/PID/status, whitespace-normalised.
fn status_field(pid: u32, field: &str) -> Result<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Open descriptors of a process: fd → what it is (the /proc/PID/fd link).
/// The soft and hard "Max open files" of a process (`/proc/PID/limits`).
fn open_files_limit(pid: u32) -> Result<(u64, u64)> {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .ok_or_else(|| anyhow::anyhow!("no open-files line in /proc/{pid}/limits"))?;
    let mut numbers = line["Max open files".len()..].split_whitespace().map(str::parse::<u64>);
    match (numbers.next(), numbers.next()) {
        (Some(Ok(soft)), Some(Ok(hard))) => Ok((soft, hard)),
        _ => anyhow::bail!("unexpected limits line: {line}"),
    }
}

fn fds(pid: u32) -> Result<BTreeMap<i32, String>> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let fd: i32 = entry.file_name().to_string_lossy().parse()?;
        if let Ok(link) = fs::read_link(entry.path()) {
            out.insert(fd, link.display().to_string());
        }
    }
    Ok(out)
}

/// Whether fd has close-on-exec (the `flags` of /proc/PID/fdinfo/FD, octal).
fn cloexec(pid: u32, fd: i32) -> Result<bool> {
    let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}"))?;
    let flags = info
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .context("no flags")?;
    Ok(u32::from_str_radix(flags.trim(), 8)? & libc::O_CLOEXEC as u32 != 0)
}

/// The TCP sockets a process holds, with their state (01 ESTABLISHED, 0A LISTEN, …): its
/// socket inodes looked up in /proc/PID/net/tcp{,6}, which show the process's own network
/// namespace (the workstation's), as `nsenter` would.
fn tcp_sockets(pid: u32) -> Result<Vec<(u64, String)>> {
    let mut states = BTreeMap::new();
    for table in ["tcp", "tcp6"] {
        for line in fs::read_to_string(format!("/proc/{pid}/net/{table}"))?
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(state), Some(inode)) =
                (f.get(3), f.get(9).and_then(|i| i.parse::<u64>().ok()))
            {
                states.insert(inode, state.to_string());
            }
        }
    }
    Ok(fds(pid)?
        .values()
        .filter_map(|l| {
            l.strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse::<u64>()
                .ok()
        })
        .filter_map(|inode| states.get(&inode).map(|s| (inode, s.clone())))
        .collect())
}

#[test]
fn the_network_part_is_unprivileged_and_root_holds_only_listening_sockets_and_leaks_no_fd()
-> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let user = sudo_user()?;
    let (dir, state) = (TempDir::new("brsec")?, TempDir::new("brstate")?);
    let kubeconfig = user.kubeconfig(&cluster, &dir)?;
    let session = unique("priv");
    let log = dir.path().join("up.log");
    let up = start_up(
        &cluster,
        &user,
        state.path(),
        &session,
        &[
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--pod",
            "app-0",
            "--",
            "sleep",
            "300",
        ],
        &log,
    )?;
    let root = up.0.id();
    let net = child_running(root, "__network-part")?;
    let reaper = child_running(root, "__reaper")?;
    let command = child_running(root, "sleep 300")?;

    // The network part: the invoking user, their groups only, no capability at all,
    // NO_NEW_PRIVS.
    let ids = |id: u32| format!("{id} {id} {id} {id}");
    assert_eq!(status_field(net, "Uid")?, ids(user.uid));
    assert_eq!(status_field(net, "Gid")?, ids(user.gid));
    let groups = String::from_utf8(run(Command::new("id").args(["-G", &user.name]))?.stdout)?;
    let mut want: Vec<&str> = groups.split_whitespace().collect();
    want.sort();
    let have = status_field(net, "Groups")?;
    let mut have: Vec<&str> = have.split_whitespace().collect();
    have.sort();
    assert_eq!(have, want, "supplementary groups");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(net, cap)?, "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(net, "NoNewPrivs")?, "1");
    // It holds no eBPF object (maps, programs and links are root's).
    let bpf: Vec<String> = fds(net)?
        .into_values()
        .filter(|l| l.contains("bpf"))
        .collect();
    assert!(bpf.is_empty(), "the network part holds {bpf:?}");

    // A connection held open through the distribution forward, so there is traffic to hold.
    let ip = cluster.pod_ip("app-0").context("pod IP")?.to_string();
    let hold = "import socket,sys,time; s=socket.create_connection((sys.argv[1], 9000)); print('open', flush=True); time.sleep(60)";
    let mut cmd = cluster.beamredir(state.path());
    user.sudo(&mut cmd)
        .args([
            "exec",
            "--session",
            &session,
            "--",
            "/usr/bin/python3",
            "-c",
            hold,
            &ip,
        ])
        .stdout(Stdio::piped())
        .stdin(Stdio::null());
    let mut holder = Proc(cmd.spawn()?);
    let mut line = String::new();
    BufReader::new(holder.0.stdout.take().unwrap()).read_line(&mut line)?;
    assert_eq!(line.trim(), "open");
    wait_until("the port-forward stream", Duration::from_secs(10), || {
        cluster.active_port_forwards() >= 1
    })?;

    // Root holds TCP sockets only to listen on (its copies of the forwards' listeners), none
    // connected; the network part holds the connections.
    let root_tcp = tcp_sockets(root)?;
    assert!(root_tcp.len() >= 2, "root holds no listener: {root_tcp:?}");
    assert!(
        root_tcp.iter().all(|(_, s)| s == "0A"),
        "root holds a TCP socket that is not listening: {root_tcp:?}"
    );
    let net_tcp = tcp_sockets(net)?;
    assert!(
        net_tcp.iter().filter(|(_, s)| s == "01").count() >= 2,
        "{net_tcp:?}"
    );
    // The listeners root holds are exactly the forwards' (the network part's are the same sockets).
    let root_inodes: BTreeSet<u64> = root_tcp.iter().map(|(i, _)| *i).collect();
    let net_listening: BTreeSet<u64> = net_tcp
        .iter()
        .filter(|(_, s)| s == "0A")
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(root_inodes, net_listening);
    // The reaper holds no socket at all, and it holds its pipe (fd 3): the pipe is how it knows
    // when root is gone (once it started without it, and acted only on a 30 s poll).
    let reaper_fds = fds(reaper)?;
    assert!(
        reaper_fds.values().all(|l| !l.starts_with("socket:")),
        "{reaper_fds:?}"
    );
    assert!(
        reaper_fds.get(&3).is_some_and(|l| l.starts_with("pipe:")),
        "the reaper's fd 3 is not its pipe: {reaper_fds:?}"
    );

    // Root raised its open-file limit for its listeners; the command got the original back.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?;
    assert_eq!(open_files_limit(root)?, (hard, hard));
    assert_eq!(open_files_limit(command)?, (hard.min(1024), hard));

    // Nothing root or the network part opened is inherited: the session's command has its
    // three standard streams only, and every other descriptor of both parts is close-on-exec.
    let inherited = fds(command)?;
    assert_eq!(
        inherited.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2],
        "the command inherited {inherited:?}"
    );
    for pid in [root, net] {
        for (fd, what) in fds(pid)?.into_iter().filter(|(fd, _)| *fd > 2) {
            assert!(
                cloexec(pid, fd)?,
                "fd {fd} ({what}) of pid {pid} is not close-on-exec"
            );
        }
    }
    drop(holder);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Killing either part.

/// Program ids attached to a cgroup, as bpftool sees them.
fn attached_ids(cgroup: &Path) -> Result<Vec<u64>> {
    let out = run(Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(cgroup))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::json!([]));
    Ok(v.as_array()
        .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        .unwrap_or_default())
}

fn program_exists(id: u64) -> bool {
    Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// TCP ports listening in the workstation namespace.
fn listening(cluster: &SimCluster) -> Result<BTreeSet<u16>> {
    let out = run(cluster.ws.command("ss").args(["-Hltn"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_whitespace()
                .nth(3)?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect())
}

/// State dir entries of a session.
fn files_of(state: &Path, session: &str) -> Vec<String> {
    fs::read_dir(state)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(session))
        .collect()
}

/// Waits until nothing of a session is left: no program, no cgroup, no listener, no file, no
/// beamredir process.
fn assert_nothing_left(
    cluster: &SimCluster,
    state: &Path,
    session: &str,
    cgroup: &Path,
    programs: &[u64],
    ports: &BTreeSet<u16>,
    pids: &[u32],
) -> Result<()> {
    let describe = || {
        format!(
            "programs {:?}, cgroup exists {}, listening {:?}, files {:?}, processes alive {:?}",
            programs
                .iter()
                .filter(|id| program_exists(**id))
                .collect::<Vec<_>>(),
            cgroup.exists(),
            listening(cluster).map(|l| l.intersection(ports).copied().collect::<Vec<_>>()),
            files_of(state, session),
            pids.iter()
                .filter(|p| Path::new(&format!("/proc/{p}")).exists())
                .collect::<Vec<_>>()
        )
    };
    wait_until(
        "nothing to be left of the session",
        Duration::from_secs(15),
        || {
            programs.iter().all(|id| !program_exists(*id))
                && !cgroup.exists()
                && listening(cluster).is_ok_and(|l| l.is_disjoint(ports))
                && files_of(state, session).is_empty()
                && pids
                    .iter()
                    .all(|p| !Path::new(&format!("/proc/{p}")).exists())
        },
    )
    .with_context(describe)
}

/// A running session's cgroup, attached program ids and forward ports.
fn session_parts(
    cluster: &SimCluster,
    state: &Path,
    session: &str,
) -> Result<(PathBuf, Vec<u64>, BTreeSet<u16>)> {
    let status = cluster
        .session_status(state, session)
        .context("session listed")?;
    let cgroup = PathBuf::from(status["cgroup_path"].as_str().unwrap());
    let programs = attached_ids(&cgroup)?;
    ensure!(programs.len() == 4, "{programs:?}");
    let ports: BTreeSet<u16> = status["redirects"]
        .as_array()
        .unwrap()
        .iter()
        .map(local_port)
        .collect();
    ensure!(!ports.is_empty() && listening(cluster)?.is_superset(&ports));
    Ok((cgroup, programs, ports))
}

#[test]
fn killing_either_part_with_sigkill_ends_both_and_leaves_nothing() -> Result<()> {
    let cluster = SimCluster::start(EXAMPLE_MANIFEST)?;
    let user = sudo_user()?;
    let (dir, state) = (TempDir::new("brsec")?, TempDir::new("brstate")?);
    let kubeconfig = user.kubeconfig(&cluster, &dir)?;
    let args = [
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--pod",
        "app-0",
    ];

    // The network part dies: the root part sees its channel close and tears down.
    let session = unique("killnet");
    let mut up = start_up(
        &cluster,
        &user,
        state.path(),
        &session,
        &args,
        &dir.path().join("net.log"),
    )?;
    let (cgroup, programs, ports) = session_parts(&cluster, state.path(), &session)?;
    let (root, net, reaper) = (
        up.0.id(),
        child_running(up.0.id(), "__network-part")?,
        child_running(up.0.id(), "__reaper")?,
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(net as i32),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(st) = up.0.try_wait()? {
            break st.code();
        }
        ensure!(
            Instant::now() < deadline,
            "the root part outlived its network part"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        code,
        Some(1),
        "{}",
        fs::read_to_string(dir.path().join("net.log"))?
    );
    assert!(
        fs::read_to_string(dir.path().join("net.log"))?.contains("the network part of session")
    );
    assert_nothing_left(
        &cluster,
        state.path(),
        &session,
        &cgroup,
        &programs,
        &ports,
        &[root, net, reaper],
    )?;

    // The root part dies: the network part gets its parent-death signal, the kernel drops the
    // programs with their links, the reaper removes the cgroup and the files.
    let session = unique("killroot");
    let mut up = start_up(
        &cluster,
        &user,
        state.path(),
        &session,
        &args,
        &dir.path().join("root.log"),
    )?;
    let (cgroup, programs, ports) = session_parts(&cluster, state.path(), &session)?;
    let (root, net, reaper) = (
        up.0.id(),
        child_running(up.0.id(), "__network-part")?,
        child_running(up.0.id(), "__reaper")?,
    );
    up.0.kill()?;
    up.0.wait()?;
    assert_nothing_left(
        &cluster,
        state.path(),
        &session,
        &cgroup,
        &programs,
        &ports,
        &[root, net, reaper],
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The state directory.

/// A process parked in a cgroup the test made: what a forged record would have root move.
struct Victim {
    cgroup: PathBuf,
    proc: Proc,
}

impl Victim {
    fn new() -> Result<Self> {
        let cgroup = cgroup2_root()?.join(unique("brvictim"));
        fs::create_dir(&cgroup)?;
        let proc = Proc(Command::new("sleep").arg("120").spawn()?);
        fs::write(cgroup.join("cgroup.procs"), proc.0.id().to_string())?;
        Ok(Victim { cgroup, proc })
    }

    /// Its cgroup relative to the hierarchy root.
    fn rel(&self) -> String {
        format!("/{}", self.cgroup.file_name().unwrap().to_string_lossy())
    }

    fn pid(&self) -> u32 {
        self.proc.0.id()
    }

    /// Alive, and still in its cgroup.
    fn untouched(&mut self) -> bool {
        let cgroup = fs::read_to_string(format!("/proc/{}/cgroup", self.pid())).unwrap_or_default();
        matches!(self.proc.0.try_wait(), Ok(None))
            && cgroup.lines().any(|l| l == format!("0::{}", self.rel()))
    }
}

impl Drop for Victim {
    fn drop(&mut self) {
        let _ = self.proc.0.kill();
        let _ = self.proc.0.wait();
        let _ = fs::remove_dir(&self.cgroup);
    }
}

/// Start time of a process (field 22 of /proc/PID/stat), as records hold it.
fn start_ticks(pid: u32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    Ok(stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .context("short stat")?
        .parse()?)
}

/// A session record as beamredir writes them.
fn record(name: &str, pid: u32, pid_start: u64, cgroup: &str) -> String {
    serde_json::json!({
        "name": name, "pid": pid, "pid_start": pid_start, "started_unix": 0, "owner_uid": 0,
        "scope": {"kind": "session", "cgroup": cgroup}, "origin_cgroup": "/", "redirects": []
    })
    .to_string()
}

/// `beamredir ARGS` as root with a state dir, in `ns`; (success, stderr).
fn beamredir_in(ns: &Netns, state: &Path, args: &[&str]) -> Result<(bool, String)> {
    let out = ns
        .command(beamredir_bin())
        .args(args)
        .env("BEAMREDIR_STATE_DIR", state)
        .stdin(Stdio::null())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    ))
}

/// Refused, with exactly one line that says `says`.
fn assert_refused_with(what: &str, (ok, stderr): (bool, String), says: &str) {
    assert!(!ok, "{what} succeeded:\n{stderr}");
    assert_eq!(
        stderr.lines().count(),
        1,
        "{what}: more than one line:\n{stderr}"
    );
    assert!(
        stderr.contains(says),
        "{what}: expected {says:?}, got:\n{stderr}"
    );
}

const MAPPING: &str = "10.244.250.9:4369=14369";

/// `down`, `map` and `exec` naming session `name` are each refused with one line that says
/// `says`.
fn assert_session_commands_refused(
    ns: &Netns,
    state: &Path,
    name: &str,
    says: &str,
) -> Result<()> {
    for (what, args) in [
        ("down --session", vec!["down", "--session", name]),
        ("map with its name", vec!["map", "--session", name, MAPPING, "--", "true"]),
        ("exec", vec!["exec", "--session", name, "--", "true"]),
    ] {
        assert_refused_with(what, beamredir_in(ns, state, &args)?, says);
    }
    Ok(())
}

#[test]
fn a_forged_record_is_refused_and_root_moves_nothing() -> Result<()> {
    require_root()?;
    let ns = Netns::new("brsec")?;
    let state = TempDir::new("brstate")?;
    let mut victim = Victim::new()?;
    // A Session-scope record naming a cgroup that is not /beamredir/NAME, for a session whose
    // process is gone: cleaning it up would move the victim out and remove its cgroup.
    let name = unique("forged");
    let forged = record(&name, 1 << 22, 0, &victim.rel());
    let path = state.path().join(format!("{name}.json"));
    fs::write(&path, &forged)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    let says = format!(
        "is not valid (its cgroup {} is not /beamredir/{name}); nothing was done with it",
        victim.rel()
    );

    assert_session_commands_refused(&ns, state.path(), &name, &says)?;
    // What reads every record (status, down --all, a new session's clean-up of stale ones)
    // says it once, skips it, and goes on.
    for args in [
        vec!["status"],
        vec!["down", "--all"],
        vec!["map", "--session", &unique("other"), MAPPING, "--", "true"],
    ] {
        let (ok, stderr) = beamredir_in(&ns, state.path(), &args)?;
        assert!(ok, "{args:?}: {stderr}");
        assert_eq!(
            stderr.lines().filter(|l| l.contains(&says)).count(),
            1,
            "{args:?}: {stderr}"
        );
        if args[0] == "map" {
            // And `map` says at start that it cannot check who uses its forwards.
            assert!(
                stderr.contains("beamredir cannot check who connects to them"),
                "{stderr}"
            );
        }
    }
    assert!(
        victim.untouched(),
        "the forged record's cgroup lost its process"
    );
    assert!(victim.cgroup.exists());
    assert_eq!(
        fs::read_to_string(&path)?,
        forged,
        "the forged record was changed"
    );
    Ok(())
}

#[test]
fn a_state_dir_that_others_could_swap_is_refused_by_every_root_command() -> Result<()> {
    require_root()?;
    let ns = Netns::new("brsec")?;
    let mut victim = Victim::new()?;
    // The parent is writable by everyone (no sticky bit): anyone could replace the state dir
    // with their own, holding a valid-looking record of a live "session" whose pid is the
    // victim's. `down` would SIGTERM it, `exec` would join whatever it names.
    let parent = TempDir::new("brloose")?;
    fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o777))?;
    let state = parent.path().join("state");
    fs::create_dir(&state)?;
    fs::set_permissions(&state, fs::Permissions::from_mode(0o711))?;
    let name = unique("swapped");
    fs::write(
        state.join(format!("{name}.json")),
        record(
            &name,
            victim.pid(),
            start_ticks(victim.pid())?,
            &format!("/beamredir/{name}"),
        ),
    )?;
    let says = format!(
        "{}: {} is writable by others (mode 0777)",
        state.display(),
        parent.path().display()
    );
    for args in [
        vec!["map", "--session", &name, MAPPING, "--", "true"],
        vec!["down", "--session", &name],
        vec!["down", "--all"],
        vec!["exec", "--session", &name, "--", "true"],
        vec!["shell", "--session", &name],
        vec!["status"],
    ] {
        assert_refused_with(
            &format!("{args:?}"),
            beamredir_in(&ns, &state, &args)?,
            &says,
        );
    }
    assert!(
        victim.untouched(),
        "root acted on a record in an untrusted state dir"
    );

    // A state dir reached through a symbolic link its owner (not root) could re-point.
    let target = TempDir::new("brtarget")?;
    let link = std::env::temp_dir().join(unique("brlink"));
    std::os::unix::fs::symlink(target.path(), &link)?;
    let _unlink = Unlink(link.clone());
    std::os::unix::fs::lchown(&link, Some(65534), Some(65534))?;
    let via_link = link.join("state");
    for args in [
        vec!["map", "--session", &name, MAPPING, "--", "true"],
        vec!["down", "--all"],
    ] {
        assert_refused_with(
            &format!("{args:?} via a link"),
            beamredir_in(&ns, &via_link, &args)?,
            &format!(
                "{} is a symbolic link owned by uid 65534, not root",
                link.display()
            ),
        );
    }
    assert!(
        !target.path().join("state").exists(),
        "root created the state dir through the link"
    );
    Ok(())
}

/// Removes a path on drop.
struct Unlink(PathBuf);
impl Drop for Unlink {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn symlinks_in_the_state_dir_are_never_followed() -> Result<()> {
    require_root()?;
    let ns = Netns::new("brsec")?;
    let state = TempDir::new("brstate")?;
    let elsewhere = TempDir::new("brelsewhere")?;
    // NAME.json is a link to a record-shaped file elsewhere.
    let name = unique("linked");
    let target = elsewhere.path().join("record.json");
    let content = record(&name, 1 << 22, 0, &format!("/beamredir/{name}"));
    fs::write(&target, &content)?;
    std::os::unix::fs::symlink(&target, state.path().join(format!("{name}.json")))?;
    let says = format!(
        "{}/{name}.json is a symbolic link; beamredir never follows links in its state directory",
        state.path().display()
    );
    assert_session_commands_refused(&ns, state.path(), &name, &says)?;
    let (ok, stderr) = beamredir_in(&ns, state.path(), &["status"])?;
    assert!(
        ok && stderr.lines().count() == 1 && stderr.contains(&says),
        "status: {stderr}"
    );
    assert_eq!(fs::read_to_string(&target)?, content);
    // NAME.lock is a dangling link: root must not create its target.
    let state = TempDir::new("brstate")?;
    let name = unique("lock");
    let missing = elsewhere.path().join("created-by-root");
    std::os::unix::fs::symlink(&missing, state.path().join(format!("{name}.lock")))?;
    assert_refused_with(
        "map through a lock link",
        beamredir_in(
            &ns,
            state.path(),
            &["map", "--session", &name, MAPPING, "--", "true"],
        )?,
        &format!("{name}.lock is a symbolic link"),
    );
    assert!(!missing.exists(), "root created a file through a symlink");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Another user's session.

#[test]
fn another_users_session_is_refused_unless_root_itself_asks_with_any_user() -> Result<()> {
    require_root()?;
    let ns = Netns::new("brsec")?;
    let state = TempDir::new("brstate")?;
    let owner = sudo_user()?;
    let session = unique("owned");
    let beamredir = || {
        let mut cmd = ns.command(beamredir_bin());
        cmd.env("BEAMREDIR_STATE_DIR", state.path())
            .stdin(Stdio::null());
        cmd
    };
    let mut cmd = beamredir();
    owner
        .sudo(&mut cmd)
        .args(["map", "--session", &session, MAPPING])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let _map = Graceful(cmd.spawn()?);
    let listed = |cmd: &mut Command| -> bool {
        let out = cmd.args(["status", "--json"]).output().unwrap();
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|a| a.iter().any(|s| s["name"] == session.as_str()))
    };
    wait_until("the session", Duration::from_secs(20), || {
        listed(&mut beamredir())
    })?;

    // Another sudo user (SUDO_UID 65534): refused, even with --any-user, and not shown.
    let other = |args: &[&str]| -> (bool, String) {
        let out = beamredir()
            .env("SUDO_USER", "nobody")
            .env("SUDO_UID", "65534")
            .env("SUDO_GID", "65534")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    };
    let says = format!(
        "session \"{session}\" belongs to uid {}, not to you (uid 65534); only root itself may act on it, with --any-user",
        owner.uid
    );
    for args in [
        vec!["exec", "--session", &session, "--", "true"],
        vec!["exec", "--any-user", "--session", &session, "--", "true"],
        vec!["shell", "--session", &session],
        vec!["down", "--session", &session],
        vec!["down", "--any-user", "--session", &session],
    ] {
        assert_refused_with(&format!("{args:?}"), other(&args), &says);
    }
    let _ = other(&["down", "--all"]);
    assert!(
        !listed(
            beamredir()
                .env("SUDO_USER", "nobody")
                .env("SUDO_UID", "65534")
                .env("SUDO_GID", "65534")
        ),
        "status shows another user's session"
    );

    // Root itself: refused without --any-user, served with it.
    let (ok, stderr) = {
        let out = beamredir()
            .args(["exec", "--session", &session, "--", "true"])
            .output()?;
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        )
    };
    assert_refused_with(
        "root without --any-user",
        (ok, stderr),
        &format!("belongs to uid {}, not to you (uid 0)", owner.uid),
    );
    let out = run(beamredir().args([
        "exec",
        "--any-user",
        "--session",
        &session,
        "--",
        "grep",
        "^0::",
        "/proc/self/cgroup",
    ]))?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("0::/beamredir/{session}")
    );
    // The owner gets in as themselves.
    let mut cmd = beamredir();
    let out = run(owner.sudo(&mut cmd).args([
        "exec",
        "--session",
        &session,
        "--",
        "sh",
        "-c",
        "id -u; grep ^0:: /proc/self/cgroup",
    ]))?;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("{}\n0::/beamredir/{session}", owner.uid)
    );
    assert!(listed(&mut beamredir()));
    run(beamredir().args(["down", "--any-user", "--session", &session]))?;
    assert!(!listed(&mut beamredir()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The cookie.

/// A StatefulSet whose node gets its cookie the way README recommends for the local side:
/// from a file in its HOME (written from the environment by a shell builtin), never argv.
fn cookie_manifest(cookie: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: app, namespace: default}}
spec:
  serviceName: app
  replicas: 1
  selector: {{matchLabels: {{app: app}}}}
  template:
    metadata: {{labels: {{app: app}}}}
    spec:
      containers:
        - name: app
          command: ["sh", "-c", "umask 077 && printf %s \"$RELEASE_COOKIE\" > \"$HOME/.erlang.cookie\" && exec elixir --name \"app@$HOST\" --erl \"-kernel inet_dist_listen_min 9000 inet_dist_listen_max 9000\" --no-halt -e :ok"]
          env:
            - {{name: HOST, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}
            - {{name: RELEASE_COOKIE, value: "{cookie}"}}
          ports:
            - {{name: epmd, containerPort: 4369}}
            - {{name: erlang, containerPort: 9000}}
"#
    )
}

/// The user's ~/.erlang.cookie for the test's length, then what was there before.
struct CookieFile {
    path: PathBuf,
    before: Option<Vec<u8>>,
}

impl CookieFile {
    fn install(user: &User, cookie: &str) -> Result<Self> {
        let path = user.home.join(".erlang.cookie");
        let before = fs::read(&path).ok();
        let _ = fs::remove_file(&path);
        // Root writing in a user's directory: never through a link they could have put there.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::io::Write::write_all(&mut file, cookie.as_bytes())?;
        std::os::unix::fs::fchown(&file, Some(user.uid), Some(user.gid))?;
        file.set_permissions(fs::Permissions::from_mode(0o400))?;
        Ok(CookieFile { path, before })
    }
}

impl Drop for CookieFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        if let Some(b) = &self.before {
            if let Ok(mut f) = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&self.path)
            {
                let _ = std::io::Write::write_all(&mut f, b);
            }
        }
    }
}

/// Processes whose command line contains `needle`: (pid, command line).
fn cmdlines_containing(needle: &str) -> Vec<(u32, String)> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let c = String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/cmdline")).ok()?)
                .replace('\0', " ");
            c.contains(needle).then_some((pid, c))
        })
        .collect()
}

/// Regular files under `dir` (not into mounts) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(t) = entry.file_type() else { continue };
        if t.is_file()
            && fs::read(entry.path())
                .is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        {
            found.push(entry.path());
        }
    }
    found
}

#[test]
fn the_cookie_is_in_no_file_beamredir_writes_and_no_command_line_while_the_readme_command_runs()
-> Result<()> {
    let cookie = format!(
        "brsec{}x{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    let cluster = SimCluster::start(&cookie_manifest(&cookie))?;
    let user = sudo_user()?;
    let _cookie_file = CookieFile::install(&user, &cookie)?;
    let (dir, state) = (TempDir::new("brsec")?, TempDir::new("brstate")?);
    let kubeconfig = user.kubeconfig(&cluster, &dir)?;
    let node = format!("app@{}", cluster.pod_ip("app-0").context("pod IP")?);
    let session = unique("cookie");
    // README: `sudo beamredir up --pod app-0 -- iex --name debug@127.0.0.1 --hidden --remsh NODE`,
    // the cookie in ~/.erlang.cookie (script gives iex the terminal it wants).
    let iex = format!("iex --name debug@127.0.0.1 --hidden --remsh {node}");
    let mut cmd = cluster.beamredir(state.path());
    user.sudo(&mut cmd).args([
        "up",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--pod",
        "app-0",
        "--session",
        &session,
        "--",
        "script",
        "-qec",
        &iex,
        "/dev/null",
    ]);
    let mut up = Interactive::spawn(&mut cmd)?;
    up.expect(&format!("iex({node})1>"), Duration::from_secs(60))?;

    // Connected (so the cookie matched): no command line on the machine holds it...
    let leaks = cmdlines_containing(&cookie);
    assert!(
        leaks.is_empty(),
        "the cookie is in command lines: {leaks:#?}"
    );
    // ...nor anything in the state dir (records, lock, socket, hosts, inetrc), nor what
    // beamredir printed, nor what `status` says.
    let files: Vec<_> = fs::read_dir(state.path())?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().ends_with(".hosts"))
            && files
                .iter()
                .any(|f| f.to_string_lossy().ends_with(".inetrc")),
        "{files:?}"
    );
    assert_eq!(
        files_containing(state.path(), &cookie),
        Vec::<PathBuf>::new()
    );
    let status = run(cluster
        .beamredir(state.path())
        .args(["status", "-o", "json"]))?;
    assert!(!text(&status).contains(&cookie));
    assert!(
        !up.output().contains(&cookie),
        "beamredir printed the cookie"
    );
    up.send("\x07")?;
    up.expect("-->", Duration::from_secs(10))?;
    up.send("q\n")?;
    assert_eq!(up.wait(Duration::from_secs(20))?, 0);
    Ok(())
}
