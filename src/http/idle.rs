//! Idle timeouts for request and response bodies: a body that produces no
//! frame for the configured time fails.
//!
//! Written here rather than taken from tower-http's body timeout layers:
//! its `TimeoutBody` (0.6) does not pass on `size_hint` and
//! `is_end_stream`, so hyper would lose every body's length (chunked
//! framing for requests with a `Content-Length`, empty answers that look
//! unfinished). This one passes both on, and arms its timer only when the
//! body has nothing ready.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

/// The body stalled for longer than the idle timeout.
#[derive(Debug, thiserror::Error)]
#[error("the body stalled for more than {0:?}")]
pub struct BodyIdleTimeout(Duration);

/// Wraps a body and fails it when no frame arrives within `timeout`.
///
/// A failed answer body makes hyper abort the caller's connection, so a
/// stalled or broken upstream never looks like a complete response; a failed
/// request body is the caller's 408.
///
/// The timer is armed only when the body has nothing ready (the clock runs
/// from the first poll that found it idle), so a body whose frames are
/// ready when polled, like most small answers, never touches the timer.
pub struct IdleTimeout<B> {
    inner: B,
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The timer runs for the current wait (no frame since it was armed).
    armed: bool,
}

impl<B> IdleTimeout<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            sleep: None,
            armed: false,
        }
    }
}

impl<B> http_body::Body for IdleTimeout<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.armed = false;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let timeout = this.timeout;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if !this.armed {
                    sleep.as_mut().reset(Instant::now() + timeout);
                    this.armed = true;
                }
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyIdleTimeout(timeout).into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
