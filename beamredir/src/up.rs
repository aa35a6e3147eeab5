//! `beamredir up`: pods → port-forwards → redirects, kept in step with the pods.
//!
//! For each pod: look it up (Running, Ready, IPv4), open a local forward per Erlang port
//! (epmd and distribution), and redirect `POD_IP:PORT` to the forward. A watch per pod follows
//! restarts: when the pod comes back with a new IP its redirects move to it; the forwards stay,
//! since port-forwards address the pod by name.
use std::{
    collections::BTreeMap,
    net::SocketAddrV4,
    sync::{Arc, Mutex},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};

use crate::{
    forward::{Carrier, ConnStats, Forward},
    k8s::{
        Cluster, K8sError,
        pod::{self, PodTarget},
        portforward::{self, Ended},
    },
    mapping::Mapping,
    session::{ActiveSession, PodInfo, SessionStatus},
};

/// What `up` keeps per pod.
pub struct PodState {
    pub target: Option<PodTarget>,
    /// "Running", "not ready: …", "deleted".
    pub state: String,
    /// Pod port → local forward.
    pub forwards: BTreeMap<u16, Forward>,
}

/// All pods of an `up` session, shared by the watches and the status handler.
#[derive(Clone)]
pub struct Pods {
    cluster: Cluster,
    dist_port: Option<u16>,
    pods: Arc<Mutex<BTreeMap<String, PodState>>>,
}

impl Pods {
    /// Looks every pod up and opens its forwards. Nothing is attached yet, so a failure here
    /// leaves nothing behind (the listeners close when the forwards drop).
    pub async fn resolve(cluster: Cluster, names: &[String], dist_port: Option<u16>) -> Result<Self, K8sError> {
        let pods = Pods { cluster, dist_port, pods: Arc::new(Mutex::new(BTreeMap::new())) };
        for name in names {
            let pod = pod::get(&pods.cluster, name).await?;
            let mut target = PodTarget::from_pod(&pod, dist_port)?;
            // One round trip through a real port-forward: fails fast on 403, an unreachable
            // pod or no epmd, and tells the dist port when the pod spec does not.
            let registered = portforward::epmd_names(&pods.cluster, name, target.epmd_port).await?;
            if target.dist_port.is_none() {
                target.dist_port = dist_port_from_epmd(&target, &registered);
            }
            target.require_dist_port()?;
            let mut state = PodState { target: None, state: "Running".into(), forwards: BTreeMap::new() };
            pods.ensure_forwards(&target, &mut state).await?;
            state.target = Some(target);
            pods.pods.lock().unwrap().insert(name.clone(), state);
        }
        Ok(pods)
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Opens the forwards a target needs that are not open yet (e.g. a new dist port).
    async fn ensure_forwards(&self, target: &PodTarget, state: &mut PodState) -> Result<(), K8sError> {
        let ports = [("epmd", target.epmd_port), ("dist", target.dist_port.unwrap_or(0))];
        for (what, port) in ports.into_iter().filter(|(_, p)| *p != 0) {
            if state.forwards.contains_key(&port) {
                continue;
            }
            let label = format!("pod {}/{} port {port} ({what})", target.namespace, target.name);
            let carrier = carrier(self.cluster.clone(), target.name.clone(), port);
            let forward = Forward::start(label, port, carrier)
                .await
                .map_err(|e| K8sError::PortForward { pod: target.name.clone(), port, reason: format!("listening on 127.0.0.1: {e}") })?;
            state.forwards.insert(port, forward);
        }
        Ok(())
    }

    /// The redirects for every pod that is up: POD_IP:PORT → its forward.
    pub fn mappings(&self) -> Vec<Mapping> {
        let pods = self.pods.lock().unwrap();
        pods.values()
            .filter_map(|s| s.target.as_ref().map(|t| (t, s)))
            .flat_map(|(t, s)| {
                [Some(t.epmd_port), t.dist_port]
                    .into_iter()
                    .flatten()
                    .filter_map(|port| s.forwards.get(&port).map(|f| Mapping { pod: SocketAddrV4::new(t.ip, port), local: f.local }))
            })
            .collect()
    }

    pub fn targets(&self) -> Vec<PodTarget> {
        self.pods.lock().unwrap().values().filter_map(|s| s.target.clone()).collect()
    }

    /// Adds pod states and forward counters to a session status.
    pub fn decorate(&self, status: &mut SessionStatus) {
        let pods = self.pods.lock().unwrap();
        let stats: Vec<(SocketAddrV4, Arc<ConnStats>)> =
            pods.values().flat_map(|s| s.forwards.values().map(|f| (f.local, f.stats.clone()))).collect();
        for r in &mut status.redirects {
            if let Some((_, s)) = stats.iter().find(|(local, _)| *local == r.local) {
                r.forward = Some(s.snapshot());
            }
        }
        status.pods = pods
            .iter()
            .map(|(name, s)| PodInfo {
                name: name.clone(),
                namespace: self.cluster.namespace.clone(),
                ip: s.target.as_ref().map(|t| t.ip.to_string()),
                state: s.state.clone(),
                node: s.target.as_ref().and_then(|t| t.node_name.clone()),
            })
            .collect();
    }

    /// Watches every pod and keeps the session's redirects in step. Runs until aborted.
    pub fn follow(&self, session: Arc<Mutex<ActiveSession>>) -> Vec<tokio::task::JoinHandle<()>> {
        let names: Vec<String> = self.pods.lock().unwrap().keys().cloned().collect();
        names
            .into_iter()
            .map(|name| {
                let (pods, session) = (self.clone(), session.clone());
                tokio::spawn(async move { pods.watch_one(name, session).await })
            })
            .collect()
    }

    async fn watch_one(self, name: String, session: Arc<Mutex<ActiveSession>>) {
        let api: Api<Pod> = Api::namespaced(self.cluster.client.clone(), &self.cluster.namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let mut events = watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => self.pod_changed(&name, Some(&pod), &session).await,
                Ok(watcher::Event::Delete(_)) => self.pod_changed(&name, None, &session).await,
                Ok(_) => {}
                Err(e) => log::warn!("watching pod {}/{name}: {e} (retrying)", self.cluster.namespace),
            }
        }
    }

    /// Applies one observation of a pod (None: deleted) to the forwards and the map.
    async fn pod_changed(&self, name: &str, pod: Option<&Pod>, session: &Arc<Mutex<ActiveSession>>) {
        let ns = self.cluster.namespace.clone();
        let observed = match pod {
            None => Err("deleted".to_string()),
            Some(p) => PodTarget::from_pod(p, self.dist_port).map_err(|e| match e {
                K8sError::PodNotReady { why, .. } => format!("not ready: {why}"),
                other => other.to_string(),
            }),
        };
        // Take the state out so forwards can be opened without holding the lock.
        let Some(mut state) = self.pods.lock().unwrap().remove(name) else { return };
        let before = state.target.clone();
        match observed {
            Ok(target) => {
                if let Err(e) = self.ensure_forwards(&target, &mut state).await {
                    log::warn!("{e}");
                }
                state.state = "Running".into();
                if before.as_ref().map(|t| (t.ip, t.dist_port, &t.uid)) != Some((target.ip, target.dist_port, &target.uid)) {
                    match &before {
                        Some(old) if old.ip != target.ip => log::info!("pod {ns}/{name} moved from {} to {}; redirects updated", old.ip, target.ip),
                        Some(_) => log::info!("pod {ns}/{name} changed; redirects updated"),
                        None => log::info!("pod {ns}/{name} is back at {}; redirects restored", target.ip),
                    }
                }
                state.target = Some(target);
            }
            Err(why) => {
                if before.is_some() {
                    log::warn!("pod {ns}/{name} is {why}; its redirects are removed until it is back");
                }
                state.target = None;
                state.state = why;
            }
        }
        self.pods.lock().unwrap().insert(name.to_string(), state);
        let mappings = self.mappings();
        if let Err(e) = session.lock().unwrap().set_redirects(mappings) {
            log::warn!("updating redirects: {e}");
        }
    }
}

/// The dist port of the node epmd knows under the pod's node name, or of its only node.
fn dist_port_from_epmd(target: &PodTarget, registered: &[(String, u16)]) -> Option<u16> {
    let short = target.node_name.as_deref().and_then(|n| n.split('@').next());
    match short {
        Some(short) => registered.iter().find(|(n, _)| n == short).map(|(_, p)| *p),
        None if registered.len() == 1 => Some(registered[0].1),
        None => None,
    }
}

/// Opens a port-forward per accepted connection and relays it.
fn carrier(cluster: Cluster, pod: String, port: u16) -> Carrier {
    Arc::new(move |conn, stats| {
        let (cluster, pod) = (cluster.clone(), pod.clone());
        Box::pin(async move {
            let ws = portforward::open(&cluster, &pod, port).await.map_err(|e| e.to_string())?;
            match portforward::relay(ws, conn, port, stats).await {
                Ok(Ended::Closed) => Ok(()),
                Ok(Ended::PodError(msg)) => Err(format!("pod {}/{pod} port {port}: {}", cluster.namespace, msg.trim())),
                Err(e) => Err(format!("pod {}/{pod} port {port}: {e}", cluster.namespace)),
            }
        })
    })
}
