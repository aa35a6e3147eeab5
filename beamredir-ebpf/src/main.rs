//! beamredir's kernel side: `cgroup_sock_addr` programs, one small function per hook, each
//! reverse translation next to its forward one (the layout of cilium's `bpf_sock.c`).
//!
//! * `connect4` rewrites connect() to a pod endpoint into the local forward endpoint.
//! * `getpeername4` is its reverse: a socket whose peer is a forward endpoint reports the pod
//!   endpoint instead, so the application cannot tell it was redirected. The reverse map is
//!   keyed by the socket's *current* peer, as cilium does, so nothing is written per connect,
//!   and a socket that was redirected, failed and then connected elsewhere reports its real peer.
//! * `connect6`/`getpeername6` do the same for AF_INET6 sockets: native IPv6 pod endpoints,
//!   and IPv4 pods dialled as `::ffff:a.b.c.d` (which never pass connect4).
//!
//! Everything happens only in the session's network namespace: a session process that enters
//! another one must not be sent to a loopback port where nothing (or something else) listens.
#![no_std]
#![no_main]
// The bpf target has no `AtomicU64::fetch_add` (no compare-and-swap), but the BPF atomic add
// instruction exists: the intrinsic lowers to it.
#![allow(internal_features)]
#![feature(core_intrinsics)]

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    Global,
    helpers::bpf_get_netns_cookie,
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, PerCpuArray},
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use beamredir_common::{DEFAULT_MAX_REDIRECTS, Endpoint4, Endpoint6, Redirect4, Redirect6};

/// sock_addr programs return 1 to let the syscall proceed (0 would fail it with EPERM).
const PROCEED: i32 = 1;
const SOCK_STREAM: u32 = 1;

/// The session's network namespace cookie, set by the loader (0: any namespace). Read-only, so
/// the verifier knows its value.
#[unsafe(no_mangle)]
static SESSION_NETNS_COOKIE: Global<u64> = Global::new(0);

#[map(name = "REDIRECTS4")]
static REDIRECTS4: HashMap<Endpoint4, Redirect4> =
    HashMap::with_max_entries(DEFAULT_MAX_REDIRECTS, 0);
#[map(name = "REVERSE4")]
static REVERSE4: HashMap<Endpoint4, Endpoint4> =
    HashMap::with_max_entries(DEFAULT_MAX_REDIRECTS, 0);
#[map(name = "REDIRECTS6")]
static REDIRECTS6: HashMap<Endpoint6, Redirect6> =
    HashMap::with_max_entries(DEFAULT_MAX_REDIRECTS, 0);
#[map(name = "REVERSE6")]
static REVERSE6: HashMap<Endpoint6, Endpoint6> =
    HashMap::with_max_entries(DEFAULT_MAX_REDIRECTS, 0);

/// Redirected connects per redirect slot (per CPU; userspace sums).
#[map(name = "REDIRECT_COUNTS")]
static REDIRECT_COUNTS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEFAULT_MAX_REDIRECTS, 0);

#[cgroup_sock_addr(connect4)]
pub fn beamredir_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the program a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    let dialled = Endpoint4::from_raw(sa.user_ip4, sa.user_port);
    if let Some(r) = redirect4(&ctx, &dialled) {
        sa.user_ip4 = r.forward.addr_be;
        sa.user_port = r.forward.port_be as u32;
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn beamredir_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if let Some(pod) = reverse4(&ctx, &Endpoint4::from_raw(sa.user_ip4, sa.user_port)) {
        sa.user_ip4 = pod.addr_be;
        sa.user_port = pod.port_be as u32;
    }
    PROCEED
}

/// `::ffff:0:0/96` in network byte order, as the first three words of `user_ip6`.
const V4_MAPPED_PREFIX: [u32; 3] = [0, 0, u32::from_be(0x0000_ffff)];

#[cgroup_sock_addr(connect6)]
pub fn beamredir_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return PROCEED;
    }
    let ip6 = sa.user_ip6;
    if is_v4_mapped(&ip6) {
        // An IPv4 pod dialled by a dual-stack socket: the IPv4 redirect, kept v4-mapped.
        if let Some(r) = redirect4(&ctx, &Endpoint4::from_raw(ip6[3], sa.user_port)) {
            sa.user_ip6[3] = r.forward.addr_be;
            sa.user_port = r.forward.port_be as u32;
        }
    } else if let Some(r) = redirect6(&ctx, &Endpoint6::from_raw(ip6, sa.user_port)) {
        set_ip6(sa, r.forward.addr_be);
        sa.user_port = r.forward.port_be as u32;
    }
    PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn beamredir_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above.
    let sa = unsafe { &mut *ctx.sock_addr };
    let ip6 = sa.user_ip6;
    if is_v4_mapped(&ip6) {
        if let Some(pod) = reverse4(&ctx, &Endpoint4::from_raw(ip6[3], sa.user_port)) {
            sa.user_ip6[3] = pod.addr_be;
            sa.user_port = pod.port_be as u32;
        }
    } else if let Some(pod) = reverse6(&ctx, &Endpoint6::from_raw(ip6, sa.user_port)) {
        set_ip6(sa, pod.addr_be);
        sa.user_port = pod.port_be as u32;
    }
    PROCEED
}

/// Writes the four words one by one, each at a constant offset from the context: the verifier
/// refuses a store through a context pointer that was moved (what a whole-array copy becomes).
#[inline(always)]
fn set_ip6(sa: &mut aya_ebpf::bindings::bpf_sock_addr, ip: [u32; 4]) {
    // SAFETY: plain field stores into the context the kernel gave the program.
    unsafe {
        core::ptr::write_volatile(&mut sa.user_ip6[0], ip[0]);
        core::ptr::write_volatile(&mut sa.user_ip6[1], ip[1]);
        core::ptr::write_volatile(&mut sa.user_ip6[2], ip[2]);
        core::ptr::write_volatile(&mut sa.user_ip6[3], ip[3]);
    }
}

#[inline(always)]
fn is_v4_mapped(ip6: &[u32; 4]) -> bool {
    ip6[0] == V4_MAPPED_PREFIX[0] && ip6[1] == V4_MAPPED_PREFIX[1] && ip6[2] == V4_MAPPED_PREFIX[2]
}

/// Only sockets of the session's network namespace are translated (checked after the map
/// lookup, so a connect that misses the map pays for one lookup and nothing else).
#[inline(always)]
fn in_session_netns(ctx: &SockAddrContext) -> bool {
    let cookie = SESSION_NETNS_COOKIE.load();
    // SAFETY: the helper only reads the context's socket.
    cookie == 0 || unsafe { bpf_get_netns_cookie(ctx.sock_addr as *mut _) } == cookie
}

/// Counts a redirect. The atomic add matters: sock_addr programs run with migration disabled
/// but may be preempted on PREEMPT kernels, so two tasks on one CPU can interleave a plain
/// read-modify-write of the per-CPU value and lose a count.
#[inline(always)]
fn count(slot: u32) {
    if let Some(counter) = REDIRECT_COUNTS.get_ptr_mut(slot) {
        // SAFETY: the map value is a valid, aligned u64 for the life of the program run.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, 1) };
    }
}

#[inline(always)]
fn redirect4(ctx: &SockAddrContext, dialled: &Endpoint4) -> Option<Redirect4> {
    // SAFETY: the value is copied out before any other map operation.
    let r = (unsafe { REDIRECTS4.get(dialled) }).copied()?;
    if !in_session_netns(ctx) {
        return None;
    }
    count(r.slot);
    // AYA_LOG_LEVEL is a read-only global the loader sets to "off" unless -v; the verifier
    // then prunes this branch, so logging costs nothing when it is off.
    debug!(
        ctx,
        "connect {:i}:{} -> {:i}:{}",
        u32::from_be(dialled.addr_be),
        dialled.port(),
        u32::from_be(r.forward.addr_be),
        r.forward.port()
    );
    Some(r)
}

#[inline(always)]
fn reverse4(ctx: &SockAddrContext, peer: &Endpoint4) -> Option<Endpoint4> {
    // SAFETY: as above.
    let pod = (unsafe { REVERSE4.get(peer) }).copied()?;
    in_session_netns(ctx).then_some(pod)
}

#[inline(always)]
fn redirect6(ctx: &SockAddrContext, dialled: &Endpoint6) -> Option<Redirect6> {
    // SAFETY: as above.
    let r = (unsafe { REDIRECTS6.get(dialled) }).copied()?;
    if !in_session_netns(ctx) {
        return None;
    }
    count(r.slot);
    // SAFETY: four network-order words are the address's sixteen bytes, in order.
    let addr: [u8; 16] = unsafe { core::mem::transmute(dialled.addr_be) };
    debug!(
        ctx,
        "connect [{:i}]:{} -> [::1]:{}",
        addr,
        dialled.port(),
        r.forward.port()
    );
    Some(r)
}

#[inline(always)]
fn reverse6(ctx: &SockAddrContext, peer: &Endpoint6) -> Option<Endpoint6> {
    // SAFETY: as above.
    let pod = (unsafe { REVERSE6.get(peer) }).copied()?;
    in_session_netns(ctx).then_some(pod)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
