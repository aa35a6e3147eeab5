//! What beamredir reads from a pod object: whether it can be reached (Running, with an IP —
//! readiness is shown, never required: `kubectl port-forward` needs no more, and a pod failing
//! its readiness probe is exactly when people want a remote shell), its addresses, which of its
//! containers runs the Erlang node (by ports and environment, not by position), and that
//! node's ports and name as the spec gives them.
use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::api::core::v1::{Container, Pod};

use super::env::{flag_value, resolved_env, words};

pub const DEFAULT_EPMD_PORT: u16 = 4369;

/// Why a pod cannot be reached now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReachable {
    #[error("it is being deleted")]
    Terminating,
    #[error("its phase is {0}, not Running")]
    NotRunning(String),
    #[error("it has no pod IP yet")]
    NoIp,
    #[error("it has no containers")]
    NoContainers,
}

/// Where the distribution port came from (for messages and the banner).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortSource {
    Flag,
    NamedContainerPort,
    ErlDistPort,
    ErlEpmdPort,
    ListenRange,
    ErlPort,
}

impl PortSource {
    pub fn describe(self) -> &'static str {
        match self {
            PortSource::Flag => "--dist-port",
            PortSource::NamedContainerPort => "a container port named erlang/dist",
            PortSource::ErlDistPort => "ERL_DIST_PORT",
            PortSource::ErlEpmdPort => "-erl_epmd_port",
            PortSource::ListenRange => "inet_dist_listen_min/max",
            PortSource::ErlPort => "ERL_PORT",
        }
    }
}

/// Everything beamredir needs to know about one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodTarget {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    /// status.podIPs (status.podIP first), as Kubernetes reports them: one or two families.
    pub ips: Vec<IpAddr>,
    /// The Ready condition. Shown, not required.
    pub ready: bool,
    /// The container judged to run the Erlang node.
    pub container: String,
    pub epmd_port: u16,
    /// The node runs without epmd (`-start_epmd false`, `-erl_epmd_port`, `ERL_DIST_PORT`):
    /// the distribution port must come from the spec or a flag, and no epmd is probed.
    pub epmdless: bool,
    pub dist_port: Option<(u16, PortSource)>,
    /// The spec starts the node with TLS distribution (`-proto_dist inet_tls`).
    pub tls_dist: bool,
    /// The node's name as the spec gives it (`-name`/`-sname`/`RELEASE_NODE`), when it can be
    /// read; the node itself is asked later (see [`crate::erlang`]).
    pub spec_node_name: Option<String>,
    /// `spec.hostname` and `spec.subdomain` (set by the StatefulSet controller): with the
    /// namespace they make the pod's cluster DNS name.
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
}

impl PodTarget {
    /// Reads a pod object. Fails if it is not Running with an IP.
    pub fn from_pod(pod: &Pod, dist_port_flag: Option<u16>) -> Result<Self, NotReachable> {
        if pod.metadata.deletion_timestamp.is_some() {
            return Err(NotReachable::Terminating);
        }
        let status = pod.status.clone().unwrap_or_default();
        let phase = status.phase.clone().unwrap_or_else(|| "Unknown".into());
        if phase != "Running" {
            return Err(NotReachable::NotRunning(phase));
        }
        let ips = pod_ips(pod);
        if ips.is_empty() {
            return Err(NotReachable::NoIp);
        }
        let ready = status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        let containers: &[Container] = pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or(&[]);
        let container = erlang_container(pod, containers).ok_or(NotReachable::NoContainers)?;
        let vars = resolved_env(pod, container);
        let words = words(container, &vars);
        let epmd_port = named_port(container, &["epmd"]).unwrap_or(DEFAULT_EPMD_PORT);
        let erl_epmd_port = flag_value(&words, &["-erl_epmd_port"]).and_then(|p| p.parse().ok());
        let erl_dist_port = vars.get("ERL_DIST_PORT").and_then(|p| p.parse().ok());
        let epmdless = flag_value(&words, &["-start_epmd"]) == Some("false")
            || erl_epmd_port.is_some()
            || erl_dist_port.is_some();
        let dist_port = dist_port_flag
            .map(|p| (p, PortSource::Flag))
            .or_else(|| {
                named_port(container, &["erlang", "dist"])
                    .map(|p| (p, PortSource::NamedContainerPort))
            })
            .or_else(|| erl_dist_port.map(|p| (p, PortSource::ErlDistPort)))
            .or_else(|| erl_epmd_port.map(|p| (p, PortSource::ErlEpmdPort)))
            .or_else(|| listen_range(&words).map(|p| (p, PortSource::ListenRange)))
            .or_else(|| {
                vars.get("ERL_PORT")
                    .and_then(|p| p.parse().ok())
                    .map(|p| (p, PortSource::ErlPort))
            });
        Ok(PodTarget {
            name: pod.metadata.name.clone().unwrap_or_default(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            ready,
            container: container.name.clone(),
            epmd_port,
            epmdless,
            dist_port,
            tls_dist: flag_value(&words, &["-proto_dist"]).is_some_and(|p| p.contains("tls")),
            spec_node_name: spec_node_name(&vars, &words, pod),
            hostname: pod.spec.as_ref().and_then(|s| s.hostname.clone()),
            subdomain: pod.spec.as_ref().and_then(|s| s.subdomain.clone()),
            ips,
        })
    }

    /// The first IP, as status.podIP.
    pub fn primary_ip(&self) -> IpAddr {
        self.ips[0]
    }

    pub fn has_v4(&self) -> bool {
        self.ips.iter().any(IpAddr::is_ipv4)
    }

    /// For tests: a ready pod `name` in `default` at `ips` (its uid made from them), container
    /// `app`, epmd on 4369, nothing else known.
    #[cfg(test)]
    pub(crate) fn for_test(name: &str, ips: &[&str]) -> PodTarget {
        PodTarget {
            name: name.into(),
            namespace: "default".into(),
            uid: format!("uid-{}", ips.join(",")),
            ips: ips.iter().map(|i| i.parse().unwrap()).collect(),
            ready: true,
            container: "app".into(),
            epmd_port: DEFAULT_EPMD_PORT,
            epmdless: false,
            dist_port: None,
            tls_dist: false,
            spec_node_name: None,
            hostname: None,
            subdomain: None,
        }
    }
}

/// status.podIPs, else status.podIP; only valid addresses, podIP first, at most one per family
/// (what dual-stack clusters report).
fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let status = match &pod.status {
        Some(s) => s,
        None => return Vec::new(),
    };
    let primary = status
        .pod_ip
        .as_deref()
        .and_then(|s| s.parse::<IpAddr>().ok());
    let listed = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|p| p.ip.parse::<IpAddr>().ok());
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in primary.into_iter().chain(listed) {
        if crate::mapping::is_pod_address(ip) && !ips.iter().any(|i| i.is_ipv4() == ip.is_ipv4()) {
            ips.push(ip);
        }
    }
    ips
}

/// The container most likely running the Erlang node: Erlang ports and environment count,
/// position does not (a sidecar may come first).
fn erlang_container<'a>(pod: &Pod, containers: &'a [Container]) -> Option<&'a Container> {
    let score = |c: &Container| {
        let ports = c.ports.iter().flatten();
        let mut s = 0;
        for p in ports {
            if p.name
                .as_deref()
                .is_some_and(|n| matches!(n, "epmd" | "erlang" | "dist"))
            {
                s += 10;
            }
            if p.container_port == i32::from(DEFAULT_EPMD_PORT) {
                s += 8;
            }
        }
        let env_names = [
            "RELEASE_NODE",
            "RELEASE_COOKIE",
            "RELX_COOKIE",
            "ERLANG_COOKIE",
            "RELEASE_DISTRIBUTION",
            "ERL_DIST_PORT",
            "ERL_AFLAGS",
            "ERL_FLAGS",
            "ERL_PORT",
        ];
        s += 5 * c
            .env
            .iter()
            .flatten()
            .filter(|e| env_names.contains(&e.name.as_str()))
            .count();
        s += 5 * c
            .env_from
            .iter()
            .flatten()
            .filter(|e| e.secret_ref.is_some() || e.config_map_ref.is_some())
            .count()
            .min(1);
        let vars = resolved_env(pod, c);
        let w = words(c, &vars);
        if w.iter().any(|w| {
            matches!(
                w.as_str(),
                "-name" | "-sname" | "--name" | "--sname" | "-setcookie" | "--cookie"
            )
        }) {
            s += 6;
        }
        if w.iter().any(|w| {
            ["erl", "elixir", "iex", "beam.smp"]
                .iter()
                .any(|b| w == b || w.ends_with(&format!("/{b}")))
        }) {
            s += 4;
        }
        s
    };
    // max_by_key returns the last of equals: reverse so the first wins a tie.
    containers.iter().rev().max_by_key(|c| score(c))
}

fn named_port(container: &Container, names: &[&str]) -> Option<u16> {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref().is_some_and(|n| names.contains(&n)))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

/// `-kernel inet_dist_listen_min P inet_dist_listen_max P`: a fixed port.
fn listen_range(words: &[String]) -> Option<u16> {
    let min: u16 = flag_value(words, &["inet_dist_listen_min"])?.parse().ok()?;
    let max: u16 = flag_value(words, &["inet_dist_listen_max"])?.parse().ok()?;
    (min == max).then_some(min)
}

/// The node name from `-name`/`-sname` (erl) or `--name`/`--sname` (elixir, iex), or
/// `RELEASE_NODE` (mix releases; with `RELEASE_DISTRIBUTION=sname` and no host part, the host
/// is the pod's host name). A name the shell still has to work out (`app@$(hostname -i)`,
/// `app@$dashed.ns.pod.cluster.local` in `sh -c`) is no name: the node is asked instead.
fn spec_node_name(vars: &BTreeMap<String, String>, words: &[String], pod: &Pod) -> Option<String> {
    spec_node_name_raw(vars, words, pod).filter(|n| !n.contains(['$', '`', '(', ')', '{', '}', '"', '\'']))
}

fn spec_node_name_raw(vars: &BTreeMap<String, String>, words: &[String], pod: &Pod) -> Option<String> {
    if let Some(n) = vars.get("RELEASE_NODE") {
        if n.contains('@') {
            return Some(n.clone());
        }
        if vars.get("RELEASE_DISTRIBUTION").map(String::as_str) == Some("sname") {
            let host = pod
                .spec
                .as_ref()
                .and_then(|s| s.hostname.clone())
                .or_else(|| pod.metadata.name.clone())?;
            return Some(format!("{n}@{host}"));
        }
    }
    let name = flag_value(words, &["-name", "--name", "-sname", "--sname"])?;
    name.contains('@').then(|| name.to_string())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

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
    fn ports_from_named_container_ports_then_env_and_flags() {
        let p = running(serde_json::json!([{"name": "app", "ports": [
            {"name": "epmd", "containerPort": 4370}, {"name": "erlang", "containerPort": 9000}]}]));
        let t = PodTarget::from_pod(&p, None).unwrap();
        assert_eq!(
            (t.ips[0], t.epmd_port, t.dist_port),
            (
                IpAddr::V4(Ipv4Addr::new(10, 244, 0, 5)),
                4370,
                Some((9000, PortSource::NamedContainerPort))
            )
        );
        assert_eq!(
            PodTarget::from_pod(&p, Some(9100)).unwrap().dist_port,
            Some((9100, PortSource::Flag))
        );

        let p = running(
            serde_json::json!([{"name": "app", "env": [{"name": "ERL_PORT", "value": "9001"}]}]),
        );
        let t = PodTarget::from_pod(&p, None).unwrap();
        assert_eq!(
            (t.epmd_port, t.dist_port, t.epmdless),
            (4369, Some((9001, PortSource::ErlPort)), false)
        );

        let p = running(
            serde_json::json!([{"name": "app", "command": ["erl", "-start_epmd", "false", "-erl_epmd_port", "9100", "-name", "a@b.c"]}]),
        );
        let t = PodTarget::from_pod(&p, None).unwrap();
        assert_eq!(
            (t.dist_port, t.epmdless),
            (Some((9100, PortSource::ErlEpmdPort)), true)
        );

        let p = running(
            serde_json::json!([{"name": "app", "env": [{"name": "ERL_DIST_PORT", "value": "9200"}]}]),
        );
        let t = PodTarget::from_pod(&p, None).unwrap();
        assert_eq!(
            (t.dist_port, t.epmdless),
            (Some((9200, PortSource::ErlDistPort)), true)
        );

        let p = running(
            serde_json::json!([{"name": "app", "args": ["--erl", "-kernel inet_dist_listen_min 9300 inet_dist_listen_max 9300"]}]),
        );
        assert_eq!(
            PodTarget::from_pod(&p, None).unwrap().dist_port,
            Some((9300, PortSource::ListenRange))
        );

        let p = running(serde_json::json!([{"name": "app"}]));
        assert_eq!(PodTarget::from_pod(&p, None).unwrap().dist_port, None);
    }

    /// The node name the spec of a running pod with these containers gives.
    fn spec_node_name(containers: serde_json::Value) -> Option<String> {
        PodTarget::from_pod(&running(containers), None)
            .unwrap()
            .spec_node_name
    }

    #[test]
    fn node_name_from_args_with_field_ref_expansion() {
        let name = spec_node_name(serde_json::json!([{"name": "app", "command": ["erl"],
            "args": ["-name", "app@$(HOST)", "-setcookie", "x"],
            "env": [{"name": "HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]}]));
        assert_eq!(name.as_deref(), Some("app@10.244.0.5"));
        let name = spec_node_name(
            serde_json::json!([{"name": "app", "command": ["sh", "-c", "exec iex --sname web@$(POD_NAME) -S mix"],
            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]),
        );
        assert_eq!(name.as_deref(), Some("web@app-0"));
        let name = spec_node_name(
            serde_json::json!([{"name": "app", "env": [{"name": "ERL_AFLAGS", "value": "-name x@y.z -hidden"}]}]),
        );
        assert_eq!(name.as_deref(), Some("x@y.z"));
        let name = spec_node_name(
            serde_json::json!([{"name": "app", "env": [{"name": "RELEASE_NODE", "value": "shop"}, {"name": "RELEASE_DISTRIBUTION", "value": "sname"}]}]),
        );
        assert_eq!(name.as_deref(), Some("shop@app-0"));
        // Shell substitutions the spec leaves to `sh -c` are not a name (the node is asked).
        for script in [
            r#"exec erl -name "app@$(echo "$POD_IP" | tr . -).default.pod.cluster.local" -noshell"#,
            r#"dashed=$(echo $POD_IP | tr . -); exec erl -name "app@$dashed.default.pod.cluster.local""#,
            "exec erl -name app@`hostname -f` -noshell",
        ] {
            let name = spec_node_name(
                serde_json::json!([{"name": "app", "command": ["sh", "-c", script]}]),
            );
            assert_eq!(name, None, "{script}");
        }
    }

    #[test]
    fn running_is_enough_readiness_is_reported() {
        let mut p = running(serde_json::json!([{"name": "app"}]));
        p.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].status = "False".into();
        assert!(!PodTarget::from_pod(&p, None).unwrap().ready);
        let mut p = running(serde_json::json!([{"name": "app"}]));
        p.status.as_mut().unwrap().phase = Some("Pending".into());
        assert_eq!(
            PodTarget::from_pod(&p, None).unwrap_err(),
            NotReachable::NotRunning("Pending".into())
        );
        let mut p = running(serde_json::json!([{"name": "app"}]));
        p.status.as_mut().unwrap().pod_ip = None;
        assert_eq!(
            PodTarget::from_pod(&p, None).unwrap_err(),
            NotReachable::NoIp
        );
    }

    #[test]
    fn dual_stack_and_ipv6_addresses() {
        let mut p = running(serde_json::json!([{"name": "app"}]));
        let st = p.status.as_mut().unwrap();
        st.pod_ip = Some("fd00:10:244::5".into());
        st.pod_ips = Some(vec![
            k8s_openapi::api::core::v1::PodIP {
                ip: "fd00:10:244::5".into(),
            },
            k8s_openapi::api::core::v1::PodIP {
                ip: "10.244.0.5".into(),
            },
        ]);
        let t = PodTarget::from_pod(&p, None).unwrap();
        assert_eq!(
            t.ips,
            vec![
                "fd00:10:244::5".parse::<IpAddr>().unwrap(),
                "10.244.0.5".parse().unwrap()
            ]
        );
        assert!(t.has_v4());
    }

    #[test]
    fn the_erlang_container_is_found_by_ports_and_env_not_position() {
        let p = running(serde_json::json!([
            {"name": "proxy", "image": "envoy", "ports": [{"name": "http", "containerPort": 8080}]},
            {"name": "app", "image": "app", "env": [{"name": "RELEASE_COOKIE", "value": "x"}, {"name": "RELEASE_NODE", "value": "app@1.2.3.4"}],
             "ports": [{"name": "epmd", "containerPort": 4369}]},
        ]));
        let t = PodTarget::from_pod(&p, None).unwrap();
        assert_eq!(
            (t.container.as_str(), t.spec_node_name.as_deref()),
            ("app", Some("app@1.2.3.4"))
        );
        // With nothing to go on, the first container.
        let p = running(serde_json::json!([{"name": "a"}, {"name": "b"}]));
        assert_eq!(PodTarget::from_pod(&p, None).unwrap().container, "a");
    }
}
