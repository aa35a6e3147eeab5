//! Where the cookie for a pod's node is found, the way the kubelet would give it to the node.
//!
//! Resolution order ([`resolve`]):
//! 1. `--cookie-file PATH` (first line, surrounding whitespace trimmed, like `~/.erlang.cookie`);
//! 2. the invoking user's `ERLANG_COOKIE`, then `RELEASE_COOKIE`;
//! 3. the pod spec of the chosen container, as the kubelet builds the environment: `envFrom`
//!    sources in order (with their `prefix`), then `env` entries in order (later wins), `$(VAR)`
//!    expansion of `value`s against what is defined before them; values from
//!    `secretKeyRef`/`configMapKeyRef` and `envFrom` are read through [`KubeReads`].
//!    `RELEASE_COOKIE` (mix release), `RELX_COOKIE` (relx), `ERLANG_COOKIE`, then
//!    `-setcookie X` / `--cookie X` in the expanded command and args (also inside `sh -c "…"`)
//!    and in `ERL_FLAGS`/`ERL_AFLAGS`/`ERL_ZFLAGS`/`ELIXIR_ERL_OPTIONS`.
//!
//!
//! Only the named key of a Secret or ConfigMap is read, and its value only becomes a
//! [`Cookie`]; [`crate::erlang::cookie`] is what hands it to a local node.
use std::{
    collections::HashMap,
    fmt,
    fs::File,
    future::Future,
    io::Read,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Container, EnvFromSource, EnvVar, Pod};
use thiserror::Error;

use super::env::{Piece, pieces};
use crate::erlang::cookie::{Cookie, CookieError};


/// The environment variables a pod's cookie is looked up in, in this order.
pub const POD_COOKIE_VARS: [&str; 3] = ["RELEASE_COOKIE", "RELX_COOKIE", "ERLANG_COOKIE"];

/// The invoking user's environment variables, in this order.
pub const USER_COOKIE_VARS: [&str; 2] = ["ERLANG_COOKIE", "RELEASE_COOKIE"];

/// Environment variables whose text erl or elixir read as extra flags.
const FLAG_VARS: [&str; 4] = ["ERL_FLAGS", "ERL_AFLAGS", "ERL_ZFLAGS", "ELIXIR_ERL_OPTIONS"];


/// Where a cookie was found (shown to the user; never the value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CookieSource {
    File(PathBuf),
    UserEnv(&'static str),
    /// A pod's environment variable, with where its value came from.
    PodEnv { container: String, var: String, from: ValueOrigin },
    /// `-setcookie`/`--cookie` in the container's command, args or flag variables.
    PodArgs { container: String, flag: &'static str },
}

/// Where a pod environment variable's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueOrigin {
    Literal,
    Secret { name: String, key: String },
    ConfigMap { name: String, key: String },
}

impl fmt::Display for CookieSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CookieSource::File(p) => write!(f, "file {}", p.display()),
            CookieSource::UserEnv(v) => write!(f, "your environment variable {v}"),
            CookieSource::PodEnv { container, var, from } => {
                write!(f, "{var} of container {container}")?;
                match from {
                    ValueOrigin::Literal => Ok(()),
                    ValueOrigin::Secret { name, key } => write!(f, " (Secret {name}, key {key})"),
                    ValueOrigin::ConfigMap { name, key } => write!(f, " (ConfigMap {name}, key {key})"),
                }
            }
            CookieSource::PodArgs { container, flag } => write!(f, "{flag} in the command of container {container}"),
        }
    }
}

/// A cookie and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub cookie: Cookie,
    pub source: CookieSource,
}

/// What a Kubernetes read can fail with. The implementation (kube) maps 403 to `Forbidden`,
/// a missing object to `ObjectNotFound`, a missing key in `data`/`binaryData` to `KeyNotFound`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KubeReadError {
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found")]
    ObjectNotFound,
    #[error("no such key")]
    KeyNotFound,
    #[error("{0}")]
    Other(String),
}

/// The two Kubernetes reads cookie resolution needs. Values are the decoded text.
pub trait KubeReads: Sync {
    fn get_secret_key(&self, ns: &str, name: &str, key: &str) -> impl Future<Output = Result<String, KubeReadError>> + Send;
    fn get_configmap_key(&self, ns: &str, name: &str, key: &str) -> impl Future<Output = Result<String, KubeReadError>> + Send;
}

/// A [`KubeReads`] that reads nothing (every object is missing): for callers without API access.
pub struct NoKube;

impl KubeReads for NoKube {
    async fn get_secret_key(&self, _: &str, _: &str, _: &str) -> Result<String, KubeReadError> {
        Err(KubeReadError::ObjectNotFound)
    }
    async fn get_configmap_key(&self, _: &str, _: &str, _: &str) -> Result<String, KubeReadError> {
        Err(KubeReadError::ObjectNotFound)
    }
}

/// Why no cookie could be had. One line each: what was wrong, what to do.
#[derive(Debug, Error)]
pub enum LookupError {
    #[error(transparent)]
    Cookie(#[from] CookieError),
    #[error("cannot read the cookie file {path}: {error}")]
    File { path: PathBuf, error: std::io::Error },
    #[error("the cookie file {0} is empty; put the cookie on its first line")]
    EmptyFile(PathBuf),
    #[error(
        "cannot read Secret {name} in namespace {namespace} (forbidden), which holds the cookie; a Role in {namespace} with \
         `apiGroups: [\"\"], resources: [\"secrets\"], verbs: [\"get\"], resourceNames: [\"{name}\"]` allows it, or pass --cookie-file"
    )]
    SecretForbidden { namespace: String, name: String },
    #[error(
        "cannot read ConfigMap {name} in namespace {namespace} (forbidden), which holds the cookie; a Role in {namespace} with \
         `apiGroups: [\"\"], resources: [\"configmaps\"], verbs: [\"get\"], resourceNames: [\"{name}\"]` allows it, or pass --cookie-file"
    )]
    ConfigMapForbidden { namespace: String, name: String },
    #[error("the pod takes its cookie from {kind} {name} in namespace {namespace}, which does not exist (any more); pass --cookie-file")]
    ObjectMissing { kind: &'static str, namespace: String, name: String },
    #[error("the pod takes its cookie from key {key} of {kind} {name} in namespace {namespace}, which has no such key; pass --cookie-file")]
    KeyMissing { kind: &'static str, namespace: String, name: String, key: String },
    #[error("reading {kind} {name} in namespace {namespace} failed: {message}")]
    Api { kind: &'static str, namespace: String, name: String, message: String },
    #[error("the pod has no container named {wanted:?} (it has: {have})")]
    NoSuchContainer { wanted: String, have: String },
    #[error(
        "no cookie found: pass --cookie-file FILE or set ERLANG_COOKIE; container {container} sets none of RELEASE_COOKIE, \
         RELX_COOKIE, ERLANG_COOKIE, -setcookie or --cookie (a release may read it from a file in its image)"
    )]
    NotFound { container: String },
    #[error("no cookie found: pass --cookie-file FILE or set ERLANG_COOKIE")]
    NotGiven,
}

/// Where to look, in order. `env` is the invoking user's environment.
pub struct Lookup<'a, K> {
    pub cookie_file: Option<&'a Path>,
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// The pod and, optionally, the container to read (default: the
    /// `kubectl.kubernetes.io/default-container` annotation, else the first container).
    pub pod: Option<(&'a Pod, Option<&'a str>)>,
    pub kube: &'a K,
}

/// Finds the cookie (see the module documentation for the order).
pub async fn resolve<K: KubeReads>(lookup: Lookup<'_, K>) -> Result<Resolved, LookupError> {
    if let Some(path) = lookup.cookie_file {
        return Ok(Resolved { cookie: read_cookie_file(path)?, source: CookieSource::File(path.to_path_buf()) });
    }
    for var in USER_COOKIE_VARS {
        if let Some(v) = (lookup.env)(var).filter(|v| !v.is_empty()) {
            return Ok(Resolved { cookie: Cookie::new(v.trim())?, source: CookieSource::UserEnv(var) });
        }
    }
    let Some((pod, container)) = lookup.pod else {
        return Err(LookupError::NotGiven);
    };
    from_pod(pod, container, lookup.kube).await
}

/// Reads a cookie file: at most 4 KiB, first line, whitespace trimmed.
pub fn read_cookie_file(path: &Path) -> Result<Cookie, LookupError> {
    let err = |error| LookupError::File { path: path.to_path_buf(), error };
    let mut text = Vec::new();
    File::open(path).map_err(err)?.take(4096).read_to_end(&mut text).map_err(err)?;
    let text = String::from_utf8_lossy(&text);
    let line = text.lines().map(str::trim).find(|l| !l.is_empty());
    match line {
        Some(line) => Ok(Cookie::new(line)?),
        None => Err(LookupError::EmptyFile(path.to_path_buf())),
    }
}

/// The container cookie resolution reads: by name, else the default-container annotation, else
/// the first one.
pub fn choose_container<'a>(pod: &'a Pod, wanted: Option<&str>) -> Result<&'a Container, LookupError> {
    let containers: &[Container] = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or(&[]);
    let annotated = pod.metadata.annotations.as_ref().and_then(|a| a.get("kubectl.kubernetes.io/default-container"));
    let want = wanted.or(annotated.map(String::as_str));
    let found = match want {
        Some(name) => containers.iter().find(|c| c.name == name),
        None => containers.first(),
    };
    found.ok_or_else(|| LookupError::NoSuchContainer {
        wanted: want.unwrap_or("").to_string(),
        have: containers.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", "),
    })
}

/// Finds the cookie in a pod's spec.
pub async fn from_pod<K: KubeReads>(pod: &Pod, container: Option<&str>, kube: &K) -> Result<Resolved, LookupError> {
    let c = choose_container(pod, container)?;
    let mut env = PodEnv::new(pod, c, kube);
    for var in POD_COOKIE_VARS {
        if let Some((value, from)) = env.get(var, usize::MAX).await? {
            if !value.is_empty() {
                let source = CookieSource::PodEnv { container: c.name.clone(), var: var.to_string(), from };
                return Ok(Resolved { cookie: Cookie::new(value.trim())?, source });
            }
        }
    }
    // The command line after expansion, then the flag variables.
    let mut words: Vec<String> = Vec::new();
    let mut total = 0usize;
    for arg in c.command.iter().flatten().chain(c.args.iter().flatten()) {
        if total > super::env::MAX_EXPANDED_TOTAL {
            break;
        }
        let expanded = env.expand(arg, usize::MAX).await?;
        total += expanded.len();
        words.extend(expanded.split_whitespace().map(str::to_string));
    }
    for var in FLAG_VARS {
        if let Some((value, _)) = env.get(var, usize::MAX).await? {
            words.extend(value.split_whitespace().map(str::to_string));
        }
    }
    for pair in words.windows(2) {
        let flag = match pair[0].as_str() {
            "-setcookie" => "-setcookie",
            "--cookie" => "--cookie",
            _ => continue,
        };
        let value = pair[1].trim_matches(|c| c == '"' || c == '\'');
        // An unexpanded $(VAR) or a shell $VAR is not a cookie.
        if value.is_empty() || value.starts_with('$') {
            continue;
        }
        return Ok(Resolved { cookie: Cookie::new(value)?, source: CookieSource::PodArgs { container: c.name.clone(), flag } });
    }
    Err(LookupError::NotFound { container: c.name.clone() })
}

/// A container's environment as the kubelet builds it, evaluated lazily (only the variables
/// asked for are read, so no Secret is read unless it may hold the cookie).
struct PodEnv<'a, K> {
    pod: &'a Pod,
    namespace: String,
    env: &'a [EnvVar],
    env_from: &'a [EnvFromSource],
    kube: &'a K,
    /// (name, before-index) -> value
    cache: HashMap<(String, usize), Option<(String, ValueOrigin)>>,
}

/// A value and its origin, if the variable is defined.
type Found = Option<(String, ValueOrigin)>;

/// A boxed look-up (values refer to earlier ones, so look-ups recurse).
type BoxedLookup<'s> = std::pin::Pin<Box<dyn Future<Output = Result<Found, LookupError>> + Send + 's>>;

/// Most nested `$(VAR)` look-ups one value may cause (each goes to an earlier entry, so this
/// only bounds pathological specs).
const MAX_LOOKUPS: usize = 1000;

impl<'a, K: KubeReads> PodEnv<'a, K> {
    fn new(pod: &'a Pod, c: &'a Container, kube: &'a K) -> Self {
        PodEnv {
            pod,
            namespace: pod.metadata.namespace.clone().unwrap_or_else(|| "default".into()),
            env: c.env.as_deref().unwrap_or(&[]),
            env_from: c.env_from.as_deref().unwrap_or(&[]),
            kube,
            cache: HashMap::new(),
        }
    }

    /// The value of `name` as seen by env entry number `before` (`usize::MAX`: the final
    /// environment): the last env entry before it with that name, else the last `envFrom`
    /// source that has it.
    async fn get(&mut self, name: &str, before: usize) -> Result<Option<(String, ValueOrigin)>, LookupError> {
        let mut budget = MAX_LOOKUPS;
        self.get_bounded(name, before, &mut budget).await
    }

    fn get_bounded<'s>(
        &'s mut self,
        name: &'s str,
        before: usize,
        budget: &'s mut usize,
    ) -> BoxedLookup<'s> {
        Box::pin(async move {
            let key = (name.to_string(), before);
            if let Some(v) = self.cache.get(&key) {
                return Ok(v.clone());
            }
            if *budget == 0 {
                return Ok(None);
            }
            *budget -= 1;
            let end = before.min(self.env.len());
            let found = match self.env[..end].iter().rposition(|e| e.name == name) {
                Some(i) => self.entry_value(i, budget).await?,
                None => self.lookup_env_from(name).await?,
            };
            self.cache.insert(key, found.clone());
            Ok(found)
        })
    }

    async fn entry_value(&mut self, i: usize, budget: &mut usize) -> Result<Option<(String, ValueOrigin)>, LookupError>
    {
        let e = &self.env[i];
        if let Some(v) = &e.value {
            let v = v.clone();
            return Ok(Some((self.expand_bounded(&v, i, budget).await?, ValueOrigin::Literal)));
        }
        let Some(from) = &e.value_from else { return Ok(Some((String::new(), ValueOrigin::Literal))) };
        if let Some(s) = &from.secret_key_ref {
            let got = self.kube.get_secret_key(&self.namespace, &s.name, &s.key).await;
            return self.referenced("Secret", &s.name, &s.key, s.optional.unwrap_or(false), got);
        }
        if let Some(m) = &from.config_map_key_ref {
            let got = self.kube.get_configmap_key(&self.namespace, &m.name, &m.key).await;
            return self.referenced("ConfigMap", &m.name, &m.key, m.optional.unwrap_or(false), got);
        }
        if let Some(f) = &from.field_ref {
            let v = match f.field_path.as_str() {
                "metadata.name" => self.pod.metadata.name.clone(),
                "metadata.namespace" => Some(self.namespace.clone()),
                "status.podIP" => self.pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
                "spec.nodeName" => self.pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                "spec.serviceAccountName" => self.pod.spec.as_ref().and_then(|s| s.service_account_name.clone()),
                _ => None,
            };
            return Ok(v.map(|v| (v, ValueOrigin::Literal)));
        }
        Ok(None)
    }

    fn referenced(
        &self,
        kind: &'static str,
        name: &str,
        key: &str,
        optional: bool,
        got: Result<String, KubeReadError>,
    ) -> Result<Option<(String, ValueOrigin)>, LookupError> {
        let origin = || match kind {
            "Secret" => ValueOrigin::Secret { name: name.into(), key: key.into() },
            _ => ValueOrigin::ConfigMap { name: name.into(), key: key.into() },
        };
        match got {
            Ok(v) => Ok(Some((v, origin()))),
            Err(KubeReadError::ObjectNotFound | KubeReadError::KeyNotFound) if optional => Ok(None),
            Err(e) => Err(self.read_error(kind, name, Some(key), e)),
        }
    }

    fn read_error(&self, kind: &'static str, name: &str, key: Option<&str>, e: KubeReadError) -> LookupError {
        let (namespace, name) = (self.namespace.clone(), name.to_string());
        match (e, kind) {
            (KubeReadError::Forbidden(_), "Secret") => LookupError::SecretForbidden { namespace, name },
            (KubeReadError::Forbidden(_), _) => LookupError::ConfigMapForbidden { namespace, name },
            (KubeReadError::ObjectNotFound, _) => LookupError::ObjectMissing { kind, namespace, name },
            (KubeReadError::KeyNotFound, _) => {
                LookupError::KeyMissing { kind, namespace, name, key: key.unwrap_or_default().to_string() }
            }
            (KubeReadError::Other(message), _) => LookupError::Api { kind, namespace, name, message },
        }
    }

    /// `name` from the `envFrom` sources: the last source whose prefix fits and that has the
    /// key wins. Keys are not expanded, as with the kubelet.
    async fn lookup_env_from(&mut self, name: &str) -> Result<Option<(String, ValueOrigin)>, LookupError> {
        for src in self.env_from.iter().rev() {
            let prefix = src.prefix.as_deref().unwrap_or("");
            let Some(key) = name.strip_prefix(prefix).filter(|k| !k.is_empty()) else { continue };
            let (kind, obj, optional) = if let Some(s) = &src.secret_ref {
                ("Secret", s.name.as_str(), s.optional.unwrap_or(false))
            } else if let Some(m) = &src.config_map_ref {
                ("ConfigMap", m.name.as_str(), m.optional.unwrap_or(false))
            } else {
                continue;
            };
            let got = match kind {
                "Secret" => self.kube.get_secret_key(&self.namespace, obj, key).await,
                _ => self.kube.get_configmap_key(&self.namespace, obj, key).await,
            };
            match got {
                Ok(v) => {
                    let origin = if kind == "Secret" {
                        ValueOrigin::Secret { name: obj.into(), key: key.into() }
                    } else {
                        ValueOrigin::ConfigMap { name: obj.into(), key: key.into() }
                    };
                    return Ok(Some((v, origin)));
                }
                Err(KubeReadError::KeyNotFound) => continue,
                Err(KubeReadError::ObjectNotFound) if optional => continue,
                Err(e) => return Err(self.read_error(kind, obj, None, e)),
            }
        }
        Ok(None)
    }

    async fn expand(&mut self, s: &str, before: usize) -> Result<String, LookupError>
    {
        let mut budget = MAX_LOOKUPS;
        self.expand_bounded(s, before, &mut budget).await
    }

    /// Kubernetes `$(VAR)` expansion (see [`pieces`]), each reference looked up in turn
    /// as seen by env entry `before`.
    async fn expand_bounded(&mut self, s: &str, before: usize, budget: &mut usize) -> Result<String, LookupError>
    {
        let mut out = String::with_capacity(s.len().min(super::env::MAX_EXPANDED));
        for piece in pieces(s) {
            let more = match piece {
                Piece::Text(t) => super::env::push_bounded(&mut out, t),
                Piece::Var { name, written } => {
                    let found = self.get_bounded(name, before, budget).await?;
                    super::env::push_bounded(&mut out, found.as_ref().map_or(written, |(v, _)| v))
                }
            };
            if !more {
                break;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{fs, sync::Mutex};

    /// Secrets and ConfigMaps in memory; records every read.
    #[derive(Default)]
    struct FakeKube {
        objects: HashMap<(String, String), Option<HashMap<String, String>>>,
        reads: Mutex<Vec<String>>,
    }

    impl FakeKube {
        fn with(mut self, kind: &str, name: &str, data: &[(&str, &str)]) -> Self {
            let map = data.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            self.objects.insert((kind.into(), name.into()), Some(map));
            self
        }
        fn forbidden(mut self, kind: &str, name: &str) -> Self {
            self.objects.insert((kind.into(), name.into()), None);
            self
        }
        fn read(&self, kind: &str, name: &str, key: &str) -> Result<String, KubeReadError> {
            self.reads.lock().unwrap().push(format!("{kind}/{name}/{key}"));
            match self.objects.get(&(kind.to_string(), name.to_string())) {
                None => Err(KubeReadError::ObjectNotFound),
                Some(None) => Err(KubeReadError::Forbidden("no".into())),
                Some(Some(m)) => m.get(key).cloned().ok_or(KubeReadError::KeyNotFound),
            }
        }
    }

    impl KubeReads for FakeKube {
        async fn get_secret_key(&self, _ns: &str, name: &str, key: &str) -> Result<String, KubeReadError> {
            self.read("Secret", name, key)
        }
        async fn get_configmap_key(&self, _ns: &str, name: &str, key: &str) -> Result<String, KubeReadError> {
            self.read("ConfigMap", name, key)
        }
    }

    fn pod(containers: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "app-0", "namespace": "shop"},
            "spec": {"containers": containers},
            "status": {"podIP": "10.244.0.5"}
        }))
        .unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    async fn from(p: &Pod, kube: &FakeKube) -> Result<Resolved, LookupError> {
        resolve(Lookup { cookie_file: None, env: &no_env, pod: Some((p, None)), kube }).await
    }

    #[tokio::test]
    async fn literal_env_and_expansion_in_order() {
        let p = pod(serde_json::json!([{"name": "app", "env": [
            {"name": "BASE", "value": "abc"},
            {"name": "RELEASE_COOKIE", "value": "$(BASE)-$(LATER)-$$(BASE)"},
            {"name": "LATER", "value": "zzz"}]}]));
        let r = from(&p, &FakeKube::default()).await.unwrap();
        // LATER is defined after RELEASE_COOKIE, so it stays unexpanded, as with the kubelet.
        assert_eq!(r.cookie.expose(), "abc-$(LATER)-$(BASE)");
        assert_eq!(r.source, CookieSource::PodEnv { container: "app".into(), var: "RELEASE_COOKIE".into(), from: ValueOrigin::Literal });
    }

    #[tokio::test]
    async fn expansion_is_the_same_as_for_the_pod_spec() {
        let vars = [("BASE".to_string(), "abc".to_string())].into();
        for value in [
            "$(BASE)$$-$-$(BASE",
            "x$(NONE)y$",
            "$$$(BASE)$()",
            "$(BASE)$(BASE)",
            "$$$$",
        ] {
            let p = pod(serde_json::json!([{"name": "app", "env": [
                {"name": "BASE", "value": "abc"},
                {"name": "RELEASE_COOKIE", "value": value}]}]));
            let r = from(&p, &FakeKube::default()).await.unwrap();
            let expected = crate::k8s::env::expand(value, &vars);
            assert_eq!(r.cookie.expose(), expected, "{value}");
        }
    }

    /// `V_i=$(V_{i-1})$(V_{i-1})` doubles with every variable: the lookup stops at the bound
    /// (and then refuses a cookie that long) instead of filling memory.
    #[tokio::test]
    async fn doubling_variables_stop_at_the_bound() {
        let mut env = vec![serde_json::json!({"name": "V0", "value": "x".repeat(1024)})];
        env.extend((1..48).map(|i| serde_json::json!({"name": format!("V{i}"), "value": format!("$(V{})$(V{})", i - 1, i - 1)})));
        env.push(serde_json::json!({"name": "RELEASE_COOKIE", "value": "$(V47)"}));
        let p = pod(serde_json::json!([{"name": "app", "env": env}]));
        assert!(from(&p, &FakeKube::default()).await.is_err(), "a 64 KiB cookie is refused");
    }

    #[tokio::test]
    async fn secret_key_ref_and_forbidden() {
        let p = pod(serde_json::json!([{"name": "app", "env": [
            {"name": "RELEASE_COOKIE", "valueFrom": {"secretKeyRef": {"name": "erlang", "key": "cookie"}}}]}]));
        let kube = FakeKube::default().with("Secret", "erlang", &[("cookie", "s3cret")]);
        let r = from(&p, &kube).await.unwrap();
        assert_eq!(r.cookie.expose(), "s3cret");
        assert_eq!(r.source.to_string(), "RELEASE_COOKIE of container app (Secret erlang, key cookie)");
        let e = from(&p, &FakeKube::default().forbidden("Secret", "erlang")).await.unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(r#"apiGroups: [""], resources: ["secrets"], verbs: ["get"], resourceNames: ["erlang"]"#), "{msg}");
        assert!(msg.contains("namespace shop") && !msg.contains('\n'), "{msg}");
        let e = from(&p, &FakeKube::default()).await.unwrap_err();
        assert!(matches!(e, LookupError::ObjectMissing { kind: "Secret", .. }), "{e}");
        let e = from(&p, &FakeKube::default().with("Secret", "erlang", &[])).await.unwrap_err();
        assert!(matches!(e, LookupError::KeyMissing { ref key, .. } if key == "cookie"), "{e}");
    }

    #[tokio::test]
    async fn optional_refs_are_skipped() {
        let p = pod(serde_json::json!([{"name": "app", "env": [
            {"name": "RELEASE_COOKIE", "valueFrom": {"secretKeyRef": {"name": "gone", "key": "c", "optional": true}}},
            {"name": "ERLANG_COOKIE", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "k"}}}]}]));
        let kube = FakeKube::default().with("ConfigMap", "cm", &[("k", "fromcm")]);
        let r = from(&p, &kube).await.unwrap();
        assert_eq!(r.cookie.expose(), "fromcm");
    }

    #[tokio::test]
    async fn env_from_with_prefix_and_precedence() {
        let p = pod(serde_json::json!([{"name": "app",
            "envFrom": [
                {"secretRef": {"name": "first"}},
                {"prefix": "RELEASE_", "secretRef": {"name": "second"}},
                {"configMapRef": {"name": "absent", "optional": true}}],
            "env": [{"name": "UNRELATED", "value": "x"}]}]));
        let kube = FakeKube::default()
            .with("Secret", "first", &[("RELEASE_COOKIE", "one")])
            .with("Secret", "second", &[("COOKIE", "two")]);
        // The later source wins.
        assert_eq!(from(&p, &kube).await.unwrap().cookie.expose(), "two");
        // env entries win over envFrom.
        let mut p2 = p.clone();
        p2.spec.as_mut().unwrap().containers[0].env =
            Some(vec![EnvVar { name: "RELEASE_COOKIE".into(), value: Some("three".into()), ..Default::default() }]);
        assert_eq!(from(&p2, &kube).await.unwrap().cookie.expose(), "three");
        // A forbidden envFrom Secret names the Role rule.
        let e = from(&p, &FakeKube::default().forbidden("Secret", "second")).await.unwrap_err();
        assert!(matches!(e, LookupError::SecretForbidden { ref name, .. } if name == "second"), "{e}");
    }

    #[tokio::test]
    async fn setcookie_in_args_after_expansion() {
        let p = pod(serde_json::json!([{"name": "app",
            "envFrom": [{"secretRef": {"name": "s"}}],
            "command": ["sh", "-c", "exec erl -name app@$(POD_IP) -setcookie '$(MY_COOKIE)' -noshell"],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]));
        let kube = FakeKube::default().with("Secret", "s", &[("MY_COOKIE", "viaargs")]);
        let r = from(&p, &kube).await.unwrap();
        assert_eq!(r.cookie.expose(), "viaargs");
        assert_eq!(r.source, CookieSource::PodArgs { container: "app".into(), flag: "-setcookie" });
        let p = pod(serde_json::json!([{"name": "app", "args": ["--cookie", "elixir1"]}]));
        assert_eq!(from(&p, &FakeKube::default()).await.unwrap().cookie.expose(), "elixir1");
        let p = pod(serde_json::json!([{"name": "app", "env": [{"name": "ERL_FLAGS", "value": "+K true -setcookie fl4gs"}]}]));
        assert_eq!(from(&p, &FakeKube::default()).await.unwrap().cookie.expose(), "fl4gs");
        // A shell variable is not a cookie.
        let p = pod(serde_json::json!([{"name": "app", "args": ["-setcookie", "$COOKIE"]}]));
        assert!(matches!(from(&p, &FakeKube::default()).await, Err(LookupError::NotFound { .. })));
    }

    #[tokio::test]
    async fn only_cookie_variables_are_read() {
        let p = pod(serde_json::json!([{"name": "app", "env": [
            {"name": "DB_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "db", "key": "pw"}}},
            {"name": "RELEASE_COOKIE", "value": "c"}]}]));
        let kube = FakeKube::default().with("Secret", "db", &[("pw", "x")]);
        from(&p, &kube).await.unwrap();
        assert!(kube.reads.lock().unwrap().is_empty(), "read {:?}", kube.reads.lock().unwrap());
    }

    #[tokio::test]
    async fn order_file_then_user_env_then_pod() {
        let dir = std::env::temp_dir().join(format!("br-cookie-lookup-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c");
        fs::write(&f, "\n  fromfile  \nsecond\n").unwrap();
        let p = pod(serde_json::json!([{"name": "app", "env": [{"name": "RELEASE_COOKIE", "value": "frompod"}]}]));
        let kube = FakeKube::default();
        let env = |v: &str| (v == "RELEASE_COOKIE").then(|| "fromenv".to_string());
        let r = resolve(Lookup { cookie_file: Some(&f), env: &env, pod: Some((&p, None)), kube: &kube }).await.unwrap();
        assert_eq!((r.cookie.expose(), r.source), ("fromfile", CookieSource::File(f.clone())));
        let r = resolve(Lookup { cookie_file: None, env: &env, pod: Some((&p, None)), kube: &kube }).await.unwrap();
        assert_eq!((r.cookie.expose(), r.source), ("fromenv", CookieSource::UserEnv("RELEASE_COOKIE")));
        let r = resolve(Lookup { cookie_file: None, env: &no_env, pod: Some((&p, None)), kube: &kube }).await.unwrap();
        assert_eq!(r.cookie.expose(), "frompod");
        assert!(matches!(
            resolve(Lookup { cookie_file: None, env: &no_env, pod: None, kube: &kube }).await,
            Err(LookupError::NotGiven)
        ));
        fs::write(&f, " \n").unwrap();
        assert!(matches!(read_cookie_file(&f), Err(LookupError::EmptyFile(_))));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn container_choice() {
        let mut p = pod(serde_json::json!([{"name": "sidecar"}, {"name": "app"}]));
        assert_eq!(choose_container(&p, None).unwrap().name, "sidecar");
        assert_eq!(choose_container(&p, Some("app")).unwrap().name, "app");
        p.metadata.annotations = Some([("kubectl.kubernetes.io/default-container".to_string(), "app".to_string())].into());
        assert_eq!(choose_container(&p, None).unwrap().name, "app");
        let e = choose_container(&p, Some("nope")).unwrap_err().to_string();
        assert!(e.contains("sidecar, app"), "{e}");
    }
}
