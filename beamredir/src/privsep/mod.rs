//! Privilege separation for sessions that talk to a cluster (`up`, `remsh`, `rpc`, `observer`).
//!
//! ```text
//!  root part (uid 0)                                  network part (invoking user, no caps,
//!  ────────────────                                   NO_NEW_PRIVS, dies with the root part)
//!  bpf_links, maps, session cgroup,   ◀── channel ──▶ kubeconfig, credential plugins, kube
//!  records, DNS files, control socket,  (seqpacket,   client, TLS, WebSocket, epmd parser,
//!  loopback listeners, teardown          typed, bounded) peer check, port-forward relays
//! ```
//!
//! The root part never parses bytes from the network: it gets typed, bounded messages
//! ([`messages`]) and checks every one ([`root`]) before it touches the kernel or a file. The
//! network part gets its listeners from root (as fds), so a redirect can only ever point at a
//! socket root created and still holds. If either part dies, the other ends too: the network
//! part has a parent-death signal, and the root part sees the channel close.
//!
//! * [`channel`]: the socket pair and the typed request/answer link on it;
//! * [`messages`]: what each side may say;
//! * [`spawn`]: starting the network part with dropped privileges;
//! * [`root`]: the root part's listeners and checks;
//! * [`net`]: the network part's handle on the root part.
pub mod channel;
pub mod messages;
pub mod net;
pub mod root;
pub mod spawn;
