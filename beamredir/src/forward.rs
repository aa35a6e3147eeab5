//! Local forwards: a listener on 127.0.0.1 per pod port; every accepted connection gets its
//! own port-forward stream, so one failing stream never takes the others (or the listener)
//! down: the failure modes of `kubectl port-forward` (client-go#329, kubectl#1169) do not
//! apply. Byte counters and connection counts feed `beamredir status`.
use std::{
    future::Future,
    net::{Ipv4Addr, SocketAddrV4},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::net::{TcpListener, TcpStream};

use crate::session::ForwardStats;

/// Counters of one forward, shared with every connection it carries.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub active: AtomicU64,
    pub total: AtomicU64,
    pub bytes_to_pod: AtomicU64,
    pub bytes_from_pod: AtomicU64,
    pub errors: AtomicU64,
}

impl ConnStats {
    pub fn snapshot(&self) -> ForwardStats {
        ForwardStats {
            active: self.active.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            bytes_to_pod: self.bytes_to_pod.load(Ordering::Relaxed),
            bytes_from_pod: self.bytes_from_pod.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// Carries one accepted local connection to the pod; returns an error message on failure.
pub type Carrier = Arc<dyn Fn(TcpStream, Arc<ConnStats>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// A running local forward. Dropping it closes the listener; connections in flight finish.
pub struct Forward {
    pub label: String,
    pub pod_port: u16,
    pub local: SocketAddrV4,
    pub stats: Arc<ConnStats>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Forward {
    /// Listens on 127.0.0.1 (ephemeral port) and hands each connection to `carrier`.
    pub async fn start(label: String, pod_port: u16, carrier: Carrier) -> std::io::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let local = match listener.local_addr()? {
            std::net::SocketAddr::V4(a) => a,
            std::net::SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
        };
        let stats = Arc::new(ConnStats::default());
        let (task_stats, task_label) = (stats.clone(), label.clone());
        let accept_task = tokio::spawn(async move {
            loop {
                let (conn, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and the like: report, back off, keep listening.
                        log::warn!("{task_label}: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = conn.set_nodelay(true);
                let (stats, carrier, label) = (task_stats.clone(), carrier.clone(), task_label.clone());
                stats.total.fetch_add(1, Ordering::Relaxed);
                stats.active.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    log::debug!("{label}: connection from {peer}");
                    if let Err(e) = carrier(conn, stats.clone()).await {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        log::warn!("{label}: {e}");
                    }
                    stats.active.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Ok(Forward { label, pod_port, local, stats, accept_task })
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}
