//! One reconciler per pod: it takes the newest observation of its pod (from the watch or a
//! relist) and makes the session match it — bring a new incarnation up (probe its epmd, open
//! forwards), take a pod that stopped running down, or just note a readiness change. Pods are
//! reconciled concurrently (bounded), so a slow or failing pod never delays another's events,
//! and a newer observation cancels an attempt still in flight: the newest state wins.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{Semaphore, watch};

use super::{Up, carrier::carrier, discover::discover, table::PodTable};
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
    /// The newest observation, numbered.
    observations: watch::Sender<Option<(u64, Observation)>>,
    /// The number of the newest observation sent.
    sent: u64,
    /// The number of the last observation the reconciler finished with.
    done: Arc<AtomicU64>,
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
        if let Some(h) = pods.get_mut(name).filter(|h| !h.task.is_finished()) {
            h.sent += 1;
            h.observations.send_replace(Some((h.sent, observation)));
            return h.attempts.clone();
        }
        let (obs_tx, mut obs_rx) = watch::channel(Some((1, observation)));
        obs_rx.mark_changed();
        let (att_tx, att_rx) = watch::channel(Attempt::Pending);
        let done = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(
            up.clone(),
            name.to_string(),
            obs_rx,
            att_tx,
            done.clone(),
            self.bringup.clone(),
        ));
        pods.insert(
            name.to_string(),
            Handle {
                observations: obs_tx,
                sent: 1,
                done,
                attempts: att_rx.clone(),
                task,
            },
        );
        att_rx
    }

    /// Forgets the pods that are gone for good: deleted (the newest observation), that very
    /// observation reconciled (not an earlier one), and their names no longer held nor their
    /// old addresses aliased. Their reconciler ends and their table entry goes, so a session
    /// that follows a Deployment through many rollouts does not keep every pod it ever saw. A pod that comes back under
    /// the same name (a StatefulSet's) gets a new reconciler from its next observation. Pods
    /// named on the command line are kept: `status` shows them as deleted. Returns how many went.
    pub fn forget_gone(&self, table: &mut PodTable) -> usize {
        let mut pods = self.pods.lock().unwrap();
        let gone: Vec<String> = pods
            .iter()
            .filter(|(name, h)| {
                matches!(*h.observations.borrow(), Some((_, Observation::Gone)))
                    && h.done.load(Ordering::SeqCst) == h.sent
                    && table.get(name).is_none_or(|e| {
                        e.target.is_none() && e.held_names.is_none() && e.aliases.is_empty()
                    })
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            // Dropping the sender ends the idle reconciler (its `changed()` fails); observe()
            // takes this same lock, so no observation slips in between.
            pods.remove(name);
            table.remove(name);
        }
        gone.len()
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
    mut observations: watch::Receiver<Option<(u64, Observation)>>,
    attempts: watch::Sender<Attempt>,
    done: Arc<AtomicU64>,
    bringup: Arc<Semaphore>,
) {
    let mut failures = 0usize;
    while observations.changed().await.is_ok() {
        loop {
            let Some((number, observation)) = observations.borrow_and_update().clone() else {
                break;
            };
            let this = incarnation(&observation);
            let attempt = reconcile(&up, &name, &observation, &bringup);
            tokio::pin!(attempt);
            // A newer observation of another incarnation (or of the pod gone or stopped) drops
            // this attempt. One of the same incarnation at the same addresses (readiness,
            // labels, annotations) lets it finish and is taken after it: a pod whose readiness
            // flaps faster than a bring-up takes must still come up.
            let mut newer = false;
            let outcome = loop {
                tokio::select! {
                    r = &mut attempt => break Some(r),
                    changed = observations.changed() => {
                        // The sender gone: this pod was forgotten, or the session ends.
                        if changed.is_err() {
                            return;
                        }
                        newer = true;
                        let latest = observations.borrow().as_ref().and_then(|(_, o)| incarnation(o));
                        if !same_incarnation(&this, &latest) {
                            break None;
                        }
                    }
                }
            };
            match outcome {
                None => {
                    failures = 0;
                    continue;
                }
                Some(Ok(())) => {
                    failures = 0;
                    done.store(number, Ordering::SeqCst);
                    attempts.send_replace(Attempt::Done);
                    if newer {
                        continue;
                    }
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
                    if newer {
                        // A newer observation came in during the attempt: take it now.
                        continue;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(delay)) => continue,
                        changed = observations.changed() => {
                            if changed.is_err() {
                                return;
                            }
                            continue;
                        }
                    }
                }
            }
        }
    }
}

/// What identifies the running incarnation an observation shows (uid, addresses, ports),
/// readiness left out; None when the pod is gone or not running. Two observations with the
/// same one differ only in readiness or metadata, which an attempt in flight need not restart
/// for.
fn incarnation(observation: &Observation) -> Option<PodTarget> {
    let Observation::Present(pod) = observation else { return None };
    let target = PodTarget::from_pod(pod, None).ok()?;
    Some(PodTarget { ready: false, ..target })
}

/// Whether an attempt for incarnation `this` goes on after an observation of `latest`.
fn same_incarnation(this: &Option<PodTarget>, latest: &Option<PodTarget>) -> bool {
    this.is_some() && latest == this
}

/// Makes the session match one observation of one pod.
async fn reconcile(
    up: &Arc<Up>,
    name: &str,
    observation: &Observation,
    bringup: &Semaphore,
) -> Result<(), K8sError> {
    let ns = &up.cluster.namespace;
    let by_name = up.config.source.by_name();
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(uid: &str, ip: &str, ready: bool) -> Observation {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1", "namespace": "default", "uid": uid},
            "spec": {"containers": [{"name": "app", "image": "erlang:27"}]},
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]
            }
        }))
        .unwrap();
        Observation::Present(Box::new(pod))
    }

    fn same(current: &Observation, newer: Option<&Observation>) -> bool {
        same_incarnation(&incarnation(current), &newer.and_then(incarnation))
    }

    #[test]
    fn only_a_new_incarnation_or_address_restarts_an_attempt() {
        let now = pod("u1", "10.0.0.5", false);
        assert!(same(&now, Some(&pod("u1", "10.0.0.5", true))), "readiness only");
        assert!(!same(&now, Some(&pod("u2", "10.0.0.5", false))), "a new pod");
        assert!(!same(&now, Some(&pod("u1", "10.0.0.6", false))), "a new address");
        assert!(!same(&now, Some(&Observation::Gone)));
        assert!(!same(&Observation::Gone, Some(&now)));
        let Observation::Present(mut stopping) = pod("u1", "10.0.0.5", true) else { unreachable!() };
        stopping.status.as_mut().unwrap().phase = Some("Succeeded".into());
        assert!(!same(&now, Some(&Observation::Present(stopping))), "stopped");
    }

    /// A handle whose reconciler was sent observations 1..=`sent`, the last one `observation`,
    /// and finished with number `done`.
    fn handle(observation: Observation, sent: u64, done: u64) -> Handle {
        let (observations, _) = watch::channel(Some((sent, observation)));
        let (_, attempts) = watch::channel(Attempt::Done);
        Handle { observations, sent, done: Arc::new(AtomicU64::new(done)), attempts, task: tokio::spawn(async {}) }
    }

    #[tokio::test]
    async fn deleted_pods_are_forgotten_once_their_names_are_no_longer_held() {
        let r = Reconcilers::new(1);
        let mut table = PodTable::default();
        let now = Instant::now();
        for name in ["gone", "held", "retrying", "running"] {
            table.set_up(name, PodTarget::for_test(name, &["10.0.0.5"]), BTreeSet::new(), vec![], now);
        }
        // Deleted, reconciled, names expired: forgotten.
        table.set_down("gone", "deleted".into(), now);
        table.set_down("retrying", "deleted".into(), now);
        table.expire_aliases(now + super::super::table::NAME_HOLD + Duration::from_secs(1));
        // Deleted but its names are still held at its last address: kept for now.
        table.set_down("held", "deleted".into(), now + Duration::from_secs(10));
        {
            let mut pods = r.pods.lock().unwrap();
            pods.insert("gone".into(), handle(Observation::Gone, 3, 3));
            pods.insert("held".into(), handle(Observation::Gone, 2, 2));
            // Done with an earlier observation, not yet with the deletion: kept.
            pods.insert("retrying".into(), handle(Observation::Gone, 2, 1));
            pods.insert("running".into(), handle(pod("u1", "10.0.0.5", true), 1, 1));
        }
        assert_eq!(r.forget_gone(&mut table), 1);
        assert!(table.get("gone").is_none());
        assert_eq!(table.names(), ["held", "retrying", "running"]);
        let mut left: Vec<_> = r.pods.lock().unwrap().keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["held", "retrying", "running"]);
        // Once its names go too, the other deleted pod follows.
        table.expire_aliases(now + Duration::from_secs(10) + super::super::table::NAME_HOLD + Duration::from_secs(1));
        assert_eq!(r.forget_gone(&mut table), 1);
        assert_eq!(table.names(), ["retrying", "running"]);
    }
}
