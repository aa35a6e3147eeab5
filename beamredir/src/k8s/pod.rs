//! Pod lookup: the pod's IP, whether it is usable, and its Erlang ports.
//!
//! epmd is 4369 unless a container declares a port named `epmd`. The distribution port comes
//! from `--dist-port`, else a container port named `erlang` or `dist`, else the container's
//! `ERL_PORT` environment variable.
use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::core::v1::{Container, Namespace, Pod};
use kube::{Api, api::ListParams};

use super::{
    Cluster,
    error::{K8sError, classify},
};

pub const DEFAULT_EPMD_PORT: u16 = 4369;

/// Everything beamredir needs to know about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTarget {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub ip: Ipv4Addr,
    pub epmd_port: u16,
    pub dist_port: Option<u16>,
    /// The node's name as its command line gives it (`app@10.244.0.5`), when it can be read.
    pub node_name: Option<String>,
    /// `spec.hostname` and `spec.subdomain` (set by the StatefulSet controller): with the
    /// namespace they make the pod's cluster DNS name.
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
}

impl PodTarget {
    /// Reads a pod object. Fails if it is not Running and Ready with an IPv4 address.
    pub fn from_pod(pod: &Pod, dist_port_flag: Option<u16>) -> Result<Self, K8sError> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let not_ready = |why: String| K8sError::PodNotReady { name: name.clone(), namespace: namespace.clone(), why };
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(not_ready("it is being deleted".into()));
        }
        let status = pod.status.clone().unwrap_or_default();
        let phase = status.phase.clone().unwrap_or_else(|| "Unknown".into());
        if phase != "Running" {
            return Err(not_ready(format!("phase is {phase}, not Running")));
        }
        let ready = status
            .conditions
            .as_ref()
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        if !ready {
            return Err(not_ready("its Ready condition is not True".into()));
        }
        let ip = status
            .pod_ip
            .as_deref()
            .ok_or_else(|| not_ready("it has no pod IP yet".into()))?
            .parse::<Ipv4Addr>()
            .map_err(|_| not_ready(format!("its pod IP {:?} is not IPv4 (beamredir redirects IPv4)", status.pod_ip)))?;
        let containers: &[Container] = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or(&[]);
        let epmd_port = named_port(containers, &["epmd"]).unwrap_or(DEFAULT_EPMD_PORT);
        let dist_port = dist_port_flag
            .or_else(|| named_port(containers, &["erlang", "dist"]))
            .or_else(|| containers.iter().find_map(|c| env_value(c, "ERL_PORT")?.parse().ok()));
        Ok(PodTarget {
            hostname: pod.spec.as_ref().and_then(|s| s.hostname.clone()),
            subdomain: pod.spec.as_ref().and_then(|s| s.subdomain.clone()),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            node_name: node_name(pod, containers, ip),
            name,
            namespace,
            ip,
            epmd_port,
            dist_port,
        })
    }

    pub fn require_dist_port(&self) -> Result<u16, K8sError> {
        self.dist_port.ok_or_else(|| K8sError::NoDistPort { name: self.name.clone(), namespace: self.namespace.clone() })
    }
}

fn named_port(containers: &[Container], names: &[&str]) -> Option<u16> {
    containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref().is_some_and(|n| names.contains(&n)))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container.env.iter().flatten().find(|e| e.name == name)?.value.as_deref()
}

/// The value of an env var as the kubelet would set it: a literal, or one of the pod fields
/// beamredir can see.
fn resolved_env(pod: &Pod, container: &Container, ip: Ipv4Addr) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for e in container.env.iter().flatten() {
        let value = match (&e.value, e.value_from.as_ref().and_then(|v| v.field_ref.as_ref())) {
            (Some(v), _) => Some(expand(v, &vars)),
            (None, Some(field)) => match field.field_path.as_str() {
                "status.podIP" => Some(ip.to_string()),
                "metadata.name" => pod.metadata.name.clone(),
                "metadata.namespace" => pod.metadata.namespace.clone(),
                _ => None,
            },
            _ => None,
        };
        if let Some(v) = value {
            vars.insert(e.name.clone(), v);
        }
    }
    vars
}

/// Kubernetes' `$(VAR)` expansion (unknown references stay as they are; `$$` is `$`).
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(end) = after.strip_prefix('(').and_then(|a| a.find(')')) {
            let name = &after[1..=end];
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&rest[i..i + end + 3]),
            }
            rest = &after[end + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The node name from `-name X@H`/`--name X@H` (erl, elixir, iex) or RELEASE_NODE.
fn node_name(pod: &Pod, containers: &[Container], ip: Ipv4Addr) -> Option<String> {
    for c in containers {
        let vars = resolved_env(pod, c, ip);
        if let Some(n) = vars.get("RELEASE_NODE").filter(|n| n.contains('@')) {
            return Some(n.clone());
        }
        let argv: Vec<String> = c.command.iter().flatten().chain(c.args.iter().flatten()).map(|a| expand(a, &vars)).collect();
        // Also look inside `sh -c "…"` style strings.
        let words: Vec<&str> = argv.iter().flat_map(|a| a.split_whitespace()).collect();
        if let Some(w) = words.windows(2).find(|w| matches!(w[0], "-name" | "--name")) {
            let name = w[1].trim_matches(|c| c == '"' || c == '\'');
            if name.contains('@') {
                return Some(name.to_string());
            }
        }
    }
    None
}

/// The label selector of a StatefulSet (`spec.selector.matchLabels` and `matchExpressions`).
pub async fn statefulset_selector(cluster: &Cluster, name: &str) -> Result<String, K8sError> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    let api: Api<StatefulSet> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let sts = match api.get_opt(name).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(K8sError::NotFound { what: format!("statefulset {name:?}"), namespace: cluster.namespace.clone() }),
        Err(e) => return Err(classify(e, &cluster.url, "get", "statefulsets.apps", &cluster.namespace)),
    };
    Ok(label_selector_string(&sts.spec.selector))
}

/// The selector of a Service (the pods behind it).
pub async fn service_selector(cluster: &Cluster, name: &str) -> Result<String, K8sError> {
    use k8s_openapi::api::core::v1::Service;
    let api: Api<Service> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    let svc = match api.get_opt(name).await {
        Ok(Some(s)) => s,
        Ok(None) => return Err(K8sError::NotFound { what: format!("service {name:?}"), namespace: cluster.namespace.clone() }),
        Err(e) => return Err(classify(e, &cluster.url, "get", "services", &cluster.namespace)),
    };
    let selector = svc.spec.and_then(|s| s.selector).unwrap_or_default();
    if selector.is_empty() {
        return Err(K8sError::Api { verb: "get".into(), resource: "services".into(), message: format!("service {name:?} has no selector, so no pods belong to it") });
    }
    Ok(selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
}

fn label_selector_string(sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector) -> String {
    let mut parts: Vec<String> = sel.match_labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        parts.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            _ => format!("!{}", e.key),
        });
    }
    parts.join(",")
}

/// Pods matching a label selector.
pub async fn list(cluster: &Cluster, selector: &str) -> Result<Vec<Pod>, K8sError> {
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    api.list(&ListParams::default().labels(selector))
        .await
        .map(|l| l.items)
        .map_err(|e| classify(e, &cluster.url, "list", "pods", &cluster.namespace))
}

/// Fetches a pod. When it does not exist, says whether the namespace does and lists the pods
/// whose names come closest.
pub async fn get(cluster: &Cluster, name: &str) -> Result<Pod, K8sError> {
    let ns = &cluster.namespace;
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(pod)) => Ok(pod),
        Ok(None) => Err(not_found(cluster, &api, name).await),
        Err(e) => Err(classify(e, &cluster.url, "get", "pods", ns)),
    }
}

async fn not_found(cluster: &Cluster, api: &Api<Pod>, name: &str) -> K8sError {
    let ns = cluster.namespace.clone();
    let namespaces: Api<Namespace> = Api::all(cluster.client.clone());
    if let Ok(None) = namespaces.get_opt(&ns).await {
        return K8sError::NamespaceNotFound(ns);
    }
    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .map(|l| l.items.into_iter().filter_map(|p| p.metadata.name).collect())
        .unwrap_or_default();
    let near = near_matches(name, &names);
    let suggestions = if near.is_empty() {
        if names.is_empty() { "; the namespace has no pods".into() } else { String::new() }
    } else {
        format!("; did you mean {}?", near.join(", "))
    };
    K8sError::PodNotFound { name: name.into(), namespace: ns, suggestions }
}

/// Names within a small edit distance, or sharing a prefix/substring, closest first (max 5).
pub fn near_matches(wanted: &str, names: &[String]) -> Vec<String> {
    let mut scored: Vec<(usize, &String)> = names
        .iter()
        .filter_map(|n| {
            let d = edit_distance(wanted, n);
            let related = n.contains(wanted) || wanted.contains(n.as_str()) || d <= 2.max(wanted.len() / 3);
            related.then_some((d, n))
        })
        .collect();
    scored.sort();
    scored.into_iter().take(5).map(|(_, n)| n.clone()).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    fn running(containers: serde_json::Value) -> Pod {
        pod(serde_json::json!({
            "metadata": {"name": "app-0", "namespace": "default", "uid": "u1"},
            "spec": {"containers": containers},
            "status": {"phase": "Running", "podIP": "10.244.0.5",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
    }

    #[test]
    fn ports_from_named_container_ports_then_env() {
        let p = running(serde_json::json!([{"name": "app", "ports": [
            {"name": "epmd", "containerPort": 4370}, {"name": "erlang", "containerPort": 9000}]}]));
        let t = PodTarget::from_pod(&p, None).unwrap();
        assert_eq!((t.ip, t.epmd_port, t.dist_port), (Ipv4Addr::new(10, 244, 0, 5), 4370, Some(9000)));
        assert_eq!(PodTarget::from_pod(&p, Some(9100)).unwrap().dist_port, Some(9100));

        let p = running(serde_json::json!([{"name": "app", "env": [{"name": "ERL_PORT", "value": "9001"}]}]));
        let t = PodTarget::from_pod(&p, None).unwrap();
        assert_eq!((t.epmd_port, t.dist_port), (4369, Some(9001)));

        let p = running(serde_json::json!([{"name": "app"}]));
        assert!(matches!(PodTarget::from_pod(&p, None).unwrap().require_dist_port(), Err(K8sError::NoDistPort { .. })));
    }

    #[test]
    fn node_name_from_args_with_field_ref_expansion() {
        let p = running(serde_json::json!([{"name": "app", "command": ["erl"],
            "args": ["-name", "app@$(HOST)", "-setcookie", "x"],
            "env": [{"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]));
        assert_eq!(PodTarget::from_pod(&p, None).unwrap().node_name.as_deref(), Some("app@10.244.0.5"));
        let p = running(serde_json::json!([{"name": "app", "command": ["sh", "-c", "exec iex --name web@$(POD_IP) -S mix"],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]));
        assert_eq!(PodTarget::from_pod(&p, None).unwrap().node_name.as_deref(), Some("web@10.244.0.5"));
    }

    #[test]
    fn not_running_not_ready_no_ip() {
        let mut p = running(serde_json::json!([]));
        p.status.as_mut().unwrap().phase = Some("Pending".into());
        assert!(PodTarget::from_pod(&p, None).unwrap_err().to_string().contains("phase is Pending"));
        let mut p = running(serde_json::json!([]));
        p.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        assert!(PodTarget::from_pod(&p, None).unwrap_err().to_string().contains("Ready condition"));
        let mut p = running(serde_json::json!([]));
        p.status.as_mut().unwrap().pod_ip = None;
        assert!(PodTarget::from_pod(&p, None).unwrap_err().to_string().contains("no pod IP"));
    }

    #[test]
    fn expansion_like_the_kubelet() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$", &vars), "$");
        assert_eq!(expand("$(A", &vars), "$(A");
    }

    #[test]
    fn near_matches_rank_by_distance() {
        let names: Vec<String> = ["app-0", "app-1", "web-0", "database"].iter().map(|s| s.to_string()).collect();
        assert_eq!(near_matches("app-3", &names), vec!["app-0", "app-1"]);
        assert_eq!(near_matches("app", &names), vec!["app-0", "app-1"]);
        assert!(near_matches("zzzzzzzz", &names).is_empty());
    }
}
