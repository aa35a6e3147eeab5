//! The root part's side of the channel: it creates the loopback listeners the forwards use and
//! turns the network part's requests into checked redirects and host names. It never parses
//! bytes from the cluster; what it gets from the network part is typed, bounded and checked
//! here before it reaches the kernel maps or the state directory.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    os::fd::{AsFd, OwnedFd},
};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, listen, socket,
};

use super::messages::{Family, ListenerId, RedirectSpec};
use crate::{
    mapping::{Mapping, is_pod_address},
    session::dns_files::{HostEntry, validate_hosts},
};

/// How many connections may wait in a forward's accept queue (the kernel caps it at somaxconn).
const BACKLOG: i32 = 4096;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("listener {0} was not created by the root part (or is closed)")]
    UnknownListener(ListenerId),
    #[error("{0} is not a pod address (loopback, unspecified, multicast or broadcast)")]
    NotAPod(SocketAddr),
    #[error("{pod} cannot be redirected to {local}: the address families differ")]
    Family { pod: SocketAddr, local: SocketAddr },
    #[error("{0} is redirected twice")]
    Duplicate(SocketAddr),
    #[error("{count} redirects asked for; the session holds at most {max} (--max-redirects)")]
    TooManyRedirects { count: usize, max: usize },
    #[error(
        "{max} listeners are open already (the bound is --max-redirects, or the root part's open-file limit less a reserve)"
    )]
    TooManyListeners { max: usize },
    #[error("host names: {0}")]
    Hosts(String),
    #[error("cannot listen on loopback: {0}")]
    Listen(String),
}

/// The listeners root created, by id. Root keeps its own copy of each until every redirect to
/// it is gone, so no redirect ever points at a port nobody listens on (where any local user
/// could bind and receive the session's connections).
pub struct Listeners {
    next: ListenerId,
    open: BTreeMap<ListenerId, (TcpListener, SocketAddr)>,
    max: usize,
}

/// Descriptors the root part keeps for its own work (control socket and its clients, record
/// and DNS file writes, cgroup files, eBPF objects) whatever the network part asks for.
const FD_RESERVE: u64 = 128;

impl Listeners {
    /// At most `max` listeners, and never so many that root runs out of descriptors for its
    /// own work: each listener holds one in the root part.
    pub fn new(max: usize) -> Self {
        let budget = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft.saturating_sub(FD_RESERVE).max(16))
            .unwrap_or(u64::MAX);
        Listeners {
            next: 1,
            open: BTreeMap::new(),
            max: max.min(usize::try_from(budget).unwrap_or(usize::MAX)),
        }
    }

    /// Creates a listener on 127.0.0.1 or [::1] (an ephemeral port).
    pub fn open(
        &mut self,
        family: Family,
    ) -> Result<(ListenerId, SocketAddr, &TcpListener), Refusal> {
        if self.open.len() >= self.max {
            return Err(Refusal::TooManyListeners { max: self.max });
        }
        let listener = loopback_listener(family).map_err(|e| Refusal::Listen(e.to_string()))?;
        let local = listener
            .local_addr()
            .map_err(|e| Refusal::Listen(e.to_string()))?;
        let id = self.next;
        self.next += 1;
        let entry = self.open.entry(id).or_insert((listener, local));
        Ok((id, local, &entry.0))
    }

    pub fn local(&self, id: ListenerId) -> Option<SocketAddr> {
        self.open.get(&id).map(|(_, a)| *a)
    }

    /// Closes root's copy. The caller removes the redirects to it first.
    pub fn close(&mut self, id: ListenerId) -> Option<SocketAddr> {
        self.open.remove(&id).map(|(_, a)| a)
    }

    /// Checked redirects: known listeners, pod addresses, matching families, no duplicates.
    pub fn resolve(&self, specs: &[RedirectSpec], max: usize) -> Result<Vec<Mapping>, Refusal> {
        if specs.len() > max {
            return Err(Refusal::TooManyRedirects {
                count: specs.len(),
                max,
            });
        }
        let mut seen = std::collections::HashSet::new();
        specs
            .iter()
            .map(|s| {
                let local = self
                    .local(s.listener)
                    .ok_or(Refusal::UnknownListener(s.listener))?;
                if !is_pod_address(s.pod.ip()) || s.pod.port() == 0 {
                    return Err(Refusal::NotAPod(s.pod));
                }
                if s.pod.is_ipv4() != local.is_ipv4() {
                    return Err(Refusal::Family { pod: s.pod, local });
                }
                if !seen.insert(s.pod) {
                    return Err(Refusal::Duplicate(s.pod));
                }
                Ok(Mapping { pod: s.pod, local })
            })
            .collect()
    }
}

pub fn check_hosts(hosts: &[HostEntry]) -> Result<(), Refusal> {
    validate_hosts(hosts).map_err(|e| Refusal::Hosts(e.to_string()))
}

/// A listening socket with a deep accept queue (std's listen backlog is 128: a burst of a
/// thousand connects would wait for SYN retries).
fn loopback_listener(family: Family) -> std::io::Result<TcpListener> {
    let (af, addr) = match family {
        Family::V4 => (
            AddressFamily::Inet,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
        ),
        Family::V6 => (
            AddressFamily::Inet6,
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), 0),
        ),
    };
    let fd: OwnedFd = socket(af, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    match addr {
        SocketAddr::V4(a) => bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => bind(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn6::from(a))?,
    }
    listen(
        &fd.as_fd(),
        Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN),
    )?;
    Ok(TcpListener::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_own_listeners_and_pod_addresses() {
        let mut l = Listeners::new(4);
        let (id4, local4, _) = l.open(Family::V4).unwrap();
        assert!(local4.ip().is_loopback());
        let pod: SocketAddr = "10.244.0.5:4369".parse().unwrap();
        assert_eq!(
            l.resolve(&[RedirectSpec { pod, listener: id4 }], 10)
                .unwrap(),
            vec![Mapping { pod, local: local4 }]
        );
        assert_eq!(
            l.resolve(&[RedirectSpec { pod, listener: 99 }], 10),
            Err(Refusal::UnknownListener(99))
        );
        let lo: SocketAddr = "127.0.0.1:22".parse().unwrap();
        assert_eq!(
            l.resolve(
                &[RedirectSpec {
                    pod: lo,
                    listener: id4
                }],
                10
            ),
            Err(Refusal::NotAPod(lo))
        );
        let mc: SocketAddr = "224.0.0.5:1".parse().unwrap();
        assert_eq!(
            l.resolve(
                &[RedirectSpec {
                    pod: mc,
                    listener: id4
                }],
                10
            ),
            Err(Refusal::NotAPod(mc))
        );
        let v6pod: SocketAddr = "[fd00::5]:4369".parse().unwrap();
        assert!(matches!(
            l.resolve(
                &[RedirectSpec {
                    pod: v6pod,
                    listener: id4
                }],
                10
            ),
            Err(Refusal::Family { .. })
        ));
        assert!(matches!(
            l.resolve(&[RedirectSpec { pod, listener: id4 }; 2], 10),
            Err(Refusal::Duplicate(_))
        ));
        assert!(matches!(
            l.resolve(&[RedirectSpec { pod, listener: id4 }; 2], 1),
            Err(Refusal::TooManyRedirects { .. })
        ));
        l.close(id4);
        assert_eq!(
            l.resolve(&[RedirectSpec { pod, listener: id4 }], 10),
            Err(Refusal::UnknownListener(id4))
        );
        for _ in 0..4 {
            l.open(Family::V4).unwrap();
        }
        assert!(matches!(
            l.open(Family::V4),
            Err(Refusal::TooManyListeners { .. })
        ));
    }
}
