//! Admission to the forwards: a connection is carried to the cluster only if its peer belongs
//! to the session (checked with [`super::peer`]) and a connection slot is free (the session's
//! cap on concurrent connections). A refused connection is closed at once and never reaches the
//! API server.
use std::{
    collections::HashSet,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::peer::{PeerInfo, PeerLookup, cgroup_ids_under};
use crate::{privsep::messages::PeerRule, session::status::ConnectionStats};

/// At most this many cgroups below a session's are accepted (and scanned).
const MAX_CGROUPS: usize = 4096;
/// A miss rescans the session's cgroup tree at most this often.
const RESCAN_EVERY: Duration = Duration::from_secs(1);
/// Distinct refused peers remembered for logging once each.
const MAX_LOGGED_PEERS: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    #[error("the session has not started yet")]
    NotStarted,
    #[error("peer {peer} (uid {uid}) is not in the session")]
    Outsider { peer: SocketAddr, uid: u32 },
    #[error("peer {0} is gone, or not on this host")]
    Unknown(SocketAddr),
    #[error("peer lookup failed: {0}")]
    Lookup(String),
    #[error("{limit} connections are open already (--max-connections) and {}", waited(.wait))]
    OverLimit { limit: usize, wait: Duration },
}

fn waited(wait: &Duration) -> String {
    if wait.is_zero() {
        "--connection-wait is 0".into()
    } else {
        format!("none ended within {wait:?} (--connection-wait)")
    }
}

#[derive(Default)]
struct Counters {
    waited: AtomicU64,
    over_limit: AtomicU64,
    refused: AtomicU64,
}

/// The session-wide gate every forward's accept loop goes through.
pub struct Gate {
    rule: Mutex<Option<PeerRule>>,
    lookup: Mutex<Option<PeerLookup>>,
    cgroups: Mutex<(HashSet<u64>, Option<Instant>)>,
    slots: Arc<Semaphore>,
    limit: usize,
    wait: Duration,
    counters: Counters,
    logged: Mutex<HashSet<(u32, Option<u64>)>>,
    /// The most connections carried at once since [`Gate::take_peak`] last asked.
    peak: AtomicU64,
}

impl Gate {
    pub fn new(limit: usize, wait: Duration) -> Arc<Self> {
        Arc::new(Gate {
            rule: Mutex::new(None),
            lookup: Mutex::new(
                PeerLookup::new()
                    .map_err(|e| {
                        log::warn!(
                            "sock_diag unavailable ({e}): every forward connection will be refused"
                        )
                    })
                    .ok(),
            ),
            cgroups: Mutex::new((HashSet::new(), None)),
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            wait,
            counters: Counters::default(),
            logged: Mutex::new(HashSet::new()),
            peak: AtomicU64::new(0),
        })
    }

    /// From now on, admit peers by `rule` (before this, nobody is admitted).
    pub fn open(&self, rule: PeerRule) {
        *self.rule.lock().unwrap() = Some(rule);
    }

    /// Checks the peer (one sock_diag round trip, no waiting): called in the accept loop
    /// itself, so a refused connection costs no task and is closed before the next accept.
    /// Counted and logged (once per peer uid) when refused.
    pub fn check(&self, local: SocketAddr, peer: SocketAddr, label: &str) -> Result<(), Refused> {
        self.check_peer(local, peer).inspect_err(|refused| {
            self.counters.refused.fetch_add(1, Ordering::Relaxed);
            self.log_refusal(refused, label);
        })
    }

    /// Waits (briefly) for a connection slot, for a peer [`Gate::check`] admitted. The permit
    /// frees the slot when the connection ends.
    pub async fn slot(&self, label: &str) -> Result<OwnedSemaphorePermit, Refused> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            self.note_active();
            return Ok(permit);
        }
        self.counters.waited.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => {
                self.note_active();
                Ok(permit)
            }
            _ => {
                let n = self.counters.over_limit.fetch_add(1, Ordering::Relaxed);
                let refused = Refused::OverLimit {
                    limit: self.limit,
                    wait: self.wait,
                };
                // The first, then every 100th: a flood must not flood the log too.
                if n.is_multiple_of(100) {
                    log::warn!("{label}: connection closed: {refused} ({} so far)", n + 1);
                }
                Err(refused)
            }
        }
    }

    fn check_peer(&self, local: SocketAddr, peer: SocketAddr) -> Result<(), Refused> {
        let Some(rule) = self.rule.lock().unwrap().clone() else {
            return Err(Refused::NotStarted);
        };
        let info: PeerInfo = {
            let lookup = self.lookup.lock().unwrap();
            let Some(lookup) = lookup.as_ref() else {
                return Err(Refused::Lookup("no sock_diag socket".into()));
            };
            match lookup.lookup(local, peer) {
                Ok(Some(info)) => info,
                Ok(None) => return Err(Refused::Unknown(peer)),
                Err(e) => return Err(Refused::Lookup(e.to_string())),
            }
        };
        let allowed = match &rule {
            PeerRule::Uid { uid } => info.uid == *uid,
            PeerRule::Cgroup { path } => match info.cgroup_id {
                Some(id) => self.in_cgroups(path, id),
                // Kernels without INET_DIAG_CGROUP_ID (< 5.7) cannot tell; such kernels cannot
                // run beamredir's programs either, so this is refused rather than guessed.
                None => false,
            },
        };
        if allowed {
            Ok(())
        } else {
            Err(Refused::Outsider {
                peer,
                uid: info.uid,
            })
        }
    }

    /// Whether cgroup `id` is the session's or below it; an unknown id rescans (rate-limited),
    /// since a process may have created a child cgroup (only possible with --cgroup).
    fn in_cgroups(&self, path: &std::path::Path, id: u64) -> bool {
        let mut cg = self.cgroups.lock().unwrap();
        if cg.0.contains(&id) {
            return true;
        }
        if cg.1.is_none_or(|t| t.elapsed() >= RESCAN_EVERY) {
            match cgroup_ids_under(path, MAX_CGROUPS) {
                Ok(ids) => cg.0 = ids.into_iter().collect(),
                Err(e) => log::warn!(
                    "reading the session's cgroups under {}: {e}",
                    path.display()
                ),
            }
            cg.1 = Some(Instant::now());
        }
        cg.0.contains(&id)
    }

    /// Whether the process that opened the connection from `peer` to `local` has closed its
    /// socket (or the socket is gone). False when that cannot be told.
    pub fn peer_closed(&self, local: SocketAddr, peer: SocketAddr) -> bool {
        let lookup = self.lookup.lock().unwrap();
        match lookup.as_ref().map(|l| l.lookup(local, peer)) {
            Some(Ok(None)) => true,
            Some(Ok(Some(info))) => info.is_closed(),
            _ => false,
        }
    }

    fn log_refusal(&self, refused: &Refused, label: &str) {
        let key = match refused {
            Refused::Outsider { uid, .. } => (*uid, None),
            _ => (u32::MAX, None),
        };
        let mut logged = self.logged.lock().unwrap();
        if logged.len() < MAX_LOGGED_PEERS && logged.insert(key) {
            log::warn!("{label}: refused a connection: {refused} (logged once per peer uid)");
        }
    }

    fn active(&self) -> u64 {
        (self.limit - self.slots.available_permits()) as u64
    }

    fn note_active(&self) {
        self.peak.fetch_max(self.active(), Ordering::Relaxed);
    }

    /// (connections carried now, the most carried at once since the last call).
    pub fn take_peak(&self) -> (u64, u64) {
        let active = self.active();
        let peak = self.peak.swap(active, Ordering::Relaxed);
        (active, peak.max(active))
    }

    pub fn stats(&self) -> ConnectionStats {
        ConnectionStats {
            active: self.active(),
            limit: self.limit as u64,
            waited: self.counters.waited.load(Ordering::Relaxed),
            over_limit: self.counters.over_limit.load(Ordering::Relaxed),
            refused: self.counters.refused.load(Ordering::Relaxed),
        }
    }
}
