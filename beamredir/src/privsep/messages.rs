//! What the two parts say to each other. The network part runs as the invoking user and reads
//! hostile bytes from the cluster, so everything it sends is checked by the root part before
//! use ([`super::root`]): sizes and counts are bounded, pod addresses must be pod addresses,
//! listeners must be ones root created, text is stripped of control characters.
use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::session::{ForwardStats, PodInfo, dns_files::HostEntry, status::ConnectionStats};

/// A listener the root part created, by the number it gave it.
pub type ListenerId = u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// 127.0.0.1
    V4,
    /// [::1]
    V6,
}

/// Redirect connect() to `pod` into listener `listener`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectSpec {
    pub pod: SocketAddr,
    pub listener: ListenerId,
}

/// Who may use the forwards: the network part checks every accepted connection's peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum PeerRule {
    /// Sockets created in this cgroup (an absolute path in the cgroup2 mount) or below it.
    Cgroup { path: PathBuf },
    /// `--global`: sockets owned by this uid (the invoking user).
    Uid { uid: u32 },
}

/// The command a session runs for the user (`remsh`, `rpc`, `observer`), as the user, in the
/// session's cgroup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// What the network part reports for `beamredir status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetStatus {
    pub forwards: Vec<(ListenerId, ForwardStats)>,
    pub pods: Vec<PodInfo>,
    pub connections: ConnectionStats,
}

/// Network part → root part.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToRoot {
    /// Create a loopback listener (answer: [`ToNet::Listener`] with its fd).
    OpenListener { family: Family },
    /// The listener is no longer used: its redirects go first, then root closes its copy.
    CloseListener { id: ListenerId },
    /// Everything is known: start the session with these redirects and host names (answer:
    /// [`ToNet::SessionUp`]), print `banner` (the cluster and its pods) and `hints` (how to
    /// connect) around the session's own lines, run `command` if given.
    Start {
        redirects: Vec<RedirectSpec>,
        hosts: Option<Vec<HostEntry>>,
        banner: String,
        hints: String,
        command: Option<SessionCommand>,
    },
    /// Replace the redirects.
    SetRedirects { redirects: Vec<RedirectSpec> },
    /// Replace the host names.
    SetHosts { hosts: Vec<HostEntry> },
    /// Answer to [`ToNet::StatusQuery`].
    Status(NetStatus),
    /// A message for the user, printed by root on its own line (progress while starting).
    Progress { text: String },
    /// Start-up failed: root prints this one line, tears down and exits non-zero.
    Fatal { message: String },
    /// Generic answer.
    Ok,
}

/// Root part → network part. `C` is the job description (see [`crate::up::NetConfig`]); this
/// module only carries it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ToNet<C> {
    /// The first message: what to do.
    Config(Box<C>),
    /// A new listener (its fd rides along).
    Listener {
        id: ListenerId,
        local: SocketAddr,
    },
    /// The session is up: forwards may accept now, checking peers against `peers`.
    SessionUp {
        peers: PeerRule,
        inetrc: Option<PathBuf>,
    },
    /// A request was refused (e.g. the redirect map is full).
    Refused {
        message: String,
    },
    StatusQuery,
    /// End: close everything and exit.
    Shutdown,
    Ok,
}

/// Printable text from the network part: no control characters but newlines (no terminal
/// escapes from a hostile pod name), no bidirectional overrides (which make a terminal show
/// text in another order than it is), at most `max` bytes.
pub fn printable(text: &str, max: usize) -> String {
    let bidi = |c: char| matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    let mut out: String = text
        .chars()
        .filter(|c| (*c == '\n' || !c.is_control()) && !bidi(*c))
        .collect();
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push('…');
    }
    out
}

/// As [`printable`], on one line: newlines become spaces too (a field of a table row, such as
/// a pod name in `status`, must not be able to add rows).
pub fn printable_line(text: &str, max: usize) -> String {
    printable(&text.replace('\n', " "), max)
}

#[cfg(test)]
mod tests {
    #[test]
    fn printable_line_keeps_to_one_line() {
        assert_eq!(
            super::printable_line("app-0\nsession evil  running\r", 100),
            "app-0 session evil  running"
        );
    }

    #[test]
    fn printable_strips_escapes_and_bounds() {
        assert_eq!(
            super::printable("pod \u{1b}[31mred\u{7}\nnext", 100),
            "pod [31mred\nnext"
        );
        assert_eq!(super::printable("ééé", 3), "é…");
        assert_eq!(super::printable("app-\u{202e}0-ppa\u{2066}", 100), "app-0-ppa");
    }
}
