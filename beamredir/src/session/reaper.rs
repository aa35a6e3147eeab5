//! The reaper: a small root process, started with each session, that cleans up after the
//! session's process if it dies without doing so itself (SIGKILL, OOM kill). The kernel drops
//! the programs by itself (bpf_links die with their holder), but the session cgroup, the record
//! and the files would stay until the next run. The reaper holds the read end of a pipe whose
//! write end only the session process has; when that process is gone, the pipe reads EOF, and
//! the reaper removes what the session left (exactly what `down` does for a stale session).
//! After a normal end there is nothing left to remove and it just exits. It never reads
//! anything but that pipe. A cleanup that cannot finish at once (another command holding the
//! session's lock for a moment, a cgroup still busy) is retried for [`CLEANUP_FOR`].
use std::{
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::StateDir;
use crate::kernel::cgroup::Hierarchy;

/// The hidden subcommand the reaper runs as, and the fd its pipe arrives on.
pub const REAPER_COMMAND: &str = "__reaper";
const PIPE_FD: i32 = 3;

/// The session process's end of the pipe: keep it for the session's life (it is close-on-exec,
/// so no command the session starts inherits it).
pub struct ReaperLink {
    _write: OwnedFd,
}

/// Starts the reaper for session `name` (whose lock this process holds).
pub fn spawn(state: &StateDir, name: &str) -> std::io::Result<ReaperLink> {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("--state-dir").arg(state.root()).arg(REAPER_COMMAND).arg(name).arg(std::process::id().to_string());
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let fd = read.as_raw_fd();
    // SAFETY: dup2, setsid and signal are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            super::runas::inherit_as(fd, PIPE_FD)?;
            // Its own session: the terminal's Ctrl-C and hangup are the session's business.
            libc::setsid();
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::signal(sig, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    cmd.spawn()?;
    drop(read);
    Ok(ReaperLink { _write: write })
}

/// How long the reaper keeps trying to clean up (another command may hold the session's lock
/// for a moment while it looks at the session, a moved process may keep the cgroup busy).
const CLEANUP_FOR: Duration = Duration::from_secs(10);

/// The reaper's main: waits for the session process to end, then cleans up after it.
pub fn run(state: &StateDir, name: &str, pid: u32) -> i32 {
    // The pipe must be there: without it the reaper would not know when to act.
    let is_pipe = nix::sys::stat::fstat(PIPE_FD)
        .is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFIFO);
    if !is_pipe {
        eprintln!(
            "beamredir: error: {REAPER_COMMAND} is started by a session, with its pipe on fd 3, and there is none: nothing to do"
        );
        return 2;
    }
    // SAFETY: fd 3 is the pipe (checked above), and nothing else in this process owns it.
    let mut pipe = unsafe { std::fs::File::from_raw_fd(PIPE_FD) };
    let mut byte = [0u8; 1];
    // Blocks until the session process (the only writer) is gone; nothing is ever written.
    while matches!(pipe.read(&mut byte), Ok(n) if n > 0) {}
    // Its lock is released when it has fully exited.
    let deadline = Instant::now() + Duration::from_secs(30);
    while super::record::process_start_ticks(pid).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let Ok(hierarchy) = Hierarchy::open(&state.private_cgroup_mount()) else { return 1 };
    let deadline = Instant::now() + CLEANUP_FOR;
    loop {
        match state.load(name) {
            Ok(Some(record)) if record.pid == pid && !record.is_alive() => {
                if state.clean_stale(&hierarchy).iter().any(|n| n == name) {
                    return 0;
                }
            }
            // Gone (cleaned by another command, or ended normally), or another session's now.
            _ => return 0,
        }
        if Instant::now() >= deadline {
            return 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
