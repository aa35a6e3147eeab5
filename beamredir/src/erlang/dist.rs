//! An authenticated Erlang distribution connection over any stream (a port-forward, a TCP
//! connection): the full handshake with a cookie, then distribution messages.
//!
//! The local side is a **hidden node with a dynamic name** (`DFLAG_NAME_ME`, OTP 23+): it
//! sends only a host name and the node assigns `RANDOM@HOST`. Nothing is registered anywhere,
//! no atom is left per call (the node recycles dynamic names per host), and the node never
//! meshes with us. The flags advertised are OTP's mandatory set plus what this module
//! understands: no atom cache (`DIST_HDR_ATOM_CACHE`) and no fragments, so every message
//! arrives as one pass-through frame `[Len:4] 112 Control [Message]`, which is capped.
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{
    cookie::Cookie,
    etf::{self, EtfError, Limits, Term},
    handshake::{
        self, FrameReader, InvalidMessage, MAX_HANDSHAKE_MESSAGE, NodeIdentity, ReadError, Stage, Status, TLS_FLAGS_HINT,
        flags,
    },
};

/// Flags of the local side: what OTP 25-27 require of a peer, plus names and monitors.
pub const CLIENT_FLAGS: u64 = flags::MANDATORY | flags::NAME_ME | flags::DIST_MONITOR | flags::DIST_MONITOR_NAME;

/// The host part sent with `NAME_ME`; the node calls us `RANDOM@localhost`.
pub const CLIENT_HOST: &str = "localhost";

/// Largest distribution message accepted by default (a formatted result of a few MiB fits).
pub const DEFAULT_MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// Pass-through message type byte.
const PASS_THROUGH: u8 = 112;

/// How a connection failed. One line each: what was wrong, what to do.
#[derive(Debug, Error)]
pub enum DistError {
    #[error(
        "the node rejected the cookie (it closed the connection after our challenge reply); its log now shows \
         \"** Connection attempt from node '{local}' rejected. Invalid challenge reply. **\"; give the right cookie \
         (--cookie-file, ERLANG_COOKIE/RELEASE_COOKIE, or the pod's RELEASE_COOKIE)"
    )]
    WrongCookie { local: String },
    #[error("the node's challenge ack does not match our cookie: the peer is not the node it claims to be, or it misbehaves")]
    BadAck,
    #[error("the node refused our connection (status not_allowed: its net_kernel allow list does not include host {CLIENT_HOST:?})")]
    NotAllowed,
    #[error("the node runs TLS distribution; start a local node with {TLS_FLAGS_HINT} instead of connecting directly")]
    Tls,
    #[error(
        "the node closed the connection {0}; it may run TLS distribution (then pass {TLS_FLAGS_HINT}), be older than \
         OTP 23 (dynamic names need 23), or refuse this address"
    )]
    Closed(Stage),
    #[error("the node answered with an unexpected status {0:?}; dynamic names need OTP 23 or later on the node")]
    UnexpectedStatus(String),
    #[error("the node's handshake is malformed ({0})")]
    Handshake(#[from] InvalidMessage),
    #[error("the node's handshake is malformed ({0})")]
    Frame(handshake::FrameError),
    #[error("the node sent a {len}-byte message, over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("the node sent a malformed distribution message ({0})")]
    Malformed(String),
    #[error("the node sent a malformed term ({0})")]
    Term(#[from] EtfError),
    #[error("the node closed the connection")]
    ClosedByPeer,
    #[error("the node did not complete the handshake within {0:?}")]
    Timeout(Duration),
    #[error("the connection to the node failed: {0}")]
    Io(#[from] std::io::Error),
}

/// One received distribution message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub control: Term,
    /// The payload of `SEND`, `REG_SEND`, `SEND_SENDER` and friends.
    pub payload: Option<Term>,
}

/// An established connection.
pub struct DistConnection<S> {
    stream: S,
    /// Bytes read but not yet consumed.
    buf: Vec<u8>,
    /// Our node name as the node assigned it.
    local_name: String,
    local_creation: u32,
    peer: NodeIdentity,
    max_message: usize,
    limits: Limits,
}

impl<S: AsyncRead + AsyncWrite + Unpin> DistConnection<S> {
    /// Performs the whole handshake as a hidden node with a dynamic name, bounded by `timeout`.
    pub async fn connect(mut stream: S, cookie: &Cookie, timeout: Duration) -> Result<Self, DistError> {
        match tokio::time::timeout(timeout, handshake_client(&mut stream, cookie)).await {
            Ok(Ok((local_name, local_creation, peer, leftover))) => Ok(DistConnection {
                stream,
                buf: leftover,
                local_name,
                local_creation,
                peer,
                max_message: DEFAULT_MAX_MESSAGE,
                limits: Limits::default(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DistError::Timeout(timeout)),
        }
    }

    /// Caps the size of one received message (default [`DEFAULT_MAX_MESSAGE`]).
    pub fn set_max_message(&mut self, max: usize) {
        self.max_message = max;
    }

    /// The node we are connected to, as it named itself in its challenge.
    pub fn peer(&self) -> &NodeIdentity {
        &self.peer
    }

    /// Our dynamic name, e.g. `Q2N4X0CDLD8F@localhost`.
    pub fn local_name(&self) -> &str {
        &self.local_name
    }

    /// A pid of ours (there are no processes here: any id serves as an address).
    pub fn local_pid(&self, id: u32) -> etf::Pid {
        etf::Pid { node: self.local_name.clone(), id, serial: 0, creation: self.local_creation }
    }

    /// A reference of ours.
    pub fn make_ref(&self, n: u32) -> etf::Reference {
        etf::Reference { node: self.local_name.clone(), creation: self.local_creation, ids: vec![n, rand_u32(), rand_u32()] }
    }

    /// Sends one message: a control tuple and an optional payload.
    pub async fn send(&mut self, control: &Term, payload: Option<&Term>) -> Result<(), DistError> {
        let mut body = vec![PASS_THROUGH];
        body.extend(etf::encode(control));
        if let Some(p) = payload {
            body.extend(etf::encode(p));
        }
        let len = u32::try_from(body.len()).map_err(|_| DistError::Malformed("message too large to send".into()))?;
        self.stream.write_all(&len.to_be_bytes()).await?;
        self.stream.write_all(&body).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Sends a tick (an empty message), which keeps the node from dropping an idle connection.
    pub async fn tick(&mut self) -> Result<(), DistError> {
        self.stream.write_all(&[0, 0, 0, 0]).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// The next message. Ticks from the node are answered and skipped.
    pub async fn recv(&mut self) -> Result<Message, DistError> {
        loop {
            let frame = self.read_frame().await?;
            if frame.is_empty() {
                self.tick().await?;
                continue;
            }
            return parse_message(&frame, self.limits);
        }
    }

    async fn read_frame(&mut self) -> Result<Vec<u8>, DistError> {
        loop {
            if let Some(prefix) = self.buf.get(..4) {
                let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
                if len > self.max_message {
                    return Err(DistError::TooLarge { len, max: self.max_message });
                }
                if self.buf.len() >= 4 + len {
                    let frame = self.buf[4..4 + len].to_vec();
                    self.buf.drain(..4 + len);
                    return Ok(frame);
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(DistError::ClosedByPeer);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Closes our side of the stream.
    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_millis(500), self.stream.shutdown()).await;
    }
}

/// Parses one non-empty distribution frame: `112`, the control term, an optional payload.
pub fn parse_message(frame: &[u8], limits: Limits) -> Result<Message, DistError> {
    let Some((&kind, rest)) = frame.split_first() else {
        return Err(DistError::Malformed("empty message".into()));
    };
    if kind != PASS_THROUGH {
        return Err(DistError::Malformed(format!("message type {kind} (only pass-through, 112, was negotiated)")));
    }
    let (control, used) = etf::decode(rest, limits)?;
    let rest = &rest[used..];
    let payload = if rest.is_empty() {
        None
    } else {
        let (p, used) = etf::decode(rest, limits)?;
        if used != rest.len() {
            return Err(DistError::Malformed(format!("{} bytes after the payload", rest.len() - used)));
        }
        Some(p)
    };
    if !matches!(control.as_tuple(), Some([Term::Int(_), ..])) {
        return Err(DistError::Malformed(format!("control message is not a tuple with an operation: {control}")));
    }
    Ok(Message { control, payload })
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    if getrandom::fill(&mut b).is_err() {
        // Uniqueness only matters within one connection.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        return t.subsec_nanos() ^ std::process::id();
    }
    u32::from_be_bytes(b)
}

type Handshaken = (String, u32, NodeIdentity, Vec<u8>);

async fn handshake_client<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, cookie: &Cookie) -> Result<Handshaken, DistError> {
    let send_name = handshake::encode_send_name(CLIENT_HOST, CLIENT_FLAGS, 0).expect("short host name");
    stream.write_all(&send_name).await.map_err(|e| closed_or_io(e, Stage::Status))?;
    stream.flush().await.map_err(|e| closed_or_io(e, Stage::Status))?;
    let mut frames = FrameReader::new(MAX_HANDSHAKE_MESSAGE);
    let status = frames.next(stream).await.map_err(|e| read_err(e, Stage::Status))?;
    let (local_name, local_creation) = match handshake::parse_status(&status)? {
        Status::Named { name, creation } => (name, creation),
        Status::NotAllowed => return Err(DistError::NotAllowed),
        Status::Ok => return Err(DistError::UnexpectedStatus("ok".into())),
        Status::OkSimultaneous => return Err(DistError::UnexpectedStatus("ok_simultaneous".into())),
        Status::Nok => return Err(DistError::UnexpectedStatus("nok".into())),
        Status::Alive => return Err(DistError::UnexpectedStatus("alive".into())),
        Status::Other(s) => return Err(DistError::UnexpectedStatus(s.chars().take(80).collect())),
    };
    if local_name.rsplit_once('@').map(|(_, h)| h) != Some(CLIENT_HOST) {
        return Err(DistError::Handshake(InvalidMessage::BadNodeName { what: "named status", name: local_name }));
    }
    let challenge = frames.next(stream).await.map_err(|e| read_err(e, Stage::Challenge))?;
    let c = handshake::parse_challenge(&challenge)?;
    let ours = rand_u32();
    let reply = handshake::encode_challenge_reply(ours, handshake::digest(c.challenge, cookie.expose().as_bytes()));
    stream.write_all(&reply).await.map_err(|e| closed_or_io(e, Stage::ChallengeAck))?;
    stream.flush().await.map_err(|e| closed_or_io(e, Stage::ChallengeAck))?;
    let ack = match frames.next(stream).await {
        Ok(ack) => ack,
        // Closing right after a reply is how a node says "wrong cookie".
        Err(ReadError::Closed) => return Err(DistError::WrongCookie { local: local_name }),
        Err(ReadError::Io(e)) if handshake::is_reset(&e) => return Err(DistError::WrongCookie { local: local_name }),
        Err(e) => return Err(read_err(e, Stage::ChallengeAck)),
    };
    if handshake::parse_challenge_ack(&ack)? != handshake::digest(ours, cookie.expose().as_bytes()) {
        return Err(DistError::BadAck);
    }
    let peer = NodeIdentity { name: c.name, flags: c.flags, creation: c.creation, protocol_version: c.version };
    Ok((local_name, local_creation, peer, frames.into_leftover()))
}

fn read_err(e: ReadError, stage: Stage) -> DistError {
    match e {
        ReadError::Closed => DistError::Closed(stage),
        ReadError::Frame(handshake::FrameError::Tls) => DistError::Tls,
        ReadError::Frame(e) => DistError::Frame(e),
        ReadError::Io(e) => closed_or_io(e, stage),
    }
}

fn closed_or_io(e: std::io::Error, stage: Stage) -> DistError {
    if handshake::is_reset(&e) { DistError::Closed(stage) } else { DistError::Io(e) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cookie(s: &str) -> Cookie {
        Cookie::new(s).unwrap()
    }

    fn frame16(body: &[u8]) -> Vec<u8> {
        let mut v = (body.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(body);
        v
    }

    fn named(name: &str, creation: u32) -> Vec<u8> {
        let mut b = b"snamed:".to_vec();
        b.extend_from_slice(&(name.len() as u16).to_be_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&creation.to_be_bytes());
        frame16(&b)
    }

    fn challenge(ch: u32) -> Vec<u8> {
        let mut b = vec![b'N'];
        b.extend_from_slice(&0xD_07DF_7FBDu64.to_be_bytes());
        b.extend_from_slice(&ch.to_be_bytes());
        b.extend_from_slice(&9u32.to_be_bytes());
        b.extend_from_slice(&[0, 8]);
        b.extend_from_slice(b"app@pod0");
        frame16(&b)
    }

    /// A scripted node: acknowledges any reply with a digest made from `cookie` (None: closes
    /// after the reply, as a node does on a wrong cookie).
    async fn node(mut s: tokio::io::DuplexStream, cookie: Option<&'static str>) {
        let mut frames = FrameReader::new(1024);
        let Ok(name) = frames.next(&mut s).await else { return };
        assert_eq!(&name[..1], b"N");
        assert_eq!(u64::from_be_bytes(name[1..9].try_into().unwrap()), CLIENT_FLAGS);
        s.write_all(&named("XYZ@localhost", 77)).await.unwrap();
        s.write_all(&challenge(1234)).await.unwrap();
        let Ok(reply) = frames.next(&mut s).await else { return };
        let Some(cookie) = cookie else { return };
        let theirs = u32::from_be_bytes(reply[1..5].try_into().unwrap());
        let mut ack = vec![b'a'];
        ack.extend_from_slice(&handshake::digest(theirs, cookie.as_bytes()));
        s.write_all(&frame16(&ack)).await.unwrap();
        // A tick, then a message.
        s.write_all(&[0, 0, 0, 0]).await.unwrap();
        let ctl = etf::encode(&Term::tuple(vec![Term::Int(2), Term::atom(""), Term::atom("x")]));
        let msg = etf::encode(&Term::atom("hello"));
        let mut body = vec![PASS_THROUGH];
        body.extend(ctl);
        body.extend(msg);
        s.write_all(&(body.len() as u32).to_be_bytes()).await.unwrap();
        s.write_all(&body).await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    }

    #[tokio::test]
    async fn handshake_with_dynamic_name_then_messages() {
        let (client, server) = tokio::io::duplex(4096);
        tokio::spawn(node(server, Some("secret")));
        let mut c = DistConnection::connect(client, &cookie("secret"), Duration::from_secs(2)).await.unwrap();
        assert_eq!((c.local_name(), c.peer().name.as_str()), ("XYZ@localhost", "app@pod0"));
        let m = c.recv().await.unwrap();
        assert_eq!(m.payload, Some(Term::atom("hello")));
    }

    #[tokio::test]
    async fn a_close_after_the_reply_is_a_wrong_cookie() {
        let (client, server) = tokio::io::duplex(4096);
        tokio::spawn(node(server, None));
        let e = DistConnection::connect(client, &cookie("wrong"), Duration::from_secs(2)).await.err().unwrap();
        assert!(matches!(e, DistError::WrongCookie { ref local } if local == "XYZ@localhost"), "{e}");
        assert!(e.to_string().contains("Invalid challenge reply"));
    }

    #[tokio::test]
    async fn a_bad_ack_is_refused() {
        let (client, server) = tokio::io::duplex(4096);
        tokio::spawn(node(server, Some("other")));
        let e = DistConnection::connect(client, &cookie("secret"), Duration::from_secs(2)).await.err();
        assert!(matches!(e, Some(DistError::BadAck)), "{e:?}");
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_before_reading_them() {
        let (client, mut server) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut frames = FrameReader::new(1024);
            let _ = frames.next(&mut server).await;
            server.write_all(&named("XYZ@localhost", 1)).await.unwrap();
            server.write_all(&challenge(5)).await.unwrap();
            let reply = frames.next(&mut server).await.unwrap_or_default();
            let theirs = u32::from_be_bytes(reply[1..5].try_into().unwrap());
            let mut ack = vec![b'a'];
            ack.extend_from_slice(&handshake::digest(theirs, b"k"));
            server.write_all(&frame16(&ack)).await.unwrap();
            server.write_all(&0xffff_fff0u32.to_be_bytes()).await.unwrap();
            let _ = server.read_to_end(&mut Vec::new()).await;
        });
        let mut c = DistConnection::connect(client, &cookie("k"), Duration::from_secs(2)).await.unwrap();
        assert!(matches!(c.recv().await, Err(DistError::TooLarge { .. })));
    }

    proptest! {
        #[test]
        fn parse_message_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_message(&bytes, Limits::default());
            let mut b = vec![PASS_THROUGH, 131];
            b.extend_from_slice(&bytes);
            let _ = parse_message(&b, Limits::default());
        }
    }
}
