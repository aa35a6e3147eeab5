//! One TCP connection carried over one port-forward WebSocket through the API server, using
//! the channel protocol (`v4.channel.k8s.io`; `v5` adds a CLOSE signal for half-close).
//!
//! beamredir does its own framing on top of kube's upgraded connection instead of kube's
//! `Portforwarder`, because: a local half-close must not discard the pod's reply; errors the
//! kubelet sends on the error channel must be reported with pod and port; the relay needs byte
//! counters, a liveness check and bounds. Frames: one channel byte, then payload. Port i uses
//! data channel 2i and error channel 2i+1; the first frame on each carries the port (u16 LE).
//!
//! Everything from the API server is bounded: the upgrade's duration, each WebSocket message's
//! size, the silence tolerated on a connection (WebSocket pings every 20 s), and the time the
//! pod may take to answer after the local side finished sending.
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use kube::client::Connection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        protocol::{Role, WebSocketConfig},
    },
};

use super::{
    Cluster,
    error::{K8sError, classify},
};
use crate::{
    erlang::epmd::{NAMES_REQ, Parsed, parse_names_resp},
    forward::ConnStats,
};

const DATA: u8 = 0;
const ERROR: u8 = 1;
/// v5.channel.k8s.io: a frame on channel 255 whose payload is a channel id closes that
/// channel's sending side.
const CLOSE_SIGNAL: u8 = 255;
/// Largest payload per frame: large enough that per-frame overhead stays negligible, small
/// enough that a whole frame (with its channel byte, WebSocket header and mask) fits rustls'
/// 64 KiB send buffer in one write.
const FRAME: usize = 64 * 1024 - 64;
/// tungstenite's read buffer per connection (what one read from the TLS stream may return).
const READ_BUFFER: usize = 16 * 1024;
/// The largest WebSocket message or frame accepted from the API server (a kubelet sends at
/// most 32 KiB per frame; 1 MiB leaves room and bounds a hostile server).
const MAX_INCOMING: usize = 1 << 20;
/// How long the pod may stay silent after the local side finished sending.
pub const LINGER_AFTER_LOCAL_EOF: Duration = Duration::from_secs(60);
/// While lingering, how often to ask whether the local side has closed its socket altogether
/// (then nobody can read the pod's answer, and the relay ends at once): at EOF, shortly after
/// (the closing process may not have let go of its socket yet), then every second.
const CLOSED_CHECKS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(20),
    Duration::from_millis(200),
];
const CLOSED_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Tells whether the local side has closed its socket (not just shut down its sending side).
pub type LocalClosed = Arc<dyn Fn() -> bool + Send + Sync>;
/// A ping this often, and the connection is dead after this much silence (no data, no pong).
const PING_EVERY: Duration = Duration::from_secs(20);
const DEAD_AFTER: Duration = Duration::from_secs(50);

/// How long an upgrade may take by default (TLS handshake, authentication, kubelet dial).
pub const DEFAULT_UPGRADE_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens a port-forward WebSocket to `pod` port `port`, within `timeout`.
pub async fn open(
    cluster: &Cluster,
    pod: &str,
    port: u16,
    timeout: Duration,
) -> Result<Connection, K8sError> {
    let fail = |reason: String| K8sError::PortForward {
        pod: pod.into(),
        port,
        reason,
    };
    let request =
        kube::core::Request::new(format!("/api/v1/namespaces/{}/pods", cluster.namespace))
            .portforward(pod, &[port])
            .map_err(|e| fail(e.to_string()))?;
    // More port-forwards are likely to follow this one: have connections ready for them.
    cluster.spares.demand();
    let upgraded = match tokio::time::timeout(timeout, cluster.client.connect(request)).await {
        Ok(r) => r,
        Err(_) => {
            return Err(fail(format!(
                "the API server did not complete the port-forward upgrade within {timeout:?}"
            )));
        }
    };
    match upgraded {
        Ok(conn) => Ok(conn),
        Err(kube::Error::UpgradeConnection(
            kube::client::UpgradeConnectionError::ProtocolSwitch(code),
        )) if code == 401 => Err(K8sError::Unauthorized {
            url: cluster.url.clone(),
            verb: "get".into(),
            resource: "pods/portforward".into(),
            message: "401 on upgrade".into(),
        }),
        Err(kube::Error::UpgradeConnection(
            kube::client::UpgradeConnectionError::ProtocolSwitch(code),
        )) if code == 403 => {
            let (verbs, grant) = super::authz::portforward_advice(cluster, pod).await;
            Err(K8sError::Forbidden {
                verb: verbs,
                resource: "pods/portforward".into(),
                namespace: cluster.namespace.clone(),
                message: format!("the API server refused to forward to pod {pod}"),
                grant,
            })
        }
        Err(kube::Error::UpgradeConnection(
            kube::client::UpgradeConnectionError::ProtocolSwitch(code),
        )) => Err(fail(format!(
            "the API server answered {code} instead of switching protocols (pod gone or not running?)"
        ))),
        // A non-101 answer with a Status body (403, 404, …).
        Err(other) => match classify(
            other,
            &cluster.url,
            "get",
            "pods/portforward",
            &cluster.namespace,
        ) {
            K8sError::Forbidden {
                message, namespace, ..
            } => {
                let (verbs, grant) = super::authz::portforward_advice(cluster, pod).await;
                Err(K8sError::Forbidden {
                    verb: verbs,
                    resource: "pods/portforward".into(),
                    namespace,
                    message,
                    grant,
                })
            }
            other => Err(other),
        },
    }
}

/// Watches the bytes of a relayed connection as they pass: the epmd forward uses it to learn
/// distribution ports and set up their redirects before the answer reaches the local node.
pub trait Inspector: Clone + Send + Sync + 'static {
    /// Bytes from the local side, before they go to the pod.
    fn on_local_bytes(&self, bytes: &[u8]);
    /// Bytes from the pod; they reach the local side when the returned future completes.
    fn on_pod_bytes(
        &self,
        bytes: &[u8],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    /// The pod side closed (after its last bytes were relayed).
    fn on_pod_closed(&self);
}

/// Passes everything through untouched.
#[derive(Clone)]
pub struct NoInspection;

impl Inspector for NoInspection {
    fn on_local_bytes(&self, _: &[u8]) {}
    fn on_pod_bytes(
        &self,
        _: &[u8],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(std::future::ready(()))
    }
    fn on_pod_closed(&self) {}
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
pub async fn relay<S>(
    conn: Connection,
    local: S,
    port: u16,
    stats: Arc<ConnStats>,
) -> Result<Ended, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    relay_inspected(conn, local, port, stats, NoInspection).await
}

/// [`relay`], showing the bytes to `inspector` on their way.
pub async fn relay_inspected<S, I: Inspector>(
    conn: Connection,
    local: S,
    port: u16,
    stats: Arc<ConnStats>,
    inspector: I,
) -> Result<Ended, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    relay_with(conn, local, port, stats, inspector, None).await
}

/// [`relay_inspected`]; after a local EOF, `local_closed` (if given) tells a local side that
/// closed its socket from one that only half-closed and still waits for the pod's answer: the
/// relay then ends at once instead of lingering (with the v4 protocol the pod never learns of
/// the EOF, so a pod that waits for it would hold the connection for the whole linger).
pub async fn relay_with<S, I: Inspector>(
    conn: Connection,
    local: S,
    port: u16,
    stats: Arc<ConnStats>,
    inspector: I,
    local_closed: Option<LocalClosed>,
) -> Result<Ended, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let can_half_close = conn.supports_stream_close();
    // kube opens the WebSocket with tungstenite's default 128 KiB read buffer (zeroed on every
    // read) and 64 MiB message limit. Nothing has been read yet (kube only wraps the upgraded
    // stream), so re-wrap the same stream with a TLS-record-sized buffer and tight limits.
    let io = conn.into_stream().into_inner();
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_INCOMING))
        .max_frame_size(Some(MAX_INCOMING));
    let ws = WebSocketStream::from_raw_socket(io, Role::Client, Some(config)).await;
    let (mut sink, mut stream) = ws.split();
    let (mut local_rd, mut local_wr) = tokio::io::split(local);

    // local -> pod (and the pings). Runs until the local side stops sending.
    let up_stats = stats.clone();
    let local_eof = Arc::new(tokio::sync::Notify::new());
    let local_eof_tx = local_eof.clone();
    let up_inspector = inspector.clone();
    let mut to_pod = tokio::spawn(async move {
        // One buffer for the connection's life: each frame is read into its spare capacity
        // (not zeroed), split off and frozen; once the WebSocket has written a frame and
        // dropped it, `reserve` takes the same allocation back.
        let mut buf = BytesMut::with_capacity(FRAME + 1);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
        loop {
            buf.reserve(FRAME + 1);
            buf.put_u8(DATA);
            let read = {
                let mut limited = (&mut buf).limit(FRAME);
                tokio::select! {
                    read = local_rd.read_buf(&mut limited) => Some(read),
                    _ = ping.tick() => None,
                }
            };
            let n = match read {
                Some(Ok(0) | Err(_)) => break,
                Some(Ok(n)) => n,
                None => {
                    buf.clear();
                    if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                        return;
                    }
                    continue;
                }
            };
            up_inspector.on_local_bytes(&buf[1..]);
            if sink
                .send(Message::Binary(buf.split().freeze()))
                .await
                .is_err()
            {
                return;
            }
            up_stats.bytes_to_pod.fetch_add(n as u64, Ordering::Relaxed);
        }
        if can_half_close {
            let _ = sink
                .send(Message::Binary(Bytes::from_static(&[CLOSE_SIGNAL, DATA])))
                .await;
        }
        local_eof_tx.notify_one();
        // Keep the WebSocket open (and pinging) so the pod's reply still arrives.
        loop {
            ping.tick().await;
            if sink.send(Message::Ping(Bytes::new())).await.is_err() {
                return;
            }
        }
    });

    // pod -> local, on this task.
    let mut seen_port_frame = [false; 2];
    let mut error = String::new();
    let mut result = Ok(Ended::Closed);
    // After a local EOF the pod may answer for at most this long of silence (v4 cannot signal
    // half-close; v5 can, but a pod that never closes must not hold the connection forever).
    let mut lingering = false;
    let linger = tokio::time::sleep(LINGER_AFTER_LOCAL_EOF);
    tokio::pin!(linger);
    let dead = tokio::time::sleep(DEAD_AFTER);
    tokio::pin!(dead);
    let closed_check = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(closed_check);
    let mut closed_checks = 0;
    loop {
        let msg = tokio::select! {
            msg = stream.next() => match msg {
                Some(msg) => msg,
                None => break,
            },
            _ = local_eof.notified(), if !lingering => {
                lingering = true;
                let now = tokio::time::Instant::now();
                linger.as_mut().reset(now + LINGER_AFTER_LOCAL_EOF);
                closed_check.as_mut().reset(now + CLOSED_CHECKS[0]);
                continue;
            }
            _ = &mut linger, if lingering => break,
            _ = &mut closed_check, if lingering && local_closed.is_some() => {
                if local_closed.as_ref().is_some_and(|closed| closed()) {
                    break;
                }
                closed_checks += 1;
                let next = CLOSED_CHECKS.get(closed_checks).copied().unwrap_or(CLOSED_CHECK_EVERY);
                closed_check.as_mut().reset(tokio::time::Instant::now() + next);
                continue;
            }
            _ = &mut dead => {
                result = Err(format!("no data and no pong from the API server for {DEAD_AFTER:?}: the connection is dead"));
                break;
            }
        };
        dead.as_mut()
            .reset(tokio::time::Instant::now() + DEAD_AFTER);
        let data = match msg {
            Ok(Message::Binary(data)) => data,
            Ok(Message::Close(_)) => break,
            Ok(_) => continue,
            Err(e) => {
                result = Err(format!("WebSocket: {e}"));
                break;
            }
        };
        if lingering {
            linger
                .as_mut()
                .reset(tokio::time::Instant::now() + LINGER_AFTER_LOCAL_EOF);
        }
        let Some((&channel, payload)) = data.split_first() else {
            continue;
        };
        match channel {
            DATA | ERROR if !seen_port_frame[channel as usize] => {
                seen_port_frame[channel as usize] = true;
                if payload.len() != 2 || u16::from_le_bytes([payload[0], payload[1]]) != port {
                    result = Err(format!(
                        "bad port announcement on channel {channel}: {:?}",
                        &payload[..payload.len().min(8)]
                    ));
                    break;
                }
            }
            DATA => {
                inspector.on_pod_bytes(payload).await;
                if local_wr.write_all(payload).await.is_err() {
                    break;
                }
                stats
                    .bytes_from_pod
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
            }
            // The kubelet's error text is short; keep at most 4 KiB of it.
            ERROR if error.len() < 4096 => error.push_str(&String::from_utf8_lossy(
                &payload[..payload.len().min(4096)],
            )),
            _ => {}
        }
    }
    let _ = local_wr.shutdown().await;
    inspector.on_pod_closed();
    // The pod side is done; whatever the local side still sends has nowhere to go.
    to_pod.abort();
    let _ = (&mut to_pod).await;
    if !error.is_empty() && result.is_ok() {
        result = Ok(Ended::PodError(error));
    }
    result
}

/// A byte stream to `pod` port `port` through a port-forward: the relay runs in a task, and the
/// returned end behaves like a TCP connection to the pod's port (for probes and rpc, which
/// talk to the pod from this process rather than from a local node).
pub async fn stream(cluster: &Cluster, pod: &str, port: u16, timeout: Duration) -> Result<tokio::io::DuplexStream, K8sError> {
    let conn = open(cluster, pod, port, timeout).await?;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (ns, pod) = (cluster.namespace.clone(), pod.to_string());
    tokio::spawn(async move {
        match relay(conn, theirs, port, Arc::new(ConnStats::default())).await {
            Ok(Ended::PodError(e)) => log::debug!("pod {ns}/{pod} port {port}: {}", e.trim()),
            Err(e) => log::debug!("pod {ns}/{pod} port {port}: {e}"),
            Ok(Ended::Closed) => {}
        }
    });
    Ok(ours)
}

/// Asks the pod's epmd for its registered nodes (NAMES_REQ) through a port-forward. This
/// checks the whole path (API server, permission to port-forward, the pod's epmd) in one round
/// trip, and tells which distribution port each node listens on. The answer is read with the
/// fuzzed epmd parser and at most [`crate::erlang::epmd::MAX_BUFFERED`] bytes.
pub async fn epmd_names(
    cluster: &Cluster,
    pod: &str,
    epmd_port: u16,
    timeout: Duration,
) -> Result<Vec<(String, u16)>, K8sError> {
    use crate::erlang::epmd::MAX_BUFFERED;
    let fail = |reason: String| K8sError::PortForward {
        pod: pod.to_string(),
        port: epmd_port,
        reason,
    };
    let conn = open(cluster, pod, epmd_port, timeout).await?;
    let (mut ours, theirs) = tokio::io::duplex(64 * 1024);
    let relay = tokio::spawn(relay(
        conn,
        theirs,
        epmd_port,
        Arc::new(ConnStats::default()),
    ));
    let exchange = async {
        ours.write_all(&[0, 1, NAMES_REQ]).await?;
        let mut answer = Vec::new();
        (&mut ours)
            .take(MAX_BUFFERED as u64 + 1)
            .read_to_end(&mut answer)
            .await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| fail(format!("no answer from the pod's epmd within {timeout:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    // The relay ends right after the pod side closed (which is what ended our read).
    match tokio::time::timeout(Duration::from_secs(5), relay).await {
        Ok(Ok(Ok(Ended::PodError(e)))) => return Err(fail(e.trim().to_string())),
        Ok(Ok(Err(e))) => return Err(fail(e)),
        _ => {}
    }
    if answer.len() > MAX_BUFFERED {
        return Err(fail(format!(
            "the pod's epmd answered more than {MAX_BUFFERED} bytes to NAMES"
        )));
    }
    if answer.is_empty() {
        return Err(fail(
            "the pod's epmd closed without answering (is epmd running in the pod?)".into(),
        ));
    }
    match parse_names_resp(&answer, true) {
        Parsed::Complete { value, .. } => Ok(value.nodes),
        Parsed::Incomplete => Err(fail("the pod's epmd answer ended early".into())),
        Parsed::Invalid(reason) => Err(fail(format!(
            "the pod's epmd answer is not a NAMES answer: {reason}"
        ))),
    }
}
