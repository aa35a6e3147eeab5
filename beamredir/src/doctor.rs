//! `beamredir doctor`: can this host run beamredir, and if not, which kernel feature is missing.
//!
//! Every feature beamredir needs is probed on its own by using it: a map of each type is
//! created, a tiny program is loaded for each attach type, one calls each helper, one is
//! attached to a scratch cgroup through a bpf_link and detached by closing it, a socket option
//! is read and a loopback socket is looked up through sock_diag. So a failing line names the
//! feature, and its fix names the kernel that added it (see docs/kernels.md, which has the
//! commits). The kernel version is printed, but decides nothing: distribution kernels backport.
//! Last, beamredir's own programs are loaded and attached, as a session would.
//!
//! The probes talk to bpf(2) directly (instructions built here, no eBPF object), so this module
//! does not depend on how beamredir's programs are written.
use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    forward::peer::{PeerInfo, PeerLookup},
    kernel::{
        cgroup::{Hierarchy, find_cgroup2_mount},
        redirect::{LoadOptions, Redirector},
    },
};

pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// What to do when the check fails.
    pub fix: &'static str,
}

fn check(name: &'static str, result: Result<String, String>, fix: &'static str) -> Check {
    match result {
        Ok(detail) => Check { name, ok: true, detail, fix },
        Err(detail) => Check { name, ok: false, detail, fix },
    }
}

/// Runs every check; `scratch_dir` is where a private cgroup2 mount may go.
pub fn run(scratch_dir: &Path) -> Vec<Check> {
    let mut checks = Vec::new();
    let euid = nix::unistd::geteuid();
    checks.push(check(
        "root",
        if euid.is_root() { Ok("running as root".into()) } else { Err(format!("running as uid {euid}")) },
        "run beamredir with sudo (it needs CAP_BPF, CAP_NET_ADMIN and cgroup writes)",
    ));
    let uname = nix::sys::utsname::uname().ok();
    let release = uname.as_ref().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    let version = uname.as_ref().map(|u| u.version().to_string_lossy().into_owned()).unwrap_or_default();
    checks.push(check(
        "kernel",
        Ok(format!("{release} ({version}); the lines below decide, not the version")),
        "",
    ));
    checks.push(check(
        "cgroup2",
        match find_cgroup2_mount() {
            Ok(Some(p)) => Ok(format!("mounted at {}", p.display())),
            Ok(None) => Err("no cgroup2 mount visible (beamredir will try to mount one privately)".into()),
            Err(e) => Err(e.to_string()),
        },
        "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup/unified); under `ip netns exec`, use nsenter --net=... instead",
    ));
    checks.push(check(
        "BTF (not needed)",
        Ok(if Path::new("/sys/kernel/btf/vmlinux").exists() {
            "/sys/kernel/btf/vmlinux present; beamredir does not use it (no CO-RE relocations)".into()
        } else {
            "/sys/kernel/btf/vmlinux absent: fine, beamredir does not use it (no CO-RE relocations)".into()
        }),
        "",
    ));
    if !euid.is_root() {
        return checks;
    }

    let syscall = probe_map(MAP_HASH, 8, 8, 1, 0);
    let syscall_ok = syscall.is_ok();
    checks.push(check(
        "bpf() syscall",
        syscall.map(|_| "a map can be created".into()),
        "the kernel needs CONFIG_BPF_SYSCALL=y; EPERM: check the lockdown mode (integrity allows BPF) and that you are really root",
    ));
    if !syscall_ok {
        return checks;
    }
    checks.push(check(
        "map: hash",
        probe_map(MAP_HASH, 8, 8, 16, 0).map(|_| "BPF_MAP_TYPE_HASH (the redirect table)".into()),
        "BPF_MAP_TYPE_HASH is in every eBPF kernel (3.19); check CONFIG_BPF_SYSCALL and the memlock limit",
    ));
    checks.push(check(
        "map: per-CPU array",
        probe_map(MAP_PERCPU_ARRAY, 4, 8, 16, 0).map(|_| "BPF_MAP_TYPE_PERCPU_ARRAY (the counters)".into()),
        "BPF_MAP_TYPE_PERCPU_ARRAY needs Linux >= 4.6",
    ));
    checks.push(check(
        "map: ring buffer",
        probe_map(MAP_RINGBUF, 0, 0, 4096.max(page_size()), 0).map(|_| "BPF_MAP_TYPE_RINGBUF (aya-log's AYA_LOGS, for -v)".into()),
        "BPF_MAP_TYPE_RINGBUF (used by aya-log) needs Linux >= 5.8",
    ));
    checks.push(check(
        "read-only global data",
        probe_rodata(),
        "read-only, frozen array maps (BPF_F_RDONLY_PROG, BPF_MAP_FREEZE: aya's .rodata for the log level and config) need Linux >= 5.2",
    ));
    let mut connect4 = None;
    for (name, attach, what, fix) in [
        ("hook: connect4", ATTACH_INET4_CONNECT, "cgroup/connect4 loads", "BPF_PROG_TYPE_CGROUP_SOCK_ADDR with BPF_CGROUP_INET4_CONNECT needs Linux >= 4.17 and CONFIG_CGROUP_BPF=y"),
        ("hook: connect6", ATTACH_INET6_CONNECT, "cgroup/connect6 loads", "BPF_CGROUP_INET6_CONNECT needs Linux >= 4.17, CONFIG_CGROUP_BPF=y and IPv6"),
        ("hook: getpeername4", ATTACH_INET4_GETPEERNAME, "cgroup/getpeername4 loads", "BPF_CGROUP_INET4_GETPEERNAME needs Linux >= 5.8"),
        ("hook: getpeername6", ATTACH_INET6_GETPEERNAME, "cgroup/getpeername6 loads", "BPF_CGROUP_INET6_GETPEERNAME needs Linux >= 5.8"),
    ] {
        let loaded = load_sock_addr(attach, &[mov64_imm(0, 1), exit()]);
        checks.push(check(name, loaded.as_ref().map(|_| what.into()).map_err(Clone::clone), fix));
        if attach == ATTACH_INET4_CONNECT {
            connect4 = loaded.ok();
        }
    }
    checks.push(check(
        "helper: get_netns_cookie",
        load_sock_addr(ATTACH_INET4_CONNECT, &[call(HELPER_GET_NETNS_COOKIE), mov64_imm(0, 1), exit()])
            .map(|_| "callable from cgroup/connect4".into()),
        "bpf_get_netns_cookie() for sock_addr programs needs Linux >= 5.7",
    ));
    checks.push(check(
        "helper: lookup, atomic add",
        probe_lookup_and_add(),
        "bpf_map_lookup_elem() and BPF_ATOMIC add (BPF_XADD) on a map value are in every eBPF kernel; the log above says why the verifier refused",
    ));

    // A scratch cgroup for the attach probes, removed again whatever happens.
    let scratch = Scratch::create(scratch_dir);
    checks.push(check(
        "bpf_link for cgroups",
        match (&scratch, &connect4) {
            (Err(e), _) => Err(format!("no scratch cgroup: {e}")),
            (_, None) => Err("nothing to attach (cgroup/connect4 did not load)".into()),
            (Ok(s), Some(prog)) => probe_link(prog, &s.dir),
        },
        "BPF_LINK_CREATE for cgroups (what detaches beamredir's programs when it dies, even by SIGKILL) needs Linux >= 5.7",
    ));
    checks.push(check(
        "SO_NETNS_COOKIE",
        probe_netns_cookie(),
        "getsockopt(SO_NETNS_COOKIE) needs Linux >= 5.14",
    ));
    checks.push(check(
        "INET_DIAG_CGROUP_ID",
        probe_inet_diag_cgroup_id(),
        "an exact sock_diag lookup needs CONFIG_INET_DIAG and CONFIG_INET_TCP_DIAG (modules inet_diag, tcp_diag: `modprobe tcp_diag`); the INET_DIAG_CGROUP_ID attribute needs Linux >= 5.8",
    ));

    let loaded = Redirector::load(LoadOptions::default());
    checks.push(check(
        "beamredir programs load",
        loaded.as_ref().map(|_| "connect4/6 and getpeername4/6 pass the verifier".into()).map_err(|e| format!("{e}")),
        "a line above names the missing feature; if none does, run with RUST_LOG=debug and look at the verifier log",
    ));
    if let Ok(mut redirector) = loaded {
        checks.push(check(
            "beamredir programs attach",
            match &scratch {
                Ok(s) => redirector.attach(&s.dir).map(|()| "attached to a scratch cgroup and detached".into()).map_err(|e| e.to_string()),
                Err(e) => Err(format!("no scratch cgroup: {e}")),
            },
            "the kernel needs CONFIG_CGROUP_BPF=y",
        ));
        drop(redirector); // detaches before the scratch cgroup goes
    }
    if let Ok(s) = scratch {
        if let Err(e) = s.remove() {
            checks.push(check("scratch cgroup removed", Err(e), "remove it by hand (rmdir)"));
        }
    }
    checks
}

/// `/beamredir/.doctor-PID`, for attaching programs to.
struct Scratch {
    hierarchy: Hierarchy,
    rel: String,
    dir: std::fs::File,
}

impl Scratch {
    fn create(scratch_dir: &Path) -> Result<Self, String> {
        let hierarchy = Hierarchy::open(scratch_dir).map_err(|e| e.to_string())?;
        let rel = hierarchy.create_session_cgroup(&format!(".doctor-{}", std::process::id())).map_err(|e| e.to_string())?;
        match hierarchy.open_dir(&rel) {
            Ok(dir) => Ok(Scratch { hierarchy, rel, dir }),
            Err(e) => {
                let _ = hierarchy.remove_session_cgroup(&rel, "/");
                Err(e.to_string())
            }
        }
    }

    fn remove(self) -> Result<(), String> {
        let Scratch { hierarchy, rel, dir } = self;
        drop(dir);
        hierarchy.remove_session_cgroup(&rel, "/").map_err(|e| e.to_string())
    }
}

// ---- bpf(2), by hand ---------------------------------------------------------------------
// Numbers from include/uapi/linux/bpf.h (stable ABI).

const CMD_MAP_CREATE: libc::c_long = 0;
const CMD_PROG_LOAD: libc::c_long = 5;
const CMD_PROG_QUERY: libc::c_long = 16;
const CMD_MAP_FREEZE: libc::c_long = 22;
const CMD_LINK_CREATE: libc::c_long = 28;

const MAP_HASH: u32 = 1;
const MAP_ARRAY: u32 = 2;
const MAP_PERCPU_ARRAY: u32 = 6;
const MAP_RINGBUF: u32 = 27;
const F_RDONLY_PROG: u32 = 1 << 7;

const PROG_CGROUP_SOCK_ADDR: u32 = 18;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_INET6_CONNECT: u32 = 11;
const ATTACH_INET4_GETPEERNAME: u32 = 29;
const ATTACH_INET6_GETPEERNAME: u32 = 30;

const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_GET_NETNS_COOKIE: i32 = 122;

/// A `union bpf_attr`, zero-filled. 128 bytes cover every command used here; the kernel accepts
/// a larger attr as long as the bytes it does not know are zero.
#[repr(C, align(8))]
struct Attr([u8; 128]);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32(mut self, offset: usize, value: u32) -> Self {
        self.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
        self
    }
    fn u64(mut self, offset: usize, value: u64) -> Self {
        self.0[offset..offset + 8].copy_from_slice(&value.to_ne_bytes());
        self
    }
    fn read_u32(&self, offset: usize) -> u32 {
        u32::from_ne_bytes(self.0[offset..offset + 4].try_into().unwrap())
    }
}

fn sys_bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, writable buffer of the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), attr.0.len()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

fn sys_bpf_fd(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    // SAFETY: these commands return a new file descriptor that nothing else owns.
    sys_bpf(cmd, attr).map(|fd| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn errno_text(e: &io::Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EINVAL) => "EINVAL: not known to this kernel",
        Some(libc::EPERM) => "EPERM",
        Some(libc::ENOSYS) => "ENOSYS: no bpf() syscall",
        Some(libc::E2BIG) => "E2BIG: the kernel does not know these attributes",
        Some(libc::EACCES) => "EACCES: refused by the verifier",
        _ => "",
    };
    if name.is_empty() { e.to_string() } else { format!("{name} ({e})") }
}

fn page_size() -> u32 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as u32
}

fn probe_map(map_type: u32, key_size: u32, value_size: u32, max_entries: u32, flags: u32) -> Result<OwnedFd, String> {
    let mut attr = Attr::new().u32(0, map_type).u32(4, key_size).u32(8, value_size).u32(12, max_entries).u32(16, flags);
    sys_bpf_fd(CMD_MAP_CREATE, &mut attr).map_err(|e| format!("creating the map: {}", errno_text(&e)))
}

fn probe_rodata() -> Result<String, String> {
    let map = probe_map(MAP_ARRAY, 4, 8, 1, F_RDONLY_PROG).map_err(|e| format!("BPF_F_RDONLY_PROG array: {e}"))?;
    let mut attr = Attr::new().u32(0, map.as_raw_fd() as u32);
    sys_bpf(CMD_MAP_FREEZE, &mut attr).map_err(|e| format!("BPF_MAP_FREEZE: {}", errno_text(&e)))?;
    Ok("BPF_F_RDONLY_PROG array map, frozen".into())
}

/// One eBPF instruction (little-endian layout: code, dst|src<<4, off, imm).
type Insn = [u8; 8];

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = dst | (src << 4);
    i[2..4].copy_from_slice(&off.to_le_bytes());
    i[4..8].copy_from_slice(&imm.to_le_bytes());
    i
}
fn mov64_imm(dst: u8, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm) // BPF_ALU64 | BPF_MOV | BPF_K
}
fn mov64_reg(dst: u8, src: u8) -> Insn {
    insn(0xbf, dst, src, 0, 0) // BPF_ALU64 | BPF_MOV | BPF_X
}
fn add64_imm(dst: u8, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm) // BPF_ALU64 | BPF_ADD | BPF_K
}
fn store32_imm(dst: u8, off: i16, imm: i32) -> Insn {
    insn(0x62, dst, 0, off, imm) // BPF_ST | BPF_MEM | BPF_W
}
fn jeq_imm(dst: u8, imm: i32, off: i16) -> Insn {
    insn(0x15, dst, 0, off, imm) // BPF_JMP | BPF_JEQ | BPF_K
}
fn atomic_add64(dst: u8, src: u8, off: i16) -> Insn {
    insn(0xdb, dst, src, off, 0) // BPF_STX | BPF_ATOMIC (ex BPF_XADD) | BPF_DW, imm = BPF_ADD
}
fn call(helper: i32) -> Insn {
    insn(0x85, 0, 0, 0, helper) // BPF_JMP | BPF_CALL
}
fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0) // BPF_JMP | BPF_EXIT
}
/// `dst = map` (BPF_LD | BPF_IMM | BPF_DW with BPF_PSEUDO_MAP_FD): two instructions.
fn ld_map_fd(dst: u8, fd: i32) -> [Insn; 2] {
    [insn(0x18, dst, 1, 0, fd), [0; 8]]
}

/// Loads a BPF_PROG_TYPE_CGROUP_SOCK_ADDR program for `attach`. On failure the error says
/// why, with the verifier's last words if it got that far.
fn load_sock_addr(attach: u32, insns: &[Insn]) -> Result<OwnedFd, String> {
    let code: Vec<u8> = insns.concat();
    let license = b"Dual MIT/GPL\0";
    let attr = |log: &mut [u8]| {
        Attr::new()
            .u32(0, PROG_CGROUP_SOCK_ADDR)
            .u32(4, insns.len() as u32)
            .u64(8, code.as_ptr() as u64)
            .u64(16, license.as_ptr() as u64)
            .u32(24, if log.is_empty() { 0 } else { 1 })
            .u32(28, log.len() as u32)
            .u64(32, if log.is_empty() { 0 } else { log.as_mut_ptr() as u64 })
            .u32(68, attach)
    };
    let err = match sys_bpf_fd(CMD_PROG_LOAD, &mut attr(&mut [])) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    // Again with the verifier log, for the reason.
    let mut log = vec![0u8; 64 * 1024];
    let _ = sys_bpf_fd(CMD_PROG_LOAD, &mut attr(&mut log));
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let last: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("processed ")).collect();
    match last.last() {
        Some(line) => Err(format!("{}; verifier: {}", errno_text(&err), line.trim())),
        None => Err(errno_text(&err)),
    }
}

/// The counter pattern: look a value up in a per-CPU array and add to it atomically.
fn probe_lookup_and_add() -> Result<String, String> {
    let map = probe_map(MAP_PERCPU_ARRAY, 4, 8, 1, 0)?;
    let [ld0, ld1] = ld_map_fd(1, map.as_raw_fd());
    load_sock_addr(
        ATTACH_INET4_CONNECT,
        &[
            store32_imm(10, -4, 0), // key = 0 on the stack
            ld0,
            ld1,
            mov64_reg(2, 10),
            add64_imm(2, -4),
            call(HELPER_MAP_LOOKUP_ELEM),
            jeq_imm(0, 0, 2),
            mov64_imm(1, 1),
            atomic_add64(0, 1, 0), // lock *(u64 *)(r0 + 0) += r1
            mov64_imm(0, 1),
            exit(),
        ],
    )
    .map(|_| "bpf_map_lookup_elem + lock *(u64 *)(value) += 1 in cgroup/connect4".into())
}

/// Programs attached to `cgroup` for `attach_type` (BPF_PROG_QUERY).
fn attached_count(cgroup: &impl AsFd, attach_type: u32) -> Result<u32, String> {
    let mut attr = Attr::new().u32(0, cgroup.as_fd().as_raw_fd() as u32).u32(4, attach_type);
    sys_bpf(CMD_PROG_QUERY, &mut attr).map_err(|e| format!("BPF_PROG_QUERY: {}", errno_text(&e)))?;
    Ok(attr.read_u32(24))
}

/// Attaches `prog` to `cgroup` through a bpf_link, then closes the link: the kernel must
/// detach the program (as it does when the process holding the link dies).
fn probe_link(prog: &OwnedFd, cgroup: &std::fs::File) -> Result<String, String> {
    let before = attached_count(cgroup, ATTACH_INET4_CONNECT)?;
    let mut attr = Attr::new().u32(0, prog.as_raw_fd() as u32).u32(4, cgroup.as_raw_fd() as u32).u32(8, ATTACH_INET4_CONNECT);
    let link = sys_bpf_fd(CMD_LINK_CREATE, &mut attr).map_err(|e| format!("BPF_LINK_CREATE: {}", errno_text(&e)))?;
    let during = attached_count(cgroup, ATTACH_INET4_CONNECT)?;
    drop(link);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut after = attached_count(cgroup, ATTACH_INET4_CONNECT)?;
    while after != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        after = attached_count(cgroup, ATTACH_INET4_CONNECT)?;
    }
    if during != before + 1 {
        return Err(format!("after BPF_LINK_CREATE the cgroup has {during} program(s), expected {}", before + 1));
    }
    if after != before {
        return Err(format!("closing the link left {after} program(s) attached, expected {before}"));
    }
    Ok("attached to a scratch cgroup through a link; closing the link detached it".into())
}

fn probe_netns_cookie() -> Result<String, String> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Stream,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for the duration of the call.
    let r = unsafe {
        libc::getsockopt(sock.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::ENOPROTOOPT) {
            format!("ENOPROTOOPT: not known to this kernel ({e})")
        } else {
            e.to_string()
        });
    }
    Ok(format!("this network namespace's cookie is {cookie}"))
}

/// Looks up one end of a loopback TCP connection with an exact SOCK_DIAG_BY_FAMILY request
/// and reads its INET_DIAG_CGROUP_ID, which should be this process's cgroup.
fn probe_inet_diag_cgroup_id() -> Result<String, String> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|e| format!("loopback listener: {e} (is lo up?)"))?;
    let client = TcpStream::connect(listener.local_addr().unwrap()).map_err(|e| format!("loopback connect: {e}"))?;
    let (std::net::SocketAddr::V4(local), std::net::SocketAddr::V4(peer)) =
        (client.local_addr().map_err(|e| e.to_string())?, client.peer_addr().map_err(|e| e.to_string())?)
    else {
        return Err("not an IPv4 connection".into());
    };
    let id = inet_diag_cgroup_id(local, peer)?;
    let own = own_cgroup_id();
    Ok(match own {
        Some(own) if own == id => format!("cgroup id {id} for a loopback socket (this process's cgroup)"),
        Some(own) => format!("cgroup id {id} for a loopback socket (this process's cgroup is {own}: net_cls/net_prio in use?)"),
        None => format!("cgroup id {id} for a loopback socket"),
    })
}

/// The cgroup2 id of this process's cgroup: the inode number of its directory.
fn own_cgroup_id() -> Option<u64> {
    let mount = find_cgroup2_mount().ok()??;
    let rel = Hierarchy::cgroup_of(std::process::id()).ok()?;
    std::fs::metadata(mount.join(rel.trim_start_matches('/'))).ok().map(|m| m.ino())
}

/// The cgroup id the kernel reports for the loopback socket `local` → `peer`, looked up as the
/// forwards look up their peers ([`PeerLookup`]).
fn inet_diag_cgroup_id(local: SocketAddrV4, peer: SocketAddrV4) -> Result<u64, String> {
    let lookup = PeerLookup::new().map_err(|e| format!("netlink NETLINK_SOCK_DIAG socket: {e}"))?;
    let timeout = libc::timeval { tv_sec: 2, tv_usec: 0 };
    // SAFETY: valid option value for the call's duration.
    unsafe {
        libc::setsockopt(lookup.as_fd().as_raw_fd(), libc::SOL_SOCKET, libc::SO_RCVTIMEO, (&raw const timeout).cast(), size_of::<libc::timeval>() as u32)
    };
    // `lookup` finds the socket at the other end of its arguments: the other end of `peer`,
    // seen from `local`'s side, is the socket `local` itself.
    match lookup.lookup(peer.into(), local.into()) {
        Ok(Some(PeerInfo { cgroup_id: Some(id), .. })) => Ok(id),
        Ok(Some(_)) => Err("the answer has no INET_DIAG_CGROUP_ID attribute (kernel older than 5.8?)".into()),
        Ok(None) => Err("the exact lookup found no socket (ENOENT)".into()),
        Err(e) => Err(format!("sock_diag: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_like_the_kernel_expects() {
        assert_eq!(mov64_imm(0, 1), [0xb7, 0x00, 0, 0, 1, 0, 0, 0]);
        assert_eq!(atomic_add64(0, 1, 0), [0xdb, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(store32_imm(10, -4, 0), [0x62, 0x0a, 0xfc, 0xff, 0, 0, 0, 0]);
        assert_eq!(ld_map_fd(1, 7)[0], [0x18, 0x11, 0, 0, 7, 0, 0, 0]);
        assert_eq!(call(122), [0x85, 0, 0, 0, 122, 0, 0, 0]);
    }
}
