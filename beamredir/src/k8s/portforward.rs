//! One TCP connection carried over one port-forward WebSocket through the API server, using
//! the channel protocol (`v4.channel.k8s.io`; `v5` adds a CLOSE signal for half-close).
//!
//! beamredir does its own framing on top of kube's upgraded connection instead of kube's
//! `Portforwarder`, for three reasons: a local half-close must not discard the pod's reply;
//! errors the kubelet sends on the error channel must be reported with pod and port; and
//! byte counters for `status`. Frames: one channel byte, then payload. Port i uses data
//! channel 2i and error channel 2i+1; the first frame on each carries the port (u16 LE).
use std::sync::{Arc, atomic::Ordering};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use kube::client::Connection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, protocol::{Role, WebSocketConfig}},
};

use super::{Cluster, error::{K8sError, classify}};
use crate::forward::ConnStats;

const DATA: u8 = 0;
const ERROR: u8 = 1;
/// v5.channel.k8s.io: a frame on channel 255 whose payload is a channel id closes that
/// channel's sending side.
const CLOSE_SIGNAL: u8 = 255;
/// Largest payload per frame: large enough that per-frame overhead stays negligible, small
/// enough that a whole frame (with its channel byte, WebSocket header and mask) fits rustls'
/// 64 KiB send buffer in one write. Larger frames are taken in several writes, and tungstenite
/// moves the rest of its out buffer to the front after each: with 256 KiB frames that was
/// 384 KiB of memmove per frame.
const FRAME: usize = 64 * 1024 - 64;
/// tungstenite's read buffer per connection (what one read from the TLS stream may return).
const READ_BUFFER: usize = 16 * 1024;
const LINGER_AFTER_LOCAL_EOF: std::time::Duration = std::time::Duration::from_secs(60);

/// Opens a port-forward WebSocket to `pod` port `port`.
pub async fn open(cluster: &Cluster, pod: &str, port: u16) -> Result<Connection, K8sError> {
    let request = kube::core::Request::new(format!("/api/v1/namespaces/{}/pods", cluster.namespace))
        .portforward(pod, &[port])
        .map_err(|e| K8sError::PortForward { pod: pod.into(), port, reason: e.to_string() })?;
    cluster.client.connect(request).await.map_err(|e| match e {
        kube::Error::UpgradeConnection(kube::client::UpgradeConnectionError::ProtocolSwitch(code)) if code == 401 => {
            K8sError::Unauthorized { url: cluster.url.clone(), verb: "create".into(), resource: "pods/portforward".into(), message: "401 on upgrade".into() }
        }
        kube::Error::UpgradeConnection(kube::client::UpgradeConnectionError::ProtocolSwitch(code)) if code == 403 => {
            K8sError::Forbidden { verb: "create".into(), resource: "pods/portforward".into(), namespace: cluster.namespace.clone(), message: format!("the API server refused to forward to pod {pod}") }
        }
        kube::Error::UpgradeConnection(kube::client::UpgradeConnectionError::ProtocolSwitch(code)) => {
            K8sError::PortForward { pod: pod.into(), port, reason: format!("the API server answered {code} instead of switching protocols (pod gone or not running?)") }
        }
        // A non-101 answer with a Status body (403, 404, …).
        other => classify(other, &cluster.url, "create", "pods/portforward", &cluster.namespace),
    })
}

/// Watches the bytes of a relayed connection as they pass: the epmd forward uses it to learn
/// distribution ports and set up their redirects before the answer reaches the local node.
pub trait Inspector: Clone + Send + Sync + 'static {
    /// Bytes from the local side, before they go to the pod.
    fn to_pod(&self, bytes: &[u8]);
    /// Bytes from the pod; they reach the local side when the returned future completes.
    fn from_pod(&self, bytes: &[u8]) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    /// The pod side closed (after its last bytes were relayed).
    fn pod_closed(&self);
}

/// Passes everything through untouched.
#[derive(Clone)]
pub struct NoInspection;

impl Inspector for NoInspection {
    fn to_pod(&self, _: &[u8]) {}
    fn from_pod(&self, _: &[u8]) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(std::future::ready(()))
    }
    fn pod_closed(&self) {}
}

/// How a relayed connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Both sides finished normally.
    Closed,
    /// The kubelet reported an error on the error channel (e.g. nothing listening in the pod).
    PodError(String),
}

/// Relays `local` over the port-forward `conn` until both directions are done.
pub async fn relay<S>(conn: Connection, local: S, port: u16, stats: Arc<ConnStats>) -> Result<Ended, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    relay_inspected(conn, local, port, stats, NoInspection).await
}

/// [`relay`], showing the bytes to `inspector` on their way.
pub async fn relay_inspected<S, I: Inspector>(conn: Connection, local: S, port: u16, stats: Arc<ConnStats>, inspector: I) -> Result<Ended, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let can_half_close = conn.supports_stream_close();
    // kube opens the WebSocket with tungstenite's default 128 KiB read buffer, which it zeroes
    // on every read: 128 KiB resident per connection however little it carries (12.5 MiB for
    // 100 idle connections), and a 128 KiB memset per small message. Nothing has been read
    // yet (kube only wraps the upgraded stream), so re-wrap the same stream with a buffer the
    // size of a TLS record.
    let io = conn.into_stream().into_inner();
    let ws = WebSocketStream::from_raw_socket(io, Role::Client, Some(WebSocketConfig::default().read_buffer_size(READ_BUFFER))).await;
    let (mut sink, mut stream) = ws.split();
    let (mut local_rd, mut local_wr) = tokio::io::split(local);

    // local -> pod. Runs until the local side stops sending.
    let up_stats = stats.clone();
    let local_eof = Arc::new(tokio::sync::Notify::new());
    let local_eof_tx = local_eof.clone();
    let up_inspector = inspector.clone();
    let mut to_pod = tokio::spawn(async move {
        // One buffer for the connection's life: each frame is read into its spare capacity
        // (not zeroed), split off and frozen; once the WebSocket has written a frame and
        // dropped it, `reserve` takes the same allocation back. So a small message costs a
        // small copy, not a fresh 256 KiB allocation and memset.
        let mut buf = BytesMut::with_capacity(FRAME + 1);
        loop {
            buf.reserve(FRAME + 1);
            buf.put_u8(DATA);
            let n = match local_rd.read_buf(&mut (&mut buf).limit(FRAME)).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            up_inspector.to_pod(&buf[1..]);
            if sink.send(Message::Binary(buf.split().freeze())).await.is_err() {
                return None;
            }
            up_stats.bytes_to_pod.fetch_add(n as u64, Ordering::Relaxed);
        }
        if can_half_close {
            let _ = sink.send(Message::Binary(Bytes::from_static(&[CLOSE_SIGNAL, DATA]))).await;
        }
        local_eof_tx.notify_one();
        // Without v5 there is no way to half-close towards the pod: keep the WebSocket open
        // so the pod's reply still arrives.
        Some(sink)
    });

    // pod -> local, on this task.
    let mut seen_port_frame = [false; 2];
    let mut error = String::new();
    let mut result = Ok(Ended::Closed);
    // After a local EOF on v4 (where half-close cannot be signalled, and a full close looks
    // the same), give the pod this long of silence before giving up on the connection.
    let mut lingering = false;
    let linger = tokio::time::sleep(LINGER_AFTER_LOCAL_EOF);
    tokio::pin!(linger);
    loop {
        let msg = tokio::select! {
            msg = stream.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
            _ = local_eof.notified(), if !lingering => {
                lingering = !can_half_close;
                linger.as_mut().reset(tokio::time::Instant::now() + LINGER_AFTER_LOCAL_EOF);
                continue;
            }
            _ = &mut linger, if lingering => break,
        };
        if lingering {
            linger.as_mut().reset(tokio::time::Instant::now() + LINGER_AFTER_LOCAL_EOF);
        }
        let data = match msg {
            Ok(Message::Binary(data)) => data,
            Ok(Message::Close(_)) => break,
            Ok(_) => continue,
            Err(e) => {
                result = Err(format!("WebSocket: {e}"));
                break;
            }
        };
        let Some((&channel, payload)) = data.split_first() else { continue };
        match channel {
            DATA | ERROR if !seen_port_frame[channel as usize] => {
                seen_port_frame[channel as usize] = true;
                if payload.len() != 2 || u16::from_le_bytes([payload[0], payload[1]]) != port {
                    result = Err(format!("bad port announcement on channel {channel}: {payload:?}"));
                    break;
                }
            }
            DATA => {
                inspector.from_pod(payload).await;
                if local_wr.write_all(payload).await.is_err() {
                    break;
                }
                stats.bytes_from_pod.fetch_add(payload.len() as u64, Ordering::Relaxed);
            }
            ERROR => error.push_str(&String::from_utf8_lossy(payload)),
            _ => {}
        }
    }
    let _ = local_wr.shutdown().await;
    inspector.pod_closed();
    // The pod side is done; whatever the local side still sends has nowhere to go.
    if !to_pod.is_finished() {
        to_pod.abort();
    }
    if let Ok(Some(mut sink)) = (&mut to_pod).await {
        let _ = sink.close().await;
    }
    if !error.is_empty() && result.is_ok() {
        result = Ok(Ended::PodError(error));
    }
    result
}


/// Asks the pod's epmd for its registered nodes (NAMES_REQ) through a port-forward. This
/// checks the whole path up front (API server, permission to port-forward, the pod's epmd) in
/// one round trip, and tells which distribution port each node listens on.
pub async fn epmd_names(cluster: &Cluster, pod: &str, epmd_port: u16) -> Result<Vec<(String, u16)>, K8sError> {
    let fail = |reason: String| K8sError::PortForward { pod: pod.to_string(), port: epmd_port, reason };
    let conn = open(cluster, pod, epmd_port).await?;
    let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
    let relay = tokio::spawn(relay(conn, theirs, epmd_port, Arc::new(ConnStats::default())));
    let exchange = async {
        ours.write_all(&[0, 1, b'n']).await?;
        let mut answer = Vec::new();
        ours.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .map_err(|_| fail("no answer from the pod's epmd within 10 s".into()))?
        .map_err(|e| fail(e.to_string()))?;
    match relay.await {
        Ok(Ok(Ended::PodError(e))) => return Err(fail(e.trim().to_string())),
        Ok(Err(e)) => return Err(fail(e)),
        _ => {}
    }
    if answer.len() < 4 {
        return Err(fail("the pod's epmd closed without answering (is epmd running in the pod?)".into()));
    }
    Ok(String::from_utf8_lossy(&answer[4..])
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("name ")?;
            let (name, port) = rest.rsplit_once(" at port ")?;
            Some((name.to_string(), port.trim().parse().ok()?))
        })
        .collect())
}
