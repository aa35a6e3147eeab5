//! The forwards of a session, by (pod name, pod port). Port-forwards address pods by name, so a
//! forward outlives pod restarts and IP changes; it goes when its pod or port goes. Listeners
//! come from the root part, which also closes them (after removing every redirect to them).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use serde::{Serialize, de::DeserializeOwned};

use super::{Carrier, Forward, gate::Gate};
use crate::{
    privsep::{
        messages::{Family, ListenerId},
        net::RootLink,
    },
    session::ForwardStats,
};

struct Entry {
    forward: Forward,
    listeners: Vec<(ListenerId, SocketAddr)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "pod {pod}: more than {max} ports to forward (--max-ports-per-pod); not forwarding port {port}"
    )]
    TooManyPorts { pod: String, port: u16, max: usize },
    #[error("pod {pod} port {port}: {reason}")]
    Listener {
        pod: String,
        port: u16,
        reason: String,
    },
}

pub struct ForwardRegistry<C> {
    root: RootLink<C>,
    gate: Arc<Gate>,
    entries: Mutex<BTreeMap<(String, u16), Entry>>,
    /// Serialises creation and removal (each asks the root part for listeners).
    changing: tokio::sync::Mutex<()>,
    max_ports_per_pod: usize,
}

impl<C: Serialize + DeserializeOwned + Send + 'static> ForwardRegistry<C> {
    pub fn new(root: RootLink<C>, gate: Arc<Gate>, max_ports_per_pod: usize) -> Self {
        ForwardRegistry {
            root,
            gate,
            entries: Mutex::new(BTreeMap::new()),
            changing: tokio::sync::Mutex::new(()),
            max_ports_per_pod,
        }
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Makes sure `pod:port` has a forward listening on each of `families`. `carrier` is only
    /// called when a forward is created.
    pub async fn ensure(
        &self,
        pod: &str,
        port: u16,
        families: &BTreeSet<FamilyKey>,
        carrier: impl FnOnce() -> Carrier,
        label: String,
    ) -> Result<(), RegistryError> {
        let _guard = self.changing.lock().await;
        let key = (pod.to_string(), port);
        let have: BTreeSet<FamilyKey> = {
            let entries = self.entries.lock().unwrap();
            if let Some(e) = entries.get(&key) {
                e.listeners.iter().map(|(_, a)| FamilyKey::of(a)).collect()
            } else {
                let count = entries.keys().filter(|(p, _)| p == pod).count();
                if count >= self.max_ports_per_pod {
                    return Err(RegistryError::TooManyPorts {
                        pod: pod.into(),
                        port,
                        max: self.max_ports_per_pod,
                    });
                }
                BTreeSet::new()
            }
        };
        if families.is_subset(&have) && !have.is_empty() {
            return Ok(());
        }
        // A new forward, or one that needs another family (a pod that gained an IPv6 address):
        // build it whole, then swap it in; the old one's listeners go back to root.
        let wanted: BTreeSet<FamilyKey> = families.union(&have).copied().collect();
        let mut listeners = Vec::new();
        let mut sockets = Vec::new();
        for f in &wanted {
            match self.root.open_listener(f.family()).await {
                Ok((id, local, socket)) => {
                    listeners.push((id, local));
                    sockets.push(socket);
                }
                Err(e) => {
                    for (id, _) in listeners {
                        let _ = self.root.close_listener(id).await;
                    }
                    return Err(RegistryError::Listener {
                        pod: pod.into(),
                        port,
                        reason: e.to_string(),
                    });
                }
            }
        }
        let forward =
            Forward::start(label, sockets, self.gate.clone(), carrier()).map_err(|e| {
                RegistryError::Listener {
                    pod: pod.into(),
                    port,
                    reason: e.to_string(),
                }
            })?;
        let old = self
            .entries
            .lock()
            .unwrap()
            .insert(key, Entry { forward, listeners });
        if let Some(old) = old {
            drop(old.forward);
            for (id, _) in old.listeners {
                let _ = self.root.close_listener(id).await;
            }
        }
        Ok(())
    }

    /// Closes the forwards of `pod` whose ports are not in `keep` (all of them for an empty set).
    pub async fn retain(&self, pod: &str, keep: &BTreeSet<u16>) {
        let _guard = self.changing.lock().await;
        let gone: Vec<Entry> = {
            let mut entries = self.entries.lock().unwrap();
            let keys: Vec<(String, u16)> = entries
                .keys()
                .filter(|(p, port)| p == pod && !keep.contains(port))
                .cloned()
                .collect();
            keys.into_iter()
                .filter_map(|k| entries.remove(&k))
                .collect()
        };
        for e in gone {
            drop(e.forward);
            for (id, _) in e.listeners {
                // Root removes the redirects to it first, then closes its copy.
                if let Err(e) = self.root.close_listener(id).await {
                    log::warn!("closing a forward of pod {pod}: {e}");
                }
            }
        }
    }

    /// The listener of `pod:port` for an address family, if there is one.
    pub fn listener(&self, pod: &str, port: u16, family: FamilyKey) -> Option<ListenerId> {
        let entries = self.entries.lock().unwrap();
        entries
            .get(&(pod.to_string(), port))?
            .listeners
            .iter()
            .find(|(_, a)| FamilyKey::of(a) == family)
            .map(|(id, _)| *id)
    }

    /// The ports of `pod` that have forwards.
    pub fn ports(&self, pod: &str) -> BTreeSet<u16> {
        self.entries
            .lock()
            .unwrap()
            .keys()
            .filter(|(p, _)| p == pod)
            .map(|(_, port)| *port)
            .collect()
    }

    /// Counters per listener (a forward's counters under each of its listeners' ids).
    pub fn stats(&self) -> Vec<(ListenerId, ForwardStats)> {
        let entries = self.entries.lock().unwrap();
        entries
            .values()
            .flat_map(|e| {
                e.listeners
                    .iter()
                    .map(|(id, _)| (*id, e.forward.stats.snapshot()))
            })
            .collect()
    }
}

/// An address family, orderable (for sets of the families a pod has).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FamilyKey {
    V4,
    V6,
}

impl FamilyKey {
    pub fn of(addr: &SocketAddr) -> Self {
        if addr.is_ipv4() {
            FamilyKey::V4
        } else {
            FamilyKey::V6
        }
    }

    pub fn of_ip(ip: &std::net::IpAddr) -> Self {
        if ip.is_ipv4() {
            FamilyKey::V4
        } else {
            FamilyKey::V6
        }
    }

    fn family(self) -> Family {
        match self {
            FamilyKey::V4 => Family::V4,
            FamilyKey::V6 => Family::V6,
        }
    }
}
