//! The simulated node: a StatefulSet controller and a kubelet.
//!
//! * Each pod is its own network namespace with its own address(es) on `eth0`, a veth into a
//!   bridge in a "node" namespace: IPv4 `10.244.S.N/24`, IPv6 `fd00:10:244:S::N/64`, or both
//!   (dual-stack, either family first). The IPAM hands out the next free address round-robin
//!   (host-local's default) or the lowest free one (so a freed address comes back at once).
//! * **Every container** of the pod runs as its own process in that namespace (a shared
//!   network, as in a real pod), with its own UTS namespace named after the pod (so `-sname`
//!   nodes get `app@app-0`), after the kubelet's `$(VAR)` expansion, with env from literals,
//!   the downward API, Secrets and ConfigMaps (`valueFrom` and `envFrom` with prefixes).
//!   A container whose Secret/ConfigMap is missing waits in `CreateContainerConfigError`;
//!   one that exits is restarted with the kubelet's back-off (`CrashLoopBackOff`).
//! * Readiness keeps being probed for the pod's whole life: each container is ready when its
//!   declared ports accept connections and its readiness probe (exec, tcpSocket, httpGet)
//!   passes, with periodSeconds / failureThreshold / successThreshold as the kubelet counts
//!   them. `Ready`/`ContainersReady` and `containerStatuses[].ready` follow, both ways. A pod
//!   that never gets ready stays Running with its IP.
//! * Cluster DNS as pods see it (what CoreDNS answers, through a per-pod hosts file their BEAM
//!   nodes read via ERL_INETRC): pod A/AAAA records (`10-244-0-5.NS.pod.cluster.local`),
//!   headless-Service records for ready pods (`app-0.app.NS.svc.cluster.local` and
//!   `app.NS.svc.cluster.local`), short forms the pod's search path makes resolvable
//!   (`dnsConfig.searches` included), and the kubelet-managed /etc/hosts lines.
//! * The StatefulSet controller creates pods `NAME-0…` with the labels, hostname and subdomain
//!   a real one sets, in order (OrderedReady: the next pod once the previous is Running and
//!   Ready; `podManagementPolicy: Parallel` starts them all), and recreates deleted ones.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use k8s_openapi::{
    api::{
        apps::v1::StatefulSet,
        core::v1::{
            Container, ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod, PodCondition, PodIP,
            PodStatus, Probe, Service,
        },
    },
    apimachinery::pkg::{apis::meta::v1::{ObjectMeta, OwnerReference}, util::intstr::IntOrString},
};
use serde_json::Value;

use super::store::{Store, now};
use crate::{Netns, Proc};

pub const NODE_NAME: &str = "sim-node";
const HOST_IP: &str = "172.18.0.2";
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The pod network's address families, in the order `status.podIPs` lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IpFamily {
    #[default]
    Ipv4,
    Ipv6,
    DualStackV4Primary,
    DualStackV6Primary,
}

/// How the node's IPAM picks a pod's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IpAllocation {
    /// The next free address after the last one handed out, wrapping (host-local's default):
    /// a replaced pod gets a new address until the range wraps.
    #[default]
    RoundRobin,
    /// The lowest free address (Calico/Cilium-like block allocators reuse freed addresses at
    /// once): a replaced pod can get another pod's old address.
    LowestFree,
}

#[derive(Default)]
struct Ipam {
    used: BTreeSet<u8>,
    /// Addresses still held by the lingering sandbox of a force-deleted pod: freed once that
    /// pod's replacement has its own address.
    held: BTreeMap<u8, (String, String)>,
    last: u8,
}

impl Ipam {
    fn alloc(&mut self, how: IpAllocation, pod: &(String, String)) -> Option<u8> {
        let free = |n: &u8| !self.used.contains(n) && !self.held.contains_key(n);
        let n = match how {
            IpAllocation::LowestFree => (2..=254).find(free),
            IpAllocation::RoundRobin => (self.last.max(9) + 1..=254).chain(2..=self.last.max(9)).find(free),
        }?;
        self.used.insert(n);
        self.last = n;
        self.held.retain(|_, p| p != pod);
        Some(n)
    }
}

/// What a container's prober keeps.
struct ContainerRun {
    name: String,
    process: Option<Proc>,
    env: BTreeMap<String, String>,
    ready: bool,
    successes: u32,
    failures: u32,
    next_probe: Instant,
    ever_ready: bool,
    restarts: i32,
    started_at: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    /// Not running: when to try (again), and the waiting reason/message meanwhile.
    retry_at: Option<Instant>,
    waiting: Option<(String, String)>,
    last_terminated: Option<ContainerStateTerminated>,
    container_id: String,
}

struct RunningPod {
    uid: String,
    host: u8,
    containers: Vec<ContainerRun>,
    stop: Arc<AtomicBool>,
    // Last: the namespace goes after every process in it.
    netns: Netns,
}

impl Drop for RunningPod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for c in &mut self.containers {
            c.process.take();
        }
    }
}

pub struct Kubelet {
    /// The node: a namespace with bridge `br0` (10.244.S.1/24, fd00:10:244:S::1/64) joining
    /// every pod's eth0, so pods reach each other (and nothing else: no route leads out).
    node: Netns,
    store: Arc<Store>,
    subnet: u8,
    family: IpFamily,
    allocation: IpAllocation,
    /// Probe a not-yet-ready container every 100 ms instead of every periodSeconds (tests
    /// would otherwise wait 10 s per pod); periodSeconds applies once it has been ready.
    fast_startup_probes: bool,
    ipam: Mutex<Ipam>,
    dir: PathBuf,
    running: Mutex<HashMap<(String, String), RunningPod>>,
    statefulsets: Mutex<BTreeMap<(String, String), StatefulSet>>,
    /// Test hook: forced readiness-probe results per pod.
    forced: Mutex<HashMap<(String, String), bool>>,
    /// Set while the cluster shuts down: deleted pods are not recreated.
    stopping: AtomicBool,
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

pub fn uid() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let r = crate::cluster::pki::random_token().unwrap_or_else(|_| "0".repeat(48));
    format!("{:08x}-{}-{}-{}-{}", t.as_secs() as u32, &r[0..4], &r[4..8], &r[8..12], &r[12..24])
}

/// The name CoreDNS gives an address under `NS.pod.cluster.local`: dots (IPv4) or colons
/// (IPv6, compressed form) become dashes.
pub fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

fn key(ns: &str, name: &str) -> (String, String) {
    (ns.to_string(), name.to_string())
}

fn is_ready(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn is_running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

impl Kubelet {
    pub fn new(store: Arc<Store>, subnet: u8, family: IpFamily, allocation: IpAllocation, fast_startup_probes: bool, dir: PathBuf) -> Result<Arc<Self>> {
        let node = Netns::new("brnode")?;
        let ip = |args: &[&str]| crate::run(Command::new("ip").args(["-n", node.name()]).args(args)).map(|_| ());
        ip(&["link", "add", "br0", "type", "bridge"])?;
        if family != IpFamily::Ipv6 {
            ip(&["addr", "add", &format!("10.244.{subnet}.1/24"), "dev", "br0"])?;
        }
        if family != IpFamily::Ipv4 {
            ip(&["-6", "addr", "add", &format!("fd00:10:244:{subnet}::1/64"), "dev", "br0", "nodad"])?;
        }
        ip(&["link", "set", "br0", "up"])?;
        let kubelet = Arc::new(Kubelet {
            node,
            store,
            subnet,
            family,
            allocation,
            fast_startup_probes,
            ipam: Mutex::default(),
            dir,
            running: Mutex::new(HashMap::new()),
            statefulsets: Mutex::new(BTreeMap::new()),
            forced: Mutex::default(),
            stopping: false.into(),
        });
        // The StatefulSet controller: reconciles until the cluster stops (it holds only a
        // weak reference, so dropping the cluster ends it).
        let weak = Arc::downgrade(&kubelet);
        std::thread::spawn(move || controller(weak));
        Ok(kubelet)
    }

    /// The addresses of host number `n`, primary family first.
    fn addresses(&self, n: u8) -> Vec<IpAddr> {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 244, self.subnet, n));
        let v6: IpAddr = format!("fd00:10:244:{}::{n:x}", self.subnet).parse::<Ipv6Addr>().expect("IPv6").into();
        match self.family {
            IpFamily::Ipv4 => vec![v4],
            IpFamily::Ipv6 => vec![v6],
            IpFamily::DualStackV4Primary => vec![v4, v6],
            IpFamily::DualStackV6Primary => vec![v6, v4],
        }
    }

    /// Plugs a pod's namespace into the node's bridge: eth0 with its address(es).
    fn plug(&self, pod_ns: &Netns, n: u8) -> Result<()> {
        let host_if = format!("vp{n}");
        let ip_cmd = |args: &[&str]| crate::run(Command::new("ip").args(args)).map(|_| ());
        let _ = Command::new("ip").args(["-n", self.node.name(), "link", "del", &host_if]).output();
        ip_cmd(&["-n", self.node.name(), "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", pod_ns.name()])?;
        ip_cmd(&["-n", self.node.name(), "link", "set", &host_if, "master", "br0", "up"])?;
        for ip in self.addresses(n) {
            match ip {
                IpAddr::V4(v4) => ip_cmd(&["-n", pod_ns.name(), "addr", "add", &format!("{v4}/24"), "dev", "eth0"])?,
                IpAddr::V6(v6) => ip_cmd(&["-n", pod_ns.name(), "-6", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?,
            }
        }
        ip_cmd(&["-n", pod_ns.name(), "link", "set", "eth0", "up"])
    }

    fn pod_files(&self, ns: &str, name: &str, uid: &str) -> (PathBuf, PathBuf, PathBuf) {
        let base = format!("{ns}_{name}_{uid}");
        (self.dir.join(format!("{base}.hosts")), self.dir.join(format!("{base}.inetrc")), self.dir.join(format!("home-{name}-{uid}")))
    }

    /// The ERL_INETRC file of a pod (its cluster DNS as Erlang reads it).
    pub fn pod_inetrc(&self, ns: &str, name: &str) -> Option<PathBuf> {
        let uid = self.running.lock().unwrap().get(&key(ns, name))?.uid.clone();
        Some(self.pod_files(ns, name, &uid).1)
    }

    /// The pod's HOME directory (shared by its containers, like an emptyDir).
    pub fn pod_home(&self, ns: &str, name: &str) -> Option<PathBuf> {
        let uid = self.running.lock().unwrap().get(&key(ns, name))?.uid.clone();
        Some(self.pod_files(ns, name, &uid).2)
    }

    /// The process id of a running container.
    pub fn container_pid(&self, ns: &str, name: &str, container: &str) -> Option<u32> {
        let running = self.running.lock().unwrap();
        running.get(&key(ns, name))?.containers.iter().find(|c| c.name == container)?.process.as_ref().map(|p| p.0.id())
    }

    /// What CoreDNS would answer, as (address, name) pairs.
    fn dns_records(&self) -> Vec<(IpAddr, String)> {
        let (pods, _) = self.store.list_pods(None);
        let (services, _) = self.store.list_services(None);
        let mut out = Vec::new();
        for p in &pods {
            let ns = p.metadata.namespace.clone().unwrap_or_default();
            let ips: Vec<IpAddr> = p.status.iter().flat_map(|s| s.pod_ips.iter().flatten()).filter_map(|i| i.ip.parse().ok()).collect();
            for ip in &ips {
                out.push((*ip, format!("{}.{ns}.pod.cluster.local", dashed(*ip))));
            }
            let labels = p.metadata.labels.clone().unwrap_or_default();
            for svc in services.iter().filter(|s| s.metadata.namespace.as_deref() == Some(ns.as_str())) {
                let Some(spec) = &svc.spec else { continue };
                let headless = spec.cluster_ip.as_deref() == Some("None");
                let selects = spec.selector.as_ref().is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
                let published = is_ready(p) || spec.publish_not_ready_addresses == Some(true);
                if !(headless && selects && published && p.metadata.deletion_timestamp.is_none()) {
                    continue;
                }
                let svc_name = svc.metadata.name.clone().unwrap_or_default();
                for ip in &ips {
                    out.push((*ip, format!("{svc_name}.{ns}.svc.cluster.local")));
                }
                let pspec = p.spec.as_ref();
                if let (Some(host), Some(sub)) = (pspec.and_then(|s| s.hostname.clone()), pspec.and_then(|s| s.subdomain.clone())) {
                    if sub == svc_name {
                        for ip in &ips {
                            out.push((*ip, format!("{host}.{sub}.{ns}.svc.cluster.local")));
                        }
                    }
                }
            }
        }
        out
    }

    /// Rewrites every running pod's hosts file (atomically): its kubelet-managed /etc/hosts
    /// lines, then the cluster's records with the short names its search path resolves.
    fn update_cluster_dns(&self) {
        let records = self.dns_records();
        let pods: Vec<(String, String, String)> = self.running.lock().unwrap().iter().map(|((ns, n), r)| (ns.clone(), n.clone(), r.uid.clone())).collect();
        for (ns, name, uid) in pods {
            let Some(pod) = self.store.get_pod(&ns, &name) else { continue };
            let spec = pod.spec.clone().unwrap_or_default();
            let hostname = spec.hostname.clone().unwrap_or_else(|| name.clone());
            let mut text = String::from("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
            let own: Vec<String> = pod.status.iter().flat_map(|s| s.pod_ips.iter().flatten()).map(|i| i.ip.clone()).collect();
            for ip in &own {
                match &spec.subdomain {
                    Some(sub) => text.push_str(&format!("{ip}\t{hostname}.{sub}.{ns}.svc.cluster.local\t{hostname}\n")),
                    None => text.push_str(&format!("{ip}\t{hostname}\n")),
                }
            }
            let mut searches: Vec<String> = if spec.dns_policy.as_deref() == Some("None") {
                Vec::new()
            } else {
                vec![format!("{ns}.svc.cluster.local"), "svc.cluster.local".into(), "cluster.local".into()]
            };
            searches.extend(spec.dns_config.as_ref().and_then(|d| d.searches.clone()).unwrap_or_default().into_iter().take(32));
            text.push_str("# cluster DNS\n");
            for (ip, name) in &records {
                let mut line = format!("{ip}\t{name}");
                for d in &searches {
                    if let Some(short) = name.strip_suffix(&format!(".{d}")) {
                        line.push(' ');
                        line.push_str(short);
                    }
                }
                text.push_str(&line);
                text.push('\n');
            }
            let (hosts, _, _) = self.pod_files(&ns, &name, &uid);
            let tmp = hosts.with_extension("tmp");
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &hosts);
            }
        }
    }

    /// Applies the Kubernetes objects of a manifest: Services, Namespaces, Secrets and
    /// ConfigMaps are stored, StatefulSets get pods. Returns every pod to expect.
    pub fn apply_objects(self: &Arc<Self>, docs: &[Value]) -> Result<Vec<(String, String)>> {
        let mut expected = Vec::new();
        for value in docs {
            match value["kind"].as_str() {
                Some("Service") => self.store.put_service(serde_json::from_value::<Service>(value.clone())?),
                Some("Namespace") => self.store.add_namespace(value["metadata"]["name"].as_str().context("namespace name")?),
                Some("Secret") => self.store.put_secret(serde_json::from_value(value.clone()).context("Secret")?),
                Some("ConfigMap") => self.store.put_configmap(serde_json::from_value(value.clone()).context("ConfigMap")?),
                Some("StatefulSet") => {
                    let mut sts: StatefulSet = serde_json::from_value(value.clone())?;
                    let ns = sts.metadata.namespace.get_or_insert_with(|| "default".into()).clone();
                    let name = sts.metadata.name.clone().context("StatefulSet without a name")?;
                    sts.metadata.uid.get_or_insert_with(uid);
                    self.store.add_namespace(&ns);
                    let replicas = sts.spec.replicas.unwrap_or(1).clamp(0, 200);
                    self.store.put_statefulset(sts.clone());
                    self.statefulsets.lock().unwrap().insert(key(&ns, &name), sts);
                    expected.extend((0..replicas).map(|i| (ns.clone(), format!("{name}-{i}"))));
                }
                Some(other) => bail!("the simulated cluster does not run kind {other}"),
                None => bail!("manifest document without kind"),
            }
        }
        self.reconcile();
        Ok(expected)
    }

    /// Applies a multi-document YAML manifest (see [`Kubelet::apply_objects`]).
    pub fn apply_manifest(self: &Arc<Self>, yaml: &str) -> Result<Vec<(String, String)>> {
        self.apply_objects(&parse_manifest(yaml)?)
    }

    /// The StatefulSet controller's pass: creates missing pods, in order unless Parallel, and
    /// after a scale-down deletes the pods past the new count, the highest ordinal first (one
    /// at a time, each once the previous is gone, unless Parallel), as the real controller does.
    fn reconcile(self: &Arc<Self>) {
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        let mut surplus: Vec<(String, String)> = Vec::new();
        let sets = self.statefulsets.lock().unwrap();
        for ((ns, name), sts) in sets.iter() {
            let ordered = sts.spec.pod_management_policy.as_deref() != Some("Parallel");
            let replicas = sts.spec.replicas.unwrap_or(1).clamp(0, 200);
            let mut extra: Vec<(i32, Pod)> = self
                .store
                .list_pods(Some(ns))
                .0
                .into_iter()
                .filter_map(|p| {
                    let ordinal: i32 = p.metadata.name.as_deref()?.strip_prefix(&format!("{name}-"))?.parse().ok()?;
                    let owned = p.metadata.owner_references.iter().flatten().any(|o| o.kind == "StatefulSet" && &o.name == name);
                    (owned && ordinal >= replicas).then_some((ordinal, p))
                })
                .collect();
            extra.sort_by_key(|(ordinal, _)| std::cmp::Reverse(*ordinal));
            let terminating = extra.iter().any(|(_, p)| p.metadata.deletion_timestamp.is_some());
            let take = if !ordered { extra.len() } else if terminating { 0 } else { 1 };
            surplus.extend(
                extra
                    .into_iter()
                    .filter(|(_, p)| p.metadata.deletion_timestamp.is_none())
                    .take(take)
                    .filter_map(|(_, p)| Some((ns.clone(), p.metadata.name?))),
            );
            for i in 0..sts.spec.replicas.unwrap_or(1).clamp(0, 200) {
                let pod_name = format!("{name}-{i}");
                match self.store.get_pod(ns, &pod_name) {
                    None => {
                        if let Err(e) = self.create_pod(sts, i) {
                            log::warn!("simulated StatefulSet controller: creating {ns}/{pod_name}: {e:#}");
                        }
                        if ordered {
                            break;
                        }
                    }
                    Some(p) if ordered && !(is_running(&p) && is_ready(&p) && p.metadata.deletion_timestamp.is_none()) => break,
                    Some(_) => {}
                }
            }
        }
        drop(sets);
        // Outside the lock: a deletion with no grace period reconciles again at once.
        for (ns, name) in surplus {
            self.delete_pod(&ns, &name);
        }
    }

    /// `kubectl scale statefulset NAME --replicas N`: the controller creates or deletes pods.
    pub fn scale_statefulset(self: &Arc<Self>, ns: &str, name: &str, replicas: i32) -> Result<()> {
        {
            let mut sets = self.statefulsets.lock().unwrap();
            let sts = sets.get_mut(&key(ns, name)).with_context(|| format!("no StatefulSet {ns}/{name}"))?;
            sts.spec.replicas = Some(replicas.clamp(0, 200));
            self.store.put_statefulset(sts.clone());
        }
        self.reconcile();
        Ok(())
    }

    /// Creates pod NAME-ORDINAL of a StatefulSet and starts it in the background.
    fn create_pod(self: &Arc<Self>, sts: &StatefulSet, ordinal: i32) -> Result<()> {
        let spec = sts.spec.clone();
        let sts_name = sts.metadata.name.clone().unwrap_or_default();
        let ns = sts.metadata.namespace.clone().unwrap_or_else(|| "default".into());
        let name = format!("{sts_name}-{ordinal}");
        let mut labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
        labels.insert("statefulset.kubernetes.io/pod-name".into(), name.clone());
        labels.insert("apps.kubernetes.io/pod-index".into(), ordinal.to_string());
        let mut pod_spec = spec.template.spec.clone().context("pod template without spec")?;
        pod_spec.hostname = Some(name.clone());
        pod_spec.subdomain = Some(spec.service_name.clone().unwrap_or_default()).filter(|s| !s.is_empty());
        pod_spec.node_name = Some(NODE_NAME.into());
        pod_spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
        pod_spec.restart_policy.get_or_insert_with(|| "Always".into());
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                uid: Some(uid()),
                labels: Some(labels),
                owner_references: Some(vec![OwnerReference {
                    api_version: "apps/v1".into(),
                    kind: "StatefulSet".into(),
                    name: sts_name,
                    uid: sts.metadata.uid.clone().unwrap_or_default(),
                    controller: Some(true),
                    block_owner_deletion: Some(true),
                }]),
                ..Default::default()
            },
            spec: Some(pod_spec),
            status: Some(PodStatus {
                phase: Some("Pending".into()),
                host_ip: Some(HOST_IP.into()),
                host_ips: Some(vec![k8s_openapi::api::core::v1::HostIP { ip: HOST_IP.into() }]),
                qos_class: Some("BestEffort".into()),
                conditions: Some(vec![condition("PodScheduled", true, None)]),
                ..Default::default()
            }),
        };
        let pod = self.store.put_pod(pod);
        let kubelet = self.clone();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        std::thread::spawn(move || {
            if let Err(e) = kubelet.start_pod(&ns, &name, &uid) {
                log::warn!("simulated kubelet: pod {ns}/{name}: {e:#}");
                kubelet.store.update_pod_if(&ns, &name, |p| {
                    if p.metadata.uid.as_deref() != Some(uid.as_str()) {
                        return false;
                    }
                    let status = p.status.get_or_insert_with(Default::default);
                    status.phase = Some("Failed".into());
                    status.message = Some(format!("{e:#}"));
                    true
                });
            }
        });
        Ok(())
    }

    /// Sandbox (netns + addresses), containers, then readiness for the pod's whole life.
    fn start_pod(self: &Arc<Self>, ns: &str, name: &str, uid: &str) -> Result<()> {
        let pod = self.store.get_pod(ns, name).context("pod vanished")?;
        let containers = pod.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default();
        anyhow::ensure!(!containers.is_empty(), "pod without containers");
        let n = self.ipam.lock().unwrap().alloc(self.allocation, &key(ns, name)).context("failed to allocate a pod IP: the node's range is exhausted")?;
        let netns = match Netns::new("brk").and_then(|netns| self.plug(&netns, n).map(|_| netns)) {
            Ok(ns) => ns,
            Err(e) => {
                self.ipam.lock().unwrap().used.remove(&n);
                return Err(e);
            }
        };
        let (_, inetrc, home) = self.pod_files(ns, name, uid);
        std::fs::create_dir_all(&home)?;
        let hosts = self.pod_files(ns, name, uid).0;
        std::fs::write(&hosts, "")?;
        std::fs::write(&inetrc, format!("{{hosts_file, {:?}}}.\n{{lookup, [file, native]}}.\n", hosts.display().to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let runs = containers
            .iter()
            .map(|c| ContainerRun {
                name: c.name.clone(),
                process: None,
                env: BTreeMap::new(),
                ready: false,
                successes: 0,
                failures: 0,
                next_probe: Instant::now(),
                ever_ready: false,
                restarts: 0,
                started_at: None,
                retry_at: Some(Instant::now()),
                waiting: Some(("ContainerCreating".into(), String::new())),
                last_terminated: None,
                container_id: String::new(),
            })
            .collect();
        {
            let mut running = self.running.lock().unwrap();
            // Deleted (or replaced) before the sandbox was up: undo.
            if self.store.get_pod(ns, name).and_then(|p| p.metadata.uid) != Some(uid.to_string()) || self.stopping.load(Ordering::Relaxed) {
                self.ipam.lock().unwrap().used.remove(&n);
                return Ok(());
            }
            running.insert(key(ns, name), RunningPod { uid: uid.into(), host: n, containers: runs, stop: stop.clone(), netns });
        }
        let ips = self.addresses(n);
        let started = now();
        self.store.update_pod_if(ns, name, |p| {
            if p.metadata.uid.as_deref() != Some(uid) {
                return false;
            }
            let status = p.status.get_or_insert_with(Default::default);
            status.pod_ip = Some(ips[0].to_string());
            status.pod_ips = Some(ips.iter().map(|ip| PodIP { ip: ip.to_string() }).collect());
            status.start_time = Some(started.clone());
            true
        });
        self.update_cluster_dns();
        self.prober(ns, name, uid, &pod, stop);
        Ok(())
    }

    /// The container's environment, as the kubelet builds it: envFrom (ConfigMaps and
    /// Secrets, with prefixes) first, then env (literals expanded against what came before,
    /// downward-API fields, secretKeyRef/configMapKeyRef). Err: the waiting message of a
    /// CreateContainerConfigError.
    fn env_for(&self, pod: &Pod, container: &Container) -> Result<BTreeMap<String, String>, String> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let mut vars = BTreeMap::new();
        let valid = |k: &str| !k.is_empty() && !k.starts_with(|c: char| c.is_ascii_digit()) && k.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
        for from in container.env_from.iter().flatten() {
            let prefix = from.prefix.clone().unwrap_or_default();
            if let Some(r) = &from.config_map_ref {
                match self.store.get_configmap(&ns, &r.name) {
                    Some(cm) => vars.extend(cm.data.unwrap_or_default().into_iter().filter(|(k, _)| valid(k)).map(|(k, v)| (format!("{prefix}{k}"), v))),
                    None if r.optional == Some(true) => {}
                    None => return Err(format!("configmap \"{}\" not found", r.name)),
                }
            }
            if let Some(r) = &from.secret_ref {
                match self.store.get_secret(&ns, &r.name) {
                    Some(s) => vars.extend(
                        s.data.unwrap_or_default().into_iter().filter(|(k, _)| valid(k)).map(|(k, v)| (format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into_owned())),
                    ),
                    None if r.optional == Some(true) => {}
                    None => return Err(format!("secret \"{}\" not found", r.name)),
                }
            }
        }
        let ips: Vec<String> = pod.status.iter().flat_map(|s| s.pod_ips.iter().flatten()).map(|i| i.ip.clone()).collect();
        for e in container.env.iter().flatten() {
            let value = if let Some(v) = &e.value {
                Some(expand(v, &vars))
            } else if let Some(from) = &e.value_from {
                if let Some(field) = &from.field_ref {
                    let label = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
                        field.field_path.strip_prefix(prefix).and_then(|k| k.strip_prefix("['")?.strip_suffix("']")).and_then(|k| map.as_ref()?.get(k).cloned())
                    };
                    match field.field_path.as_str() {
                        "status.podIP" => ips.first().cloned(),
                        "status.podIPs" => Some(ips.join(",")),
                        "status.hostIP" | "status.hostIPs" => Some(HOST_IP.into()),
                        "metadata.name" => pod.metadata.name.clone(),
                        "metadata.namespace" => pod.metadata.namespace.clone(),
                        "metadata.uid" => pod.metadata.uid.clone(),
                        "spec.nodeName" => Some(NODE_NAME.into()),
                        "spec.serviceAccountName" => Some(pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into())),
                        _ => label("metadata.labels", &pod.metadata.labels).or_else(|| label("metadata.annotations", &pod.metadata.annotations)),
                    }
                } else if let Some(r) = &from.secret_key_ref {
                    match self.store.get_secret(&ns, &r.name) {
                        Some(s) => match s.data.and_then(|d| d.get(&r.key).cloned()) {
                            Some(v) => Some(String::from_utf8_lossy(&v.0).into_owned()),
                            None if r.optional == Some(true) => None,
                            None => return Err(format!("couldn't find key {} in Secret {ns}/{}", r.key, r.name)),
                        },
                        None if r.optional == Some(true) => None,
                        None => return Err(format!("secret \"{}\" not found", r.name)),
                    }
                } else if let Some(r) = &from.config_map_key_ref {
                    match self.store.get_configmap(&ns, &r.name) {
                        Some(cm) => match cm.data.and_then(|d| d.get(&r.key).cloned()) {
                            Some(v) => Some(v),
                            None if r.optional == Some(true) => None,
                            None => return Err(format!("couldn't find key {} in ConfigMap {ns}/{}", r.key, r.name)),
                        },
                        None if r.optional == Some(true) => None,
                        None => return Err(format!("configmap \"{}\" not found", r.name)),
                    }
                } else {
                    None
                }
            } else {
                Some(String::new())
            };
            if let Some(v) = value {
                vars.insert(e.name.clone(), v);
            }
        }
        Ok(vars)
    }

    /// Starts one container: its own UTS namespace named after the pod, in the pod's network.
    fn start_container(&self, pod: &Pod, c: &Container, netns: &Path, env: &BTreeMap<String, String>) -> Result<Proc> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let (_, inetrc, home) = self.pod_files(&ns, &name, &uid);
        let hostname = pod.spec.as_ref().and_then(|s| s.hostname.clone()).unwrap_or_else(|| name.clone());
        let argv: Vec<String> = c.command.iter().flatten().chain(c.args.iter().flatten()).map(|a| expand(a, env)).collect();
        let (program, args) = argv.split_first().context("container without command (the simulated kubelet has no images to take an entrypoint from)")?;
        let log_path = self.dir.join(format!("{ns}_{name}_{uid}_{}.log", c.name));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["--", "unshare", "--uts", "--", "sh", "-c", "hostname \"$0\" && exec \"$@\"", &hostname, program])
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", &home)
            .env("LANG", "C.UTF-8")
            .env("HOSTNAME", &hostname)
            .env("ERL_INETRC", &inetrc)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program:?}"))?;
        Ok(Proc(child))
    }

    /// The pod's life after the sandbox: starts (and restarts) containers and probes their
    /// readiness until the pod is gone. Runs on a thread of its own.
    fn prober(self: &Arc<Self>, ns: &str, name: &str, uid: &str, pod: &Pod, stop: Arc<AtomicBool>) {
        let kubelet = Arc::downgrade(self);
        let (ns, name, uid) = (ns.to_string(), name.to_string(), uid.to_string());
        let pod = pod.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Some(k) = kubelet.upgrade() else { return };
                if k.stopping.load(Ordering::Relaxed) {
                    return;
                }
                // The pod as stored now (its IPs are set after the sandbox came up).
                let current = k.store.get_pod(&ns, &name).filter(|p| p.metadata.uid.as_deref() == Some(uid.as_str())).unwrap_or_else(|| pod.clone());
                if k.tick(&ns, &name, &current) {
                    k.write_status(&ns, &name, &uid, &current);
                }
                drop(k);
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    }

    /// One round of the pod worker: (re)starts due containers, notes exits, runs due probes.
    /// True if anything in the status changed.
    fn tick(&self, ns: &str, name: &str, pod: &Pod) -> bool {
        let containers = pod.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default();
        let forced = self.forced.lock().unwrap().get(&key(ns, name)).copied();
        let mut changed = false;
        // Start/restart and exit detection, under the lock; probes (slow) outside it.
        let mut due = Vec::new();
        let netns_path;
        {
            let mut running = self.running.lock().unwrap();
            let Some(rp) = running.get_mut(&key(ns, name)) else { return false };
            netns_path = rp.netns.path();
            let now_i = Instant::now();
            for (i, c) in containers.iter().enumerate() {
                let Some(run) = rp.containers.get_mut(i) else { continue };
                if let Some(p) = run.process.as_mut() {
                    if let Ok(Some(exit)) = p.0.try_wait() {
                        let code = exit.code().unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&exit).unwrap_or(9));
                        run.process = None;
                        run.last_terminated = Some(ContainerStateTerminated {
                            exit_code: code,
                            reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
                            started_at: run.started_at.clone(),
                            finished_at: Some(now()),
                            container_id: Some(run.container_id.clone()),
                            ..Default::default()
                        });
                        // The kubelet's back-off: the first restart at once, then 10 s,
                        // doubling, at most 5 min (CrashLoopBackOff meanwhile).
                        let backoff = if run.restarts == 0 { Duration::ZERO } else { Duration::from_secs((10u64 << (run.restarts - 1).clamp(0, 5)).min(300)) };
                        run.retry_at = Some(now_i + backoff);
                        run.waiting = Some(if backoff.is_zero() {
                            ("ContainerCreating".into(), String::new())
                        } else {
                            (
                                "CrashLoopBackOff".into(),
                                format!("back-off {}s restarting failed container={} pod={name}_{ns}({})", backoff.as_secs(), c.name, pod.metadata.uid.as_deref().unwrap_or("")),
                            )
                        });
                        run.ready = false;
                        run.successes = 0;
                        changed = true;
                    }
                }
                // A terminating pod's containers are not (re)started.
                if run.process.is_none() && pod.metadata.deletion_timestamp.is_none() && run.retry_at.is_some_and(|t| now_i >= t) {
                    match self.env_for(pod, c) {
                        Err(msg) => {
                            run.retry_at = Some(now_i + Duration::from_secs(1));
                            if run.waiting.as_ref().map(|w| &w.1) != Some(&msg) {
                                run.waiting = Some(("CreateContainerConfigError".into(), msg));
                                changed = true;
                            }
                        }
                        Ok(env) => match self.start_container(pod, c, &netns_path, &env) {
                            Ok(p) => {
                                // restartCount counts restarts done, not exits.
                                if run.last_terminated.is_some() {
                                    run.restarts += 1;
                                }
                                run.container_id = format!("containerd://{}", crate::cluster::pki::random_token().unwrap_or_default());
                                run.process = Some(p);
                                run.env = env;
                                run.retry_at = None;
                                run.waiting = None;
                                run.started_at = Some(now());
                                let delay = c.readiness_probe.as_ref().and_then(|p| p.initial_delay_seconds).unwrap_or(0).clamp(0, 3600) as u64;
                                run.next_probe = now_i + Duration::from_secs(delay);
                                changed = true;
                            }
                            Err(e) => {
                                run.retry_at = Some(now_i + Duration::from_secs(10));
                                run.waiting = Some(("RunContainerError".into(), format!("{e:#}")));
                                changed = true;
                            }
                        },
                    }
                }
                if run.process.is_some() && now_i >= run.next_probe {
                    due.push((i, run.env.clone()));
                }
            }
        }
        let home = self.pod_files(ns, name, pod.metadata.uid.as_deref().unwrap_or("")).2;
        for (i, env) in due {
            let c = &containers[i];
            let ok = forced.unwrap_or_else(|| container_ready_check(c, &netns_path, &env, &home));
            let mut running = self.running.lock().unwrap();
            let Some(run) = running.get_mut(&key(ns, name)).and_then(|rp| rp.containers.get_mut(i)) else { return changed };
            let probe = c.readiness_probe.clone().unwrap_or_default();
            let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).clamp(1, 3600) as u64);
            let (succ_th, fail_th) = (probe.success_threshold.unwrap_or(1).max(1) as u32, probe.failure_threshold.unwrap_or(3).max(1) as u32);
            if ok {
                run.successes += 1;
                run.failures = 0;
                if !run.ready && run.successes >= succ_th {
                    run.ready = true;
                    run.ever_ready = true;
                    changed = true;
                }
            } else {
                run.failures += 1;
                run.successes = 0;
                if run.ready && run.failures >= fail_th {
                    run.ready = false;
                    changed = true;
                }
            }
            let fast = self.fast_startup_probes && !run.ever_ready;
            run.next_probe = Instant::now() + if fast { Duration::from_millis(100) } else { period };
        }
        changed
    }

    /// Writes the pod's status from its containers, as the kubelet's status manager does.
    fn write_status(&self, ns: &str, name: &str, uid: &str, pod: &Pod) {
        let containers = pod.spec.as_ref().map(|s| s.containers.clone()).unwrap_or_default();
        let statuses: Vec<ContainerStatus> = {
            let running = self.running.lock().unwrap();
            let Some(rp) = running.get(&key(ns, name)) else { return };
            containers.iter().zip(&rp.containers).map(|(c, run)| container_status(c, run)).collect()
        };
        let unready: Vec<String> = statuses.iter().filter(|s| !s.ready).map(|s| s.name.clone()).collect();
        let all_started = statuses.iter().all(|s| s.state.as_ref().is_some_and(|st| st.running.is_some()) || s.restart_count > 0);
        self.store.update_pod_if(ns, name, |p| {
            if p.metadata.uid.as_deref() != Some(uid) || p.metadata.deletion_timestamp.is_some() {
                return false;
            }
            let status = p.status.get_or_insert_with(Default::default);
            status.phase = Some(if all_started { "Running" } else { "Pending" }.into());
            let msg = (!unready.is_empty()).then(|| format!("containers with unready status: [{}]", unready.join(" ")));
            let prev = status.conditions.clone().unwrap_or_default();
            let want = [
                ("PodReadyToStartContainers", true, None),
                ("Initialized", true, None),
                ("Ready", unready.is_empty(), msg.clone()),
                ("ContainersReady", unready.is_empty(), msg),
                ("PodScheduled", true, None),
            ];
            status.conditions = Some(
                want.into_iter()
                    .map(|(t, ok, msg)| match prev.iter().find(|c| c.type_ == t) {
                        Some(c) if (c.status == "True") == ok => PodCondition { message: msg.clone().filter(|_| !ok), ..c.clone() },
                        _ => condition(t, ok, msg),
                    })
                    .collect(),
            );
            status.container_statuses = Some(statuses);
            true
        });
        self.update_cluster_dns();
    }

    /// Test hook: force every readiness check of a pod to fail (`Some(false)`) or pass
    /// (`Some(true)`), or go back to real probing (`None`). Thresholds still apply.
    pub fn force_readiness(&self, ns: &str, name: &str, result: Option<bool>) {
        let mut forced = self.forced.lock().unwrap();
        match result {
            Some(r) => forced.insert(key(ns, name), r),
            None => forced.remove(&key(ns, name)),
        };
    }

    /// The network namespace of a running pod (for port-forwards).
    pub fn netns_of(&self, ns: &str, name: &str) -> Option<PathBuf> {
        self.running.lock().unwrap().get(&key(ns, name)).map(|r| r.netns.path())
    }

    /// Kills a pod's sandbox; its address is freed, or held (`linger`) until released.
    fn teardown(&self, ns: &str, name: &str, linger: bool) -> Option<u8> {
        let running = self.running.lock().unwrap().remove(&key(ns, name))?;
        let n = running.host;
        drop(running); // kills the processes and removes the namespace
        let mut ipam = self.ipam.lock().unwrap();
        ipam.used.remove(&n);
        if linger {
            ipam.held.insert(n, key(ns, name));
        }
        Some(n)
    }

    /// Deletes a pod like the API does: with a grace period (`grace`, else the pod's
    /// terminationGracePeriodSeconds, else 30 s) the pod is marked terminating
    /// (deletionTimestamp, a MODIFIED event) and its containers get SIGTERM; once they have all
    /// exited, or the period is over (then SIGKILL), the sandbox goes and the object is
    /// removed (DELETED). Grace 0 (a force delete) does all of it at once. Its StatefulSet then
    /// recreates it (with a new uid, and an address the IPAM picks). Returns the pod as the
    /// DELETE call answers it.
    pub fn delete_pod_with(self: &Arc<Self>, ns: &str, name: &str, grace: Option<i64>) -> Option<Pod> {
        let current = self.store.get_pod(ns, name)?;
        if current.metadata.deletion_timestamp.is_some() && grace != Some(0) {
            return Some(current); // already terminating
        }
        let grace = grace.or_else(|| current.spec.as_ref()?.termination_grace_period_seconds).unwrap_or(30).clamp(0, 3600);
        let uid = current.metadata.uid.clone();
        let pod = self.store.update_pod_if(ns, name, |p| {
            if p.metadata.uid != uid {
                return false;
            }
            let t = now();
            p.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t.0 + std::time::Duration::from_secs(grace as u64)));
            p.metadata.deletion_grace_period_seconds = Some(grace);
            true
        })?;
        self.update_cluster_dns();
        let finish = {
            let (ns, name) = (ns.to_string(), name.to_string());
            move |k: &Arc<Kubelet>| {
                k.teardown(&ns, &name, false);
                if k.store.get_pod(&ns, &name).is_some_and(|p| p.metadata.uid == uid) {
                    k.store.delete_pod(&ns, &name);
                }
                k.update_cluster_dns();
                k.reconcile();
            }
        };
        if grace == 0 {
            finish(self);
            return Some(pod);
        }
        let pids: Vec<i32> = {
            let running = self.running.lock().unwrap();
            running.get(&key(ns, name)).map(|r| r.containers.iter().filter_map(|c| c.process.as_ref()).map(|p| p.0.id() as i32).collect()).unwrap_or_default()
        };
        for pid in &pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGTERM);
        }
        let kubelet = self.clone();
        let (ns2, name2) = (ns.to_string(), name.to_string());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(grace as u64);
            while Instant::now() < deadline && !kubelet.stopping.load(Ordering::Relaxed) {
                let all_gone = {
                    let mut running = kubelet.running.lock().unwrap();
                    running.get_mut(&key(&ns2, &name2)).is_none_or(|r| r.containers.iter_mut().all(|c| c.process.as_mut().is_none_or(|p| !matches!(p.0.try_wait(), Ok(None)))))
                };
                if all_gone {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            finish(&kubelet);
        });
        Some(pod)
    }

    /// Deletes a pod with its grace period (see [`Kubelet::delete_pod_with`]).
    pub fn delete_pod(self: &Arc<Self>, ns: &str, name: &str) -> Option<Pod> {
        self.delete_pod_with(ns, name, None)
    }

    /// Makes pod `taker`'s replacement get pod `freed`'s address, deterministically, the way
    /// it happens on a real node: `taker` is force-deleted (its API object goes at once while
    /// its sandbox, and so its address, lingers) and `freed` is deleted; the StatefulSet
    /// controller (OrderedReady) recreates `taker` first, and the IPAM hands it the lowest
    /// free address: `freed`'s. `taker`'s old address is released once that happened (so
    /// `freed`'s replacement gets it). Needs [`IpAllocation::LowestFree`] and `taker`'s
    /// ordinal below `freed`'s, and `freed`'s address the lowest free one. Returns
    /// (taker's old address, freed's old address).
    pub fn replace_reusing_ip(self: &Arc<Self>, ns: &str, freed: &str, taker: &str) -> Result<(IpAddr, IpAddr)> {
        anyhow::ensure!(self.allocation == IpAllocation::LowestFree, "replace_reusing_ip needs IpAllocation::LowestFree");
        let ip_of = |n: &str| -> Result<IpAddr> {
            self.store.get_pod(ns, n).and_then(|p| p.status?.pod_ip).context("pod without an IP")?.parse().context("pod IP")
        };
        let (taker_ip, freed_ip) = (ip_of(taker)?, ip_of(freed)?);
        let old_uid = self.store.get_pod(ns, taker).and_then(|p| p.metadata.uid);
        let held = {
            // The controller waits (it takes this lock) until both deletions are done.
            let _controller = self.statefulsets.lock().unwrap();
            self.store.update_pod(ns, taker, |p| p.metadata.deletion_timestamp = Some(now()));
            let held = self.teardown(ns, taker, true).with_context(|| format!("pod {taker} is not running"))?;
            self.store.delete_pod(ns, taker);
            self.store.update_pod(ns, freed, |p| p.metadata.deletion_timestamp = Some(now()));
            self.teardown(ns, freed, false);
            self.store.delete_pod(ns, freed);
            held
        };
        self.update_cluster_dns();
        self.reconcile();
        let got = crate::wait_until(&format!("{taker}'s replacement to get an IP"), Duration::from_secs(60), || {
            self.store.get_pod(ns, taker).is_some_and(|p| p.metadata.uid != old_uid && p.status.and_then(|s| s.pod_ip).is_some())
        });
        // (Released when the replacement got its address; in case it never did:)
        self.ipam.lock().unwrap().held.remove(&held);
        got?;
        Ok((taker_ip, freed_ip))
    }

    /// Stops every pod (cluster shutdown).
    pub fn stop_all(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        let all: Vec<RunningPod> = self.running.lock().unwrap().drain().map(|(_, r)| r).collect();
        drop(all);
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// The StatefulSet controller's loop: a pass every 100 ms while the cluster lives.
fn controller(kubelet: Weak<Kubelet>) {
    loop {
        let Some(k) = kubelet.upgrade() else { return };
        if k.stopping.load(Ordering::Relaxed) {
            return;
        }
        k.reconcile();
        drop(k);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Parses a multi-document YAML manifest into JSON objects (empty documents skipped).
pub fn parse_manifest(yaml: &str) -> Result<Vec<Value>> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml).take(1000) {
        let value = serde_json::to_value(serde_yaml::Value::deserialize(doc)?)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn named_port(c: &Container, p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(i) => u16::try_from(*i).ok(),
        IntOrString::String(s) => s.parse().ok().or_else(|| c.ports.iter().flatten().find(|cp| cp.name.as_deref() == Some(s))?.container_port.try_into().ok()),
    }
}

/// One readiness check of a container: its declared ports accept connections (the
/// simulator's stand-in for "the app is up") and its readiness probe passes.
fn container_ready_check(c: &Container, netns: &Path, env: &BTreeMap<String, String>, home: &Path) -> bool {
    let ports_ok = c.ports.iter().flatten().filter_map(|p| u16::try_from(p.container_port).ok()).all(|p| dial_in(netns, p).is_ok());
    ports_ok && c.readiness_probe.as_ref().is_none_or(|p| run_probe(c, p, netns, env, home))
}

fn run_probe(c: &Container, probe: &Probe, netns: &Path, env: &BTreeMap<String, String>, home: &Path) -> bool {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).clamp(1, 60) as u64);
    if let Some(argv) = probe.exec.as_ref().and_then(|e| e.command.clone()).filter(|a| !a.is_empty()) {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .arg("--")
            .args(&argv)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", home)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else { return false };
        let mut child = Proc(child);
        let deadline = Instant::now() + timeout;
        loop {
            match child.0.try_wait() {
                Ok(Some(st)) => return st.success(),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                _ => return false, // timed out: killed on drop, a failure as the kubelet counts it
            }
        }
    }
    if let Some(t) = &probe.tcp_socket {
        return named_port(c, &t.port).is_some_and(|p| dial_in(netns, p).is_ok());
    }
    if let Some(h) = &probe.http_get {
        let Some(port) = named_port(c, &h.port) else { return false };
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        return dial_in(netns, port).is_ok_and(|mut s| {
            use std::io::{Read, Write};
            let _ = s.set_read_timeout(Some(timeout));
            let req = format!("GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nUser-Agent: kube-probe/1.35\r\nAccept: */*\r\nConnection: close\r\n\r\n");
            let mut buf = [0u8; 64];
            s.write_all(req.as_bytes()).is_ok()
                && s.read(&mut buf).is_ok_and(|n| {
                    let line = String::from_utf8_lossy(&buf[..n]);
                    line.split_whitespace().nth(1).and_then(|c| c.parse::<u16>().ok()).is_some_and(|c| (200..400).contains(&c))
                })
        });
    }
    true
}

fn condition(type_: &str, ok: bool, message: Option<String>) -> PodCondition {
    PodCondition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.into(),
        last_transition_time: Some(now()),
        last_probe_time: None,
        reason: (!ok && matches!(type_, "Ready" | "ContainersReady")).then(|| "ContainersNotReady".into()),
        message: message.filter(|_| !ok),
        ..Default::default()
    }
}

fn container_status(c: &Container, run: &ContainerRun) -> ContainerStatus {
    let state = if run.process.is_some() {
        ContainerState { running: Some(ContainerStateRunning { started_at: run.started_at.clone() }), ..Default::default() }
    } else {
        let (reason, message) = run.waiting.clone().unwrap_or_else(|| ("ContainerCreating".into(), String::new()));
        ContainerState { waiting: Some(ContainerStateWaiting { reason: Some(reason), message: Some(message).filter(|m| !m.is_empty()) }), ..Default::default() }
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone().unwrap_or_default(),
        image_id: String::new(),
        container_id: Some(run.container_id.clone()).filter(|s| !s.is_empty()),
        ready: run.ready,
        restart_count: run.restarts,
        started: Some(run.process.is_some()),
        state: Some(state),
        last_state: run.last_terminated.clone().map(|t| ContainerState { terminated: Some(t), ..Default::default() }),
        ..Default::default()
    }
}

/// Connects to localhost:port inside a network namespace as the container runtime does for
/// a port-forward: `127.0.0.1` first, then `[::1]` (on a fresh thread, since setns changes
/// the calling thread for good). The error reads like containerd's.
pub fn dial_in(netns: &Path, port: u16) -> std::io::Result<TcpStream> {
    let netns = netns.to_path_buf();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns)?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let go = |e: &std::io::Error| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connect: connection refused".to_string(),
            std::io::ErrorKind::TimedOut => "i/o timeout".to_string(),
            _ => e.to_string(),
        };
        let v4 = TcpStream::connect_timeout(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)), Duration::from_secs(5));
        let e4 = match v4 {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        match TcpStream::connect_timeout(&SocketAddr::from((Ipv6Addr::LOCALHOST, port)), Duration::from_secs(5)) {
            Ok(s) => Ok(s),
            // Shown after "IPv4: dial tcp4 127.0.0.1:PORT: " by the port-forward's error.
            Err(e6) => Err(std::io::Error::new(e4.kind(), format!("{} IPv6 dial tcp6 [::1]:{port}: {}", go(&e4), go(&e6)))),
        }
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("dial thread panicked")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn expansion() {
        let vars = [("HOST".to_string(), "10.244.1.5".to_string())].into();
        assert_eq!(super::expand("app@$(HOST)", &vars), "app@10.244.1.5");
        assert_eq!(super::expand("$(NOPE) $$(HOST)", &vars), "$(NOPE) $(HOST)");
    }

    #[test]
    fn ipam_round_robin_and_lowest_free() {
        use super::{IpAllocation::*, Ipam};
        let mut ipam = Ipam::default();
        let p = ("default".to_string(), "p".to_string());
        let a: Vec<u8> = (0..3).map(|_| ipam.alloc(LowestFree, &p).unwrap()).collect();
        assert_eq!(a, [2, 3, 4]);
        ipam.used.remove(&3);
        assert_eq!(ipam.alloc(LowestFree, &p), Some(3));
        ipam.used.remove(&3);
        assert_eq!(ipam.alloc(RoundRobin, &p), Some(10), "round-robin goes on after the last one (from 10)");
        assert_eq!(ipam.alloc(RoundRobin, &p), Some(11));
        let q = ("default".to_string(), "q".to_string());
        ipam.held.insert(2, q.clone());
        ipam.used.remove(&2);
        ipam.used.extend(12..=254);
        assert_eq!(ipam.alloc(RoundRobin, &p), Some(3), "wraps, skipping used and held addresses");
        assert_eq!(ipam.alloc(LowestFree, &q), Some(5));
        assert_eq!(ipam.alloc(LowestFree, &p), Some(2), "q's held address is free once q has a new one");
    }

    #[test]
    fn pod_a_record_names() {
        assert_eq!(super::dashed("10.244.0.5".parse().unwrap()), "10-244-0-5");
        assert_eq!(super::dashed("fd00:10:244:7::a".parse().unwrap()), "fd00-10-244-7--a");
    }
}
