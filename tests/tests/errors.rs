//! Bad input: one clear line naming what was wrong, a non-zero exit, and nothing left behind
//! (no session record, no cgroup, no attached program).
use std::{path::Path, process::Command};

use anyhow::Result;
use beamredir_testbed::{TempDir, bpftool_cgroup_programs, beamredir_bin, cgroup2_root, require_root, unique};

struct Case {
    args: Vec<String>,
    /// Text the error line must contain.
    says: &'static str,
    /// Run as this uid instead of root.
    as_uid: Option<u32>,
}

fn case(args: &[&str], says: &'static str) -> Case {
    Case { args: args.iter().map(|s| s.to_string()).collect(), says, as_uid: None }
}

/// Runs a case with a private state dir and checks message, exit code and leftovers.
fn check(c: &Case, session: &str) -> Result<()> {
    let state = TempDir::new("brerr")?;
    let root = cgroup2_root()?;
    let before = bpftool_cgroup_programs(&root)?;
    let mut cmd = match c.as_uid {
        None => Command::new(beamredir_bin()),
        Some(uid) => {
            let mut cmd = Command::new("setpriv");
            cmd.args([format!("--reuid={uid}"), format!("--regid={uid}"), "--clear-groups".into()]).arg(beamredir_bin());
            cmd
        }
    };
    let out = cmd.args(&c.args).env("BEAMREDIR_STATE_DIR", state.path()).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{:?} succeeded:\n{stderr}", c.args);
    let first = stderr.lines().next().unwrap_or("");
    assert!(first.contains(c.says), "{:?}: expected {:?} in the first line, got:\n{stderr}", c.args, c.says);
    // clap adds a usage hint after its one-line error; beamredir's own errors are one line.
    if !first.starts_with("error: ") {
        assert_eq!(stderr.trim().lines().count(), 1, "{:?}: more than one line:\n{stderr}", c.args);
    }
    let leftovers: Vec<_> = std::fs::read_dir(state.path())?.filter_map(Result::ok).map(|e| e.file_name()).collect();
    assert!(leftovers.is_empty(), "{:?} left {leftovers:?} in the state dir", c.args);
    assert!(!root.join("beamredir").join(session).exists(), "{:?} left its cgroup", c.args);
    assert_eq!(bpftool_cgroup_programs(&root)?, before, "{:?} changed the root cgroup's programs", c.args);
    Ok(())
}

#[test]
fn every_bad_input_gets_one_clear_line_a_failing_exit_and_leaves_nothing() -> Result<()> {
    require_root()?;
    let s = unique("e");
    let good = "10.244.250.5:4369=14369";
    let missing_cgroup = format!("/{}/nope", unique("no-such-cgroup"));
    let cases = [
        Case { as_uid: Some(65534), ..case(&["map", "--session", &s, good], "needs root") },
        Case { as_uid: Some(65534), ..case(&["down", "--all"], "needs root") },
        case(&["map", "--session", &s, "10.244.250.5:4369"], "malformed mapping"),
        case(&["map", "--session", &s, "10.244.250.5:4369=x"], "ports are 1-65535"),
        case(&["map", "--session", &s, "10.244.250.5:0=14369"], "ports are 1-65535"),
        case(&["map", "--session", &s, "10.244.250.5:4369=0"], "ports are 1-65535"),
        case(&["map", "--session", &s, "10.244.250.5:4369=65536"], "ports are 1-65535"),
        case(&["map", "--session", &s, "app-0:4369=14369"], "invalid IP address \"app-0\""),
        case(&["map", "--session", &s, good, "10.244.250.5:4369=15555"], "duplicate mapping for 10.244.250.5:4369"),
        case(&["map", "--session", "../escape", good], "invalid session name"),
        case(&["map", "--session", &s, "--cgroup", &missing_cgroup, good, "--", "true"], "does not exist"),
        case(&["map", "--session", &s, good, "--", "/no/such/program"], "command \"/no/such/program\" not found"),
        case(&["map", "--session", &s, good, "--", "no-such-program-in-path"], "command \"no-such-program-in-path\" not found"),
        case(&["exec", "--session", "nope", "--", "true"], "no session named \"nope\" is running"),
        case(&["shell", "--session", "nope"], "no session named \"nope\" is running"),
        case(&["down", "--session", "nope"], "no session named \"nope\" is running"),
        case(&["exec", "--", "true"], "no beamredir session is running"),
    ];
    for c in &cases {
        check(c, &s)?;
    }
    assert!(!Path::new(&cgroup2_root()?.join(missing_cgroup.trim_start_matches('/'))).exists());
    Ok(())
}

#[test]
fn a_second_session_with_a_running_name_is_refused_and_the_first_keeps_working() -> Result<()> {
    let bed = beamredir_testbed::TestBed::start()?;
    let s = unique("d");
    let _first = bed.start_session(&s, &[])?;
    let out = bed.beamredir().args(["map", "--session", &s]).args(bed.mappings()).args(["--", "true"]).output()?;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("session \"{s}\" is already running")), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    // The running session is untouched.
    let status = bed.session_status(&s).unwrap();
    assert_eq!(status["state"], "running");
    let cgroup = std::path::PathBuf::from(status["cgroup_path"].as_str().unwrap());
    assert_eq!(bpftool_cgroup_programs(&cgroup)?.len(), 4);
    Ok(())
}

#[test]
fn two_sessions_started_at_once_with_one_name_leave_the_winner_intact() -> Result<()> {
    let bed = beamredir_testbed::TestBed::start()?;
    let s = unique("race");
    let spawn = || {
        bed.beamredir()
            .args(["map", "--session", &s])
            .args(bed.mappings())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
    };
    let (a, b) = (spawn()?, spawn()?);
    let (mut a, mut b) = (beamredir_testbed::Graceful(a), beamredir_testbed::Graceful(b));
    // Exactly one of them exits, refused; the other stays up.
    let mut loser = None;
    beamredir_testbed::wait_until("one of the two to be refused", std::time::Duration::from_secs(20), || {
        if let Ok(Some(st)) = a.0.try_wait() { loser = Some(('a', st)); }
        if let Ok(Some(st)) = b.0.try_wait() { loser = Some(('b', st)); }
        loser.is_some()
    })?;
    let (which, status) = loser.unwrap();
    assert!(!status.success());
    let loser_proc = if which == 'a' { &mut a } else { &mut b };
    let mut stderr = String::new();
    std::io::Read::read_to_string(loser_proc.0.stderr.as_mut().unwrap(), &mut stderr)?;
    assert!(stderr.contains("is already running"), "{stderr}");
    let winner = if which == 'a' { &mut b } else { &mut a };
    // The winner comes up (it may still be attaching when the loser gives up), with its
    // cgroup, programs and record intact.
    beamredir_testbed::wait_until("the winner's session to run", std::time::Duration::from_secs(20), || {
        bed.session_status(&s).is_some_and(|st| st["state"] == "running")
    })?;
    let status = bed.session_status(&s).expect("the winner's session is listed");
    let cgroup = std::path::PathBuf::from(status["cgroup_path"].as_str().unwrap());
    assert_eq!(bpftool_cgroup_programs(&cgroup)?.len(), 4);
    // Its control socket answers root only.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(bed.state_dir.path().join(format!("{s}.sock")))?.permissions());
    assert_eq!(mode & 0o777, 0o600);
    // And it is still the same process, running (its socket answered above).
    assert!(winner.0.try_wait()?.is_none(), "the winner died");
    Ok(())
}

#[test]
fn a_state_dir_others_can_write_is_refused() -> Result<()> {
    require_root()?;
    let dir = TempDir::new("brloose")?;
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let out = Command::new(beamredir_bin())
        .args(["map", "--session", &unique("loose"), "10.244.250.6:4369=14369", "--", "true"])
        .env("BEAMREDIR_STATE_DIR", dir.path())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("must be owned by root and writable by root only"), "{stderr}");
    assert_eq!(std::fs::read_dir(dir.path())?.count(), 0);
    Ok(())
}
