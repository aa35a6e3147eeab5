//! Finding the cluster the way kubectl does: `--kubeconfig`, `KUBECONFIG`, `~/.kube/config`
//! (the *invoking* user's under sudo, since sudo drops KUBECONFIG and root's home has none),
//! then in-cluster config; `--context`; `-n/--namespace`, else the context's, else `default`.
use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};

use super::error::{K8sError, transport};

/// kubectl's flags, as `beamredir up` takes them.
#[derive(clap::Args, Clone, Debug, Default)]
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
}

/// A client for one cluster, plus what messages need to name.
#[derive(Clone)]
pub struct Cluster {
    pub client: kube::Client,
    pub namespace: String,
    /// The API server URL, for messages.
    pub url: String,
    /// Where the configuration came from, for messages.
    pub source: String,
}

/// The invoking user's home when running under sudo, else $HOME.
fn user_home() -> Option<PathBuf> {
    if nix::unistd::geteuid().is_root() {
        if let Ok(user) = std::env::var("SUDO_USER") {
            if let Ok(Some(u)) = nix::unistd::User::from_name(&user) {
                return Some(u.dir);
            }
        }
    }
    std::env::var_os("HOME").map(PathBuf::from)
}

/// The hidden subcommand that runs a credential plugin as the user who invoked sudo.
pub const RUN_AS_INVOKING_USER: &str = "__run-as-invoking-user";

/// Under sudo, credential plugins from the user's kubeconfig (`exec`, and the legacy
/// auth-provider `cmd-path`) must not run as root: that would turn any command in a
/// kubeconfig into a root command, and plugins (aws, gcloud, kubelogin) look for the user's
/// files in the user's HOME. They are routed through `beamredir __run-as-invoking-user`,
/// which drops to SUDO_UID/SUDO_GID (and the user's groups and HOME) before exec.
fn run_plugins_as_invoking_user(kubeconfig: &mut Kubeconfig) {
    let under_sudo = nix::unistd::geteuid().is_root() && std::env::var("SUDO_UID").is_ok_and(|u| u != "0");
    let Ok(me) = std::env::current_exe() else { return };
    if !under_sudo {
        return;
    }
    let me = me.display().to_string();
    for named in &mut kubeconfig.auth_infos {
        let Some(auth) = named.auth_info.as_mut() else { continue };
        if let Some(exec) = auth.exec.as_mut() {
            if let Some(command) = exec.command.take() {
                let mut args = vec![RUN_AS_INVOKING_USER.to_string(), "--".to_string(), command];
                args.extend(exec.args.take().unwrap_or_default());
                exec.command = Some(me.clone());
                exec.args = Some(args);
            }
        }
        if let Some(provider) = auth.auth_provider.as_mut() {
            if let Some(path) = provider.config.remove("cmd-path") {
                let args = provider.config.remove("cmd-args").unwrap_or_default();
                provider.config.insert("cmd-path".into(), me.clone());
                provider.config.insert("cmd-args".into(), format!("{RUN_AS_INVOKING_USER} -- {path} {args}").trim().to_string());
            }
        }
    }
}

fn read(path: &Path) -> Result<Kubeconfig, K8sError> {
    Kubeconfig::read_from(path).map_err(|e| K8sError::KubeconfigUnreadable {
        path: path.to_path_buf(),
        reason: super::error::chain(&e),
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
                Some(m) => m.merge(next).map_err(|e| K8sError::Kubeconfig(e.to_string()))?,
            });
        }
        return match merged {
            Some(k) => Ok(Some((k, format!("KUBECONFIG={}", value.to_string_lossy())))),
            None => Err(K8sError::NoKubeconfig { looked_at: format!("KUBECONFIG={} (no such file)", value.to_string_lossy()) }),
        };
    }
    let default = user_home().map(|h| h.join(".kube/config"));
    if let Some(path) = default.as_ref().filter(|p| p.exists()) {
        if let Ok(user) = std::env::var("SUDO_USER") {
            // sudo drops KUBECONFIG: say which file is used, in case kubectl uses another.
            log::info!("using {user}'s kubeconfig {} (sudo does not pass KUBECONFIG on; use --kubeconfig or sudo -E for another)", path.display());
        }
        return Ok(Some((read(path)?, path.display().to_string())));
    }
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return Ok(None);
    }
    Err(K8sError::NoKubeconfig {
        looked_at: default.map(|p| p.display().to_string()).unwrap_or_else(|| "no home directory".into()),
    })
}

impl Cluster {
    pub async fn connect(args: &KubeArgs) -> Result<Self, K8sError> {
        // kube's rustls needs a process-wide crypto provider; a second install is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (config, source) = match load_kubeconfig(args)? {
            Some((mut kubeconfig, source)) => {
                run_plugins_as_invoking_user(&mut kubeconfig);
                if let Some(context) = &args.context {
                    if !kubeconfig.contexts.iter().any(|c| &c.name == context) {
                        let available = kubeconfig.contexts.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ");
                        return Err(K8sError::ContextNotFound { context: context.clone(), available });
                    }
                }
                let options = KubeConfigOptions { context: args.context.clone(), ..Default::default() };
                let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(|e| K8sError::Kubeconfig(format!("{source}: {}", super::error::chain(&e))))?;
                (config, source)
            }
            None => {
                let config = kube::Config::incluster().map_err(|e| K8sError::Kubeconfig(format!("in-cluster config: {e}")))?;
                (config, "in-cluster service account".to_string())
            }
        };
        let namespace = args.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
        let url = config.cluster_url.to_string().trim_end_matches('/').to_string();
        let client = kube::Client::try_from(config).map_err(|e| transport(&e, &url))?;
        Ok(Cluster { client, namespace, url, source })
    }
}
