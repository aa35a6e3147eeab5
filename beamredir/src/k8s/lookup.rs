//! Finding pods through the API: by name (with near matches when it is not there), by label
//! selector, and the selectors of StatefulSets and Services.
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api,
    api::{ListParams, WatchParams},
};

use super::{
    Cluster,
    error::{K8sError, classify},
};

/// A namespaced object that must exist (`kind` and `resource` as the errors name them).
async fn get_named<K>(
    cluster: &Cluster,
    kind: &str,
    resource: &str,
    name: &str,
) -> Result<K, K8sError>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(cluster.client.clone(), &cluster.namespace);
    match api.get_opt(name).await {
        Ok(Some(object)) => Ok(object),
        Ok(None) => Err(K8sError::NotFound {
            what: format!("{kind} {name:?}"),
            namespace: cluster.namespace.clone(),
        }),
        Err(e) => Err(classify(
            e,
            &cluster.url,
            "get",
            resource,
            &cluster.namespace,
        )),
    }
}

/// The label selector of a StatefulSet (`spec.selector.matchLabels` and `matchExpressions`).
pub async fn statefulset_selector(cluster: &Cluster, name: &str) -> Result<String, K8sError> {
    use k8s_openapi::api::apps::v1::StatefulSet;
    let sts: StatefulSet = get_named(cluster, "statefulset", "statefulsets.apps", name).await?;
    Ok(label_selector_string(&sts.spec.selector))
}

/// The selector of a Service (the pods behind it).
pub async fn service_selector(cluster: &Cluster, name: &str) -> Result<String, K8sError> {
    use k8s_openapi::api::core::v1::Service;
    let svc: Service = get_named(cluster, "service", "services", name).await?;
    let selector = svc.spec.and_then(|s| s.selector).unwrap_or_default();
    if selector.is_empty() {
        return Err(K8sError::Api {
            verb: "get".into(),
            resource: "services".into(),
            message: format!("service {name:?} has no selector, so no pods belong to it"),
        });
    }
    Ok(selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(","))
}

fn label_selector_string(
    sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> String {
    let mut parts: Vec<String> = sel
        .match_labels
        .iter()
        .flatten()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
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

/// Checks that the session will be able to follow its pods, before it starts: kube-rs's
/// watcher lists them and then watches them with the same selector (a field selector on the
/// name for `--pod`), which takes `list` and `watch` on pods. Without this check a missing verb
/// would show only as a warning once the session runs, and the pods would never be followed.
pub async fn check_follow(
    cluster: &Cluster,
    selector: Option<&str>,
    names: &[String],
) -> Result<(), K8sError> {
    let ns = &cluster.namespace;
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), ns);
    let fields: Vec<Option<String>> = match selector {
        // The selector's list was made already (that is how the pods were found).
        Some(_) => vec![None],
        None => names
            .iter()
            .map(|n| Some(format!("metadata.name={n}")))
            .collect(),
    };
    // One check per watch the session will run, all at once (each costs two round trips).
    let checks = fields.into_iter().map(|field| {
        let api = api.clone();
        async move {
            let mut wp = WatchParams::default().timeout(1);
            if let Some(f) = &field {
                api.list(&ListParams::default().fields(f).limit(1))
                    .await
                    .map_err(|e| classify(e, &cluster.url, "list", "pods", ns))?;
                wp = wp.fields(f);
            }
            if let Some(sel) = selector {
                wp = wp.labels(sel);
            }
            // The answer's status is all that matters; the stream is dropped unread.
            drop(
                api.watch(&wp, "0")
                    .await
                    .map_err(|e| classify(e, &cluster.url, "watch", "pods", ns))?,
            );
            Ok::<_, K8sError>(())
        }
    });
    futures::future::try_join_all(checks).await.map(|_| ())
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
        .map(|l| {
            l.items
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .collect()
        })
        .unwrap_or_default();
    let near = near_matches(name, &names);
    let suggestions = if near.is_empty() {
        if names.is_empty() {
            "; the namespace has no pods".into()
        } else {
            String::new()
        }
    } else {
        format!("; did you mean {}?", near.join(", "))
    };
    K8sError::PodNotFound {
        name: name.into(),
        namespace: ns,
        suggestions,
    }
}

/// Names within a small edit distance, or sharing a prefix/substring, closest first (max 5).
pub fn near_matches(wanted: &str, names: &[String]) -> Vec<String> {
    let mut scored: Vec<(usize, &String)> = names
        .iter()
        .filter_map(|n| {
            let d = edit_distance(wanted, n);
            let related =
                n.contains(wanted) || wanted.contains(n.as_str()) || d <= 2.max(wanted.len() / 3);
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
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_matches_rank_by_distance() {
        let names: Vec<String> = ["app-0", "app-1", "web-0", "database"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(near_matches("app-3", &names), vec!["app-0", "app-1"]);
        assert_eq!(near_matches("app", &names), vec!["app-0", "app-1"]);
        assert!(near_matches("zzzzzzzz", &names).is_empty());
    }
}
