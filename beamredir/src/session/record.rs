//! The on-disk record of a session (`STATE_DIR/NAME.json`), and what root checks before it
//! acts on one: a record names cgroups that root later empties and removes, so a forged or
//! corrupted one must never make root move system processes.
use std::{fs, net::SocketAddr};

use serde::{Deserialize, Serialize};

use super::SESSIONS_PARENT;
use crate::mapping::{Mapping, is_pod_address};

/// Where a session's programs are attached.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Scope {
    /// A cgroup beamredir created for the session (removed at the end).
    Session { cgroup: String },
    /// A cgroup the user named with --cgroup (left in place).
    Cgroup { cgroup: String },
    /// The hierarchy root: every process on the machine (--global).
    Global,
}

impl Scope {
    /// The cgroup (relative to the hierarchy root) the programs are attached to.
    pub fn cgroup(&self) -> &str {
        match self {
            Scope::Session { cgroup } | Scope::Cgroup { cgroup } => cgroup,
            Scope::Global => "/",
        }
    }
}

/// The cgroup of session NAME, relative to the hierarchy root.
pub fn session_cgroup(name: &str) -> String {
    format!("/{SESSIONS_PARENT}/{name}")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRecord {
    pub name: String,
    pub pid: u32,
    /// Start time of `pid` (clock ticks since boot), so a reused pid is not mistaken for us.
    pub pid_start: u64,
    pub started_unix: u64,
    /// The user the session belongs to (SUDO_UID, or the uid that ran beamredir).
    pub owner_uid: u32,
    pub scope: Scope,
    /// The cgroup beamredir itself was in; leftover processes go back there.
    pub origin_cgroup: String,
    pub redirects: Vec<Mapping>,
    /// The Erlang inetrc with the pods' cluster DNS names (`up` sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inetrc: Option<std::path::PathBuf>,
}

/// Why a record is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("its name {0:?} does not match its file")]
    Name(String),
    #[error("its cgroup {cgroup} is not {expected}")]
    SessionCgroup { cgroup: String, expected: String },
    #[error("cgroup path {0:?} is not a clean absolute path")]
    CgroupPath(String),
    #[error("redirect {0} does not redirect a pod address")]
    Redirect(Mapping),
    #[error("it lists {0} redirects, more than any session can hold")]
    TooMany(usize),
}

/// More redirects than any session's maps can hold: a record listing more is not ours.
const MAX_RECORD_REDIRECTS: usize = 1 << 20;

/// A cgroup path root can safely act on: absolute, no `.`/`..`/empty components, no NUL.
fn clean_cgroup_path(p: &str) -> bool {
    p == "/"
        || (p.starts_with('/')
            && p[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0')))
}

impl SessionRecord {
    pub fn is_alive(&self) -> bool {
        process_start_ticks(self.pid) == Some(self.pid_start)
    }

    /// Checks a record read from `NAME.json` before anything acts on it.
    pub fn validate(&self, file_name: &str) -> Result<(), RecordError> {
        if self.name != file_name || super::validate_name(&self.name).is_err() {
            return Err(RecordError::Name(self.name.clone()));
        }
        match &self.scope {
            Scope::Session { cgroup } if *cgroup != session_cgroup(&self.name) => {
                return Err(RecordError::SessionCgroup {
                    cgroup: cgroup.clone(),
                    expected: session_cgroup(&self.name),
                });
            }
            Scope::Cgroup { cgroup } if !clean_cgroup_path(cgroup) => {
                return Err(RecordError::CgroupPath(cgroup.clone()));
            }
            _ => {}
        }
        if !clean_cgroup_path(&self.origin_cgroup) {
            return Err(RecordError::CgroupPath(self.origin_cgroup.clone()));
        }
        if self.redirects.len() > MAX_RECORD_REDIRECTS {
            return Err(RecordError::TooMany(self.redirects.len()));
        }
        if let Some(bad) = self
            .redirects
            .iter()
            .find(|m| !is_pod_address(m.pod.ip()) || m.pod.is_ipv4() != m.local.is_ipv4())
        {
            return Err(RecordError::Redirect(*bad));
        }
        Ok(())
    }

    /// The pod endpoints this session redirects.
    pub fn pods(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.redirects.iter().map(|m| m.pod)
    }
}

/// Start time of a running process in clock ticks since boot (field 22 of /proc/PID/stat);
/// None for a process that is gone or a zombie (exited, not yet reaped by its parent).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields after its ')' are plain.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next()?, "Z" | "X") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, scope: Scope) -> SessionRecord {
        SessionRecord {
            name: name.into(),
            pid: std::process::id(),
            pid_start: process_start_ticks(std::process::id()).unwrap(),
            started_unix: 0,
            owner_uid: 1000,
            scope,
            origin_cgroup: "/user.slice".into(),
            redirects: vec!["10.244.0.5:4369=14369".parse().unwrap()],
            inetrc: None,
        }
    }

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let mut r = record("t", Scope::Global);
        assert!(r.is_alive());
        r.pid_start += 1;
        assert!(!r.is_alive());
    }

    #[test]
    fn forged_records_are_refused() {
        assert_eq!(
            record(
                "s",
                Scope::Session {
                    cgroup: "/beamredir/s".into()
                }
            )
            .validate("s"),
            Ok(())
        );
        assert_eq!(record("s", Scope::Global).validate("s"), Ok(()));
        assert!(matches!(
            record(
                "s",
                Scope::Session {
                    cgroup: "/system.slice".into()
                }
            )
            .validate("s"),
            Err(RecordError::SessionCgroup { .. })
        ));
        assert!(matches!(
            record(
                "s",
                Scope::Session {
                    cgroup: "/beamredir/other".into()
                }
            )
            .validate("s"),
            Err(RecordError::SessionCgroup { .. })
        ));
        assert!(matches!(
            record(
                "s",
                Scope::Cgroup {
                    cgroup: "/a/../b".into()
                }
            )
            .validate("s"),
            Err(RecordError::CgroupPath(_))
        ));
        assert!(matches!(
            record("s", Scope::Global).validate("other"),
            Err(RecordError::Name(_))
        ));
        let mut r = record("s", Scope::Global);
        r.origin_cgroup = "relative".into();
        assert!(matches!(r.validate("s"), Err(RecordError::CgroupPath(_))));
        let mut r = record("s", Scope::Global);
        r.redirects = vec![Mapping {
            pod: "127.0.0.1:22".parse().unwrap(),
            local: "127.0.0.1:1".parse().unwrap(),
        }];
        assert!(matches!(r.validate("s"), Err(RecordError::Redirect(_))));
    }
}
