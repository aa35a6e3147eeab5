//! beamredir: make pod IPs reachable from a local BEAM node by rewriting connect() with eBPF,
//! scoped to one cgroup per session, with port-forwards through the Kubernetes API server.
//!
//! A session has two parts (see [`privsep`]): a small root part and an unprivileged network
//! part. One module per concern:
//! * [`kernel`]: the eBPF programs and maps, and the cgroup2 hierarchy (root part);
//! * [`session`]: records, state directory, control socket, DNS files, commands in a session
//!   (root part);
//! * [`privsep`]: the split between the two parts and the channel between them;
//! * [`k8s`]: kubeconfig, the API client, pods, port-forward streams (network part);
//! * [`forward`]: local forwards, who may use them, and their bounds (network part);
//! * [`up`]: following pods and keeping redirects in step (network part);
//! * [`erlang`]: the EPMD protocol (and the Erlang side of connecting);
//! * [`mapping`]: one redirect and its command-line form; [`flags`]: durations as flags take them;
//! * [`doctor`]: checking the host can run beamredir.
pub mod doctor;
pub mod erlang;
pub mod flags;
pub mod forward;
pub mod k8s;
pub mod kernel;
pub mod mapping;
pub mod privsep;
pub mod session;
pub mod up;
