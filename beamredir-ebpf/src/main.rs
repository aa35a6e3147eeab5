//! beamredir's kernel side: `cgroup_sock_addr` programs, one small function per hook.
//!
//! * `connect4` rewrites connect() to a pod endpoint into the local forward endpoint and
//!   remembers, in the socket's own storage, what the application dialled.
//! * `getpeername4` is its reverse: getpeername() on such a socket reports the pod endpoint,
//!   so the application cannot tell it was redirected.
//! * `connect6`/`getpeername6` do the same for dual-stack sockets dialling `::ffff:POD_IP`.
#![no_std]
#![no_main]

use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, cgroup_sock_addr, map},
    maps::{HashMap, PerCpuHashMap},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use beamredir_common::{DEFAULT_MAX_REDIRECTS, Ipv4Endpoint};

/// sock_addr programs return 1 to let the syscall proceed (0 would fail it with EPERM).
const PROCEED: i32 = 1;
const SOCK_STREAM: u32 = 1;

/// Pod endpoint (what the application dials) → local forward endpoint.
#[map(name = "REDIRECTS")]
static REDIRECTS: HashMap<Ipv4Endpoint, Ipv4Endpoint> =
    HashMap::with_max_entries(DEFAULT_MAX_REDIRECTS, 0);

/// Pod endpoint → number of connects redirected (per CPU; userspace sums).
#[map(name = "REDIRECT_COUNTS")]
static REDIRECT_COUNTS: PerCpuHashMap<Ipv4Endpoint, u64> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_REDIRECTS, 0);

/// Per socket: the pod endpoint the application dialled, for getpeername4. Socket-local
/// storage lives and dies with the socket: no table to size, nothing to evict, and it is
/// cheaper than a hash insert on every redirected connect.
#[btf_map]
static ORIGINAL_PEERS: SkStorage<Ipv4Endpoint> = SkStorage::new();

#[cgroup_sock_addr(connect4)]
pub fn beamredir_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ == SOCK_STREAM {
        if let Some(forward) = redirect(&ctx, Ipv4Endpoint::from_raw(sa.user_ip4, sa.user_port)) {
            sa.user_ip4 = forward.addr_be;
            sa.user_port = forward.port_be as u32;
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn beamredir_getpeername4(ctx: SockAddrContext) -> i32 {
    if let Some(dialled) = dialled_by(&ctx) {
        // SAFETY: as above.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip4 = dialled.addr_be;
        sa.user_port = dialled.port_be as u32;
    }
    PROCEED
}

/// `::ffff:0:0/96` in network byte order, as the words of `user_ip6`.
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_be(0x0000_ffff)];

/// A dual-stack (AF_INET6) socket dialling an IPv4 pod as `::ffff:a.b.c.d` goes through the
/// connect6 hook, not connect4: the same redirect, on the mapped address.
#[cgroup_sock_addr(connect6)]
pub fn beamredir_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = sa.user_ip6;
    if sa.type_ == SOCK_STREAM && ip6[0] == V4_MAPPED_PREFIX[0] && ip6[1] == V4_MAPPED_PREFIX[1] && ip6[2] == V4_MAPPED_PREFIX[2] {
        if let Some(forward) = redirect(&ctx, Ipv4Endpoint::from_raw(ip6[3], sa.user_port)) {
            sa.user_ip6[3] = forward.addr_be;
            sa.user_port = forward.port_be as u32;
        }
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn beamredir_getpeername6(ctx: SockAddrContext) -> i32 {
    if let Some(dialled) = dialled_by(&ctx) {
        // SAFETY: as above.
        let sa = unsafe { &mut *ctx.sock_addr };
        sa.user_ip6[3] = dialled.addr_be;
        sa.user_port = dialled.port_be as u32;
    }
    PROCEED
}

/// The forward for a dialled pod endpoint, if it is redirected. On a hit the dialled endpoint
/// is remembered in the socket's storage (for getpeername) and counted.
#[inline(always)]
fn redirect(ctx: &SockAddrContext, dialled: Ipv4Endpoint) -> Option<Ipv4Endpoint> {
    // SAFETY: the value is copied out before any other map operation.
    let forward = (unsafe { REDIRECTS.get(&dialled) }).copied()?;
    let mut remembered = dialled;
    // SAFETY: the context's socket is valid for the duration of the program.
    let slot = unsafe { ORIGINAL_PEERS.get_or_insert_ptr_mut(ctx, Some(&mut remembered)) };
    if !slot.is_null() {
        // A socket that connects again (after a failed connect) keeps one slot: overwrite it.
        unsafe { *slot = dialled };
    }
    if let Some(count) = REDIRECT_COUNTS.get_ptr_mut(&dialled) {
        // Per-CPU value, and sock_addr programs run with migration disabled: no atomics needed.
        unsafe { *count += 1 };
    }
    // AYA_LOG_LEVEL is a read-only global the loader sets to "off" unless -v; the verifier
    // then prunes this branch, so logging costs nothing when it is off.
    debug!(
        ctx,
        "connect {:i}:{} -> {:i}:{}",
        u32::from_be(dialled.addr_be),
        dialled.port(),
        u32::from_be(forward.addr_be),
        forward.port()
    );
    Some(forward)
}

/// What a redirected socket dialled (None for sockets beamredir did not redirect).
#[inline(always)]
fn dialled_by(ctx: &SockAddrContext) -> Option<Ipv4Endpoint> {
    // SAFETY: the context's socket is valid; the slot is copied out at once.
    let slot = unsafe { ORIGINAL_PEERS.get_ptr_mut(ctx) };
    if slot.is_null() { None } else { Some(unsafe { *slot }) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
