//! Kubernetes access, kubectl-style (network part only: everything here reads data from the
//! cluster).
//!
//! * [`config`]: kubeconfig/context/namespace resolution; [`plugins`]: credential plugins
//!   found as the user's shell finds them; [`proxy`]: which proxy, as kubectl chooses it;
//!   [`client`]: the HTTP client (nodelay, keepalive, proxies, 32 KiB TLS reads); [`spares`]:
//!   connections kept ready while port-forwards are being opened; [`deadline`]: no request
//!   waits for ever;
//! * [`lookup`]: pods by name, selector, StatefulSet or Service;
//! * [`pod`]: what a pod object says (reachability, addresses, the Erlang container, ports);
//! * [`env`]: a container's environment and command line as the kubelet builds them;
//! * [`dns`]: the cluster DNS names of a pod, for every naming scheme;
//! * [`portforward`]: port-forward streams through the API server;
//! * [`cookie`]: where a pod's node gets its cookie (the spec, its Secrets and ConfigMaps),
//!   after `--cookie-file` and the user's own environment; [`secrets`]: reading one key;
//! * [`authz`], [`error`]: what went wrong, and what to grant.
pub mod authz;
pub mod client;
pub mod config;
pub mod cookie;
pub mod deadline;
pub mod dns;
pub mod env;
pub mod error;
pub mod lookup;
pub mod plugins;
pub mod pod;
pub mod portforward;
pub mod proxy;
pub mod secrets;
pub mod spares;

pub use config::{Cluster, KubeArgs};
pub use error::K8sError;
