//! What happens to one admitted local connection: a port-forward to its pod port through the
//! API server (given up early if the local side closes while the upgrade is pending), then the
//! relay (ended as soon as the local side has closed its socket, see
//! [`portforward::relay_with`]). The epmd forward also watches the epmd conversation to learn
//! distribution ports before their answers reach the local node (see [`crate::erlang::epmd`]).
//!
//! And to start the distribution connection's port-forward early: a local node that asks the
//! pod's epmd where node N listens (`PORT_PLEASE2_REQ`) connects there as soon as the answer
//! arrives. When N's port is already known and forwarded, its port-forward is opened while
//! epmd answers ([`Prepared`]), and the local node's connection takes it: one round trip to
//! the API server less on every new node connection. The pod's node sees its distribution
//! connection accepted about one round trip before the handshake starts; if none comes (the
//! answer was not what we knew), the prepared stream is closed after [`PREPARED_TTL`], well
//! within the node's handshake timer (`net_setuptime`, 7 s), so the pod sees a connection that
//! closed without a handshake, which Erlang drops silently.
//!
//! Why not keep streams ready for the epmd lookups too (a pool per forward): a stream opened
//! ahead and left idle can be dropped by the far side (an API server restart, a proxy's idle
//! timeout), and handing out a dead one fails that connection. A prepared stream lives a few
//! seconds, for a connection that is about to come.
use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use kube::client::Connection;
use tokio::net::TcpStream;

use super::Up;
use crate::{
    erlang::epmd::{EpmdConversation, Event},
    forward::{Carrier, registry::FamilyKey},
    k8s::{
        Cluster,
        portforward::{self, Ended, Inspector, LocalClosed, NoInspection},
    },
};

/// A prepared port-forward is closed unused after this long.
const PREPARED_TTL: Duration = Duration::from_secs(3);
/// Prepared port-forwards per pod port, at most (a few nodes starting at once).
const PREPARED_MAX: usize = 4;

type Key = (String, String, u16);
/// The streams ready for one key: when each was opened, the pod uid it was opened to, the
/// [`Prepared::api_broke`] count when its opening started, the stream.
type Ready<T> = Vec<(Instant, String, u64, T)>;

/// Port-forwards opened ahead of a connection, by (namespace, pod, port): what the pod
/// incarnation was when each was opened, and when. Bounded in number and age. One per session
/// ([`Up::prepared`]).
pub struct Prepared<T> {
    streams: Mutex<HashMap<Key, Ready<T>>>,
    ttl: Duration,
    max: usize,
    /// How often the path to the API server was seen to break (a watch failing): a stream
    /// opened before a break may be dead (an API server restart drops every connection), and a
    /// dead one handed to a node fails its connection.
    breaks: AtomicU64,
}

impl Prepared<Connection> {
    pub fn for_session() -> Self {
        Prepared::new(PREPARED_TTL, PREPARED_MAX)
    }
}

impl<T> Prepared<T> {
    fn new(ttl: Duration, max: usize) -> Self {
        Prepared {
            streams: Mutex::new(HashMap::new()),
            ttl,
            max,
            breaks: AtomicU64::new(0),
        }
    }

    /// The path to the API server broke (a watch failed): every stream prepared before now is
    /// dropped rather than handed out.
    pub fn api_broke(&self) {
        self.breaks.fetch_add(1, Ordering::SeqCst);
    }

    /// The break count to give [`Prepared::put`] for a stream about to be opened.
    fn epoch(&self) -> u64 {
        self.breaks.load(Ordering::SeqCst)
    }

    /// Runs `f` on the streams for `key` that are still fresh (the expired ones, and those
    /// opened before a break, are dropped, i.e. closed, first).
    fn with_fresh<R>(&self, key: &Key, f: impl FnOnce(&mut Ready<T>) -> R) -> R {
        let epoch = self.epoch();
        let mut all = self.streams.lock().unwrap();
        let list = all.entry(key.clone()).or_default();
        list.retain(|(t, _, e, _)| t.elapsed() < self.ttl && *e == epoch);
        f(list)
    }

    /// Whether another stream may be prepared for `key`.
    fn has_room(&self, key: &Key) -> bool {
        self.with_fresh(key, |list| list.len() < self.max)
    }

    fn put(&self, key: &Key, uid: String, epoch: u64, stream: T) {
        let current = self.epoch();
        self.with_fresh(key, |list| {
            if list.len() < self.max && epoch == current {
                list.push((Instant::now(), uid, epoch, stream));
            }
        });
    }

    /// The oldest stream still fresh for this pod incarnation (the first asked for was the first
    /// prepared); those opened to an earlier incarnation are dropped.
    fn take(&self, key: &Key, uid: &str) -> Option<T> {
        self.with_fresh(key, |list| {
            list.retain(|(_, u, _, _)| u == uid);
            (!list.is_empty()).then(|| list.remove(0).3)
        })
    }

    /// Closes the streams for `key` that nobody took in time.
    fn expire(&self, key: &Key) {
        self.with_fresh(key, |_| ());
    }
}

/// The uid of `pod`'s current incarnation, if it is up.
fn current_uid(up: &Up, pod: &str) -> Option<String> {
    let table = up.table.lock().unwrap();
    Some(table.get(pod)?.target.as_ref()?.uid.clone())
}

/// Opens a port-forward for `node`'s distribution port ahead of its connection, if the port is
/// known and forwarded (see the module's documentation).
fn prepare_dist(up: &Arc<Up>, pod: &str, node: &str) {
    let (uid, port) = {
        let table = up.table.lock().unwrap();
        let Some(entry) = table.get(pod) else { return };
        let Some(target) = &entry.target else { return };
        let Some(port) = entry
            .dist
            .iter()
            .find(|d| d.epmd_name.as_deref() == Some(node))
            .map(|d| d.port)
        else {
            return;
        };
        (target.uid.clone(), port)
    };
    if !up.registry.ports(pod).contains(&port) {
        return;
    }
    let key: Key = (up.cluster.namespace.clone(), pod.to_string(), port);
    if !up.prepared.has_room(&key) {
        return;
    }
    let (weak, cluster, timeout) = (Arc::downgrade(up), up.cluster.clone(), up.config.limits.upgrade_timeout());
    let epoch = up.prepared.epoch();
    tokio::spawn(async move {
        match portforward::open(&cluster, &key.1, port, timeout).await {
            Ok(conn) => {
                let Some(up) = weak.upgrade() else { return };
                up.prepared.put(&key, uid, epoch, conn);
                drop(up);
                // Unused by then: closed.
                tokio::time::sleep(PREPARED_TTL).await;
                if let Some(up) = weak.upgrade() {
                    up.prepared.expire(&key);
                }
            }
            Err(e) => log::debug!("preparing a port-forward to pod {} port {port}: {e}", key.1),
        }
    });
}

/// A prepared port-forward for this connection, or a new one.
async fn open(
    weak: &Weak<Up>,
    cluster: &Cluster,
    pod: &str,
    port: u16,
    timeout: Duration,
) -> Result<Connection, String> {
    let key = (cluster.namespace.clone(), pod.to_string(), port);
    let prepared = weak
        .upgrade()
        .and_then(|up| up.prepared.take(&key, &current_uid(&up, pod)?));
    if let Some(conn) = prepared {
        log::debug!(
            "pod {}/{pod} port {port}: a port-forward prepared while epmd answered",
            cluster.namespace
        );
        return Ok(conn);
    }
    portforward::open(cluster, pod, port, timeout)
        .await
        .map_err(|e| e.to_string())
}

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
                ws = open(&weak, &cluster, &pod, port, timeout) => ws?,
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
            match event {
                Event::Unparseable { reason } => log::debug!(
                    "pod {} epmd request not understood ({reason}); relaying as is",
                    self.pod
                ),
                // The local node will connect to `node` once epmd answers: get its stream ready.
                Event::PortRequested { node } => {
                    if let Some(up) = self.up.upgrade() {
                        prepare_dist(&up, &self.pod, &node);
                    }
                }
                _ => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> Key {
        ("ns".into(), "app-0".into(), port)
    }

    #[test]
    fn prepared_streams_go_first_in_first_out_to_the_same_incarnation_only() {
        let p: Prepared<u32> = Prepared::new(Duration::from_secs(60), 2);
        p.put(&key(9000), "u1".into(), 0, 1);
        p.put(&key(9000), "u1".into(), 0, 2);
        assert!(!p.has_room(&key(9000)), "bounded");
        p.put(&key(9000), "u1".into(), 0, 3);
        assert_eq!(p.take(&key(9000), "u1"), Some(1));
        assert_eq!(p.take(&key(9001), "u1"), None, "another port");
        // The pod was replaced: what was opened to the old one is dropped, not handed out.
        assert_eq!(p.take(&key(9000), "u2"), None);
        assert_eq!(p.take(&key(9000), "u1"), None);
        assert!(p.has_room(&key(9000)));
    }

    #[test]
    fn prepared_streams_expire() {
        let p: Prepared<u32> = Prepared::new(Duration::from_millis(30), 4);
        p.put(&key(9000), "u1".into(), 0, 1);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(p.take(&key(9000), "u1"), None);
    }

    /// An API server restart drops every connection: a stream prepared before the watch saw
    /// the break is never handed out, nor one whose opening started before it.
    #[test]
    fn prepared_streams_from_before_a_break_are_dropped() {
        let p: Prepared<u32> = Prepared::new(Duration::from_secs(60), 4);
        let before = p.epoch();
        p.put(&key(9000), "u1".into(), before, 1);
        p.api_broke();
        assert_eq!(p.take(&key(9000), "u1"), None, "opened before the break");
        p.put(&key(9000), "u1".into(), before, 2);
        assert_eq!(p.take(&key(9000), "u1"), None, "its opening started before the break");
        p.put(&key(9000), "u1".into(), p.epoch(), 3);
        assert_eq!(p.take(&key(9000), "u1"), Some(3));
    }
}
