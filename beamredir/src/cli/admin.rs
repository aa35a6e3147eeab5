//! The commands that act on sessions from outside: `exec`, `shell`, `status`, `down`, and
//! `doctor`. A session belongs to the user who started it: other users' sessions are refused
//! (and hidden from `status`) unless root itself asks with `--any-user`.
use std::{
    fmt::Write as _,
    io::Write,
    os::unix::process::CommandExt,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use beamredir::{
    doctor,
    kernel::cgroup::Hierarchy,
    session::{
        Scope, SessionError, SessionRecord, SessionStatus, StateDir, check_owner,
        control::{self, Request},
        invoking_uid,
        runas::{self, Identity},
    },
};

use super::{Output, SessionArg, host::session_env};

/// Replaces this process with `argv` inside a running session's cgroup, as the invoking user.
pub fn exec_in_session(state: &StateDir, session: &SessionArg, argv: Vec<String>) -> Result<i32> {
    let record = state.find_live(session.session.as_deref(), session.any_user)?;
    let hierarchy = Hierarchy::open(&state.private_cgroup_mount())?;
    let join = match &record.scope {
        Scope::Global => None,
        scope => Some(hierarchy.open_procs(scope.cgroup())?),
    };
    // The open cgroup.procs belongs to that very cgroup, even if it is removed and another of
    // the same name appears. So if the same session process still holds the name now, the
    // cgroup opened is its: not a later session of the same name (perhaps another user's)
    // that started between reading the record and opening the file.
    let now = state.find_live(Some(&record.name), session.any_user)?;
    if (now.pid, now.pid_start) != (record.pid, record.pid_start) {
        bail!("session {:?} was restarted meanwhile; try again", record.name);
    }
    let identity = Identity::invoking_user()?;
    let mut cmd = runas::command(&argv, join, identity.as_ref(), &session_env(&record))?;
    // exec replaces this process: a private cgroup2 mount (under `ip netns exec`) would be left
    // behind, so it goes now; the open cgroup.procs fd keeps working.
    drop(hierarchy);
    let err = cmd.exec();
    bail!("starting {:?}: {err}", argv[0])
}

pub fn shell(state: &StateDir, session: &SessionArg) -> Result<i32> {
    let shell = match Identity::invoking_user()? {
        Some(id) => id.shell,
        None => Identity::current_shell(),
    };
    exec_in_session(state, session, vec![shell])
}

/// The status of every session the asking user may see: their own, or all for root itself.
fn session_statuses(state: &StateDir) -> Vec<SessionStatus> {
    let mount = beamredir::kernel::cgroup::find_cgroup2_mount()
        .ok()
        .flatten();
    let path_of = |r: &SessionRecord| match &mount {
        Some(m) => m
            .join(r.scope.cgroup().trim_start_matches('/'))
            .display()
            .to_string(),
        None => r.scope.cgroup().to_string(),
    };
    let you = invoking_uid();
    state
        .list()
        .iter()
        .filter(|r| you == 0 || r.owner_uid == you)
        .map(|r| {
            if !r.is_alive() {
                return SessionStatus::from_record(r, "stale", path_of(r));
            }
            control::query(&state.socket_path(&r.name), Request::Status)
                .ok()
                .and_then(|answer| serde_json::from_str::<SessionStatus>(&answer).ok())
                .unwrap_or_else(|| SessionStatus::from_record(r, "not answering", path_of(r)))
        })
        .collect()
}

/// `status`, once or (`--watch`) every 2 s. Watching, `-o json` prints one compact document
/// per refresh, one per line (as `kubectl get -w -o json` does), and the tables redraw the
/// screen. A watch ends cleanly, with code 0 and never in the middle of a document, on
/// SIGINT/SIGTERM/SIGHUP or when its reader goes away (`status -w -o json | head -n 3`).
pub fn status(state: &StateDir, output: Output, watch: bool) -> Result<i32> {
    if watch {
        watch_signals::install()?;
    }
    loop {
        let statuses = session_statuses(state);
        let mut out = String::new();
        match output {
            Output::Json if watch => out = serde_json::to_string(&statuses)? + "\n",
            Output::Json => out = serde_json::to_string_pretty(&statuses)? + "\n",
            _ if statuses.is_empty() => {
                out.push_str("No beamredir sessions.\n");
                if !nix::unistd::geteuid().is_root() {
                    out.push_str("(Session records are readable by root only: run `sudo beamredir status`.)\n");
                }
            }
            _ => status_table(&statuses, output == Output::Wide, &mut out),
        }
        if watch && output != Output::Json {
            out.insert_str(0, "\x1b[H\x1b[2J");
        }
        // `status | head` closes the pipe early: that is not an error.
        let mut stdout = std::io::stdout().lock();
        match stdout.write_all(out.as_bytes()).and_then(|()| stdout.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(0),
            Err(e) => return Err(e.into()),
            Ok(()) => {}
        }
        drop(stdout);
        if !watch || watch_signals::wait(Duration::from_secs(2)) {
            return Ok(0);
        }
    }
}

/// How `status --watch` notices it should end between two refreshes.
mod watch_signals {
    use std::{
        os::fd::AsRawFd,
        sync::atomic::{AtomicBool, Ordering},
        time::{Duration, Instant},
    };

    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

    static STOP: AtomicBool = AtomicBool::new(false);

    extern "C" fn on_signal(_: libc::c_int) {
        STOP.store(true, Ordering::SeqCst);
    }

    /// SIGINT, SIGTERM and SIGHUP set a flag instead of killing the process. Without
    /// SA_RESTART, so a wait in poll() returns at once.
    pub fn install() -> anyhow::Result<()> {
        let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::empty(), SigSet::empty());
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only stores to an atomic (async-signal-safe).
            unsafe { sigaction(signal, &action)? };
        }
        Ok(())
    }

    /// Waits up to `period`; true if the watch should end: a signal came, or stdout's reader
    /// is gone (a pipe reports POLLERR to its writer once the reading end is closed).
    pub fn wait(period: Duration) -> bool {
        let deadline = Instant::now() + period;
        loop {
            if STOP.load(Ordering::SeqCst) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let mut fd = libc::pollfd { fd: std::io::stdout().as_raw_fd(), events: 0, revents: 0 };
            // SAFETY: one valid pollfd; events 0 asks only for POLLERR/POLLHUP/POLLNVAL.
            let n = unsafe { libc::poll(&mut fd, 1, left.as_millis().clamp(1, i32::MAX as u128) as i32) };
            if n > 0 && fd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return true;
            }
        }
    }
}

fn status_table(statuses: &[SessionStatus], wide: bool, out: &mut String) {
    for s in statuses {
        let scope = match &s.scope {
            Scope::Global => "global".to_string(),
            _ => s.cgroup_path.clone(),
        };
        let _ = write!(
            out,
            "{}  {}  pid {}  {}  {} process(es)",
            s.name,
            s.state,
            s.pid,
            scope,
            s.processes.len()
        );
        if let Some(c) = &s.connections {
            let _ = write!(
                out,
                "  connections {}/{}  refused {}",
                c.active, c.limit, c.refused
            );
            if wide {
                let _ = write!(out, "  waited {}  over limit {}", c.waited, c.over_limit);
            }
        }
        let _ = writeln!(out);
        if s.state == "stale" {
            let _ = writeln!(
                out,
                "  (beamredir died; `sudo beamredir down --session {}` or the next `map`/`up` cleans it up)",
                s.name
            );
        }
        for p in &s.pods {
            let ready = match p.ready {
                Some(true) => "Ready",
                Some(false) => "not Ready",
                None => "-",
            };
            let ips = if p.ips.is_empty() {
                "-".to_string()
            } else {
                p.ips.join(",")
            };
            let _ = write!(
                out,
                "  pod {}/{}  {}  {}  {}",
                p.namespace, p.name, ips, ready, p.state
            );
            if !p.nodes.is_empty() {
                let _ = write!(out, "  {}", p.nodes.join(","));
            }
            let _ = writeln!(out);
            for a in &p.aliases {
                let _ = writeln!(
                    out,
                    "    old IP {} still reaches this pod for {} s (nodes that resolved its name before it moved)",
                    a.ip, a.expires_in_secs
                );
            }
        }
        for r in &s.redirects {
            let _ = write!(
                out,
                "  {:<25} -> {:<21} connects {}",
                r.pod.to_string(),
                r.local.to_string(),
                r.connects
            );
            if let Some(f) = &r.forward {
                let _ = write!(out, "  conns {} active / {} total", f.active, f.total);
                if wide {
                    let _ = write!(
                        out,
                        "  bytes {} out / {} in  errors {}  refused {}",
                        f.bytes_to_pod, f.bytes_from_pod, f.errors, f.refused
                    );
                }
            }
            let _ = writeln!(out);
        }
    }
}

/// SIGTERM to a session's process through a pidfd: the record's start time is checked after
/// the pidfd is open, and the pidfd names that process whatever happens to its pid, so a pid
/// reused between the check and the signal never receives it (a plain kill(2) has that race).
fn terminate(record: &SessionRecord) {
    // SAFETY: pidfd_open(2) with no flags returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, record.pid as libc::pid_t, 0) };
    if fd < 0 {
        return; // gone already
    }
    // SAFETY: a new fd this function owns.
    let pidfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    if record.is_alive() {
        // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                libc::SIGTERM,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
        }
    }
}

pub fn down(state: &StateDir, name: Option<&str>, all: bool, any_user: bool) -> Result<i32> {
    let hierarchy = Hierarchy::open(&state.private_cgroup_mount())?;
    let targets: Vec<SessionRecord> = if all {
        state
            .list()
            .into_iter()
            .filter(|r| check_owner(r, any_user).is_ok())
            .collect()
    } else if let Some(name) = name {
        match state.load(name)? {
            Some(r) => {
                check_owner(&r, any_user)?;
                vec![r]
            }
            None => return Err(SessionError::Unknown(name.into()).into()),
        }
    } else {
        vec![state.find_live(None, any_user)?]
    };
    for record in targets.iter().filter(|r| r.is_alive()) {
        if control::query(&state.socket_path(&record.name), Request::Down).is_err() {
            terminate(record);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while record.is_alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if record.is_alive() {
            bail!(
                "session {:?} (pid {}) did not end within 10 s; its command may be ignoring SIGTERM",
                record.name,
                record.pid
            );
        }
        println!("session {} ended", record.name);
    }
    for cleaned in state.clean_stale(&hierarchy) {
        println!("stale session {cleaned} cleaned up");
    }
    Ok(0)
}

pub fn doctor(state: &StateDir) -> Result<i32> {
    let checks = doctor::run(&state.private_cgroup_mount());
    let mut failed = 0;
    for c in &checks {
        if c.ok {
            println!("ok    {:<26} {}", c.name, c.detail);
        } else {
            failed += 1;
            println!("FAIL  {:<26} {}\n      fix: {}", c.name, c.detail, c.fix);
        }
    }
    if failed == 0 {
        println!("beamredir can run here.");
        Ok(0)
    } else {
        println!("{failed} check(s) failed.");
        Ok(1)
    }
}
