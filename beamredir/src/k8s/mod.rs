//! Kubernetes access, kubectl-style: kubeconfig/context/namespace resolution ([`config`]),
//! pod lookup and Erlang port discovery ([`pod`]), and port-forward streams through the API
//! server ([`portforward`]).
pub mod config;
pub mod error;
pub mod pod;
pub mod portforward;

pub use config::{Cluster, KubeArgs};
pub use error::K8sError;
