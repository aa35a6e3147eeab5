//! The simulated Kubernetes API server: HTTPS (rustls) with bearer-token auth, real
//! Kubernetes JSON (Pod, PodList, Service, StatefulSet, Namespace, Status errors, watch
//! events, meta.k8s.io Table for kubectl), and the pod `portforward` subresource over
//! WebSocket with the channel protocol (`v4.channel.k8s.io` / `portforward.k8s.io`), and over
//! SPDY/3.1 for kubectl (see [`super::spdy`]).
//!
//! It listens on 127.0.0.1 inside the workstation namespace; port-forwards dial localhost
//! inside the pod's namespace, as the kubelet does.
use std::{
    collections::HashSet,
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
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
    kubelet::{Kubelet, NODE_NAME, dial_in},
    selector::{FieldSelector, LabelSelector},
    spdy,
    store::{PodEvent, Store},
};

type Body = BoxBody<Bytes, Infallible>;

/// Port-forward subprotocols served, in order of preference (what kube-rs and the official
/// clients offer; v5 is not offered for port-forward by real API servers).
const PORTFORWARD_PROTOCOLS: [&str; 2] = ["v4.channel.k8s.io", "portforward.k8s.io"];

pub struct ApiState {
    pub store: Arc<Store>,
    pub kubelet: Arc<Kubelet>,
    pub token: String,
    /// (verb, resource) pairs answered with 403, e.g. ("get", "pods"), ("create", "pods/portforward").
    pub forbidden: Mutex<HashSet<(String, String)>>,
    port_forwards: Mutex<Vec<tokio::task::AbortHandle>>,
    /// Every request as "VERB RESOURCE NAMESPACE/NAME", for tests to inspect.
    pub audit: Mutex<Vec<String>>,
    /// kubectl's SPDY port-forward: options and counters.
    pub spdy: spdy::SpdyState,
}

impl ApiState {
    pub fn new(store: Arc<Store>, kubelet: Arc<Kubelet>, token: String) -> Self {
        ApiState { store, kubelet, token, forbidden: Mutex::default(), port_forwards: Mutex::default(), audit: Mutex::default(), spdy: Default::default() }
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

/// A `kind: Status` failure, as the real API server sends it.
fn status(code: u16, reason: &str, message: &str, details: Option<Value>) -> Response<Body> {
    let mut v = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    });
    if let Some(d) = details {
        v["details"] = d;
    }
    json_response(StatusCode::from_u16(code).expect("code"), &v)
}

fn not_found(kind: &str, name: &str) -> Response<Body> {
    status(404, "NotFound", &format!("{kind} \"{name}\" not found"), Some(json!({"name": name, "kind": kind})))
}

fn forbidden(verb: &str, resource: &str, name: Option<&str>, ns: Option<&str>) -> Response<Body> {
    let (res, sub) = resource.split_once('/').map(|(r, s)| (r, Some(s))).unwrap_or((resource, None));
    let subject = match name {
        Some(n) => format!("{res} \"{n}\" is forbidden"),
        None => format!("{res} is forbidden"),
    };
    let what = match sub {
        Some(s) => format!("resource \"{res}/{s}\""),
        None => format!("resource \"{res}\""),
    };
    let scope = ns.map(|n| format!(" in the namespace \"{n}\"")).unwrap_or_else(|| " at the cluster scope".into());
    let message = format!("{subject}: User \"sim-admin\" cannot {verb} {what} in API group \"\"{scope}");
    status(403, "Forbidden", &message, Some(json!({"name": name.unwrap_or(""), "kind": res})))
}

/// The object as the API returns it from GET/watch: with apiVersion and kind.
fn pod_json(pod: &Pod) -> Value {
    serde_json::to_value(pod).expect("pod JSON")
}

/// List items carry no apiVersion/kind, like the real API server's.
fn list_json(kind: &str, items: Vec<Value>, rv: u64) -> Value {
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
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items})
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
            let phase = if p.metadata.deletion_timestamp.is_some() { "Terminating".to_string() } else { st.phase.clone().unwrap_or_default() };
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

fn discovery(path: &[&str]) -> Option<Value> {
    Some(match path {
        ["version"] => json!({"major": "1", "minor": "32", "gitVersion": "v1.32.0-beamredir-sim", "platform": "linux/amd64", "goVersion": "go1.23", "compiler": "gc"}),
        ["api"] => json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1"}]}),
        ["apis"] => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": "apps", "versions": [{"groupVersion": "apps/v1", "version": "v1"}], "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"}}]}),
        ["api", "v1"] => json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            {"name": "namespaces", "singularName": "namespace", "namespaced": false, "kind": "Namespace", "verbs": ["get", "list"], "shortNames": ["ns"]},
            {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod", "verbs": ["delete", "get", "list", "watch"], "shortNames": ["po"], "categories": ["all"]},
            {"name": "pods/portforward", "singularName": "", "namespaced": true, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]},
            {"name": "services", "singularName": "service", "namespaced": true, "kind": "Service", "verbs": ["get", "list"], "shortNames": ["svc"], "categories": ["all"]},
        ]}),
        ["apis", "apps", "v1"] => json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "apps/v1", "resources": [
            {"name": "statefulsets", "singularName": "statefulset", "namespaced": true, "kind": "StatefulSet", "verbs": ["get"], "shortNames": ["sts"], "categories": ["all"]},
        ]}),
        _ => return None,
    })
}

struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(form_urlencoded::parse(q.unwrap_or("").as_bytes()).into_owned().collect())
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

pub async fn handle(state: Arc<ApiState>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let expected = format!("Bearer {}", state.token);
    if req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return Ok(status(401, "Unauthorized", "Unauthorized", None));
    }
    let path: Vec<String> = req.uri().path().split('/').filter(|s| !s.is_empty()).map(String::from).collect();
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    let query = Query::parse(req.uri().query());
    let wants_table = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("as=Table"));
    if req.method() == Method::GET {
        if let Some(v) = discovery(&path) {
            return Ok(json_response(StatusCode::OK, &v));
        }
    }
    // (verb, resource, namespace, name) for authorization and the audit log.
    let (verb, resource, ns, name): (&str, String, Option<&str>, Option<&str>) = match (req.method(), path.as_slice()) {
        (&Method::GET, ["api", "v1", "namespaces"]) => ("list", "namespaces".into(), None, None),
        (&Method::GET, ["api", "v1", "namespaces", n]) => ("get", "namespaces".into(), None, Some(n)),
        (&Method::GET, ["api", "v1", "pods"]) => (if query.flag("watch") { "watch" } else { "list" }, "pods".into(), None, None),
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods"]) => (if query.flag("watch") { "watch" } else { "list" }, "pods".into(), Some(ns), None),
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", n]) => ("get", "pods".into(), Some(ns), Some(n)),
        (&Method::DELETE, ["api", "v1", "namespaces", ns, "pods", n]) => ("delete", "pods".into(), Some(ns), Some(n)),
        (&Method::GET | &Method::POST, ["api", "v1", "namespaces", ns, "pods", n, "portforward"]) => ("create", "pods/portforward".into(), Some(ns), Some(n)),
        (&Method::GET, ["api", "v1", "namespaces", ns, "services"]) => ("list", "services".into(), Some(ns), None),
        (&Method::GET, ["api", "v1", "namespaces", ns, "services", n]) => ("get", "services".into(), Some(ns), Some(n)),
        (&Method::GET, ["apis", "apps", "v1", "namespaces", ns, "statefulsets", n]) => ("get", "statefulsets".into(), Some(ns), Some(n)),
        _ => return Ok(status(404, "NotFound", "the server could not find the requested resource", None)),
    };
    state.audit.lock().unwrap().push(format!("{verb} {resource} {}/{}", ns.unwrap_or(""), name.unwrap_or("")));
    if state.forbidden.lock().unwrap().contains(&(verb.to_string(), resource.clone())) {
        return Ok(forbidden(verb, &resource, name, ns));
    }
    let store = &state.store;
    let labels = match query.get("labelSelector").map(LabelSelector::parse).transpose() {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => return Ok(status(400, "BadRequest", &format!("unable to parse requirement: {e}"), None)),
    };
    let fields = match query.get("fieldSelector").map(FieldSelector::parse).transpose() {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => return Ok(status(400, "BadRequest", &e.to_string(), None)),
    };
    let select = move |p: &Pod| labels.matches(&p.metadata.labels.clone().unwrap_or_default()) && fields.matches(p);
    Ok(match (verb, resource.as_str(), name) {
        ("list", "namespaces", _) => {
            let items = store.namespaces().into_iter().map(|n| json!({"metadata": {"name": n}, "status": {"phase": "Active"}})).collect();
            json_response(StatusCode::OK, &list_json("NamespaceList", items, store.resource_version()))
        }
        ("get", "namespaces", Some(n)) if store.has_namespace(n) => {
            json_response(StatusCode::OK, &json!({"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": n}, "status": {"phase": "Active"}}))
        }
        ("get", "namespaces", Some(n)) => not_found("namespaces", n),
        ("watch", "pods", _) => {
            let rv = query.get("resourceVersion").and_then(|r| r.parse::<u64>().ok()).filter(|rv| *rv > 0);
            let timeout = query.get("timeoutSeconds").and_then(|t| t.parse().ok()).unwrap_or(300);
            let ns = ns.map(String::from);
            watch_pods(&state, rv, Duration::from_secs(timeout), move |p: &Pod| ns.as_deref().is_none_or(|n| p.metadata.namespace.as_deref() == Some(n)) && select(p))
        }
        ("list", "pods", _) => {
            let (pods, rv) = store.list_pods(ns);
            let pods: Vec<Pod> = pods.into_iter().filter(|p| select(p)).collect();
            if wants_table {
                json_response(StatusCode::OK, &pods_table(&pods, rv))
            } else {
                json_response(StatusCode::OK, &list_json("PodList", pods.iter().map(pod_json).collect(), rv))
            }
        }
        ("get", "pods", Some(n)) => match store.get_pod(ns.unwrap_or_default(), n) {
            Some(p) if wants_table => json_response(StatusCode::OK, &pods_table(&[p], store.resource_version())),
            Some(p) => json_response(StatusCode::OK, &pod_json(&p)),
            None => not_found("pods", n),
        },
        ("delete", "pods", Some(n)) => match state.kubelet.delete_pod(ns.unwrap_or_default(), n) {
            Some(p) => json_response(StatusCode::OK, &pod_json(&p)),
            None => not_found("pods", n),
        },
        ("create", "pods/portforward", Some(n)) => {
            let ports: Vec<u16> = query.all("ports").flat_map(|v| v.split(',')).filter_map(|p| p.trim().parse().ok()).collect();
            portforward(&state, req, ns.unwrap_or_default(), n, ports)
        }
        ("list", "services", _) => {
            let (svcs, rv) = store.list_services(ns);
            json_response(StatusCode::OK, &list_json("ServiceList", svcs.iter().map(|s| serde_json::to_value(s).unwrap()).collect(), rv))
        }
        ("get", "services", Some(n)) => match store.get_service(ns.unwrap_or_default(), n) {
            Some(s) => json_response(StatusCode::OK, &serde_json::to_value(s).unwrap()),
            None => not_found("services", n),
        },
        ("get", "statefulsets", Some(n)) => match store.get_statefulset(ns.unwrap_or_default(), n) {
            Some(s) => json_response(StatusCode::OK, &serde_json::to_value(s).unwrap()),
            None => status(404, "NotFound", &format!("statefulsets.apps \"{n}\" not found"), Some(json!({"name": n, "group": "apps", "kind": "statefulsets"}))),
        },
        _ => status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource", None),
    })
}

/// A watch: events after `rv` (or synthetic ADDED for the current state), then live ones, as
/// newline-delimited JSON, until the timeout or the client goes away.
fn watch_pods(state: &ApiState, rv: Option<u64>, timeout: Duration, select: impl Fn(&Pod) -> bool + Send + 'static) -> Response<Body> {
    let (initial, from_rv) = match rv {
        Some(rv) => (Vec::new(), rv),
        None => {
            let (pods, rv) = state.store.list_pods(None);
            (pods.into_iter().map(|pod| PodEvent { rv, kind: "ADDED", pod }).collect(), rv)
        }
    };
    let (past, mut live) = state.store.watch_from(from_rv);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let line = |e: &PodEvent| {
            let mut b = serde_json::to_vec(&json!({"type": e.kind, "object": pod_json(&e.pod)})).expect("JSON");
            b.push(b'\n');
            Bytes::from(b)
        };
        let mut last = from_rv;
        for e in initial.iter().chain(past.iter()) {
            last = last.max(e.rv);
            if select(&e.pod) && tx.send(line(e)).await.is_err() {
                return;
            }
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
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
                _ = &mut deadline => return,
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx)) });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
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

/// The HTTPS listener, restartable on the same port (a fault tests use).
pub struct ApiServer {
    state: Arc<ApiState>,
    tls: tokio_rustls::TlsAcceptor,
    listen_netns: PathBuf,
    pub addr: SocketAddr,
    accept: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Binds 127.0.0.1:port inside a network namespace (port 0: any).
fn bind_in(netns: &std::path::Path, port: u16) -> Result<std::net::TcpListener> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        nix::sched::setns(std::fs::File::open(&netns)?, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("bind thread panicked"))?
}

impl ApiServer {
    pub async fn start(state: Arc<ApiState>, tls: Arc<rustls::ServerConfig>, listen_netns: PathBuf) -> Result<Self> {
        let listener = bind_in(&listen_netns, 0)?;
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
                connections.spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).with_upgrades().await;
                });
                while connections.try_join_next().is_some() {}
            }
        });
        *self.accept.lock().unwrap() = Some(task);
    }

    /// Stops the server (every connection and port-forward drops), waits, starts it again on
    /// the same address.
    pub async fn restart(&self, down_for: Duration) -> Result<()> {
        if let Some(task) = self.accept.lock().unwrap().take() {
            task.abort();
        }
        self.state.drop_port_forwards();
        tokio::time::sleep(down_for).await;
        let listener = bind_in(&self.listen_netns, self.addr.port()).context("re-binding the API server's port")?;
        self.serve(TcpListener::from_std(listener)?);
        Ok(())
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
