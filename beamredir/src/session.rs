//! Sessions: one set of redirects attached to one cgroup, owned by one beamredir process.
//!
//! Each session leaves a record `STATE_DIR/NAME.json` (written before anything is created in
//! the kernel, so a crash is always recoverable) and a control socket `STATE_DIR/NAME.sock`.
//! A record whose process is gone is *stale*: the next `map`/`up`/`down` removes its cgroup.
use std::{
    fs, io,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use crate::{
    cgroup::{CgroupError, Hierarchy, SESSIONS_PARENT},
    mapping::Mapping,
    redirect::{LoadOptions, RedirectError, Redirector},
};

pub const DEFAULT_STATE_DIR: &str = "/run/beamredir";
pub const DEFAULT_SESSION: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("invalid session name {0:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'")]
    BadName(String),
    #[error("session {name:?} is already running (pid {pid}); choose another with --session NAME or end it with `beamredir down --session {name}`")]
    AlreadyRunning { name: String, pid: u32 },
    #[error("no session named {0:?} is running (see `beamredir status`)")]
    Unknown(String),
    #[error("no beamredir session is running; start one with `beamredir map` or `beamredir up`")]
    NoneRunning,
    #[error("several sessions are running ({0}); say which with --session NAME")]
    Ambiguous(String),
    #[error("state directory {path}: {source}")]
    State { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Redirect(#[from] RedirectError),
}

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

/// What the user asked for on the command line.
#[derive(Clone, Debug)]
pub enum ScopeRequest {
    NewCgroup,
    Existing(String),
    Global,
}

/// The on-disk record of a session.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionRecord {
    pub name: String,
    pub pid: u32,
    /// Start time of `pid` (clock ticks since boot), so a reused pid is not mistaken for us.
    pub pid_start: u64,
    pub started_unix: u64,
    pub scope: Scope,
    /// The cgroup beamredir itself was in; leftover processes go back there.
    pub origin_cgroup: String,
    pub redirects: Vec<Mapping>,
    /// The Erlang inetrc with the pods' cluster DNS names (`up` sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inetrc: Option<PathBuf>,
}

impl SessionRecord {
    pub fn is_alive(&self) -> bool {
        process_start_ticks(self.pid) == Some(self.pid_start)
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

pub fn validate_name(name: &str) -> Result<(), SessionError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok { Ok(()) } else { Err(SessionError::BadName(name.to_string())) }
}

/// The directory holding session records and control sockets.
#[derive(Clone, Debug)]
pub struct StateDir {
    root: PathBuf,
}

impl StateDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn err(&self) -> impl FnOnce(io::Error) -> SessionError + '_ {
        |source| SessionError::State { path: self.root.clone(), source }
    }

    pub fn ensure(&self) -> Result<(), SessionError> {
        fs::create_dir_all(&self.root).map_err(self.err())
    }

    pub fn record_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.json"))
    }

    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.sock"))
    }

    /// Where a private cgroup2 mount goes if none is visible.
    pub fn private_cgroup_mount(&self) -> PathBuf {
        self.root.join(format!("cgroup2.{}", std::process::id()))
    }

    pub fn write(&self, record: &SessionRecord) -> Result<(), SessionError> {
        self.ensure()?;
        let tmp = self.root.join(format!(".{}.json.tmp", record.name));
        let json = serde_json::to_vec_pretty(record).expect("record serializes");
        fs::write(&tmp, json).map_err(self.err())?;
        fs::rename(&tmp, self.record_path(&record.name)).map_err(self.err())
    }

    /// Removes every file of a session: record, socket, DNS files.
    pub fn remove(&self, name: &str) {
        let _ = fs::remove_file(self.socket_path(name));
        crate::dns::DnsFiles::new(&self.root, name).remove();
        let _ = fs::remove_file(self.record_path(name));
    }

    /// All records, sorted by name. Unreadable files are skipped with a warning.
    pub fn list(&self) -> Vec<SessionRecord> {
        let Ok(dir) = fs::read_dir(&self.root) else { return Vec::new() };
        let mut records: Vec<SessionRecord> = dir
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .filter_map(|p| match fs::read(&p).map(|b| serde_json::from_slice::<SessionRecord>(&b)) {
                Ok(Ok(r)) => Some(r),
                Ok(Err(e)) => {
                    log::warn!("ignoring unreadable session record {}: {e}", p.display());
                    None
                }
                Err(_) => None,
            })
            .collect();
        records.sort_by(|a, b| a.name.cmp(&b.name));
        records
    }

    pub fn load(&self, name: &str) -> Option<SessionRecord> {
        let bytes = fs::read(self.record_path(name)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// A running session by name, or the only running one when no name is given.
    pub fn find_live(&self, name: Option<&str>) -> Result<SessionRecord, SessionError> {
        if let Some(name) = name {
            validate_name(name)?;
            return self
                .load(name)
                .filter(SessionRecord::is_alive)
                .ok_or_else(|| SessionError::Unknown(name.to_string()));
        }
        let live: Vec<_> = self.list().into_iter().filter(SessionRecord::is_alive).collect();
        match live.len() {
            0 => Err(SessionError::NoneRunning),
            1 => Ok(live.into_iter().next().unwrap()),
            _ => Err(SessionError::Ambiguous(live.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", "))),
        }
    }

    /// Removes what crashed sessions left behind: their cgroups, records and sockets.
    /// Returns the names cleaned.
    pub fn clean_stale(&self, hierarchy: &Hierarchy) -> Vec<String> {
        let mut cleaned = Vec::new();
        for record in self.list().into_iter().filter(|r| !r.is_alive()) {
            if let Scope::Session { cgroup } = &record.scope {
                if let Err(e) = hierarchy.remove_session_cgroup(cgroup, &record.origin_cgroup) {
                    log::warn!("stale session {}: {e}", record.name);
                    continue;
                }
            }
            log::info!("cleaned up stale session {:?} (beamredir pid {} is gone)", record.name, record.pid);
            self.remove(&record.name);
            cleaned.push(record.name);
        }
        cleaned
    }
}

pub struct SessionOptions {
    pub name: String,
    pub scope: ScopeRequest,
    pub mappings: Vec<Mapping>,
    pub load: LoadOptions,
    pub inetrc: Option<PathBuf>,
}

/// A running session: programs attached, map filled. Dropping it tears everything down.
pub struct ActiveSession {
    state: StateDir,
    hierarchy: Hierarchy,
    record: SessionRecord,
    redirector: Arc<Mutex<Option<Redirector>>>,
}

impl ActiveSession {
    /// Checks, loads, creates and attaches, in an order that leaves nothing behind on failure:
    /// everything that can be refused is checked before anything is created.
    pub fn start(state: StateDir, opts: SessionOptions) -> Result<Self, SessionError> {
        validate_name(&opts.name)?;
        state.ensure()?;
        let hierarchy = Hierarchy::open(&state.private_cgroup_mount())?;
        state.clean_stale(&hierarchy);
        if let Some(existing) = state.load(&opts.name).filter(SessionRecord::is_alive) {
            return Err(SessionError::AlreadyRunning { name: opts.name, pid: existing.pid });
        }
        let scope = match &opts.scope {
            ScopeRequest::Global => Scope::Global,
            ScopeRequest::Existing(given) => Scope::Cgroup { cgroup: hierarchy.resolve_existing(given)? },
            ScopeRequest::NewCgroup => {
                let cgroup = format!("/{SESSIONS_PARENT}/{}", opts.name);
                if hierarchy.path_of(&cgroup).exists() {
                    return Err(CgroupError::AlreadyExists(hierarchy.path_of(&cgroup)).into());
                }
                Scope::Session { cgroup }
            }
        };
        let redirector = Redirector::load(opts.load)?;
        let pid = std::process::id();
        let record = SessionRecord {
            name: opts.name,
            pid,
            pid_start: process_start_ticks(pid).unwrap_or(0),
            started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            scope,
            origin_cgroup: Hierarchy::cgroup_of(pid)?,
            redirects: opts.mappings,
            inetrc: opts.inetrc,
        };
        // From here on, dropping `session` undoes whatever was done.
        state.write(&record)?;
        let session = ActiveSession {
            state,
            hierarchy,
            record,
            redirector: Arc::new(Mutex::new(Some(redirector))),
        };
        if let Scope::Session { .. } = &session.record.scope {
            session.hierarchy.create_session_cgroup(&session.record.name)?;
        }
        {
            let cgroup_dir = session.hierarchy.open_dir(session.record.scope.cgroup())?;
            let mut guard = session.redirector.lock().unwrap();
            let redirector = guard.as_mut().expect("loaded");
            redirector.attach(&cgroup_dir)?;
            for m in &session.record.redirects {
                redirector.insert(m.pod, m.local)?;
            }
        }
        Ok(session)
    }

    pub fn record(&self) -> &SessionRecord {
        &self.record
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    pub fn hierarchy(&self) -> &Hierarchy {
        &self.hierarchy
    }

    /// Absolute path of the session's cgroup directory.
    pub fn cgroup_path(&self) -> PathBuf {
        self.hierarchy.path_of(self.record.scope.cgroup())
    }

    /// Shared handle on the programs and maps (None once torn down).
    pub fn redirector(&self) -> Arc<Mutex<Option<Redirector>>> {
        self.redirector.clone()
    }

    /// Replaces the redirects (used when forwards come and go) and rewrites the record.
    pub fn set_redirects(&mut self, mappings: Vec<Mapping>) -> Result<(), SessionError> {
        {
            let mut guard = self.redirector.lock().unwrap();
            let redirector = guard.as_mut().expect("session is up");
            for old in &self.record.redirects {
                if !mappings.iter().any(|m| m.pod == old.pod) {
                    redirector.remove(old.pod)?;
                }
            }
            for m in &mappings {
                redirector.insert(m.pod, m.local)?;
            }
        }
        self.record.redirects = mappings;
        self.state.write(&self.record)
    }

    /// The live status: the record, each redirect with its connect counter, the processes in
    /// the session's cgroup.
    pub fn status(&self) -> SessionStatus {
        let counts = self.redirector.lock().unwrap().as_ref().map(|r| r.counts()).unwrap_or_default();
        let processes = match &self.record.scope {
            Scope::Global => Vec::new(),
            scope => self.hierarchy.procs(scope.cgroup()).unwrap_or_default(),
        };
        SessionStatus {
            name: self.record.name.clone(),
            state: "running".into(),
            pid: self.record.pid,
            started_unix: self.record.started_unix,
            scope: self.record.scope.clone(),
            cgroup_path: self.cgroup_path().display().to_string(),
            processes,
            pods: Vec::new(),
            redirects: self
                .record
                .redirects
                .iter()
                .map(|m| RedirectStatus {
                    pod: m.pod,
                    local: m.local,
                    connects: counts.get(&m.pod).copied().unwrap_or(0),
                    forward: None,
                })
                .collect(),
        }
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        // Detach first (dropping the links), so nothing is redirected while we clean up.
        self.redirector.lock().map(|mut r| r.take()).ok();
        if let Scope::Session { cgroup } = &self.record.scope {
            if let Err(e) = self.hierarchy.remove_session_cgroup(cgroup, &self.record.origin_cgroup) {
                log::warn!("session {}: {e}", self.record.name);
            }
        }
        self.state.remove(&self.record.name);
    }
}

/// Per-forward traffic counters (filled in by sessions that run their own forwards).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForwardStats {
    pub active: u64,
    pub total: u64,
    pub bytes_to_pod: u64,
    pub bytes_from_pod: u64,
    pub errors: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RedirectStatus {
    pub pod: SocketAddrV4,
    pub local: SocketAddrV4,
    /// connect() calls the eBPF program redirected.
    pub connects: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<ForwardStats>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionStatus {
    pub name: String,
    /// "running" or "stale".
    pub state: String,
    pub pid: u32,
    pub started_unix: u64,
    pub scope: Scope,
    pub cgroup_path: String,
    pub processes: Vec<u32>,
    pub redirects: Vec<RedirectStatus>,
    /// Pods followed by an `up` session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    pub ip: Option<String>,
    pub state: String,
    /// The node name the pod's command line gives (e.g. app@10.244.0.5), if known.
    pub node: Option<String>,
}

impl SessionStatus {
    /// What can be said of a session from its record alone (stale, or not answering).
    pub fn from_record(record: &SessionRecord, state: &str, cgroup_path: String) -> Self {
        SessionStatus {
            name: record.name.clone(),
            state: state.into(),
            pid: record.pid,
            started_unix: record.started_unix,
            scope: record.scope.clone(),
            cgroup_path,
            processes: Vec::new(),
            pods: Vec::new(),
            redirects: record
                .redirects
                .iter()
                .map(|m| RedirectStatus { pod: m.pod, local: m.local, connects: 0, forward: None })
                .collect(),
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

    #[test]
    fn own_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id();
        let start = process_start_ticks(pid).unwrap();
        let mut r = SessionRecord {
            name: "t".into(),
            pid,
            pid_start: start,
            started_unix: 0,
            scope: Scope::Global,
            origin_cgroup: "/".into(),
            redirects: vec![],
            inetrc: None,
        };
        assert!(r.is_alive());
        r.pid_start += 1;
        assert!(!r.is_alive());
    }
}
