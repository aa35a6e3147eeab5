//! The HTTP client to the API server: kube's own layers (base URI, authentication with
//! credential plugins, extra headers) on a connector tuned for long-lived port-forwards:
//! * TCP_NODELAY: a port-forward carries small Erlang messages both ways (kube's default
//!   connector leaves Nagle on, which delays them behind unacknowledged data);
//! * TCP keepalive: a dead API-server connection (blackholed, rebooted NAT) is noticed within
//!   about a minute, so its relays and watches end instead of hanging;
//! * the proxy chosen as kubectl chooses it ([`super::proxy`]: the kubeconfig's `proxy-url`,
//!   else `HTTPS_PROXY` unless `NO_PROXY` matches the API server): an HTTP CONNECT tunnel, over
//!   TLS for an `https://` proxy;
//! * spare connections ([`Spares`]): while port-forwards are being opened, a couple of
//!   connections to the API server are kept ready, TCP and TLS handshakes done, so the next
//!   port-forward's upgrade starts at once instead of after two or three round trips;
//! * reads of [`READ_AHEAD`] bytes under TLS ([`ReadAhead`]), not rustls's 4 KiB steps.
use std::{
    future::Future,
    os::fd::AsRawFd,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderValue, Uri};
use hyper_util::{
    client::legacy::connect::{HttpConnector, proxy::Tunnel},
    rt::{TokioExecutor, TokioIo},
};
use kube::client::ConfigExt;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

use super::error::{K8sError, chain};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle time before the first keepalive probe, the interval between probes, and how many
/// unanswered probes end the connection: dead after 20 + 3 × 10 = 50 s of silence.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(20);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_RETRIES: u32 = 3;

fn tcp_connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.enforce_http(false);
    c.set_nodelay(true);
    c.set_keepalive(Some(KEEPALIVE_IDLE));
    c.set_keepalive_interval(Some(KEEPALIVE_INTERVAL));
    c.set_keepalive_retries(Some(KEEPALIVE_RETRIES));
    c.set_connect_timeout(Some(CONNECT_TIMEOUT));
    c
}

/// `user:pass@` in a proxy URL becomes a Proxy-Authorization header (percent-decoded first).
fn proxy_auth(proxy: &Uri) -> Option<HeaderValue> {
    use base64::Engine;
    let authority = proxy.authority()?.as_str();
    let (userinfo, _) = authority.rsplit_once('@')?;
    let decoded = percent_decode(userinfo);
    HeaderValue::from_str(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(decoded)
    ))
    .ok()
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

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

/// What one read(2) of an API-server connection may return. rustls asks its transport for at
/// most 4 KiB at a time (its deframer grows by that step), so a 16 KiB TLS record took four
/// or five reads and a 64 KiB message sixteen; reading ahead makes it one per 32 KiB.
const READ_AHEAD: usize = 32 * 1024;

/// The TCP connection under TLS, read [`READ_AHEAD`] bytes at a time. The buffer exists only
/// while the connection has data: it is freed when a read finds nothing (an idle connection
/// holds none, so a hundred open forwards cost no more memory than before).
pub struct ReadAhead<T> {
    inner: T,
    buf: Vec<u8>,
    pos: usize,
}

impl<T> ReadAhead<T> {
    fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut out: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.buf.len() {
            this.buf.clear();
            this.pos = 0;
            if out.remaining() >= READ_AHEAD {
                // A large read gains nothing from the buffer.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.reserve_exact(READ_AHEAD);
            let mut rb =
                hyper::rt::ReadBuf::uninit(&mut this.buf.spare_capacity_mut()[..READ_AHEAD]);
            match Pin::new(&mut this.inner).poll_read(cx, rb.unfilled()) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    // SAFETY: the inner read initialised the first n bytes of the spare capacity.
                    unsafe { this.buf.set_len(n) };
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    this.buf = Vec::new();
                    return Poll::Pending;
                }
            }
        }
        let n = out.remaining().min(this.buf.len() - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: hyper_util::client::legacy::connect::Connection>
    hyper_util::client::legacy::connect::Connection for ReadAhead<T>
{
    fn connected(&self) -> hyper_util::client::legacy::connect::Connected {
        self.inner.connected()
    }
}

impl<T: Liveness> Liveness for ReadAhead<T> {
    fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }
}

/// A connector whose connections are [`ReadAhead`]s.
#[derive(Clone)]
struct ReadAheadConnector<C>(C);

impl<C> Service<Uri> for ReadAheadConnector<C>
where
    C: Service<Uri>,
    C::Future: Send + 'static,
    C::Response: Send + 'static,
{
    type Response = ReadAhead<C::Response>;
    type Error = C::Error;
    type Future = Pin<Box<dyn Future<Output = Result<ReadAhead<C::Response>, C::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), C::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.0.call(uri);
        Box::pin(async move { connecting.await.map(ReadAhead::new) })
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
struct Pool<S: Service<Uri>> {
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
struct PreConnect<S: Service<Uri>>(Arc<Pool<S>>);

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
fn with_spares<S>(config: &kube::Config, connector: S) -> (PreConnect<S>, Spares)
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

fn build<C>(config: &kube::Config, connector: C) -> Result<(kube::Client, Spares), K8sError>
where
    C: tower::Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read
        + hyper::rt::Write
        + hyper_util::client::legacy::connect::Connection
        + Liveness
        + Send
        + Unpin
        + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    let fail = |e: kube::Error| K8sError::Kubeconfig(chain(&e));
    let https = config
        .rustls_https_connector_with_connector(connector)
        .map_err(fail)?;
    let (https, spares) = with_spares(config, https);
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(fail)?)
        .layer(config.extra_headers_layer().map_err(fail)?)
        .map_err(BoxError::from)
        .service(http);
    Ok((
        kube::Client::new(service, config.default_namespace.clone()),
        spares,
    ))
}

/// A client for `config`, through the proxy kube chose, if any, and its spare connections.
pub fn client(config: &kube::Config) -> Result<(kube::Client, Spares), K8sError> {
    match &config.proxy_url {
        None => build(config, ReadAheadConnector(tcp_connector())),
        Some(proxy) if proxy.scheme_str() == Some("http") => {
            let mut tunnel = Tunnel::new(proxy.clone(), ReadAheadConnector(tcp_connector()));
            if let Some(auth) = proxy_auth(proxy) {
                tunnel = tunnel.with_auth(auth);
            }
            build(config, tunnel)
        }
        Some(proxy) if proxy.scheme_str() == Some("https") => {
            // TLS to the proxy, then CONNECT, then TLS to the API server inside.
            let to_proxy = config
                .rustls_https_connector_with_connector(ReadAheadConnector(tcp_connector()))
                .map_err(|e| K8sError::Kubeconfig(chain(&e)))?;
            let mut tunnel = Tunnel::new(proxy.clone(), to_proxy);
            if let Some(auth) = proxy_auth(proxy) {
                tunnel = tunnel.with_auth(auth);
            }
            build(config, tunnel)
        }
        Some(proxy) => Err(K8sError::Kubeconfig(format!(
            "proxy {proxy}: only http:// and https:// proxies are supported (from the kubeconfig's proxy-url or HTTPS_PROXY)"
        ))),
    }
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

    /// Hands out `data` at most `per_read` bytes per read, then Pending; counts reads.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        per_read: usize,
        reads: usize,
    }

    impl hyper::rt::Read for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            mut out: hyper::rt::ReadBufCursor<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            if this.pos == this.data.len() {
                return Poll::Pending;
            }
            this.reads += 1;
            let n = out
                .remaining()
                .min(this.per_read)
                .min(this.data.len() - this.pos);
            out.put_slice(&this.data[this.pos..this.pos + n]);
            this.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn read_ahead_serves_small_reads_from_one_large_one_and_frees_its_buffer_when_idle() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let inner = Trickle {
            data: data.clone(),
            pos: 0,
            per_read: usize::MAX,
            reads: 0,
        };
        let mut ra = ReadAhead::new(inner);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut got = Vec::new();
        loop {
            // What rustls asks for: 4 KiB at a time.
            let mut chunk = [0u8; 4096];
            let mut rb = hyper::rt::ReadBuf::new(&mut chunk);
            match hyper::rt::Read::poll_read(Pin::new(&mut ra), &mut cx, rb.unfilled()) {
                Poll::Ready(Ok(())) => got.extend_from_slice(rb.filled()),
                Poll::Ready(Err(e)) => panic!("{e}"),
                Poll::Pending => break,
            }
        }
        assert_eq!(got, data);
        // 100 000 bytes in 32 KiB reads: 4, where 4 KiB reads took 25.
        assert_eq!(ra.inner.reads, 100_000usize.div_ceil(READ_AHEAD));
        assert_eq!(ra.buf.capacity(), 0, "an idle connection holds no buffer");
    }

    #[test]
    fn spares_can_be_turned_off() {
        let (_, _, spares) = pool(0, FAST);
        spares.demand();
        assert_eq!(spares.ready(), 0);
    }

    #[test]
    fn proxy_credentials_are_decoded() {
        let uri: http::Uri = "http://us%40er:p%3Ass@proxy:3128".parse().unwrap();
        assert_eq!(super::proxy_auth(&uri).unwrap(), "Basic dXNAZXI6cDpzcw==");
        assert!(super::proxy_auth(&"http://proxy:3128".parse().unwrap()).is_none());
    }
}
