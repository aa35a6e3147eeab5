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
    #[error("state directory {path} must be owned by root and writable by root only (it holds what root later trusts); fix its owner/mode or choose another --state-dir")]
    UntrustedStateDir { path: PathBuf },
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

/// An exclusive flock on a session's lock file (released on drop or process death).
pub type SessionLock = nix::fcntl::Flock<fs::File>;

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

    /// Creates the directory if needed. Running as root, refuses one that others could
    /// write to: records, sockets and lock files in it are trusted later.
    pub fn ensure(&self) -> Result<(), SessionError> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        fs::DirBuilder::new().recursive(true).mode(0o755).create(&self.root).map_err(self.err())?;
        if nix::unistd::geteuid().is_root() {
            let meta = fs::symlink_metadata(&self.root).map_err(self.err())?;
            if !meta.is_dir() || meta.uid() != 0 || meta.mode() & 0o022 != 0 {
                return Err(SessionError::UntrustedStateDir { path: self.root.clone() });
            }
        }
        Ok(())
    }

    pub fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join(format!("{name}.lock"))
    }

    /// Takes the session name: an exclusive flock on `NAME.lock`, held for the session's life
    /// (the kernel drops it when the process dies). None if another process holds it.
    pub fn try_lock(&self, name: &str) -> Result<Option<SessionLock>, SessionError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(self.lock_path(name))
            .map_err(self.err())?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Some(lock)),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
            Err((_, e)) => Err(SessionError::State { path: self.lock_path(name), source: e.into() }),
        }
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

    /// Removes every file of a session: record, socket, DNS files, lock.
    pub fn remove(&self, name: &str) {
        let _ = fs::remove_file(self.socket_path(name));
        crate::dns::DnsFiles::new(&self.root, name).remove();
        let _ = fs::remove_file(self.record_path(name));
        let _ = fs::remove_file(self.lock_path(name));
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
            // Whoever holds the name's lock is alive (and owns these files), whatever the record says.
            let Ok(Some(_lock)) = self.try_lock(&record.name) else { continue };
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
    /// Whether this instance created the session cgroup (and so removes it).
    created_cgroup: bool,
    /// The flock on NAME.lock: this process owns the name while it holds it.
    _lock: SessionLock,
}

impl ActiveSession {
    /// Checks, loads, creates and attaches, in an order that leaves nothing behind on failure:
    /// everything that can be refused is checked before anything is created.
    pub fn start(state: StateDir, opts: SessionOptions) -> Result<Self, SessionError> {
        validate_name(&opts.name)?;
        state.ensure()?;
        let hierarchy = Hierarchy::open(&state.private_cgroup_mount())?;
        state.clean_stale(&hierarchy);
        let running = |state: &StateDir, name: String| {
            let pid = state.load(&name).map(|r| r.pid).unwrap_or(0);
            SessionError::AlreadyRunning { name, pid }
        };
        if state.load(&opts.name).is_some_and(|r| r.is_alive()) {
            return Err(running(&state, opts.name));
        }
        // Two `up`/`map` with the same name at once: exactly one gets the lock.
        let Some(lock) = state.try_lock(&opts.name)? else { return Err(running(&state, opts.name)) };
        let lock_path = state.lock_path(&opts.name);
        let mut lock = Some(lock);
        let result = Self::start_locked(state, hierarchy, opts, &mut lock);
        if lock.is_some() {
            // Failed before the session took the lock: remove the file while still holding it
            // (after unlocking, it could already be someone else's).
            let _ = fs::remove_file(lock_path);
        }
        result
    }

    fn start_locked(state: StateDir, hierarchy: Hierarchy, opts: SessionOptions, lock: &mut Option<SessionLock>) -> Result<Self, SessionError> {
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
        let mut session = ActiveSession {
            state,
            hierarchy,
            record,
            redirector: Arc::new(Mutex::new(Some(redirector))),
            created_cgroup: false,
            _lock: lock.take().expect("locked"),
        };
        if let Scope::Session { .. } = &session.record.scope {
            session.hierarchy.create_session_cgroup(&session.record.name)?;
            session.created_cgroup = true;
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
        if let (Scope::Session { cgroup }, true) = (&self.record.scope, self.created_cgroup) {
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
