//! What runs on a pod, asked through port-forwards: the epmd port and the distribution ports
//! (from the spec, and every node the pod's epmd lists), then each node's exact name read from
//! the node itself — the distribution handshake's challenge carries it, before any cookie is
//! checked, and closing there is silent on the pod (see [`crate::erlang::handshake`]).
use std::{collections::BTreeSet, time::Duration};

use crate::{
    erlang::handshake::{self, NodeIdentity, ProbeError},
    k8s::{Cluster, K8sError, pod::PodTarget, portforward},
    up::Limits,
};

/// How long one node probe may take (a port-forward upgrade plus two short messages).
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// One Erlang node on a pod.
#[derive(Clone, Debug)]
pub struct DistNode {
    pub port: u16,
    /// The name epmd registered (the part before `@`), when epmd listed it.
    pub epmd_name: Option<String>,
    /// What the node said about itself, or why it could not be asked.
    pub identity: Result<NodeIdentity, String>,
    /// The node speaks TLS distribution (from the probe, or from the pod spec).
    pub tls: bool,
}

impl DistNode {
    pub fn name(&self) -> Option<&str> {
        self.identity.as_ref().ok().map(|i| i.name.as_str())
    }
}

/// The ports to forward (epmd and distribution) and the nodes behind the distribution ports.
#[derive(Clone, Debug, Default)]
pub struct Discovery {
    pub ports: BTreeSet<u16>,
    pub nodes: Vec<DistNode>,
}

impl Discovery {
    /// The exact names known (from the nodes; the spec's name when no node could be asked).
    pub fn names(&self, target: &PodTarget) -> Vec<String> {
        let mut names: Vec<String> = self.nodes.iter().filter_map(|n| n.name().map(String::from)).collect();
        if names.is_empty() {
            names.extend(target.spec_node_name.clone());
        }
        names
    }
}

/// Finds a pod's Erlang ports and nodes. Without a distribution port from the spec, epmd must
/// answer; with one, epmd is best effort (and skipped for epmd-less nodes). Node names are
/// best effort: a node that cannot be asked keeps the spec's name.
pub async fn discover(cluster: &Cluster, target: &PodTarget, limits: &Limits, ask_names: bool) -> Result<Discovery, K8sError> {
    let mut dist: Vec<(u16, Option<String>)> = target.dist_port.iter().map(|(p, _)| (*p, None)).collect();
    let mut ports = BTreeSet::new();
    if target.epmdless {
        if dist.is_empty() {
            return Err(K8sError::NoDistPort { name: target.name.clone(), namespace: target.namespace.clone() });
        }
    } else {
        ports.insert(target.epmd_port);
        let timeout = limits.upgrade_timeout() + Duration::from_secs(10);
        match portforward::epmd_names(cluster, &target.name, target.epmd_port, timeout).await {
            Ok(registered) => {
                if registered.len() >= limits.max_ports_per_pod {
                    log::warn!(
                        "pod {}/{}: its epmd lists {} nodes; forwarding the first {} (--max-ports-per-pod)",
                        target.namespace,
                        target.name,
                        registered.len(),
                        limits.max_ports_per_pod.saturating_sub(1)
                    );
                }
                for (name, port) in registered.into_iter().take(limits.max_ports_per_pod.saturating_sub(1)) {
                    match dist.iter_mut().find(|(p, _)| *p == port) {
                        Some(entry) => entry.1 = Some(name),
                        None => dist.push((port, Some(name))),
                    }
                }
                if dist.is_empty() {
                    return Err(K8sError::NoDistPort { name: target.name.clone(), namespace: target.namespace.clone() });
                }
            }
            // Without permission nothing else will work either: that is an error, always.
            Err(e @ (K8sError::Forbidden { .. } | K8sError::Unauthorized { .. })) => return Err(e),
            Err(e) if !dist.is_empty() => {
                log::warn!("{e}; going on with distribution port {}", dist[0].0);
            }
            Err(e) => return Err(e),
        }
    }
    ports.extend(dist.iter().map(|(p, _)| *p));
    let probes = dist.into_iter().map(|(port, epmd_name)| async move {
        let identity = if target.tls_dist {
            // A TLS node logs a notice for a plain probe: the spec said enough.
            Err(ProbeError::Tls.to_string())
        } else if ask_names {
            let connect = || async { portforward::stream(cluster, &target.name, port, limits.upgrade_timeout()).await.map_err(std::io::Error::other) };
            handshake::probe(connect, PROBE_TIMEOUT).await.map_err(|e| e.to_string())
        } else {
            Err("not asked".into())
        };
        let tls = target.tls_dist || identity.as_ref().is_err_and(|e| e == &ProbeError::Tls.to_string());
        DistNode { port, epmd_name, identity, tls }
    });
    let nodes = futures::future::join_all(probes).await;
    for n in &nodes {
        match (&n.identity, &target.spec_node_name) {
            (Ok(id), Some(spec)) if nodes.len() == 1 && &id.name != spec => log::warn!(
                "pod {}/{}: its spec names the node {spec}, the node itself says {}; using {}",
                target.namespace,
                target.name,
                id.name,
                id.name
            ),
            (Err(e), _) if ask_names && !n.tls => log::debug!("pod {}/{} port {}: {e}", target.namespace, target.name, n.port),
            _ => {}
        }
    }
    Ok(Discovery { ports, nodes })
}
