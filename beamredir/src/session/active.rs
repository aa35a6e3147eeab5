//! A running session: programs attached, maps filled, record written. Dropping it tears
//! everything down.
//!
//! Start-up is split in two so that `up` can take the session's name before it asks the
//! cluster anything, and attach nothing until the pods are known:
//! 1. [`SessionClaim::take`]: check the state directory, clean stale sessions, take the name's
//!    lock. Nothing exists in the kernel yet.
//! 2. [`SessionClaim::start`]: load the programs, **fill the maps**, write the record, create
//!    the cgroup, and only then attach: no connect() ever sees a half-filled map.
use std::{
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use super::{
    SessionError, StateDir,
    reaper::ReaperLink,
    dns_files::{DnsFiles, HostEntry},
    record::{Scope, SessionRecord, process_start_ticks, session_cgroup},
    state_dir::SessionLock,
    status::{RedirectStatus, SessionStatus},
    validate_name,
};
use crate::{
    kernel::{
        cgroup::{CgroupError, Hierarchy},
        redirect::{LoadOptions, Redirector},
    },
    mapping::{Mapping, check_unique},
};

/// What the user asked for on the command line.
#[derive(Clone, Debug)]
pub enum ScopeRequest {
    NewCgroup,
    Existing(String),
    Global,
}

pub struct SessionOptions {
    pub scope: ScopeRequest,
    pub mappings: Vec<Mapping>,
    pub load: LoadOptions,
    /// `up` sessions: the pods' host names (an inetrc and hosts file are written).
    pub hosts: Option<Vec<HostEntry>>,
    /// The user the session belongs to, and whose its DNS files are: (uid, gid).
    pub owner: (u32, u32),
}

/// A session name taken (its lock held) but nothing created yet. Dropping it gives the name back.
pub struct SessionClaim {
    state: StateDir,
    /// Both are Some until `start` moves them into the session.
    hierarchy: Option<Hierarchy>,
    name: String,
    lock: Option<SessionLock>,
    reaper: Option<ReaperLink>,
}

impl SessionClaim {
    /// Checks the state directory, cleans what crashed sessions left, and takes the name.
    pub fn take(state: StateDir, name: &str) -> Result<Self, SessionError> {
        validate_name(name)?;
        state.ensure()?;
        // A record of this very name that is not valid (forged, a symlink) is refused first, in
        // one line; other names' invalid records are only reported by `clean_stale`.
        state.load(name)?;
        let hierarchy = Hierarchy::open(&state.private_cgroup_mount())?;
        state.clean_stale(&hierarchy);
        let running = |state: &StateDir| {
            let pid = state.load(name).ok().flatten().map(|r| r.pid).unwrap_or(0);
            SessionError::AlreadyRunning {
                name: name.to_string(),
                pid,
            }
        };
        if state.load(name)?.is_some_and(|r| r.is_alive()) {
            return Err(running(&state));
        }
        // Two `up`/`map` with the same name at once: exactly one gets the lock.
        let Some(lock) = state.try_lock(name)? else {
            return Err(running(&state));
        };
        // Whatever happens to this process from here on, the reaper cleans up after it.
        let reaper = super::reaper::spawn(&state, name).map_err(|source| SessionError::State { path: state.root().to_path_buf(), source })?;
        Ok(SessionClaim { state, hierarchy: Some(hierarchy), name: name.to_string(), lock: Some(lock), reaper: Some(reaper) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn state(&self) -> &StateDir {
        &self.state
    }

    /// Loads, fills, records, creates and attaches, in an order that leaves nothing behind on
    /// failure: everything that can be refused is checked before anything is created.
    pub fn start(mut self, opts: SessionOptions) -> Result<ActiveSession, SessionError> {
        let hierarchy = self.hierarchy.as_ref().expect("claimed");
        check_unique(&opts.mappings).map_err(|e| SessionError::BadHosts(e.to_string()))?;
        let scope = match &opts.scope {
            ScopeRequest::Global => Scope::Global,
            ScopeRequest::Existing(given) => Scope::Cgroup {
                cgroup: hierarchy.resolve_existing(given)?,
            },
            ScopeRequest::NewCgroup => {
                let cgroup = session_cgroup(&self.name);
                if hierarchy.path_of(&cgroup).exists() {
                    return Err(CgroupError::AlreadyExists(hierarchy.path_of(&cgroup)).into());
                }
                Scope::Session { cgroup }
            }
        };
        let mut redirector = Redirector::load(opts.load)?;
        redirector.set(&opts.mappings)?;
        let pid = std::process::id();
        let record = SessionRecord {
            name: self.name.clone(),
            pid,
            pid_start: process_start_ticks(pid).unwrap_or(0),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            owner_uid: opts.owner.0,
            scope,
            origin_cgroup: Hierarchy::cgroup_of(pid)?,
            redirects: redirector.mappings().to_vec(),
            inetrc: opts
                .hosts
                .as_ref()
                .map(|_| DnsFiles::inetrc_path(self.state.root(), &self.name)),
        };
        // From here on, dropping `session` undoes whatever was done.
        self.state.write(&record)?;
        let dns = opts
            .hosts
            .as_ref()
            .map(|_| DnsFiles::new(&self.state, &self.name, opts.owner));
        let mut session = ActiveSession {
            state: self.state.clone(),
            hierarchy: self.hierarchy.take().expect("claimed"),
            record,
            redirector: Arc::new(Mutex::new(Some(redirector))),
            dns,
            created_cgroup: false,
            _lock: self.lock.take().expect("claimed"),
            _reaper: self.reaper.take(),
        };
        if let Scope::Session { .. } = &session.record.scope {
            session
                .hierarchy
                .create_session_cgroup(&session.record.name)?;
            session.created_cgroup = true;
        }
        if let (Some(dns), Some(hosts)) = (&session.dns, &opts.hosts) {
            dns.write(hosts)?;
        }
        {
            let cgroup_dir = session.hierarchy.open_dir(session.record.scope.cgroup())?;
            let mut guard = session.redirector.lock().unwrap();
            guard.as_mut().expect("loaded").attach(&cgroup_dir)?;
        }
        Ok(session)
    }
}

impl Drop for SessionClaim {
    fn drop(&mut self) {
        if self.lock.is_some() {
            // Not started: remove the lock file while still holding it (after unlocking, it
            // could already be someone else's).
            self.state.remove_file(&StateDir::lock_name(&self.name));
        }
    }
}

/// A running session: programs attached, maps filled. Dropping it tears everything down.
pub struct ActiveSession {
    state: StateDir,
    hierarchy: Hierarchy,
    record: SessionRecord,
    redirector: Arc<Mutex<Option<Redirector>>>,
    dns: Option<DnsFiles>,
    /// Whether this instance created the session cgroup (and so removes it).
    created_cgroup: bool,
    /// The flock on NAME.lock: this process owns the name while it holds it.
    _lock: SessionLock,
    /// Dropped last: the reaper wakes when this process is gone (see [`super::reaper`]).
    _reaper: Option<ReaperLink>,
}

impl ActiveSession {
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
    pub fn cgroup_path(&self) -> std::path::PathBuf {
        self.hierarchy.path_of(self.record.scope.cgroup())
    }

    /// Shared handle on the programs and maps (None once torn down).
    pub fn redirector(&self) -> Arc<Mutex<Option<Redirector>>> {
        self.redirector.clone()
    }

    /// Replaces the redirects and rewrites the record from what the maps then hold, so the
    /// two agree even when the update fails (the maps are restored then).
    pub fn set_redirects(&mut self, mappings: Vec<Mapping>) -> Result<(), SessionError> {
        check_unique(&mappings).map_err(|e| SessionError::BadHosts(e.to_string()))?;
        let result = {
            let mut guard = self.redirector.lock().unwrap();
            let redirector = guard.as_mut().expect("session is up");
            let result = redirector.set(&mappings);
            self.record.redirects = redirector.mappings().to_vec();
            result
        };
        self.state.write(&self.record)?;
        Ok(result?)
    }

    /// Rewrites the session's hosts file.
    pub fn set_hosts(&self, hosts: &[HostEntry]) -> Result<(), SessionError> {
        match &self.dns {
            Some(dns) => dns.write(hosts),
            None => Ok(()),
        }
    }

    /// The live status: the record, each redirect with its connect counter, the processes in
    /// the session's cgroup.
    pub fn status(&self) -> SessionStatus {
        let counts = self
            .redirector
            .lock()
            .unwrap()
            .as_ref()
            .map(|r| r.counts())
            .unwrap_or_default();
        let processes = match &self.record.scope {
            Scope::Global => Vec::new(),
            scope => self.hierarchy.procs(scope.cgroup()).unwrap_or_default(),
        };
        let mut status = SessionStatus::from_record(
            &self.record,
            "running",
            self.cgroup_path().display().to_string(),
        );
        status.processes = processes;
        status.redirects = self
            .record
            .redirects
            .iter()
            .map(|m| RedirectStatus {
                pod: m.pod,
                local: m.local,
                connects: counts.get(&m.pod).copied().unwrap_or(0),
                forward: None,
            })
            .collect();
        status
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        // Detach first (dropping the links), so nothing is redirected while we clean up.
        self.redirector.lock().map(|mut r| r.take()).ok();
        if let (Scope::Session { cgroup }, true) = (&self.record.scope, self.created_cgroup) {
            if let Err(e) = self
                .hierarchy
                .remove_session_cgroup(cgroup, &self.record.origin_cgroup)
            {
                log::warn!("session {}: {e}", self.record.name);
            }
        }
        self.state.remove(&self.record.name);
    }
}

impl StateDir {
    /// Removes what crashed sessions left behind: their cgroups, records and sockets.
    /// Returns the names cleaned. Invalid records are never acted on.
    pub fn clean_stale(&self, hierarchy: &Hierarchy) -> Vec<String> {
        let mut cleaned = Vec::new();
        for record in self.list().into_iter().filter(|r| !r.is_alive()) {
            // Whoever holds the name's lock is alive (and owns these files), whatever the record says.
            let Ok(Some(_lock)) = self.try_lock(&record.name) else {
                continue;
            };
            if let Scope::Session { cgroup } = &record.scope {
                if let Err(e) = hierarchy.remove_session_cgroup(cgroup, &record.origin_cgroup) {
                    log::warn!("stale session {}: {e}", record.name);
                    continue;
                }
            }
            log::info!(
                "cleaned up stale session {:?} (beamredir pid {} is gone)",
                record.name,
                record.pid
            );
            self.remove(&record.name);
            cleaned.push(record.name);
        }
        cleaned
    }
}
