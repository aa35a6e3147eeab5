//! What happens to one admitted local connection: a port-forward to its pod port through the
//! API server (given up early if the local side closes while the upgrade is pending), then the
//! relay (ended as soon as the local side has closed its socket, see
//! [`portforward::relay_with`]). The epmd forward also watches the epmd conversation to learn
//! distribution ports before their answers reach the local node (see [`crate::erlang::epmd`]).
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, Weak},
};

use tokio::net::TcpStream;

use super::Up;
use crate::{
    erlang::epmd::{EpmdConversation, Event},
    forward::{Carrier, registry::FamilyKey},
    k8s::portforward::{self, Ended, Inspector, LocalClosed, NoInspection},
};

/// Opens a port-forward per accepted connection and relays it.
pub fn carrier(up: &Arc<Up>, pod: &str, port: u16, is_epmd: bool) -> Carrier {
    let (weak, cluster, pod) = (Arc::downgrade(up), up.cluster.clone(), pod.to_string());
    let timeout = up.config.limits.upgrade_timeout();
    let gate = up.registry.gate().clone();
    Arc::new(move |conn, stats| {
        let (weak, cluster, pod) = (weak.clone(), cluster.clone(), pod.clone());
        // After a local EOF: has the local process closed its socket, or only half-closed it?
        let closed_probe: Option<LocalClosed> = match (conn.local_addr(), conn.peer_addr()) {
            (Ok(local), Ok(peer)) => {
                let gate = gate.clone();
                Some(Arc::new(move || gate.peer_closed(local, peer)))
            }
            _ => None,
        };
        Box::pin(async move {
            if !is_epmd {
                // A local node dialling a distribution port has booted, so it has read its
                // cookie (remsh/observer): the private cookie file need not wait for the end of
                // the session (which a SIGKILL would skip).
                if let Some(file) = weak.upgrade().and_then(|up| up.cookie_file.lock().unwrap().take()) {
                    drop(file);
                    log::debug!("removed the local node's cookie file: it has read it");
                }
            }
            let ws = tokio::select! {
                ws = portforward::open(&cluster, &pod, port, timeout) => ws.map_err(|e| e.to_string())?,
                _ = local_closed(&conn) => return Err(format!("pod {}/{pod} port {port}: the local side closed before the port-forward was set up", cluster.namespace)),
            };
            let ended = if is_epmd {
                let watcher = EpmdWatcher {
                    conv: Arc::new(Mutex::new(EpmdConversation::new())),
                    up: weak,
                    pod: pod.clone(),
                };
                portforward::relay_with(ws, conn, port, stats, watcher, closed_probe).await
            } else {
                portforward::relay_with(ws, conn, port, stats, NoInspection, closed_probe).await
            };
            match ended {
                Ok(Ended::Closed) => Ok(()),
                Ok(Ended::PodError(msg)) => Err(format!(
                    "pod {}/{pod} port {port}: {}",
                    cluster.namespace,
                    msg.trim()
                )),
                Err(e) => Err(format!("pod {}/{pod} port {port}: {e}", cluster.namespace)),
            }
        })
    })
}

/// Completes when the local side has closed without sending anything; stays pending once it has
/// sent data (which waits in the socket for the relay).
async fn local_closed(conn: &TcpStream) {
    let mut byte = [0u8; 1];
    match conn.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Follows one epmd connection through the forward.
#[derive(Clone)]
struct EpmdWatcher {
    conv: Arc<Mutex<EpmdConversation>>,
    up: Weak<Up>,
    pod: String,
}

impl Inspector for EpmdWatcher {
    fn on_local_bytes(&self, bytes: &[u8]) {
        for event in self.conv.lock().unwrap().client_bytes(bytes) {
            if let Event::Unparseable { reason } = event {
                log::debug!(
                    "pod {} epmd request not understood ({reason}); relaying as is",
                    self.pod
                );
            }
        }
    }

    fn on_pod_bytes(
        &self,
        bytes: &[u8],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let events = self.conv.lock().unwrap().server_bytes(bytes);
        let (up, pod) = (self.up.clone(), self.pod.clone());
        Box::pin(async move {
            for event in events {
                match event {
                    Event::DistPort { node, port } => {
                        if let Some(up) = up.upgrade() {
                            learn_port(&up, &pod, &node, port).await;
                        }
                    }
                    Event::Unparseable { reason } => log::debug!(
                        "pod {pod} epmd answer not understood ({reason}); relaying as is"
                    ),
                    _ => {}
                }
            }
        })
    }

    fn on_pod_closed(&self) {
        // A NAMES answer is complete only now (after it was relayed): forward its ports for
        // the connections that follow.
        let events = self.conv.lock().unwrap().server_eof();
        let Some(up) = self.up.upgrade() else { return };
        for event in events {
            if let Event::Names(nodes) = event {
                let (up, pod) = (up.clone(), self.pod.clone());
                tokio::spawn(async move {
                    for (node, port) in nodes.into_iter().take(up.config.limits.max_ports_per_pod) {
                        learn_port(&up, &pod, &node, port).await;
                    }
                });
            }
        }
    }
}

/// A distribution port epmd just told a local node about: make sure it has a forward and a
/// redirect before the answer is passed on.
pub async fn learn_port(up: &Arc<Up>, pod: &str, node: &str, port: u16) {
    if up.is_closed() {
        return;
    }
    let (target, known) = {
        let table = up.table.lock().unwrap();
        let Some(entry) = table.get(pod) else { return };
        let Some(target) = entry.target.clone() else {
            return;
        };
        (target, entry.ports.clone())
    };
    if known.contains(&port) && up.registry.ports(pod).contains(&port) {
        // Known; make sure the map says so too (a publication may be in flight).
        up.publisher.publish().await;
        return;
    }
    if known.len() >= up.config.limits.max_ports_per_pod {
        log::warn!(
            "pod {}/{pod}: epmd says node {node} listens on {port}, but the pod already has {} forwarded ports (--max-ports-per-pod)",
            target.namespace,
            known.len()
        );
        return;
    }
    let families: BTreeSet<FamilyKey> = target.ips.iter().map(FamilyKey::of_ip).collect();
    let label = format!("pod {}/{pod} port {port} (dist)", target.namespace);
    match up
        .registry
        .ensure(
            pod,
            port,
            &families,
            || carrier(up, pod, port, false),
            label,
        )
        .await
    {
        Ok(()) => {
            let added = {
                let mut table = up.table.lock().unwrap();
                let entry = table.entry(pod);
                // Only for the incarnation we looked at.
                entry.target.as_ref().is_some_and(|t| t.uid == target.uid)
                    && entry.ports.insert(port)
            };
            up.publisher.publish().await;
            if added {
                log::info!(
                    "pod {}/{pod}: epmd says node {node} listens on {port}; forwarding it",
                    target.namespace
                );
            }
        }
        Err(e) => log::warn!("{e}"),
    }
}
