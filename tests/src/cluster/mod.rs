//! A simulated Kubernetes cluster that speaks the real wire protocol, for tests and the demo.
//!
//! * [`apiserver`]: HTTPS API server (bearer token, real JSON, watch, port-forward over WebSocket
//!   channels, and kubectl's SPDY/3.1 in [`spdy`]);
//! * [`kubelet`]: StatefulSet controller + kubelet running each pod as a network namespace
//!   with a real BEAM node;
//! * [`store`], [`selector`], [`pki`]: objects and resourceVersions, selectors, certificates
//!   and kubeconfig.
//!
//! The API server listens on 127.0.0.1 inside the *workstation* namespace, which has no route
//! to any pod IP: beamredir, running there, reaches pods only through port-forwards.
pub mod apiserver;
pub mod kubelet;
pub mod pki;
pub mod selector;
pub mod spdy;
pub mod store;

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Pod;

use crate::{Netns, TempDir, beamredir_bin, wait_until};

/// The example manifest from docs/examples (a 1-replica Elixir StatefulSet `app`).
pub const EXAMPLE_MANIFEST: &str = include_str!("../../../docs/examples/statefulset.yaml");

static NEXT_SUBNET: AtomicU32 = AtomicU32::new(0);

pub struct SimCluster {
    // Field order is drop order: stop serving, then the pods, then the namespaces.
    server: apiserver::ApiServer,
    pub state: Arc<apiserver::ApiState>,
    pub kubelet: Arc<kubelet::Kubelet>,
    runtime: tokio::runtime::Runtime,
    /// The workstation namespace: where the API server listens and beamredir runs.
    pub ws: Netns,
    pub kubeconfig: PathBuf,
    pub url: String,
    pub dir: TempDir,
}

impl SimCluster {
    /// Starts the API server and the pods of `manifest`, and waits until every pod is Ready.
    pub fn start(manifest: &str) -> Result<Self> {
        Self::start_with(manifest, true)
    }

    /// As [`SimCluster::start`]; with `wait_ready` false, pods that never get Ready are fine.
    pub fn start_with(manifest: &str, wait_ready: bool) -> Result<Self> {
        crate::require_root()?;
        let dir = TempDir::new("brsim")?;
        let ws = Netns::new("brws")?;
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let subnet = 100 + ((std::process::id() + NEXT_SUBNET.fetch_add(1, Ordering::Relaxed) * 7) % 150) as u8;
        let store = Arc::new(store::Store::new());
        let kubelet = Arc::new(kubelet::Kubelet::new(store.clone(), subnet, dir.path().to_path_buf())?);
        let pki = pki::Pki::generate()?;
        let token = pki::random_token()?;
        let state = Arc::new(apiserver::ApiState::new(store, kubelet.clone(), token.clone()));
        let server = runtime.block_on(apiserver::ApiServer::start(state.clone(), pki.server_config.clone(), ws.path()))?;
        let url = format!("https://{}", server.addr);
        let kubeconfig = dir.path().join("kubeconfig");
        pki::write_kubeconfig(&kubeconfig, &url, &pki.ca_pem, &token)?;
        let cluster = SimCluster { server, state, kubelet, runtime, ws, kubeconfig, url, dir };
        let pods = cluster.kubelet.apply_manifest(manifest)?;
        for (ns, name) in pods.iter().filter(|_| wait_ready) {
            cluster.wait_ready(ns, name, Duration::from_secs(90))?;
        }
        Ok(cluster)
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Pod> {
        self.state.store.get_pod(ns, name)
    }

    pub fn pod_ip(&self, name: &str) -> Option<Ipv4Addr> {
        self.pod("default", name)?.status?.pod_ip?.parse().ok()
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
        })?;
        let pod = self.pod(ns, name).context("pod vanished")?;
        if !Self::is_ready(&pod) {
            bail!("pod {ns}/{name} failed: {:?}", pod.status.and_then(|s| s.message));
        }
        Ok(pod)
    }

    /// Deletes a pod; its StatefulSet recreates it with a new IP. Returns the old pod.
    pub fn delete_pod(&self, name: &str) -> Result<Pod> {
        self.kubelet.delete_pod("default", name).with_context(|| format!("no pod {name}"))
    }

    /// Answers `verb resource` (e.g. "get", "pods") with 403 from now on.
    pub fn forbid(&self, verb: &str, resource: &str) {
        self.state.forbidden.lock().unwrap().insert((verb.into(), resource.into()));
    }

    pub fn allow_all(&self) {
        self.state.forbidden.lock().unwrap().clear();
    }

    /// Restarts the API server: every connection and port-forward drops; it is back on the
    /// same port after `down_for`.
    pub fn restart_api_server(&self, down_for: Duration) -> Result<()> {
        self.runtime.block_on(self.server.restart(down_for))
    }

    /// Drops every open port-forward stream abruptly; returns how many.
    pub fn drop_port_forwards(&self) -> usize {
        self.state.drop_port_forwards()
    }

    pub fn active_port_forwards(&self) -> usize {
        self.state.active_port_forwards()
    }

    /// `kubectl ARGS` in the workstation namespace, against this cluster's kubeconfig.
    pub fn kubectl(&self) -> Command {
        let mut cmd = self.ws.command("kubectl");
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
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

    /// `beamredir ARGS` in the workstation namespace, against this cluster's kubeconfig.
    pub fn beamredir(&self, state_dir: &std::path::Path) -> Command {
        let mut cmd = self.ws.command(beamredir_bin());
        cmd.env("KUBECONFIG", &self.kubeconfig).env("BEAMREDIR_STATE_DIR", state_dir);
        cmd
    }

    /// Starts `beamredir up --session SESSION ARGS…` in the foreground (stderr to `log`) and
    /// waits until the session answers `status`. Ended with SIGTERM when dropped.
    pub fn start_up_session(&self, state_dir: &std::path::Path, session: &str, args: &[&str], log: &std::path::Path) -> Result<crate::Graceful> {
        let child = self
            .beamredir(state_dir)
            .args(["up", "--session", session])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
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
    pub fn session_status(&self, state_dir: &std::path::Path, session: &str) -> Option<serde_json::Value> {
        let out = self.beamredir(state_dir).args(["status", "--json"]).output().ok()?;
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        all.as_array()?.iter().find(|s| s["name"] == session).cloned()
    }

    /// The API server's audit log ("VERB RESOURCE NS/NAME" per request).
    pub fn audit(&self) -> Vec<String> {
        self.state.audit.lock().unwrap().clone()
    }
}

impl Drop for SimCluster {
    fn drop(&mut self) {
        self.kubelet.stop_all();
    }
}
