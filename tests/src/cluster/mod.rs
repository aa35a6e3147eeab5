//! A simulated Kubernetes cluster that speaks the real wire protocol, for tests and the demo.
//!
//! * [`apiserver`]: HTTPS API server (bearer tokens, RBAC, real JSON, watch with history
//!   expiry and bookmarks, port-forward WebSocket, faults);
//! * [`kubelet`]: StatefulSet controller + kubelet running each pod as a network namespace
//!   with real processes (BEAM nodes), one per container;
//! * [`authz`], [`store`], [`selector`], [`pki`]: users and RBAC, objects and
//!   resourceVersions, selectors, certificates and kubeconfigs.
//!
//! By default the API server listens on 127.0.0.1 inside the *workstation* namespace, which
//! has no route to any pod IP: beamredir, running there, reaches pods only through
//! port-forwards. [`SimOptions`] can put it behind an HTTP CONNECT proxy or a delay relay.
pub mod apiserver;
pub mod authz;
pub mod kubelet;
pub mod pki;
pub mod selector;
pub mod spdy;
pub mod store;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;

pub use apiserver::Hang;
pub use kubelet::{IpAllocation, IpFamily};
pub use store::HistoryWindow;

use crate::{DelayRelay, Netns, Proc, TempDir, beamredir_bin, wait_until};

/// The example manifest from docs/examples (a 1-replica Elixir StatefulSet `app`).
pub const EXAMPLE_MANIFEST: &str = include_str!("../../../docs/examples/statefulset.yaml");

static NEXT_SUBNET: AtomicU32 = AtomicU32::new(0);

/// Where the API server sits, as seen from the workstation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ApiAccess {
    /// 127.0.0.1 inside the workstation namespace (the default).
    #[default]
    Local,
    /// In a namespace of its own (https://172.31.0.2:6443) that the workstation has no route
    /// to; a real `tinyproxy` (HTTP CONNECT) at http://172.30.0.1:8888 is the only way there.
    /// The kubeconfig carries `proxy-url`; [`SimCluster::kubeconfig_no_proxy`] does not (for
    /// `HTTPS_PROXY`).
    Proxy,
    /// In a namespace of its own, reached only through a [`DelayRelay`] on the workstation's
    /// 127.0.0.1 that adds this round-trip time.
    Delayed(Duration),
}

/// What a test wants of its cluster. `SimOptions::default()` is what [`SimCluster::start`]
/// gives: Kubernetes 1.35, IPv4, round-robin IPAM, unlimited watch history, bookmarks every
/// 60 s, the API server on the workstation's 127.0.0.1, and every pod Ready before it returns.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub wait_ready: bool,
    /// The Kubernetes minor version served (`/version`); from 35 a WebSocket port-forward
    /// needs `create` as well as `get` on pods/portforward.
    pub minor: u32,
    /// Extra RBAC objects (YAML), besides those in the manifest.
    pub rbac: Vec<String>,
    pub history: HistoryWindow,
    pub bookmark_interval: Duration,
    pub ip_allocation: IpAllocation,
    pub ip_family: IpFamily,
    pub api_access: ApiAccess,
    /// Probe not-yet-ready containers every 100 ms instead of every periodSeconds.
    pub fast_startup_probes: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            wait_ready: true,
            minor: 35,
            rbac: Vec::new(),
            history: HistoryWindow::Unlimited,
            bookmark_interval: Duration::from_secs(60),
            ip_allocation: IpAllocation::RoundRobin,
            ip_family: IpFamily::Ipv4,
            api_access: ApiAccess::Local,
            fast_startup_probes: true,
        }
    }
}

impl SimOptions {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn wait_ready(mut self, wait: bool) -> Self {
        self.wait_ready = wait;
        self
    }
    /// Kubernetes 1.MINOR (e.g. 32 or 35).
    pub fn version(mut self, minor: u32) -> Self {
        self.minor = minor;
        self
    }
    pub fn rbac(mut self, yaml: &str) -> Self {
        self.rbac.push(yaml.to_string());
        self
    }
    pub fn history(mut self, window: HistoryWindow) -> Self {
        self.history = window;
        self
    }
    pub fn bookmark_interval(mut self, every: Duration) -> Self {
        self.bookmark_interval = every;
        self
    }
    pub fn ip_allocation(mut self, how: IpAllocation) -> Self {
        self.ip_allocation = how;
        self
    }
    pub fn ip_family(mut self, family: IpFamily) -> Self {
        self.ip_family = family;
        self
    }
    pub fn api_access(mut self, access: ApiAccess) -> Self {
        self.api_access = access;
        self
    }
    pub fn fast_startup_probes(mut self, fast: bool) -> Self {
        self.fast_startup_probes = fast;
        self
    }
    /// Starts a cluster with these options running `manifest`.
    pub fn start(self, manifest: &str) -> Result<SimCluster> {
        SimCluster::start_opts(manifest, self)
    }
}

pub struct SimCluster {
    // Field order is drop order: stop serving, then the pods, then the namespaces.
    server: apiserver::ApiServer,
    _relay: Option<DelayRelay>,
    _proxy: Option<Proc>,
    pub state: Arc<apiserver::ApiState>,
    pub kubelet: Arc<kubelet::Kubelet>,
    runtime: tokio::runtime::Runtime,
    /// The workstation namespace: where beamredir runs (and, by default, the API server).
    pub ws: Netns,
    /// The API server's own namespace (Proxy and Delayed access).
    pub api_ns: Option<Netns>,
    _proxy_ns: Option<Netns>,
    /// The admin's kubeconfig (contexts `sim` and `sim-badtoken`).
    pub kubeconfig: PathBuf,
    /// The same without `proxy-url` (equal to `kubeconfig` unless behind a proxy).
    pub kubeconfig_no_proxy: PathBuf,
    /// The HTTP CONNECT proxy to use (Proxy access), e.g. `http://172.30.0.1:8888`.
    pub proxy_url: Option<String>,
    pub url: String,
    pub options: SimOptions,
    ca_pem: String,
    /// (netns, port) where `blackhole_api_server` drops packets.
    blackhole_at: (PathBuf, u16),
    pub dir: TempDir,
}

const PROXY_ADDR: &str = "172.30.0.1";
const API_ADDR: &str = "172.31.0.2";

impl SimCluster {
    /// Starts the API server and the pods of `manifest`, and waits until every pod is Ready.
    pub fn start(manifest: &str) -> Result<Self> {
        Self::start_opts(manifest, SimOptions::default())
    }

    /// As [`SimCluster::start`]; with `wait_ready` false, pods that never get Ready are fine.
    pub fn start_with(manifest: &str, wait_ready: bool) -> Result<Self> {
        Self::start_opts(manifest, SimOptions::default().wait_ready(wait_ready))
    }

    /// A builder: `SimCluster::options().version(32).start(manifest)`.
    pub fn options() -> SimOptions {
        SimOptions::default()
    }

    pub fn start_opts(manifest: &str, opts: SimOptions) -> Result<Self> {
        crate::require_root()?;
        let dir = TempDir::new("brsim")?;
        let ws = Netns::new("brws")?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let subnet = 100 + ((std::process::id() + NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) * 7) % 150) as u8;
        let store = Arc::new(store::Store::with_window(opts.history));
        let kubelet = kubelet::Kubelet::new(store.clone(), subnet, opts.ip_family, opts.ip_allocation, opts.fast_startup_probes, dir.path().to_path_buf())?;
        let token = pki::random_token()?;
        let authz = authz::Authorizer::new();
        authz.add_token(&token, "sim-admin", &["system:masters"]);
        let docs = kubelet::parse_manifest(manifest)?;
        let mut objects = Vec::new();
        for doc in docs {
            if !authz.load(&doc)? {
                objects.push(doc);
            }
        }
        for yaml in &opts.rbac {
            for doc in kubelet::parse_manifest(yaml)? {
                anyhow::ensure!(authz.load(&doc)?, "not an RBAC object: {}", doc["kind"]);
            }
        }
        let state = Arc::new(apiserver::ApiState::new(store, kubelet.clone(), authz, opts.minor, opts.bookmark_interval));

        // Where the API server listens, and how the workstation gets there.
        let (mut api_ns, mut proxy_ns, mut relay, mut proxy, mut proxy_url) = (None, None, None, None, None);
        let (pki, listen_ns, bind) = match opts.api_access {
            ApiAccess::Local => (pki::Pki::generate()?, ws.path(), SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
            ApiAccess::Delayed(_) => {
                let ns = Netns::new("brapi")?;
                let path = ns.path();
                api_ns = Some(ns);
                (pki::Pki::generate()?, path, SocketAddr::from((Ipv4Addr::LOCALHOST, 6443)))
            }
            ApiAccess::Proxy => {
                let (ans, pns) = (Netns::new("brapi")?, Netns::new("brpx")?);
                link(&ws, "eth0", "172.30.0.2/24", &pns, "ws0", &format!("{PROXY_ADDR}/24"))?;
                link(&ans, "eth0", &format!("{API_ADDR}/24"), &pns, "api0", "172.31.0.1/24")?;
                // The proxy's namespace routes nothing on its own: only tinyproxy crosses.
                crate::run(pns.command("sysctl").args(["-qw", "net.ipv4.ip_forward=0"]))?;
                let path = ans.path();
                api_ns = Some(ans);
                proxy_ns = Some(pns);
                (pki::Pki::generate_for(&[API_ADDR.to_string()])?, path, SocketAddr::from((API_ADDR.parse::<Ipv4Addr>()?, 6443)))
            }
        };
        let server = runtime.block_on(apiserver::ApiServer::start(state.clone(), pki.server_config.clone(), listen_ns.clone(), bind))?;
        let (url, blackhole_at) = match opts.api_access {
            ApiAccess::Local => (format!("https://{}", server.addr), (ws.path(), server.addr.port())),
            ApiAccess::Delayed(rtt) => {
                let r = DelayRelay::start(&ws, &listen_ns, server.addr, rtt)?;
                let at = (ws.path(), r.port);
                let url = format!("https://127.0.0.1:{}", r.port);
                relay = Some(r);
                (url, at)
            }
            ApiAccess::Proxy => {
                let pns = proxy_ns.as_ref().expect("proxy namespace");
                proxy = Some(start_tinyproxy(pns, dir.path())?);
                let p = format!("http://{PROXY_ADDR}:8888");
                wait_until("tinyproxy to listen", Duration::from_secs(20), || {
                    ws.in_ns(|| std::net::TcpStream::connect_timeout(&SocketAddr::from(([172, 30, 0, 1], 8888)), Duration::from_millis(200)).is_ok()).unwrap_or(false)
                })
                .with_context(|| std::fs::read_to_string(dir.path().join("tinyproxy.log")).unwrap_or_default())?;
                proxy_url = Some(p);
                (format!("https://{API_ADDR}:6443"), (listen_ns.clone(), 6443))
            }
        };
        let kubeconfig = dir.path().join("kubeconfig");
        let contexts = [("sim", "sim-admin", token.as_str()), ("sim-badtoken", "sim-intruder", "not-the-token")];
        pki::write_kubeconfig_with(&kubeconfig, &url, &pki.ca_pem, proxy_url.as_deref(), &contexts)?;
        let kubeconfig_no_proxy = if proxy_url.is_some() {
            let p = dir.path().join("kubeconfig-no-proxy");
            pki::write_kubeconfig_with(&p, &url, &pki.ca_pem, None, &contexts)?;
            p
        } else {
            kubeconfig.clone()
        };
        let cluster = SimCluster {
            server,
            _relay: relay,
            _proxy: proxy,
            state,
            kubelet,
            runtime,
            ws,
            api_ns,
            _proxy_ns: proxy_ns,
            kubeconfig,
            kubeconfig_no_proxy,
            proxy_url,
            url,
            options: opts.clone(),
            ca_pem: pki.ca_pem.clone(),
            blackhole_at,
            dir,
        };
        let pods = cluster.kubelet.apply_objects(&objects)?;
        for (ns, name) in pods.iter().filter(|_| opts.wait_ready) {
            cluster.wait_ready(ns, name, Duration::from_secs(90))?;
        }
        Ok(cluster)
    }

    /// Applies more objects (StatefulSets, Services, Secrets, ConfigMaps, RBAC); returns the
    /// pods to expect (not waited for).
    pub fn apply(&self, yaml: &str) -> Result<Vec<(String, String)>> {
        let mut objects = Vec::new();
        for doc in kubelet::parse_manifest(yaml)? {
            if !self.state.authz.load(&doc)? {
                objects.push(doc);
            }
        }
        self.kubelet.apply_objects(&objects)
    }

    /// A kubeconfig (its own file) for a new user `name` with a bearer token of its own, in
    /// no group but `system:authenticated`: it may do nothing until RBAC allows it. Context
    /// `NAME` is current.
    pub fn kubeconfig_for(&self, name: &str) -> Result<PathBuf> {
        self.kubeconfig_for_groups(name, &[])
    }

    /// As [`SimCluster::kubeconfig_for`], with the user in `groups` too.
    pub fn kubeconfig_for_groups(&self, name: &str, groups: &[&str]) -> Result<PathBuf> {
        anyhow::ensure!(!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c)), "bad user name {name:?}");
        let token = pki::random_token()?;
        self.state.authz.add_token(&token, name, groups);
        let path = self.dir.path().join(format!("kubeconfig-{}", name.replace(':', "_")));
        pki::write_kubeconfig_with(&path, &self.url, &self.ca_pem, self.proxy_url.as_deref(), &[(name, name, token.as_str())])?;
        Ok(path)
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Pod> {
        self.state.store.get_pod(ns, name)
    }

    /// The pod's primary IPv4 address (None for IPv6-only pods: see [`SimCluster::pod_ips`]).
    pub fn pod_ip(&self, name: &str) -> Option<Ipv4Addr> {
        self.pod_ips(name).into_iter().find_map(|ip| match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(_) => None,
        })
    }

    /// `status.podIPs`, in order.
    pub fn pod_ips(&self, name: &str) -> Vec<IpAddr> {
        self.pod("default", name)
            .and_then(|p| p.status?.pod_ips)
            .map(|ips| ips.iter().filter_map(|i| i.ip.parse().ok()).collect())
            .unwrap_or_default()
    }

    fn is_ready(pod: &Pod) -> bool {
        pod.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }

    /// Waits until a pod is Running and Ready; returns it.
    pub fn wait_ready(&self, ns: &str, name: &str, timeout: Duration) -> Result<Pod> {
        wait_until(&format!("pod {ns}/{name} to be Ready"), timeout, || {
            if let Some(p) = self.pod(ns, name) {
                if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed") {
                    return true;
                }
                return Self::is_ready(&p);
            }
            false
        })
        .with_context(|| format!("pod status: {:?}", self.pod(ns, name).and_then(|p| p.status)))?;
        let pod = self.pod(ns, name).context("pod vanished")?;
        if !Self::is_ready(&pod) {
            bail!("pod {ns}/{name} failed: {:?}", pod.status.and_then(|s| s.message));
        }
        Ok(pod)
    }

    /// Waits until pod `name` (in `default`) is a new one (not uid `old_uid`), Running and
    /// Ready; returns it.
    pub fn wait_replaced(&self, name: &str, old_uid: Option<&str>, timeout: Duration) -> Result<Pod> {
        wait_until(&format!("pod {name} to be replaced and Ready"), timeout, || {
            self.pod("default", name).is_some_and(|p| p.metadata.uid.as_deref() != old_uid && Self::is_ready(&p))
        })?;
        self.pod("default", name).context("pod vanished")
    }

    /// Waits until a pod (in `default`) is Running but not Ready; returns it.
    pub fn wait_not_ready(&self, name: &str, timeout: Duration) -> Result<Pod> {
        wait_until(&format!("pod {name} to be Running and not Ready"), timeout, || {
            self.pod("default", name).is_some_and(|p| !Self::is_ready(&p) && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        })?;
        self.pod("default", name).context("pod vanished")
    }

    /// `kubectl scale statefulset NAME --replicas N` in namespace default.
    pub fn scale_statefulset(&self, name: &str, replicas: i32) -> Result<()> {
        self.kubelet.scale_statefulset("default", name, replicas)
    }

    /// Deletes a pod as `kubectl delete pod` does: Terminating (SIGTERM) for at most its grace
    /// period, then gone; its StatefulSet recreates it (address per the IPAM). Returns the pod
    /// as the DELETE answered it (with its deletionTimestamp).
    pub fn delete_pod(&self, name: &str) -> Result<Pod> {
        self.kubelet.delete_pod("default", name).with_context(|| format!("no pod {name}"))
    }

    /// `kubectl delete pod --grace-period=0 --force`: the object goes at once, processes are
    /// killed.
    pub fn force_delete_pod(&self, name: &str) -> Result<Pod> {
        self.kubelet.delete_pod_with("default", name, Some(0)).with_context(|| format!("no pod {name}"))
    }

    /// Makes `taker`'s replacement get `freed`'s address (needs `IpAllocation::LowestFree`;
    /// e.g. freed `app-1`, taker `app-0`); see [`kubelet::Kubelet::replace_reusing_ip`].
    /// Returns (taker's old address, freed's old address = taker's new one).
    pub fn replace_reusing_ip(&self, freed: &str, taker: &str) -> Result<(IpAddr, IpAddr)> {
        self.kubelet.replace_reusing_ip("default", freed, taker)
    }

    /// Forces a pod's readiness checks to fail (`Some(false)`) or pass (`Some(true)`), or
    /// back to the real probes (`None`).
    pub fn force_readiness(&self, name: &str, result: Option<bool>) {
        self.kubelet.force_readiness("default", name, result)
    }

    /// A pod's HOME (shared by its containers; exec probes see it as `$HOME`).
    pub fn pod_home(&self, name: &str) -> Option<PathBuf> {
        self.kubelet.pod_home("default", name)
    }

    pub fn container_pid(&self, pod: &str, container: &str) -> Option<u32> {
        self.kubelet.container_pid("default", pod, container)
    }

    /// A command run inside a pod, like `kubectl exec`: the pod's network and UTS namespaces
    /// (so its host name), its cluster DNS (ERL_INETRC) and HOME.
    pub fn pod_exec(&self, pod: &str, program: &str) -> Result<Command> {
        let spec = self.pod("default", pod).and_then(|p| p.spec).context("no such pod")?;
        let pid = self.container_pid(pod, &spec.containers[0].name).context("pod not running")?;
        let mut cmd = Command::new("nsenter");
        cmd.args(["--target", &pid.to_string(), "--net", "--uts", "--", program])
            .env("ERL_INETRC", self.kubelet.pod_inetrc("default", pod).context("no inetrc")?)
            .env("HOME", self.pod_home(pod).context("no home")?);
        Ok(cmd)
    }

    /// Answers `verb resource` (e.g. "get", "pods") with 403 from now on, for every user.
    pub fn forbid(&self, verb: &str, resource: &str) {
        self.state.authz.deny(verb, resource);
    }

    /// Undoes every [`SimCluster::forbid`] (RBAC still applies).
    pub fn allow_all(&self) {
        self.state.authz.clear_denials();
    }

    /// Loads more RBAC objects (Role, ClusterRole, RoleBinding, ClusterRoleBinding).
    pub fn apply_rbac(&self, yaml: &str) -> Result<()> {
        for doc in kubelet::parse_manifest(yaml)? {
            anyhow::ensure!(self.state.authz.load(&doc)?, "not an RBAC object: {}", doc["kind"]);
        }
        Ok(())
    }

    /// Restarts the API server: every connection and port-forward drops; it is back on the
    /// same port after `down_for`.
    pub fn restart_api_server(&self, down_for: Duration) -> Result<()> {
        self.runtime.block_on(self.server.restart(down_for))
    }

    /// Stops the API server (connections refused; every watch and port-forward drops) until
    /// [`SimCluster::start_api_server`]. Pods and the store go on changing meanwhile.
    pub fn stop_api_server(&self) {
        let _guard = self.runtime.enter();
        self.server.stop();
    }

    pub fn start_api_server(&self) -> Result<()> {
        let _guard = self.runtime.enter();
        self.server.resume()
    }

    /// Compacts the watch history now (as etcd compaction does): a watch resuming from any
    /// older resourceVersion gets 410 Expired. Returns the current resourceVersion.
    pub fn compact_now(&self) -> u64 {
        self.state.store.compact_now()
    }

    pub fn set_history(&self, window: HistoryWindow) {
        self.state.store.set_window(window);
    }

    /// Makes the API server hang (see [`Hang`]); `Hang::None` ends it.
    pub fn hang_api_server(&self, hang: Hang) {
        self.state.set_hang(hang);
    }

    /// Drops (`true`) or stops dropping (`false`) every packet to the API server's address
    /// as the workstation dials it (an iptables DROP rule in that namespace).
    pub fn blackhole_api_server(&self, on: bool) -> Result<()> {
        let (ns, port) = &self.blackhole_at;
        let rule = ["INPUT", "-p", "tcp", "--dport", &port.to_string(), "-j", "DROP"];
        let run = |op: &str| {
            Command::new("nsenter").arg(format!("--net={}", ns.display())).args(["--", "iptables", "-w", op]).args(rule).output()
        };
        if on {
            crate::run(Command::new("nsenter").arg(format!("--net={}", ns.display())).args(["--", "iptables", "-w", "-I"]).args(rule))?;
        } else {
            // Remove every copy (bounded).
            for _ in 0..16 {
                if !run("-D")?.status.success() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Drops every open port-forward stream abruptly; returns how many.
    pub fn drop_port_forwards(&self) -> usize {
        self.state.drop_port_forwards()
    }

    pub fn active_port_forwards(&self) -> usize {
        self.state.active_port_forwards()
    }

    /// Port-forward upgrade requests so far per "NAMESPACE/POD", refused ones included.
    pub fn portforward_requests(&self) -> BTreeMap<String, usize> {
        self.state.portforward_requests()
    }

    /// `beamredir ARGS` in the workstation namespace, against this cluster's kubeconfig.
    pub fn beamredir(&self, state_dir: &Path) -> Command {
        let mut cmd = self.ws.command(beamredir_bin());
        cmd.env("KUBECONFIG", &self.kubeconfig).env("BEAMREDIR_STATE_DIR", state_dir);
        cmd
    }

    /// `kubectl --kubeconfig KUBECONFIG ARGS` in the workstation namespace.
    pub fn kubectl(&self, kubeconfig: &Path) -> Command {
        let mut cmd = self.ws.command("kubectl");
        cmd.arg("--kubeconfig").arg(kubeconfig);
        cmd
    }

    /// Refuses kubectl's SPDY-in-WebSocket port-forward from now on (400, as API servers
    /// before 1.30 answer it): kubectl falls back to plain SPDY/3.1.
    pub fn refuse_spdy_over_websocket(&self, refuse: bool) {
        self.state.spdy.refuse_websocket.store(refuse, Ordering::Relaxed);
    }

    /// SPDY port-forward connections accepted so far: (tunnelled in WebSocket, plain).
    pub fn spdy_connections(&self) -> (u64, u64) {
        let s = &self.state.spdy;
        (s.websocket_connections.load(Ordering::Relaxed), s.plain_connections.load(Ordering::Relaxed))
    }

    /// Starts `beamredir up --session SESSION ARGS…` in the foreground (stderr to `log`) and
    /// waits until the session answers `status`. Ended with SIGTERM when dropped.
    pub fn start_up_session(&self, state_dir: &Path, session: &str, args: &[&str], log: &Path) -> Result<crate::Graceful> {
        let child = self
            .beamredir(state_dir)
            .args(["up", "--session", session])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log)?)
            .spawn()?;
        let mut proc = crate::Graceful(child);
        wait_until("the up session", Duration::from_secs(30), || {
            if let Ok(Some(st)) = proc.0.try_wait() {
                panic!("beamredir up exited early ({st}): {}", std::fs::read_to_string(log).unwrap_or_default());
            }
            self.session_status(state_dir, session).is_some_and(|s| s["state"] == "running")
        })?;
        Ok(proc)
    }

    /// The `beamredir status --json` entry of a session, run in the workstation namespace.
    pub fn session_status(&self, state_dir: &Path, session: &str) -> Option<serde_json::Value> {
        let out = self.beamredir(state_dir).args(["status", "--json"]).output().ok()?;
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        all.as_array()?.iter().find(|s| s["name"] == session).cloned()
    }

    /// The API server's audit log: "VERB RESOURCE NS/NAME" per request, plus one line per
    /// extra authorization check (1.35's `create` on a WebSocket port-forward).
    pub fn audit(&self) -> Vec<String> {
        self.state.audit.lock().unwrap().clone()
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        self.kubelet.stop_all();
    }
}

/// A veth pair between two namespaces, each end with its address, both up.
fn link(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) -> Result<()> {
    let ip = |args: &[&str]| crate::run(Command::new("ip").args(args)).map(|_| ());
    ip(&["-n", a.name(), "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    ip(&["-n", a.name(), "addr", "add", a_addr, "dev", a_if])?;
    ip(&["-n", b.name(), "addr", "add", b_addr, "dev", b_if])?;
    ip(&["-n", a.name(), "link", "set", a_if, "up"])?;
    ip(&["-n", b.name(), "link", "set", b_if, "up"])
}

/// Runs a real tinyproxy (Debian's) in the proxy namespace: CONNECT to the API server's
/// port only, from the workstation's subnet only.
fn start_tinyproxy(ns: &Netns, dir: &Path) -> Result<Proc> {
    let conf = dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "User nobody\nGroup nogroup\nPort 8888\nListen {PROXY_ADDR}\nTimeout 3600\nMaxClients 200\nAllow 172.30.0.0/24\nConnectPort 6443\nDisableViaHeader Yes\nLogLevel Info\n"
        ),
    )?;
    let log = std::fs::File::create(dir.join("tinyproxy.log"))?;
    let child = ns
        .command("tinyproxy")
        .args(["-d", "-c"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting tinyproxy (is it installed? run scripts/setup.sh)")?;
    Ok(Proc(child))
}
