//! Deadlines on API requests. An API server or proxy that accepts the connection and then
//! never answers (or stops in the middle of a body) must not hang `up`, `rpc` or a watch: it
//! gets one clear error instead.
//!
//! * A request is answered (TCP, TLS, the response head) within `--request-timeout`, and a
//!   plain request's body is complete by then too.
//! * A watch's body streams for as long as the server keeps it open, but a watch silent for
//!   [`WATCH_SILENCE`] has died (the server sends bookmarks and ends each watch sooner).
//! * Port-forward upgrades are left alone: they have `--upgrade-timeout`, and the streams
//!   after them have WebSocket pings.
//!
//! The layer sits under the authentication layer, so a credential plugin that waits for a
//! login in a browser is not cut short.
use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::{BoxError, Service};

/// How long a watch may stay silent before it counts as dead (kube-rs's own read timeout; a
/// watch asks the server to end it after 290 s at most).
pub const WATCH_SILENCE: Duration = Duration::from_secs(295);

/// What a request ran out of.
#[derive(Debug, thiserror::Error)]
pub enum Expired {
    #[error("no answer within {0:?} (--request-timeout)")]
    Request(Duration),
    #[error("the watch was silent for {0:?}")]
    Watch(Duration),
}

/// What kind of request, by its deadlines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Plain,
    Watch,
    Upgrade,
}

impl Kind {
    fn of<B>(req: &Request<B>) -> Kind {
        if req.headers().contains_key(http::header::UPGRADE) {
            return Kind::Upgrade;
        }
        let watch = req
            .uri()
            .query()
            .unwrap_or("")
            .split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1");
        if watch { Kind::Watch } else { Kind::Plain }
    }
}

/// The service with deadlines; `timeout` zero means none (kubectl's `--request-timeout 0`).
#[derive(Clone)]
pub struct Deadlines<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Deadlines<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        Deadlines { inner, timeout }
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Deadlines<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    ResB: Body + Unpin,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<Timed<ResB>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let kind = Kind::of(&req);
        let timeout = self.timeout;
        let answer = self.inner.call(req);
        Box::pin(async move {
            if kind == Kind::Upgrade || timeout.is_zero() {
                let res = answer.await.map_err(Into::into)?;
                let silence = (kind == Kind::Watch).then_some(WATCH_SILENCE);
                return Ok(res.map(|b| Timed::new(b, None, silence)));
            }
            let deadline = Instant::now() + timeout;
            let res = tokio::time::timeout_at(deadline, answer)
                .await
                .map_err(|_| Expired::Request(timeout))?
                .map_err(Into::into)?;
            Ok(match kind {
                Kind::Watch => res.map(|b| Timed::new(b, None, Some(WATCH_SILENCE))),
                _ => res.map(|b| Timed::new(b, Some((deadline, timeout)), None)),
            })
        })
    }
}

/// A response body with a deadline for the whole of it, or a bound on silence between frames.
pub struct Timed<B> {
    inner: B,
    timer: Option<Pin<Box<Sleep>>>,
    /// The whole body is due by then (plain requests).
    total: Option<Duration>,
    /// Each frame resets the timer (watches).
    silence: Option<Duration>,
    /// The error was given: the body ends there.
    expired: bool,
}

impl<B> Timed<B> {
    fn new(inner: B, due: Option<(Instant, Duration)>, silence: Option<Duration>) -> Self {
        let timer = match (due, silence) {
            (Some((at, _)), _) => Some(Box::pin(tokio::time::sleep_until(at))),
            (None, Some(s)) => Some(Box::pin(tokio::time::sleep(s))),
            (None, None) => None,
        };
        Timed {
            inner,
            timer,
            total: due.map(|(_, t)| t),
            silence,
            expired: false,
        }
    }
}

impl<B> Body for Timed<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(silence), Some(timer)) = (this.silence, this.timer.as_mut()) {
                    timer.as_mut().reset(Instant::now() + silence);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                if let Some(timer) = this.timer.as_mut() {
                    if timer.as_mut().poll(cx).is_ready() {
                        let expired = match (this.total, this.silence) {
                            (Some(t), _) => Expired::Request(t),
                            (None, s) => Expired::Watch(s.unwrap_or_default()),
                        };
                        this.expired = true;
                        return Poll::Ready(Some(Err(expired.into())));
                    }
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_told_apart_by_their_deadlines() {
        let req = |uri: &str| Request::get(uri).body(()).unwrap();
        assert_eq!(
            Kind::of(&req("/api/v1/namespaces/default/pods/app-0")),
            Kind::Plain
        );
        assert_eq!(
            Kind::of(&req("/api/v1/namespaces/default/pods?labelSelector=a%3Db")),
            Kind::Plain
        );
        assert_eq!(
            Kind::of(&req(
                "/api/v1/namespaces/default/pods?watch=true&resourceVersion=5"
            )),
            Kind::Watch
        );
        assert_eq!(
            Kind::of(&req("/api/v1/pods?resourceVersion=5&watch=1")),
            Kind::Watch
        );
        assert_eq!(Kind::of(&req("/api/v1/pods?watcher=true")), Kind::Plain);
        let upgrade = Request::get("/api/v1/namespaces/default/pods/app-0/portforward?ports=4369")
            .header(http::header::UPGRADE, "websocket")
            .body(())
            .unwrap();
        assert_eq!(Kind::of(&upgrade), Kind::Upgrade);
    }

    /// A body that never sends anything, or sends a frame every `every`.
    struct Trickle {
        every: Option<Pin<Box<Sleep>>>,
        period: Duration,
        left: u32,
    }

    impl Body for Trickle {
        type Data = bytes::Bytes;
        type Error = std::io::Error;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, std::io::Error>>> {
            let period = self.period;
            let Some(timer) = self.every.as_mut() else {
                return Poll::Pending;
            };
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if self.left == 0 {
                return Poll::Ready(None);
            }
            self.left -= 1;
            self.every = Some(Box::pin(tokio::time::sleep(period)));
            Poll::Ready(Some(Ok(Frame::data(bytes::Bytes::from_static(b"{}\n")))))
        }
    }

    async fn drain<B: Body<Error = BoxError> + Unpin>(body: &mut B) -> Result<usize, BoxError> {
        let mut frames = 0;
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
        {
            frame?;
            frames += 1;
        }
        Ok(frames)
    }

    #[tokio::test]
    async fn a_silent_body_expires_and_a_talking_watch_does_not() {
        let ms = Duration::from_millis;
        let never = Trickle {
            every: None,
            period: ms(0),
            left: 0,
        };
        let due = Some((Instant::now() + ms(50), ms(50)));
        let mut body = Timed::new(never, due, None);
        let e = drain(&mut body).await.unwrap_err();
        assert_eq!(e.to_string(), "no answer within 50ms (--request-timeout)");
        // The error once, then the end.
        assert!(body.is_end_stream());
        assert_eq!(drain(&mut body).await.unwrap(), 0);

        let never = Trickle {
            every: None,
            period: ms(0),
            left: 0,
        };
        let e = drain(&mut Timed::new(never, None, Some(ms(50))))
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "the watch was silent for 50ms");

        // A frame every 20 ms for 300 ms: the 60 ms silence bound never trips.
        let talking = Trickle {
            every: Some(Box::pin(tokio::time::sleep(ms(20)))),
            period: ms(20),
            left: 15,
        };
        assert_eq!(
            drain(&mut Timed::new(talking, None, Some(ms(60))))
                .await
                .unwrap(),
            15
        );
    }
}
