//! The simulated Kubernetes API server: HTTPS (rustls) with bearer-token authentication and
//! RBAC authorization ([`super::authz`]), real Kubernetes JSON (Pod, PodList, Service,
//! StatefulSet, Secret, ConfigMap, Namespace, SelfSubjectAccessReview, Status errors, watch
//! events with 410 expiry and bookmarks, meta.k8s.io Table for kubectl), and the pod
//! `portforward` subresource over WebSocket with the channel protocol (`v4.channel.k8s.io` /
//! `portforward.k8s.io`), and over SPDY/3.1 for kubectl (see [`super::spdy`]).
//!
//! It listens where [`super::SimOptions`] puts it (127.0.0.1 in the workstation namespace by
//! default); port-forwards dial localhost inside the pod's namespace, as the kubelet does.
use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use base64::Engine;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Frame, Incoming},
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::mpsc, task::JoinSet};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

use super::{
    authz::{Attributes, Authorizer, Decision, User, forbidden_message},
    kubelet::{Kubelet, NODE_NAME, dial_in},
    selector::{FieldSelector, LabelSelector},
    spdy,
    store::{PodEvent, RvError, Store},
};

type Body = BoxBody<Bytes, Infallible>;

/// Port-forward subprotocols served, in order of preference (what kube-rs and the official
/// clients offer; v5 is not offered for port-forward by real API servers).
const PORTFORWARD_PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", "portforward.k8s.io"];

/// The largest request body read (a SelfSubjectAccessReview is a few hundred bytes).
const MAX_BODY: usize = 1 << 20;
/// Watches end after at most this long, whatever timeoutSeconds asks (real servers cap them
/// with --min-request-timeout too).
const MAX_WATCH: Duration = Duration::from_secs(3600);
/// How long a request for a resourceVersion the server has not seen yet waits for it
/// (the watch cache's 3 s) before a 504 "Too large resource version".
const FRESHNESS_WAIT: Duration = Duration::from_secs(3);
/// How long a hung server holds a request or connection at most.
const MAX_HANG: Duration = Duration::from_secs(600);

/// What a hung API server does not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Hang {
    #[default]
    None,
    /// Every other request is served; port-forward upgrades get no answer at all.
    PortForward,
    /// TCP connections are accepted and nothing is ever read or answered (not even TLS).
    Everything,
}

pub struct ApiState {
    pub store: Arc<Store>,
    pub kubelet: Arc<Kubelet>,
    pub authz: Authorizer,
    /// The Kubernetes minor version served (1.35+ also requires `create` on
    /// pods/portforward for WebSocket upgrades: kubernetes#134577).
    pub minor: u32,
    /// How often watches with allowWatchBookmarks=true get a BOOKMARK.
    pub bookmark_interval: Duration,
    hang: tokio::sync::watch::Sender<Hang>,
    port_forwards: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Port-forward upgrade requests per "NAMESPACE/POD", authorized or not.
    portforward_requests: Mutex<BTreeMap<String, usize>>,
    /// Every request, and every extra authorization check, as "VERB RESOURCE NAMESPACE/NAME".
    pub audit: Mutex<Vec<String>>,
    /// kubectl's SPDY port-forward: options and counters.
    pub spdy: spdy::SpdyState,
}

impl ApiState {
    pub fn new(store: Arc<Store>, kubelet: Arc<Kubelet>, authz: Authorizer, minor: u32, bookmark_interval: Duration) -> Self {
        ApiState {
            store,
            kubelet,
            authz,
            minor,
            bookmark_interval,
            hang: tokio::sync::watch::channel(Hang::None).0,
            port_forwards: Mutex::default(),
            portforward_requests: Mutex::default(),
            audit: Mutex::default(),
            spdy: Default::default(),
        }
    }

    /// Drops every open port-forward stream abruptly (no close frame), as a broken network
    /// path or a restarted kubelet would.
    pub fn drop_port_forwards(&self) -> usize {
        let handles: Vec<_> = self.port_forwards.lock().unwrap().drain(..).filter(|h| !h.is_finished()).collect();
        for h in &handles {
            h.abort();
        }
        handles.len()
    }

    pub fn active_port_forwards(&self) -> usize {
        let mut pfs = self.port_forwards.lock().unwrap();
        pfs.retain(|h| !h.is_finished());
        pfs.len()
    }

    /// Port-forward upgrade requests so far, per "NAMESPACE/POD" (refused ones included).
    pub fn portforward_requests(&self) -> BTreeMap<String, usize> {
        self.portforward_requests.lock().unwrap().clone()
    }

    pub fn set_hang(&self, hang: Hang) {
        self.hang.send_replace(hang);
    }

    /// Waits while the server hangs in one of `modes` (bounded by [`MAX_HANG`]).
    async fn wait_unhung(&self, modes: &[Hang]) {
        let mut rx = self.hang.subscribe();
        let _ = tokio::time::timeout(MAX_HANG, rx.wait_for(|h| !modes.contains(h))).await;
    }

    fn audit(&self, verb: &str, a: &Attributes) {
        let mut audit = self.audit.lock().unwrap();
        if audit.len() < 200_000 {
            audit.push(format!("{verb} {} {}/{}", a.combined_resource(), a.namespace, a.name));
        }
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_vec(value).expect("JSON")))
        .expect("response")
}

fn status_json(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut v = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    if let Some(d) = details {
        v["details"] = d;
    }
    v
}

/// A `kind: Status` failure, as the real API server sends it.
fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response<Body> {
    json_response(StatusCode::from_u16(code).expect("code"), &status_json(code, reason, message, details))
}

fn not_found(kind: &str, name: &str) -> Response<Body> {
    status(404, "NotFound", &format!("{kind} \"{name}\" not found"), Some(json!({"name": name, "kind": kind})))
}

fn forbidden(user: &str, a: &Attributes) -> Response<Body> {
    let mut details = json!({"kind": a.resource});
    if !a.name.is_empty() {
        details["name"] = json!(a.name);
    }
    if !a.api_group.is_empty() {
        details["group"] = json!(a.api_group);
    }
    status(403, "Forbidden", &forbidden_message(user, a), Some(details))
}

/// 504 for a resourceVersion the server has not reached (storage.NewTooLargeResourceVersionError).
fn too_large_json(requested: u64, current: u64) -> Value {
    status_json(
        504,
        "Timeout",
        &format!("Timeout: Too large resource version: {requested}, current: {current}"),
        Some(json!({"causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}], "retryAfterSeconds": 1})),
    )
}

/// The object as the API returns it from GET/watch: with apiVersion and kind.
fn pod_json(pod: &Pod) -> Value {
    serde_json::to_value(pod).expect("pod JSON")
}

/// List items carry no apiVersion/kind, like the real API server's.
fn list_json(kind: &str, api_version: &str, items: Vec<Value>, rv: u64) -> Value {
    let items: Vec<Value> = items
        .into_iter()
        .map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("apiVersion");
                o.remove("kind");
            }
            v
        })
        .collect();
    json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}, "items": items})
}

fn age(pod: &Pod) -> String {
    let Some(t) = &pod.metadata.creation_timestamp else { return "<unknown>".into() };
    let secs = (super::store::now().0.as_second() - t.0.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

/// kubectl asks for `application/json;as=Table;v=v1;g=meta.k8s.io`: server-side printing.
fn pods_table(pods: &[Pod], rv: u64) -> Value {
    let col = |name: &str, ty: &str, priority: u8, desc: &str| json!({"name": name, "type": ty, "format": if name == "Name" {"name"} else {""}, "description": desc, "priority": priority});
    let rows: Vec<Value> = pods
        .iter()
        .map(|p| {
            let st = p.status.clone().unwrap_or_default();
            let cs = st.container_statuses.clone().unwrap_or_default();
            let total = p.spec.as_ref().map(|s| s.containers.len()).unwrap_or(0);
            let ready = cs.iter().filter(|c| c.ready).count();
            let restarts: i32 = cs.iter().map(|c| c.restart_count).sum();
            // As kubectl's printer: a waiting container's reason replaces the phase.
            let waiting = cs.iter().find_map(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone());
            let phase = if p.metadata.deletion_timestamp.is_some() {
                "Terminating".to_string()
            } else {
                waiting.unwrap_or_else(|| st.phase.clone().unwrap_or_default())
            };
            let mut meta = serde_json::to_value(&p.metadata).unwrap_or_default();
            if let Some(o) = meta.as_object_mut() {
                o.remove("managedFields");
            }
            json!({
                "cells": [p.metadata.name, format!("{ready}/{total}"), phase, restarts.to_string(), age(p),
                          st.pod_ip.unwrap_or_else(|| "<none>".into()), NODE_NAME, "<none>", "<none>"],
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": meta},
            })
        })
        .collect();
    json!({
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv.to_string()},
        "columnDefinitions": [
            col("Name", "string", 0, "Name must be unique within a namespace."),
            col("Ready", "string", 0, "The aggregate readiness state of this pod for accepting traffic."),
            col("Status", "string", 0, "The aggregate status of the containers in this pod."),
            col("Restarts", "string", 0, "The number of times the containers in this pod have been restarted."),
            col("Age", "string", 0, "CreationTimestamp is a timestamp representing the server time when this object was created."),
            col("IP", "string", 1, "IP address allocated to the pod."),
            col("Node", "string", 1, "Name of the node this pod is scheduled on."),
            col("Nominated Node", "string", 1, "Name of the node this pod is nominated to run on."),
            col("Readiness Gates", "string", 1, "The readiness gates of this pod."),
        ],
        "rows": rows,
    })
}

fn discovery(path: &[&str], minor: u32) -> Option<Value> {
    let group = |name: &str| json!({"name": name, "versions": [{"groupVersion": format!("{name}/v1"), "version": "v1"}], "preferredVersion": {"groupVersion": format!("{name}/v1"), "version": "v1"}});
    Some(match path {
        ["version"] => json!({"major": "1", "minor": minor.to_string(), "gitVersion": format!("v1.{minor}.0-beamredir-sim"), "platform": "linux/amd64", "goVersion": "go1.23", "compiler": "gc"}),
        ["api"] => json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ["apis"] => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [group("apps"), group("authorization.k8s.io")]}),
        ["api", "v1"] => json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            {"name": "configmaps", "singularName": "configmap", "namespaced": true, "kind": "ConfigMap", "verbs": ["get", "list"], "shortNames": ["cm"]},
            {"name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace", "verbs": ["get", "list"], "shortNames": ["ns"]},
            {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod", "verbs": ["delete", "get", "list", "watch"], "shortNames": ["po"], "categories": ["all"]},
            {"name": "pods/portforward", "singularName": "", "namespaced": true, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
            {"name": "secrets", "singularName": "secret", "namespaced": true, "kind": "Secret", "verbs": ["get", "list"]},
            {"name": "services", "singularName": "service", "namespaced": true, "kind": "Service", "verbs": ["get", "list"], "shortNames": ["svc"], "categories": ["all"]},
        ]}),
        ["apis", "apps", "v1"] => json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": [
            {"name": "statefulsets", "singularName": "statefulset", "namespaced": true, "kind": "StatefulSet", "verbs": ["get", "list"], "shortNames": ["sts"], "categories": ["all"]},
        ]}),
        ["apis", "authorization.k8s.io", "v1"] => json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "authorization.k8s.io/v1", "resources": [
            {"name": "selfsubjectaccessreviews", "singularName": "selfsubjectaccessreview", "namespaced": false, "kind": "SelfSubjectAccessReview", "verbs": ["create"]},
        ]}),
        _ => return None,
    })
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        // Bounded: a hostile query string cannot make thousands of parameters.
        Query(form_urlencoded::parse(q.unwrap_or("").as_bytes()).into_owned().take(256).collect())
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }
    fn all(&self, k: &str) -> impl Iterator<Item = &str> {
        self.0.iter().filter(move |(key, _)| key == k).map(|(_, v)| v.as_str())
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }
}

/// What the request addresses (apiserver's RequestInfo), or None for a non-resource path.
struct RequestInfo {
    attrs: Attributes,
    /// The API group/version prefix served ("v1", "apps/v1", …).
    group_version: String,
}

fn request_info(method: &Method, path: &[&str], query: &Query) -> Option<RequestInfo> {
    let (group, version, rest) = match path {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    if rest.is_empty() {
        return None;
    }
    let mut parts: &[&str] = rest;
    let mut namespace = "";
    if parts[0] == "namespaces" && parts.len() > 1 {
        namespace = parts[1];
        if parts.len() > 2 {
            parts = &parts[2..];
        }
    }
    let resource = parts[0];
    let name = parts.get(1).copied().unwrap_or("");
    let sub = parts.get(2).copied().unwrap_or("");
    if parts.len() > 3 {
        return None;
    }
    let watch = query.flag("watch");
    let mut verb = match *method {
        Method::GET | Method::HEAD if watch => "watch",
        Method::GET | Method::HEAD if name.is_empty() => "list",
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if name.is_empty() => "deletecollection",
        Method::DELETE => "delete",
        _ => "",
    }
    .to_string();
    let mut name = name.to_string();
    // A list or watch of one object by field selector is authorized as that name.
    if (verb == "list" || verb == "watch") && name.is_empty() {
        if let Some(n) = query.get("fieldSelector").and_then(|f| f.split(',').find_map(|r| r.trim().strip_prefix("metadata.name=").or_else(|| r.trim().strip_prefix("metadata.name==")))) {
            name = n.to_string();
        }
    }
    if verb.is_empty() {
        verb = method.as_str().to_lowercase();
    }
    let resource = if sub.is_empty() { resource.to_string() } else { format!("{resource}/{sub}") };
    let gv = if group.is_empty() { version.to_string() } else { format!("{group}/{version}") };
    Some(RequestInfo { attrs: Attributes::resource(&verb, group, &resource, Some(namespace).filter(|n| !n.is_empty()), Some(&name).filter(|n| !n.is_empty()).map(|s| s.as_str())), group_version: gv })
}

pub async fn handle(state: Arc<ApiState>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let token = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    let Some(user) = token.and_then(|t| state.authz.authenticate(t)) else {
        return Ok(status(401, "Unauthorized", "Unauthorized", None));
    };
    let path: Vec<String> = req.uri().path().split('/').filter(|s| !s.is_empty()).take(16).map(String::from).collect();
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    let query = Query::parse(req.uri().query());
    let Some(info) = request_info(req.method(), &path, &query) else {
        // Non-resource paths: discovery and /version.
        let attrs = Attributes { verb: req.method().as_str().to_lowercase(), path: Some(req.uri().path().to_string()), ..Default::default() };
        if !state.authz.authorize(&user, &attrs).allowed() {
            return Ok(status(403, "Forbidden", &forbidden_message(&user.name, &attrs), Some(json!({}))));
        }
        if req.method() == Method::GET {
            if let Some(v) = discovery(&path, state.minor) {
                return Ok(json_response(StatusCode::OK, &v));
            }
        }
        return Ok(status(404, "NotFound", "the server could not find the requested resource", Some(json!({}))));
    };
    let a = info.attrs;
    let is_portforward = a.resource == "pods" && a.subresource == "portforward" && !a.name.is_empty();
    if is_portforward {
        *state.portforward_requests.lock().unwrap().entry(format!("{}/{}", a.namespace, a.name)).or_insert(0) += 1;
    }
    state.audit(&a.verb, &a);
    if let Decision::Deny(_) = state.authz.authorize(&user, &a) {
        return Ok(forbidden(&user.name, &a));
    }
    // From 1.35 (AuthorizePodWebsocketUpgradeCreatePermission), a WebSocket upgrade of
    // exec/attach/portforward is a GET that must also be allowed to `create`.
    let is_ws = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if is_portforward && a.verb == "get" && is_ws && state.minor >= 35 {
        let create = Attributes { verb: "create".into(), ..a.clone() };
        state.audit("create", &create);
        if let Decision::Deny(_) = state.authz.authorize(&user, &create) {
            return Ok(forbidden(&user.name, &create));
        }
    }
    Ok(serve(&state, req, &user, &info.group_version, &a, &query).await)
}

fn bad_request(msg: &str) -> Response<Body> {
    status(400, "BadRequest", msg, None)
}

async fn serve(state: &Arc<ApiState>, req: Request<Incoming>, user: &User, gv: &str, a: &Attributes, query: &Query) -> Response<Body> {
    let store = &state.store;
    let ns = Some(a.namespace.as_str()).filter(|n| !n.is_empty());
    let name = a.name.as_str();
    let wants_table = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("as=Table"));
    let labels = match query.get("labelSelector").map(LabelSelector::parse).transpose() {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => return bad_request(&format!("unable to parse requirement: {e}")),
    };
    let fields = match query.get("fieldSelector").map(FieldSelector::parse).transpose() {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => return bad_request(&e.to_string()),
    };
    let select = move |p: &Pod| labels.matches(&p.metadata.labels.clone().unwrap_or_default()) && fields.matches(p);
    match (gv, a.resource.as_str(), a.subresource.as_str(), a.verb.as_str()) {
        ("v1", "namespaces", "", "list") => {
            let items = store.namespaces().into_iter().map(|n| json!({"metadata": {"name": n}, "status": {"phase": "Active"}})).collect();
            json_response(StatusCode::OK, &list_json("NamespaceList", "v1", items, store.resource_version()))
        }
        ("v1", "namespaces", "", "get") if store.has_namespace(name) => {
            json_response(StatusCode::OK, &json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": name}, "status": {"phase": "Active"}}))
        }
        ("v1", "namespaces", "", "get") => not_found("namespaces", name),
        ("v1", "pods", "", "watch") => {
            let ns = ns.map(String::from);
            watch_pods(state, query, move |p: &Pod| ns.as_deref().is_none_or(|n| p.metadata.namespace.as_deref() == Some(n)) && select(p)).await
        }
        ("v1", "pods", "", "list") => list_pods(state, query, ns, wants_table, select).await,
        ("v1", "pods", "", "get") => match store.get_pod(ns.unwrap_or_default(), name) {
            Some(p) if wants_table => json_response(StatusCode::OK, &pods_table(&[p], store.resource_version())),
            Some(p) => json_response(StatusCode::OK, &pod_json(&p)),
            None => not_found("pods", name),
        },
        ("v1", "pods", "", "delete") => {
            // DeleteOptions.gracePeriodSeconds, from the query or the body (kubectl sends a body).
            let mut grace = query.get("gracePeriodSeconds").and_then(|g| g.parse::<i64>().ok());
            match read_body(req).await {
                Ok(body) if !body.is_empty() => {
                    if let Some(g) = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["gracePeriodSeconds"].as_i64()) {
                        grace = Some(g);
                    }
                }
                Ok(_) => {}
                Err(r) => return r,
            }
            delete_pod(state, ns.unwrap_or_default(), name, grace)
        }
        ("v1", "pods", "portforward", "get" | "create") => {
            if *state.hang.borrow() == Hang::PortForward {
                state.wait_unhung(&[Hang::PortForward]).await;
            }
            let ports: Vec<u16> = query.all("ports").flat_map(|v| v.split(',')).take(64).filter_map(|p| p.trim().parse().ok()).collect();
            portforward(state, req, ns.unwrap_or_default(), name, ports)
        }
        ("v1", "services", "", "list") => {
            let (v, rv) = store.list_services(ns);
            json_response(StatusCode::OK, &list_json("ServiceList", "v1", v.iter().map(|s| serde_json::to_value(s).unwrap()).collect(), rv))
        }
        ("v1", "services", "", "get") => match store.get_service(ns.unwrap_or_default(), name) {
            Some(s) => json_response(StatusCode::OK, &serde_json::to_value(s).unwrap()),
            None => not_found("services", name),
        },
        ("v1", "secrets", "", "list") => {
            let (v, rv) = store.list_secrets(ns);
            json_response(StatusCode::OK, &list_json("SecretList", "v1", v.iter().map(|s| serde_json::to_value(s).unwrap()).collect(), rv))
        }
        ("v1", "secrets", "", "get") => match store.get_secret(ns.unwrap_or_default(), name) {
            Some(s) => json_response(StatusCode::OK, &serde_json::to_value(s).unwrap()),
            None => not_found("secrets", name),
        },
        ("v1", "configmaps", "", "list") => {
            let (v, rv) = store.list_configmaps(ns);
            json_response(StatusCode::OK, &list_json("ConfigMapList", "v1", v.iter().map(|s| serde_json::to_value(s).unwrap()).collect(), rv))
        }
        ("v1", "configmaps", "", "get") => match store.get_configmap(ns.unwrap_or_default(), name) {
            Some(s) => json_response(StatusCode::OK, &serde_json::to_value(s).unwrap()),
            None => not_found("configmaps", name),
        },
        ("apps/v1", "statefulsets", "", "get") => match store.get_statefulset(ns.unwrap_or_default(), name) {
            Some(s) => json_response(StatusCode::OK, &serde_json::to_value(s).unwrap()),
            None => status(404, "NotFound", &format!("statefulsets.apps \"{name}\" not found"), Some(json!({"name": name, "group": "apps", "kind": "statefulsets"}))),
        },
        ("authorization.k8s.io/v1", "selfsubjectaccessreviews", "", "create") => self_subject_access_review(state, req, user).await,
        (_, "pods" | "services" | "secrets" | "configmaps" | "namespaces", _, _) if gv == "v1" && a.subresource.is_empty() => {
            status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource", Some(json!({})))
        }
        _ => status(404, "NotFound", "the server could not find the requested resource", Some(json!({}))),
    }
}

fn delete_pod(state: &ApiState, ns: &str, name: &str, grace: Option<i64>) -> Response<Body> {
    match state.kubelet.delete_pod_with(ns, name, grace.map(|g| g.max(0))) {
        Some(p) => json_response(StatusCode::OK, &pod_json(&p)),
        None => not_found("pods", name),
    }
}

/// Reads a request body, at most [`MAX_BODY`] bytes. Past that, a 413; the rest of the body
/// goes to [`linger`], so a client still writing it reads the answer, not a broken pipe.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
    let mut body = req.into_body();
    let mut got = bytes::BytesMut::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(status(408, "Timeout", "request body not received in time", None)),
            Ok(None) => return Ok(got.freeze()),
            Ok(Some(Err(e))) => return Err(status(400, "BadRequest", &format!("reading the request body: {e}"), None)),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else { continue };
                if got.len() + data.len() > MAX_BODY {
                    tokio::spawn(linger(body));
                    return Err(status(413, "RequestEntityTooLarge", "Request entity too large: limit is 1048576", None));
                }
                got.extend_from_slice(&data);
            }
        }
    }
}

/// What Go's net/http (the real API server) does with a request body its handler left unread:
/// it answers, half-closes and keeps the connection 500 ms before closing it
/// (`closeWriteAndWait`), so the client gets to read the answer while it is still sending.
/// Closing at once instead makes the client's write fail first (kubectl: "write: broken pipe").
async fn linger(mut body: Incoming) {
    let drain = async { while let Some(Ok(_)) = body.frame().await {} };
    let _ = tokio::time::timeout(Duration::from_millis(500), drain).await;
}

/// POST /apis/authorization.k8s.io/v1/selfsubjectaccessreviews: what `kubectl auth can-i` asks.
async fn self_subject_access_review(state: &Arc<ApiState>, req: Request<Incoming>, user: &User) -> Response<Body> {
    let protobuf = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("application/vnd.kubernetes.protobuf"));
    let body = match read_body(req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    // kubectl (client-go) sends built-in types as protobuf; real servers accept both.
    let parsed = if protobuf { pb::self_subject_access_review(&body) } else { serde_json::from_slice::<Value>(&body).ok() };
    let Some(mut review) = parsed else {
        return bad_request("the body of the request was in an unknown format - accepted media types include: application/json, application/yaml, application/vnd.kubernetes.protobuf");
    };
    let spec = &review["spec"];
    let attrs = if let Some(r) = spec.get("resourceAttributes").filter(|r| r.is_object()) {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        Attributes { verb: s("verb"), api_group: s("group"), resource: s("resource"), subresource: s("subresource"), namespace: s("namespace"), name: s("name"), path: None }
    } else if let Some(n) = spec.get("nonResourceAttributes").filter(|r| r.is_object()) {
        Attributes { verb: n["verb"].as_str().unwrap_or("").into(), path: Some(n["path"].as_str().unwrap_or("").into()), ..Default::default() }
    } else {
        return status(
            422,
            "Invalid",
            "SelfSubjectAccessReview.authorization.k8s.io \"\" is invalid: spec.resourceAttributes: Invalid value: \"null\": exactly one of nonResourceAttributes or resourceAttributes must be specified",
            None,
        );
    };
    let (allowed, reason) = match state.authz.authorize(user, &attrs) {
        Decision::Allow(r) => (true, r),
        Decision::Deny(r) => (false, r),
    };
    let mut st = json!({"allowed": allowed});
    if !reason.is_empty() {
        st["reason"] = json!(reason);
    }
    review["status"] = st;
    review["apiVersion"] = json!("authorization.k8s.io/v1");
    review["kind"] = json!("SelfSubjectAccessReview");
    review["metadata"] = json!({"creationTimestamp": null});
    json_response(StatusCode::CREATED, &review)
}

/// Just enough protobuf to read the one protobuf body clients send here: kubectl's
/// SelfSubjectAccessReview, in the `k8s\0` envelope around a runtime.Unknown.
mod pb {
    use serde_json::{Value, json};

    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&c, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(c & 0x7f) << (7 * i);
            if c & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// The length-delimited fields of a message, by field number (others skipped).
    fn fields(mut b: &[u8]) -> Option<Vec<(u64, &[u8])>> {
        let mut out = Vec::new();
        while !b.is_empty() && out.len() < 1000 {
            let key = varint(&mut b)?;
            match key & 7 {
                0 => {
                    varint(&mut b)?;
                }
                1 => b = b.get(8..)?,
                5 => b = b.get(4..)?,
                2 => {
                    let n = usize::try_from(varint(&mut b)?).ok()?;
                    out.push((key >> 3, b.get(..n)?));
                    b = &b[n..];
                }
                _ => return None,
            }
        }
        Some(out)
    }

    fn field<'a>(fs: &[(u64, &'a [u8])], n: u64) -> Option<&'a [u8]> {
        fs.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
    }

    fn string(fs: &[(u64, &[u8])], n: u64) -> String {
        field(fs, n).map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
    }

    /// The review as JSON (k8s.io/api/authorization/v1 generated.proto field numbers).
    pub fn self_subject_access_review(body: &[u8]) -> Option<Value> {
        let unknown = fields(body.strip_prefix(b"k8s\0")?)?;
        let review = fields(field(&unknown, 2)?)?;
        let spec = fields(field(&review, 2)?)?;
        let mut out = json!({"spec": {}});
        if let Some(r) = field(&spec, 1) {
            let r = fields(r)?;
            out["spec"]["resourceAttributes"] = json!({
                "namespace": string(&r, 1), "verb": string(&r, 2), "group": string(&r, 3), "version": string(&r, 4),
                "resource": string(&r, 5), "name": string(&r, 6), "subresource": string(&r, 7),
            });
        }
        if let Some(n) = field(&spec, 2) {
            let n = fields(n)?;
            out["spec"]["nonResourceAttributes"] = json!({"path": string(&n, 1), "verb": string(&n, 2)});
        }
        Some(out)
    }
}

/// resourceVersion + resourceVersionMatch of a LIST, as the API server reads them.
async fn wait_fresh(state: &ApiState, rv: u64) -> Result<(), Response<Body>> {
    let deadline = tokio::time::Instant::now() + FRESHNESS_WAIT;
    while state.store.resource_version() < rv {
        if tokio::time::Instant::now() >= deadline {
            return Err(json_response(StatusCode::GATEWAY_TIMEOUT, &too_large_json(rv, state.store.resource_version())));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    v: String,
    rv: u64,
    start: String,
}

async fn list_pods(state: &ApiState, query: &Query, ns: Option<&str>, wants_table: bool, select: impl Fn(&Pod) -> bool) -> Response<Body> {
    let store = &state.store;
    let rv_param = query.get("resourceVersion").filter(|r| !r.is_empty());
    let rv_match = query.get("resourceVersionMatch").filter(|r| !r.is_empty());
    let limit = query.get("limit").and_then(|l| l.parse::<usize>().ok()).filter(|l| *l > 0);
    let (mut pods, rv, start) = if let Some(token) = query.get("continue").filter(|c| !c.is_empty()) {
        let Some(c) = base64::engine::general_purpose::STANDARD
            .decode(token)
            .ok()
            .and_then(|b| serde_json::from_slice::<Continue>(&b).ok())
            .filter(|c| c.v == "meta.k8s.io/v1")
        else {
            return bad_request("continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)");
        };
        match store.list_pods_at(ns, c.rv) {
            Ok(p) => (p, c.rv, Some(c.start)),
            Err(_) => {
                return status(
                    410,
                    "Expired",
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    None,
                );
            }
        }
    } else {
        let rv = match rv_param.map(str::parse::<u64>) {
            None => None,
            Some(Ok(rv)) => Some(rv),
            Some(Err(_)) => return status(400, "BadRequest", &format!("invalid resource version: {}", rv_param.unwrap_or_default()), None),
        };
        match (rv, rv_match) {
            (None, Some(_)) => {
                return status(422, "Invalid", "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided", None);
            }
            (Some(0), Some("Exact")) => {
                return status(422, "Invalid", "ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"", None);
            }
            (Some(rv), Some("Exact")) => {
                if let Err(r) = wait_fresh(state, rv).await {
                    return r;
                }
                match store.list_pods_at(ns, rv) {
                    Ok(p) => (p, rv, None),
                    Err(RvError::TooOld(..)) => return status(410, "Expired", "The resourceVersion for the provided list is too old.", None),
                    Err(RvError::TooLarge(r, c)) => return json_response(StatusCode::GATEWAY_TIMEOUT, &too_large_json(r, c)),
                }
            }
            (Some(rv), None | Some("NotOlderThan")) => {
                if rv > 0 {
                    if let Err(r) = wait_fresh(state, rv).await {
                        return r;
                    }
                }
                let (p, cur) = store.list_pods(ns);
                (p, cur, None)
            }
            (_, Some(other)) => {
                return status(422, "Invalid", &format!("ListOptions.meta.k8s.io \"\" is invalid: resourceVersionMatch: Unsupported value: \"{other}\": supported values: \"Exact\", \"NotOlderThan\", \"\""), None);
            }
            (None, None) => {
                let (p, cur) = store.list_pods(ns);
                (p, cur, None)
            }
        }
    };
    let key = |p: &Pod| format!("{}/{}", p.metadata.namespace.as_deref().unwrap_or(""), p.metadata.name.as_deref().unwrap_or(""));
    pods.retain(|p| select(p) && start.as_deref().is_none_or(|s| key(p).as_str() >= s));
    pods.sort_by_key(|p| key(p));
    let mut next = None;
    if let Some(limit) = limit {
        if pods.len() > limit {
            let rest = pods.split_off(limit);
            let c = Continue { v: "meta.k8s.io/v1".into(), rv, start: format!("{}\u{0}", key(&pods[limit - 1])) };
            next = Some((base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&c).expect("json")), rest.len()));
        }
    }
    let mut v = if wants_table { pods_table(&pods, rv) } else { list_json("PodList", "v1", pods.iter().map(pod_json).collect(), rv) };
    if let Some((token, remaining)) = next {
        v["metadata"]["continue"] = json!(token);
        v["metadata"]["remainingItemCount"] = json!(remaining);
    }
    json_response(StatusCode::OK, &v)
}

fn event_line(kind: &str, object: Value) -> Bytes {
    let mut b = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON");
    b.push(b'\n');
    Bytes::from(b)
}

/// A BOOKMARK as a real API server encodes one for pods: an empty Pod carrying only the
/// resourceVersion (and the initial-events-end annotation after a streamed initial list).
fn bookmark(rv: u64, initial_end: bool) -> Bytes {
    let mut meta = json!({"resourceVersion": rv.to_string(), "creationTimestamp": null});
    if initial_end {
        meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    event_line("BOOKMARK", json!({"kind": "Pod", "apiVersion": "v1", "metadata": meta, "spec": {"containers": null}, "status": {}}))
}

fn streaming(rx: mpsc::Receiver<Bytes>) -> Response<Body> {
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx)) });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}

/// A watch, as newline-delimited JSON: events after `resourceVersion` (or synthetic ADDED
/// for the current state), then live ones; an `ERROR` event with a 410 Status when the
/// resourceVersion was compacted away; BOOKMARKs when asked for; until the timeout or the
/// client goes away.
async fn watch_pods(state: &Arc<ApiState>, query: &Query, select: impl Fn(&Pod) -> bool + Send + 'static) -> Response<Body> {
    let rv = match query.get("resourceVersion").filter(|r| !r.is_empty()).map(str::parse::<u64>) {
        None | Some(Ok(0)) => None,
        Some(Ok(rv)) => Some(rv),
        Some(Err(_)) => return status(400, "BadRequest", &format!("invalid resource version: {}", query.get("resourceVersion").unwrap_or_default()), None),
    };
    let bookmarks = query.flag("allowWatchBookmarks");
    let initial_events = query.flag("sendInitialEvents");
    if initial_events && (query.get("resourceVersionMatch") != Some("NotOlderThan") || !bookmarks) {
        return status(
            422,
            "Invalid",
            "ListOptions.meta.k8s.io \"\" is invalid: [resourceVersionMatch: Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan, allowWatchBookmarks: Required value: allowWatchBookmarks must be set to true when sendInitialEvents is set]",
            None,
        );
    }
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse().ok()).map(Duration::from_secs).unwrap_or(Duration::from_secs(1800)).min(MAX_WATCH);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    // What to send first, and from where the live events go on.
    let start = match rv {
        Some(rv) if !initial_events => {
            if state.store.resource_version() < rv {
                let _ = wait_fresh(state, rv).await;
            }
            match state.store.watch_from(rv) {
                Ok((past, live)) => Ok((Vec::new(), past, live, rv, false)),
                Err(RvError::TooOld(req, oldest)) => Err(status_json(410, "Expired", &format!("too old resource version: {req} ({oldest})"), None)),
                Err(RvError::TooLarge(req, cur)) => Err(too_large_json(req, cur)),
            }
        }
        _ => {
            if let Some(rv) = rv {
                let _ = wait_fresh(state, rv).await;
            }
            let (pods, list_rv) = state.store.list_pods(None);
            match state.store.watch_from(list_rv) {
                Ok((past, live)) => {
                    let initial = pods.into_iter().map(|pod| PodEvent { rv: list_rv, kind: "ADDED", pod }).collect();
                    Ok((initial, past, live, list_rv, initial_events))
                }
                Err(_) => Err(status_json(500, "InternalError", "watch start failed", None)),
            }
        }
    };
    let (initial, past, mut live, from_rv, initial_end) = match start {
        Ok(s) => s,
        Err(status) => {
            // The real server answers 200 and sends the error as the only event.
            let _ = tx.try_send(event_line("ERROR", status));
            drop(tx);
            return streaming(rx);
        }
    };
    let store = state.store.clone();
    let interval = state.bookmark_interval.max(Duration::from_millis(100));
    tokio::spawn(async move {
        let line = |e: &PodEvent| event_line(e.kind, pod_json(&e.pod));
        let mut last = from_rv;
        for e in &initial {
            if select(&e.pod) && tx.send(line(e)).await.is_err() {
                return;
            }
        }
        if initial_end && tx.send(bookmark(from_rv, true)).await.is_err() {
            return;
        }
        for e in &past {
            last = last.max(e.rv);
            if select(&e.pod) && tx.send(line(e)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        loop {
            tokio::select! {
                e = live.recv() => match e {
                    Ok(e) if e.rv > last => {
                        last = e.rv;
                        if select(&e.pod) && tx.send(line(&e)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Lagged or closed: end the watch; the client re-lists, as with a real one.
                    Err(_) => return,
                },
                _ = ticker.tick(), if bookmarks => {
                    let (queued, rv, lagged) = store.progress(&mut live);
                    if lagged {
                        return;
                    }
                    for e in &queued {
                        if e.rv <= last {
                            continue;
                        }
                        last = e.rv;
                        if select(&e.pod) && tx.send(line(e)).await.is_err() {
                            return;
                        }
                    }
                    last = last.max(rv);
                    if tx.send(bookmark(last, false)).await.is_err() {
                        return;
                    }
                }
                _ = &mut deadline => {
                    // As the watch cache does, a last bookmark just before the watch ends.
                    if bookmarks {
                        let (queued, rv, _) = store.progress(&mut live);
                        for e in &queued {
                            if e.rv <= last {
                                continue;
                            }
                            last = e.rv;
                            if select(&e.pod) && tx.send(line(e)).await.is_err() {
                                return;
                            }
                        }
                        let _ = tx.send(bookmark(last.max(rv), false)).await;
                    }
                    return;
                }
                _ = tx.closed() => return,
            }
        }
    });
    streaming(rx)
}

fn portforward(state: &Arc<ApiState>, req: Request<Incoming>, ns: &str, name: &str, ports: Vec<u16>) -> Response<Body> {
    let Some(pod) = state.store.get_pod(ns, name) else { return not_found("pods", name) };
    // kubectl: SPDY/3.1, plain or tunnelled in WebSocket; ports come in its stream headers.
    if let Some(transport) = spdy::requested(&req) {
        let Some(netns) = state.kubelet.netns_of(ns, name) else {
            return status(400, "BadRequest", &format!("pod {name} is not running"), None);
        };
        let dial = spdy::dial_pod(netns, name.to_string(), pod.metadata.uid.clone().unwrap_or_default());
        return match spdy::accept(&state.spdy, req, transport, dial) {
            Ok((response, serve)) => {
                state.port_forwards.lock().unwrap().push(tokio::spawn(serve).abort_handle());
                response
            }
            Err((code, reason, message)) => status(code, reason, &message, None),
        };
    }
    let is_websocket = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !is_websocket || req.method() != Method::GET {
        return status(400, "BadRequest", "port-forward needs an upgrade: WebSocket (GET) or SPDY/3.1", None);
    }
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .collect();
    let Some(protocol) = PORTFORWARD_PROTOCOLS.iter().find(|p| offered.iter().any(|o| o == *p)) else {
        return status(400, "BadRequest", &format!("no supported port-forward subprotocol offered ({offered:?}); supported: {PORTFORWARD_PROTOCOLS:?}"), None);
    };
    if ports.is_empty() {
        return status(400, "BadRequest", "at least one port must be specified", None);
    }
    let Some(netns) = state.kubelet.netns_of(ns, name) else {
        return status(400, "BadRequest", &format!("pod {name} is not running"), None);
    };
    let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())) else {
        return status(400, "BadRequest", "missing Sec-WebSocket-Key", None);
    };
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let pod_name = name.to_string();
    let upgrade = hyper::upgrade::on(req);
    let task = tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        serve_portforward(ws, netns, ports, &pod_name, &uid).await;
    });
    state.port_forwards.lock().unwrap().push(task.abort_handle());
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&key).expect("accept key"))
        .header(header::SEC_WEBSOCKET_PROTOCOL, *protocol)
        .body(full(Bytes::new()))
        .expect("response")
}

/// The kubelet's side of a port-forward: announce each port on its data and error channels,
/// dial localhost:PORT in the pod, relay; report dial failures on the error channel.
async fn serve_portforward<S>(ws: WebSocketStream<S>, netns: PathBuf, ports: Vec<u16>, pod: &str, uid: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sink, mut stream) = ws.split();
    for (i, port) in ports.iter().enumerate() {
        for ch in [2 * i as u8, 2 * i as u8 + 1] {
            let mut frame = vec![ch];
            frame.extend_from_slice(&port.to_le_bytes());
            if sink.send(Message::binary(frame)).await.is_err() {
                return;
            }
        }
    }
    let (to_ws, mut from_pods) = mpsc::channel::<Message>(16);
    let mut writers = Vec::new();
    let mut readers = JoinSet::new();
    for (i, &port) in ports.iter().enumerate() {
        let dialled = {
            let netns = netns.clone();
            tokio::task::spawn_blocking(move || dial_in(&netns, port)).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        let conn = match dialled.and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(s)
        }) {
            Ok(c) => c,
            Err(e) => {
                let msg = format!(
                    "error forwarding port {port} to pod {pod}, uid {uid}: failed to connect to localhost:{port} inside namespace \"{}\", IPv4: dial tcp4 127.0.0.1:{port}: {e}",
                    netns.display()
                );
                let mut frame = vec![2 * i as u8 + 1];
                frame.extend_from_slice(msg.as_bytes());
                let _ = sink.send(Message::binary(frame)).await;
                writers.push(None);
                continue;
            }
        };
        let _ = conn.set_nodelay(true);
        let (mut rd, wr) = conn.into_split();
        writers.push(Some(wr));
        let tx = to_ws.clone();
        readers.spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 64 * 1024 + 1];
            loop {
                buf[0] = 2 * i as u8;
                match rd.read(&mut buf[1..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send(Message::binary(buf[..n + 1].to_vec())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    drop(to_ws);
    if writers.iter().all(Option::is_none) {
        let _ = sink.close().await;
        return;
    }
    loop {
        tokio::select! {
            // None once every pod-side reader is done and its queue drained: the pod closed.
            msg = from_pods.recv() => match msg {
                Some(m) => if sink.send(m).await.is_err() { break },
                None => break,
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Binary(data))) => {
                    let Some((&ch, payload)) = data.split_first() else { continue };
                    if ch % 2 == 0 {
                        if let Some(Some(w)) = writers.get_mut(ch as usize / 2) {
                            use tokio::io::AsyncWriteExt;
                            if w.write_all(payload).await.is_err() { break; }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
        }
    }
    readers.abort_all();
    for w in writers.iter_mut().flatten() {
        use tokio::io::AsyncWriteExt;
        let _ = w.shutdown().await;
    }
    let _ = sink.close().await;
}


/// The HTTPS listener, stoppable and restartable on the same address (faults tests use).
pub struct ApiServer {
    state: Arc<ApiState>,
    tls: tokio_rustls::TlsAcceptor,
    listen_netns: PathBuf,
    pub addr: SocketAddr,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Binds `addr` inside a network namespace (port 0: any).
fn bind_in(netns: &std::path::Path, addr: SocketAddr) -> Result<std::net::TcpListener> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        nix::sched::setns(std::fs::File::open(&netns)?, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("bind thread panicked"))?
}

impl ApiServer {
    pub async fn start(state: Arc<ApiState>, tls: Arc<rustls::ServerConfig>, listen_netns: PathBuf, bind: SocketAddr) -> Result<Self> {
        let listener = bind_in(&listen_netns, bind)?;
        let addr = listener.local_addr()?;
        let server = ApiServer { state, tls: tls.into(), listen_netns, addr, accept: Mutex::new(None) };
        server.serve(TcpListener::from_std(listener)?);
        Ok(server)
    }

    fn serve(&self, listener: TcpListener) {
        let (state, tls) = (self.state.clone(), self.tls.clone());
        let task = tokio::spawn(async move {
            // Dropping the JoinSet (when this task is aborted) aborts every connection.
            let mut connections = JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                // As the real API server: Go sets TCP_NODELAY on every TCP connection.
                let _ = tcp.set_nodelay(true);
                let (state, tls) = (state.clone(), tls.clone());
                while connections.try_join_next().is_some() {}
                if connections.len() >= 4096 {
                    continue; // dropped: hostile clients cannot pile up connections
                }
                connections.spawn(async move {
                    if *state.hang.borrow() == Hang::Everything {
                        // Accepted by the kernel and by us, then never read or answered.
                        state.wait_unhung(&[Hang::Everything]).await;
                        return;
                    }
                    let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await else { return };
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .max_buf_size(1 << 20)
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        *self.accept.lock().unwrap() = Some(task);
    }

    /// Stops serving: the port closes, every connection, watch and port-forward drops.
    pub fn stop(&self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        self.state.drop_port_forwards();
    }

    /// Serves again on the same address (a no-op when serving).
    pub fn resume(&self) -> Result<()> {
        if self.accept.lock().unwrap().as_ref().is_some_and(|t| !t.is_finished()) {
            return Ok(());
        }
        // The aborted accept task may still hold the old socket for a moment.
        let mut last = None;
        for _ in 0..100 {
            match bind_in(&self.listen_netns, self.addr) {
                Ok(l) => {
                    self.serve(TcpListener::from_std(l)?);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(last.unwrap()).context("re-binding the API server's port")
    }

    /// Stops the server (every connection and port-forward drops), waits, starts it again on
    /// the same address.
    pub async fn restart(&self, down_for: Duration) -> Result<()> {
        self.stop();
        tokio::time::sleep(down_for).await;
        self.resume()
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        self.state.drop_port_forwards();
    }
}
