//! The HTTP client to the API server: kube's own layers (base URI, authentication with
//! credential plugins, extra headers) on a connector tuned for long-lived port-forwards:
//! * TCP_NODELAY: a port-forward carries small Erlang messages both ways (kube's default
//!   connector leaves Nagle on, which delays them behind unacknowledged data);
//! * TCP keepalive: a dead API-server connection (blackholed, rebooted NAT) is noticed within
//!   about a minute, so its relays and watches end instead of hanging;
//! * the proxy chosen as kubectl chooses it ([`super::proxy`]: the kubeconfig's `proxy-url`,
//!   else `HTTPS_PROXY` unless `NO_PROXY` matches the API server): an HTTP CONNECT tunnel, over
//!   TLS for an `https://` proxy.
use std::time::Duration;

use http::{HeaderValue, Uri};
use hyper_util::{
    client::legacy::connect::{HttpConnector, proxy::Tunnel},
    rt::TokioExecutor,
};
use kube::client::ConfigExt;
use tower::{BoxError, ServiceBuilder};

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

fn build<C>(config: &kube::Config, connector: C) -> Result<kube::Client, K8sError>
where
    C: tower::Service<Uri> + Clone + Send + Sync + 'static,
    C::Response: hyper::rt::Read
        + hyper::rt::Write
        + hyper_util::client::legacy::connect::Connection
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
    let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(fail)?)
        .layer(config.extra_headers_layer().map_err(fail)?)
        .map_err(BoxError::from)
        .service(http);
    Ok(kube::Client::new(service, config.default_namespace.clone()))
}

/// A client for `config`, through the proxy kube chose, if any.
pub fn client(config: &kube::Config) -> Result<kube::Client, K8sError> {
    match &config.proxy_url {
        None => build(config, tcp_connector()),
        Some(proxy) if proxy.scheme_str() == Some("http") => {
            let mut tunnel = Tunnel::new(proxy.clone(), tcp_connector());
            if let Some(auth) = proxy_auth(proxy) {
                tunnel = tunnel.with_auth(auth);
            }
            build(config, tunnel)
        }
        Some(proxy) if proxy.scheme_str() == Some("https") => {
            // TLS to the proxy, then CONNECT, then TLS to the API server inside.
            let to_proxy = config
                .rustls_https_connector_with_connector(tcp_connector())
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
    #[test]
    fn proxy_credentials_are_decoded() {
        let uri: http::Uri = "http://us%40er:p%3Ass@proxy:3128".parse().unwrap();
        assert_eq!(super::proxy_auth(&uri).unwrap(), "Basic dXNAZXI6cDpzcw==");
        assert!(super::proxy_auth(&"http://proxy:3128".parse().unwrap()).is_none());
    }
}
