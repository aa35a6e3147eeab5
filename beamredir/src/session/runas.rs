//! Running commands inside a session's cgroup as the user who invoked `sudo`.
//!
//! The child moves itself into the cgroup (writing "0" to an already opened `cgroup.procs`)
//! and then drops to SUDO_UID/SUDO_GID with that user's groups and HOME, between fork and
//! exec, so nothing runs as root and nothing runs outside the session.
use std::{
    ffi::CString,
    fs::File,
    os::{fd::AsFd, unix::process::CommandExt},
    process::Command,
};

use nix::unistd::{Gid, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum RunAsError {
    #[error("SUDO_UID/SUDO_GID ({0}) are not numbers")]
    BadSudoIds(String),
    #[error("looking up user {0}: {1}")]
    Lookup(String, nix::Error),
    #[error("no command given: put it after `--`, e.g. `-- erl -name debug@127.0.0.1`")]
    NoCommand,
    #[error("command {0:?} not found (not a file, or not in PATH)")]
    NotFound(String),
}

/// Checks that `program` can be started (a path to an executable file, or found in PATH), so
/// a typo is refused before a session is set up for it.
pub fn check_program(program: &str) -> Result<(), RunAsError> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &std::path::Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    let found = if program.contains('/') {
        executable(std::path::Path::new(program))
    } else {
        std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
    };
    if found { Ok(()) } else { Err(RunAsError::NotFound(program.to_string())) }
}

/// The identity commands run as.
#[derive(Clone, Debug)]
pub struct Identity {
    pub uid: Uid,
    pub gid: Gid,
    pub groups: Vec<Gid>,
    pub name: String,
    pub home: String,
    pub shell: String,
}

impl Identity {
    /// The user who ran `sudo beamredir …` (from SUDO_UID/SUDO_GID), or None when beamredir
    /// was not started through sudo (commands then run as the current user).
    pub fn invoking_user() -> Result<Option<Identity>, RunAsError> {
        let (Ok(uid), Ok(gid)) = (std::env::var("SUDO_UID"), std::env::var("SUDO_GID")) else {
            return Ok(None);
        };
        let bad = || RunAsError::BadSudoIds(format!("{uid}/{gid}"));
        let uid = Uid::from_raw(uid.parse().map_err(|_| bad())?);
        let gid = Gid::from_raw(gid.parse().map_err(|_| bad())?);
        if uid == Uid::current() {
            return Ok(None);
        }
        let user = User::from_uid(uid).map_err(|e| RunAsError::Lookup(uid.to_string(), e))?;
        let Some(user) = user else {
            // A uid without a passwd entry: run with just the ids.
            return Ok(Some(Identity {
                uid,
                gid,
                groups: vec![gid],
                name: uid.to_string(),
                home: "/".into(),
                shell: "/bin/sh".into(),
            }));
        };
        let cname = CString::new(user.name.clone()).expect("user names have no NUL");
        let groups = nix::unistd::getgrouplist(&cname, gid).map_err(|e| RunAsError::Lookup(user.name.clone(), e))?;
        Ok(Some(Identity {
            uid,
            gid,
            groups,
            name: user.name,
            home: user.dir.display().to_string(),
            shell: user.shell.display().to_string(),
        }))
    }

    /// The current user's login shell, for `beamredir shell` without sudo.
    pub fn current_shell() -> String {
        User::from_uid(Uid::current())
            .ok()
            .flatten()
            .map(|u| u.shell.display().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("SHELL").ok())
            .unwrap_or_else(|| "/bin/sh".into())
    }
}

/// In a child between fork and exec (async-signal-safe): makes `fd` the child's `target`
/// descriptor, inherited across exec. dup2 clears close-on-exec on the copy, but is a no-op
/// when `fd` already is `target`: then close-on-exec is cleared by hand, or the program would
/// start without it.
pub fn inherit_as(fd: i32, target: i32) -> std::io::Result<()> {
    // SAFETY: fcntl and dup2 on descriptors of this process; both async-signal-safe.
    let rc = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The open-file limit this process started with, if it raised its own since: every command
/// it runs gets the original back (epmd and other select()-based programs break with a huge
/// soft limit, and a command should see the limit its user gave it).
static STARTING_NOFILE: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// Raises the soft limit on open files to the hard limit (1024, the usual soft default, is
/// too few for a session's forwards), keeping the original for the commands [`command`]
/// builds.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = STARTING_NOFILE.set((soft, hard));
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Builds `argv` to run inside the cgroup whose `cgroup.procs` is `join` (None: stay where we
/// are, e.g. --global), as `identity` (None: as the current user), with `env` added.
pub fn command(
    argv: &[String],
    join: Option<File>,
    identity: Option<&Identity>,
    env: &[(String, String)],
) -> Result<Command, RunAsError> {
    let (program, args) = argv.split_first().ok_or(RunAsError::NoCommand)?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(id) = identity {
        cmd.env("HOME", &id.home).env("USER", &id.name).env("LOGNAME", &id.name);
    }
    let identity = identity.cloned();
    let nofile = STARTING_NOFILE.get().map(|&(soft, hard)| libc::rlimit { rlim_cur: soft, rlim_max: hard });
    // SAFETY: the closure only makes async-signal-safe syscalls (setrlimit, write, setgroups,
    // setgid, setuid) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(limit) = &nofile {
                if libc::setrlimit(libc::RLIMIT_NOFILE, limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(procs) = &join {
                nix::unistd::write(procs.as_fd(), b"0")?;
            }
            if let Some(id) = &identity {
                nix::unistd::setgroups(&id.groups)?;
                nix::unistd::setgid(id.gid)?;
                nix::unistd::setuid(id.uid)?;
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// The exit code a shell would report for a finished child (128+N for signal N).
pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}
