//! The kernel side, from userspace (root part): the eBPF programs and their maps
//! ([`redirect`]), and the cgroup2 hierarchy they attach to ([`cgroup`]).
pub mod cgroup;
pub mod redirect;
