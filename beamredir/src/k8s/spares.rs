//! Spare connections to the API server. A port-forward's WebSocket upgrade consumes its HTTP/1.1
//! connection, so every forwarded connection would pay a TCP and a TLS handshake before its
//! upgrade: two or three round trips to a distant API server. While port-forwards are being
//! opened, [`PreConnect`] keeps a couple of connections ready, handshakes done, and hands one
//! to the next upgrade; [`Spares`] is what the rest of beamredir sees of it.
//!
//! Connections, not upgraded streams: an upgraded stream addresses one pod port and can die
//! while idle (an API-server restart, a proxy's idle timeout), and handing out a dead one would
//! fail a user's connection. A spare that died is noticed ([`Liveness`]) and never handed out.
use std::{
    future::Future,
    os::fd::AsRawFd,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::Uri;
use hyper_util::rt::TokioIo;
use tower::{BoxError, Service, ServiceExt};

/// Spare connections kept while port-forwards are being opened. Each forwarded connection
/// consumes one (an upgraded connection never returns to the pool), and a replacement is made
/// in the background; two cover a burst of back-to-back connections (a node's epmd lookup and
/// then its distribution connection).
const SPARES: usize = 2;
/// A spare is closed unused after this long: servers close connections that stay silent (Go's
/// http.Server after its header-read and idle timeouts, load balancers after a minute or so).
const SPARE_MAX_AGE: Duration = Duration::from_secs(20);
/// Spares are replaced only while port-forwards keep being opened: this long after the last
/// one, they are let go, and an idle session holds no connection beyond its watch.
const KEEP_WARM_FOR: Duration = Duration::from_secs(120);
/// After a failed background connect, none for this long (the API server may be down).
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// What the rest of beamredir sees of the spare connections (the connector's type is generic).
#[derive(Clone, Default)]
pub struct Spares(Option<Arc<dyn Demand>>);

trait Demand: Send + Sync {
    fn demand(self: Arc<Self>);
    fn ready(&self) -> usize;
}

impl Spares {
    /// A port-forward is about to be opened: keep spares ready from now on (for a while).
    pub fn demand(&self) {
        if let Some(d) = &self.0 {
            d.clone().demand();
        }
    }

    /// Spares ready now.
    pub fn ready(&self) -> usize {
        self.0.as_ref().map_or(0, |d| d.ready())
    }
}

/// `BEAMREDIR_NET_SPARE_CONNECTIONS=N` (the prefix passes to the network part; 0 turns them
/// off: for benchmarks, and for API servers that must not see idle connections).
fn spares_wanted() -> usize {
    std::env::var("BEAMREDIR_NET_SPARE_CONNECTIONS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map_or(SPARES, |n: usize| n.min(16))
}

/// Whether the peer has closed a connection nobody reads from (a spare): POLLRDHUP says its
/// FIN arrived even when unread bytes (TLS session tickets) are queued before it.
pub trait Liveness {
    fn is_closed(&self) -> bool;
}

impl Liveness for TokioIo<tokio::net::TcpStream> {
    fn is_closed(&self) -> bool {
        let mut fd = libc::pollfd {
            fd: self.inner().as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no timeout.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        n != 0
            && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
    }
}

impl<T: Liveness> Liveness for hyper_rustls::MaybeHttpsStream<T> {
    fn is_closed(&self) -> bool {
        match self {
            Self::Http(s) => s.is_closed(),
            Self::Https(s) => s.inner().get_ref().0.inner().is_closed(),
        }
    }
}

struct Spare<R> {
    id: u64,
    made: Instant,
    conn: R,
}

struct PoolState<R> {
    spares: Vec<Spare<R>>,
    connecting: usize,
    last_demand: Option<Instant>,
    failed_at: Option<Instant>,
    next_id: u64,
}

/// The spares of one client, for its API server only (any other URI goes straight through).
pub(super) struct Pool<S: Service<Uri>> {
    connector: S,
    uri: Uri,
    target: usize,
    timing: Timing,
    state: Mutex<PoolState<S::Response>>,
}

/// [`SPARE_MAX_AGE`], [`KEEP_WARM_FOR`] and [`RETRY_AFTER`] (shorter in tests).
#[derive(Clone, Copy)]
struct Timing {
    max_age: Duration,
    keep_warm: Duration,
    retry_after: Duration,
}

const TIMING: Timing = Timing {
    max_age: SPARE_MAX_AGE,
    keep_warm: KEEP_WARM_FOR,
    retry_after: RETRY_AFTER,
};

fn same_endpoint(a: &Uri, b: &Uri) -> bool {
    a.scheme() == b.scheme() && a.host() == b.host() && a.port_u16() == b.port_u16()
}

impl<S> Pool<S>
where
    S: Service<Uri> + Clone + Send + Sync + 'static,
    S::Response: Liveness + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    /// The youngest spare that is still open, if it is for `uri`.
    fn take(&self, uri: &Uri) -> Option<S::Response> {
        if !same_endpoint(uri, &self.uri) {
            return None;
        }
        let mut dead = Vec::new();
        let found = {
            let mut st = self.state.lock().unwrap();
            loop {
                let Some(spare) = st.spares.pop() else {
                    break None;
                };
                if spare.made.elapsed() < self.timing.max_age && !spare.conn.is_closed() {
                    break Some(spare.conn);
                }
                dead.push(spare);
            }
        };
        drop(dead);
        found
    }

    /// Starts background connects until `target` spares are ready or on their way, if a
    /// port-forward was opened recently and the last attempt did not just fail.
    fn top_up(self: &Arc<Self>) {
        let now = Instant::now();
        let want = {
            let mut st = self.state.lock().unwrap();
            let warm = st
                .last_demand
                .is_some_and(|t| now.duration_since(t) < self.timing.keep_warm);
            let backing_off = st
                .failed_at
                .is_some_and(|t| now.duration_since(t) < self.timing.retry_after);
            let want = if warm && !backing_off {
                self.target.saturating_sub(st.spares.len() + st.connecting)
            } else {
                0
            };
            st.connecting += want;
            want
        };
        for _ in 0..want {
            tokio::spawn(self.clone().connect_one());
        }
    }

    async fn connect_one(self: Arc<Self>) {
        let result: Result<_, BoxError> = self
            .connector
            .clone()
            .oneshot(self.uri.clone())
            .await
            .map_err(Into::into);
        let id = {
            let mut st = self.state.lock().unwrap();
            st.connecting -= 1;
            match result {
                Ok(conn) => {
                    let id = st.next_id;
                    st.next_id += 1;
                    st.spares.push(Spare {
                        id,
                        made: Instant::now(),
                        conn,
                    });
                    id
                }
                Err(e) => {
                    st.failed_at = Some(Instant::now());
                    log::debug!("a spare connection to the API server failed: {e}");
                    return;
                }
            }
        };
        // Unused for its whole life: close it, and replace it if still wanted.
        tokio::time::sleep(self.timing.max_age).await;
        let expired = {
            let mut st = self.state.lock().unwrap();
            st.spares
                .iter()
                .position(|s| s.id == id)
                .map(|i| st.spares.remove(i))
        };
        if expired.is_some() {
            drop(expired);
            self.top_up();
        }
    }
}

impl<S> Demand for Pool<S>
where
    S: Service<Uri> + Clone + Send + Sync + 'static,
    S::Response: Liveness + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    fn demand(self: Arc<Self>) {
        self.state.lock().unwrap().last_demand = Some(Instant::now());
        // hyper may serve this request from its own pool of idle connections (a GET's), not
        // from the connector: start the spares here too.
        self.top_up();
    }

    fn ready(&self) -> usize {
        self.state.lock().unwrap().spares.len()
    }
}

/// The connector hyper's client calls when its own pool has no idle connection: a spare if
/// one is ready (then a replacement is started), else a new connection as before.
pub(super) struct PreConnect<S: Service<Uri>>(Arc<Pool<S>>);

impl<S: Service<Uri>> Clone for PreConnect<S> {
    fn clone(&self) -> Self {
        PreConnect(self.0.clone())
    }
}

type Connecting<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

impl<S> Service<Uri> for PreConnect<S>
where
    S: Service<Uri> + Clone + Send + Sync + 'static,
    S::Response: Liveness + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Connecting<S::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The inner connector's readiness is awaited per call (oneshot).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let pool = self.0.clone();
        let spare = pool.take(&uri);
        pool.top_up();
        match spare {
            Some(conn) => Box::pin(std::future::ready(Ok(conn))),
            None => Box::pin(async move {
                pool.connector
                    .clone()
                    .oneshot(uri)
                    .await
                    .map_err(Into::into)
            }),
        }
    }
}

/// `connector` with spares for `config`'s API server (unless turned off).
pub(super) fn with_spares<S>(config: &kube::Config, connector: S) -> (PreConnect<S>, Spares)
where
    S: Service<Uri> + Clone + Send + Sync + 'static,
    S::Response: Liveness + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    with_spares_timed(
        config.cluster_url.clone(),
        connector,
        spares_wanted(),
        TIMING,
    )
}

fn with_spares_timed<S>(
    uri: Uri,
    connector: S,
    target: usize,
    timing: Timing,
) -> (PreConnect<S>, Spares)
where
    S: Service<Uri> + Clone + Send + Sync + 'static,
    S::Response: Liveness + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let pool = Arc::new(Pool {
        connector,
        uri,
        target,
        timing,
        state: Mutex::new(PoolState {
            spares: Vec::new(),
            connecting: 0,
            last_demand: None,
            failed_at: None,
            next_id: 0,
        }),
    });
    let handle = if target > 0 {
        Spares(Some(pool.clone() as Arc<dyn Demand>))
    } else {
        Spares(None)
    };
    (PreConnect(pool), handle)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;

    /// A connection that is only an id and a "peer closed" flag.
    struct FakeConn {
        id: usize,
        closed: Arc<AtomicBool>,
    }

    impl Liveness for FakeConn {
        fn is_closed(&self) -> bool {
            self.closed.load(Ordering::SeqCst)
        }
    }

    /// Counts connects; fails them while `fail` is set.
    #[derive(Clone, Default)]
    struct FakeConnector {
        made: Arc<AtomicUsize>,
        fail: Arc<AtomicBool>,
        closed: Arc<AtomicBool>,
    }

    impl Service<Uri> for FakeConnector {
        type Response = FakeConn;
        type Error = std::io::Error;
        type Future = std::future::Ready<Result<FakeConn, std::io::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            if self.fail.load(Ordering::SeqCst) {
                return std::future::ready(Err(std::io::Error::other("refused")));
            }
            let id = self.made.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Ok(FakeConn {
                id,
                closed: self.closed.clone(),
            }))
        }
    }

    const API: &str = "https://10.0.0.1:6443/";
    const FAST: Timing = Timing {
        max_age: Duration::from_millis(300),
        keep_warm: Duration::from_secs(60),
        retry_after: Duration::from_millis(200),
    };

    fn pool(target: usize, timing: Timing) -> (FakeConnector, PreConnect<FakeConnector>, Spares) {
        let fake = FakeConnector::default();
        let (connector, spares) =
            with_spares_timed(API.parse().unwrap(), fake.clone(), target, timing);
        (fake, connector, spares)
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    async fn connect(c: &mut PreConnect<FakeConnector>, uri: &str) -> usize {
        c.call(uri.parse().unwrap()).await.unwrap().id
    }

    #[tokio::test]
    async fn no_spares_until_a_port_forward_asks_for_them() {
        let (fake, mut c, spares) = pool(2, FAST);
        assert_eq!(connect(&mut c, "https://10.0.0.1:6443/api").await, 0);
        settle().await;
        assert_eq!((fake.made.load(Ordering::SeqCst), spares.ready()), (1, 0));
        spares.demand();
        settle().await;
        assert_eq!((fake.made.load(Ordering::SeqCst), spares.ready()), (3, 2));
    }

    #[tokio::test]
    async fn a_connect_takes_a_spare_and_one_replaces_it() {
        let (fake, mut c, spares) = pool(2, FAST);
        spares.demand();
        settle().await;
        // Ids 0 and 1 are the spares: a connect gets one of them, not a new connection.
        assert!(connect(&mut c, "https://10.0.0.1:6443/api/v1/x").await < 2);
        settle().await;
        assert_eq!((fake.made.load(Ordering::SeqCst), spares.ready()), (3, 2));
        // Another host, another scheme or port: never a spare.
        assert_eq!(connect(&mut c, "https://10.0.0.2:6443/").await, 3);
        assert_eq!(connect(&mut c, "http://10.0.0.1:6443/").await, 4);
        assert_eq!(spares.ready(), 2);
    }

    #[tokio::test]
    async fn closed_and_expired_spares_are_not_used() {
        let (fake, mut c, spares) = pool(1, FAST);
        spares.demand();
        settle().await;
        assert_eq!(spares.ready(), 1);
        // The server closed it: a new connection instead (its replacement comes after).
        fake.closed.store(true, Ordering::SeqCst);
        assert_eq!(connect(&mut c, API).await, 1);
        fake.closed.store(false, Ordering::SeqCst);
        settle().await;
        // Spares expire after max_age and are replaced while port-forwards keep coming.
        let before = fake.made.load(Ordering::SeqCst);
        tokio::time::sleep(FAST.max_age + Duration::from_millis(100)).await;
        settle().await;
        assert!(fake.made.load(Ordering::SeqCst) > before);
        assert_eq!(spares.ready(), 1);
    }

    #[tokio::test]
    async fn a_failing_api_server_is_not_hammered() {
        let (fake, mut c, spares) = pool(2, FAST);
        fake.fail.store(true, Ordering::SeqCst);
        spares.demand();
        settle().await;
        assert_eq!(spares.ready(), 0);
        // Within retry_after, connects go straight through and start no background attempt.
        fake.fail.store(false, Ordering::SeqCst);
        assert_eq!(connect(&mut c, API).await, 0);
        settle().await;
        assert_eq!((fake.made.load(Ordering::SeqCst), spares.ready()), (1, 0));
        tokio::time::sleep(FAST.retry_after).await;
        spares.demand();
        settle().await;
        assert_eq!(spares.ready(), 2);
    }

    #[tokio::test]
    async fn spares_lapse_when_port_forwards_stop() {
        let timing = Timing {
            keep_warm: Duration::from_millis(100),
            ..FAST
        };
        let (fake, _c, spares) = pool(2, timing);
        spares.demand();
        settle().await;
        assert_eq!(spares.ready(), 2);
        // They expire (max_age) after keep_warm has passed: not replaced.
        tokio::time::sleep(timing.max_age + Duration::from_millis(100)).await;
        settle().await;
        assert_eq!((fake.made.load(Ordering::SeqCst), spares.ready()), (2, 0));
    }

    #[tokio::test]
    async fn a_tcp_spare_is_closed_once_the_peer_closed_even_with_unread_bytes() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ours = TokioIo::new(
            tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap(),
        );
        let (mut theirs, _) = listener.accept().await.unwrap();
        assert!(!ours.is_closed());
        // What a TLS server sends unasked after its handshake (session tickets): still open.
        theirs.write_all(b"tickets").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!ours.is_closed());
        drop(theirs);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(ours.is_closed());
    }

    #[test]
    fn spares_can_be_turned_off() {
        let (_, _, spares) = pool(0, FAST);
        spares.demand();
        assert_eq!(spares.ready(), 0);
    }
}
