//! What went wrong talking to Kubernetes, phrased for the person at the keyboard.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "no kubeconfig found (looked at {looked_at}); pass --kubeconfig PATH or set KUBECONFIG"
    )]
    NoKubeconfig { looked_at: String },
    #[error("cannot read kubeconfig {path}: {reason}")]
    KubeconfigUnreadable { path: PathBuf, reason: String },
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error(
        "context {context:?} not found in the kubeconfig (available: {available}); see `kubectl config get-contexts`"
    )]
    ContextNotFound { context: String, available: String },
    #[error("cannot reach the Kubernetes API server at {url}{hint}: {reason}")]
    Unreachable {
        url: String,
        reason: String,
        /// Which way it was dialled (through which proxy, or directly and why).
        hint: String,
    },
    #[error(
        "TLS failure talking to the Kubernetes API server at {url}: {reason} (check the cluster's certificate-authority in your kubeconfig)"
    )]
    Tls { url: String, reason: String },
    #[error(
        "the API server at {url} rejected our credentials (401 Unauthorized) for {verb} {resource}: {message}; refresh your kubeconfig's token or certificate"
    )]
    Unauthorized {
        url: String,
        verb: String,
        resource: String,
        message: String,
    },
    #[error(
        "forbidden (403): you may not {verb} {resource} in namespace {namespace:?} ({message}); {grant}"
    )]
    Forbidden {
        verb: String,
        resource: String,
        namespace: String,
        message: String,
        grant: String,
    },
    #[error(
        "credential plugin {plugin:?} (kubeconfig user {user:?}) was not found in your PATH (looked in {searched}); install it, or give its full path as exec.command in the kubeconfig"
    )]
    PluginNotFound {
        plugin: String,
        user: String,
        searched: String,
    },
    #[error("{what} not found in namespace {namespace:?}")]
    NotFound { what: String, namespace: String },
    #[error("no pods match {what} in namespace {namespace:?}")]
    NoPods { what: String, namespace: String },
    #[error("namespace {0:?} not found; see `kubectl get namespaces`")]
    NamespaceNotFound(String),
    #[error("pod {name:?} not found in namespace {namespace:?}{suggestions}")]
    PodNotFound {
        name: String,
        namespace: String,
        suggestions: String,
    },
    #[error("pod {namespace}/{name} cannot be reached: {why}")]
    PodNotReachable {
        name: String,
        namespace: String,
        why: String,
    },
    #[error(
        "no Erlang distribution port known for pod {namespace}/{name} (the pod spec names none and its epmd has no node registered): pass --dist-port PORT, name a container port `erlang` or `dist`, or set ERL_DIST_PORT in the container"
    )]
    NoDistPort { name: String, namespace: String },
    #[error("Kubernetes API error for {verb} {resource}: {message}")]
    Api {
        verb: String,
        resource: String,
        message: String,
    },
    #[error("port-forward to {pod} port {port}: {reason}")]
    PortForward {
        pod: String,
        port: u16,
        reason: String,
    },
}

/// Renders an error chain on one line (only the first line of each cause: parsers add
/// multi-line source excerpts).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    // kube wraps what the HTTP stack said as "ServiceError: …"; the words after it are the news.
    let first_line = |e: &dyn std::error::Error| {
        let text = e.to_string();
        let line = text.lines().next().unwrap_or("").trim();
        line.strip_prefix("ServiceError: ").unwrap_or(line).to_string()
    };
    let mut parts = vec![first_line(e)];
    let mut source = e.source();
    while let Some(s) = source {
        let text = first_line(s);
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

/// Classifies a kube error for a request `verb resource` in `namespace` against `url`.
pub fn classify(
    err: kube::Error,
    url: &str,
    verb: &str,
    resource: &str,
    namespace: &str,
) -> K8sError {
    match err {
        kube::Error::Api(status) => {
            let message = status.message.clone();
            match status.code {
                401 => K8sError::Unauthorized {
                    url: url.into(),
                    verb: verb.into(),
                    resource: resource.into(),
                    message,
                },
                403 => K8sError::Forbidden {
                    verb: verb.into(),
                    resource: resource.into(),
                    namespace: namespace.into(),
                    message,
                    grant: super::authz::grant_hint(resource, &[verb], None),
                },
                _ => K8sError::Api {
                    verb: verb.into(),
                    resource: resource.into(),
                    message: format!("{} ({})", message, status.code),
                },
            }
        }
        other => transport(&other, url),
    }
}

/// A transport-level failure: TLS, connection refused, DNS, timeouts.
pub fn transport(err: &(dyn std::error::Error + 'static), url: &str) -> K8sError {
    let reason = chain(err);
    let lower = reason.to_lowercase();
    if [
        "certificate",
        "tls",
        "handshake",
        "unknownissuer",
        "badsignature",
        "notvalidforname",
    ]
    .iter()
    .any(|w| lower.contains(w))
    {
        K8sError::Tls {
            url: url.into(),
            reason,
        }
    } else {
        K8sError::Unreachable {
            url: url.into(),
            reason,
            hint: String::new(),
        }
    }
}
