//! Local forwards (network part): listeners the root part created, on 127.0.0.1 and/or [::1],
//! one forward per pod port. Every accepted connection passes the session's [`gate::Gate`]
//! (peer in the session? a connection slot free?) and then gets its own port-forward stream,
//! so one failing stream never takes the others (or the listener) down: the failure modes of
//! `kubectl port-forward` (client-go#329, kubectl#1169) do not apply.
//!
//! * [`peer`]: who is on the other end of a connection (sock_diag);
//! * [`gate`]: admission (peer rule, connection cap);
//! * [`registry`]: the forwards of a session, by pod and port.
pub mod gate;
pub mod peer;
pub mod registry;

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
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
    pub refused: AtomicU64,
}

impl ConnStats {
    pub fn snapshot(&self) -> ForwardStats {
        ForwardStats {
            active: self.active.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            bytes_to_pod: self.bytes_to_pod.load(Ordering::Relaxed),
            bytes_from_pod: self.bytes_from_pod.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// Carries one admitted local connection to the pod; returns an error message on failure.
pub type Carrier = Arc<
    dyn Fn(TcpStream, Arc<ConnStats>) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        + Send
        + Sync,
>;

/// A running forward. Dropping it stops accepting; connections in flight finish.
pub struct Forward {
    pub label: String,
    pub stats: Arc<ConnStats>,
    accept_tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Accept errors (EMFILE, ENFILE, ENOBUFS…) back off from this to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

impl Forward {
    /// Accepts on each listener and hands admitted connections to `carrier`.
    pub fn start(
        label: String,
        listeners: Vec<std::net::TcpListener>,
        gate: Arc<gate::Gate>,
        carrier: Carrier,
    ) -> std::io::Result<Self> {
        let stats = Arc::new(ConnStats::default());
        let mut accept_tasks = Vec::new();
        for listener in listeners {
            listener.set_nonblocking(true)?;
            let listener = TcpListener::from_std(listener)?;
            let local = listener.local_addr()?;
            let (stats, label, gate, carrier) =
                (stats.clone(), label.clone(), gate.clone(), carrier.clone());
            accept_tasks.push(tokio::spawn(accept_loop(
                listener, local, stats, label, gate, carrier,
            )));
        }
        Ok(Forward {
            label,
            stats,
            accept_tasks,
        })
    }
}

async fn accept_loop(
    listener: TcpListener,
    local: SocketAddr,
    stats: Arc<ConnStats>,
    label: String,
    gate: Arc<gate::Gate>,
    carrier: Carrier,
) {
    let mut backoff = MIN_BACKOFF;
    let mut failures: u64 = 0;
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => {
                backoff = MIN_BACKOFF;
                c
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(100) {
                    log::warn!(
                        "{label}: accept failed: {e} ({failures} so far); backing off {backoff:?}"
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        // The peer check first, here: a refused connection is closed before the next accept
        // and costs no task, so a local flood cannot pile up work (or descriptors).
        if gate.check(local, peer, &label).is_err() {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            drop(conn);
            continue;
        }
        let (stats, carrier, label, gate) =
            (stats.clone(), carrier.clone(), label.clone(), gate.clone());
        tokio::spawn(async move {
            let Ok(permit) = gate.slot(&label).await else {
                return;
            };
            let _ = conn.set_nodelay(true);
            stats.total.fetch_add(1, Ordering::Relaxed);
            stats.active.fetch_add(1, Ordering::Relaxed);
            log::debug!("{label}: connection from {peer}");
            if let Err(e) = carrier(conn, stats.clone()).await {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("{label}: {e}");
            }
            stats.active.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        for t in &self.accept_tasks {
            t.abort();
        }
    }
}
