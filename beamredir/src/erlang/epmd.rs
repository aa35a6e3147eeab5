//! The EPMD protocol as seen by beamredir's epmd forward. This module is pure (no I/O): the relay
//! feeds it the bytes of one epmd TCP connection and acts on the [`Event`]s it returns.
//!
//! Wire format (OTP "Distribution Protocol", EPMD section; codes from `erts/epmd/src/epmd.h`,
//! behaviour from `erts/epmd/src/epmd_srv.c`):
//! * a request is `[Len:2][Code:1][Body:Len-1]`, big-endian; epmd rejects `Len == 0`;
//! * answers have no length prefix: `PORT2_RESP` and `ALIVE2_(X_)RESP` are self-delimiting,
//!   and the `NAMES` answer (`[EPMDPort:4]` then `name N at port P\n` lines) ends when epmd
//!   closes the connection;
//! * clients open one connection per request, and epmd closes it after answering (except after
//!   `ALIVE2_REQ`, where the connection is the node's registration and stays open silently).
//!
//! Node names are decoded with [`String::from_utf8_lossy`]. epmd itself rejects names that are
//! not UTF-8 (`verify_utf8` in `epmd_srv.c`), so the lossy step only alters names of requests
//! epmd refuses anyway, and the API can stay with plain `String`s.

use thiserror::Error;

use super::reader::Reader;

/// `ALIVE2_X_RESP` ('v'): registration answer with a 32-bit creation (distribution version ≥ 6).
pub const ALIVE2_X_RESP: u8 = b'v';
/// `PORT2_RESP` ('w').
pub const PORT2_RESP: u8 = b'w';
/// `ALIVE2_REQ` ('x'): a local node registers its distribution port.
pub const ALIVE2_REQ: u8 = b'x';
/// `ALIVE2_RESP` ('y'): registration answer with a 16-bit creation.
pub const ALIVE2_RESP: u8 = b'y';
/// `PORT_PLEASE2_REQ` ('z'): which port does node NAME listen on?
pub const PORT_PLEASE2_REQ: u8 = b'z';
/// `NAMES_REQ` ('n').
pub const NAMES_REQ: u8 = b'n';
/// `DUMP_REQ` ('d'), interactive `epmd -d -names`; not interpreted here.
pub const DUMP_REQ: u8 = b'd';
/// `KILL_REQ` ('k'), `epmd -kill`; not interpreted here.
pub const KILL_REQ: u8 = b'k';
/// `STOP_REQ` ('s'), `epmd -stop NAME`; not interpreted here.
pub const STOP_REQ: u8 = b's';

/// Most bytes an [`EpmdConversation`] buffers per direction before it stops parsing. Real
/// requests are far smaller (epmd refuses anything over its `INBUF_SIZE`, about 3 KiB), and a
/// 64 KiB NAMES answer lists some 2000 nodes.
pub const MAX_BUFFERED: usize = 64 * 1024;

/// Result of trying to parse from a buffer that may hold a partial message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed<T> {
    /// More bytes are needed; nothing is wrong so far.
    Incomplete,
    /// A whole message: `consumed` bytes from the start of the buffer.
    Complete { value: T, consumed: usize },
    /// The bytes cannot be (the start of) a valid message, whatever follows.
    Invalid(InvalidReason),
}

/// Why bytes are not a valid epmd message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum InvalidReason {
    #[error("request length is 0")]
    EmptyRequest,
    #[error("{what} ends inside its fields")]
    Truncated { what: &'static str },
    #[error("{what} has an empty node name")]
    EmptyNodeName { what: &'static str },
    #[error("{what} has a NUL byte in its node name")]
    NulInNodeName { what: &'static str },
    #[error("expected {expected}, got code {code}")]
    UnexpectedCode { expected: &'static str, code: u8 },
    #[error("NAMES response ends inside a line")]
    PartialNamesLine,
    #[error("NAMES response line is not `name NAME at port PORT`: {line:?}")]
    BadNamesLine { line: String },
}

/// A client request (the bytes after the length prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `PORT_PLEASE2_REQ`: `name` is the node name without `@host`.
    PortPlease2 { name: String },
    /// `NAMES_REQ`.
    Names,
    /// `ALIVE2_REQ`: a node registering. Seen through a forward only if a local node registers
    /// with the pod's epmd, which epmd accepts because the forward's peer is local to it.
    Alive2(NodeEntry),
    /// Any other code (DUMP, KILL, STOP, garbage): relayed without interpretation.
    Other { code: u8 },
}

/// A node's entry in epmd: what `ALIVE2_REQ` registers and `PORT2_RESP` (result 0) returns,
/// the same fields in the same order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    pub port: u16,
    pub node_type: u8,
    pub protocol: u8,
    pub highest_version: u16,
    pub lowest_version: u16,
    pub name: String,
    pub extra: Vec<u8>,
}

/// A `PORT2_RESP`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Port2Resp {
    Found(NodeEntry),
    /// Any non-zero result; epmd sends 1 and then closes.
    NotFound {
        result: u8,
    },
}

/// A NAMES response as far as it has arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamesResp {
    pub epmd_port: u32,
    pub nodes: Vec<(String, u16)>,
}

/// An `ALIVE2_RESP` (16-bit creation) or `ALIVE2_X_RESP` (32-bit creation, `extended`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alive2Resp {
    pub result: u8,
    pub creation: u32,
    pub extended: bool,
}

/// Parses one length-prefixed client request from the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Parsed<Request> {
    let mut r = Reader::new(buf);
    let Some(len) = r.u16() else {
        return Parsed::Incomplete;
    };
    if len == 0 {
        return Parsed::Invalid(InvalidReason::EmptyRequest);
    }
    let Some(body) = r.bytes(usize::from(len)) else {
        return Parsed::Incomplete;
    };
    match parse_request_body(body) {
        Ok(value) => Parsed::Complete {
            value,
            consumed: r.pos,
        },
        Err(reason) => Parsed::Invalid(reason),
    }
}

fn parse_request_body(body: &[u8]) -> Result<Request, InvalidReason> {
    let Some((&code, rest)) = body.split_first() else {
        return Err(InvalidReason::EmptyRequest);
    };
    match code {
        PORT_PLEASE2_REQ => parse_port_please2(rest),
        NAMES_REQ => Ok(Request::Names),
        ALIVE2_REQ => parse_alive2_req(rest),
        code => Ok(Request::Other { code }),
    }
}

fn parse_port_please2(name: &[u8]) -> Result<Request, InvalidReason> {
    const WHAT: &str = "PORT_PLEASE2_REQ";
    // epmd drops one trailing NUL (C clients send the terminator) before checking the name.
    let name = name.strip_suffix(&[0]).unwrap_or(name);
    Ok(Request::PortPlease2 {
        name: node_name(name, WHAT)?,
    })
}

fn parse_alive2_req(fields: &[u8]) -> Result<Request, InvalidReason> {
    const WHAT: &str = "ALIVE2_REQ";
    // Bytes after Extra are ignored, as epmd does.
    let entry =
        read_node_entry(&mut Reader::new(fields)).ok_or(InvalidReason::Truncated { what: WHAT })?;
    // The lossy name keeps the sent name's emptiness and NUL bytes: checking it is checking those.
    let name = node_name(entry.name.as_bytes(), WHAT)?;
    Ok(Request::Alive2(NodeEntry { name, ..entry }))
}

/// A node name as epmd accepts it: non-empty and without NUL (the C side stores it
/// NUL-terminated).
fn node_name(bytes: &[u8], what: &'static str) -> Result<String, InvalidReason> {
    if bytes.is_empty() {
        return Err(InvalidReason::EmptyNodeName { what });
    }
    if bytes.contains(&0) {
        return Err(InvalidReason::NulInNodeName { what });
    }
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// Parses a `PORT2_RESP` from the start of `buf`. The code byte is checked first, so a wrong
/// answer is rejected as soon as it starts.
pub fn parse_port2_resp(buf: &[u8]) -> Parsed<Port2Resp> {
    let mut r = Reader::new(buf);
    let Some(code) = r.u8() else {
        return Parsed::Incomplete;
    };
    if code != PORT2_RESP {
        return Parsed::Invalid(InvalidReason::UnexpectedCode {
            expected: "PORT2_RESP",
            code,
        });
    }
    let Some(result) = r.u8() else {
        return Parsed::Incomplete;
    };
    if result != 0 {
        return Parsed::Complete {
            value: Port2Resp::NotFound { result },
            consumed: r.pos,
        };
    }
    let Some(found) = read_node_entry(&mut r) else {
        return Parsed::Incomplete;
    };
    Parsed::Complete {
        value: Port2Resp::Found(found),
        consumed: r.pos,
    }
}

/// A node entry (in `PORT2_RESP`, the fields after `[119][0]`); `None` until all have arrived.
/// The name is taken as sent, decoded lossily: `ALIVE2_REQ` checks it, and in `PORT2_RESP` epmd
/// echoes a name it accepted at registration.
fn read_node_entry(r: &mut Reader<'_>) -> Option<NodeEntry> {
    Some(NodeEntry {
        port: r.u16()?,
        node_type: r.u8()?,
        protocol: r.u8()?,
        highest_version: r.u16()?,
        lowest_version: r.u16()?,
        name: String::from_utf8_lossy(r.sized()?).into_owned(),
        extra: r.sized()?.to_vec(),
    })
}

/// Parses an `ALIVE2_RESP` or `ALIVE2_X_RESP` from the start of `buf`.
pub fn parse_alive2_resp(buf: &[u8]) -> Parsed<Alive2Resp> {
    let mut r = Reader::new(buf);
    let Some(code) = r.u8() else {
        return Parsed::Incomplete;
    };
    let extended = match code {
        ALIVE2_X_RESP => true,
        ALIVE2_RESP => false,
        code => {
            return Parsed::Invalid(InvalidReason::UnexpectedCode {
                expected: "ALIVE2_RESP",
                code,
            });
        }
    };
    let fields = (|| {
        let result = r.u8()?;
        let creation = if extended {
            r.u32()?
        } else {
            u32::from(r.u16()?)
        };
        Some(Alive2Resp {
            result,
            creation,
            extended,
        })
    })();
    match fields {
        Some(value) => Parsed::Complete {
            value,
            consumed: r.pos,
        },
        None => Parsed::Incomplete,
    }
}

/// Parses a NAMES response. With `complete == false` (epmd may still send), it returns the
/// whole lines so far and `consumed` stops after the last `\n`; with `complete == true` (epmd
/// closed), a trailing partial line or a missing port is invalid.
pub fn parse_names_resp(buf: &[u8], complete: bool) -> Parsed<NamesResp> {
    let mut r = Reader::new(buf);
    let Some(epmd_port) = r.u32() else {
        return if complete {
            Parsed::Invalid(InvalidReason::Truncated {
                what: "NAMES response",
            })
        } else {
            Parsed::Incomplete
        };
    };
    let text = r.rest();
    let whole = text.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
    if complete && whole < text.len() {
        return Parsed::Invalid(InvalidReason::PartialNamesLine);
    }
    let lines = text
        .get(..whole)
        .unwrap_or_default()
        .split_inclusive(|&c| c == b'\n');
    let nodes = match lines.map(parse_names_line).collect::<Result<Vec<_>, _>>() {
        Ok(nodes) => nodes,
        Err(reason) => return Parsed::Invalid(reason),
    };
    Parsed::Complete {
        value: NamesResp { epmd_port, nodes },
        consumed: r.pos + whole,
    }
}

/// One `name NAME at port PORT\n` line. The last " at port " splits, so a name containing
/// that text still parses.
fn parse_names_line(line: &[u8]) -> Result<(String, u16), InvalidReason> {
    const SEP: &[u8] = b" at port ";
    let bad = || InvalidReason::BadNamesLine {
        line: excerpt(line),
    };
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let rest = body.strip_prefix(b"name ").ok_or_else(bad)?;
    let at = rest
        .windows(SEP.len())
        .rposition(|w| w == SEP)
        .ok_or_else(bad)?;
    let (name, port) = rest.split_at(at);
    let port = port
        .get(SEP.len()..)
        .and_then(decimal_u16)
        .ok_or_else(bad)?;
    if name.is_empty() {
        return Err(bad());
    }
    Ok((String::from_utf8_lossy(name).into_owned(), port))
}

/// Plain decimal digits only (`str::parse` would also take a leading `+`).
fn decimal_u16(digits: &[u8]) -> Option<u16> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A bounded, printable rendering of bad input for error messages.
fn excerpt(bytes: &[u8]) -> String {
    const MAX: usize = 80;
    let mut s: String = String::from_utf8_lossy(bytes).chars().take(MAX).collect();
    if bytes.len() > MAX {
        s.push('…');
    }
    s
}

/// What the relay learns from one epmd connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The client asked for a node's port (complete `PORT_PLEASE2_REQ`).
    PortRequested { node: String },
    /// epmd answered that `node` listens on `port`. Reported when the last byte of the
    /// `PORT2_RESP` is fed, so the relay can set up the redirect before forwarding that chunk.
    /// `node` is the name the client asked for.
    DistPort { node: String, port: u16 },
    /// epmd answered that `node` is not registered.
    NotFound { node: String },
    /// The whole NAMES answer, reported by [`EpmdConversation::server_eof`] (its end is the
    /// connection's end), after its bytes have been relayed.
    Names(Vec<(String, u16)>),
    /// epmd answered an `ALIVE2_REQ`; `result == 0` means the node is registered.
    Alive2 {
        node: String,
        port: u16,
        result: u8,
        creation: u32,
    },
    /// A direction stopped being parsed (garbage, an unexpected message, or more than
    /// [`MAX_BUFFERED`] bytes); its remaining bytes are relayed blindly.
    Unparseable { reason: String },
}

fn unparseable(reason: impl Into<String>) -> Event {
    Event::Unparseable {
        reason: reason.into(),
    }
}

/// Client→epmd direction.
#[derive(Debug)]
enum Client {
    Reading(Vec<u8>),
    Sent,
    Blind,
}

/// epmd→client direction: what the request made us expect.
#[derive(Debug)]
enum Server {
    AwaitingRequest,
    Expecting { answer: Answer, buf: Vec<u8> },
    Answered,
    Blind,
}

#[derive(Debug)]
enum Answer {
    Port2 { node: String },
    Names,
    Alive2 { node: String, port: u16 },
}

impl Answer {
    fn what(&self) -> &'static str {
        match self {
            Answer::Port2 { .. } => "PORT2_RESP",
            Answer::Names => "NAMES response",
            Answer::Alive2 { .. } => "ALIVE2 response",
        }
    }

    /// Tries to complete the answer from `buf`. NAMES is only parsed at EOF, since nothing but
    /// the close ends it and re-scanning on every chunk would cost O(n²).
    fn step(&self, buf: &[u8]) -> Step {
        match self {
            Answer::Port2 { node } => match parse_port2_resp(buf) {
                Parsed::Incomplete => Step::Wait,
                Parsed::Invalid(reason) => Step::Invalid(reason),
                Parsed::Complete { value, consumed } => {
                    let node = node.clone();
                    let event = match value {
                        Port2Resp::Found(found) => Event::DistPort {
                            node,
                            port: found.port,
                        },
                        Port2Resp::NotFound { .. } => Event::NotFound { node },
                    };
                    Step::Answered { event, consumed }
                }
            },
            Answer::Alive2 { node, port } => match parse_alive2_resp(buf) {
                Parsed::Incomplete => Step::Wait,
                Parsed::Invalid(reason) => Step::Invalid(reason),
                Parsed::Complete { value, consumed } => {
                    let (node, port) = (node.clone(), *port);
                    let event = Event::Alive2 {
                        node,
                        port,
                        result: value.result,
                        creation: value.creation,
                    };
                    Step::Answered { event, consumed }
                }
            },
            Answer::Names => Step::Wait,
        }
    }
}

enum Step {
    Wait,
    Answered { event: Event, consumed: usize },
    Invalid(InvalidReason),
}

/// Appends as much of `b` as fits under [`MAX_BUFFERED`]; returns how many bytes did not fit.
fn append_capped(buf: &mut Vec<u8>, b: &[u8]) -> usize {
    let take = MAX_BUFFERED.saturating_sub(buf.len()).min(b.len());
    let (kept, dropped) = b.split_at(take);
    buf.extend_from_slice(kept);
    dropped.len()
}

/// The parsing side of one relayed epmd connection (one request, one answer).
///
/// Relay contract: call [`client_bytes`](Self::client_bytes) with each chunk read from the
/// client *before* forwarding it to epmd, and [`server_bytes`](Self::server_bytes) with each
/// chunk from epmd *before* forwarding it to the client; act on the events (e.g. open the
/// forward for a [`Event::DistPort`]), then forward the chunk unchanged. Call
/// [`server_eof`](Self::server_eof) when epmd closes. The events do not depend on how the
/// bytes are chunked, nothing panics on any input, and at most [`MAX_BUFFERED`] bytes per
/// direction are kept.
#[derive(Debug)]
pub struct EpmdConversation {
    client: Client,
    server: Server,
}

impl Default for EpmdConversation {
    fn default() -> Self {
        Self::new()
    }
}

impl EpmdConversation {
    pub fn new() -> Self {
        EpmdConversation {
            client: Client::Reading(Vec::new()),
            server: Server::AwaitingRequest,
        }
    }

    /// Bytes from the client, on their way to epmd.
    pub fn client_bytes(&mut self, b: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        if !b.is_empty() {
            self.feed_client(b, &mut events);
        }
        events
    }

    /// Bytes from epmd, on their way to the client.
    pub fn server_bytes(&mut self, b: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        if !b.is_empty() {
            self.feed_server(b, &mut events);
        }
        events
    }

    /// epmd closed its side: completes a NAMES answer, or reports an answer cut short.
    pub fn server_eof(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        if let Server::Expecting { answer, buf } =
            std::mem::replace(&mut self.server, Server::Blind)
        {
            events.push(Self::final_answer(&answer, &buf));
        }
        events
    }

    /// What an answer still being read amounts to once epmd has closed.
    fn final_answer(answer: &Answer, buf: &[u8]) -> Event {
        let cut_short = || {
            format!(
                "epmd closed the connection before a complete {}",
                answer.what()
            )
        };
        match answer {
            Answer::Names => match parse_names_resp(buf, true) {
                Parsed::Complete { value, .. } => Event::Names(value.nodes),
                Parsed::Invalid(reason) => unparseable(format!("epmd answer: {reason}")),
                Parsed::Incomplete => unparseable(cut_short()),
            },
            // Self-delimiting answers complete in `feed_server`; here they were cut short.
            Answer::Port2 { .. } | Answer::Alive2 { .. } => unparseable(cut_short()),
        }
    }

    /// Bytes held for parsing, over both directions (at most 2 × [`MAX_BUFFERED`]).
    pub fn buffered_len(&self) -> usize {
        let client = match &self.client {
            Client::Reading(buf) => buf.len(),
            _ => 0,
        };
        let server = match &self.server {
            Server::Expecting { buf, .. } => buf.len(),
            _ => 0,
        };
        client + server
    }

    fn feed_client(&mut self, b: &[u8], events: &mut Vec<Event>) {
        let Client::Reading(buf) = &mut self.client else {
            if matches!(self.client, Client::Sent) {
                self.client_gives_up(events, "the client sent bytes after its request".into());
            }
            return;
        };
        let dropped = append_capped(buf, b);
        match parse_request(buf) {
            Parsed::Incomplete if buf.len() >= MAX_BUFFERED => {
                let reason = format!("the client request exceeds {MAX_BUFFERED} bytes");
                self.client_gives_up(events, reason);
            }
            Parsed::Incomplete => {}
            Parsed::Complete { value, consumed } => {
                let extra = buf.len().saturating_sub(consumed) + dropped;
                self.client = Client::Sent;
                self.expect_answer(value, events);
                if extra > 0 {
                    self.client_gives_up(events, "the client sent bytes after its request".into());
                }
            }
            Parsed::Invalid(reason) => {
                self.client_gives_up(events, format!("client request: {reason}"))
            }
        }
    }

    /// Stops parsing client bytes; an answer not yet expected can no longer be understood.
    fn client_gives_up(&mut self, events: &mut Vec<Event>, reason: String) {
        self.client = Client::Blind;
        if matches!(self.server, Server::AwaitingRequest) {
            self.server = Server::Blind;
        }
        events.push(unparseable(reason));
    }

    fn expect_answer(&mut self, request: Request, events: &mut Vec<Event>) {
        let answer = match request {
            Request::PortPlease2 { name } => {
                events.push(Event::PortRequested { node: name.clone() });
                Some(Answer::Port2 { node: name })
            }
            Request::Names => Some(Answer::Names),
            Request::Alive2(NodeEntry { port, name, .. }) => {
                Some(Answer::Alive2 { node: name, port })
            }
            // DUMP/KILL/STOP and unknown codes: legitimate or not, nothing to learn.
            Request::Other { .. } => None,
        };
        // epmd may already have sent garbage before the request completed.
        if matches!(self.server, Server::AwaitingRequest) {
            self.server = match answer {
                Some(answer) => Server::Expecting {
                    answer,
                    buf: Vec::new(),
                },
                None => Server::Blind,
            };
        }
    }

    fn feed_server(&mut self, b: &[u8], events: &mut Vec<Event>) {
        let (answer, buf) = match &mut self.server {
            Server::Expecting { answer, buf } => (answer, buf),
            Server::AwaitingRequest => {
                return self
                    .server_gives_up(events, "epmd sent bytes before a complete request".into());
            }
            Server::Answered => {
                return self.server_gives_up(events, "epmd sent bytes after its answer".into());
            }
            Server::Blind => return,
        };
        let dropped = append_capped(buf, b);
        match answer.step(buf) {
            Step::Wait if buf.len() >= MAX_BUFFERED => {
                let reason = format!("the {} exceeds {MAX_BUFFERED} bytes", answer.what());
                self.server_gives_up(events, reason);
            }
            Step::Wait => {}
            Step::Answered { event, consumed } => {
                let extra = buf.len().saturating_sub(consumed) + dropped;
                events.push(event);
                self.server = Server::Answered;
                if extra > 0 {
                    self.server_gives_up(events, "epmd sent bytes after its answer".into());
                }
            }
            Step::Invalid(reason) => self.server_gives_up(events, format!("epmd answer: {reason}")),
        }
    }

    fn server_gives_up(&mut self, events: &mut Vec<Event>, reason: String) {
        self.server = Server::Blind;
        events.push(unparseable(reason));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // Captured with Debian's erlang-base, OTP 25.2.3 (erts 13.1.5), inside a throw-away network
    // namespace with only loopback up: `epmd -daemon` on 127.0.0.1:4369, and a small Python
    // relay on 127.0.0.1:4370 that forwarded to it and logged every chunk it read, per
    // connection and direction, as hex. Nodes ran with ERL_EPMD_PORT=4370 so all their epmd
    // traffic crossed the relay: `a@127.0.0.1` (dist port pinned to 45555) registered, then a
    // hidden `b@127.0.0.1` ran net_adm:ping('a@127.0.0.1'), net_adm:ping('nosuch@127.0.0.1')
    // and net_adm:names(). Each constant is one direction of one connection; every answer
    // arrived in a single chunk.

    /// a@127.0.0.1 registering: port 45555, type 'M', protocol 0, versions 6..5, name "a".
    const CAPTURED_ALIVE2_REQ: &[u8] = &[
        0x00, 0x0e, 0x78, 0xb1, 0xf3, 0x4d, 0x00, 0x00, 0x06, 0x00, 0x05, 0x00, 0x01, 0x61, 0x00,
        0x00,
    ];
    /// ALIVE2_X_RESP ('v'), result 0, creation 0x6b0c985f.
    const CAPTURED_ALIVE2_X_RESP: &[u8] = &[0x76, 0x00, 0x6b, 0x0c, 0x98, 0x5f];
    /// b asking for "a".
    const CAPTURED_PORT_PLEASE2_REQ: &[u8] = &[0x00, 0x02, 0x7a, 0x61];
    /// The answer: found, port 45555, type 'M', protocol 0, versions 6..5, name "a", no extra.
    const CAPTURED_PORT2_RESP: &[u8] = &[
        0x77, 0x00, 0xb1, 0xf3, 0x4d, 0x00, 0x00, 0x06, 0x00, 0x05, 0x00, 0x01, 0x61, 0x00, 0x00,
    ];
    /// b asking for "nosuch".
    const CAPTURED_PORT_PLEASE2_REQ_NOSUCH: &[u8] =
        &[0x00, 0x07, 0x7a, 0x6e, 0x6f, 0x73, 0x75, 0x63, 0x68];
    /// The answer: result 1, nothing more.
    const CAPTURED_PORT2_RESP_NOSUCH: &[u8] = &[0x77, 0x01];
    /// net_adm:names() (`epmd -names` sends the same 3 bytes).
    const CAPTURED_NAMES_REQ: &[u8] = &[0x00, 0x01, 0x6e];
    /// epmd's port 4369, then one line per registered node (b's dist port was 33899).
    const CAPTURED_NAMES_RESP: &[u8] =
        b"\x00\x00\x11\x11name b at port 33899\nname a at port 45555\n";

    struct Exchange {
        client: &'static [u8],
        server: &'static [u8],
        events: Vec<Event>,
    }

    fn captured_exchanges() -> Vec<Exchange> {
        let node = |s: &str| s.to_string();
        vec![
            Exchange {
                client: CAPTURED_PORT_PLEASE2_REQ,
                server: CAPTURED_PORT2_RESP,
                events: vec![
                    Event::PortRequested { node: node("a") },
                    Event::DistPort {
                        node: node("a"),
                        port: 45555,
                    },
                ],
            },
            Exchange {
                client: CAPTURED_PORT_PLEASE2_REQ_NOSUCH,
                server: CAPTURED_PORT2_RESP_NOSUCH,
                events: vec![
                    Event::PortRequested {
                        node: node("nosuch"),
                    },
                    Event::NotFound {
                        node: node("nosuch"),
                    },
                ],
            },
            Exchange {
                client: CAPTURED_NAMES_REQ,
                server: CAPTURED_NAMES_RESP,
                events: vec![Event::Names(vec![(node("b"), 33899), (node("a"), 45555)])],
            },
            Exchange {
                client: CAPTURED_ALIVE2_REQ,
                server: CAPTURED_ALIVE2_X_RESP,
                events: vec![Event::Alive2 {
                    node: node("a"),
                    port: 45555,
                    result: 0,
                    creation: 0x6b0c985f,
                }],
            },
        ]
    }

    /// Feeds all client chunks, then all server chunks, then EOF, collecting every event.
    fn run(client: &[&[u8]], server: &[&[u8]]) -> Vec<Event> {
        let mut conv = EpmdConversation::new();
        let mut events = Vec::new();
        for chunk in client {
            events.extend(conv.client_bytes(chunk));
        }
        for chunk in server {
            events.extend(conv.server_bytes(chunk));
        }
        events.extend(conv.server_eof());
        events
    }

    /// `bytes` cut at the given offsets (clamped, any order).
    fn chunks<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
        cuts.sort_unstable();
        let mut out = Vec::new();
        let mut start = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            out.push(&bytes[start..cut]);
            start = cut;
        }
        out
    }

    #[test]
    fn parses_captured_port_please2_req() {
        let parsed = parse_request(CAPTURED_PORT_PLEASE2_REQ);
        let value = Request::PortPlease2 { name: "a".into() };
        assert_eq!(parsed, Parsed::Complete { value, consumed: 4 });
    }

    /// Node `a` as the captures register it and epmd returns it.
    fn captured_entry() -> NodeEntry {
        NodeEntry {
            port: 45555,
            node_type: b'M',
            protocol: 0,
            highest_version: 6,
            lowest_version: 5,
            name: "a".into(),
            extra: vec![],
        }
    }

    #[test]
    fn parses_captured_port2_resp_found() {
        let value = Port2Resp::Found(captured_entry());
        let consumed = CAPTURED_PORT2_RESP.len();
        assert_eq!(
            parse_port2_resp(CAPTURED_PORT2_RESP),
            Parsed::Complete { value, consumed }
        );
    }

    #[test]
    fn parses_captured_port2_resp_not_found() {
        let value = Port2Resp::NotFound { result: 1 };
        assert_eq!(
            parse_port2_resp(CAPTURED_PORT2_RESP_NOSUCH),
            Parsed::Complete { value, consumed: 2 }
        );
    }

    #[test]
    fn parses_captured_names_exchange() {
        assert_eq!(
            parse_request(CAPTURED_NAMES_REQ),
            Parsed::Complete {
                value: Request::Names,
                consumed: 3
            }
        );
        let value = NamesResp {
            epmd_port: 4369,
            nodes: vec![("b".into(), 33899), ("a".into(), 45555)],
        };
        let consumed = CAPTURED_NAMES_RESP.len();
        assert_eq!(
            parse_names_resp(CAPTURED_NAMES_RESP, true),
            Parsed::Complete { value, consumed }
        );
    }

    #[test]
    fn parses_captured_alive2_exchange() {
        let value = Request::Alive2(captured_entry());
        assert_eq!(
            parse_request(CAPTURED_ALIVE2_REQ),
            Parsed::Complete {
                value,
                consumed: 16
            }
        );
        let value = Alive2Resp {
            result: 0,
            creation: 0x6b0c985f,
            extended: true,
        };
        assert_eq!(
            parse_alive2_resp(CAPTURED_ALIVE2_X_RESP),
            Parsed::Complete { value, consumed: 6 }
        );
    }

    #[test]
    fn captured_exchanges_yield_expected_events() {
        for ex in captured_exchanges() {
            assert_eq!(run(&[ex.client], &[ex.server]), ex.events);
        }
    }

    #[test]
    fn captured_exchanges_byte_at_a_time() {
        for ex in captured_exchanges() {
            let client: Vec<&[u8]> = ex.client.chunks(1).collect();
            let server: Vec<&[u8]> = ex.server.chunks(1).collect();
            assert_eq!(run(&client, &server), ex.events);
        }
    }

    #[test]
    fn captured_exchanges_every_two_way_split() {
        for ex in captured_exchanges() {
            for c in 0..=ex.client.len() {
                for s in 0..=ex.server.len() {
                    let events = run(&chunks(ex.client, &[c]), &chunks(ex.server, &[s]));
                    assert_eq!(
                        events, ex.events,
                        "client split at {c}, server split at {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn dist_port_comes_with_the_last_byte_of_port2_resp() {
        let mut conv = EpmdConversation::new();
        conv.client_bytes(CAPTURED_PORT_PLEASE2_REQ);
        let (head, last) = CAPTURED_PORT2_RESP.split_at(CAPTURED_PORT2_RESP.len() - 1);
        assert_eq!(conv.server_bytes(head), vec![]);
        assert_eq!(
            conv.server_bytes(last),
            vec![Event::DistPort {
                node: "a".into(),
                port: 45555
            }]
        );
        assert_eq!(conv.server_eof(), vec![]);
    }

    #[test]
    fn names_resp_in_progress_stops_at_last_whole_line() {
        let cut = CAPTURED_NAMES_RESP.len() - 5;
        let partial = &CAPTURED_NAMES_RESP[..cut];
        let value = NamesResp {
            epmd_port: 4369,
            nodes: vec![("b".into(), 33899)],
        };
        let consumed = b"\x00\x00\x11\x11name b at port 33899\n".len();
        assert_eq!(
            parse_names_resp(partial, false),
            Parsed::Complete { value, consumed }
        );
        assert_eq!(
            parse_names_resp(partial, true),
            Parsed::Invalid(InvalidReason::PartialNamesLine)
        );
        assert_eq!(parse_names_resp(&partial[..3], false), Parsed::Incomplete);
    }

    #[test]
    fn names_resp_rejects_malformed_lines() {
        for line in [
            &b"nom a at port 1\n"[..],
            b"name a at port\n",
            b"name a at port +1\n",
            b"name  at port 1\n",
        ] {
            let resp = [&[0, 0, 0x11, 0x11][..], line].concat();
            assert!(matches!(
                parse_names_resp(&resp, true),
                Parsed::Invalid(InvalidReason::BadNamesLine { .. })
            ));
        }
        let odd_name = b"\x00\x00\x11\x11name x at port 1 at port 2\n";
        let nodes = vec![("x at port 1".to_string(), 2)];
        assert!(
            matches!(parse_names_resp(odd_name, true), Parsed::Complete { value, .. } if value.nodes == nodes)
        );
    }

    #[test]
    fn request_edge_cases() {
        assert_eq!(
            parse_request(&[0, 0]),
            Parsed::Invalid(InvalidReason::EmptyRequest)
        );
        assert_eq!(parse_request(&[0]), Parsed::Incomplete);
        assert_eq!(parse_request(&[0, 3, b'z', b'a']), Parsed::Incomplete);
        // A trailing NUL is dropped, as epmd does; one inside the name is refused.
        let value = Request::PortPlease2 { name: "a".into() };
        assert_eq!(
            parse_request(&[0, 3, b'z', b'a', 0]),
            Parsed::Complete { value, consumed: 5 }
        );
        let nul = InvalidReason::NulInNodeName {
            what: "PORT_PLEASE2_REQ",
        };
        assert_eq!(
            parse_request(&[0, 4, b'z', b'a', 0, b'b']),
            Parsed::Invalid(nul)
        );
        let empty = InvalidReason::EmptyNodeName {
            what: "PORT_PLEASE2_REQ",
        };
        assert_eq!(parse_request(&[0, 1, b'z']), Parsed::Invalid(empty));
        let short = InvalidReason::Truncated { what: "ALIVE2_REQ" };
        assert_eq!(parse_request(&[0, 3, b'x', 0, 1]), Parsed::Invalid(short));
        let value = Request::Other { code: DUMP_REQ };
        assert_eq!(
            parse_request(&[0, 1, b'd', 9]),
            Parsed::Complete { value, consumed: 3 }
        );
    }

    #[test]
    fn non_utf8_node_names_are_decoded_lossily() {
        let parsed = parse_request(&[0, 3, b'z', 0xff, b'a']);
        let value = Request::PortPlease2 {
            name: "\u{fffd}a".into(),
        };
        assert_eq!(parsed, Parsed::Complete { value, consumed: 5 });
    }

    #[test]
    fn wrong_answer_code_is_unparseable_at_once() {
        let mut conv = EpmdConversation::new();
        conv.client_bytes(CAPTURED_PORT_PLEASE2_REQ);
        let events = conv.server_bytes(b"y");
        assert!(
            matches!(&events[..], [Event::Unparseable { .. }]),
            "{events:?}"
        );
        assert_eq!(conv.server_bytes(CAPTURED_PORT2_RESP), vec![]);
        assert_eq!(conv.server_eof(), vec![]);
    }

    #[test]
    fn epmd_closing_early_is_reported() {
        let mut conv = EpmdConversation::new();
        conv.client_bytes(CAPTURED_PORT_PLEASE2_REQ);
        conv.server_bytes(&CAPTURED_PORT2_RESP[..3]);
        let reason = "epmd closed the connection before a complete PORT2_RESP".to_string();
        assert_eq!(conv.server_eof(), vec![Event::Unparseable { reason }]);
    }

    #[test]
    fn server_bytes_before_request_are_unparseable() {
        let mut conv = EpmdConversation::new();
        assert!(matches!(
            &conv.server_bytes(b"w")[..],
            [Event::Unparseable { .. }]
        ));
        // The request is still understood; the answer is relayed blindly.
        let events = conv.client_bytes(CAPTURED_PORT_PLEASE2_REQ);
        assert_eq!(events, vec![Event::PortRequested { node: "a".into() }]);
        assert_eq!(conv.server_bytes(CAPTURED_PORT2_RESP), vec![]);
    }

    #[test]
    fn untracked_requests_are_relayed_without_events() {
        let events = run(
            &[&[0, 1, DUMP_REQ]],
            &[b"\x00\x00\x11\x11active name     <a> at port 1, fd = 3\n\0"],
        );
        assert_eq!(events, vec![]);
    }

    #[test]
    fn trailing_client_bytes_are_reported_once() {
        let mut conv = EpmdConversation::new();
        let input = [CAPTURED_PORT_PLEASE2_REQ, CAPTURED_NAMES_REQ].concat();
        let events = conv.client_bytes(&input);
        assert_eq!(events.len(), 2);
        assert!(matches!(&events[1], Event::Unparseable { .. }));
        assert_eq!(conv.client_bytes(CAPTURED_NAMES_REQ), vec![]);
        // The answer to the first request is still understood.
        let port = Event::DistPort {
            node: "a".into(),
            port: 45555,
        };
        assert_eq!(conv.server_bytes(CAPTURED_PORT2_RESP), vec![port]);
    }

    #[test]
    fn buffering_is_capped() {
        // A request claiming 65535 bytes, and a NAMES answer that never ends.
        let mut conv = EpmdConversation::new();
        let mut events = conv.client_bytes(&[0xff, 0xff]);
        for _ in 0..100 {
            events.extend(conv.client_bytes(&[b'z'; 1000]));
            assert!(conv.buffered_len() <= MAX_BUFFERED);
        }
        assert!(
            matches!(&events[..], [Event::Unparseable { .. }]),
            "{events:?}"
        );

        let mut conv = EpmdConversation::new();
        conv.client_bytes(CAPTURED_NAMES_REQ);
        let mut events = conv.server_bytes(&[0, 0, 0x11, 0x11]);
        let big = vec![b'x'; 3 * MAX_BUFFERED];
        events.extend(conv.server_bytes(&big));
        assert!(conv.buffered_len() <= MAX_BUFFERED);
        events.extend(conv.server_bytes(&big));
        events.extend(conv.server_eof());
        let reason = format!("the NAMES response exceeds {MAX_BUFFERED} bytes");
        assert_eq!(events, vec![Event::Unparseable { reason }]);
    }

    // Encoders, test-only: the inverse of the parsers, following epmd_srv.c and erl_epmd.erl.

    fn with_u16_len(bytes: &[u8]) -> Vec<u8> {
        let len = u16::try_from(bytes.len()).expect("test data fits a u16 length");
        [&len.to_be_bytes()[..], bytes].concat()
    }

    fn encode_request(req: &Request) -> Vec<u8> {
        let body = match req {
            Request::PortPlease2 { name } => [&[PORT_PLEASE2_REQ][..], name.as_bytes()].concat(),
            Request::Names => vec![NAMES_REQ],
            Request::Alive2(entry) => [&[ALIVE2_REQ][..], &encode_node_entry(entry)].concat(),
            Request::Other { code } => vec![*code],
        };
        with_u16_len(&body)
    }

    fn encode_port2_resp(resp: &Port2Resp) -> Vec<u8> {
        match resp {
            Port2Resp::NotFound { result } => vec![PORT2_RESP, *result],
            Port2Resp::Found(entry) => [&[PORT2_RESP, 0][..], &encode_node_entry(entry)].concat(),
        }
    }

    fn encode_node_entry(e: &NodeEntry) -> Vec<u8> {
        [
            &e.port.to_be_bytes()[..],
            &[e.node_type, e.protocol],
            &e.highest_version.to_be_bytes(),
            &e.lowest_version.to_be_bytes(),
            &with_u16_len(e.name.as_bytes()),
            &with_u16_len(&e.extra),
        ]
        .concat()
    }

    fn encode_names_resp(resp: &NamesResp) -> Vec<u8> {
        let mut out = resp.epmd_port.to_be_bytes().to_vec();
        for (name, port) in &resp.nodes {
            out.extend_from_slice(format!("name {name} at port {port}\n").as_bytes());
        }
        out
    }

    fn encode_alive2_resp(resp: &Alive2Resp) -> Vec<u8> {
        if resp.extended {
            [
                &[ALIVE2_X_RESP, resp.result][..],
                &resp.creation.to_be_bytes(),
            ]
            .concat()
        } else {
            let creation = u16::try_from(resp.creation).expect("16-bit creation");
            [&[ALIVE2_RESP, resp.result][..], &creation.to_be_bytes()].concat()
        }
    }

    /// Names as epmd accepts them: non-empty, no NUL; no newline so they fit NAMES lines.
    fn node_name_strategy() -> impl Strategy<Value = String> {
        "[^\\x00\\n]{1,24}"
    }

    fn node_entry_strategy() -> impl Strategy<Value = NodeEntry> {
        (
            any::<(u16, u8, u8, u16, u16)>(),
            node_name_strategy(),
            proptest::collection::vec(any::<u8>(), 0..16),
        )
            .prop_map(
                |((port, node_type, protocol, highest_version, lowest_version), name, extra)| {
                    NodeEntry {
                        port,
                        node_type,
                        protocol,
                        highest_version,
                        lowest_version,
                        name,
                        extra,
                    }
                },
            )
    }

    fn request_strategy() -> impl Strategy<Value = Request> {
        let alive2 = node_entry_strategy().prop_map(Request::Alive2);
        prop_oneof![
            node_name_strategy().prop_map(|name| Request::PortPlease2 { name }),
            Just(Request::Names),
            alive2,
            any::<u8>()
                .prop_filter("a parsed code", |c| ![
                    PORT_PLEASE2_REQ,
                    NAMES_REQ,
                    ALIVE2_REQ
                ]
                .contains(c))
                .prop_map(|code| Request::Other { code }),
        ]
    }

    fn port2_resp_strategy() -> impl Strategy<Value = Port2Resp> {
        prop_oneof![
            node_entry_strategy().prop_map(Port2Resp::Found),
            (1..=u8::MAX).prop_map(|result| Port2Resp::NotFound { result })
        ]
    }

    fn names_resp_strategy() -> impl Strategy<Value = NamesResp> {
        (
            any::<u32>(),
            proptest::collection::vec((node_name_strategy(), any::<u16>()), 0..6),
        )
            .prop_map(|(epmd_port, nodes)| NamesResp { epmd_port, nodes })
    }

    fn alive2_resp_strategy() -> impl Strategy<Value = Alive2Resp> {
        (any::<u8>(), any::<u32>(), any::<bool>()).prop_map(|(result, creation, extended)| {
            Alive2Resp {
                result,
                creation: if extended {
                    creation
                } else {
                    creation & 0xffff
                },
                extended,
            }
        })
    }

    /// A well-formed exchange: a request and an answer of the kind it expects (or noise for
    /// untracked requests).
    fn exchange_strategy() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
        (
            request_strategy(),
            port2_resp_strategy(),
            names_resp_strategy(),
            alive2_resp_strategy(),
            proptest::collection::vec(any::<u8>(), 0..32),
        )
            .prop_map(|(req, port2, names, alive2, noise)| {
                let answer = match &req {
                    Request::PortPlease2 { .. } => encode_port2_resp(&port2),
                    Request::Names => encode_names_resp(&names),
                    Request::Alive2(_) => encode_alive2_resp(&alive2),
                    Request::Other { .. } => noise,
                };
                (encode_request(&req), answer)
            })
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), complete in any::<bool>()) {
            let _ = parse_request(&bytes);
            let _ = parse_port2_resp(&bytes);
            let _ = parse_alive2_resp(&bytes);
            let _ = parse_names_resp(&bytes, complete);
        }

        #[test]
        fn consumed_never_exceeds_input(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Parsed::Complete { consumed, .. } = parse_request(&bytes) { prop_assert!(consumed <= bytes.len()); }
            if let Parsed::Complete { consumed, .. } = parse_port2_resp(&bytes) { prop_assert!(consumed <= bytes.len()); }
            if let Parsed::Complete { consumed, .. } = parse_names_resp(&bytes, false) { prop_assert!(consumed <= bytes.len()); }
        }

        #[test]
        fn conversation_never_panics_and_stays_bounded(
            steps in proptest::collection::vec((any::<bool>(), proptest::collection::vec(any::<u8>(), 0..64)), 0..32),
        ) {
            let mut conv = EpmdConversation::new();
            for (from_client, bytes) in &steps {
                let _ = if *from_client { conv.client_bytes(bytes) } else { conv.server_bytes(bytes) };
                prop_assert!(conv.buffered_len() <= 2 * MAX_BUFFERED);
            }
            let _ = conv.server_eof();
        }

        #[test]
        fn request_round_trips(req in request_strategy(), tail in proptest::collection::vec(any::<u8>(), 0..8)) {
            let bytes = encode_request(&req);
            let consumed = bytes.len();
            prop_assert_eq!(parse_request(&[bytes, tail].concat()), Parsed::Complete { value: req, consumed });
        }

        #[test]
        fn port2_resp_round_trips(resp in port2_resp_strategy()) {
            let bytes = encode_port2_resp(&resp);
            let consumed = bytes.len();
            for cut in 0..consumed {
                prop_assert_eq!(parse_port2_resp(&bytes[..cut]), Parsed::Incomplete);
            }
            prop_assert_eq!(parse_port2_resp(&bytes), Parsed::Complete { value: resp, consumed });
        }

        #[test]
        fn names_resp_round_trips(resp in names_resp_strategy()) {
            let bytes = encode_names_resp(&resp);
            let consumed = bytes.len();
            prop_assert_eq!(parse_names_resp(&bytes, true), Parsed::Complete { value: resp, consumed });
        }

        #[test]
        fn alive2_resp_round_trips(resp in alive2_resp_strategy()) {
            let bytes = encode_alive2_resp(&resp);
            let consumed = bytes.len();
            prop_assert_eq!(parse_alive2_resp(&bytes), Parsed::Complete { value: resp, consumed });
        }

        #[test]
        fn events_do_not_depend_on_chunking(
            (client, server) in exchange_strategy(),
            client_tail in proptest::collection::vec(any::<u8>(), 0..4),
            server_tail in proptest::collection::vec(any::<u8>(), 0..4),
            client_cuts in proptest::collection::vec(any::<usize>(), 0..6),
            server_cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let client = [client, client_tail].concat();
            let server = [server, server_tail].concat();
            let whole = run(&[&client], &[&server]);
            let client_len = client.len().max(1);
            let server_len = server.len().max(1);
            let client_cuts: Vec<usize> = client_cuts.iter().map(|c| c % client_len).collect();
            let server_cuts: Vec<usize> = server_cuts.iter().map(|c| c % server_len).collect();
            let split = run(&chunks(&client, &client_cuts), &chunks(&server, &server_cuts));
            prop_assert_eq!(split, whole);
        }
    }
}
