//! One reconciler per pod: it takes the newest observation of its pod (from the watch or a
//! relist) and makes the session match it — bring a new incarnation up (probe its epmd, open
//! forwards), take a pod that stopped running down, or just note a readiness change. Pods are
//! reconciled concurrently (bounded), so a slow or failing pod never delays another's events,
//! and a newer observation cancels an attempt still in flight: the newest state wins.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{Semaphore, watch};

use super::{PodSource, Up, carrier::carrier, discover::discover};
use crate::{
    forward::registry::FamilyKey,
    k8s::{K8sError, pod::PodTarget},
};

/// What a watch or a (re)list said about a pod.
#[derive(Clone, Debug)]
pub enum Observation {
    Present(Box<Pod>),
    Gone,
}

/// How a pod's latest reconcile went (start-up waits for every pod's first one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attempt {
    Pending,
    Done,
    Failed(String),
}

/// Retry delays for a pod that should be reachable but is not (yet).
const RETRY_DELAYS: [u64; 6] = [1, 2, 4, 8, 16, 30];

struct Handle {
    observations: watch::Sender<Option<Observation>>,
    attempts: watch::Receiver<Attempt>,
    task: tokio::task::JoinHandle<()>,
}

/// The reconcilers of a session, by pod name.
pub struct Reconcilers {
    pods: Mutex<HashMap<String, Handle>>,
    /// Bounds how many pods are brought up at once (each costs port-forward upgrades).
    bringup: Arc<Semaphore>,
}

impl Reconcilers {
    pub fn new(concurrency: usize) -> Self {
        Reconcilers {
            pods: Mutex::new(HashMap::new()),
            bringup: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// Hands a pod's newest observation to its reconciler (started on first sight); returns a
    /// receiver of that pod's attempts.
    pub fn observe(
        &self,
        up: &Arc<Up>,
        name: &str,
        observation: Observation,
    ) -> watch::Receiver<Attempt> {
        let mut pods = self.pods.lock().unwrap();
        if let Some(h) = pods.get(name).filter(|h| !h.task.is_finished()) {
            h.observations.send_replace(Some(observation));
            return h.attempts.clone();
        }
        let (obs_tx, mut obs_rx) = watch::channel(Some(observation));
        obs_rx.mark_changed();
        let (att_tx, att_rx) = watch::channel(Attempt::Pending);
        let task = tokio::spawn(run(
            up.clone(),
            name.to_string(),
            obs_rx,
            att_tx,
            self.bringup.clone(),
        ));
        pods.insert(
            name.to_string(),
            Handle {
                observations: obs_tx,
                attempts: att_rx.clone(),
                task,
            },
        );
        att_rx
    }

    pub fn stop_all(&self) {
        for h in self.pods.lock().unwrap().values() {
            h.task.abort();
        }
    }
}

async fn run(
    up: Arc<Up>,
    name: String,
    mut observations: watch::Receiver<Option<Observation>>,
    attempts: watch::Sender<Attempt>,
    bringup: Arc<Semaphore>,
) {
    let mut failures = 0usize;
    while observations.changed().await.is_ok() {
        loop {
            let Some(observation) = observations.borrow_and_update().clone() else {
                break;
            };
            let outcome = tokio::select! {
                r = reconcile(&up, &name, &observation, &bringup) => Some(r),
                // A newer observation: drop this attempt and take that one.
                _ = observations.changed() => None,
            };
            match outcome {
                None => {
                    failures = 0;
                    continue;
                }
                Some(Ok(())) => {
                    failures = 0;
                    attempts.send_replace(Attempt::Done);
                    break;
                }
                Some(Err(e)) => {
                    let message = e.to_string();
                    let delay = RETRY_DELAYS[failures.min(RETRY_DELAYS.len() - 1)];
                    failures += 1;
                    // Before the session has started, start-up reports the failure itself.
                    if up.is_started() && (failures == 1 || failures.is_multiple_of(10)) {
                        log::warn!("{message}; retrying in {delay} s");
                    }
                    up.table.lock().unwrap().entry(&name).state = format!("unreachable: {message}");
                    attempts.send_replace(Attempt::Failed(message));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(delay)) => continue,
                        _ = observations.changed() => continue,
                    }
                }
            }
        }
    }
}

/// Makes the session match one observation of one pod.
async fn reconcile(
    up: &Arc<Up>,
    name: &str,
    observation: &Observation,
    bringup: &Semaphore,
) -> Result<(), K8sError> {
    let ns = &up.cluster.namespace;
    let by_name = matches!(up.config.source, PodSource::Names(_));
    let target = match observation {
        Observation::Gone => {
            take_down(up, name, "deleted".into());
            if !by_name {
                // A selector's pod may never come back (a Deployment's): its forwards go too.
                // A StatefulSet's pod that does come back gets them afresh.
                up.registry.retain(name, &BTreeSet::new()).await;
            }
            up.publisher.publish().await;
            return Ok(());
        }
        Observation::Present(pod) => match PodTarget::from_pod(pod, up.config.dist_port) {
            Ok(t) => t,
            Err(why) => {
                take_down(up, name, format!("not running: {why}"));
                up.publisher.publish().await;
                return Ok(());
            }
        },
    };
    let same = {
        let mut table = up.table.lock().unwrap();
        let entry = table.entry(name);
        match &mut entry.target {
            // The same incarnation at the same addresses: only readiness (or nothing) changed.
            // Readiness never touches redirects.
            Some(t) if t.uid == target.uid && t.ips == target.ips => {
                if t.ready != target.ready {
                    log::info!(
                        "pod {ns}/{name} is {}",
                        if target.ready {
                            "Ready"
                        } else {
                            "not Ready (still redirected: it is Running)"
                        }
                    );
                }
                *t = target.clone();
                true
            }
            _ => {
                if entry.target.is_none() {
                    entry.state = "starting".into();
                }
                false
            }
        }
    };
    if same {
        return Ok(());
    }
    let _permit = bringup.acquire().await.expect("never closed");
    let found = discover(&up.cluster, &target, &up.config.limits, true).await?;
    let (ports, nodes) = (found.ports.clone(), found.names(&target));
    let families: BTreeSet<FamilyKey> = target.ips.iter().map(FamilyKey::of_ip).collect();
    for port in &ports {
        let is_epmd = *port == target.epmd_port && !target.epmdless;
        let label = format!(
            "pod {ns}/{name} port {port} ({})",
            if is_epmd { "epmd" } else { "dist" }
        );
        up.registry
            .ensure(
                name,
                *port,
                &families,
                || carrier(up, name, *port, is_epmd),
                label,
            )
            .await
            .map_err(|e| K8sError::PortForward {
                pod: name.into(),
                port: *port,
                reason: e.to_string(),
            })?;
    }
    // Ports an earlier incarnation had (a random dist port before a restart) go.
    up.registry.retain(name, &ports).await;
    let before: Option<Vec<IpAddr>> = {
        let mut table = up.table.lock().unwrap();
        let before = table
            .get(name)
            .map(|e| e.last_ips.clone())
            .filter(|ips| !ips.is_empty());
        table.set_up(name, target.clone(), ports, nodes, Instant::now());
        let entry = table.entry(name);
        entry.dist = found.nodes;
        if let Observation::Present(pod) = observation {
            entry.object = Some(pod.clone());
        }
        before
    };
    up.publisher.publish().await;
    let ips = target
        .ips
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    match before {
        Some(old) if old != target.ips => log::info!(
            "pod {ns}/{name} moved from {} to {ips}; redirects updated (the old address keeps reaching it for {:?})",
            old.iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            super::table::ALIAS_TTL
        ),
        Some(_) => log::info!("pod {ns}/{name} was replaced; redirects updated"),
        None => {
            log::debug!("pod {ns}/{name} is up at {ips}");
            if !up.is_started() {
                let nodes = up.table.lock().unwrap().get(name).map(|e| e.nodes.join(", ")).unwrap_or_default();
                up.root.progress(format!("pod {name} is up at {ips} ({nodes})")).await;
            }
        }
    }
    Ok(())
}

fn take_down(up: &Up, name: &str, why: String) {
    let mut table = up.table.lock().unwrap();
    if table.get(name).is_some_and(|e| e.target.is_some()) {
        log::warn!(
            "pod {}/{name} is {why}; its redirects are removed until it runs again",
            up.cluster.namespace
        );
    }
    table.set_down(name, why, Instant::now());
}
