//! The simulated API server's object store: pods, services, statefulsets, secrets, configmaps
//! and namespaces, one global resourceVersion counter, and a **bounded** history of pod
//! events, as etcd and the API server's watch cache keep one.
//!
//! Events older than the history window (a count of events, or an age) are compacted: they
//! are folded into a base snapshot and can no longer be replayed. A watch that asks to
//! resume from a compacted resourceVersion is refused with 410 Expired, and a LIST asking
//! for an exact compacted resourceVersion too, as on a real cluster.
use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        core::v1::{ConfigMap, Pod, Secret, Service},
    },
    apimachinery::pkg::apis::meta::v1::Time,
};
use tokio::sync::broadcast;

#[derive(Clone, Debug)]
pub struct PodEvent {
    pub rv: u64,
    /// ADDED, MODIFIED or DELETED.
    pub kind: &'static str,
    pub pod: Pod,
}

/// How much event history the store keeps (what etcd's compaction and the watch cache's
/// capacity bound on a real cluster).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryWindow {
    /// Everything (the default; a watch can resume from any resourceVersion).
    Unlimited,
    /// The last N pod events.
    Events(usize),
    /// Events younger than this.
    Age(Duration),
}

/// Why a resourceVersion cannot be served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RvError {
    /// Older than the oldest retained event: (requested, oldest servable).
    TooOld(u64, u64),
    /// Newer than the store: (requested, current).
    TooLarge(u64, u64),
}

/// The most pod events kept even with `Unlimited` (hostile churn must not grow memory
/// without bound).
const HISTORY_CAP: usize = 100_000;

#[derive(Default)]
struct Inner {
    rv: u64,
    pods: BTreeMap<(String, String), Pod>,
    services: BTreeMap<(String, String), Service>,
    statefulsets: BTreeMap<(String, String), StatefulSet>,
    secrets: BTreeMap<(String, String), Secret>,
    configmaps: BTreeMap<(String, String), ConfigMap>,
    namespaces: BTreeSet<String>,
    /// Retained pod events (oldest first), with when they happened.
    history: VecDeque<(Instant, PodEvent)>,
    /// Every event with rv <= this is compacted away.
    compacted: u64,
    /// The pods as of `compacted` (the base the retained history applies to).
    base: BTreeMap<(String, String), Pod>,
}

pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<PodEvent>,
    window: Mutex<HistoryWindow>,
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

fn pod_key(p: &Pod) -> (String, String) {
    key(p.metadata.namespace.as_deref().unwrap_or("default"), p.metadata.name.as_deref().unwrap_or(""))
}

pub fn now() -> Time {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Time(k8s_openapi::jiff::Timestamp::new(d.as_secs() as i64, d.subsec_nanos() as i32).expect("timestamp in range"))
}

impl Inner {
    fn fold(&mut self, e: PodEvent) {
        let k = pod_key(&e.pod);
        if e.kind == "DELETED" {
            self.base.remove(&k);
        } else {
            self.base.insert(k, e.pod);
        }
        self.compacted = self.compacted.max(e.rv);
    }

    fn compact(&mut self, window: HistoryWindow) {
        let now = Instant::now();
        while let Some((at, _)) = self.history.front() {
            let drop = match window {
                HistoryWindow::Unlimited => self.history.len() > HISTORY_CAP,
                HistoryWindow::Events(n) => self.history.len() > n,
                HistoryWindow::Age(d) => now.duration_since(*at) > d || self.history.len() > HISTORY_CAP,
            };
            if !drop {
                break;
            }
            let (_, e) = self.history.pop_front().expect("front");
            self.fold(e);
        }
    }

    fn push(&mut self, e: PodEvent, window: HistoryWindow) {
        self.history.push_back((Instant::now(), e));
        self.compact(window);
    }
}

impl Store {
    pub fn new() -> Self {
        Self::with_window(HistoryWindow::Unlimited)
    }

    pub fn with_window(window: HistoryWindow) -> Self {
        let mut inner = Inner::default();
        for ns in ["default", "kube-public", "kube-system"] {
            inner.namespaces.insert(ns.into());
        }
        Store { inner: Mutex::new(inner), events: broadcast::channel(4096).0, window: Mutex::new(window) }
    }

    pub fn set_window(&self, window: HistoryWindow) {
        *self.window.lock().unwrap() = window;
        self.inner.lock().unwrap().compact(window);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let window = *self.window.lock().unwrap();
        let mut inner = self.inner.lock().unwrap();
        inner.compact(window);
        inner
    }

    /// Compacts every event so far (etcd compaction at the current revision): only the
    /// current resourceVersion can be watched from afterwards.
    pub fn compact_now(&self) -> u64 {
        let mut inner = self.inner.lock().unwrap();
        while let Some((_, e)) = inner.history.pop_front() {
            inner.fold(e);
        }
        let rv = inner.rv;
        inner.compacted = rv;
        rv
    }

    /// The oldest resourceVersion a watch can still resume from.
    pub fn oldest_resumable(&self) -> u64 {
        self.lock().compacted
    }

    pub fn add_namespace(&self, ns: &str) {
        self.lock().namespaces.insert(ns.into());
    }

    pub fn has_namespace(&self, ns: &str) -> bool {
        self.lock().namespaces.contains(ns)
    }

    pub fn namespaces(&self) -> Vec<String> {
        self.lock().namespaces.iter().cloned().collect()
    }

    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }

    /// Creates or replaces a pod, stamping resourceVersion (and uid/creationTimestamp when new).
    pub fn put_pod(&self, mut pod: Pod) -> Pod {
        let window = *self.window.lock().unwrap();
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        let rv = inner.rv;
        let ns = pod.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let existing = inner.pods.get(&key(&ns, &name)).cloned();
        let kind = if existing.is_some() { "MODIFIED" } else { "ADDED" };
        pod.metadata.namespace = Some(ns.clone());
        pod.metadata.resource_version = Some(rv.to_string());
        if pod.metadata.creation_timestamp.is_none() {
            pod.metadata.creation_timestamp = Some(existing.and_then(|p| p.metadata.creation_timestamp).unwrap_or_else(now));
        }
        inner.namespaces.insert(ns.clone());
        inner.pods.insert(key(&ns, &name), pod.clone());
        let event = PodEvent { rv, kind, pod: pod.clone() };
        inner.push(event.clone(), window);
        let _ = self.events.send(event);
        pod
    }

    /// Applies `f` to a stored pod and stores the result (a MODIFIED event). The check and
    /// the write are one step: a pod replaced in between (new uid) is not touched when `f`
    /// returns false.
    pub fn update_pod_if(&self, ns: &str, name: &str, f: impl FnOnce(&mut Pod) -> bool) -> Option<Pod> {
        let window = *self.window.lock().unwrap();
        let mut inner = self.inner.lock().unwrap();
        let mut pod = inner.pods.get(&key(ns, name)).cloned()?;
        if !f(&mut pod) {
            return None;
        }
        inner.rv += 1;
        let rv = inner.rv;
        pod.metadata.resource_version = Some(rv.to_string());
        inner.pods.insert(key(ns, name), pod.clone());
        let event = PodEvent { rv, kind: "MODIFIED", pod: pod.clone() };
        inner.push(event.clone(), window);
        let _ = self.events.send(event);
        Some(pod)
    }

    /// Applies `f` to a stored pod and stores the result (a MODIFIED event).
    pub fn update_pod(&self, ns: &str, name: &str, f: impl FnOnce(&mut Pod)) -> Option<Pod> {
        self.update_pod_if(ns, name, |p| {
            f(p);
            true
        })
    }

    pub fn delete_pod(&self, ns: &str, name: &str) -> Option<Pod> {
        let window = *self.window.lock().unwrap();
        let mut inner = self.inner.lock().unwrap();
        let mut pod = inner.pods.remove(&key(ns, name))?;
        inner.rv += 1;
        let rv = inner.rv;
        pod.metadata.resource_version = Some(rv.to_string());
        let event = PodEvent { rv, kind: "DELETED", pod: pod.clone() };
        inner.push(event.clone(), window);
        let _ = self.events.send(event);
        Some(pod)
    }

    pub fn get_pod(&self, ns: &str, name: &str) -> Option<Pod> {
        self.lock().pods.get(&key(ns, name)).cloned()
    }

    /// Pods in a namespace (None: all), with the list's resourceVersion.
    pub fn list_pods(&self, ns: Option<&str>) -> (Vec<Pod>, u64) {
        let inner = self.lock();
        let pods = inner.pods.iter().filter(|((n, _), _)| ns.is_none_or(|ns| ns == n)).map(|(_, p)| p.clone()).collect();
        (pods, inner.rv)
    }

    /// The pods exactly as they were at `rv` (a LIST with resourceVersionMatch=Exact, or the
    /// next page of a paginated LIST), rebuilt from the base snapshot and the retained events.
    pub fn list_pods_at(&self, ns: Option<&str>, rv: u64) -> Result<Vec<Pod>, RvError> {
        let inner = self.lock();
        if rv > inner.rv {
            return Err(RvError::TooLarge(rv, inner.rv));
        }
        if rv < inner.compacted {
            return Err(RvError::TooOld(rv, inner.compacted));
        }
        let mut state = inner.base.clone();
        for (_, e) in inner.history.iter().take_while(|(_, e)| e.rv <= rv) {
            if e.kind == "DELETED" {
                state.remove(&pod_key(&e.pod));
            } else {
                state.insert(pod_key(&e.pod), e.pod.clone());
            }
        }
        Ok(state.into_iter().filter(|((n, _), _)| ns.is_none_or(|ns| ns == n)).map(|(_, p)| p).collect())
    }

    /// Events after `rv` plus a receiver for the ones to come, taken atomically; refused when
    /// events after `rv` were compacted away or `rv` is in the future.
    pub fn watch_from(&self, rv: u64) -> Result<(Vec<PodEvent>, broadcast::Receiver<PodEvent>), RvError> {
        let inner = self.lock();
        if rv < inner.compacted {
            return Err(RvError::TooOld(rv, inner.compacted));
        }
        if rv > inner.rv {
            return Err(RvError::TooLarge(rv, inner.rv));
        }
        let past = inner.history.iter().filter(|(_, e)| e.rv > rv).map(|(_, e)| e.clone()).collect();
        Ok((past, self.events.subscribe()))
    }

    /// For a bookmark: the events already queued for `rx` and the store's resourceVersion,
    /// taken atomically (events are queued under the store lock, so once it is held every
    /// event up to the current resourceVersion is in `rx`).
    pub fn progress(&self, rx: &mut broadcast::Receiver<PodEvent>) -> (Vec<PodEvent>, u64, bool) {
        let inner = self.inner.lock().unwrap();
        let mut queued = Vec::new();
        let mut lagged = false;
        loop {
            match rx.try_recv() {
                Ok(e) => queued.push(e),
                Err(broadcast::error::TryRecvError::Lagged(_)) => lagged = true,
                Err(_) => break,
            }
        }
        (queued, inner.rv, lagged)
    }

    fn stamp(inner: &mut Inner, meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> (String, String) {
        inner.rv += 1;
        let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
        meta.namespace = Some(ns.clone());
        meta.resource_version = Some(inner.rv.to_string());
        meta.creation_timestamp.get_or_insert_with(now);
        meta.uid.get_or_insert_with(super::kubelet::uid);
        inner.namespaces.insert(ns.clone());
        (ns, meta.name.clone().unwrap_or_default())
    }

    pub fn put_service(&self, mut svc: Service) {
        let mut inner = self.lock();
        let k = Self::stamp(&mut inner, &mut svc.metadata);
        inner.services.insert(k, svc);
    }

    pub fn put_statefulset(&self, mut sts: StatefulSet) {
        let mut inner = self.lock();
        let k = Self::stamp(&mut inner, &mut sts.metadata);
        inner.statefulsets.insert(k, sts);
    }

    /// Stores a Secret as the API server does: `stringData` merged into `data`, type Opaque
    /// by default.
    pub fn put_secret(&self, mut secret: Secret) {
        let mut inner = self.lock();
        let k = Self::stamp(&mut inner, &mut secret.metadata);
        if let Some(sd) = secret.string_data.take() {
            let data = secret.data.get_or_insert_with(Default::default);
            for (key, v) in sd {
                data.insert(key, k8s_openapi::ByteString(v.into_bytes()));
            }
        }
        secret.type_.get_or_insert_with(|| "Opaque".into());
        inner.secrets.insert(k, secret);
    }

    pub fn put_configmap(&self, mut cm: ConfigMap) {
        let mut inner = self.lock();
        let k = Self::stamp(&mut inner, &mut cm.metadata);
        inner.configmaps.insert(k, cm);
    }

    pub fn get_statefulset(&self, ns: &str, name: &str) -> Option<StatefulSet> {
        self.lock().statefulsets.get(&key(ns, name)).cloned()
    }

    pub fn get_service(&self, ns: &str, name: &str) -> Option<Service> {
        self.lock().services.get(&key(ns, name)).cloned()
    }

    pub fn list_services(&self, ns: Option<&str>) -> (Vec<Service>, u64) {
        let inner = self.lock();
        let svcs = inner.services.iter().filter(|((n, _), _)| ns.is_none_or(|ns| ns == n)).map(|(_, s)| s.clone()).collect();
        (svcs, inner.rv)
    }

    pub fn get_secret(&self, ns: &str, name: &str) -> Option<Secret> {
        self.lock().secrets.get(&key(ns, name)).cloned()
    }

    pub fn list_secrets(&self, ns: Option<&str>) -> (Vec<Secret>, u64) {
        let inner = self.lock();
        let v = inner.secrets.iter().filter(|((n, _), _)| ns.is_none_or(|ns| ns == n)).map(|(_, s)| s.clone()).collect();
        (v, inner.rv)
    }

    pub fn get_configmap(&self, ns: &str, name: &str) -> Option<ConfigMap> {
        self.lock().configmaps.get(&key(ns, name)).cloned()
    }

    pub fn list_configmaps(&self, ns: Option<&str>) -> (Vec<ConfigMap>, u64) {
        let inner = self.lock();
        let v = inner.configmaps.iter().filter(|((n, _), _)| ns.is_none_or(|ns| ns == n)).map(|(_, s)| s.clone()).collect();
        (v, inner.rv)
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn pod(name: &str) -> Pod {
        Pod { metadata: ObjectMeta { name: Some(name.into()), namespace: Some("default".into()), ..Default::default() }, ..Default::default() }
    }

    #[test]
    fn compaction_refuses_old_resource_versions_and_rebuilds_exact_lists() {
        let store = Store::with_window(HistoryWindow::Events(2));
        let a = store.put_pod(pod("a"));
        let rv_a: u64 = a.metadata.resource_version.unwrap().parse().unwrap();
        store.put_pod(pod("b"));
        assert!(store.watch_from(rv_a - 1).is_ok(), "two events kept");
        store.delete_pod("default", "a");
        assert_eq!(store.watch_from(rv_a - 1).err(), Some(RvError::TooOld(rv_a - 1, rv_a)));
        let (past, _) = store.watch_from(rv_a).unwrap();
        assert_eq!(past.len(), 2);
        assert_eq!(store.list_pods_at(None, rv_a + 1).unwrap().len(), 2, "a and b before a's deletion");
        assert!(matches!(store.list_pods_at(None, rv_a - 1), Err(RvError::TooOld(..))));
        let now = store.compact_now();
        assert!(store.watch_from(now - 1).is_err() && store.watch_from(now).is_ok());
        assert!(matches!(store.watch_from(now + 5), Err(RvError::TooLarge(..))));
    }

    #[test]
    fn events_older_than_the_age_window_are_compacted() {
        let store = Store::with_window(HistoryWindow::Age(Duration::from_millis(100)));
        let rv: u64 = store.put_pod(pod("a")).metadata.resource_version.unwrap().parse().unwrap();
        assert!(store.watch_from(rv - 1).is_ok(), "young enough");
        crate::wait_until("the event to age out", Duration::from_secs(5), || store.watch_from(rv - 1).is_err()).unwrap();
        assert_eq!(store.oldest_resumable(), rv);
        assert_eq!(store.list_pods_at(None, rv).unwrap().len(), 1, "the compacted state is still listable at its version");
    }
}
