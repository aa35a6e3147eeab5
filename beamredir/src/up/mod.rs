//! The network part of `beamredir up`: pods → port-forwards → redirects, kept in step with the
//! pods. It runs as the invoking user, with no capabilities (see [`crate::privsep`]); the
//! kernel maps, the cgroup and the files are the root part's, asked for over the channel.
//!
//! Pods come from names (`--pod`), a StatefulSet, a label selector or a Service. Each pod has
//! its own reconciler ([`reconciler`]), fed by kube-rs's watcher ([`watch`]): a Running pod with
//! an IP gets a forward per Erlang port ([`crate::forward::registry`]) and redirects from each
//! of its IPs; a pod that stops running or is deleted loses its redirects; a pod back at a new
//! IP keeps its old address redirected for a while ([`table::ALIAS_TTL`]). Ports come from the
//! pod spec and from the pod's epmd: a NAMES request when the pod comes up, then the
//! PORT2_RESP answers passing through the epmd forward ([`carrier`]). After every change the
//! [`publish::Publisher`] sends root the redirects and host names that follow from the pod
//! table ([`table`]).
pub mod banner;
pub mod carrier;
pub mod connect;
pub mod discover;
pub mod publish;
pub mod reconciler;
pub mod rpc;
pub mod table;
pub mod watch;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use self::{
    publish::Publisher,
    reconciler::{Attempt, Observation, Reconcilers},
    table::PodTable,
};
use crate::{
    forward::{gate::Gate, registry::ForwardRegistry},
    k8s::{Cluster, K8sError, KubeArgs, lookup},
    privsep::{
        messages::{NetStatus, ToNet},
        net::{FromRoot, RootLink},
    },
};

pub type Root = RootLink<NetConfig>;

/// At start-up, how long pods of a selector wait for a slow pod once one of them is up and no
/// other has finished its first attempt meanwhile (see [`start`]).
const STRAGGLER_GRACE: Duration = Duration::from_secs(3);

/// Which pods a session follows.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PodSource {
    Names(Vec<String>),
    StatefulSet(String),
    Selector(String),
    Service(String),
}

impl PodSource {
    /// Pods named one by one (`--pod`): each must answer before the session starts, and one
    /// that is deleted stays listed; the others come and go with their selector.
    pub fn by_name(&self) -> bool {
        matches!(self, PodSource::Names(_))
    }
}

/// The bounds of a session (issue: hold under load and faults).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Limits {
    /// Concurrent forwarded connections (all forwards together).
    pub max_connections: usize,
    /// How long a connection past the cap waits for a slot before it is closed.
    pub connection_wait_ms: u64,
    /// Entries the redirect maps hold.
    pub max_redirects: usize,
    /// Ports forwarded per pod (epmd plus distribution ports it lists).
    pub max_ports_per_pod: usize,
    /// How long a port-forward upgrade may take.
    pub upgrade_timeout_ms: u64,
    /// Pods brought up at once.
    pub concurrent_pods: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 1024,
            connection_wait_ms: 5000,
            max_redirects: 16 * 1024,
            max_ports_per_pod: 16,
            upgrade_timeout_ms: 15_000,
            concurrent_pods: 32,
        }
    }
}

impl Limits {
    pub fn upgrade_timeout(&self) -> Duration {
        Duration::from_millis(self.upgrade_timeout_ms)
    }
}

/// The network part's job, sent by the root part as the channel's first message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NetConfig {
    pub kube: KubeArgs,
    pub source: PodSource,
    /// `--dist-port`: overrides what the pod spec says.
    pub dist_port: Option<u16>,
    /// For cluster DNS names (`cluster.local` unless told otherwise).
    pub cluster_domain: String,
    pub limits: Limits,
    /// `remsh`/`observer`: the command the session runs is worked out here.
    pub shell: Option<connect::ShellTask>,
}

/// The parts of a running `up`, shared by its tasks. Each part has one job; this only holds
/// them together.
pub struct Up {
    pub cluster: Cluster,
    pub config: NetConfig,
    pub table: Arc<Mutex<PodTable>>,
    pub registry: Arc<ForwardRegistry<NetConfig>>,
    pub publisher: Publisher,
    /// The root part, for progress while starting.
    pub root: Root,
    pub reconcilers: Reconcilers,
    /// Watches and timers, aborted when the network part stops.
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// The local node's private cookie home (`remsh`/`observer`), removed when this part ends.
    pub cookie_file: Mutex<Option<crate::erlang::cookie::CookieFile>>,
    /// Distribution port-forwards opened while epmd answers (see [`carrier`]).
    pub prepared: carrier::Prepared<kube::client::Connection>,
    started: AtomicBool,
    closed: AtomicBool,
}

impl Up {
    pub fn is_started(&self) -> bool {
        self.started.load(Ordering::SeqCst)
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn status(&self) -> NetStatus {
        NetStatus {
            forwards: self.registry.stats(),
            pods: self
                .table
                .lock()
                .unwrap()
                .infos(&self.cluster.namespace, std::time::Instant::now()),
            connections: self.registry.gate().stats(),
        }
    }
}

/// The network part's main: from the config to a running session, then serving until the root
/// part says stop (or goes away). Errors before the session starts are reported to root as
/// one line (root prints it and exits non-zero).
pub async fn run(root: Root, mut from_root: FromRoot<NetConfig>) -> i32 {
    let config = match from_root.recv().await {
        Some(Ok(msg)) => match msg.body {
            ToNet::Config(config) => *config,
            _ => return 2,
        },
        _ => return 2,
    };
    match start(&root, config).await {
        Ok(up) => serve(up, &root, from_root).await,
        Err(message) => {
            root.fatal(message).await;
            1
        }
    }
}

async fn start(root: &Root, config: NetConfig) -> Result<Arc<Up>, String> {
    let cluster = Cluster::connect(&config.kube)
        .await
        .map_err(|e| e.to_string())?;
    log::debug!(
        "kubeconfig {}, API server {}, namespace {}",
        cluster.source,
        cluster.url,
        cluster.namespace
    );
    // Nothing has been sent yet: the first request below is what reaches the server.
    root.progress(format!(
        "asking {} (namespace {})",
        cluster.url, cluster.namespace
    ))
    .await;
    let selector = match &config.source {
        PodSource::Names(_) => None,
        PodSource::StatefulSet(name) => Some(
            lookup::statefulset_selector(&cluster, name)
                .await
                .map_err(|e| cluster.explain(e).to_string())?,
        ),
        PodSource::Service(name) => Some(
            lookup::service_selector(&cluster, name)
                .await
                .map_err(|e| cluster.explain(e).to_string())?,
        ),
        PodSource::Selector(sel) => Some(sel.clone()),
    };
    let initial = match (&config.source, &selector) {
        (PodSource::Names(names), _) => {
            let mut pods = Vec::new();
            for name in names {
                pods.push(
                    lookup::get(&cluster, name)
                        .await
                        .map_err(|e| cluster.explain(e).to_string())?,
                );
            }
            pods
        }
        (source, Some(sel)) => {
            let found = lookup::list(&cluster, sel)
                .await
                .map_err(|e| cluster.explain(e).to_string())?;
            if found.is_empty() {
                let what = match source {
                    PodSource::StatefulSet(n) => format!("statefulset {n} (selector {sel})"),
                    PodSource::Service(n) => format!("service {n} (selector {sel})"),
                    _ => format!("selector {sel:?}"),
                };
                return Err(K8sError::NoPods {
                    what,
                    namespace: cluster.namespace.clone(),
                }
                .to_string());
            }
            found
        }
        (_, None) => unreachable!("every non-name source has a selector"),
    };
    let names_given = match &config.source {
        PodSource::Names(n) => n.clone(),
        _ => Vec::new(),
    };
    lookup::check_follow(&cluster, selector.as_deref(), &names_given)
        .await
        .map_err(|e| cluster.explain(e).to_string())?;
    let gate = Gate::new(
        config.limits.max_connections,
        Duration::from_millis(config.limits.connection_wait_ms),
    );
    let registry = Arc::new(ForwardRegistry::new(
        root.clone(),
        gate,
        config.limits.max_ports_per_pod,
    ));
    let table = Arc::new(Mutex::new(PodTable::default()));
    let up = Arc::new(Up {
        root: root.clone(),
        publisher: Publisher::new(
            root.clone(),
            table.clone(),
            registry.clone(),
            config.cluster_domain.clone(),
        ),
        reconcilers: Reconcilers::new(config.limits.concurrent_pods),
        cluster,
        config,
        table,
        registry,
        background: Mutex::new(Vec::new()),
        cookie_file: Mutex::new(None),
        prepared: carrier::Prepared::for_session(),
        started: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    root.progress(format!("bringing up {} pod(s)", initial.len()))
        .await;
    let names: Vec<String> = initial
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    let attempts: Vec<(String, tokio::sync::watch::Receiver<Attempt>)> = initial
        .into_iter()
        .filter_map(|p| {
            let name = p.metadata.name.clone()?;
            Some((
                name.clone(),
                up.reconcilers
                    .observe(&up, &name, Observation::Present(Box::new(p))),
            ))
        })
        .collect();
    // Every pod's first attempt, however it went (a failing one keeps retrying behind). The
    // pods of a selector do not all wait for the slowest: once one is up, a pod whose first
    // attempt is still running when no other pod has settled for STRAGGLER_GRACE no longer
    // holds the session up; it is followed in the background (the banner says "starting").
    let named = up.config.source.by_name();
    let mut pending: futures::stream::FuturesUnordered<_> = attempts
        .into_iter()
        .map(|(name, mut rx)| async move {
            let settled = rx
                .wait_for(|a| *a != Attempt::Pending)
                .await
                .map(|a| a.clone());
            (name, settled)
        })
        .collect();
    let mut failed = Vec::new();
    let mut settled = std::collections::BTreeSet::new();
    loop {
        let any_up = !named && !up.table.lock().unwrap().targets().is_empty();
        let next = if any_up {
            match tokio::time::timeout(STRAGGLER_GRACE, pending.next()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        } else {
            pending.next().await
        };
        let Some((name, outcome)) = next else { break };
        if let Ok(Attempt::Failed(e)) = outcome {
            failed.push((name.clone(), e));
        }
        settled.insert(name);
    }
    drop(pending);
    for name in names.iter().filter(|n| !settled.contains(*n)) {
        log::warn!(
            "pod {}/{name} is still being brought up; the session starts without it and follows it",
            up.cluster.namespace
        );
    }
    let up_count = up.table.lock().unwrap().targets().len();
    if let Some((_, e)) = failed.first().filter(|_| named || up_count == 0) {
        return Err(e.clone());
    }
    if named {
        // Named pods must all be reachable now: say exactly what is wrong with the first that is not.
        for name in &names {
            let table = up.table.lock().unwrap();
            if let Some(e) = table.get(name).filter(|e| e.target.is_none()) {
                return Err(K8sError::PodNotReachable {
                    name: name.clone(),
                    namespace: up.cluster.namespace.clone(),
                    why: e.state.trim_start_matches("not running: ").to_string(),
                }
                .to_string());
            }
        }
    } else if up_count == 0 {
        return Err(format!(
            "no pod of the session can be reached yet ({})",
            names.join(", ")
        ));
    }
    for (name, e) in &failed {
        log::warn!("{e}; following pod {name} until it can be reached");
    }
    let command = match &up.config.shell {
        Some(task) => Some(connect::session_command(&up, task).await?),
        None => None,
    };
    let desired = up.publisher.desired();
    let hints = if command.is_some() { String::new() } else { banner::hints(&up) };
    let session = root
        .start(desired.0.clone(), Some(desired.1.clone()), banner::pods(&up), hints, command)
        .await
        .map_err(|e| e.to_string())?;
    up.registry.gate().open(session.peers);
    up.started.store(true, Ordering::SeqCst);
    up.publisher.started(desired).await;
    // Whatever changed while the session started.
    up.publisher.publish().await;
    let mut tasks = watch::follow(&up, selector.as_deref());
    tasks.push(tokio::spawn(expire_aliases(up.clone())));
    tasks.push(tokio::spawn(release_after_bursts(up.registry.gate().clone())));
    up.background.lock().unwrap().extend(tasks);
    Ok(up)
}

/// Drops expired aliases (and republishes) every few seconds.
async fn expire_aliases(up: Arc<Up>) {
    let by_name = up.config.source.by_name();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let changed = {
            let mut table = up.table.lock().unwrap();
            let changed = table.expire_aliases(std::time::Instant::now());
            // A selector's deleted pods, once their names are no longer held, are forgotten.
            if !by_name {
                let forgotten = up.reconcilers.forget_gone(&mut table);
                if forgotten > 0 {
                    log::debug!("forgot {forgotten} deleted pod(s)");
                }
            }
            changed
        };
        if changed {
            up.publisher.publish().await;
        }
    }
}

/// A burst of connections this much larger than what is carried now has ended: see
/// [`release_after_bursts`].
const BURST: u64 = 64;

/// Gives the memory of ended connection bursts back to the system. Each carried connection
/// holds a few hundred KiB of buffers (TLS, WebSocket, frames); once a burst of them has ended
/// the allocator keeps most of those pages (glibc returns only the top of each arena), so a
/// session that once carried a thousand connections would stay a few hundred MiB large.
/// `malloc_trim` returns every free page of every arena; it costs milliseconds and runs only
/// when at least [`BURST`] connections fewer are carried than at the peak since the last look.
async fn release_after_bursts(gate: Arc<Gate>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let (active, peak) = gate.take_peak();
        if peak >= active + BURST {
            release_free_memory();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

/// Answers the root part until it says stop or goes away.
async fn serve(up: Arc<Up>, root: &Root, mut from_root: FromRoot<NetConfig>) -> i32 {
    while let Some(Ok(msg)) = from_root.recv().await {
        match msg.body {
            ToNet::StatusQuery => root.answer_status(msg.id, up.status()).await,
            ToNet::Shutdown => {
                root.answer_ok(msg.id).await;
                break;
            }
            _ => {}
        }
    }
    up.closed.store(true, Ordering::SeqCst);
    up.reconcilers.stop_all();
    for task in up.background.lock().unwrap().drain(..) {
        task.abort();
    }
    up.cookie_file.lock().unwrap().take();
    0
}
