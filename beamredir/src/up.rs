//! `beamredir up`: pods → port-forwards → redirects, kept in step with the pods.
//!
//! Pods come from names (`--pod`), a StatefulSet, a label selector or a Service. For each pod
//! that is Running and Ready, beamredir opens a local forward per Erlang port and redirects
//! `POD_IP:PORT` to it. Ports come from the pod spec and from the pod's epmd. At start-up a
//! NAMES request lists every registered node's port. Later, the epmd forward watches the
//! PORT2_RESP answers passing through it: a distribution port without a redirect gets its forward
//! and map entry *before* the answer reaches the local node, so random ports and ranges need no
//! flags. Watches follow the pods. A deleted pod loses its redirects. A pod back with a new IP
//! gets them again. A new pod matching the selector is added. The forwards stay, since
//! port-forwards address pods by name. The cluster DNS names of the pods go into a hosts file that
//! local nodes read through ERL_INETRC ([`crate::dns`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};

use crate::{
    dns::{self, DnsFiles, PodNames},
    epmd::{EpmdConversation, Event},
    forward::{Carrier, ConnStats, Forward},
    k8s::{
        Cluster, K8sError,
        pod::{self, PodTarget},
        portforward::{self, Ended, Inspector},
    },
    mapping::Mapping,
    session::{ActiveSession, PodInfo, SessionStatus},
};

/// Which pods a session follows.
#[derive(Clone, Debug)]
pub enum PodSource {
    Names(Vec<String>),
    StatefulSet(String),
    Selector(String),
    Service(String),
}

#[derive(Clone, Debug)]
pub struct UpConfig {
    pub source: PodSource,
    /// `--dist-port`: overrides what the pod spec says.
    pub dist_port: Option<u16>,
    /// For cluster DNS names (`cluster.local` unless told otherwise).
    pub cluster_domain: String,
}

/// What `up` keeps per pod.
#[derive(Default)]
struct PodState {
    target: Option<PodTarget>,
    /// "Running", "not ready: …", "deleted".
    state: String,
    /// Pod port → local forward. Every forward is a redirect while the pod is up.
    forwards: BTreeMap<u16, Forward>,
}

struct Inner {
    cluster: Cluster,
    config: UpConfig,
    /// The label selector, for sources other than names.
    selector: Option<String>,
    pods: Mutex<BTreeMap<String, PodState>>,
    session: Mutex<Weak<Mutex<ActiveSession>>>,
    dns: Mutex<Option<DnsFiles>>,
    /// Set at teardown: late connection tasks must not rewrite the map or the DNS files.
    closed: AtomicBool,
}

/// How long one NAMES probe through a port-forward may take, upgrade included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// Retries of a pod that failed to come up although Kubernetes says it is ready.
const RETRY_DELAYS: [u64; 6] = [1, 2, 4, 8, 16, 30];

/// All pods of an `up` session, shared by the watches, the epmd forwards and `status`.
#[derive(Clone)]
pub struct Pods(Arc<Inner>);

impl Pods {
    /// Resolves the pods and opens their forwards. Nothing is attached yet, so a failure here
    /// leaves nothing behind (the listeners close when the forwards drop).
    pub async fn resolve(cluster: Cluster, config: UpConfig) -> Result<Self, K8sError> {
        let ns = cluster.namespace.clone();
        let (selector, what) = match &config.source {
            PodSource::Names(_) => (None, String::new()),
            PodSource::StatefulSet(name) => (Some(pod::statefulset_selector(&cluster, name).await?), format!("statefulset {name}")),
            PodSource::Service(name) => (Some(pod::service_selector(&cluster, name).await?), format!("service {name}")),
            PodSource::Selector(sel) => (Some(sel.clone()), format!("selector {sel:?}")),
        };
        let pods = Pods(Arc::new(Inner {
            cluster: cluster.clone(),
            config: config.clone(),
            selector: selector.clone(),
            pods: Mutex::new(BTreeMap::new()),
            session: Mutex::new(Weak::new()),
            dns: Mutex::new(None),
            closed: AtomicBool::new(false),
        }));
        match (&config.source, selector) {
            (PodSource::Names(names), _) => {
                // Named pods must all be usable: say exactly what is wrong with each.
                for name in names {
                    let found = pod::get(&cluster, name).await?;
                    let target = PodTarget::from_pod(&found, config.dist_port)?;
                    pods.bring_up(name, target, true).await?;
                }
            }
            (_, Some(selector)) => {
                let found = pod::list(&cluster, &selector).await?;
                if found.is_empty() {
                    return Err(K8sError::NoPods { what: format!("{what} (selector {selector})"), namespace: ns });
                }
                // Of a set, the usable pods are enough; the others are followed until they are.
                let mut last_error = None;
                for p in &found {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let result = match PodTarget::from_pod(p, config.dist_port) {
                        Ok(target) => pods.bring_up(&name, target, true).await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = result {
                        log::warn!("{e}; following pod {name} until it is ready");
                        pods.set_down(&name, describe_down(&e));
                        last_error = Some(e);
                    }
                }
                if pods.targets().is_empty() {
                    return Err(last_error.expect("at least one pod failed"));
                }
            }
            (_, None) => unreachable!("every non-name source has a selector"),
        }
        Ok(pods)
    }

    pub fn cluster(&self) -> &Cluster {
        &self.0.cluster
    }

    /// Probes the pod's epmd (one NAMES round trip through a real port-forward), opens the
    /// forwards it needs and records it as up. `strict`: a pod with no known dist port is an
    /// error (at start-up) rather than a warning (when it comes back).
    async fn bring_up(&self, name: &str, mut target: PodTarget, strict: bool) -> Result<(), K8sError> {
        let registered = tokio::time::timeout(PROBE_TIMEOUT, portforward::epmd_names(&self.0.cluster, name, target.epmd_port))
            .await
            .map_err(|_| K8sError::PortForward { pod: name.into(), port: target.epmd_port, reason: format!("no answer within {PROBE_TIMEOUT:?}") })??;
        let short = target.node_name.as_deref().and_then(|n| n.split('@').next()).map(str::to_string);
        if target.dist_port.is_none() {
            target.dist_port = match &short {
                Some(short) => registered.iter().find(|(n, _)| n == short).map(|(_, p)| *p),
                None if registered.len() == 1 => Some(registered[0].1),
                None => None,
            };
        }
        if strict && target.dist_port.is_none() && registered.is_empty() {
            return Err(K8sError::NoDistPort { name: target.name.clone(), namespace: target.namespace.clone() });
        }
        let mut ports: BTreeSet<u16> = registered.iter().map(|(_, p)| *p).collect();
        ports.insert(target.epmd_port);
        ports.extend(target.dist_port);
        self.ensure_forwards(name, &target, &ports).await?;
        let mut pods = self.0.pods.lock().unwrap();
        let state = pods.entry(name.to_string()).or_default();
        // Ports an earlier incarnation had (e.g. a random dist port before a restart) go.
        state.forwards.retain(|port, _| ports.contains(port));
        state.target = Some(target);
        state.state = "Running".into();
        Ok(())
    }

    fn set_down(&self, name: &str, why: String) {
        let mut pods = self.0.pods.lock().unwrap();
        let state = pods.entry(name.to_string()).or_default();
        state.target = None;
        state.state = why;
    }

    /// Opens a forward for each of `ports` the pod does not have yet. The lock is not held
    /// while listening, so a port learned concurrently is opened once (the loser is dropped).
    async fn ensure_forwards(&self, name: &str, target: &PodTarget, ports: &BTreeSet<u16>) -> Result<(), K8sError> {
        let missing: Vec<u16> = {
            let pods = self.0.pods.lock().unwrap();
            let have = pods.get(name).map(|s| s.forwards.keys().copied().collect()).unwrap_or_else(BTreeSet::new);
            ports.difference(&have).copied().collect()
        };
        for port in missing {
            let is_epmd = port == target.epmd_port;
            let label = format!("pod {}/{name} port {port} ({})", target.namespace, if is_epmd { "epmd" } else { "dist" });
            let forward = Forward::start(label, port, self.carrier(name, port, is_epmd))
                .await
                .map_err(|e| K8sError::PortForward { pod: name.into(), port, reason: format!("listening on 127.0.0.1: {e}") })?;
            self.0.pods.lock().unwrap().entry(name.to_string()).or_default().forwards.entry(port).or_insert(forward);
        }
        Ok(())
    }

    /// The redirects for every pod that is up: POD_IP:PORT → its forward, for every forward.
    pub fn mappings(&self) -> Vec<Mapping> {
        let pods = self.0.pods.lock().unwrap();
        pods.values()
            .filter_map(|s| Some((s.target.as_ref()?, s)))
            .flat_map(|(t, s)| s.forwards.iter().map(|(port, f)| Mapping { pod: SocketAddrV4::new(t.ip, *port), local: f.local }))
            .collect()
    }

    pub fn targets(&self) -> Vec<PodTarget> {
        self.0.pods.lock().unwrap().values().filter_map(|s| s.target.clone()).collect()
    }

    /// The cluster DNS names of the pods that are up.
    fn dns_names(&self) -> Vec<PodNames> {
        let ns = &self.0.cluster.namespace;
        self.targets()
            .iter()
            .filter_map(|t| dns::pod_names(t.hostname.as_deref(), t.subdomain.as_deref(), ns, &self.0.config.cluster_domain, t.ip))
            .collect()
    }

    /// Writes the session's inetrc and hosts file and keeps them up to date from now on.
    pub fn write_dns(&self, files: DnsFiles) -> std::io::Result<()> {
        files.write(&self.dns_names())?;
        *self.0.dns.lock().unwrap() = Some(files);
        Ok(())
    }

    /// Rewrites the redirects (and DNS names) from the current pod states. The mappings are
    /// computed while the session is locked, so concurrent refreshes apply in order and none
    /// undoes a newer one (lock order: session, then pods).
    fn refresh(&self) {
        if self.0.closed.load(Ordering::SeqCst) {
            return;
        }
        let session = self.0.session.lock().unwrap().upgrade();
        if let Some(session) = session {
            let mut session = session.lock().unwrap();
            if let Err(e) = session.set_redirects(self.mappings()) {
                log::warn!("updating redirects: {e}");
            }
        }
        if let Some(files) = self.0.dns.lock().unwrap().as_ref() {
            if let Err(e) = files.write(&self.dns_names()) {
                log::warn!("writing {}: {e}", files.hosts.display());
            }
        }
    }

    /// Teardown: from now on nothing rewrites the map or the DNS files.
    pub fn close(&self) {
        self.0.closed.store(true, Ordering::SeqCst);
        self.0.dns.lock().unwrap().take();
    }

    /// Whether the session's map redirects `addr` now.
    fn is_redirected(&self, addr: SocketAddrV4) -> bool {
        let session = self.0.session.lock().unwrap().upgrade();
        session.is_some_and(|s| s.lock().unwrap().record().redirects.iter().any(|m| m.pod == addr))
    }

    /// Adds pod states and forward counters to a session status.
    pub fn decorate(&self, status: &mut SessionStatus) {
        let pods = self.0.pods.lock().unwrap();
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
                namespace: self.0.cluster.namespace.clone(),
                ip: s.target.as_ref().map(|t| t.ip.to_string()),
                state: s.state.clone(),
                node: s.target.as_ref().and_then(|t| t.node_name.clone()),
            })
            .collect();
    }

    /// Starts following the pods for `session`. Runs until the returned tasks are aborted.
    pub fn follow(&self, session: &Arc<Mutex<ActiveSession>>) -> Vec<tokio::task::JoinHandle<()>> {
        *self.0.session.lock().unwrap() = Arc::downgrade(session);
        // Whatever was learned between start-up and now (e.g. a dist port) goes into the map.
        self.refresh();
        let api: Api<Pod> = Api::namespaced(self.0.cluster.client.clone(), &self.0.cluster.namespace);
        // One watch per named pod (covering just that name), or one for the selector
        // (covering every pod it finds: an empty list means "all").
        let watches: Vec<(watcher::Config, Vec<String>)> = match (&self.0.config.source, &self.0.selector) {
            (PodSource::Names(names), _) => {
                names.iter().map(|n| (watcher::Config::default().fields(&format!("metadata.name={n}")), vec![n.clone()])).collect()
            }
            (_, Some(selector)) => vec![(watcher::Config::default().labels(selector), Vec::new())],
            (_, None) => Vec::new(),
        };
        watches
            .into_iter()
            .map(|(config, covered)| {
                let (pods, api) = (self.clone(), api.clone());
                tokio::spawn(async move {
                    let mut events = watcher(api, config).default_backoff().boxed();
                    // Pods seen during a (re)list: any known pod missing from it was deleted
                    // while the watch was down.
                    let mut relisted: Option<BTreeSet<String>> = None;
                    while let Some(event) = events.next().await {
                        match event {
                            Ok(watcher::Event::Init) => relisted = Some(BTreeSet::new()),
                            Ok(watcher::Event::InitApply(p)) => {
                                if let (Some(seen), Some(name)) = (relisted.as_mut(), p.metadata.name.clone()) {
                                    seen.insert(name);
                                }
                                pods.observe(&p, false).await
                            }
                            Ok(watcher::Event::InitDone) => {
                                let seen = relisted.take().unwrap_or_default();
                                for name in pods.known(&covered).into_iter().filter(|n| !seen.contains(n)) {
                                    pods.observe_gone(&name).await;
                                }
                            }
                            Ok(watcher::Event::Apply(p)) => pods.observe(&p, false).await,
                            Ok(watcher::Event::Delete(p)) => pods.observe(&p, true).await,
                            Err(e) => log::warn!("watching pods in {}: {e} (retrying)", pods.0.cluster.namespace),
                        }
                    }
                })
            })
            .collect()
    }

    /// Known pods among `names` (all known pods if `names` is empty).
    fn known(&self, names: &[String]) -> Vec<String> {
        let pods = self.0.pods.lock().unwrap();
        pods.keys().filter(|k| names.is_empty() || names.contains(k)).cloned().collect()
    }

    /// A pod that vanished without a Delete event (missed while the watch was down).
    async fn observe_gone(&self, name: &str) {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.to_string());
        self.observe(&pod, true).await;
    }

    /// Retries bringing a pod up after `RETRY_DELAYS`, while Kubernetes still says it is
    /// ready and beamredir still has it down.
    fn schedule_retry(&self, name: String, attempt: usize) {
        let Some(delay) = RETRY_DELAYS.get(attempt).copied() else {
            log::warn!("pod {}/{name}: giving up after {attempt} retries; it is retried when it changes", self.0.cluster.namespace);
            return;
        };
        let pods = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(delay)).await;
            if pods.0.closed.load(Ordering::SeqCst) || pods.0.pods.lock().unwrap().get(&name).is_some_and(|s| s.target.is_some()) {
                return;
            }
            let api: Api<Pod> = Api::namespaced(pods.0.cluster.client.clone(), &pods.0.cluster.namespace);
            if let Ok(Some(pod)) = api.get_opt(&name).await {
                if let Ok(target) = PodTarget::from_pod(&pod, pods.0.config.dist_port) {
                    match pods.bring_up(&name, target, false).await {
                        Ok(()) => {
                            log::info!("pod {}/{name} is up after a retry", pods.0.cluster.namespace);
                            pods.refresh();
                        }
                        Err(e) => {
                            log::warn!("{e} (retry {} of {})", attempt + 1, RETRY_DELAYS.len());
                            pods.schedule_retry(name, attempt + 1);
                        }
                    }
                }
            }
        });
    }

    /// Applies one observation of a pod to the forwards, the map and the DNS names.
    async fn observe(&self, pod: &Pod, deleted: bool) {
        if self.0.closed.load(Ordering::SeqCst) {
            return;
        }
        let Some(name) = pod.metadata.name.clone() else { return };
        let ns = &self.0.cluster.namespace;
        let before = self.0.pods.lock().unwrap().get(&name).and_then(|s| s.target.clone());
        let observed = if deleted { Err("deleted".to_string()) } else { PodTarget::from_pod(pod, self.0.config.dist_port).map_err(|e| describe_down(&e)) };
        match observed {
            Ok(target) => {
                let unchanged = before.as_ref().is_some_and(|b| (b.ip, &b.uid) == (target.ip, &target.uid));
                if unchanged {
                    return;
                }
                let ip = target.ip;
                match self.bring_up(&name, target, false).await {
                    Ok(()) => match &before {
                        Some(old) if old.ip != ip => log::info!("pod {ns}/{name} moved from {} to {ip}; redirects updated", old.ip),
                        Some(_) => log::info!("pod {ns}/{name} was replaced; redirects updated"),
                        None => log::info!("pod {ns}/{name} is up at {ip}; redirects added"),
                    },
                    Err(e) => {
                        log::warn!("{e}; retrying");
                        self.set_down(&name, describe_down(&e));
                        self.schedule_retry(name.clone(), 0);
                    }
                }
            }
            Err(why) => {
                if before.is_some() {
                    log::warn!("pod {ns}/{name} is {why}; its redirects are removed until it is back");
                }
                let by_name = matches!(self.0.config.source, PodSource::Names(_));
                if deleted && !by_name {
                    // A selector's pod may never come back (e.g. a Deployment's): drop its
                    // forwards too. A StatefulSet's pod that does is set up afresh.
                    self.0.pods.lock().unwrap().remove(&name);
                } else {
                    self.set_down(&name, why);
                }
            }
        }
        self.refresh();
    }

    /// A distribution port epmd just told a local node about: make sure it has a forward and
    /// a redirect before the answer is passed on.
    async fn learn_dist_port(&self, name: &str, node: &str, port: u16) {
        if self.0.closed.load(Ordering::SeqCst) {
            return;
        }
        let Some(target) = self.0.pods.lock().unwrap().get(name).and_then(|s| s.target.clone()) else { return };
        let has_forward = self.0.pods.lock().unwrap().get(name).is_some_and(|s| s.forwards.contains_key(&port));
        if has_forward {
            // The forward exists; make sure the map says so too (an earlier refresh may have
            // raced with this pod going down and up).
            if !self.is_redirected(SocketAddrV4::new(target.ip, port)) {
                self.refresh();
            }
            return;
        }
        match self.ensure_forwards(name, &target, &BTreeSet::from([port])).await {
            Ok(()) => {
                log::info!("pod {}/{name}: epmd says node {node} listens on {port}; forwarding it", target.namespace);
                self.refresh();
            }
            Err(e) => log::warn!("{e}"),
        }
    }

    /// Opens a port-forward per accepted connection and relays it; the epmd forward also
    /// watches the epmd conversation.
    fn carrier(&self, pod: &str, port: u16, is_epmd: bool) -> Carrier {
        let (weak, cluster, pod) = (Arc::downgrade(&self.0), self.0.cluster.clone(), pod.to_string());
        Arc::new(move |conn, stats| {
            let (weak, cluster, pod) = (weak.clone(), cluster.clone(), pod.clone());
            Box::pin(async move {
                let ws = portforward::open(&cluster, &pod, port).await.map_err(|e| e.to_string())?;
                let ended = if is_epmd {
                    let watcher = EpmdWatcher { conv: Arc::new(Mutex::new(EpmdConversation::new())), pods: weak, pod: pod.clone() };
                    portforward::relay_inspected(ws, conn, port, stats, watcher).await
                } else {
                    portforward::relay(ws, conn, port, stats).await
                };
                match ended {
                    Ok(Ended::Closed) => Ok(()),
                    Ok(Ended::PodError(msg)) => Err(format!("pod {}/{pod} port {port}: {}", cluster.namespace, msg.trim())),
                    Err(e) => Err(format!("pod {}/{pod} port {port}: {e}", cluster.namespace)),
                }
            })
        })
    }
}

fn describe_down(e: &K8sError) -> String {
    match e {
        K8sError::PodNotReady { why, .. } => format!("not ready: {why}"),
        other => other.to_string(),
    }
}

/// Follows one epmd connection through the forward (see [`crate::epmd`]).
#[derive(Clone)]
struct EpmdWatcher {
    conv: Arc<Mutex<EpmdConversation>>,
    pods: Weak<Inner>,
    pod: String,
}

impl Inspector for EpmdWatcher {
    fn to_pod(&self, bytes: &[u8]) {
        for event in self.conv.lock().unwrap().client_bytes(bytes) {
            if let Event::Unparseable { reason } = event {
                log::debug!("pod {} epmd request not understood ({reason}); relaying as is", self.pod);
            }
        }
    }

    fn from_pod(&self, bytes: &[u8]) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let events = self.conv.lock().unwrap().server_bytes(bytes);
        let (pods, pod) = (self.pods.clone(), self.pod.clone());
        Box::pin(async move {
            for event in events {
                match event {
                    Event::DistPort { node, port } => {
                        if let Some(inner) = pods.upgrade() {
                            Pods(inner).learn_dist_port(&pod, &node, port).await;
                        }
                    }
                    Event::Unparseable { reason } => log::debug!("pod {pod} epmd answer not understood ({reason}); relaying as is"),
                    _ => {}
                }
            }
        })
    }

    fn pod_closed(&self) {
        // A NAMES answer is complete only now (after it was relayed): forward its ports for
        // the connections that follow.
        let events = self.conv.lock().unwrap().server_eof();
        let Some(inner) = self.pods.upgrade() else { return };
        for event in events {
            if let Event::Names(nodes) = event {
                let (pods, pod) = (Pods(inner.clone()), self.pod.clone());
                tokio::spawn(async move {
                    for (node, port) in nodes {
                        pods.learn_dist_port(&pod, &node, port).await;
                    }
                });
            }
        }
    }
}
