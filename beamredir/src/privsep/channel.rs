//! The wire between the root part and the network part: a `SOCK_SEQPACKET` unix socket pair.
//! Sequenced packets keep message boundaries (one message, one packet: no framing to parse),
//! carry file descriptors (SCM_RIGHTS, for the listeners the root part creates), and a packet
//! larger than [`MAX_MESSAGE`] is refused rather than read in part.
//!
//! On top of it, [`Link`] sends typed messages as JSON envelopes with ids, so either side can
//! ask the other and wait for the answer while also receiving the other side's requests.
use std::{
    collections::HashMap,
    io::{self, IoSlice, IoSliceMut},
    marker::PhantomData,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, setsockopt, socketpair, sockopt,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::{mpsc, oneshot},
};

/// The largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 1 << 20;
/// At most this many file descriptors ride on one message (one listener at a time).
const MAX_FDS: usize = 1;

/// Creates the connected pair (close-on-exec; the child's end is dup'ed to fd 3 at spawn).
/// Root raises both buffers so a [`MAX_MESSAGE`] packet fits.
pub fn pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let (a, b) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?;
    for fd in [&a, &b] {
        let size = 2 * MAX_MESSAGE;
        if setsockopt(fd, sockopt::SndBufForce, &size).is_err() {
            setsockopt(fd, sockopt::SndBuf, &size)?;
        }
        if setsockopt(fd, sockopt::RcvBufForce, &size).is_err() {
            setsockopt(fd, sockopt::RcvBuf, &size)?;
        }
    }
    Ok((a, b))
}

/// One end of the pair, non-blocking, driven by tokio.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
    buf: tokio::sync::Mutex<Vec<u8>>,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: the AsyncFd owns the descriptor for as long as it is registered.
        let fd = unsafe {
            AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE)
        }?;
        Ok(Channel {
            fd,
            buf: tokio::sync::Mutex::new(vec![0; MAX_MESSAGE]),
        })
    }

    /// Sends one packet, with at most one file descriptor.
    pub async fn send(&self, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        if bytes.len() > MAX_MESSAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("message of {} bytes exceeds {MAX_MESSAGE}", bytes.len()),
            ));
        }
        let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            let sent = guard.try_io(|inner| {
                let cmsgs: Vec<ControlMessage> = if fds.is_empty() {
                    Vec::new()
                } else {
                    vec![ControlMessage::ScmRights(&fds)]
                };
                sendmsg::<()>(
                    inner.as_raw_fd(),
                    &[IoSlice::new(bytes)],
                    &cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(io::Error::from)
            });
            match sent {
                Ok(result) => return result.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one packet and the descriptors that came with it; None when the other side
    /// closed. A packet that was cut short, or more descriptors than expected, is an error.
    pub async fn recv(&self) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        let mut buf = self.buf.lock().await;
        loop {
            let mut guard = self.fd.readable().await?;
            let received = guard.try_io(|inner| {
                let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
                let mut iov = [IoSliceMut::new(&mut buf[..])];
                let msg = recvmsg::<()>(
                    inner.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel just installed these descriptors for us.
                        fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                    }
                }
                if msg
                    .flags
                    .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC)
                    || fds.len() > MAX_FDS
                {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "oversized message on the privilege-separation channel",
                    ));
                }
                Ok((msg.bytes, fds))
            });
            match received {
                Ok(Ok((0, fds))) if fds.is_empty() => return Ok(None),
                Ok(Ok((n, fds))) => return Ok(Some((buf[..n].to_vec(), fds))),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// What travels in one packet.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope<T> {
    id: u64,
    /// Set on answers: the id of the request answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reply_to: Option<u64>,
    body: T,
}

/// A message from the other side that is not an answer to one of ours.
pub struct Incoming<T> {
    pub id: u64,
    pub body: T,
    pub fds: Vec<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("the other part of beamredir is gone")]
    Closed,
    #[error("no answer from the other part of beamredir within {0:?}")]
    Timeout(Duration),
    #[error("privilege-separation channel: {0}")]
    Io(#[from] io::Error),
    #[error("malformed message on the privilege-separation channel: {0}")]
    Malformed(String),
}

type Pending<In> = Arc<Mutex<HashMap<u64, oneshot::Sender<(In, Vec<OwnedFd>)>>>>;

/// Typed requests and answers over a [`Channel`]. `Out` is what this side sends, `In` what it
/// receives.
pub struct Link<Out, In> {
    chan: Arc<Channel>,
    next_id: AtomicU64,
    pending: Pending<In>,
    _out: PhantomData<fn(Out)>,
}

impl<Out: Serialize, In: DeserializeOwned + Send + 'static> Link<Out, In> {
    /// Starts reading: answers go to whoever waits for them, everything else arrives on the
    /// returned receiver (which ends when the other side closes or sends garbage).
    pub fn start(chan: Channel) -> (Arc<Self>, mpsc::Receiver<Result<Incoming<In>, LinkError>>) {
        let link = Arc::new(Link {
            chan: Arc::new(chan),
            next_id: AtomicU64::new(1),
            pending: Arc::default(),
            _out: PhantomData,
        });
        let (tx, rx) = mpsc::channel(64);
        let (chan, pending) = (link.chan.clone(), link.pending.clone());
        tokio::spawn(async move {
            let end = loop {
                let (bytes, fds) = match chan.recv().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break LinkError::Closed,
                    Err(e) => break LinkError::Io(e),
                };
                let envelope: Envelope<In> = match serde_json::from_slice(&bytes) {
                    Ok(e) => e,
                    Err(e) => break LinkError::Malformed(e.to_string()),
                };
                match envelope.reply_to {
                    Some(to) => {
                        if let Some(waiter) = pending.lock().unwrap().remove(&to) {
                            let _ = waiter.send((envelope.body, fds));
                        }
                    }
                    None => {
                        if tx
                            .send(Ok(Incoming {
                                id: envelope.id,
                                body: envelope.body,
                                fds,
                            }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            };
            // Wake every waiter (their senders drop) and tell the handler why it ended.
            pending.lock().unwrap().clear();
            let _ = tx.send(Err(end)).await;
        });
        (link, rx)
    }

    async fn send_envelope(
        &self,
        id: u64,
        reply_to: Option<u64>,
        body: Out,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), LinkError> {
        let bytes = serde_json::to_vec(&Envelope { id, reply_to, body })
            .map_err(|e| LinkError::Malformed(e.to_string()))?;
        Ok(self.chan.send(&bytes, fd).await?)
    }

    fn fresh_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Sends a request and waits (at most `timeout`) for its answer.
    pub async fn request(
        &self,
        body: Out,
        timeout: Duration,
    ) -> Result<(In, Vec<OwnedFd>), LinkError> {
        let id = self.fresh_id();
        let (tx, rx) = oneshot::channel();
        // Registered before sending: the answer may come back before `send` returns.
        self.pending.lock().unwrap().insert(id, tx);
        if let Err(e) = self.send_envelope(id, None, body, None).await {
            self.pending.lock().unwrap().remove(&id);
            return Err(e);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(LinkError::Closed),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(LinkError::Timeout(timeout))
            }
        }
    }

    /// Answers request `to`, optionally passing a file descriptor.
    pub async fn reply(
        &self,
        to: u64,
        body: Out,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), LinkError> {
        self.send_envelope(self.fresh_id(), Some(to), body, fd)
            .await
    }

    /// Sends a message that expects no answer.
    pub async fn notify(&self, body: Out) -> Result<(), LinkError> {
        self.send_envelope(self.fresh_id(), None, body, None).await
    }
}
