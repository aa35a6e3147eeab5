//! What `beamredir status` reports about a session, and the JSON it prints with `-o json`
//! (documented in docs/status-schema.md; keep the two in step).
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::record::{Scope, SessionRecord};

/// Per-forward traffic counters (sessions that run their own forwards: `up`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForwardStats {
    /// Connections being relayed now.
    pub active: u64,
    /// Connections accepted and relayed so far.
    pub total: u64,
    pub bytes_to_pod: u64,
    pub bytes_from_pod: u64,
    /// Relays that ended in an error (the pod refused, the stream broke, …).
    pub errors: u64,
    /// Connections refused because the peer was not in the session (never sent to the cluster).
    #[serde(default)]
    pub refused: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RedirectStatus {
    pub pod: SocketAddr,
    pub local: SocketAddr,
    /// connect() calls the eBPF program redirected.
    pub connects: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward: Option<ForwardStats>,
}

/// A pod an `up` session follows.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodInfo {
    pub name: String,
    pub namespace: String,
    /// The pod's primary IP (status.podIP), if it has one.
    pub ip: Option<String>,
    /// Every pod IP (status.podIPs), in the order Kubernetes reports them.
    #[serde(default)]
    pub ips: Vec<String>,
    /// Kubernetes' readiness (the Ready condition); redirects do not depend on it.
    #[serde(default)]
    pub ready: Option<bool>,
    /// "Running", "not running: …", "deleted", "starting", "unreachable: …".
    pub state: String,
    /// The exact node names on the pod (from the node itself when probed, else from the spec).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// Addresses of the pod's previous incarnation still redirected to it (so nodes that
    /// resolved its name before it moved still reach it), until they expire.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<AliasInfo>,
}

/// An old pod IP still redirected to the pod's forwards.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AliasInfo {
    pub ip: String,
    /// Seconds until the alias goes (at most [`crate::up::table::ALIAS_TTL`]).
    pub expires_in_secs: u64,
}

/// Session-wide connection accounting (the cap on concurrent connections).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionStats {
    pub active: u64,
    pub limit: u64,
    /// Connections that had to wait for a free slot.
    pub waited: u64,
    /// Connections closed because no slot freed up in time.
    pub over_limit: u64,
    /// Connections refused because their peer was not in the session.
    pub refused: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SessionStatus {
    pub name: String,
    /// "running", "stale" (its process died), "not answering".
    pub state: String,
    pub pid: u32,
    pub owner_uid: u32,
    pub started_unix: u64,
    pub scope: Scope,
    pub cgroup_path: String,
    pub processes: Vec<u32>,
    pub redirects: Vec<RedirectStatus>,
    /// Pods followed by an `up` session.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pods: Vec<PodInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionStats>,
}

impl SessionStatus {
    /// What can be said of a session from its record alone (stale, or not answering).
    pub fn from_record(record: &SessionRecord, state: &str, cgroup_path: String) -> Self {
        SessionStatus {
            name: record.name.clone(),
            state: state.into(),
            pid: record.pid,
            owner_uid: record.owner_uid,
            started_unix: record.started_unix,
            scope: record.scope.clone(),
            cgroup_path,
            processes: Vec::new(),
            pods: Vec::new(),
            connections: None,
            redirects: record
                .redirects
                .iter()
                .map(|m| RedirectStatus {
                    pod: m.pod,
                    local: m.local,
                    connects: 0,
                    forward: None,
                })
                .collect(),
        }
    }
}
