//! Which proxy carries the connection to the API server, decided as kubectl (client-go) decides
//! it:
//!
//! * the kubeconfig cluster's `proxy-url`, if it has one, always (client-go's
//!   `http.ProxyURL`: `NO_PROXY` does not apply to it);
//! * else `HTTPS_PROXY`/`https_proxy` (`HTTP_PROXY`/`http_proxy` for an `http://` server), unless
//!   the server is `localhost` or a loopback address, or `NO_PROXY`/`no_proxy` matches it (Go's
//!   `httpproxy`: `*`; an IP; a CIDR; a domain, which also matches its subdomains, or with a
//!   leading `.` (or `*.`) only its subdomains; each optionally with `:PORT`).
//!
//! kube-client 5 would match `NO_PROXY` against the proxy's own address rather than the API
//! server's, and apply it to `proxy-url` too, so a `NO_PROXY` naming the API server was
//! ignored and the proxy used anyway. So the choice is made here and handed to kube.
use std::net::IpAddr;

use http::Uri;

/// Where the connection to the API server goes, and why (for messages).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// Through this proxy, from the kubeconfig's `proxy-url`.
    Kubeconfig(Uri),
    /// Through this proxy, from the named environment variable.
    Env(Uri, &'static str),
    /// Direct: no proxy configured.
    Direct,
    /// Direct: the server is on this machine (`localhost`, a loopback address), which proxies
    /// never carry.
    Local,
    /// Direct although a proxy is configured in the environment: NO_PROXY (the named variable)
    /// matches the server.
    Bypassed(&'static str),
}

impl Route {
    pub fn proxy(&self) -> Option<&Uri> {
        match self {
            Route::Kubeconfig(p) | Route::Env(p, _) => Some(p),
            Route::Direct | Route::Local | Route::Bypassed(_) => None,
        }
    }

    /// Said after "cannot reach the API server at URL: …" so the user sees which way it went.
    pub fn hint(&self) -> String {
        match self {
            Route::Kubeconfig(p) => format!(" (through proxy {}, the kubeconfig's proxy-url)", clean(p)),
            Route::Env(p, var) => format!(" (through proxy {} from {var})", clean(p)),
            Route::Direct => " (directly: no proxy is set; if the API server is only reachable through one, set proxy-url in the kubeconfig's cluster or HTTPS_PROXY)".into(),
            Route::Local => String::new(),
            Route::Bypassed(why) => format!(" (directly: {why})"),
        }
    }
}

/// A proxy URL for messages: without credentials.
pub fn clean(p: &Uri) -> String {
    let s = p.to_string();
    match s.split_once("://").and_then(|(scheme, rest)| {
        rest.rsplit_once('@')
            .map(|(_, host)| format!("{scheme}://{host}"))
    }) {
        Some(c) => c,
        None => s,
    }
}

fn parse(raw: &str, source: &str) -> Result<Uri, String> {
    // Go accepts a bare host:port and takes it as http://.
    let with_scheme = if raw.contains("://") {
        raw.to_string()
    } else {
        format!("http://{raw}")
    };
    with_scheme
        .parse::<Uri>()
        .map_err(|e| format!("proxy {:?} ({source}) is not a URL: {e}", clean_str(raw)))
}

fn clean_str(raw: &str) -> String {
    match raw.rsplit_once('@') {
        Some((before, host)) => match before.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://{host}"),
            None => host.to_string(),
        },
        None => raw.to_string(),
    }
}

/// The route to `server`: `kubeconfig_proxy` is the cluster's `proxy-url`; `env` reads the
/// environment (a parameter, for tests).
pub fn choose(
    kubeconfig_proxy: Option<&str>,
    server: &Uri,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Route, String> {
    if let Some(p) = kubeconfig_proxy.filter(|p| !p.is_empty()) {
        return parse(p, "the kubeconfig's proxy-url").map(Route::Kubeconfig);
    }
    let first = |names: &[&'static str]| {
        names
            .iter()
            .find_map(|n| env(n).filter(|v| !v.is_empty()).map(|v| (*n, v)))
    };
    let https = server.scheme_str() != Some("http");
    let host = server
        .host()
        .unwrap_or("")
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = server.port_u16().unwrap_or(if https { 443 } else { 80 });
    let ip: Option<IpAddr> = host.parse().ok();
    if host == "localhost" || ip.is_some_and(|i| i.is_loopback()) {
        return Ok(Route::Local);
    }
    let Some((var, raw)) = first(if https {
        &["HTTPS_PROXY", "https_proxy"]
    } else {
        &["HTTP_PROXY", "http_proxy"]
    }) else {
        return Ok(Route::Direct);
    };
    if let Some((no_var, list)) = first(&["NO_PROXY", "no_proxy"]) {
        if no_proxy_matches(&list, &host, ip, port) {
            return Ok(Route::Bypassed(if no_var == "NO_PROXY" {
                "NO_PROXY matches it"
            } else {
                "no_proxy matches it"
            }));
        }
    }
    parse(&raw, var).map(|p| Route::Env(p, var))
}

/// Go's `httpproxy` NO_PROXY matching for one host.
pub fn no_proxy_matches(list: &str, host: &str, ip: Option<IpAddr>, port: u16) -> bool {
    for entry in list
        .split(',')
        .map(|e| e.trim().to_ascii_lowercase())
        .filter(|e| !e.is_empty())
    {
        if entry == "*" {
            return true;
        }
        if let Some((net, bits)) = entry.split_once('/') {
            if let (Ok(net), Ok(bits), Some(ip)) = (net.parse::<IpAddr>(), bits.parse::<u8>(), ip) {
                if in_cidr(ip, net, bits) {
                    return true;
                }
            }
            continue;
        }
        let (entry_host, entry_port) = split_host_port(&entry);
        if entry_port.is_some_and(|p| p != port) {
            continue;
        }
        if let Ok(entry_ip) = entry_host.parse::<IpAddr>() {
            if ip == Some(entry_ip) {
                return true;
            }
            continue;
        }
        let entry_host = entry_host.strip_prefix('*').unwrap_or(entry_host);
        let matched = match entry_host.strip_prefix('.') {
            // ".example.com": subdomains only.
            Some(_) => host.ends_with(entry_host),
            // "example.com": itself and its subdomains.
            None => host == entry_host || host.ends_with(&format!(".{entry_host}")),
        };
        if matched {
            return true;
        }
    }
    false
}

/// `host:port`, `[v6]:port`, `host`, `v6` (no brackets: no port).
fn split_host_port(entry: &str) -> (&str, Option<u16>) {
    if let Some(rest) = entry.strip_prefix('[') {
        if let Some((h, after)) = rest.split_once(']') {
            return (h, after.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match entry.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    }
}

fn in_cidr(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    fn route(
        kc: Option<&str>,
        server: &str,
        pairs: &'static [(&'static str, &'static str)],
    ) -> Route {
        choose(kc, &server.parse().unwrap(), &env(pairs)).unwrap()
    }

    #[test]
    fn kubeconfig_proxy_url_wins_and_ignores_no_proxy() {
        let r = route(
            Some("http://p:3128"),
            "https://10.0.0.1:6443",
            &[("HTTPS_PROXY", "http://other:1"), ("NO_PROXY", "*")],
        );
        assert_eq!(r, Route::Kubeconfig("http://p:3128".parse().unwrap()));
    }

    #[test]
    fn https_proxy_unless_no_proxy_matches_the_server_not_the_proxy() {
        let proxy = &[("HTTPS_PROXY", "http://172.30.0.1:8888")];
        assert_eq!(
            route(None, "https://172.31.0.2:6443", proxy),
            Route::Env("http://172.30.0.1:8888".parse().unwrap(), "HTTPS_PROXY")
        );
        // NO_PROXY naming the proxy's own address does not bypass (kube-client 5 did).
        assert!(
            route(
                None,
                "https://172.31.0.2:6443",
                &[
                    ("HTTPS_PROXY", "http://172.30.0.1:8888"),
                    ("NO_PROXY", "172.30.0.1")
                ]
            )
            .proxy()
            .is_some()
        );
        for no in [
            "172.31.0.2",
            "172.31.0.0/16",
            "*",
            " 10.0.0.0/8 , 172.31.0.2:6443",
            "example.com,172.31.0.2",
        ] {
            let pairs: &'static [(&'static str, &'static str)] = Box::leak(Box::new([
                ("HTTPS_PROXY", "http://172.30.0.1:8888"),
                ("no_proxy", no),
            ]));
            assert_eq!(
                route(None, "https://172.31.0.2:6443", pairs),
                Route::Bypassed("no_proxy matches it"),
                "{no}"
            );
        }
        assert!(
            route(
                None,
                "https://172.31.0.2:6443",
                &[("HTTPS_PROXY", "p:8888"), ("NO_PROXY", "172.31.0.2:443")]
            )
            .proxy()
            .is_some(),
            "another port"
        );
        // HTTP_PROXY is for http:// servers only.
        assert_eq!(
            route(
                None,
                "https://k8s.example.com",
                &[("HTTP_PROXY", "http://p:1")]
            ),
            Route::Direct
        );
        assert!(
            route(
                None,
                "http://k8s.example.com",
                &[("http_proxy", "http://p:1")]
            )
            .proxy()
            .is_some()
        );
        // A bare host:port proxy is http://.
        assert_eq!(
            route(
                None,
                "https://k8s.example.com",
                &[("https_proxy", "p:3128")]
            )
            .proxy()
            .unwrap()
            .to_string(),
            "http://p:3128/"
        );
    }

    #[test]
    fn loopback_servers_never_go_through_a_proxy() {
        for server in [
            "https://127.0.0.1:6443",
            "https://localhost:6443",
            "https://[::1]:6443",
        ] {
            assert!(
                route(None, server, &[("HTTPS_PROXY", "http://p:1")]) == Route::Local,
                "{server}"
            );
            assert_eq!(route(None, server, &[]).hint(), "", "{server}");
        }
    }

    #[test]
    fn domains_match_like_go() {
        let m = |list: &str, host: &str| no_proxy_matches(list, host, host.parse().ok(), 443);
        assert!(m("example.com", "example.com"));
        assert!(m("example.com", "api.example.com"));
        assert!(!m("example.com", "badexample.com"));
        assert!(m(".example.com", "api.example.com"));
        assert!(!m(".example.com", "example.com"));
        assert!(m("*.example.com", "api.example.com"));
        assert!(m("EXAMPLE.com:443", "api.example.com"));
        assert!(!m("example.com:8443", "api.example.com"));
        assert!(m("fd00::/8", "fd00::1"));
        assert!(m("[fd00::1]:443", "fd00::1"));
        assert!(!m("10.0.0.0/8", "example.com"));
    }

    #[test]
    fn credentials_never_show() {
        assert_eq!(
            clean(&"http://user:pw@p:3128".parse().unwrap()),
            "http://p:3128/"
        );
        assert!(
            Route::Env("http://u:p@proxy:1".parse().unwrap(), "HTTPS_PROXY")
                .hint()
                .contains("http://proxy:1/ from HTTPS_PROXY")
        );
    }
}
