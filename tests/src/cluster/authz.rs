//! Authentication (bearer tokens → users and groups) and a real RBAC authorizer: Role,
//! ClusterRole, RoleBinding and ClusterRoleBinding as the API server evaluates them
//! (k8s.io/kubernetes/pkg/registry/rbac/validation: verbs × apiGroups × resources, with
//! `*`, `*/subresource` and resourceNames; nonResourceURLs with a trailing `*`).
//!
//! Built in, as on a kubeadm cluster: ClusterRole `cluster-admin` bound to the group
//! `system:masters` (the simulated admin `sim-admin` is in it), `system:basic-user`
//! (SelfSubjectAccessReview/SelfSubjectRulesReview) and `system:discovery` (the discovery
//! paths) bound to `system:authenticated`, and `view`.
use std::{
    collections::{BTreeMap, HashSet},
    sync::Mutex,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Rule {
    pub verbs: Vec<String>,
    pub api_groups: Vec<String>,
    pub resources: Vec<String>,
    pub resource_names: Vec<String>,
    pub non_resource_urls: Vec<String>,
}

#[derive(Clone, Debug)]
struct Subject {
    kind: String,
    name: String,
    namespace: Option<String>,
}

#[derive(Clone, Debug)]
struct Binding {
    kind: &'static str,
    name: String,
    /// None for a ClusterRoleBinding.
    namespace: Option<String>,
    role_kind: String,
    role_name: String,
    subjects: Vec<Subject>,
}

/// What a request asks to do (k8s.io/apiserver's authorizer.Attributes).
#[derive(Clone, Debug, Default)]
pub struct Attributes {
    pub verb: String,
    pub api_group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
    /// For non-resource requests (discovery, /version): the path.
    pub path: Option<String>,
}

impl Attributes {
    pub fn resource(verb: &str, group: &str, resource: &str, namespace: Option<&str>, name: Option<&str>) -> Self {
        let (res, sub) = resource.split_once('/').unwrap_or((resource, ""));
        Attributes {
            verb: verb.into(),
            api_group: group.into(),
            resource: res.into(),
            subresource: sub.into(),
            namespace: namespace.unwrap_or("").into(),
            name: name.unwrap_or("").into(),
            path: None,
        }
    }

    pub fn combined_resource(&self) -> String {
        if self.subresource.is_empty() { self.resource.clone() } else { format!("{}/{}", self.resource, self.subresource) }
    }
}

pub enum Decision {
    /// With RBAC's reason, e.g. `RBAC: allowed by ClusterRoleBinding "x" of ClusterRole "y" to User "z"`.
    Allow(String),
    Deny(String),
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow(_))
    }
}

#[derive(Default)]
struct Inner {
    /// (namespace or None for ClusterRoles, name) -> rules.
    roles: BTreeMap<(Option<String>, String), Vec<Rule>>,
    bindings: Vec<Binding>,
    tokens: BTreeMap<String, User>,
    /// The test fault `forbid(verb, resource)`: denied for everyone, before RBAC.
    deny: HashSet<(String, String)>,
}

pub struct Authorizer {
    inner: Mutex<Inner>,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect()).unwrap_or_default()
}

fn any_or(list: &[String], want: &str) -> bool {
    list.iter().any(|v| v == "*" || v == want)
}

impl Rule {
    fn from_json(v: &Value) -> Self {
        Rule {
            verbs: strings(&v["verbs"]),
            api_groups: strings(&v["apiGroups"]),
            resources: strings(&v["resources"]),
            resource_names: strings(&v["resourceNames"]),
            non_resource_urls: strings(&v["nonResourceURLs"]),
        }
    }

    fn simple(verbs: &[&str], groups: &[&str], resources: &[&str]) -> Self {
        let s = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        Rule { verbs: s(verbs), api_groups: s(groups), resources: s(resources), ..Default::default() }
    }

    /// rbac/validation's RuleAllows.
    pub fn allows(&self, a: &Attributes) -> bool {
        if let Some(path) = &a.path {
            return any_or(&self.verbs, &a.verb)
                && self.non_resource_urls.iter().any(|u| u == "*" || u == path || u.strip_suffix('*').is_some_and(|p| path.starts_with(p)));
        }
        let combined = a.combined_resource();
        let resource_ok = self.resources.iter().any(|r| {
            r == "*" || *r == combined || (!a.subresource.is_empty() && r.strip_prefix("*/") == Some(a.subresource.as_str()))
        });
        any_or(&self.verbs, &a.verb)
            && any_or(&self.api_groups, &a.api_group)
            && resource_ok
            && (self.resource_names.is_empty() || (!a.name.is_empty() && self.resource_names.contains(&a.name)))
    }
}

impl Authorizer {
    pub fn new() -> Self {
        let az = Authorizer { inner: Mutex::new(Inner::default()) };
        {
            let mut inner = az.inner.lock().unwrap();
            let cluster_role = |inner: &mut Inner, name: &str, rules: Vec<Rule>| {
                inner.roles.insert((None, name.into()), rules);
            };
            cluster_role(&mut inner, "cluster-admin", vec![
                Rule::simple(&["*"], &["*"], &["*"]),
                Rule { verbs: vec!["*".into()], non_resource_urls: vec!["*".into()], ..Default::default() },
            ]);
            cluster_role(&mut inner, "system:basic-user", vec![Rule::simple(
                &["create"],
                &["authorization.k8s.io"],
                &["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
            )]);
            cluster_role(&mut inner, "system:discovery", vec![Rule {
                verbs: vec!["get".into()],
                non_resource_urls: ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/"]
                    .map(String::from)
                    .to_vec(),
                ..Default::default()
            }]);
            cluster_role(&mut inner, "view", vec![
                Rule::simple(&["get", "list", "watch"], &[""], &["pods", "pods/log", "pods/status", "services", "configmaps", "endpoints", "namespaces"]),
                Rule::simple(&["get", "list", "watch"], &["apps"], &["statefulsets", "deployments", "replicasets"]),
            ]);
            let crb = |name: &str, role: &str, group: &str| Binding {
                kind: "ClusterRoleBinding",
                name: name.into(),
                namespace: None,
                role_kind: "ClusterRole".into(),
                role_name: role.into(),
                subjects: vec![Subject { kind: "Group".into(), name: group.into(), namespace: None }],
            };
            inner.bindings.push(crb("cluster-admin", "cluster-admin", "system:masters"));
            inner.bindings.push(crb("system:basic-user", "system:basic-user", "system:authenticated"));
            inner.bindings.push(crb("system:discovery", "system:discovery", "system:authenticated"));
        }
        az
    }

    /// Registers a bearer token for a user (who is also in `system:authenticated`).
    pub fn add_token(&self, token: &str, name: &str, groups: &[&str]) {
        let mut groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        groups.push("system:authenticated".into());
        self.inner.lock().unwrap().tokens.insert(token.into(), User { name: name.into(), groups });
    }

    /// The user a bearer token stands for.
    pub fn authenticate(&self, token: &str) -> Option<User> {
        self.inner.lock().unwrap().tokens.get(token).cloned()
    }

    /// Loads one RBAC object (Role, ClusterRole, RoleBinding, ClusterRoleBinding); false if
    /// `v` is another kind.
    pub fn load(&self, v: &Value) -> Result<bool> {
        let kind = v["kind"].as_str().unwrap_or("");
        if !matches!(kind, "Role" | "ClusterRole" | "RoleBinding" | "ClusterRoleBinding") {
            return Ok(false);
        }
        if v["apiVersion"].as_str() != Some("rbac.authorization.k8s.io/v1") {
            bail!("{kind}: apiVersion must be rbac.authorization.k8s.io/v1");
        }
        let name = v["metadata"]["name"].as_str().context("RBAC object without a name")?.to_string();
        let namespace = matches!(kind, "Role" | "RoleBinding").then(|| v["metadata"]["namespace"].as_str().unwrap_or("default").to_string());
        let mut inner = self.inner.lock().unwrap();
        match kind {
            "Role" | "ClusterRole" => {
                let rules = v["rules"].as_array().map(|a| a.iter().map(Rule::from_json).collect()).unwrap_or_default();
                inner.roles.insert((namespace, name), rules);
            }
            _ => {
                let role_kind = v["roleRef"]["kind"].as_str().context("binding without roleRef.kind")?.to_string();
                let role_name = v["roleRef"]["name"].as_str().context("binding without roleRef.name")?.to_string();
                if kind == "ClusterRoleBinding" && role_kind != "ClusterRole" {
                    bail!("ClusterRoleBinding {name}: roleRef.kind must be ClusterRole");
                }
                let subjects = v["subjects"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|s| Subject {
                                kind: s["kind"].as_str().unwrap_or("").into(),
                                name: s["name"].as_str().unwrap_or("").into(),
                                namespace: s["namespace"].as_str().map(String::from),
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let kind = if kind == "RoleBinding" { "RoleBinding" } else { "ClusterRoleBinding" };
                inner.bindings.retain(|b| !(b.kind == kind && b.name == name && b.namespace == namespace));
                inner.bindings.push(Binding { kind, name, namespace, role_kind, role_name, subjects });
            }
        }
        Ok(true)
    }

    pub fn deny(&self, verb: &str, resource: &str) {
        self.inner.lock().unwrap().deny.insert((verb.into(), resource.into()));
    }

    pub fn clear_denials(&self) {
        self.inner.lock().unwrap().deny.clear();
    }

    fn subject_matches(s: &Subject, user: &User, binding_ns: Option<&str>) -> bool {
        match s.kind.as_str() {
            "User" => s.name == user.name,
            "Group" => user.groups.contains(&s.name),
            "ServiceAccount" => {
                let ns = s.namespace.as_deref().or(binding_ns).unwrap_or("");
                user.name == format!("system:serviceaccount:{ns}:{}", s.name)
            }
            _ => false,
        }
    }

    /// The RBAC decision for `user` doing `a`.
    pub fn authorize(&self, user: &User, a: &Attributes) -> Decision {
        let inner = self.inner.lock().unwrap();
        if a.path.is_none() && inner.deny.contains(&(a.verb.clone(), a.combined_resource())) {
            return Decision::Deny("denied by the test's forbid() list".into());
        }
        for b in &inner.bindings {
            // A RoleBinding grants only inside its namespace (and never cluster-scoped or
            // non-resource requests).
            if let Some(ns) = &b.namespace {
                if a.path.is_some() || *ns != a.namespace {
                    continue;
                }
            }
            let Some(subject) = b.subjects.iter().find(|s| Self::subject_matches(s, user, b.namespace.as_deref())) else { continue };
            let role_ns = if b.role_kind == "Role" { b.namespace.clone() } else { None };
            let Some(rules) = inner.roles.get(&(role_ns, b.role_name.clone())) else { continue };
            if rules.iter().any(|r| r.allows(a)) {
                let subj = match subject.kind.as_str() {
                    "ServiceAccount" => format!("ServiceAccount \"{}/{}\"", subject.namespace.as_deref().or(b.namespace.as_deref()).unwrap_or(""), subject.name),
                    k => format!("{k} \"{}\"", subject.name),
                };
                let at = b.namespace.as_ref().map(|n| format!(" in namespace {n:?}")).unwrap_or_default();
                let (bkind, rkind) = (b.kind, &b.role_kind);
                return Decision::Allow(format!("RBAC: allowed by {bkind} \"{}{}\" of {rkind} \"{}\" to {subj}", b.name, at, b.role_name));
            }
        }
        Decision::Deny(String::new())
    }
}

impl Default for Authorizer {
    fn default() -> Self {
        Self::new()
    }
}

/// The message of a real 403 (apiserver's forbiddenMessage wrapped by NewForbidden).
pub fn forbidden_message(user: &str, a: &Attributes) -> String {
    if let Some(path) = &a.path {
        return format!("forbidden: User {user:?} cannot {} path {path:?}", a.verb);
    }
    let qualified = if a.api_group.is_empty() { a.resource.clone() } else { format!("{}.{}", a.resource, a.api_group) };
    let subject = if a.name.is_empty() { format!("{qualified} is forbidden") } else { format!("{qualified} {:?} is forbidden", a.name) };
    let scope = if a.namespace.is_empty() { " at the cluster scope".to_string() } else { format!(" in the namespace {:?}", a.namespace) };
    format!("{subject}: User {user:?} cannot {} resource {:?} in API group {:?}{scope}", a.verb, a.combined_resource(), a.api_group)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> User {
        User { name: "dev".into(), groups: vec!["system:authenticated".into()] }
    }

    #[test]
    fn rbac_rules_match_as_the_api_server_does() {
        let az = Authorizer::new();
        let yaml = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pf, namespace: default}
rules:
- {apiGroups: [""], resources: ["pods"], verbs: ["get", "list"]}
- {apiGroups: [""], resources: ["pods/portforward"], verbs: ["get"], resourceNames: ["app-0"]}
- {apiGroups: [""], resources: ["*/log"], verbs: ["get"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: pf, namespace: default}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: pf}
subjects: [{kind: User, name: dev, apiGroup: rbac.authorization.k8s.io}]
"#;
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let v: Value = serde_json::to_value(<serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap()).unwrap();
            assert!(az.load(&v).unwrap());
        }
        let can = |verb: &str, res: &str, ns: &str, name: Option<&str>| az.authorize(&dev(), &Attributes::resource(verb, "", res, Some(ns), name)).allowed();
        assert!(can("get", "pods", "default", Some("app-0")));
        assert!(can("list", "pods", "default", None));
        assert!(!can("watch", "pods", "default", None));
        assert!(!can("get", "pods", "other", Some("app-0")), "a RoleBinding grants only in its namespace");
        assert!(can("get", "pods/portforward", "default", Some("app-0")));
        assert!(!can("get", "pods/portforward", "default", Some("app-1")), "resourceNames");
        assert!(!can("create", "pods/portforward", "default", Some("app-0")));
        assert!(can("get", "pods/log", "default", Some("x")), "*/log");
        assert!(!can("get", "secrets", "default", Some("x")));
        let admin = User { name: "sim-admin".into(), groups: vec!["system:masters".into(), "system:authenticated".into()] };
        assert!(az.authorize(&admin, &Attributes::resource("create", "", "pods/portforward", Some("x"), Some("y"))).allowed());
        let a = Attributes::resource("get", "", "pods/portforward", Some("default"), Some("app-1"));
        assert_eq!(
            forbidden_message("dev", &a),
            r#"pods "app-1" is forbidden: User "dev" cannot get resource "pods/portforward" in API group "" in the namespace "default""#
        );
        let a = Attributes::resource("list", "apps", "statefulsets", None, None);
        assert_eq!(forbidden_message("dev", &a), r#"statefulsets.apps is forbidden: User "dev" cannot list resource "statefulsets" in API group "apps" at the cluster scope"#);
    }
}
