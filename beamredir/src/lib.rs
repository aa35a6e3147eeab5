//! beamredir: make pod IPs reachable from a local BEAM node by rewriting connect() with eBPF,
//! scoped to one cgroup per session.
//!
//! One module per concern:
//! * [`mapping`]: parsing `POD_IP:PORT=LOCAL_PORT` redirect specifications;
//! * [`redirect`]: the eBPF programs (connect4/getpeername4) and their maps;
//! * [`cgroup`]: the cgroup v2 hierarchy and session cgroups;
//! * [`session`]: session records, the control socket, stale-session cleanup;
//! * [`runas`]: running commands inside a session as the user who invoked sudo;
//! * [`doctor`]: checking the host can run beamredir.
pub mod cgroup;
pub mod control;
pub mod dns;
pub mod doctor;
pub mod epmd;
pub mod erlang;
pub mod forward;
pub mod k8s;
pub mod mapping;
pub mod redirect;
pub mod runas;
pub mod session;
pub mod up;
