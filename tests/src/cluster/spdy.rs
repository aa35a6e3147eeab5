//! kubectl's port-forward protocol: SPDY/3.1 (draft 3 framing, as moby/spdystream speaks it),
//! served the two ways kubectl 1.32 asks for it:
//!
//! * tunnelled: a WebSocket upgrade (GET) with subprotocol `SPDY/3.1+portforward.k8s.io`, the
//!   SPDY byte stream split across binary messages at arbitrary points (API servers >= 1.30);
//! * plain: POST with `Upgrade: SPDY/3.1` and `X-Stream-Protocol-Version: portforward.k8s.io`,
//!   what kubectl falls back to when the WebSocket upgrade gets any answer other than 101.
//!
//! Per local connection kubectl opens an `error` and a `data` stream sharing a `requestid`. We
//! play the kubelet: reply to each stream at once, and when both are there dial
//! `127.0.0.1:PORT` inside the pod's namespace, relay DATA both ways (FIN = half-close), report a
//! failed dial as text on the error stream, and FIN the error stream when the forward is over
//! (kubectl waits for that before it closes the local connection).
//!
//! Everything from the client is hostile: sizes, counts and waits are bounded, and a malformed
//! frame ends that connection (GOAWAY PROTOCOL_ERROR), never the server.
use std::{
    collections::HashMap,
    convert::Infallible,
    path::PathBuf,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use futures::{SinkExt, StreamExt, future::BoxFuture};
use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
    task::{AbortHandle, JoinSet},
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        handshake::derive_accept_key,
        protocol::{Role, WebSocketConfig},
    },
};

use super::kubelet::dial_in;

type Body = BoxBody<Bytes, Infallible>;

/// `Upgrade:` value of the plain form.
pub const SPDY_31: &str = "SPDY/3.1";
/// `X-Stream-Protocol-Version:` of port-forward (the only version kubectl offers).
pub const PORTFORWARD_PROTOCOL: &str = "portforward.k8s.io";
/// WebSocket subprotocol of the tunnelled form.
pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
const STREAM_PROTOCOL_HEADER: &str = "x-stream-protocol-version";

// Bounds on what a client can make us hold or wait for.
/// Control frames kubectl sends are tens of bytes; a known control frame above this is an attack.
const MAX_CONTROL_LEN: usize = 64 * 1024;
/// Inflated header block (a zlib bomb stops here).
const MAX_HEADER_BLOCK: usize = 64 * 1024;
const MAX_HEADERS: usize = 64;
/// Client streams (and stream pairs) open at once per connection (kubectl: two streams per
/// local connection).
const MAX_STREAMS: usize = 1024;
/// DATA payloads (up to 16 MiB each on the wire) are passed on in pieces of at most this size.
const DATA_CHUNK: usize = 64 * 1024;
/// Pod -> client DATA frame size (what Go's io.Copy uses).
const POD_READ: usize = 32 * 1024;
/// The kubelet's stream creation timeout: a pair still missing a stream after this is ended.
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);
/// A pod that takes no bytes for this long while the client sends ends that forward.
const POD_STALL: Duration = Duration::from_secs(60);
/// A client that takes no bytes for this long ends the connection.
const CLIENT_STALL: Duration = Duration::from_secs(60);
/// Binary WebSocket messages of the tunnel (kubectl writes one per Write: a few bytes to 32 KiB).
const MAX_WS_MESSAGE: usize = 1024 * 1024;

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;
const FLAG_FIN: u8 = 0x01;
const RST_PROTOCOL_ERROR: u32 = 1;
const RST_REFUSED_STREAM: u32 = 3;
const RST_CANCEL: u32 = 5;
const GOAWAY_OK: u32 = 0;
const GOAWAY_PROTOCOL_ERROR: u32 = 1;

/// The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1): length-prefixed
/// header names and values, then a run of status codes, dates and media types.
fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: [&str; 65] = [
            "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset", "accept-encoding", "accept-language",
            "accept-ranges", "age", "allow", "authorization", "cache-control", "connection", "content-base", "content-encoding",
            "content-language", "content-length", "content-location", "content-md5", "content-range", "content-type", "date", "etag",
            "expect", "expires", "from", "host", "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
            "last-modified", "location", "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer",
            "retry-after", "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent", "vary", "via", "warning",
            "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie",
            "keep-alive", "origin",
        ];
        const TAIL: &str = concat!(
            "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
            "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized",
            "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable",
            "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
            "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,",
            "publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
        );
        let mut d = Vec::with_capacity(1423);
        for w in WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(TAIL.as_bytes());
        d
    })
}

/// Options and counters of the SPDY side, for tests.
#[derive(Default)]
pub struct SpdyState {
    /// Answer the WebSocket-tunnelled form with 400, as API servers before 1.30 do: kubectl
    /// then falls back to plain SPDY.
    pub refuse_websocket: AtomicBool,
    /// SPDY connections accepted, per transport.
    pub websocket_connections: AtomicU64,
    pub plain_connections: AtomicU64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Plain,
    WebSocket,
}

fn header_values(req: &Request<Incoming>, name: impl header::AsHeaderName) -> impl Iterator<Item = &str> {
    req.headers().get_all(name).into_iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(',')).map(str::trim)
}

/// Which SPDY transport a port-forward request asks for, if any (None: the channel protocol).
pub fn requested(req: &Request<Incoming>) -> Option<Transport> {
    let upgrade = req.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or("");
    if upgrade.eq_ignore_ascii_case(SPDY_31) {
        return Some(Transport::Plain);
    }
    let tunnel = upgrade.eq_ignore_ascii_case("websocket") && header_values(req, header::SEC_WEBSOCKET_PROTOCOL).any(|p| p == TUNNEL_PROTOCOL);
    tunnel.then_some(Transport::WebSocket)
}

/// A connection to the pod, or the whole message for the error stream.
pub type Dial = Arc<dyn Fn(u16) -> BoxFuture<'static, Result<PodConn, String>> + Send + Sync>;
pub type PodConn = Box<dyn PodIo>;
pub trait PodIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> PodIo for T {}

/// Dials `127.0.0.1:PORT` inside the pod's namespace, as the kubelet does; errors read as the
/// kubelet's do.
pub fn dial_pod(netns: PathBuf, pod: String, uid: String) -> Dial {
    Arc::new(move |port| {
        let (netns, pod, uid) = (netns.clone(), pod.clone(), uid.clone());
        Box::pin(async move {
            let fail = |why: String| format!("error forwarding port {port} to pod {pod}, uid {uid}: {why}");
            // Namespaces have unique names: once the pod is deleted its path is gone for good.
            if !netns.exists() {
                return Err(fail("failed to find sandbox: the pod's network namespace is gone".into()));
            }
            let path = netns.clone();
            let dialled = tokio::task::spawn_blocking(move || dial_in(&path, port)).await.unwrap_or_else(|e| Err(std::io::Error::other(e)));
            let conn = dialled
                .and_then(|s| {
                    s.set_nonblocking(true)?;
                    tokio::net::TcpStream::from_std(s)
                })
                .map_err(|e| {
                    fail(format!(
                        "failed to connect to localhost:{port} inside namespace \"{}\", IPv4: dial tcp4 127.0.0.1:{port}: connect: {}",
                        netns.display(),
                        go_errno(&e)
                    ))
                })?;
            let _ = conn.set_nodelay(true);
            Ok(Box::new(conn) as PodConn)
        })
    })
}

/// An OS error as Go prints it ("connection refused"), not as Rust does
/// ("Connection refused (os error 111)"): the text kubectl users see from a kubelet.
fn go_errno(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    chars.next().map(|c| c.to_lowercase().chain(chars).collect()).unwrap_or_default()
}

/// A failed upgrade: (HTTP code, Status reason, message).
pub type Refusal = (u16, &'static str, String);

/// Answers the upgrade request; the returned future serves the connection until it ends.
pub fn accept(state: &SpdyState, req: Request<Incoming>, transport: Transport, dial: Dial) -> Result<(Response<Body>, BoxFuture<'static, ()>), Refusal> {
    match transport {
        Transport::WebSocket => {
            if state.refuse_websocket.load(Ordering::Relaxed) {
                return Err((400, "BadRequest", format!("this API server does not tunnel {TUNNEL_PROTOCOL} over WebSocket (as before Kubernetes 1.30)")));
            }
            if req.method() != Method::GET {
                return Err((400, "BadRequest", "a WebSocket upgrade must be a GET".into()));
            }
            let key = req.headers().get(header::SEC_WEBSOCKET_KEY).map(|k| derive_accept_key(k.as_bytes())).ok_or((400, "BadRequest", "missing Sec-WebSocket-Key".to_string()))?;
            state.websocket_connections.fetch_add(1, Ordering::Relaxed);
            let upgrade = hyper::upgrade::on(req);
            let serve = Box::pin(async move {
                let Ok(upgraded) = upgrade.await else { return };
                let config = WebSocketConfig::default().max_message_size(Some(MAX_WS_MESSAGE)).max_frame_size(Some(MAX_WS_MESSAGE));
                let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                serve_websocket(ws, dial).await;
            });
            let response = Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, "websocket")
                .header(header::SEC_WEBSOCKET_ACCEPT, HeaderValue::from_str(&key).expect("accept key"))
                .header(header::SEC_WEBSOCKET_PROTOCOL, TUNNEL_PROTOCOL)
                .body(Empty::new().boxed())
                .expect("response");
            Ok((response, serve))
        }
        Transport::Plain => {
            let offered: Vec<&str> = header_values(&req, STREAM_PROTOCOL_HEADER).collect();
            if !offered.contains(&PORTFORWARD_PROTOCOL) {
                return Err((400, "BadRequest", format!("unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server accepts [\"{PORTFORWARD_PROTOCOL}\"]")));
            }
            state.plain_connections.fetch_add(1, Ordering::Relaxed);
            let upgrade = hyper::upgrade::on(req);
            let serve = Box::pin(async move {
                let Ok(upgraded) = upgrade.await else { return };
                serve(TokioIo::new(upgraded), dial).await;
            });
            // The client checks both headers of the 101 (apimachinery's SpdyRoundTripper).
            let response = Response::builder()
                .status(StatusCode::SWITCHING_PROTOCOLS)
                .header(header::CONNECTION, "Upgrade")
                .header(header::UPGRADE, SPDY_31)
                .header(STREAM_PROTOCOL_HEADER, PORTFORWARD_PROTOCOL)
                .body(Empty::new().boxed())
                .expect("response");
            Ok((response, serve))
        }
    }
}

/// SPDY inside binary WebSocket messages. Frame boundaries and message boundaries are unrelated
/// (kubectl sends one message per Write), so the messages are turned back into a byte stream.
async fn serve_websocket<S>(ws: WebSocketStream<S>, dial: Dial)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut from_spdy, mut to_spdy) = tokio::io::split(theirs);
    let (mut sink, mut stream) = ws.split();
    let (outbound_done, outbound_finished) = tokio::sync::oneshot::channel::<()>();
    // The two directions run independently: one blocked on a slow side must not stall the other.
    let inbound = async move {
        while let Some(msg) = stream.next().await {
            match msg {
                Ok(Message::Binary(b)) => {
                    if to_spdy.write_all(&b).await.is_err() {
                        break;
                    }
                }
                // Answered by tungstenite itself.
                Ok(Message::Ping(_) | Message::Pong(_)) => {}
                // client-go's tunnel accepts binary messages only; so do we.
                Ok(Message::Text(_) | Message::Frame(_) | Message::Close(_)) | Err(_) => break,
            }
        }
        let _ = to_spdy.shutdown().await;
    };
    let inbound = async move {
        // Once our side is done, the client gets a few seconds to answer the close.
        tokio::select! {
            _ = inbound => {}
            _ = async { let _ = outbound_finished.await; tokio::time::sleep(Duration::from_secs(5)).await } => {}
        }
    };
    let outbound = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from_spdy.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let sent = tokio::time::timeout(CLIENT_STALL, sink.send(Message::binary(buf[..n].to_vec()))).await;
                    if !matches!(sent, Ok(Ok(()))) {
                        break;
                    }
                }
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), sink.close()).await;
        let _ = outbound_done.send(());
    };
    tokio::join!(serve(ours, dial), inbound, outbound);
}

/// Serves one SPDY connection (server side) over a byte stream until the client goes away, the
/// last stream ends after a GOAWAY, or the client breaks the protocol.
pub async fn serve<T>(io: T, dial: Dial)
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(io);
    let (out_tx, out_rx) = mpsc::channel::<Out>(64);
    let (ev_tx, ev_rx) = mpsc::channel::<Result<Frame, String>>(16);
    let reader = async move {
        let mut frames = FrameReader::new(rd);
        loop {
            let next = frames.next().await;
            let end = !matches!(next, Ok(Some(_)));
            let ev = match next {
                Ok(Some(f)) => Ok(f),
                Ok(None) => Ok(Frame::Eof),
                Err(e) => Err(e),
            };
            if ev_tx.send(ev).await.is_err() || end {
                break;
            }
        }
        // Stay pending: the connection ends when the session and the writer are done.
        std::future::pending::<()>().await;
    };
    let session = Session { out: out_tx, dial, streams: HashMap::new(), pairs: HashMap::new(), forwards: JoinSet::new(), last_id: 0, goaway: false };
    let work = async move { tokio::join!(session.run(ev_rx), write_loop(wr, out_rx)) };
    tokio::select! {
        _ = work => {}
        _ = reader => {}
    }
}

/// A frame from the client. DATA comes in pieces of at most [`DATA_CHUNK`] bytes.
#[derive(Debug)]
enum Frame {
    SynStream { id: u32, fin: bool, headers: Vec<(String, String)> },
    RstStream { id: u32 },
    Ping(u32),
    GoAway,
    Data { id: u32, chunk: Bytes, fin: bool },
    /// SYN_REPLY, HEADERS (their blocks inflated), SETTINGS, WINDOW_UPDATE, unknown types.
    Ignored,
    Eof,
}

/// The header decompressor: one zlib stream for the whole connection.
struct Inflater {
    z: Decompress,
    out: Vec<u8>,
}

impl Inflater {
    fn new() -> Self {
        Inflater { z: Decompress::new(true), out: Vec::with_capacity(1024) }
    }

    /// Inflates one header block (it ends with a sync flush, so everything comes out).
    fn inflate(&mut self, mut block: &[u8]) -> Result<&[u8], String> {
        self.out.clear();
        loop {
            if self.out.len() == self.out.capacity() {
                if self.out.len() >= MAX_HEADER_BLOCK {
                    return Err(format!("header block inflates to more than {MAX_HEADER_BLOCK} bytes"));
                }
                self.out.reserve(4096);
            }
            let (before_in, before_out) = (self.z.total_in(), self.z.total_out());
            let mut dict_set = false;
            match self.z.decompress_vec(block, &mut self.out, FlushDecompress::Sync) {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.z.set_dictionary(dictionary()).map_err(|e| format!("header block: wrong dictionary: {e}"))?;
                    dict_set = true;
                }
                Err(e) => return Err(format!("header block does not inflate: {e}")),
            }
            let used = (self.z.total_in() - before_in) as usize;
            let produced = self.z.total_out() - before_out;
            block = &block[used..];
            if block.is_empty() && self.out.len() < self.out.capacity() {
                return Ok(&self.out);
            }
            if used == 0 && produced == 0 && !dict_set && self.out.len() < self.out.capacity() {
                return Err("header block does not inflate (trailing bytes)".into());
            }
        }
    }
}

/// The header compressor: one zlib stream for the whole connection, a sync flush per block.
struct Deflater {
    z: Compress,
}

impl Deflater {
    fn new() -> Self {
        let mut z = Compress::new(Compression::best(), true);
        z.set_dictionary(dictionary()).expect("a fresh compressor takes a dictionary");
        Deflater { z }
    }

    fn deflate(&mut self, mut block: &[u8], out: &mut Vec<u8>) {
        loop {
            out.reserve(block.len() + 64);
            let before = self.z.total_in();
            self.z.compress_vec(block, out, FlushCompress::Sync).expect("deflate into a buffer with room");
            block = &block[(self.z.total_in() - before) as usize..];
            if block.is_empty() && out.len() < out.capacity() {
                return;
            }
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A header block: u32 count, then (u32 length, name, u32 length, value) per header; values
/// may hold several NUL-separated values (we keep the first).
fn parse_header_block(block: &[u8]) -> Result<Vec<(String, String)>, String> {
    let take = |at: &mut usize, n: usize| -> Result<std::ops::Range<usize>, String> {
        let end = at.checked_add(n).filter(|e| *e <= block.len()).ok_or("header block truncated")?;
        let r = *at..end;
        *at = end;
        Ok(r)
    };
    let mut at = 0;
    let count = u32_at(&block[take(&mut at, 4)?], 0) as usize;
    if count > MAX_HEADERS {
        return Err(format!("{count} headers (at most {MAX_HEADERS})"));
    }
    let mut headers = Vec::with_capacity(count);
    for _ in 0..count {
        let n = u32_at(&block[take(&mut at, 4)?], 0) as usize;
        let name = String::from_utf8_lossy(&block[take(&mut at, n)?]).into_owned();
        let n = u32_at(&block[take(&mut at, 4)?], 0) as usize;
        let value = String::from_utf8_lossy(&block[take(&mut at, n)?]).into_owned();
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) || headers.iter().any(|(n, _)| *n == name) {
            return Err(format!("invalid header name {name:?}"));
        }
        headers.push((name, value.split('\0').next().unwrap_or("").to_string()));
    }
    if at != block.len() {
        return Err("bytes after the last header".into());
    }
    Ok(headers)
}

struct FrameReader<R> {
    rd: R,
    inflater: Inflater,
    /// DATA frame being passed on: (stream, bytes left, FIN at its end).
    data: Option<(u32, usize, bool)>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(rd: R) -> Self {
        FrameReader { rd, inflater: Inflater::new(), data: None }
    }

    async fn exact(&mut self, buf: &mut [u8]) -> Result<(), String> {
        self.rd.read_exact(buf).await.map(|_| ()).map_err(|e| format!("truncated frame: {e}"))
    }

    /// The next frame; None on a clean end of stream between frames.
    async fn next(&mut self) -> Result<Option<Frame>, String> {
        loop {
            if let Some((id, left, fin)) = self.data {
                let n = left.min(DATA_CHUNK);
                let mut chunk = vec![0u8; n];
                self.exact(&mut chunk).await?;
                self.data = (left > n).then_some((id, left - n, fin));
                return Ok(Some(Frame::Data { id, chunk: chunk.into(), fin: fin && left == n }));
            }
            let Some(frame) = self.next_frame().await? else { return Ok(None) };
            // Unless it was a DATA header whose payload follows in pieces.
            if self.data.is_none() {
                return Ok(Some(frame));
            }
        }
    }

    async fn next_frame(&mut self) -> Result<Option<Frame>, String> {
        let mut head = [0u8; 8];
        match self.rd.read(&mut head[..1]).await {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
        self.exact(&mut head[1..]).await?;
        let flags = head[4];
        let len = (u32_at(&head, 4) & 0x00ff_ffff) as usize;
        if head[0] & 0x80 == 0 {
            let id = u32_at(&head, 0);
            if id == 0 {
                return Err("DATA frame on stream 0".into());
            }
            let fin = flags & FLAG_FIN != 0;
            if len == 0 {
                return Ok(Some(Frame::Data { id, chunk: Bytes::new(), fin }));
            }
            self.data = Some((id, len, fin));
            return Ok(Some(Frame::Ignored));
        }
        let version = u16::from_be_bytes([head[0] & 0x7f, head[1]]);
        let kind = u16::from_be_bytes([head[2], head[3]]);
        if version != VERSION {
            return Err(format!("SPDY version {version} (only 3 is spoken)"));
        }
        let known = matches!(kind, SYN_STREAM | SYN_REPLY | RST_STREAM | SETTINGS | PING | GOAWAY | HEADERS | WINDOW_UPDATE);
        if !known {
            // The draft says to ignore control frames of unknown types: skip without holding them.
            let mut left = len;
            let mut sink = [0u8; 4096];
            while left > 0 {
                let n = left.min(sink.len());
                self.exact(&mut sink[..n]).await?;
                left -= n;
            }
            return Ok(Some(Frame::Ignored));
        }
        if len > MAX_CONTROL_LEN {
            return Err(format!("control frame of type {kind} is {len} bytes long (at most {MAX_CONTROL_LEN})"));
        }
        let mut p = vec![0u8; len];
        self.exact(&mut p).await?;
        let need = |ok: bool, what: &str| if ok { Ok(()) } else { Err(format!("malformed {what} frame ({len} bytes)")) };
        let stream_id = |p: &[u8], what: &str| match u32_at(p, 0) & 0x7fff_ffff {
            0 => Err(format!("{what} on stream 0")),
            id => Ok(id),
        };
        Ok(Some(match kind {
            SYN_STREAM => {
                need(len >= 10, "SYN_STREAM")?;
                let id = stream_id(&p, "SYN_STREAM")?;
                let block = self.inflater.inflate(&p[10..])?;
                Frame::SynStream { id, fin: flags & FLAG_FIN != 0, headers: parse_header_block(block)? }
            }
            SYN_REPLY | HEADERS => {
                need(len >= 4, "SYN_REPLY/HEADERS")?;
                stream_id(&p, "SYN_REPLY/HEADERS")?;
                // Never used, but inflated all the same: the zlib stream spans every block.
                parse_header_block(self.inflater.inflate(&p[4..])?)?;
                Frame::Ignored
            }
            RST_STREAM => {
                need(len == 8 && u32_at(&p, 4) != 0, "RST_STREAM")?;
                Frame::RstStream { id: stream_id(&p, "RST_STREAM")? }
            }
            SETTINGS => {
                need(len >= 4 && (u32_at(&p, 0) as usize).checked_mul(8).and_then(|n| n.checked_add(4)) == Some(len), "SETTINGS")?;
                Frame::Ignored
            }
            PING => {
                need(len == 4 && flags == 0, "PING")?;
                Frame::Ping(u32_at(&p, 0))
            }
            GOAWAY => {
                need(len == 8 && flags == 0, "GOAWAY")?;
                Frame::GoAway
            }
            _ => {
                need(len == 8 && flags == 0, "WINDOW_UPDATE")?;
                Frame::Ignored
            }
        }))
    }
}

/// A frame for the client.
#[derive(Debug)]
enum Out {
    Reply(u32),
    Data(u32, Bytes, bool),
    Rst(u32, u32),
    Ping(u32),
    GoAway(u32, u32),
}

fn control(out: &mut Vec<u8>, kind: u16, flags: u8, payload: &[u8]) {
    out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&((flags as u32) << 24 | payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

fn encode(frame: Out, deflater: &mut Deflater, out: &mut Vec<u8>) {
    match frame {
        Out::Reply(id) => {
            let mut p = id.to_be_bytes().to_vec();
            // An empty header block, as the kubelet replies.
            deflater.deflate(&0u32.to_be_bytes(), &mut p);
            control(out, SYN_REPLY, 0, &p);
        }
        Out::Data(id, data, fin) => {
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&((if fin { FLAG_FIN as u32 } else { 0 }) << 24 | data.len() as u32).to_be_bytes());
            out.extend_from_slice(&data);
        }
        Out::Rst(id, status) => control(out, RST_STREAM, 0, &[id.to_be_bytes(), status.to_be_bytes()].concat()),
        Out::Ping(id) => control(out, PING, 0, &id.to_be_bytes()),
        Out::GoAway(last, status) => control(out, GOAWAY, 0, &[last.to_be_bytes(), status.to_be_bytes()].concat()),
    }
}

/// The only writer of the connection (header blocks must hit the wire in compression order).
async fn write_loop<W: AsyncWrite + Unpin>(mut wr: W, mut rx: mpsc::Receiver<Out>) {
    let mut deflater = Deflater::new();
    let mut buf = Vec::with_capacity(256 * 1024);
    while let Some(first) = rx.recv().await {
        buf.clear();
        encode(first, &mut deflater, &mut buf);
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(f) => encode(f, &mut deflater, &mut buf),
                Err(_) => break,
            }
        }
        let written = tokio::time::timeout(CLIENT_STALL, async {
            wr.write_all(&buf).await?;
            wr.flush().await
        })
        .await;
        if !matches!(written, Ok(Ok(()))) {
            return;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), wr.shutdown()).await;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Error,
    Data,
}

/// The two streams of one forwarded connection (`requestid`).
struct Pair {
    error: Option<u32>,
    data: Option<u32>,
    since: Instant,
    /// client -> pod; dropped on the client's FIN.
    to_pod: Option<mpsc::Sender<Bytes>>,
    forward: Option<AbortHandle>,
}

struct Session {
    out: mpsc::Sender<Out>,
    dial: Dial,
    /// Open client streams -> (requestid, kind).
    streams: HashMap<u32, (String, Kind)>,
    pairs: HashMap<String, Pair>,
    /// Running forwards; each yields its requestid.
    forwards: JoinSet<String>,
    last_id: u32,
    goaway: bool,
}

impl Session {
    async fn run(mut self, mut events: mpsc::Receiver<Result<Frame, String>>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(Ok(Frame::Eof)) | None => return,
                    Some(Ok(frame)) => if let Err(e) = self.handle(frame).await {
                        log::debug!("SPDY port-forward: {e}");
                        let _ = self.out.send(Out::GoAway(self.last_id, GOAWAY_PROTOCOL_ERROR)).await;
                        return;
                    },
                    Some(Err(e)) => {
                        log::debug!("SPDY port-forward: {e}");
                        let _ = self.out.send(Out::GoAway(self.last_id, GOAWAY_PROTOCOL_ERROR)).await;
                        return;
                    }
                },
                Some(done) = self.forwards.join_next() => {
                    // Aborted forwards were cleaned up by whoever aborted them.
                    if let Ok(request) = done {
                        self.end_pair(&request, None).await;
                    }
                }
                _ = tick.tick() => self.expire().await,
            }
            if self.goaway && self.pairs.is_empty() {
                // The client said goodbye and nothing is left to finish.
                let _ = self.out.send(Out::GoAway(self.last_id, GOAWAY_OK)).await;
                return;
            }
        }
    }

    async fn send(&self, frame: Out) {
        let _ = self.out.send(frame).await;
    }

    async fn handle(&mut self, frame: Frame) -> Result<(), String> {
        match frame {
            Frame::SynStream { id, fin, headers } => {
                if id % 2 == 0 || id <= self.last_id {
                    return Err(format!("client stream id {id} after {} (must be odd and increasing)", self.last_id));
                }
                self.last_id = id;
                self.open(id, fin, &headers).await;
            }
            Frame::Data { id, chunk, fin } => {
                let Some((request, Kind::Data)) = self.streams.get(&id).cloned() else {
                    // Error-stream FINs, and frames for streams already ended: nothing to do.
                    return Ok(());
                };
                let Some(tx) = self.pairs.get(&request).and_then(|p| p.to_pod.clone()) else { return Ok(()) };
                // Err(closed) means the pod side is gone and the bytes have nowhere to go.
                if !chunk.is_empty() && tokio::time::timeout(POD_STALL, tx.send(chunk)).await.is_err() {
                    let msg = format!("the pod read nothing for {POD_STALL:?}");
                    self.end_pair(&request, Some(msg)).await;
                    return Ok(());
                }
                if fin {
                    if let Some(p) = self.pairs.get_mut(&request) {
                        p.to_pod = None;
                    }
                }
            }
            Frame::RstStream { id } => {
                if let Some((request, kind)) = self.streams.remove(&id) {
                    match kind {
                        // kubectl resets the data stream when it is done with a connection.
                        Kind::Data => self.end_pair(&request, None).await,
                        Kind::Error => {
                            if let Some(p) = self.pairs.get_mut(&request) {
                                p.error = None;
                            }
                        }
                    }
                }
            }
            // Odd ids are the client's pings; even ones would answer ours (we send none).
            Frame::Ping(id) if id % 2 == 1 => self.send(Out::Ping(id)).await,
            Frame::Ping(_) | Frame::Ignored => {}
            Frame::GoAway => self.goaway = true,
            Frame::Eof => {}
        }
        Ok(())
    }

    /// A new client stream: validate it as the kubelet does, reply, and start forwarding once
    /// both streams of its request are there.
    async fn open(&mut self, id: u32, fin: bool, headers: &[(String, String)]) {
        let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let kind = match get("streamtype") {
            Some("error") => Kind::Error,
            Some("data") => Kind::Data,
            _ => return self.send(Out::Rst(id, RST_PROTOCOL_ERROR)).await,
        };
        let (Some(port), Some(request)) = (get("port").and_then(|p| p.parse::<u16>().ok()).filter(|p| *p > 0), get("requestid")) else {
            return self.send(Out::Rst(id, RST_PROTOCOL_ERROR)).await;
        };
        // Pairs count too: a pair whose streams were reset lingers until it ends or expires.
        if self.goaway || self.streams.len() >= MAX_STREAMS || (self.pairs.len() >= MAX_STREAMS && !self.pairs.contains_key(request)) {
            return self.send(Out::Rst(id, RST_REFUSED_STREAM)).await;
        }
        let request = request.to_string();
        let pair = self.pairs.entry(request.clone()).or_insert_with(|| Pair { error: None, data: None, since: Instant::now(), to_pod: None, forward: None });
        let slot = match kind {
            Kind::Error => &mut pair.error,
            Kind::Data => &mut pair.data,
        };
        // A second stream of the same type for one request.
        if slot.is_some() {
            return self.send(Out::Rst(id, RST_PROTOCOL_ERROR)).await;
        }
        *slot = Some(id);
        let ready = pair.error.zip(pair.data);
        self.streams.insert(id, (request.clone(), kind));
        self.send(Out::Reply(id)).await;
        let Some((error_id, data_id)) = ready else { return };
        let (tx, rx) = mpsc::channel(16);
        let (out, dial) = (self.out.clone(), self.dial.clone());
        let forward = self.forwards.spawn(forward(dial, port, rx, out, error_id, data_id, request.clone()));
        if let Some(pair) = self.pairs.get_mut(&request) {
            pair.forward = Some(forward);
            // A data stream opened with FIN: the client sends nothing (dropping tx says so).
            if !(fin && kind == Kind::Data) {
                pair.to_pod = Some(tx);
            }
        }
    }

    /// Ends a pair: stops its forward, FINs its error stream (after `error`, if any), forgets it.
    async fn end_pair(&mut self, request: &str, error: Option<String>) {
        let Some(pair) = self.pairs.remove(request) else { return };
        if let Some(f) = pair.forward {
            f.abort();
        }
        if let Some(data) = pair.data {
            if self.streams.remove(&data).is_some() && error.is_some() {
                self.send(Out::Rst(data, RST_CANCEL)).await;
            }
        }
        if let Some(e) = pair.error {
            self.streams.remove(&e);
            if let Some(msg) = error {
                self.send(Out::Data(e, msg.into(), false)).await;
            }
            self.send(Out::Data(e, Bytes::new(), true)).await;
        }
    }

    /// Pairs still missing a stream after [`PAIR_TIMEOUT`] end, as the kubelet ends them.
    async fn expire(&mut self) {
        let stale: Vec<String> = self.pairs.iter().filter(|(_, p)| p.forward.is_none() && p.since.elapsed() > PAIR_TIMEOUT).map(|(r, _)| r.clone()).collect();
        for request in stale {
            self.end_pair(&request, Some("timed out waiting for streams".into())).await;
        }
    }
}

/// One forwarded connection: dial the pod, then relay until both directions are done.
async fn forward(dial: Dial, port: u16, mut from_client: mpsc::Receiver<Bytes>, out: mpsc::Sender<Out>, error_id: u32, data_id: u32, request: String) -> String {
    let conn = match dial(port).await {
        Ok(c) => c,
        Err(msg) => {
            let _ = out.send(Out::Data(error_id, msg.into(), false)).await;
            let _ = out.send(Out::Data(data_id, Bytes::new(), true)).await;
            return request;
        }
    };
    let (mut rd, mut wr) = tokio::io::split(conn);
    let up = async move {
        while let Some(b) = from_client.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
        }
        // The client's FIN is a half-close: the pod sees EOF and may still answer.
        let _ = wr.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; POD_READ];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if out.send(Out::Data(data_id, Bytes::copy_from_slice(&buf[..n]), false)).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = out.send(Out::Data(data_id, Bytes::new(), true)).await;
    };
    tokio::join!(up, down);
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_the_spdy3_one() {
        // Its Adler-32 is what every SPDY/3 zlib header carries as DICTID.
        assert_eq!(dictionary().len(), 1423);
        assert_eq!(Compress::new(Compression::best(), true).set_dictionary(dictionary()).unwrap(), 0xe3c6_a7c2);
    }

    /// The client half, enough to drive the server in tests.
    struct Client {
        deflater: Deflater,
        buf: Vec<u8>,
    }

    impl Client {
        fn new() -> Self {
            Client { deflater: Deflater::new(), buf: Vec::new() }
        }
        fn syn_stream(&mut self, id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
            let mut block = (headers.len() as u32).to_be_bytes().to_vec();
            for (n, v) in headers {
                for s in [n, v] {
                    block.extend_from_slice(&(s.len() as u32).to_be_bytes());
                    block.extend_from_slice(s.as_bytes());
                }
            }
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            self.deflater.deflate(&block, &mut p);
            self.buf.clear();
            control(&mut self.buf, SYN_STREAM, 0, &p);
            self.buf.clone()
        }
    }

    fn data(id: u32, bytes: &[u8], fin: bool) -> Vec<u8> {
        let mut out = Vec::new();
        encode(Out::Data(id, Bytes::copy_from_slice(bytes), fin), &mut Deflater::new(), &mut out);
        out
    }

    /// A dial whose "pod" echoes, or that fails.
    fn echo_dial() -> Dial {
        Arc::new(|port| {
            Box::pin(async move {
                if port != 7 {
                    return Err(format!("error forwarding port {port} to pod p, uid u: connection refused"));
                }
                let (pod, ours) = tokio::io::duplex(1024);
                tokio::spawn(async move {
                    let (mut r, mut w) = tokio::io::split(pod);
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
                Ok(Box::new(ours) as PodConn)
            })
        })
    }

    /// Reads frames from the server until `done` says so; returns them (DATA merged per stream).
    async fn frames_until<R: AsyncRead + Unpin>(frames: &mut FrameReader<R>, mut done: impl FnMut(&Frame) -> bool) -> Vec<Frame> {
        let mut seen = Vec::new();
        loop {
            let f = tokio::time::timeout(Duration::from_secs(10), frames.next()).await.expect("server answers").expect("valid frames").expect("open");
            let stop = done(&f);
            seen.push(f);
            if stop {
                return seen;
            }
        }
    }

    #[tokio::test]
    async fn forwards_with_half_close_reports_dial_errors_and_echoes_pings() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve(server, echo_dial()));
        let (rd, mut wr) = tokio::io::split(client);
        let mut frames = FrameReader::new(rd);
        // The server inflates our blocks and we inflate its SYN_REPLYs: both zlib streams
        // must survive several blocks.
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sent = payload.clone();
        // Written while we read: the echo flows back as it goes in.
        let writer = tokio::spawn(async move {
            let mut c = Client::new();
            for (id, kind, port, req) in [(1, "error", "7", "0"), (3, "data", "7", "0"), (5, "error", "9", "1"), (7, "data", "9", "1")] {
                wr.write_all(&c.syn_stream(id, &[("streamtype", kind), ("port", port), ("requestid", req)])).await.unwrap();
            }
            wr.write_all(&data(1, b"", true)).await.unwrap();
            wr.write_all(&data(3, &sent, false)).await.unwrap();
            wr.write_all(&data(3, b"", true)).await.unwrap();
            let mut ping = Vec::new();
            control(&mut ping, PING, 0, &41u32.to_be_bytes());
            wr.write_all(&ping).await.unwrap();
            wr
        });
        let (mut echoed, mut replies, mut pinged, mut fins, mut refused) = (Vec::new(), 0, false, Vec::new(), String::new());
        frames_until(&mut frames, |f| {
            match f {
                Frame::Data { id: 3, chunk, .. } => echoed.extend_from_slice(chunk),
                Frame::Data { id: 5, chunk, .. } => refused.push_str(&String::from_utf8_lossy(chunk)),
                Frame::Ignored => replies += 1,
                Frame::Ping(41) => pinged = true,
                _ => {}
            }
            if let Frame::Data { id, fin: true, .. } = f {
                fins.push(*id);
            }
            fins.len() == 4 && pinged
        })
        .await;
        assert_eq!(replies, 4, "a SYN_REPLY per stream");
        assert!(echoed == payload, "byte-exact echo ({} of {} bytes)", echoed.len(), payload.len());
        assert!(refused.contains("error forwarding port 9 to pod p"), "{refused}");
        fins.sort();
        assert_eq!(fins, [1, 3, 5, 7]);
        // The client leaves: the server ends.
        drop(writer.await.unwrap());
        drop(frames);
        tokio::time::timeout(Duration::from_secs(5), served).await.expect("server ends").unwrap();
    }

    /// A small deterministic generator (no dependency for tests).
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[tokio::test]
    async fn hostile_bytes_end_the_connection_never_the_server() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut c = Client::new();
        let valid = [c.syn_stream(1, &[("streamtype", "error"), ("port", "7"), ("requestid", "0")]), data(1, b"", true)].concat();
        for round in 0..600 {
            let mut input = match round % 3 {
                // Random bytes, sometimes behind a valid-looking control header.
                0 => (0..rng.next() % 300).map(|_| rng.next() as u8).collect::<Vec<u8>>(),
                1 => {
                    let mut v = vec![0x80, 3, 0, (rng.next() % 12) as u8, (rng.next() % 3) as u8, 0, 0, (rng.next() % 64) as u8];
                    v.extend((0..rng.next() % 64).map(|_| rng.next() as u8));
                    v
                }
                // A valid stream with one byte flipped or cut short.
                _ => {
                    let mut v = valid.clone();
                    let i = rng.next() as usize % v.len();
                    v[i] ^= 1 << (rng.next() % 8);
                    v.truncate(v.len() - rng.next() as usize % 4);
                    v
                }
            };
            // Huge declared lengths must not be allocated.
            if round % 50 == 0 {
                input = vec![0x80, 3, 0, 1, 0, 0xff, 0xff, 0xff];
            }
            let (client, server) = tokio::io::duplex(64 * 1024);
            let served = tokio::spawn(serve(server, echo_dial()));
            let (mut rd, mut wr) = tokio::io::split(client);
            wr.write_all(&input).await.unwrap();
            wr.shutdown().await.unwrap();
            let drain = async {
                let mut sink = Vec::new();
                let _ = rd.read_to_end(&mut sink).await;
            };
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(drain, served).1 })
                .await
                .unwrap_or_else(|_| panic!("round {round}: server did not end on {input:02x?}"))
                .unwrap_or_else(|e| panic!("round {round}: server panicked on {input:02x?}: {e}"));
        }
    }

    #[test]
    fn header_blocks_are_bounded() {
        let mut block = 1000u32.to_be_bytes().to_vec();
        block.extend_from_slice(&[0; 16]);
        assert!(parse_header_block(&block).unwrap_err().contains("headers"));
        assert!(parse_header_block(&[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff]).is_err());
        // A zlib bomb: 1 MiB of zeros compresses to about 1 KiB.
        let mut d = Deflater::new();
        let mut bomb = Vec::new();
        d.deflate(&vec![0u8; 1 << 20], &mut bomb);
        assert!(bomb.len() < MAX_CONTROL_LEN);
        assert!(Inflater::new().inflate(&bomb).unwrap_err().contains("more than"));
    }
}
