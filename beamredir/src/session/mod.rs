//! Sessions: one set of redirects attached to one cgroup, owned by one beamredir process
//! running as root. Everything in this module runs in the root part and never reads network
//! data: what it is told about pods comes over the checked channel of [`crate::privsep`].
//!
//! * [`state_dir`]: the trusted directory of records, locks, sockets and DNS files;
//! * [`record`]: the on-disk record of a session, and its validation;
//! * [`active`]: a running session (claim the name, start, update redirects, tear down);
//! * [`status`]: what `beamredir status` shows (also its JSON schema);
//! * [`control`]: the session's control socket (`status`, `down`);
//! * [`dns_files`]: the hosts file and Erlang inetrc of a session;
//! * [`runas`]: running commands inside a session as the user who invoked sudo;
//! * [`reaper`]: cleaning up after a session process that was killed.
pub mod active;
pub mod control;
pub mod dns_files;
pub mod reaper;
pub mod record;
pub mod runas;
pub mod state_dir;
pub mod status;

use std::{io, path::PathBuf};

pub use active::{ActiveSession, SessionClaim, SessionOptions};
pub use record::{Scope, SessionRecord};
pub use state_dir::StateDir;
pub use status::{AliasInfo, ForwardStats, PodInfo, RedirectStatus, SessionStatus};

pub use crate::kernel::cgroup::SESSIONS_PARENT;
use crate::kernel::{cgroup::CgroupError, redirect::RedirectError};

pub const DEFAULT_STATE_DIR: &str = "/run/beamredir";
pub const DEFAULT_SESSION: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "invalid session name {0:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
    )]
    BadName(String),
    #[error(
        "session {name:?} is already running (pid {pid}); choose another with --session NAME or end it with `beamredir down --session {name}`"
    )]
    AlreadyRunning { name: String, pid: u32 },
    #[error("no session named {0:?} is running (see `beamredir status`)")]
    Unknown(String),
    #[error("no beamredir session is running; start one with `beamredir map` or `beamredir up`")]
    NoneRunning,
    #[error("several sessions are running ({0}); say which with --session NAME")]
    Ambiguous(String),
    #[error(
        "session {name:?} belongs to uid {owner}, not to you (uid {you}); only root itself may act on it, with --any-user"
    )]
    NotOwner { name: String, owner: u32, you: u32 },
    #[error("state directory {path}: {source}")]
    State { path: PathBuf, source: io::Error },
    #[error(
        "state directory {path}: {culprit} {why}; beamredir trusts what this directory holds, so it and every parent must be owned by root and writable by root only: fix that or choose another --state-dir"
    )]
    UntrustedStateDir {
        path: PathBuf,
        culprit: PathBuf,
        why: String,
    },
    #[error(
        "{path} is a symbolic link; beamredir never follows links in its state directory: remove it"
    )]
    Symlink { path: PathBuf },
    #[error(
        "session record {path} is not valid ({reason}); nothing was done with it: remove it if no session of that name runs"
    )]
    InvalidRecord { path: PathBuf, reason: String },
    #[error("refusing the cluster's host names: {0}")]
    BadHosts(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

pub fn validate_name(name: &str) -> Result<(), SessionError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SessionError::BadName(name.to_string()))
    }
}

/// Who is asking: the user behind sudo (SUDO_UID), else the real uid. SUDO_UID counts only
/// when the real uid is root (sudo set it): any other user could set it to 0 and pass for
/// root (e.g. in `status`, which needs no root).
pub fn invoking_uid() -> u32 {
    let real = nix::unistd::getuid().as_raw();
    if real != 0 {
        return real;
    }
    std::env::var("SUDO_UID")
        .ok()
        .and_then(|u| u.parse().ok())
        .unwrap_or(real)
}

/// Refuses to act on another user's session unless root itself (not a sudo user) asks for it
/// explicitly.
pub fn check_owner(record: &SessionRecord, any_user: bool) -> Result<(), SessionError> {
    let you = invoking_uid();
    if record.owner_uid == you || (any_user && you == 0) {
        Ok(())
    } else {
        Err(SessionError::NotOwner {
            name: record.name.clone(),
            owner: record.owner_uid,
            you,
        })
    }
}

impl StateDir {
    /// A running session by name, or the only running one (of the asking user) when no name is
    /// given.
    pub fn find_live(
        &self,
        name: Option<&str>,
        any_user: bool,
    ) -> Result<SessionRecord, SessionError> {
        if let Some(name) = name {
            let record = self
                .load(name)?
                .filter(SessionRecord::is_alive)
                .ok_or_else(|| SessionError::Unknown(name.to_string()))?;
            check_owner(&record, any_user)?;
            return Ok(record);
        }
        let live: Vec<_> = self
            .list()
            .into_iter()
            .filter(|r| r.is_alive() && check_owner(r, any_user).is_ok())
            .collect();
        match live.len() {
            0 => Err(SessionError::NoneRunning),
            1 => Ok(live.into_iter().next().unwrap()),
            _ => Err(SessionError::Ambiguous(
                live.iter()
                    .map(|r| r.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names() {
        for ok in ["default", "app-0", "a.b_c", "X"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "a b", "..", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
