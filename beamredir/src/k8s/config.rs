//! Finding the cluster the way kubectl does: `--kubeconfig`, `KUBECONFIG` (merged), then
//! `~/.kube/config`, then in-cluster config; `--context`; `-n/--namespace`, else the
//! context's, else `default`. This runs in the network part, as the invoking user, so "~" is
//! that user's home and the kubeconfig is read with that user's permissions.
use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};
use serde::{Deserialize, Serialize};

use super::error::{K8sError, chain, transport};

/// kubectl's flags, as `beamredir up` takes them.
#[derive(clap::Args, Clone, Debug, Serialize, Deserialize)]
pub struct KubeArgs {
    /// Path to the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config of the user who ran sudo).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current-context).
    #[arg(long)]
    pub context: Option<String>,
    /// Namespace of the pods (default: the context's namespace, else "default").
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// How long an API request may take to be answered (0: no limit, as kubectl's default); watches and port-forward streams are bounded otherwise.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = crate::flags::parse_wait)]
    pub request_timeout: std::time::Duration,
}

impl Default for KubeArgs {
    fn default() -> Self {
        KubeArgs {
            kubeconfig: None,
            context: None,
            namespace: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }
}

/// `--request-timeout`'s default: long enough for a large list over a slow link, short enough
/// that a hung API server or proxy is named before the user gives up.
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A client for one cluster, plus what messages need to name.
#[derive(Clone)]
pub struct Cluster {
    pub client: kube::Client,
    /// Connections to the API server kept ready for port-forwards (see [`super::client`]).
    pub spares: super::spares::Spares,
    pub namespace: String,
    /// The API server URL, for messages.
    pub url: String,
    /// Where the configuration came from, for messages.
    pub source: String,
    /// The proxy in use, for messages.
    pub proxy: Option<String>,
    /// How the API server is reached (which proxy, or why none), for messages.
    pub route: super::proxy::Route,
}

fn read(path: &Path) -> Result<Kubeconfig, K8sError> {
    Kubeconfig::read_from(path).map_err(|e| K8sError::KubeconfigUnreadable {
        path: path.to_path_buf(),
        reason: chain(&e),
    })
}

/// Loads the kubeconfig chosen by the flags and environment, or None for in-cluster config.
fn load_kubeconfig(args: &KubeArgs) -> Result<Option<(Kubeconfig, String)>, K8sError> {
    if let Some(path) = &args.kubeconfig {
        return Ok(Some((read(path)?, path.display().to_string())));
    }
    if let Some(value) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        // Like kubectl: a colon-separated list, merged in order; missing files are skipped.
        let mut merged: Option<Kubeconfig> = None;
        for path in std::env::split_paths(&value).filter(|p| p.exists()) {
            let next = read(&path)?;
            merged = Some(match merged {
                None => next,
                Some(m) => m
                    .merge(next)
                    .map_err(|e| K8sError::Kubeconfig(e.to_string()))?,
            });
        }
        return match merged {
            Some(k) => Ok(Some((k, format!("KUBECONFIG={}", value.to_string_lossy())))),
            None => Err(K8sError::NoKubeconfig {
                looked_at: format!("KUBECONFIG={} (no such file)", value.to_string_lossy()),
            }),
        };
    }
    let default = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config"));
    if let Some(path) = default.as_ref().filter(|p| p.exists()) {
        return Ok(Some((read(path)?, path.display().to_string())));
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Ok(None);
    }
    Err(K8sError::NoKubeconfig {
        looked_at: default
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "no home directory".into()),
    })
}

impl Cluster {
    pub async fn connect(args: &KubeArgs) -> Result<Self, K8sError> {
        // kube's rustls needs a process-wide crypto provider; a second install is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (mut config, source, proxy_url) = match load_kubeconfig(args)? {
            Some((mut kubeconfig, source)) => {
                super::plugins::resolve(&mut kubeconfig).await?;
                if let Some(context) = &args.context {
                    if !kubeconfig.contexts.iter().any(|c| &c.name == context) {
                        let available = kubeconfig
                            .contexts
                            .iter()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ");
                        return Err(K8sError::ContextNotFound {
                            context: context.clone(),
                            available,
                        });
                    }
                }
                let options = KubeConfigOptions {
                    context: args.context.clone(),
                    ..Default::default()
                };
                let proxy_url = kubeconfig_proxy_url(&kubeconfig, args.context.as_deref());
                let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| K8sError::Kubeconfig(format!("{source}: {}", chain(&e))))?;
                (config, source, proxy_url)
            }
            None => {
                let config = kube::Config::incluster()
                    .map_err(|e| K8sError::Kubeconfig(format!("in-cluster config: {e}")))?;
                (config, "in-cluster service account".to_string(), None)
            }
        };
        // The proxy as kubectl would choose it (see [`super::proxy`]), not as kube did.
        let route = super::proxy::choose(proxy_url.as_deref(), &config.cluster_url, &|k| {
            std::env::var(k).ok()
        })
        .map_err(K8sError::Kubeconfig)?;
        config.proxy_url = route.proxy().cloned();
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| config.default_namespace.clone());
        let url = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_string();
        // Never show proxy credentials.
        let proxy = route
            .proxy()
            .map(|p| super::proxy::clean(p).trim_end_matches('/').to_string());
        let (client, spares) = super::client::client(&config, args.request_timeout).map_err(|e| match e {
            K8sError::Kubeconfig(reason) => transport(&std::io::Error::other(reason), &url),
            other => other,
        })?;
        Ok(Cluster {
            client,
            spares,
            namespace,
            url,
            source,
            proxy,
            route,
        })
    }

    /// Adds which way the API server was dialled to an "unreachable" error: through which
    /// proxy, or directly and why.
    pub fn explain(&self, e: K8sError) -> K8sError {
        match e {
            K8sError::Unreachable { url, reason, hint } if hint.is_empty() => {
                K8sError::Unreachable {
                    url,
                    reason,
                    hint: self.route.hint(),
                }
            }
            other => other,
        }
    }
}

/// The `proxy-url` of the cluster the kubeconfig's (or `--context`'s) context uses.
fn kubeconfig_proxy_url(kubeconfig: &Kubeconfig, context: Option<&str>) -> Option<String> {
    let context = context.or(kubeconfig.current_context.as_deref())?;
    let cluster = &kubeconfig
        .contexts
        .iter()
        .find(|c| c.name == context)?
        .context
        .as_ref()?
        .cluster;
    kubeconfig
        .clusters
        .iter()
        .find(|c| &c.name == cluster)?
        .cluster
        .as_ref()?
        .proxy_url
        .clone()
}
