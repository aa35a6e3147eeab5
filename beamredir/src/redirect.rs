//! The redirect programs and maps: loading the embedded eBPF object, attaching connect4 and
//! getpeername4 to a cgroup, and keeping the pod → forward map.
use std::{collections::BTreeMap, net::SocketAddrV4, os::fd::AsFd};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues},
    programs::{CgroupAttachMode, CgroupSockAddr},
};
use beamredir_common::{DEFAULT_MAX_REDIRECTS, Ipv4Endpoint, PROGRAMS, REDIRECT_COUNTS_MAP, REDIRECTS_MAP};

/// The eBPF object built by build.rs from `beamredir-ebpf`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/beamredir"));

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("loading the eBPF object failed: {0} (run `beamredir doctor`)")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program {name}: {source} (run `beamredir doctor`)")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("eBPF map {name}: {source}")]
    Map { name: &'static str, source: aya::maps::MapError },
    #[error("the eBPF object has no {0}; the build is broken")]
    Missing(&'static str),
    #[error("per-CPU counter values: {0}")]
    Io(std::io::Error),
    #[error("the redirect map is full ({0} entries)")]
    Full(u32),
}

#[derive(Clone, Copy, Debug)]
pub struct LoadOptions {
    /// Emit an aya-log debug record for each rewrite (beamredir -v).
    pub log_rewrites: bool,
    pub max_redirects: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self { log_rewrites: false, max_redirects: DEFAULT_MAX_REDIRECTS }
    }
}

/// Loaded (verified) programs and their maps. Dropping it detaches the programs; the kernel
/// also detaches them by itself if the process dies, since they are held by bpf_links.
pub struct Redirector {
    ebpf: Ebpf,
    redirects: HashMap<MapData, Ipv4Endpoint, Ipv4Endpoint>,
    counts: PerCpuHashMap<MapData, Ipv4Endpoint, u64>,
    max_redirects: u32,
    nr_cpus: usize,
}

impl Redirector {
    /// Loads both programs into the kernel (running the verifier) without attaching them.
    pub fn load(opts: LoadOptions) -> Result<Self, RedirectError> {
        // aya-log levels: 0 = off, 4 = debug. The global is read-only, so with 0 the verifier
        // prunes the logging code entirely.
        let log_level: u8 = if opts.log_rewrites { 4 } else { 0 };
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &log_level, true)
            .map_max_entries(REDIRECTS_MAP, opts.max_redirects)
            .map_max_entries(REDIRECT_COUNTS_MAP, opts.max_redirects)
            .load(EBPF_OBJECT)?;
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(RedirectError::Missing(name))?
                .try_into()
                .map_err(|source| RedirectError::Program { name, source })?;
            program.load().map_err(|source| RedirectError::Program { name, source })?;
        }
        let redirects = take_map(&mut ebpf, REDIRECTS_MAP)?;
        let counts = take_map(&mut ebpf, REDIRECT_COUNTS_MAP)?;
        let nr_cpus = aya::util::nr_cpus().unwrap_or(1);
        Ok(Self { ebpf, redirects, counts, max_redirects: opts.max_redirects, nr_cpus })
    }

    /// The eBPF object, for wiring up aya-log.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// Attaches every program (connect4/6, getpeername4/6) to a cgroup (a directory fd) through bpf_links. Links coexist
    /// with programs attached to parent cgroups: the kernel runs the child's first.
    pub fn attach(&mut self, cgroup: impl AsFd) -> Result<(), RedirectError> {
        for name in PROGRAMS {
            let program: &mut CgroupSockAddr = self
                .ebpf
                .program_mut(name)
                .ok_or(RedirectError::Missing(name))?
                .try_into()
                .map_err(|source| RedirectError::Program { name, source })?;
            program
                .attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(|source| RedirectError::Program { name, source })?;
        }
        Ok(())
    }

    /// Redirects connect() to `pod` towards `forward` (insert or update).
    pub fn insert(&mut self, pod: SocketAddrV4, forward: SocketAddrV4) -> Result<(), RedirectError> {
        let key = Ipv4Endpoint::from(pod);
        let zeros = PerCpuValues::try_from(vec![0u64; self.nr_cpus]).map_err(RedirectError::Io)?;
        // The counter first, so the program never redirects without counting. An existing
        // counter (an update of the target) keeps its value.
        if self.counts.get(&key, 0).is_err() {
            self.counts.insert(key, zeros, 0).map_err(|e| self.map_err(REDIRECT_COUNTS_MAP, e))?;
        }
        self.redirects
            .insert(key, Ipv4Endpoint::from(forward), 0)
            .map_err(|e| self.map_err(REDIRECTS_MAP, e))
    }

    /// Stops redirecting `pod`.
    pub fn remove(&mut self, pod: SocketAddrV4) -> Result<(), RedirectError> {
        let key = Ipv4Endpoint::from(pod);
        let _ = self.redirects.remove(&key);
        let _ = self.counts.remove(&key);
        Ok(())
    }

    /// Redirected connect() count per pod endpoint (summed over CPUs).
    pub fn counts(&self) -> BTreeMap<SocketAddrV4, u64> {
        self.counts
            .iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| (k.socket_addr(), per_cpu.iter().sum()))
            .collect()
    }

    /// Current map contents: pod endpoint → forward endpoint.
    pub fn entries(&self) -> BTreeMap<SocketAddrV4, SocketAddrV4> {
        self.redirects
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k.socket_addr(), v.socket_addr()))
            .collect()
    }

    fn map_err(&self, name: &'static str, e: aya::maps::MapError) -> RedirectError {
        match &e {
            aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                RedirectError::Full(self.max_redirects)
            }
            _ => RedirectError::Map { name, source: e },
        }
    }
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(RedirectError::Missing(name))?;
    T::try_from(map).map_err(|source| RedirectError::Map { name, source })
}
