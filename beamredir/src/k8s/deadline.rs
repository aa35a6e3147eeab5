//! Deadlines on API requests. An API server or proxy that accepts the connection and then
//! never answers (or stops in the middle of a body) must not hang `up`, `rpc` or a watch: it
//! gets one clear error instead.
//!
//! * A request is answered (TCP, TLS, the response head) within `--request-timeout`, and a
//!   plain request's body is complete by then too.
//! * A watch's body streams for as long as the server keeps it open; kube-runtime's watcher
//!   already gives up on one silent for 295 s (the server's 290 s watch timeout plus a margin)
//!   and reconnects, so this layer does not bound it again.
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

/// A request that ran out of `--request-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("no answer within {0:?} (--request-timeout)")]
pub struct Expired(Duration);

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
                return Ok(res.map(|b| Timed::new(b, None)));
            }
            let deadline = Instant::now() + timeout;
            let res = tokio::time::timeout_at(deadline, answer)
                .await
                .map_err(|_| Expired(timeout))?
                .map_err(Into::into)?;
            let due = (kind == Kind::Plain).then_some((deadline, timeout));
            Ok(res.map(|b| Timed::new(b, due)))
        })
    }
}

/// A response body with a deadline for the whole of it (plain requests), or none.
pub struct Timed<B> {
    inner: B,
    /// When the whole body is due, and the `--request-timeout` that set it.
    due: Option<(Pin<Box<Sleep>>, Duration)>,
    /// The error was given: the body ends there.
    expired: bool,
}

impl<B> Timed<B> {
    fn new(inner: B, due: Option<(Instant, Duration)>) -> Self {
        Timed {
            inner,
            due: due.map(|(at, timeout)| (Box::pin(tokio::time::sleep_until(at)), timeout)),
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
            Poll::Ready(frame) => Poll::Ready(frame.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                if let Some((timer, timeout)) = this.due.as_mut() {
                    if timer.as_mut().poll(cx).is_ready() {
                        this.expired = true;
                        return Poll::Ready(Some(Err(Expired(*timeout).into())));
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
    async fn a_silent_body_expires_and_an_untimed_one_streams_on() {
        let ms = Duration::from_millis;
        let never = Trickle {
            every: None,
            period: ms(0),
            left: 0,
        };
        let due = Some((Instant::now() + ms(50), ms(50)));
        let mut body = Timed::new(never, due);
        let e = drain(&mut body).await.unwrap_err();
        assert_eq!(e.to_string(), "no answer within 50ms (--request-timeout)");
        // The error once, then the end.
        assert!(body.is_end_stream());
        assert_eq!(drain(&mut body).await.unwrap(), 0);

        // A watch's body (no deadline): a frame every 20 ms for 300 ms, every one through.
        let talking = Trickle {
            every: Some(Box::pin(tokio::time::sleep(ms(20)))),
            period: ms(20),
            left: 15,
        };
        assert_eq!(drain(&mut Timed::new(talking, None)).await.unwrap(), 15);
    }
}
