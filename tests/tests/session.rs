//! Session behaviour: who is redirected and who is not, counters, getpeername, teardown on
//! every path (down, SIGKILL), and the --global/--cgroup scopes.
use std::{
    io::ErrorKind,
    net::{SocketAddrV4, TcpStream},
    process::Stdio,
    time::Duration,
};

use anyhow::{Result, ensure};
use beamredir_testbed::{EPMD_PORT, Netns, TestBed, bpftool_cgroup_programs, cgroup2_root, run, unique, wait_until};

/// A connect() from the test process itself, which is in no session, inside `ns`.
fn connect_outside_session(ns: &Netns, to: SocketAddrV4) -> Result<std::io::Result<SocketAddrV4>> {
    ns.in_ns(move || {
        TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)).map(|s| match s.peer_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            other => panic!("unexpected peer {other}"),
        })
    })
}

/// Python in the session: connect to the pod epmd and print what getpeername() says.
const PEER_SCRIPT: &str = "import socket,sys; s=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5); print('%s:%d' % s.getpeername())";

#[test]
fn session_redirects_its_own_processes_counts_them_and_nobody_else() -> Result<()> {
    let bed = TestBed::start()?;
    let session = unique("s");
    let _map = bed.start_session(&session, &[])?;
    let pod_epmd = SocketAddrV4::new(bed.pod.ip, EPMD_PORT);

    // Two processes joined through `beamredir exec` are redirected, and getpeername() shows
    // the pod endpoint, not the loopback forward.
    for _ in 0..2 {
        let out = run(bed
            .beamredir()
            .args(["exec", "--session", &session, "--", "python3", "-c", PEER_SCRIPT])
            .args([bed.pod.ip.to_string(), EPMD_PORT.to_string()]))?;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), pod_epmd.to_string());
    }

    // A dual-stack socket dialling the IPv4-mapped pod address is redirected too (connect6),
    // and getpeername() gives the mapped pod address back (getpeername6).
    let v6 = "import socket,sys; s=socket.socket(socket.AF_INET6); s.settimeout(5); s.connect(('::ffff:'+sys.argv[1], int(sys.argv[2]))); print('%s:%d' % s.getpeername()[:2])";
    let out = run(bed
        .beamredir()
        .args(["exec", "--session", &session, "--", "python3", "-c", v6])
        .args([bed.pod.ip.to_string(), EPMD_PORT.to_string()]))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("::ffff:{}:{EPMD_PORT}", bed.pod.ip));

    // The same connect from a process outside the session is not redirected: the workstation
    // has no route to the pod.
    let outside = connect_outside_session(&bed.ws, pod_epmd)?;
    assert_eq!(outside.unwrap_err().kind(), ErrorKind::NetworkUnreachable);

    // `status` shows the counter moved exactly twice for epmd and not at all for dist.
    let status = bed.session_status(&session).expect("session listed");
    let redirects = status["redirects"].as_array().unwrap();
    let count_of = |port: u16| {
        redirects
            .iter()
            .find(|r| r["pod"] == format!("{}:{port}", bed.pod.ip))
            .map(|r| r["connects"].as_u64().unwrap())
    };
    assert_eq!(count_of(EPMD_PORT), Some(3), "{status:#}");
    assert_eq!(count_of(bed.pod.dist_port), Some(0), "{status:#}");
    let table = run(bed.beamredir().arg("status"))?;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains(&session) && table.contains("running") && table.contains("connects 3"), "{table}");

    // `down` ends it: programs detached, cgroup and record gone.
    let cgroup = std::path::PathBuf::from(status["cgroup_path"].as_str().unwrap());
    assert_eq!(bpftool_cgroup_programs(&cgroup)?.len(), 4);
    run(bed.beamredir().args(["down", "--session", &session]))?;
    assert!(!cgroup.exists(), "session cgroup left behind");
    assert!(bed.session_status(&session).is_none());
    Ok(())
}

/// Starts a session, checks the four programs are attached, and returns it with its cgroup.
fn attached_session(bed: &TestBed, session: &str) -> Result<(beamredir_testbed::Graceful, std::path::PathBuf)> {
    let map = bed.start_session(session, &[])?;
    let status = bed.session_status(session).unwrap();
    let cgroup = std::path::PathBuf::from(status["cgroup_path"].as_str().unwrap());
    let attached = bpftool_cgroup_programs(&cgroup)?;
    let types: Vec<_> = attached.iter().map(|(t, _)| t.as_str()).collect();
    for t in ["cgroup_inet4_connect", "cgroup_inet4_getpeername", "cgroup_inet6_connect", "cgroup_inet6_getpeername"] {
        assert!(types.contains(&t), "{t} not attached: {attached:?}");
    }
    Ok((map, cgroup))
}

/// The pid of a session's reaper.
fn reaper_of(session: &str) -> Option<i32> {
    let out = std::process::Command::new("pgrep").args(["-f", &format!("__reaper {session} ")]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().next()?.trim().parse().ok()
}

#[test]
fn sigkill_detaches_the_programs_and_the_reaper_removes_the_rest() -> Result<()> {
    let bed = TestBed::start()?;
    let session = unique("k");
    let (mut map, cgroup) = attached_session(&bed, &session)?;
    assert!(reaper_of(&session).is_some(), "no reaper runs for the session");
    map.0.kill()?; // SIGKILL: no teardown code runs.
    map.0.wait()?;
    // The kernel dropped the bpf_links with the process: bpftool sees nothing attached.
    wait_until("programs to be detached", Duration::from_secs(5), || {
        bpftool_cgroup_programs(&cgroup).map(|p| p.is_empty()).unwrap_or(false) || !cgroup.exists()
    })?;
    // The reaper removes the cgroup, the record and the files, and ends.
    wait_until("the reaper to clean up", Duration::from_secs(10), || !cgroup.exists() && bed.session_status(&session).is_none() && reaper_of(&session).is_none())?;
    let left: Vec<_> = std::fs::read_dir(bed.state_dir.path())?.filter_map(Result::ok).map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains(&session)).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    Ok(())
}

#[test]
fn a_session_killed_with_its_reaper_is_cleaned_by_the_next_run() -> Result<()> {
    let bed = TestBed::start()?;
    let session = unique("k");
    let (mut map, cgroup) = attached_session(&bed, &session)?;
    let reaper = reaper_of(&session).expect("a reaper");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(reaper), nix::sys::signal::Signal::SIGKILL)?;
    map.0.kill()?;
    map.0.wait()?;
    wait_until("programs to be detached", Duration::from_secs(5), || bpftool_cgroup_programs(&cgroup).map(|p| p.is_empty()).unwrap_or(false))?;
    assert!(cgroup.exists(), "the stale cgroup is still there until the next run");
    assert_eq!(bed.session_status(&session).unwrap()["state"], "stale");

    // The next `map` cleans it up.
    let out = run(bed.beamredir().args(["map", "--session", &unique("n")]).args(bed.mappings()).args(["--", "true"]))?;
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("cleaned up stale session \"{session}\"")));
    assert!(!cgroup.exists(), "stale cgroup not removed");
    assert!(bed.session_status(&session).is_none());
    Ok(())
}

#[test]
fn global_scope_redirects_every_process_until_down() -> Result<()> {
    let bed = TestBed::start()?;
    let session = unique("g");
    let pod_epmd = SocketAddrV4::new(bed.pod.ip, EPMD_PORT);
    let mut map = bed.start_session(&session, &["--global"])?;
    // The test process is in no session cgroup, yet --global redirects it.
    let peer = connect_outside_session(&bed.ws, pod_epmd)?.expect("redirected connect");
    assert_eq!(peer, pod_epmd, "getpeername restores the pod address");
    run(bed.beamredir().args(["down", "--session", &session]))?;
    assert!(map.0.wait()?.success());
    let after = connect_outside_session(&bed.ws, pod_epmd)?;
    assert_eq!(after.unwrap_err().kind(), ErrorKind::NetworkUnreachable);
    Ok(())
}

/// Without its control socket (removed, or the session too busy to answer), `down` signals the
/// session's process itself, through a pidfd opened before the record's start time is checked.
#[test]
fn down_without_the_control_socket_signals_the_session_and_it_cleans_up() -> Result<()> {
    let bed = TestBed::start()?;
    let session = unique("k");
    let mut map = bed.start_session(&session, &[])?;
    std::fs::remove_file(bed.state_dir.path().join(format!("{session}.sock")))?;
    run(bed.beamredir().args(["down", "--session", &session]))?;
    // SIGTERM: the session's own teardown ran (exit 0), and nothing of it is left.
    assert!(map.0.wait()?.success());
    assert!(bed.session_status(&session).is_none());
    let left: Vec<String> = std::fs::read_dir(bed.state_dir.path())?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&session))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    Ok(())
}

/// The reaper started by hand, without the pipe a session gives it on fd 3: it says so and
/// exits at once, acting on nothing (it once ran on, waiting on a pid instead).
#[test]
fn a_reaper_without_its_pipe_refuses_at_once() -> Result<()> {
    let bed = TestBed::start()?;
    let mut cmd = bed.beamredir();
    cmd.args(["__reaper", "nosuch", "1"]).stdin(Stdio::null());
    // SAFETY: close is async-signal-safe; whatever this harness has on fd 3 is not passed on.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::close(3);
            Ok(())
        });
    }
    let out = cmd.output()?;
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("beamredir: error: __reaper is started by a session"), "{err}");
    Ok(())
}

/// A cgroup the test owns, removed on drop.
struct OwnCgroup(std::path::PathBuf);
impl Drop for OwnCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn existing_cgroup_scope_is_used_and_left_in_place() -> Result<()> {
    let bed = TestBed::start()?;
    let own = OwnCgroup(cgroup2_root()?.join(unique("brtest-cg")));
    std::fs::create_dir(&own.0)?;
    let session = unique("c");
    let _map = bed.start_session(&session, &["--cgroup", own.0.to_str().unwrap()])?;
    let out = run(bed
        .beamredir()
        .args(["exec", "--session", &session, "--", "python3", "-c", PEER_SCRIPT])
        .args([bed.pod.ip.to_string(), EPMD_PORT.to_string()]))?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{}:{EPMD_PORT}", bed.pod.ip));
    assert_eq!(bpftool_cgroup_programs(&own.0)?.len(), 4);
    run(bed.beamredir().args(["down", "--session", &session]))?;
    assert!(own.0.exists(), "beamredir removed a cgroup it did not create");
    assert!(bpftool_cgroup_programs(&own.0)?.is_empty());
    Ok(())
}

#[test]
fn command_exit_code_is_passed_on_and_the_command_runs_as_the_sudo_user() -> Result<()> {
    let bed = TestBed::start()?;
    let out = bed
        .beamredir()
        .args(["map", "--session", &unique("x")])
        .args(bed.mappings())
        .args(["--", "sh", "-c", "id -u; id -g; echo $HOME; echo $BEAMREDIR_SESSION; exit 7"])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .stdin(Stdio::null())
        .output()?;
    assert_eq!(out.status.code(), Some(7));
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<_> = text.lines().collect();
    ensure!(lines.len() == 4, "{text}");
    assert_eq!(&lines[..2], ["65534", "65534"]);
    assert_eq!(lines[2], "/nonexistent"); // nobody's home in Debian's passwd
    assert!(lines[3].starts_with('x'));
    Ok(())
}

#[test]
fn verbose_logs_each_rewrite_from_the_kernel_and_quiet_logs_none() -> Result<()> {
    let bed = TestBed::start()?;
    let connect = "import socket,sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5).close()";
    let run_map = |verbose: bool| -> Result<String> {
        let mut cmd = bed.beamredir();
        if verbose {
            cmd.arg("-v");
        }
        let out = run(cmd
            .args(["map", "--session", &unique("v")])
            .args(bed.mappings())
            .args(["--", "python3", "-c", connect])
            .args([bed.pod.ip.to_string(), EPMD_PORT.to_string()])
            .stdin(Stdio::null()))?;
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let line = format!("connect {}:{EPMD_PORT} -> {}", bed.pod.ip, bed.epmd_relay.addr());
    let loud = run_map(true)?;
    assert!(loud.contains(&line), "no eBPF log line {line:?} with -v:\n{loud}");
    let quiet = run_map(false)?;
    assert!(!quiet.contains("connect 10."), "eBPF logged without -v:\n{quiet}");
    Ok(())
}
