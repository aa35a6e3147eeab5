//! Who is on the other end of an accepted forward connection: one `sock_diag` (inet_diag)
//! lookup of the peer's socket by its exact 4-tuple, which returns its owner uid and the cgroup
//! it was created in (`INET_DIAG_CGROUP_ID`, Linux ≥ 5.7).
//!
//! Why this mechanism: the cgroup recorded at socket creation is exactly the one the
//! connect4/connect6 programs matched (cgroup sock_addr programs run for the socket's cgroup),
//! so "redirected into the forward" and "allowed through the forward" mean the same thing. It
//! needs no privilege (unlike mapping /proc/net/tcp inodes to processes of other users), it is
//! one netlink round trip per connection, and it is decided before a single byte is read from
//! the peer or sent to the API server.
use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_NOCOOKIE: u32 = !0;
const INET_DIAG_CGROUP_ID: u16 = 21;
const NLMSG_HDRLEN: usize = 16;
/// inet_diag_req_v2: family, protocol, ext, pad (4) + states (4) + sockid (48).
const REQ_LEN: usize = 56;
/// inet_diag_msg: family, state, timer, retrans (4) + sockid (48) + expires, rqueue, wqueue,
/// uid, inode (20).
const MSG_LEN: usize = 72;

/// The owner and cgroup of a local socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    pub uid: u32,
    /// None on kernels without INET_DIAG_CGROUP_ID (< 5.7).
    pub cgroup_id: Option<u64>,
    /// The socket's inode: 0 once no process holds it any more (closed by its owner, but still
    /// finishing its TCP shutdown: orphaned, or a TIME_WAIT/FIN_WAIT2 mini-socket).
    pub inode: u32,
}

impl PeerInfo {
    /// Whether the process at the other end has closed its socket (not just shut down its
    /// sending side): nobody can read what is sent to it any more.
    pub fn is_closed(&self) -> bool {
        self.inode == 0
    }
}

/// A netlink socket for sock_diag lookups (one per forward process is enough).
pub struct PeerLookup {
    fd: OwnedFd,
}

impl PeerLookup {
    pub fn new() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkSockDiag,
        )?;
        Ok(PeerLookup { fd })
    }

    /// The socket at the other end of an accepted connection whose local address is `local`
    /// and whose peer is `peer`. None if there is no such socket (any more) on this host.
    pub fn lookup(&self, local: SocketAddr, peer: SocketAddr) -> io::Result<Option<PeerInfo>> {
        let request = build_request(peer, local);
        // SAFETY: sending a fully initialised buffer on our own socket.
        let sent = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 8192];
        // SAFETY: receiving into a buffer we own, of the length given.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        parse_response(&buf[..n as usize])
    }
}

impl AsFd for PeerLookup {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An exact lookup (no NLM_F_DUMP) of the socket whose local end is `sock_local` and remote end
/// `sock_remote`: for the peer's socket, its local end is our peer and its remote end is us.
fn build_request(sock_local: SocketAddr, sock_remote: SocketAddr) -> Vec<u8> {
    let family = match (sock_local, sock_remote) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => libc::AF_INET as u8,
        _ => libc::AF_INET6 as u8,
    };
    let words = |ip: IpAddr| -> [u8; 16] {
        match ip {
            // AF_INET lookups read only the first word.
            IpAddr::V4(v4) if family == libc::AF_INET as u8 => {
                let mut w = [0u8; 16];
                w[..4].copy_from_slice(&v4.octets());
                w
            }
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        }
    };
    let mut b = Vec::with_capacity(NLMSG_HDRLEN + REQ_LEN);
    b.extend_from_slice(&((NLMSG_HDRLEN + REQ_LEN) as u32).to_ne_bytes());
    b.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    b.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    b.extend_from_slice(&1u32.to_ne_bytes()); // seq
    b.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    b.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    b.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    b.extend_from_slice(&sock_local.port().to_be_bytes());
    b.extend_from_slice(&sock_remote.port().to_be_bytes());
    b.extend_from_slice(&words(sock_local.ip()));
    b.extend_from_slice(&words(sock_remote.ip()));
    b.extend_from_slice(&0u32.to_ne_bytes()); // interface
    b.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    b.extend_from_slice(&INET_DIAG_NOCOOKIE.to_ne_bytes());
    b
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Parses the kernel's answer: one inet_diag_msg with attributes, or an error (ENOENT when no
/// socket matches).
fn parse_response(b: &[u8]) -> io::Result<Option<PeerInfo>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed sock_diag answer");
    let len = u32_at(b, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(b, 4).ok_or_else(bad)?;
    if len < NLMSG_HDRLEN || len > b.len() {
        return Err(bad());
    }
    let msg = &b[NLMSG_HDRLEN..len];
    match kind {
        NLMSG_ERROR => {
            let errno = u32_at(msg, 0).ok_or_else(bad)? as i32;
            match -errno {
                0 => Ok(None),
                libc::ENOENT => Ok(None),
                e => Err(io::Error::from_raw_os_error(e)),
            }
        }
        NLMSG_DONE => Ok(None),
        SOCK_DIAG_BY_FAMILY => {
            if msg.len() < MSG_LEN {
                return Err(bad());
            }
            let uid = u32_at(msg, 64).ok_or_else(bad)?;
            let inode = u32_at(msg, 68).ok_or_else(bad)?;
            let mut cgroup_id = None;
            let mut at = MSG_LEN;
            // Attributes: (len u16, type u16, payload), each padded to 4 bytes.
            while at + 4 <= msg.len() {
                let alen = u16_at(msg, at).ok_or_else(bad)? as usize;
                let atype = u16_at(msg, at + 2).ok_or_else(bad)? & 0x3fff;
                if alen < 4 || at + alen > msg.len() {
                    break;
                }
                if atype == INET_DIAG_CGROUP_ID && alen >= 12 {
                    cgroup_id = Some(u64::from_ne_bytes(
                        msg[at + 4..at + 12].try_into().map_err(|_| bad())?,
                    ));
                }
                at += (alen + 3) & !3;
            }
            Ok(Some(PeerInfo {
                uid,
                cgroup_id,
                inode,
            }))
        }
        _ => Err(bad()),
    }
}

/// The cgroup id of a cgroup2 directory (its inode number, which is what the kernel reports).
pub fn cgroup_id(dir: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(dir)?.ino())
}

/// The ids of a cgroup and every cgroup below it (at most `max`).
pub fn cgroup_ids_under(dir: &std::path::Path, max: usize) -> io::Result<Vec<u64>> {
    let mut ids = vec![cgroup_id(dir)?];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)?.flatten() {
            if ids.len() >= max {
                return Ok(ids);
            }
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if let Ok(id) = cgroup_id(&entry.path()) {
                    ids.push(id);
                    stack.push(entry.path());
                }
            }
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_owner_and_cgroup_of_a_loopback_peer() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, peer) = listener.accept().unwrap();
        let lookup = PeerLookup::new().unwrap();
        let info = lookup
            .lookup(accepted.local_addr().unwrap(), peer)
            .unwrap()
            .expect("the client socket is found");
        assert_eq!(info.uid, nix::unistd::geteuid().as_raw());
        // Our own cgroup, where the client socket was created.
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap()
            .to_string();
        if let Some(mount) = crate::kernel::cgroup::find_cgroup2_mount().unwrap() {
            let dir = mount.join(rel.trim_start_matches('/'));
            if let (Some(id), Ok(expected)) = (info.cgroup_id, cgroup_id(&dir)) {
                assert_eq!(id, expected);
            }
        }
        assert!(!info.is_closed(), "the client socket is open: {info:?}");
        // Shut down for sending only, the client still holds it.
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let local = accepted.local_addr().unwrap();
        assert!(!lookup.lookup(local, peer).unwrap().unwrap().is_closed());
        // Closed: orphaned (or gone), whichever the kernel has made of it by now.
        drop(client);
        let after = lookup.lookup(local, peer).unwrap();
        assert!(after.is_none_or(|i| i.is_closed()), "{after:?}");
        // A peer that never existed: no socket.
        let nobody: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(
            lookup
                .lookup(accepted.local_addr().unwrap(), nobody)
                .unwrap(),
            None
        );
    }

    fn nlmsg(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + payload.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn answers_parse() {
        let mut payload = vec![0u8; MSG_LEN];
        payload[64..68].copy_from_slice(&1000u32.to_ne_bytes());
        payload.extend_from_slice(&8u16.to_ne_bytes()); // an unrelated 4-byte attribute
        payload.extend_from_slice(&1u16.to_ne_bytes());
        payload.extend_from_slice(&[0; 4]);
        payload.extend_from_slice(&12u16.to_ne_bytes());
        payload.extend_from_slice(&INET_DIAG_CGROUP_ID.to_ne_bytes());
        payload.extend_from_slice(&4242u64.to_ne_bytes());
        let info = parse_response(&nlmsg(SOCK_DIAG_BY_FAMILY, &payload)).unwrap();
        assert_eq!(
            info,
            Some(PeerInfo {
                uid: 1000,
                cgroup_id: Some(4242),
                inode: 0
            })
        );
        // Kernels before INET_DIAG_CGROUP_ID.
        let old_kernel = parse_response(&nlmsg(SOCK_DIAG_BY_FAMILY, &[0u8; MSG_LEN])).unwrap();
        assert!(
            matches!(
                old_kernel,
                Some(PeerInfo {
                    cgroup_id: None,
                    ..
                })
            ),
            "{old_kernel:?}"
        );
        let enoent = nlmsg(NLMSG_ERROR, &(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_response(&enoent).unwrap(), None);
    }

    #[test]
    fn garbage_answers_are_errors_not_panics() {
        for b in [
            &[][..],
            &[1, 2, 3],
            &[255; 16],
            &[16, 0, 0, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        ] {
            let _ = parse_response(b);
        }
    }
}
