//! The simulated node: a StatefulSet controller and a kubelet.
//!
//! Each pod is its own network namespace with its own IP, running the container's
//! command/args (with the kubelet's `$(VAR)` expansion and downward-API env) as a real process:
//! a real `erl`/`elixir` node with its own epmd. A pod is Ready when every declared container
//! port accepts connections on localhost inside its namespace. Deleting a pod (API or fault)
//! kills it and, as a StatefulSet controller would, recreates it under the same name with a
//! new IP and uid.
use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        core::v1::{Container, ContainerStatus, Pod, PodCondition, PodIP, PodStatus, Service},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};

use super::store::{Store, now};
use crate::{Netns, Proc};

pub const NODE_NAME: &str = "sim-node";
const HOST_IP: &str = "172.18.0.2";

struct RunningPod {
    _process: Proc,
    netns: Netns,
}

pub struct Kubelet {
    /// The node: a namespace with bridge `br0` (10.244.SUBNET.1/24) joining every pod's eth0, so
    /// pods reach each other (and nothing else: no route leads out).
    node: Netns,
    /// Cluster DNS as pods see it (what CoreDNS would answer for the headless Services): a
    /// hosts file their BEAM nodes read through ERL_INETRC.
    cluster_hosts: PathBuf,
    cluster_inetrc: PathBuf,
    store: Arc<Store>,
    /// Pod IPs are 10.244.SUBNET.N, N counting up: every new pod gets a new address.
    subnet: u8,
    next_host: AtomicU32,
    dir: PathBuf,
    running: Mutex<HashMap<(String, String), RunningPod>>,
    statefulsets: Mutex<BTreeMap<(String, String), StatefulSet>>,
    /// Set while the cluster shuts down: deleted pods are not recreated.
    stopping: std::sync::atomic::AtomicBool,
}

/// `$(VAR)` expansion as the kubelet does it (unknown references stay; `$$` is `$`).
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(end) = after.strip_prefix('(').and_then(|a| a.find(')')) {
            let name = &after[1..=end];
            out.push_str(vars.get(name).map(String::as_str).unwrap_or(&rest[i..i + end + 3]));
            rest = &after[end + 2..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out + rest
}

fn uid() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let r = crate::cluster::pki::random_token().unwrap_or_default();
    format!("{:08x}-{}-{}-{}-{}", t.as_secs() as u32, &r[0..4], &r[4..8], &r[8..12], &r[12..24])
}

impl Kubelet {
    pub fn new(store: Arc<Store>, subnet: u8, dir: PathBuf) -> Result<Self> {
        let node = Netns::new("brnode")?;
        crate::run(Command::new("ip").args(["-n", node.name(), "link", "add", "br0", "type", "bridge"]))?;
        crate::run(Command::new("ip").args(["-n", node.name(), "addr", "add", &format!("10.244.{subnet}.1/24"), "dev", "br0"]))?;
        crate::run(Command::new("ip").args(["-n", node.name(), "link", "set", "br0", "up"]))?;
        let cluster_hosts = dir.join("cluster.hosts");
        let cluster_inetrc = dir.join("cluster.inetrc");
        std::fs::write(&cluster_hosts, "")?;
        std::fs::write(&cluster_inetrc, format!("{{hosts_file, {:?}}}.\n{{lookup, [file, native]}}.\n", cluster_hosts.display().to_string()))?;
        Ok(Kubelet {
            node,
            cluster_hosts,
            cluster_inetrc,
            store,
            subnet,
            next_host: AtomicU32::new(10),
            dir,
            running: Mutex::new(HashMap::new()),
            statefulsets: Mutex::new(BTreeMap::new()),
            stopping: false.into(),
        })
    }

    /// Plugs a pod's namespace into the node's bridge: eth0 with IP/24.
    fn plug(&self, pod_ns: &Netns, ip: Ipv4Addr) -> Result<()> {
        let host_if = format!("vp{}", ip.octets()[3]);
        let ip_cmd = |args: &[&str]| crate::run(Command::new("ip").args(args)).map(|_| ());
        let _ = Command::new("ip").args(["-n", self.node.name(), "link", "del", &host_if]).output();
        ip_cmd(&["-n", self.node.name(), "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", pod_ns.name()])?;
        ip_cmd(&["-n", self.node.name(), "link", "set", &host_if, "master", "br0", "up"])?;
        ip_cmd(&["-n", pod_ns.name(), "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ip_cmd(&["-n", pod_ns.name(), "link", "set", "eth0", "up"])
    }

    /// Rewrites the cluster DNS hosts file from the pods that have an IP (atomically).
    fn update_cluster_dns(&self) {
        let mut text = String::new();
        for p in self.store.list_pods(None).0 {
            let (Some(spec), Some(ip)) = (&p.spec, p.status.as_ref().and_then(|s| s.pod_ip.clone())) else { continue };
            let (Some(host), Some(sub)) = (&spec.hostname, &spec.subdomain) else { continue };
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            text.push_str(&format!("{ip} {host}.{sub}.{ns}.svc.cluster.local {host}.{sub}.{ns}.svc {host}.{sub}.{ns} {host}.{sub}\n"));
        }
        let tmp = self.cluster_hosts.with_extension("tmp");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, &self.cluster_hosts);
        }
    }

    fn next_ip(&self) -> Ipv4Addr {
        let n = self.next_host.fetch_add(1, Ordering::Relaxed);
        Ipv4Addr::new(10, 244, self.subnet, (n % 240 + 10) as u8)
    }

    /// Applies a multi-document YAML manifest: Services are stored, StatefulSets get pods.
    pub fn apply_manifest(self: &Arc<Self>, yaml: &str) -> Result<Vec<(String, String)>> {
        let mut created = Vec::new();
        for doc in serde_yaml::Deserializer::from_str(yaml) {
            let value = serde_json::to_value(serde_yaml::Value::deserialize(doc)?)?;
            if value.is_null() {
                continue;
            }
            match value["kind"].as_str() {
                Some("Service") => self.store.put_service(serde_json::from_value::<Service>(value)?),
                Some("Namespace") => self.store.add_namespace(value["metadata"]["name"].as_str().context("namespace name")?),
                Some("StatefulSet") => {
                    let mut sts: StatefulSet = serde_json::from_value(value)?;
                    let ns = sts.metadata.namespace.get_or_insert_with(|| "default".into()).clone();
                    let name = sts.metadata.name.clone().context("StatefulSet without a name")?;
                    sts.metadata.uid.get_or_insert_with(uid);
                    self.store.add_namespace(&ns);
                    let replicas = sts.spec.replicas.unwrap_or(1);
                    self.statefulsets.lock().unwrap().insert((ns.clone(), name.clone()), sts.clone());
                    self.store.put_statefulset(sts);
                    for i in 0..replicas {
                        let pod_name = format!("{name}-{i}");
                        self.create_pod(&ns, &name, i)?;
                        created.push((ns.clone(), pod_name));
                    }
                }
                Some(other) => bail!("the simulated cluster does not run kind {other}"),
                None => bail!("manifest document without kind"),
            }
        }
        Ok(created)
    }

    /// Creates pod NAME-ORDINAL of a StatefulSet and starts it in the background.
    fn create_pod(self: &Arc<Self>, ns: &str, sts_name: &str, ordinal: i32) -> Result<()> {
        let sts = self.statefulsets.lock().unwrap().get(&(ns.to_string(), sts_name.to_string())).cloned().context("no such StatefulSet")?;
        let spec = sts.spec.clone();
        let name = format!("{sts_name}-{ordinal}");
        let mut labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
        labels.insert("statefulset.kubernetes.io/pod-name".into(), name.clone());
        labels.insert("apps.kubernetes.io/pod-index".into(), ordinal.to_string());
        let mut pod_spec = spec.template.spec.clone().context("pod template without spec")?;
        pod_spec.hostname = Some(name.clone());
        pod_spec.subdomain = Some(spec.service_name.clone().unwrap_or_default()).filter(|s| !s.is_empty());
        pod_spec.node_name = Some(NODE_NAME.into());
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.into()),
                uid: Some(uid()),
                labels: Some(labels),
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "StatefulSet".into(),
                    name: sts_name.into(),
                    uid: sts.metadata.uid.clone().unwrap_or_default(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..Default::default()
            },
            spec: Some(pod_spec),
            status: Some(PodStatus { phase: Some("Pending".into()), host_ip: Some(HOST_IP.into()), ..Default::default() }),
        };
        self.store.put_pod(pod);
        let kubelet = self.clone();
        let (ns, name) = (ns.to_string(), name);
        std::thread::spawn(move || {
            if let Err(e) = kubelet.start_pod(&ns, &name) {
                log::warn!("simulated kubelet: pod {ns}/{name}: {e:#}");
                kubelet.store.update_pod(&ns, &name, |p| {
                    let status = p.status.get_or_insert_with(Default::default);
                    status.phase = Some("Failed".into());
                    status.message = Some(format!("{e:#}"));
                });
            }
        });
        Ok(())
    }

    /// Sandbox (netns + IP), container process, readiness: what the kubelet does for a pod.
    fn start_pod(&self, ns: &str, name: &str) -> Result<()> {
        let pod = self.store.get_pod(ns, name).context("pod vanished")?;
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let container = pod.spec.as_ref().and_then(|s| s.containers.first()).cloned().context("pod without containers")?;
        let ip = self.next_ip();
        let netns = Netns::new("brk")?;
        self.plug(&netns, ip)?;
        let started = now();
        self.store.update_pod(ns, name, |p| {
            let status = p.status.get_or_insert_with(Default::default);
            status.phase = Some("Running".into());
            status.pod_ip = Some(ip.to_string());
            status.pod_ips = Some(vec![PodIP { ip: ip.to_string() }]);
            status.start_time = Some(started.clone());
            status.conditions = Some(conditions(false));
            status.container_statuses = Some(vec![container_status(&container, false)]);
        });
        self.update_cluster_dns();
        let vars = self.env_for(&pod, &container, ip);
        let argv: Vec<String> = container.command.iter().flatten().chain(container.args.iter().flatten()).map(|a| expand(a, &vars)).collect();
        let (program, args) = argv.split_first().context("container without command")?;
        let home = self.dir.join(format!("home-{name}-{uid}"));
        std::fs::create_dir_all(&home)?;
        let log_path = self.dir.join(format!("{ns}_{name}_{uid}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = netns
            .command(program)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", &home)
            .env("LANG", "C.UTF-8")
            .env("HOSTNAME", name)
            .env("ERL_INETRC", &self.cluster_inetrc)
            .envs(&vars)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program:?}"))?;
        let process = Proc(child);
        let ports: Vec<u16> = container.ports.iter().flatten().filter_map(|p| u16::try_from(p.container_port).ok()).collect();
        let probe: Option<Vec<String>> = container.readiness_probe.as_ref().and_then(|p| p.exec.as_ref()).and_then(|e| e.command.clone());
        self.running.lock().unwrap().insert((ns.into(), name.into()), RunningPod { _process: process, netns });
        // Readiness: every declared port accepts connections inside the pod.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let netns_path = match self.running.lock().unwrap().get(&(ns.to_string(), name.to_string())) {
                Some(r) => r.netns.path(),
                None => return Ok(()), // deleted while starting
            };
            let probe_ok = || {
                probe.as_ref().is_none_or(|argv| {
                    Command::new("nsenter")
                        .arg(format!("--net={}", netns_path.display()))
                        .arg("--")
                        .args(argv)
                        .env("HOME", &home)
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                })
            };
            if ports.iter().all(|&p| dial_in(&netns_path, p).is_ok()) && probe_ok() {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("not ready after 60 s; container log: {}", log_path.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.store.update_pod(ns, name, |p| {
            if p.metadata.uid.as_deref() != Some(uid.as_str()) {
                return;
            }
            let status = p.status.get_or_insert_with(Default::default);
            status.conditions = Some(conditions(true));
            status.container_statuses = Some(vec![container_status(&container, true)]);
        });
        Ok(())
    }

    /// The container's environment: literal values (expanded against earlier ones) and the
    /// downward-API fields a StatefulSet of BEAM nodes uses.
    fn env_for(&self, pod: &Pod, container: &Container, ip: Ipv4Addr) -> BTreeMap<String, String> {
        let mut vars = BTreeMap::new();
        for e in container.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                Some(expand(v, &vars))
            } else if let Some(field) = e.value_from.as_ref().and_then(|v| v.field_ref.as_ref()) {
                match field.field_path.as_str() {
                    "status.podIP" => Some(ip.to_string()),
                    "status.hostIP" => Some(HOST_IP.into()),
                    "metadata.name" => pod.metadata.name.clone(),
                    "metadata.namespace" => pod.metadata.namespace.clone(),
                    "metadata.uid" => pod.metadata.uid.clone(),
                    "spec.nodeName" => Some(NODE_NAME.into()),
                    _ => None,
                }
            } else {
                None
            };
            if let Some(v) = value {
                vars.insert(e.name.clone(), v);
            }
        }
        vars
    }

    /// The network namespace of a running pod (for port-forwards).
    pub fn netns_of(&self, ns: &str, name: &str) -> Option<PathBuf> {
        self.running.lock().unwrap().get(&(ns.to_string(), name.to_string())).map(|r| r.netns.path())
    }

    /// Deletes a pod like the API does: marked terminating, killed, removed; then recreated by
    /// its StatefulSet with a new IP and uid.
    pub fn delete_pod(self: &Arc<Self>, ns: &str, name: &str) -> Option<Pod> {
        let pod = self.store.update_pod(ns, name, |p| p.metadata.deletion_timestamp = Some(now()))?;
        let running = self.running.lock().unwrap().remove(&(ns.to_string(), name.to_string()));
        drop(running); // kills the process and removes the namespace
        self.store.delete_pod(ns, name);
        self.update_cluster_dns();
        let owner = pod.metadata.owner_references.iter().flatten().find(|o| o.kind == "StatefulSet").map(|o| o.name.clone());
        if let Some(sts) = owner.filter(|_| !self.stopping.load(Ordering::Relaxed)) {
            let ordinal = name.rsplit_once('-').and_then(|(_, i)| i.parse().ok()).unwrap_or(0);
            if let Err(e) = self.create_pod(ns, &sts, ordinal) {
                log::warn!("simulated StatefulSet controller: recreating {ns}/{name}: {e:#}");
            }
        }
        Some(pod)
    }

    /// Stops every pod (cluster shutdown).
    pub fn stop_all(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.running.lock().unwrap().clear();
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Connects to 127.0.0.1:port inside a network namespace (on a fresh thread, since setns
/// changes the calling thread for good).
pub fn dial_in(netns: &Path, port: u16) -> std::io::Result<TcpStream> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns)?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(5))
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("dial thread panicked")))
}

fn conditions(ready: bool) -> Vec<PodCondition> {
    let t = if ready { "True" } else { "False" };
    ["PodScheduled", "Initialized", "ContainersReady", "Ready"]
        .iter()
        .map(|c| PodCondition {
            type_: c.to_string(),
            status: if matches!(*c, "PodScheduled" | "Initialized") { "True".into() } else { t.into() },
            last_transition_time: Some(now()),
            ..Default::default()
        })
        .collect()
}

fn container_status(c: &Container, ready: bool) -> ContainerStatus {
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: String::new(),
        ready,
        restart_count: 0,
        started: Some(true),
        state: Some(k8s_openapi::api::core::v1::ContainerState {
            running: Some(k8s_openapi::api::core::v1::ContainerStateRunning { started_at: Some(now()) }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

use serde::Deserialize as _;

#[cfg(test)]
mod tests {
    #[test]
    fn expansion() {
        let vars = [("HOST".to_string(), "10.244.1.5".to_string())].into();
        assert_eq!(super::expand("app@$(HOST)", &vars), "app@10.244.1.5");
        assert_eq!(super::expand("$(NOPE) $$(HOST)", &vars), "$(NOPE) $(HOST)");
    }
}
