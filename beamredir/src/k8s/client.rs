//! The HTTP client to the API server: kube's own layers (base URI, authentication with
//! credential plugins, extra headers) on a connector tuned for long-lived port-forwards:
//! * TCP_NODELAY: a port-forward carries small Erlang messages both ways (kube's default
//!   connector leaves Nagle on, which delays them behind unacknowledged data);
//! * TCP keepalive: a dead API-server connection (blackholed, rebooted NAT) is noticed within
//!   about a minute, so its relays and watches end instead of hanging;
//! * the proxy chosen as kubectl chooses it ([`super::proxy`]: the kubeconfig's `proxy-url`,
//!   else `HTTPS_PROXY` unless `NO_PROXY` matches the API server): an HTTP CONNECT tunnel, over
//!   TLS for an `https://` proxy;
//! * spare connections ([`super::spares`]): while port-forwards are being opened, a couple of
//!   connections to the API server are kept ready, TCP and TLS handshakes done, so the next
//!   port-forward's upgrade starts at once instead of after two or three round trips;
//! * reads of [`READ_AHEAD`] bytes under TLS ([`ReadAhead`]), not rustls's 4 KiB steps.
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Uri};
use hyper_util::{
    client::legacy::connect::{HttpConnector, proxy::Tunnel},
    rt::TokioExecutor,
};
use kube::client::ConfigExt;
use tower::{BoxError, Service, ServiceBuilder};

use super::{
    deadline::Deadlines,
    error::{K8sError, chain},
    spares::{Liveness, Spares, with_spares},
};

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

fn build<C>(config: &kube::Config, connector: C, request_timeout: Duration) -> Result<(kube::Client, Spares), K8sError>
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
        .service(Deadlines::new(http, request_timeout));
    Ok((
        kube::Client::new(service, config.default_namespace.clone()),
        spares,
    ))
}

/// A client for `config`, through the proxy kube chose, if any, and its spare connections.
pub fn client(config: &kube::Config, request_timeout: Duration) -> Result<(kube::Client, Spares), K8sError> {
    match &config.proxy_url {
        None => build(config, ReadAheadConnector(tcp_connector()), request_timeout),
        Some(proxy) if proxy.scheme_str() == Some("http") => {
            let mut tunnel = Tunnel::new(proxy.clone(), ReadAheadConnector(tcp_connector()));
            if let Some(auth) = proxy_auth(proxy) {
                tunnel = tunnel.with_auth(auth);
            }
            build(config, tunnel, request_timeout)
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
            build(config, tunnel, request_timeout)
        }
        Some(proxy) => Err(K8sError::Kubeconfig(format!(
            "proxy {proxy}: only http:// and https:// proxies are supported (from the kubeconfig's proxy-url or HTTPS_PROXY)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn proxy_credentials_are_decoded() {
        let uri: http::Uri = "http://us%40er:p%3Ass@proxy:3128".parse().unwrap();
        assert_eq!(super::proxy_auth(&uri).unwrap(), "Basic dXNAZXI6cDpzcw==");
        assert!(super::proxy_auth(&"http://proxy:3128".parse().unwrap()).is_none());
    }
}
