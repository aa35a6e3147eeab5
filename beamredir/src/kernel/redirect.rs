//! The redirect programs and their maps: loading the embedded eBPF object, attaching the four
//! programs (connect4/6, getpeername4/6) to a cgroup, and keeping the pod → forward maps, their
//! reverse translations and the per-redirect counters in step.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use beamredir_common::{
    DEFAULT_MAX_REDIRECTS, Endpoint4, Endpoint6, PROGRAMS, REDIRECT_COUNTS_MAP, REDIRECTS4_MAP,
    REDIRECTS6_MAP, REVERSE4_MAP, REVERSE6_MAP, Redirect4, Redirect6, SESSION_NETNS_COOKIE_GLOBAL,
};

use crate::mapping::Mapping;

/// The eBPF object built by build.rs from `beamredir-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/beamredir"));

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("loading the eBPF object failed: {0} (run `beamredir doctor`)")]
    Load(#[from] aya::EbpfError),
    #[error(
        "eBPF program {name}: {} (run `beamredir -v doctor` for the verifier's log)",
        first_line(source)
    )]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("the eBPF object has no {0}; the build is broken")]
    Missing(&'static str),
    #[error("per-CPU counter values: {0}")]
    Io(std::io::Error),
    #[error("the redirect map is full ({0} entries); raise --max-redirects or follow fewer pods")]
    Full(u32),
    #[error(
        "redirect {0} mixes address families (an IPv4 pod needs an IPv4 forward, an IPv6 pod an IPv6 one)"
    )]
    MixedFamilies(Mapping),
}

/// The start of an error whose text may carry the whole verifier log.
fn first_line(e: &aya::programs::ProgramError) -> String {
    let text = e.to_string();
    log::debug!("{text}");
    let head = text
        .split("Verifier output:")
        .next()
        .unwrap_or(&text)
        .trim()
        .trim_end_matches('.');
    head.chars().take(300).collect()
}

#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Emit an aya-log debug record for each rewrite (beamredir -v).
    pub log_rewrites: bool,
    /// Capacity of each map and number of counter slots.
    pub max_redirects: u32,
    /// Translate only sockets of this network namespace (see [`netns_cookie`]); 0: any.
    pub netns_cookie: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            log_rewrites: false,
            max_redirects: DEFAULT_MAX_REDIRECTS,
            netns_cookie: 0,
        }
    }
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux ≥ 5.14), the
/// same value `bpf_get_netns_cookie` returns in the programs. None where the kernel lacks it.
pub fn netns_cookie() -> Option<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").ok()?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket fd and an out-buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize == std::mem::size_of::<u64>()).then_some(cookie)
}

/// Loaded (verified) programs and their maps. Dropping it detaches the programs; the kernel
/// also detaches them by itself if the process dies, since they are held by bpf_links.
pub struct Redirector {
    ebpf: Ebpf,
    redirects4: HashMap<MapData, Endpoint4, Redirect4>,
    redirects6: HashMap<MapData, Endpoint6, Redirect6>,
    reverse4: HashMap<MapData, Endpoint4, Endpoint4>,
    reverse6: HashMap<MapData, Endpoint6, Endpoint6>,
    counts: PerCpuArray<MapData, u64>,
    /// What the maps hold now, in the order it was set (the first mapping of a forward is its
    /// reverse translation), with each pod endpoint's counter slot.
    current: Vec<Mapping>,
    slots: Slots,
    max_redirects: u32,
    nr_cpus: usize,
}

/// Counter slots: one per pod endpoint, reused (zeroed) after the endpoint goes.
struct Slots {
    by_pod: BTreeMap<SocketAddr, u32>,
    free: BTreeSet<u32>,
    next: u32,
    max: u32,
}

impl Slots {
    fn get_or_alloc(&mut self, pod: SocketAddr) -> Option<(u32, bool)> {
        if let Some(s) = self.by_pod.get(&pod) {
            return Some((*s, false));
        }
        let slot = match self.free.pop_first() {
            Some(s) => s,
            None if self.next < self.max => {
                self.next += 1;
                self.next - 1
            }
            None => return None,
        };
        self.by_pod.insert(pod, slot);
        Some((slot, true))
    }

    fn release(&mut self, pod: &SocketAddr) {
        if let Some(s) = self.by_pod.remove(pod) {
            self.free.insert(s);
        }
    }
}

impl Redirector {
    /// Loads the programs into the kernel (running the verifier) without attaching them.
    pub fn load(opts: LoadOptions) -> Result<Self, RedirectError> {
        // aya-log levels: 0 = off, 4 = debug. The global is read-only, so with 0 the verifier
        // prunes the logging code entirely.
        let log_level: u8 = if opts.log_rewrites { 4 } else { 0 };
        let max = opts.max_redirects.max(1);
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &log_level, true)
            .override_global(SESSION_NETNS_COOKIE_GLOBAL, &opts.netns_cookie, true)
            .map_max_entries(REDIRECTS4_MAP, max)
            .map_max_entries(REDIRECTS6_MAP, max)
            .map_max_entries(REVERSE4_MAP, max)
            .map_max_entries(REVERSE6_MAP, max)
            .map_max_entries(REDIRECT_COUNTS_MAP, max)
            .load(EBPF_OBJECT)?;
        for name in PROGRAMS {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| RedirectError::Program { name, source })?;
        }
        Ok(Self {
            redirects4: take_map(&mut ebpf, REDIRECTS4_MAP)?,
            redirects6: take_map(&mut ebpf, REDIRECTS6_MAP)?,
            reverse4: take_map(&mut ebpf, REVERSE4_MAP)?,
            reverse6: take_map(&mut ebpf, REVERSE6_MAP)?,
            counts: take_map(&mut ebpf, REDIRECT_COUNTS_MAP)?,
            ebpf,
            current: Vec::new(),
            slots: Slots {
                by_pod: BTreeMap::new(),
                free: BTreeSet::new(),
                next: 0,
                max,
            },
            max_redirects: max,
            nr_cpus: aya::util::nr_cpus().map_err(|(_, e)| RedirectError::Io(e))?,
        })
    }

    /// The eBPF object, for wiring up aya-log.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches every program to a cgroup (a directory fd) through bpf_links. Links coexist
    /// with programs attached to parent cgroups: the kernel runs the child's first.
    pub fn attach(&mut self, cgroup: impl AsFd) -> Result<(), RedirectError> {
        for name in PROGRAMS {
            program(&mut self.ebpf, name)?
                .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| RedirectError::Program { name, source })?;
        }
        Ok(())
    }

    /// Makes the maps hold exactly `mappings`. Where several pod endpoints share a forward,
    /// the first one is what getpeername reports. On failure the previous contents are
    /// restored, so the maps never hold a half-applied set.
    pub fn set(&mut self, mappings: &[Mapping]) -> Result<(), RedirectError> {
        let previous = self.current.clone();
        match self.apply(mappings) {
            Ok(()) => Ok(()),
            Err(e) => {
                // `apply` stopped half-way. What it inserted for pod endpoints (and forwards)
                // that `previous` lacks is not in `current`, so re-applying `previous` alone
                // would leave those entries in the maps: redirects the record does not list,
                // and that nothing removes when their forward closes. Remove them first.
                let pods: BTreeSet<SocketAddr> = previous.iter().map(|m| m.pod).collect();
                let locals: BTreeSet<SocketAddr> = previous.iter().map(|m| m.local).collect();
                for m in mappings {
                    if !pods.contains(&m.pod) {
                        self.remove_entry(m);
                    }
                    if !locals.contains(&m.local) {
                        self.remove_reverse(m.local);
                    }
                }
                if let Err(undo) = self.apply(&previous) {
                    log::error!("restoring the redirect maps after a failed update: {undo}");
                }
                Err(e)
            }
        }
    }

    /// What the maps hold now.
    pub fn mappings(&self) -> &[Mapping] {
        &self.current
    }

    fn apply(&mut self, mappings: &[Mapping]) -> Result<(), RedirectError> {
        let wanted: BTreeSet<SocketAddr> = mappings.iter().map(|m| m.pod).collect();
        // Removals first: a forward that is going away must not stay reachable.
        for old in self.current.clone() {
            if !wanted.contains(&old.pod) {
                self.remove_entry(&old);
            }
        }
        let mut reverse_done = BTreeSet::new();
        for m in mappings {
            self.insert_entry(m, reverse_done.insert(m.local))?;
        }
        // Reverse entries of forwards no longer used by any mapping.
        let locals: BTreeSet<SocketAddr> = mappings.iter().map(|m| m.local).collect();
        let unused: Vec<SocketAddr> = self
            .current
            .iter()
            .map(|m| m.local)
            .filter(|l| !locals.contains(l))
            .collect();
        for local in unused {
            self.remove_reverse(local);
        }
        self.current = mappings.to_vec();
        Ok(())
    }

    fn insert_entry(&mut self, m: &Mapping, reverse: bool) -> Result<(), RedirectError> {
        let (slot, fresh) = self
            .slots
            .get_or_alloc(m.pod)
            .ok_or(RedirectError::Full(self.max_redirects))?;
        if fresh {
            // A reused slot starts from zero.
            let zeros =
                PerCpuValues::try_from(vec![0u64; self.nr_cpus]).map_err(RedirectError::Io)?;
            self.counts
                .set(slot, zeros, 0)
                .map_err(|e| self.map_err(REDIRECT_COUNTS_MAP, e))?;
        }
        let result = match (m.pod, m.local) {
            (SocketAddr::V4(pod), SocketAddr::V4(local)) => {
                let value = Redirect4 {
                    forward: local.into(),
                    slot,
                };
                self.redirects4
                    .insert(Endpoint4::from(pod), value, 0)
                    .map_err(|e| self.map_err(REDIRECTS4_MAP, e))?;
                if reverse {
                    self.reverse4
                        .insert(Endpoint4::from(local), Endpoint4::from(pod), 0)
                        .map_err(|e| self.map_err(REVERSE4_MAP, e))?;
                }
                Ok(())
            }
            (SocketAddr::V6(pod), SocketAddr::V6(local)) => {
                let value = Redirect6 {
                    forward: local.into(),
                    slot,
                };
                self.redirects6
                    .insert(Endpoint6::from(pod), value, 0)
                    .map_err(|e| self.map_err(REDIRECTS6_MAP, e))?;
                if reverse {
                    self.reverse6
                        .insert(Endpoint6::from(local), Endpoint6::from(pod), 0)
                        .map_err(|e| self.map_err(REVERSE6_MAP, e))?;
                }
                Ok(())
            }
            _ => Err(RedirectError::MixedFamilies(*m)),
        };
        if result.is_err() && fresh {
            self.slots.release(&m.pod);
        }
        result
    }

    fn remove_entry(&mut self, m: &Mapping) {
        match m.pod {
            SocketAddr::V4(pod) => {
                let _ = self.redirects4.remove(&Endpoint4::from(pod));
            }
            SocketAddr::V6(pod) => {
                let _ = self.redirects6.remove(&Endpoint6::from(pod));
            }
        }
        self.slots.release(&m.pod);
    }

    fn remove_reverse(&mut self, local: SocketAddr) {
        match local {
            SocketAddr::V4(l) => {
                let _ = self.reverse4.remove(&Endpoint4::from(l));
            }
            SocketAddr::V6(l) => {
                let _ = self.reverse6.remove(&Endpoint6::from(l));
            }
        }
    }

    /// Redirected connect() count per pod endpoint (summed over CPUs).
    pub fn counts(&self) -> BTreeMap<SocketAddr, u64> {
        self.slots
            .by_pod
            .iter()
            .map(|(pod, slot)| {
                (
                    *pod,
                    self.counts
                        .get(slot, 0)
                        .map(|v| v.iter().sum())
                        .unwrap_or(0),
                )
            })
            .collect()
    }

    /// The kernel maps' contents (pod endpoint → forward), read back from the kernel.
    pub fn entries(&self) -> BTreeMap<SocketAddr, SocketAddr> {
        let v4 = self.redirects4.iter().filter_map(Result::ok).map(|(k, v)| {
            (
                IpAddr::V4(k.addr()),
                k.port(),
                SocketAddr::V4(v.forward.socket_addr()),
            )
        });
        let v6 = self.redirects6.iter().filter_map(Result::ok).map(|(k, v)| {
            (
                IpAddr::V6(k.addr()),
                k.port(),
                SocketAddr::V6(v.forward.socket_addr()),
            )
        });
        v4.chain(v6)
            .map(|(ip, port, fwd)| (SocketAddr::new(ip, port), fwd))
            .collect()
    }

    fn map_err(&self, name: &'static str, e: aya::maps::MapError) -> RedirectError {
        match &e {
            aya::maps::MapError::SyscallError(s)
                if s.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                RedirectError::Full(self.max_redirects)
            }
            _ => RedirectError::Map { name, source: e },
        }
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, RedirectError> {
    ebpf.program_mut(name)
        .ok_or(RedirectError::Missing(name))?
        .try_into()
        .map_err(|source| RedirectError::Program { name, source })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(RedirectError::Missing(name))?;
    T::try_from(map).map_err(|source| RedirectError::Map { name, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed update leaves the maps exactly as they were (needs root: it loads the programs).
    #[test]
    fn a_failed_update_leaves_no_entry_behind() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: loading eBPF programs needs root");
            return;
        }
        let mut r = Redirector::load(LoadOptions {
            max_redirects: 2,
            ..LoadOptions::default()
        })
        .expect("load");
        let m = |s: &str| -> Mapping { s.parse().unwrap() };
        let a = m("10.244.250.1:4369=127.0.0.1:14001");
        r.set(&[a]).unwrap();
        // Three endpoints do not fit in two slots: the third fails after the second went in.
        let more = [a, m("10.244.250.2:4369=127.0.0.1:14002"), m("10.244.250.3:4369=127.0.0.1:14003")];
        assert!(matches!(r.set(&more), Err(RedirectError::Full(2))));
        assert_eq!(r.mappings(), &[a]);
        assert_eq!(r.entries(), BTreeMap::from([(a.pod, a.local)]));
        // And the freed slot is usable again.
        let b = more[1];
        r.set(&[a, b]).unwrap();
        assert_eq!(r.entries(), BTreeMap::from([(a.pod, a.local), (b.pod, b.local)]));
    }
}
