//! Types shared by the eBPF programs (`beamredir-ebpf`) and the userspace loader (`beamredir`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree on the byte layout
//! of map keys and values. Addresses and ports are kept in network byte order, exactly as the
//! kernel hands them to a `cgroup/connect4`/`connect6` program in `struct bpf_sock_addr`, so the
//! eBPF side never converts anything.
#![no_std]

use core::net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};

/// Pod endpoint (IPv4) → [`Redirect4`]: what connect4 (and connect6 for `::ffff:a.b.c.d`) rewrites.
pub const REDIRECTS4_MAP: &str = "REDIRECTS4";
/// Pod endpoint (IPv6) → [`Redirect6`].
pub const REDIRECTS6_MAP: &str = "REDIRECTS6";
/// Forward endpoint (IPv4) → the pod endpoint it stands for: getpeername4's reverse translation.
pub const REVERSE4_MAP: &str = "REVERSE4";
/// Forward endpoint (IPv6) → pod endpoint (IPv6).
pub const REVERSE6_MAP: &str = "REVERSE6";
/// Per-CPU connect counters, indexed by a redirect's `slot`.
pub const REDIRECT_COUNTS_MAP: &str = "REDIRECT_COUNTS";
/// Read-only global: the network namespace cookie of the session (0: redirect in any netns).
pub const SESSION_NETNS_COOKIE_GLOBAL: &str = "SESSION_NETNS_COOKIE";

/// Program names (the Rust function names in `beamredir-ebpf`).
pub const CONNECT4_PROGRAM: &str = "beamredir_connect4";
pub const GETPEERNAME4_PROGRAM: &str = "beamredir_getpeername4";
pub const CONNECT6_PROGRAM: &str = "beamredir_connect6";
pub const GETPEERNAME6_PROGRAM: &str = "beamredir_getpeername6";
/// Every program, in attach order.
pub const PROGRAMS: [&str; 4] = [
    CONNECT4_PROGRAM,
    GETPEERNAME4_PROGRAM,
    CONNECT6_PROGRAM,
    GETPEERNAME6_PROGRAM,
];

/// Default capacity of the redirect maps (entries) and counter slots; the loader may change it.
pub const DEFAULT_MAX_REDIRECTS: u32 = 16 * 1024;

/// An IPv4 endpoint as the kernel stores it in `bpf_sock_addr`: address and port in network
/// byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint4 {
    /// IPv4 address, network byte order (as `bpf_sock_addr.user_ip4`).
    pub addr_be: u32,
    /// TCP port, network byte order (the low 16 bits of `bpf_sock_addr.user_port`).
    pub port_be: u16,
    /// Explicit padding: must be zero so hash lookups compare equal.
    pub _pad: u16,
}

impl Endpoint4 {
    pub const fn new(addr: Ipv4Addr, port: u16) -> Self {
        Self {
            addr_be: u32::from_ne_bytes(addr.octets()),
            port_be: u16::from_ne_bytes(port.to_be_bytes()),
            _pad: 0,
        }
    }

    /// Builds a key from the raw `user_ip4`/`user_port` fields of `bpf_sock_addr`.
    #[inline(always)]
    pub const fn from_raw(user_ip4: u32, user_port: u32) -> Self {
        Self {
            addr_be: user_ip4,
            port_be: user_port as u16,
            _pad: 0,
        }
    }

    pub const fn addr(&self) -> Ipv4Addr {
        let o = self.addr_be.to_ne_bytes();
        Ipv4Addr::new(o[0], o[1], o[2], o[3])
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port_be.to_ne_bytes())
    }

    pub const fn socket_addr(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.addr(), self.port())
    }
}

impl From<SocketAddrV4> for Endpoint4 {
    fn from(sa: SocketAddrV4) -> Self {
        Self::new(*sa.ip(), sa.port())
    }
}

/// An IPv6 endpoint as in `bpf_sock_addr.user_ip6` (four network-order words) and `user_port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint6 {
    pub addr_be: [u32; 4],
    pub port_be: u16,
    pub _pad: u16,
}

impl Endpoint6 {
    pub fn new(addr: Ipv6Addr, port: u16) -> Self {
        let o = addr.octets();
        let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        Self {
            addr_be: [word(0), word(4), word(8), word(12)],
            port_be: u16::from_ne_bytes(port.to_be_bytes()),
            _pad: 0,
        }
    }

    #[inline(always)]
    pub const fn from_raw(user_ip6: [u32; 4], user_port: u32) -> Self {
        Self {
            addr_be: user_ip6,
            port_be: user_port as u16,
            _pad: 0,
        }
    }

    pub fn addr(&self) -> Ipv6Addr {
        let mut o = [0u8; 16];
        for (i, w) in self.addr_be.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        Ipv6Addr::from(o)
    }

    pub const fn port(&self) -> u16 {
        u16::from_be_bytes(self.port_be.to_ne_bytes())
    }

    pub fn socket_addr(&self) -> SocketAddrV6 {
        SocketAddrV6::new(self.addr(), self.port(), 0, 0)
    }
}

impl From<SocketAddrV6> for Endpoint6 {
    fn from(sa: SocketAddrV6) -> Self {
        Self::new(*sa.ip(), sa.port())
    }
}

/// The value of [`REDIRECTS4_MAP`]: where the connect goes, and which counter slot it bumps.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect4 {
    pub forward: Endpoint4,
    /// Index into [`REDIRECT_COUNTS_MAP`].
    pub slot: u32,
}

/// The value of [`REDIRECTS6_MAP`]: an IPv6 forward (`[::1]:PORT`, or `::ffff:127.0.0.1:PORT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect6 {
    pub forward: Endpoint6,
    pub slot: u32,
}

// SAFETY: plain old data, repr(C), no implicit padding (sizes checked in the tests below).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Endpoint4 {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Endpoint6 {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Redirect4 {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for Redirect6 {}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, size_of};

    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!((size_of::<Endpoint4>(), align_of::<Endpoint4>()), (8, 4));
        assert_eq!((size_of::<Endpoint6>(), align_of::<Endpoint6>()), (20, 4));
        assert_eq!(size_of::<Redirect4>(), 12);
        assert_eq!(size_of::<Redirect6>(), 24);
    }

    #[test]
    fn network_byte_order_round_trip() {
        let e = Endpoint4::new(Ipv4Addr::new(10, 244, 0, 5), 4369);
        // In memory the address and port read exactly as on the wire.
        assert_eq!(e.addr_be.to_ne_bytes(), [10, 244, 0, 5]);
        assert_eq!(e.port_be.to_ne_bytes(), 4369u16.to_be_bytes());
        assert_eq!(
            e.socket_addr(),
            SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 5), 4369)
        );
        // The kernel's user_port is a u32 whose low 16 bits hold the network-order port.
        assert_eq!(Endpoint4::from_raw(e.addr_be, e.port_be as u32), e);

        let a: Ipv6Addr = "fd00:10:244::5".parse().unwrap();
        let e6 = Endpoint6::new(a, 9000);
        assert_eq!(e6.addr_be[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x10]);
        assert_eq!(e6.addr_be[3].to_ne_bytes(), [0, 0, 0, 5]);
        assert_eq!(e6.socket_addr(), SocketAddrV6::new(a, 9000, 0, 0));
        assert_eq!(Endpoint6::from_raw(e6.addr_be, e6.port_be as u32), e6);
    }
}
