//! What to grant when the API server says 403. A WebSocket port-forward is a GET, so API
//! servers before 1.35 check `get` on `pods/portforward`; from 1.35 (kubernetes#134577) they
//! also check `create`; kubectl's SPDY fallback is a POST, checked as `create`. A failed
//! upgrade carries no body, so beamredir asks the API server itself which verbs the user lacks
//! (a SelfSubjectAccessReview, which every authenticated user may create) and names them.
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::{Api, api::PostParams};

use super::Cluster;

/// The Role rule that would allow `verbs` on `resource` (`pods/portforward`, `secrets`,
/// `statefulsets.apps`…), as one line of YAML flow style.
pub fn grant_hint(resource: &str, verbs: &[&str], resource_name: Option<&str>) -> String {
    grant_hint_because(resource, verbs, resource_name, None)
}

/// [`grant_hint`], with the reason the rule is needed (said before the pointer to the example).
pub fn grant_hint_because(
    resource: &str,
    verbs: &[&str],
    resource_name: Option<&str>,
    because: Option<&str>,
) -> String {
    let (resource, group) = match resource.split_once('.') {
        // "statefulsets.apps" → group apps; "pods/portforward" has no dot.
        Some((r, g)) if !r.contains('/') => (r, g),
        _ => (resource, ""),
    };
    let verbs = verbs
        .iter()
        .map(|v| format!("\"{v}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let names = resource_name
        .map(|n| format!(", resourceNames: [\"{n}\"]"))
        .unwrap_or_default();
    let because = because.map(|b| format!("{b}; ")).unwrap_or_default();
    format!(
        "grant it with a Role rule {{apiGroups: [\"{group}\"], resources: [\"{resource}\"], verbs: [{verbs}]{names}}} ({because}see docs/examples/rbac.yaml)"
    )
}

/// Which of `verbs` on `resource/subresource` the current user may not do in the cluster's
/// namespace. None if the API server cannot say.
pub async fn missing_verbs(
    cluster: &Cluster,
    resource: &str,
    subresource: Option<&str>,
    name: Option<&str>,
    verbs: &[&str],
) -> Option<Vec<String>> {
    let api: Api<SelfSubjectAccessReview> = Api::all(cluster.client.clone());
    let mut missing = Vec::new();
    for verb in verbs {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(cluster.namespace.clone()),
                    verb: Some(verb.to_string()),
                    resource: Some(resource.to_string()),
                    subresource: subresource.map(String::from),
                    name: name.map(String::from),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            api.create(&PostParams::default(), &review),
        )
        .await
        .ok()?
        .ok()?;
        if !answer.status.is_some_and(|s| s.allowed) {
            missing.push(verb.to_string());
        }
    }
    Some(missing)
}

/// The advice for a refused port-forward: which verbs are missing and the rule to add.
pub async fn portforward_advice(cluster: &Cluster, pod: &str) -> (String, String) {
    match missing_verbs(
        cluster,
        "pods",
        Some("portforward"),
        Some(pod),
        &["get", "create"],
    )
    .await
    {
        Some(missing) if !missing.is_empty() => {
            let verbs: Vec<&str> = missing.iter().map(String::as_str).collect();
            let because = (verbs == ["create"]).then_some(
                "Kubernetes 1.35 and later also require create for WebSocket port-forwards",
            );
            (
                verbs.join(" and "),
                grant_hint_because("pods/portforward", &["get", "create"], None, because),
            )
        }
        _ => (
            "get and create".into(),
            grant_hint("pods/portforward", &["get", "create"], None),
        ),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hints_name_group_resource_and_verbs() {
        assert_eq!(
            super::grant_hint("pods/portforward", &["get", "create"], None),
            "grant it with a Role rule {apiGroups: [\"\"], resources: [\"pods/portforward\"], verbs: [\"get\", \"create\"]} (see docs/examples/rbac.yaml)"
        );
        assert!(
            super::grant_hint("statefulsets.apps", &["get"], None)
                .contains("apiGroups: [\"apps\"], resources: [\"statefulsets\"]")
        );
        assert!(
            super::grant_hint("secrets", &["get"], Some("app-cookie"))
                .contains("resourceNames: [\"app-cookie\"]")
        );
        assert!(
            super::grant_hint_because("pods/portforward", &["get", "create"], None, Some("why"))
                .ends_with("verbs: [\"get\", \"create\"]} (why; see docs/examples/rbac.yaml)")
        );
    }
}
