//! Types shared by the eBPF programs (`beamredir-ebpf`) and the userspace loader (`beamredir`).
//!
//! Everything here is `#[repr(C)]` with explicit padding so both sides agree on the byte layout
//! of map keys and values. Addresses and ports are kept in network byte order, exactly as the
//! kernel hands them to a `cgroup/connect4` program in `struct bpf_sock_addr`, so the eBPF side
//! never converts anything.
#![no_std]

use core::net::{Ipv4Addr, SocketAddrV4};

/// Name of the map from pod endpoint to local forward endpoint.
pub const REDIRECTS_MAP: &str = "REDIRECTS";
/// Name of the per-CPU map counting redirected connects per pod endpoint.
pub const REDIRECT_COUNTS_MAP: &str = "REDIRECT_COUNTS";
/// Name of the socket-local storage holding the endpoint a redirected socket dialled.
pub const ORIGINAL_PEERS_MAP: &str = "ORIGINAL_PEERS";

/// Program names (the Rust function names in `beamredir-ebpf`).
pub const CONNECT4_PROGRAM: &str = "beamredir_connect4";
pub const GETPEERNAME4_PROGRAM: &str = "beamredir_getpeername4";
pub const CONNECT6_PROGRAM: &str = "beamredir_connect6";
pub const GETPEERNAME6_PROGRAM: &str = "beamredir_getpeername6";
/// Every program, in attach order.
pub const PROGRAMS: [&str; 4] = [CONNECT4_PROGRAM, GETPEERNAME4_PROGRAM, CONNECT6_PROGRAM, GETPEERNAME6_PROGRAM];

/// Default capacity of the redirect map (entries); the loader may raise it.
pub const DEFAULT_MAX_REDIRECTS: u32 = 16 * 1024;

/// An IPv4 endpoint as the kernel stores it in `bpf_sock_addr`: address and port in network
/// byte order. Used as the key (the pod endpoint) and the value (the local forward) of
/// [`REDIRECTS_MAP`], as the key of [`REDIRECT_COUNTS_MAP`] and the value of
/// [`ORIGINAL_PEERS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ipv4Endpoint {
    /// IPv4 address, network byte order (as `bpf_sock_addr.user_ip4`).
    pub addr_be: u32,
    /// TCP port, network byte order (the low 16 bits of `bpf_sock_addr.user_port`).
    pub port_be: u16,
    /// Explicit padding: must be zero so hash lookups compare equal.
    pub _pad: u16,
}

impl Ipv4Endpoint {
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
        Self { addr_be: user_ip4, port_be: user_port as u16, _pad: 0 }
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

impl From<SocketAddrV4> for Ipv4Endpoint {
    fn from(sa: SocketAddrV4) -> Self {
        Self::new(*sa.ip(), sa.port())
    }
}

// SAFETY: plain old data, repr(C), no implicit padding (4 + 2 + 2 bytes).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Ipv4Endpoint {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_eight_bytes_without_implicit_padding() {
        assert_eq!(core::mem::size_of::<Ipv4Endpoint>(), 8);
        assert_eq!(core::mem::align_of::<Ipv4Endpoint>(), 4);
    }

    #[test]
    fn network_byte_order_round_trip() {
        let e = Ipv4Endpoint::new(Ipv4Addr::new(10, 244, 0, 5), 4369);
        // In memory the address and port read exactly as on the wire.
        assert_eq!(e.addr_be.to_ne_bytes(), [10, 244, 0, 5]);
        assert_eq!(e.port_be.to_ne_bytes(), 4369u16.to_be_bytes());
        assert_eq!(e.addr(), Ipv4Addr::new(10, 244, 0, 5));
        assert_eq!(e.port(), 4369);
        // The kernel's user_port is a u32 whose low 16 bits hold the network-order port.
        let user_port = e.port_be as u32;
        assert_eq!(Ipv4Endpoint::from_raw(e.addr_be, user_port), e);
    }
}
