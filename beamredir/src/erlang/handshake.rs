//! The Erlang distribution handshake, and a silent probe that reads a node's exact name.
//!
//! Wire format (OTP's "Distribution Protocol", `lib/kernel/src/dist_util.erl` of OTP 25/26):
//! every handshake message is `[Len:2][Tag:1][Body]`, big-endian.
//!
//! 1. the connecting side (A) sends `send_name`: `'N' Flags:64 Creation:32 NLen:16 Name`
//!    (distribution version 6, OTP 23+). With `DFLAG_NAME_ME` the name is only a host name and
//!    B assigns a dynamic one;
//! 2. the accepting side (B) answers `recv_status`: `'s'` then `ok`, `ok_simultaneous`, `nok`,
//!    `not_allowed`, `alive`, or `named:` `NLen:16 Name Creation:32` for a dynamic name;
//! 3. B sends its challenge: `'N' Flags:64 Challenge:32 Creation:32 NLen:16 Name`, with **B's
//!    own full node name**. OTP 22 and older send the old `'n' Version:16 Flags:32
//!    Challenge:32 Name`;
//! 4. A answers `'r' Challenge:32 Digest:16` (the first message that needs the cookie), and B
//!    acknowledges with `'a' Digest:16`.
//!
//! [`probe`] stops after step 3: it learns B's exact name, flags and creation without the
//! cookie and closes. B's `recv_challenge_reply` then sees the connection closed and shuts the
//! attempt down without logging (only a *wrong* digest is logged). The parse functions here are
//! pure and never panic on any input; [`super::dist`] reuses them for a full handshake.
use std::{future::Future, time::Duration};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::reader::Reader;

/// The one name every probe uses. Each distinct name a node sees becomes a permanent atom on
/// it, so there is exactly one. It starts with `0` so it sorts before any usual node name: when
/// two probes reach a node at once, the node (whose own name then compares greater) answers the
/// second with `nok` instead of killing the first (`net_kernel`'s simultaneous-connect rule),
/// and the second retries. The accepting side checks only that there is a non-empty name and
/// host around one `@` (`dist_util:is_name_ok`); it never applies the long/short host rules of
/// `inet_tcp_dist:splitnode` to a node that dials *in*, so one name serves both name modes.
pub const PROBE_NAME: &str = "0-beamredir-probe@localhost";

/// Largest handshake message accepted from a node. Real ones are at most 19 bytes plus a node
/// name (an atom: at most 255 characters, so 1020 bytes of UTF-8 in the worst case).
pub const MAX_HANDSHAKE_MESSAGE: usize = 1024;

/// How long a whole probe may take by default (connect excluded: the caller hands a stream).
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait before the one retry after `nok`/`alive` (another attempt under the same
/// name is in flight; a probe holds its connection for one round trip).
pub const BUSY_RETRY_WAIT: Duration = Duration::from_millis(300);

/// Distribution capability flags (`lib/kernel/include/dist.hrl`).
pub mod flags {
    pub const PUBLISHED: u64 = 0x01;
    pub const ATOM_CACHE: u64 = 0x02;
    pub const EXTENDED_REFERENCES: u64 = 0x04;
    pub const DIST_MONITOR: u64 = 0x08;
    pub const FUN_TAGS: u64 = 0x10;
    pub const DIST_MONITOR_NAME: u64 = 0x20;
    pub const HIDDEN_ATOM_CACHE: u64 = 0x40;
    pub const NEW_FUN_TAGS: u64 = 0x80;
    pub const EXTENDED_PIDS_PORTS: u64 = 0x100;
    pub const EXPORT_PTR_TAG: u64 = 0x200;
    pub const BIT_BINARIES: u64 = 0x400;
    pub const NEW_FLOATS: u64 = 0x800;
    pub const UNICODE_IO: u64 = 0x1000;
    pub const DIST_HDR_ATOM_CACHE: u64 = 0x2000;
    pub const SMALL_ATOM_TAGS: u64 = 0x4000;
    pub const UTF8_ATOMS: u64 = 0x1_0000;
    pub const MAP_TAG: u64 = 0x2_0000;
    pub const BIG_CREATION: u64 = 0x4_0000;
    pub const SEND_SENDER: u64 = 0x8_0000;
    pub const BIG_SEQTRACE_LABELS: u64 = 0x10_0000;
    pub const EXIT_PAYLOAD: u64 = 0x40_0000;
    pub const FRAGMENTS: u64 = 0x80_0000;
    pub const HANDSHAKE_23: u64 = 0x100_0000;
    pub const UNLINK_ID: u64 = 0x200_0000;
    pub const MANDATORY_25_DIGEST: u64 = 0x400_0000;
    pub const SPAWN: u64 = 1 << 32;
    pub const NAME_ME: u64 = 1 << 33;
    pub const V4_NC: u64 = 1 << 34;
    pub const ALIAS: u64 = 1 << 35;

    /// Flags OTP 25 and 26 require of every peer (`MANDATORY_DFLAGS_25` plus OTP 26's
    /// `V4_NC` and `UNLINK_ID`; OTP 27 also requires `MANDATORY_25_DIGEST`). A peer missing
    /// one is refused *and logged* ("Connection attempt from node … rejected since it cannot
    /// handle …").
    pub const MANDATORY: u64 = EXTENDED_REFERENCES
        | FUN_TAGS
        | EXTENDED_PIDS_PORTS
        | NEW_FUN_TAGS
        | EXPORT_PTR_TAG
        | BIT_BINARIES
        | NEW_FLOATS
        | UTF8_ATOMS
        | MAP_TAG
        | BIG_CREATION
        | HANDSHAKE_23
        | V4_NC
        | UNLINK_ID
        | MANDATORY_25_DIGEST;

    /// Exactly what an OTP 25.2 hidden node sends (`erts_internal:get_dflags()` default,
    /// 0xD07DF7FBC, without `PUBLISHED`), captured from `erl -hidden` on Debian's OTP 25.2.3.
    pub const OTP25_HIDDEN_NODE: u64 = MANDATORY
        | DIST_MONITOR
        | DIST_MONITOR_NAME
        | UNICODE_IO
        | DIST_HDR_ATOM_CACHE
        | SMALL_ATOM_TAGS
        | SEND_SENDER
        | BIG_SEQTRACE_LABELS
        | EXIT_PAYLOAD
        | FRAGMENTS
        | SPAWN
        | ALIAS;
}

/// Result of trying to take one handshake message from the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// More bytes are needed.
    Incomplete,
    /// One message body (without its length prefix) and how many bytes it used.
    Message { body: &'a [u8], consumed: usize },
}

/// Why bytes cannot be the start of a handshake message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The bytes start like a TLS record (content type 20-24, major version 3). A plain
    /// handshake message that long would be over 5 KiB, far above any real one.
    #[error("the bytes look like a TLS record")]
    Tls,
    #[error("a handshake message of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("a handshake message is empty")]
    Empty,
}

/// Takes one length-prefixed handshake message from the front of `buf`.
pub fn parse_frame(buf: &[u8], max: usize) -> Result<Frame<'_>, FrameError> {
    let Some(prefix) = buf.get(..2) else {
        return Ok(Frame::Incomplete);
    };
    if looks_like_tls(prefix) {
        return Err(FrameError::Tls);
    }
    let len = usize::from(u16::from_be_bytes([prefix[0], prefix[1]]));
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    match buf.get(2..2 + len) {
        Some(body) => Ok(Frame::Message { body, consumed: 2 + len }),
        None => Ok(Frame::Incomplete),
    }
}

/// True if the first two bytes are a TLS record header's content type (change_cipher_spec,
/// alert, handshake, application_data, heartbeat) and major version 3, as a node running TLS
/// distribution answers plain bytes (an alert: `15 03 03 00 02 02 0a`).
pub fn looks_like_tls(first: &[u8]) -> bool {
    matches!(first, [20..=24, 3, ..])
}

/// Encodes a version 6 `send_name` with its length prefix. `name` is a full node name, or
/// only a host when `flags` has [`flags::NAME_ME`]. Fails on a name over 65535 bytes.
pub fn encode_send_name(name: &str, flags: u64, creation: u32) -> Option<Vec<u8>> {
    let name_len = u16::try_from(name.len()).ok()?;
    let mut body = Vec::with_capacity(15 + name.len());
    body.push(b'N');
    body.extend_from_slice(&flags.to_be_bytes());
    body.extend_from_slice(&creation.to_be_bytes());
    body.extend_from_slice(&name_len.to_be_bytes());
    body.extend_from_slice(name.as_bytes());
    with_len16(body)
}

/// Encodes a `send_status` (`'s'` + text), used to answer `alive`.
pub fn encode_status(text: &str) -> Option<Vec<u8>> {
    let mut body = vec![b's'];
    body.extend_from_slice(text.as_bytes());
    with_len16(body)
}

/// Encodes the challenge reply `'r' Challenge:32 Digest:16`.
pub fn encode_challenge_reply(challenge: u32, digest: [u8; 16]) -> Vec<u8> {
    let mut body = vec![b'r'];
    body.extend_from_slice(&challenge.to_be_bytes());
    body.extend_from_slice(&digest);
    with_len16(body).unwrap_or_default()
}

fn with_len16(body: Vec<u8>) -> Option<Vec<u8>> {
    let len = u16::try_from(body.len()).ok()?;
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Some(out)
}

/// A `recv_status` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Ok,
    OkSimultaneous,
    /// Another attempt under the same name is pending and wins.
    Nok,
    /// The node's allow list (`net_kernel:allow/1`) does not include the name.
    NotAllowed,
    /// A connection under the same name is up; the node asks whether to replace it.
    Alive,
    /// A dynamic name assigned by the node (the answer to `NAME_ME`).
    Named { name: String, creation: u32 },
    /// Any other text.
    Other(String),
}

/// Why a handshake message body is not what it should be.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidMessage {
    #[error("expected {expected}, got a message starting with byte {tag:#04x}")]
    UnexpectedTag { expected: &'static str, tag: u8 },
    #[error("{what} ends inside its fields")]
    Truncated { what: &'static str },
    #[error("{what} carries a node name that is not NAME@HOST: {name:?}")]
    BadNodeName { what: &'static str, name: String },
    #[error("old-style challenge has distribution version {version}, not 5")]
    BadVersion { version: u16 },
    #[error("challenge ack is {len} bytes, not 17")]
    BadAckLength { len: usize },
}

/// Parses a `recv_status` body.
pub fn parse_status(body: &[u8]) -> Result<Status, InvalidMessage> {
    let Some((&tag, text)) = body.split_first() else {
        return Err(InvalidMessage::Truncated { what: "status" });
    };
    if tag != b's' {
        return Err(InvalidMessage::UnexpectedTag { expected: "a status ('s')", tag });
    }
    Ok(match text {
        b"ok" => Status::Ok,
        b"ok_simultaneous" => Status::OkSimultaneous,
        b"nok" => Status::Nok,
        b"not_allowed" => Status::NotAllowed,
        b"alive" => Status::Alive,
        _ => match text.strip_prefix(b"named:") {
            Some(rest) => parse_named(rest)?,
            None => Status::Other(String::from_utf8_lossy(text).into_owned()),
        },
    })
}

fn parse_named(rest: &[u8]) -> Result<Status, InvalidMessage> {
    const WHAT: &str = "named status";
    let mut r = Reader::new(rest);
    let (name, creation) = (|| Some((r.sized()?, r.u32()?)))().ok_or(InvalidMessage::Truncated { what: WHAT })?;
    Ok(Status::Named { name: node_name(name, WHAT)?, creation })
}

/// A node's challenge: who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// 6 for the `'N'` challenge (OTP 23+), 5 for the old `'n'` one.
    pub version: u16,
    pub flags: u64,
    pub challenge: u32,
    /// `None` for the old format, which has no creation.
    pub creation: Option<u32>,
    /// The node's full name, exactly as it names itself.
    pub name: String,
}

/// Parses a challenge body, new (`'N'`) or old (`'n'`) format.
pub fn parse_challenge(body: &[u8]) -> Result<Challenge, InvalidMessage> {
    let mut r = Reader::new(body);
    let tag = r.u8().ok_or(InvalidMessage::Truncated { what: "challenge" })?;
    match tag {
        b'N' => {
            const WHAT: &str = "challenge";
            let (flags, challenge, creation, name) =
                (|| Some((r.u64()?, r.u32()?, r.u32()?, r.sized()?)))().ok_or(InvalidMessage::Truncated { what: WHAT })?;
            Ok(Challenge { version: 6, flags, challenge, creation: Some(creation), name: node_name(name, WHAT)? })
        }
        b'n' => {
            const WHAT: &str = "old-style challenge";
            let (version, flags, challenge) =
                (|| Some((r.u16()?, r.u32()?, r.u32()?)))().ok_or(InvalidMessage::Truncated { what: WHAT })?;
            if version != 5 {
                return Err(InvalidMessage::BadVersion { version });
            }
            Ok(Challenge { version: 5, flags: u64::from(flags), challenge, creation: None, name: node_name(r.rest(), WHAT)? })
        }
        tag => Err(InvalidMessage::UnexpectedTag { expected: "a challenge ('N' or 'n')", tag }),
    }
}

/// Parses a challenge ack body `'a' Digest:16`.
pub fn parse_challenge_ack(body: &[u8]) -> Result<[u8; 16], InvalidMessage> {
    match body.split_first() {
        Some((b'a', digest)) => digest.try_into().map_err(|_| InvalidMessage::BadAckLength { len: body.len() }),
        Some((&tag, _)) => Err(InvalidMessage::UnexpectedTag { expected: "a challenge ack ('a')", tag }),
        None => Err(InvalidMessage::Truncated { what: "challenge ack" }),
    }
}

/// A node name as the accepting side checks it: exactly one `@`, text on both sides. Node names
/// are atoms sent as Latin-1 (`atom_to_binary(Node, latin1)`), so bytes map one to one to chars.
fn node_name(bytes: &[u8], what: &'static str) -> Result<String, InvalidMessage> {
    let name: String = bytes.iter().map(|&b| char::from(b)).collect();
    let parts: Vec<&str> = name.split('@').collect();
    match parts.as_slice() {
        [n, h] if !n.is_empty() && !h.is_empty() => Ok(name),
        _ => Err(InvalidMessage::BadNodeName { what, name: excerpt(&name) }),
    }
}

fn excerpt(s: &str) -> String {
    s.chars().take(80).collect()
}

/// The digest of the challenge reply and ack: MD5 of the cookie followed by the challenge in
/// decimal (`dist_util:gen_digest/2`).
pub fn digest(challenge: u32, cookie: &[u8]) -> [u8; 16] {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(cookie);
    h.update(challenge.to_string().as_bytes());
    h.finalize().into()
}

/// What a probe learned: the node as it names itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    /// The exact node name, e.g. `app@10.244.0.5` or `app@app-0.app.shop.svc.cluster.local`.
    pub name: String,
    /// The node's distribution flags.
    pub flags: u64,
    /// The node's creation (incarnation); `None` from an OTP 22 or older node.
    pub creation: Option<u32>,
    /// The distribution protocol version of its challenge: 6 (OTP 23+) or 5.
    pub protocol_version: u16,
}

impl NodeIdentity {
    /// The node is hidden (it did not set `DFLAG_PUBLISHED` towards the probe). Nodes answer a
    /// hidden peer without `PUBLISHED`, so this is mostly informative.
    pub fn published(&self) -> bool {
        self.flags & flags::PUBLISHED != 0
    }
}

/// Where a handshake stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Status,
    Challenge,
    ChallengeAck,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Status => "before answering the name (no status)",
            Stage::Challenge => "after the status, before its challenge",
            Stage::ChallengeAck => "after the challenge reply, before its acknowledgement",
        })
    }
}

/// Flags a node must be given to talk to a pod running TLS distribution.
pub const TLS_FLAGS_HINT: &str = "-proto_dist inet_tls -ssl_dist_optfile FILE";

/// How a probe failed. Each message is one line: what was wrong, what to do.
#[derive(Debug, Error)]
pub enum ProbeError {
    #[error(
        "the node refused the probe name {PROBE_NAME} (status not_allowed: its net_kernel allow list does not include it); \
         add \"localhost\" to the allow list or give the node name yourself"
    )]
    NotAllowed,
    #[error(
        "another connection attempt named {PROBE_NAME} is in progress on the node (status {status}), still after one retry; \
         try again in a moment"
    )]
    Busy { status: &'static str },
    #[error(
        "the node runs TLS distribution (it answered with a TLS record); start the local node with {TLS_FLAGS_HINT}, \
         FILE giving a client certificate and key the pod's nodes trust"
    )]
    Tls,
    #[error(
        "the node closed the connection {stage}; it may run TLS distribution (then pass {TLS_FLAGS_HINT}), \
         be older than OTP 23, or refuse connections from this address (check its log)"
    )]
    Closed { stage: Stage },
    #[error("the node's answer is not an Erlang distribution handshake ({0}); is this port its distribution port?")]
    Garbage(#[from] InvalidMessage),
    #[error("the node's answer is not an Erlang distribution handshake ({0}); is this port its distribution port?")]
    BadFrame(FrameError),
    #[error("the node answered the name with an unexpected status {0:?}; is this port an Erlang distribution port?")]
    UnexpectedStatus(String),
    #[error("the node did not finish the handshake within {0:?}; is this port its distribution port, and is the node overloaded?")]
    Timeout(Duration),
    #[error("the connection to the node failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads length-prefixed handshake messages from a stream without ever buffering more than
/// one capped message (plus whatever arrived with it).
pub(crate) struct FrameReader {
    buf: Vec<u8>,
    max: usize,
}

/// Errors of [`FrameReader::next`].
pub(crate) enum ReadError {
    Closed,
    Frame(FrameError),
    Io(std::io::Error),
}

impl FrameReader {
    pub(crate) fn new(max: usize) -> Self {
        FrameReader { buf: Vec::new(), max }
    }

    /// The next message body.
    pub(crate) async fn next<S: AsyncRead + Unpin>(&mut self, stream: &mut S) -> Result<Vec<u8>, ReadError> {
        loop {
            match parse_frame(&self.buf, self.max) {
                Ok(Frame::Message { body, consumed }) => {
                    let body = body.to_vec();
                    self.buf.drain(..consumed);
                    return Ok(body);
                }
                Ok(Frame::Incomplete) => {}
                Err(e) => return Err(ReadError::Frame(e)),
            }
            let mut chunk = [0u8; 512];
            // Never read more than one capped frame ahead.
            let room = (self.max + 2).saturating_sub(self.buf.len()).clamp(1, chunk.len());
            let n = stream.read(&mut chunk[..room]).await.map_err(ReadError::Io)?;
            if n == 0 {
                return Err(ReadError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Bytes read past the last message (the first bytes of what follows the handshake).
    pub(crate) fn into_leftover(self) -> Vec<u8> {
        self.buf
    }
}

fn read_error(e: ReadError, stage: Stage) -> ProbeError {
    match e {
        ReadError::Closed => ProbeError::Closed { stage },
        ReadError::Frame(FrameError::Tls) => ProbeError::Tls,
        ReadError::Frame(e) => ProbeError::BadFrame(e),
        ReadError::Io(e) if is_reset(&e) => ProbeError::Closed { stage },
        ReadError::Io(e) => ProbeError::Io(e),
    }
}

pub(crate) fn is_reset(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof)
}

/// One probe over `stream`: send the probe name, read the status and the challenge, close.
/// Never sends a challenge reply. `nok`/`alive` come back as [`ProbeError::Busy`] (see
/// [`probe`] for the retry). The whole exchange is bounded by `timeout`.
pub async fn probe_stream<S>(mut stream: S, timeout: Duration) -> Result<NodeIdentity, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let result = tokio::time::timeout(timeout, exchange(&mut stream))
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)));
    // Close our side: the node's recv_challenge_reply sees `closed` and gives up quietly.
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.shutdown()).await;
    result
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> Result<NodeIdentity, ProbeError> {
    let send_name = encode_send_name(PROBE_NAME, flags::OTP25_HIDDEN_NODE, probe_creation())
        .expect("the probe name is short");
    stream.write_all(&send_name).await.map_err(|e| write_error(e, Stage::Status))?;
    stream.flush().await.map_err(|e| write_error(e, Stage::Status))?;
    let mut frames = FrameReader::new(MAX_HANDSHAKE_MESSAGE);
    let status = frames.next(stream).await.map_err(|e| read_error(e, Stage::Status))?;
    match parse_status(&status)? {
        Status::Ok | Status::OkSimultaneous => {}
        Status::Nok => return Err(ProbeError::Busy { status: "nok" }),
        Status::Alive => {
            // Not us: tell the node to keep the connection it has.
            if let Some(no) = encode_status("false") {
                let _ = stream.write_all(&no).await;
            }
            return Err(ProbeError::Busy { status: "alive" });
        }
        Status::NotAllowed => return Err(ProbeError::NotAllowed),
        Status::Named { name, .. } => return Err(ProbeError::UnexpectedStatus(format!("named:{name}"))),
        Status::Other(text) => return Err(ProbeError::UnexpectedStatus(excerpt(&text))),
    }
    let challenge = frames.next(stream).await.map_err(|e| read_error(e, Stage::Challenge))?;
    let c = parse_challenge(&challenge)?;
    Ok(NodeIdentity { name: c.name, flags: c.flags, creation: c.creation, protocol_version: c.version })
}

fn write_error(e: std::io::Error, stage: Stage) -> ProbeError {
    if is_reset(&e) { ProbeError::Closed { stage } } else { ProbeError::Io(e) }
}

/// A creation for the probe's `send_name`. Nodes only store it with the pending connection.
fn probe_creation() -> u32 {
    // Creation 0 means "none" to OTP; any other value will do. Use the process id so
    // two beamredir processes differ.
    std::process::id().max(1)
}

/// Probes a node, opening a stream with `connect` for each attempt: once, and once more after
/// [`BUSY_RETRY_WAIT`] if the node answers `nok` or `alive` (another probe in flight). Each
/// attempt is bounded by `timeout`; an error of `connect` is returned as [`ProbeError::Io`].
pub async fn probe<S, F, Fut>(mut connect: F, timeout: Duration) -> Result<NodeIdentity, ProbeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    F: FnMut() -> Fut,
    Fut: Future<Output = std::io::Result<S>>,
{
    let first = probe_stream(connect().await?, timeout).await;
    match first {
        Err(ProbeError::Busy { .. }) => {
            tokio::time::sleep(BUSY_RETRY_WAIT).await;
            probe_stream(connect().await?, timeout).await
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    // Captured on Debian's OTP 25.2.3: `erl -name dbg@127.0.0.1 -hidden` pinging
    // `erl -name app@127.0.0.1`, through a recording relay.
    const CAPTURED_SEND_NAME: &str = "001c4e0000000d07df7fbc7951bfbb000d646267403132372e302e302e31";
    const CAPTURED_STATUS: &str = "0003736f6b";
    const CAPTURED_CHALLENGE: &str = "00204e0000000d07df7fbd61a25e376b0d3ed0000d617070403132372e302e302e31";
    const CAPTURED_REPLY: &str = "001572983f307440d0af0c2802ca899a76ec552e1e222a";
    const CAPTURED_ACK: &str = "00116160cd535289be1c52e7b5d30aa0f3e6ff";
    // A TLS distribution node (`-proto_dist inet_tls`, OTP 25.2.3) answering a plain send_name.
    const CAPTURED_TLS_ALERT: &str = "1503030002020a";

    fn body(hex: &str) -> Vec<u8> {
        let bytes = unhex(hex);
        match parse_frame(&bytes, MAX_HANDSHAKE_MESSAGE).unwrap() {
            Frame::Message { body, consumed } => {
                assert_eq!(consumed, bytes.len());
                body.to_vec()
            }
            Frame::Incomplete => panic!("incomplete"),
        }
    }

    #[test]
    fn our_send_name_is_byte_for_byte_what_otp_25_sends() {
        let captured = unhex(CAPTURED_SEND_NAME);
        let creation = u32::from_be_bytes(captured[11..15].try_into().unwrap());
        assert_eq!(encode_send_name("dbg@127.0.0.1", flags::OTP25_HIDDEN_NODE, creation).unwrap(), captured);
        assert_eq!(flags::OTP25_HIDDEN_NODE, 0xD_07DF_7FBC);
        assert_eq!(flags::OTP25_HIDDEN_NODE & flags::MANDATORY, flags::MANDATORY);
    }

    #[test]
    fn parses_captured_status_and_challenge() {
        assert_eq!(parse_status(&body(CAPTURED_STATUS)).unwrap(), Status::Ok);
        let c = parse_challenge(&body(CAPTURED_CHALLENGE)).unwrap();
        assert_eq!(
            c,
            Challenge {
                version: 6,
                flags: 0xD_07DF_7FBD,
                challenge: 0x61a2_5e37,
                creation: Some(0x6b0d_3ed0),
                name: "app@127.0.0.1".into()
            }
        );
    }

    #[test]
    fn captured_reply_and_ack_match_the_digest_function() {
        // The cookie of that capture was "c".
        let c = parse_challenge(&body(CAPTURED_CHALLENGE)).unwrap();
        let reply = body(CAPTURED_REPLY);
        assert_eq!(reply[0], b'r');
        assert_eq!(&reply[5..], digest(c.challenge, b"c"));
        let our_challenge = u32::from_be_bytes(reply[1..5].try_into().unwrap());
        assert_eq!(parse_challenge_ack(&body(CAPTURED_ACK)).unwrap(), digest(our_challenge, b"c"));
        assert_eq!(encode_challenge_reply(our_challenge, digest(c.challenge, b"c")), unhex(CAPTURED_REPLY));
    }

    #[test]
    fn tls_alert_is_recognised() {
        assert_eq!(parse_frame(&unhex(CAPTURED_TLS_ALERT), MAX_HANDSHAKE_MESSAGE), Err(FrameError::Tls));
        assert_eq!(parse_frame(&[0x16, 0x03], MAX_HANDSHAKE_MESSAGE), Err(FrameError::Tls));
        // One byte is not enough to tell.
        assert_eq!(parse_frame(&[0x15], MAX_HANDSHAKE_MESSAGE), Ok(Frame::Incomplete));
        // A plain frame of that length would be far over the cap anyway.
        assert!(u16::from_be_bytes([20, 3]) as usize > MAX_HANDSHAKE_MESSAGE);
    }

    #[test]
    fn frames_are_capped_and_never_empty() {
        assert_eq!(parse_frame(&[0, 0], 1024), Err(FrameError::Empty));
        assert_eq!(parse_frame(&[4, 1], 1024), Err(FrameError::TooLarge { len: 1025, max: 1024 }));
        assert_eq!(parse_frame(&[0, 3, b's', b'o'], 1024), Ok(Frame::Incomplete));
    }

    #[test]
    fn statuses() {
        for (text, want) in [
            (&b"sok_simultaneous"[..], Status::OkSimultaneous),
            (b"snok", Status::Nok),
            (b"snot_allowed", Status::NotAllowed),
            (b"salive", Status::Alive),
            (b"sweird", Status::Other("weird".into())),
        ] {
            assert_eq!(parse_status(text).unwrap(), want);
        }
        let mut named = b"snamed:".to_vec();
        named.extend_from_slice(&[0, 6]);
        named.extend_from_slice(b"x@host");
        named.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(parse_status(&named).unwrap(), Status::Named { name: "x@host".into(), creation: 7 });
        assert!(matches!(parse_status(b"snamed:\0\x09x@h"), Err(InvalidMessage::Truncated { .. })));
        assert!(matches!(parse_status(b"xok"), Err(InvalidMessage::UnexpectedTag { tag: b'x', .. })));
        assert!(parse_status(b"").is_err());
    }

    #[test]
    fn old_format_challenge() {
        let mut b = vec![b'n', 0, 5];
        b.extend_from_slice(&0x3_7ffdu32.to_be_bytes());
        b.extend_from_slice(&42u32.to_be_bytes());
        b.extend_from_slice(b"old@host");
        let c = parse_challenge(&b).unwrap();
        assert_eq!((c.version, c.flags, c.challenge, c.creation, c.name.as_str()), (5, 0x3_7ffd, 42, None, "old@host"));
        b[2] = 6;
        assert_eq!(parse_challenge(&b), Err(InvalidMessage::BadVersion { version: 6 }));
    }

    #[test]
    fn challenge_names_must_be_name_at_host() {
        for bad in [&b"nohost"[..], b"@host", b"name@", b"a@b@c", b""] {
            let mut b = vec![b'N'];
            b.extend_from_slice(&[0; 16]);
            b.extend_from_slice(&(bad.len() as u16).to_be_bytes());
            b.extend_from_slice(bad);
            assert!(matches!(parse_challenge(&b), Err(InvalidMessage::BadNodeName { .. })), "{bad:?}");
        }
        // Latin-1 bytes are chars, as OTP sends atoms.
        let mut b = vec![b'N'];
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&[0, 5, b'\xe9', b'@', b'h', b'o', b's']);
        assert_eq!(parse_challenge(&b).unwrap().name, "é@hos");
    }

    /// A scripted peer: what a node sends back, then whether it closes.
    async fn run_probe(reply: Vec<u8>) -> (Result<NodeIdentity, ProbeError>, Vec<u8>) {
        let (client, mut server) = tokio::io::duplex(4096);
        let peer = tokio::spawn(async move {
            let mut got = vec![0u8; 0];
            let mut buf = [0u8; 256];
            // Read the send_name, answer, then read until the probe closes.
            let n = server.read(&mut buf).await.unwrap();
            got.extend_from_slice(&buf[..n]);
            server.write_all(&reply).await.unwrap();
            // The node has said all it will say.
            server.shutdown().await.unwrap();
            loop {
                match server.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            got
        });
        let r = probe_stream(client, Duration::from_secs(2)).await;
        (r, peer.await.unwrap())
    }

    #[tokio::test]
    async fn probe_reads_the_name_and_never_replies_to_the_challenge() {
        let mut reply = unhex(CAPTURED_STATUS);
        reply.extend(unhex(CAPTURED_CHALLENGE));
        let (r, sent) = run_probe(reply).await;
        let id = r.unwrap();
        assert_eq!((id.name.as_str(), id.creation, id.protocol_version), ("app@127.0.0.1", Some(0x6b0d_3ed0), 6));
        // Only the send_name went out: no challenge reply.
        let expect = encode_send_name(PROBE_NAME, flags::OTP25_HIDDEN_NODE, probe_creation()).unwrap();
        assert_eq!(sent, expect);
    }

    #[tokio::test]
    async fn probe_outcomes() {
        let (r, _) = run_probe(unhex("000c736e6f745f616c6c6f776564")).await;
        assert!(matches!(r, Err(ProbeError::NotAllowed)), "{r:?}");
        let (r, _) = run_probe(unhex("0004736e6f6b")).await;
        assert!(matches!(r, Err(ProbeError::Busy { status: "nok" })), "{r:?}");
        let (r, sent) = run_probe(unhex("000673616c697665")).await;
        assert!(matches!(r, Err(ProbeError::Busy { status: "alive" })), "{r:?}");
        assert!(sent.ends_with(b"\x00\x06sfalse"), "answers alive with false");
        let (r, _) = run_probe(unhex(CAPTURED_TLS_ALERT)).await;
        assert!(matches!(r, Err(ProbeError::Tls)), "{r:?}");
        assert!(r.unwrap_err().to_string().contains("-proto_dist inet_tls -ssl_dist_optfile FILE"));
        let (r, _) = run_probe(vec![]).await;
        assert!(matches!(r, Err(ProbeError::Closed { stage: Stage::Status })), "{r:?}");
        let (r, _) = run_probe(unhex(CAPTURED_STATUS)).await;
        assert!(matches!(r, Err(ProbeError::Closed { stage: Stage::Challenge })), "{r:?}");
        let (r, _) = run_probe(b"HTTP/1.1 400 Bad Request\r\n".to_vec()).await;
        assert!(matches!(r, Err(ProbeError::BadFrame(FrameError::TooLarge { .. }))), "{r:?}");
        let (r, _) = run_probe(unhex("0003736f6b0003787878")).await;
        assert!(matches!(r, Err(ProbeError::Garbage(InvalidMessage::UnexpectedTag { .. }))), "{r:?}");
    }

    #[tokio::test]
    async fn probe_is_bounded_in_time() {
        let (client, _server) = tokio::io::duplex(64);
        let t = std::time::Instant::now();
        let r = probe_stream(client, Duration::from_millis(200)).await;
        assert!(matches!(r, Err(ProbeError::Timeout(_))), "{r:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn probe_retries_once_when_busy() {
        let mut attempts = 0;
        let r = probe(
            || {
                attempts += 1;
                let n = attempts;
                async move {
                    let (client, mut server) = tokio::io::duplex(4096);
                    tokio::spawn(async move {
                        let mut buf = [0u8; 256];
                        let _ = server.read(&mut buf).await;
                        let reply = if n == 1 {
                            unhex("0004736e6f6b")
                        } else {
                            [unhex(CAPTURED_STATUS), unhex(CAPTURED_CHALLENGE)].concat()
                        };
                        let _ = server.write_all(&reply).await;
                        let _ = server.read(&mut buf).await;
                    });
                    Ok(client)
                }
            },
            Duration::from_secs(2),
        )
        .await;
        assert_eq!(r.unwrap().name, "app@127.0.0.1");
        assert_eq!(attempts, 2);
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), max in 0usize..2048) {
            let _ = parse_frame(&bytes, max);
            let _ = parse_status(&bytes);
            let _ = parse_challenge(&bytes);
            let _ = parse_challenge_ack(&bytes);
        }

        #[test]
        fn consumed_is_within_the_buffer_and_the_cap(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Frame::Message { body, consumed }) = parse_frame(&bytes, 300) {
                prop_assert!(consumed <= bytes.len());
                prop_assert!(body.len() <= 300);
                prop_assert_eq!(consumed, body.len() + 2);
            }
        }

        #[test]
        fn challenge_round_trips(flags_ in any::<u64>(), ch in any::<u32>(), cr in any::<u32>(),
                                 n in "[a-z0-9_-]{1,20}", h in "[a-z0-9.-]{1,40}") {
            let name = format!("{n}@{h}");
            let mut b = vec![b'N'];
            b.extend_from_slice(&flags_.to_be_bytes());
            b.extend_from_slice(&ch.to_be_bytes());
            b.extend_from_slice(&cr.to_be_bytes());
            b.extend_from_slice(&(name.len() as u16).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
            let c = parse_challenge(&b).unwrap();
            prop_assert_eq!(c, Challenge { version: 6, flags: flags_, challenge: ch, creation: Some(cr), name });
        }

        #[test]
        fn probe_never_panics_on_any_answer(reply in proptest::collection::vec(any::<u8>(), 0..300)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (r, _) = run_probe(reply).await;
                // Whatever came back, it is an answer, not a hang or a panic.
                let _ = r;
            });
        }
    }
}
