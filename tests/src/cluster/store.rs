//! The simulated API server's object store: pods, services and namespaces, one global
//! resourceVersion counter, and a history of pod events so watches can resume from any
//! resourceVersion (as etcd does within its compaction window).
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        core::v1::{Pod, Service},
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

#[derive(Default)]
struct Inner {
    rv: u64,
    pods: BTreeMap<(String, String), Pod>,
    services: BTreeMap<(String, String), Service>,
    statefulsets: BTreeMap<(String, String), StatefulSet>,
    namespaces: BTreeSet<String>,
    history: Vec<PodEvent>,
}

pub struct Store {
    inner: Mutex<Inner>,
    events: broadcast::Sender<PodEvent>,
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

pub fn now() -> Time {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Time(k8s_openapi::jiff::Timestamp::new(d.as_secs() as i64, d.subsec_nanos() as i32).expect("timestamp in range"))
}

impl Store {
    pub fn new() -> Self {
        let mut inner = Inner::default();
        for ns in ["default", "kube-system"] {
            inner.namespaces.insert(ns.into());
        }
        Store { inner: Mutex::new(inner), events: broadcast::channel(4096).0 }
    }

    pub fn add_namespace(&self, ns: &str) {
        self.inner.lock().unwrap().namespaces.insert(ns.into());
    }

    pub fn has_namespace(&self, ns: &str) -> bool {
        self.inner.lock().unwrap().namespaces.contains(ns)
    }

    pub fn namespaces(&self) -> Vec<String> {
        self.inner.lock().unwrap().namespaces.iter().cloned().collect()
    }

    pub fn resource_version(&self) -> u64 {
        self.inner.lock().unwrap().rv
    }

    /// Creates or replaces a pod, stamping resourceVersion (and uid/creationTimestamp when new).
    pub fn put_pod(&self, mut pod: Pod) -> Pod {
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
        inner.history.push(event.clone());
        let _ = self.events.send(event);
        pod
    }

    /// Applies `f` to a stored pod and stores the result (a MODIFIED event).
    pub fn update_pod(&self, ns: &str, name: &str, f: impl FnOnce(&mut Pod)) -> Option<Pod> {
        let mut pod = self.get_pod(ns, name)?;
        f(&mut pod);
        Some(self.put_pod(pod))
    }

    pub fn delete_pod(&self, ns: &str, name: &str) -> Option<Pod> {
        let mut inner = self.inner.lock().unwrap();
        let mut pod = inner.pods.remove(&key(ns, name))?;
        inner.rv += 1;
        let rv = inner.rv;
        pod.metadata.resource_version = Some(rv.to_string());
        let event = PodEvent { rv, kind: "DELETED", pod: pod.clone() };
        inner.history.push(event.clone());
        let _ = self.events.send(event);
        Some(pod)
    }

    pub fn get_pod(&self, ns: &str, name: &str) -> Option<Pod> {
        self.inner.lock().unwrap().pods.get(&key(ns, name)).cloned()
    }

    /// Pods in a namespace (None: all), with the list's resourceVersion.
    pub fn list_pods(&self, ns: Option<&str>) -> (Vec<Pod>, u64) {
        let inner = self.inner.lock().unwrap();
        let pods = inner.pods.iter().filter(|((n, _), _)| ns.is_none_or(|ns| ns == n)).map(|(_, p)| p.clone()).collect();
        (pods, inner.rv)
    }

    /// Events after `rv` plus a receiver for the ones to come, taken atomically.
    pub fn watch_from(&self, rv: u64) -> (Vec<PodEvent>, broadcast::Receiver<PodEvent>) {
        let inner = self.inner.lock().unwrap();
        let past = inner.history.iter().filter(|e| e.rv > rv).cloned().collect();
        (past, self.events.subscribe())
    }

    pub fn put_service(&self, mut svc: Service) {
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        let ns = svc.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        svc.metadata.namespace = Some(ns.clone());
        svc.metadata.resource_version = Some(inner.rv.to_string());
        svc.metadata.creation_timestamp.get_or_insert_with(now);
        inner.namespaces.insert(ns.clone());
        inner.services.insert(key(&ns, svc.metadata.name.as_deref().unwrap_or_default()), svc);
    }

    pub fn put_statefulset(&self, mut sts: StatefulSet) {
        let mut inner = self.inner.lock().unwrap();
        inner.rv += 1;
        let ns = sts.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        sts.metadata.resource_version = Some(inner.rv.to_string());
        sts.metadata.creation_timestamp.get_or_insert_with(now);
        inner.statefulsets.insert(key(&ns, sts.metadata.name.as_deref().unwrap_or_default()), sts);
    }

    pub fn get_statefulset(&self, ns: &str, name: &str) -> Option<StatefulSet> {
        self.inner.lock().unwrap().statefulsets.get(&key(ns, name)).cloned()
    }

    pub fn get_service(&self, ns: &str, name: &str) -> Option<Service> {
        self.inner.lock().unwrap().services.get(&key(ns, name)).cloned()
    }

    pub fn list_services(&self, ns: Option<&str>) -> (Vec<Service>, u64) {
        let inner = self.inner.lock().unwrap();
        let svcs = inner.services.iter().filter(|((n, _), _)| ns.is_none_or(|ns| ns == n)).map(|(_, s)| s.clone()).collect();
        (svcs, inner.rv)
    }
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}
