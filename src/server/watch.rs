//! What one connection is doing, and the watchdog that closes it when it
//! holds a place without using it.
//!
//! Written here because hyper and hyper-util leave three gaps a proxy at
//! the edge cannot have: `auto::Builder` reads the protocol preface with no
//! timeout at all; hyper's HTTP/1 header-read timer starts as soon as a
//! connection is idle (so it doubles as a keep-alive timeout, and does not
//! run while the protocol is sniffed or TLS is negotiated); and nothing
//! notices a caller that stops reading its answer, because hyper simply
//! stops polling the body (a zero TCP window, or no HTTP/2 WINDOW_UPDATE).
//!
//! Every connection has an [`Activity`], fed by its socket ([`WatchedIo`]:
//! bytes of a request head arriving), its requests ([`Activity::request`])
//! and its answers' bodies ([`WatchedBody`]: a frame handed to hyper and not
//! yet followed by another poll means the caller is not taking the bytes).
//! [`watch`] resolves when the connection must close:
//!
//! - no request head within `header_read_timeout` from accept (this covers
//!   the protocol sniff, the TLS handshake and the first head);
//! - an HTTP/1 request head begun but not finished within
//!   `header_read_timeout`;
//! - no request in progress for `idle_timeout` (keep-alive, both versions);
//! - an answer whose caller has not accepted a byte for `body_idle_timeout`
//!   (the write-progress timeout);
//! - the accept loop asked it to make room ([`Activity::evict`]).
//!
//! The watchdog runs in a task of its own ([`super::run`] aborts the
//! connection's task when [`watch`] resolves), and nothing a request does
//! wakes it: it looks again at least every [`Timeouts::tick`], and every
//! deadline a request, a head or a frame can start is at least that far
//! from the moment it starts, so the look before a deadline arms it exactly.
//! A task of its own because, sharing the connection's task, every wake of
//! the connection polled the watchdog's timer, wake-up and eviction futures
//! and re-armed a timer (docs/benchmarks.md has the count).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The timeouts the watchdog enforces.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From accept to the first request head, and for each HTTP/1 head.
    pub header_read: Duration,
    /// No request in progress for this long closes the connection.
    pub idle: Duration,
    /// An answer the caller does not accept for this long closes it.
    pub write_stall: Duration,
}

impl Timeouts {
    /// The longest the watchdog sleeps: no deadline is nearer than this to
    /// the event that starts it.
    pub fn tick(&self) -> Duration {
        self.header_read
            .min(self.idle)
            .min(self.write_stall)
            .max(Duration::from_millis(1))
    }
}

/// Why the watchdog closed a connection (the metrics' label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// No request head within the header-read timeout from accept.
    NoRequest,
    /// An HTTP/1 request head not finished in time.
    SlowHead,
    /// Keep-alive connection idle for the idle timeout.
    Idle,
    /// The caller stopped accepting its answer.
    StalledReader,
    /// Closed to make room for a new connection.
    Evicted,
}

impl Closed {
    /// Every reason, in the metrics' order.
    pub const ALL: [Self; 5] = [
        Self::NoRequest,
        Self::SlowHead,
        Self::Idle,
        Self::StalledReader,
        Self::Evicted,
    ];

    /// The metrics label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NoRequest => "no_request",
            Self::SlowHead => "slow_head",
            Self::Idle => "idle",
            Self::StalledReader => "stalled_reader",
            Self::Evicted => "evicted",
        }
    }
}

/// The shared state of one connection. Times are milliseconds since
/// `born` plus one, so that zero means "not set".
#[derive(Debug)]
pub struct Activity {
    born: Instant,
    /// Request heads received.
    requests: AtomicU64,
    /// Requests whose answer has not ended (or been dropped).
    open: AtomicUsize,
    /// When `open` last fell to zero.
    idle_since: AtomicU64,
    /// When bytes of a request head arrived with no request open (HTTP/1).
    head_started: AtomicU64,
    /// The connection speaks HTTP/2 (heads come in frames, not bytes).
    h2: AtomicBool,
    /// Per open answer: when it handed hyper a frame not yet followed by
    /// another poll (zero: being polled).
    handed: Mutex<Vec<Weak<AtomicU64>>>,
    evict: CancellationToken,
    /// The connection's task has ended: its watchdog stops.
    ended: CancellationToken,
}

impl Activity {
    /// A connection accepted now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            born: Instant::now(),
            requests: AtomicU64::new(0),
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(1),
            head_started: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            handed: Mutex::new(Vec::new()),
            evict: CancellationToken::new(),
            ended: CancellationToken::new(),
        })
    }

    fn now(&self) -> u64 {
        self.born.elapsed().as_millis() as u64 + 1
    }

    fn at(&self, ms: u64) -> Instant {
        self.born + Duration::from_millis(ms.saturating_sub(1))
    }

    /// A connection that has not sent a whole request head yet: since when
    /// (when it was accepted).
    pub fn no_request_yet(&self) -> Option<Instant> {
        (self.requests.load(Ordering::Relaxed) == 0).then_some(self.born)
    }

    /// A keep-alive connection with no request in progress: since when.
    pub fn idle_keep_alive(&self) -> Option<Instant> {
        let idle = self.requests.load(Ordering::Relaxed) > 0
            && self.open.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == 0;
        idle.then(|| self.at(self.idle_since.load(Ordering::Relaxed)))
    }

    /// Whether the connection speaks HTTP/2 (known from its first request).
    pub fn is_h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }

    /// Asks the connection to close (the accept loop needs its place).
    pub fn evict(&self) {
        self.evict.cancel();
    }

    /// Whether the connection was asked to close to make room.
    #[cfg(test)]
    pub(super) fn evicted(&self) -> bool {
        self.evict.is_cancelled()
    }

    /// The connection's task has ended (its watchdog may stop).
    pub fn end(&self) {
        self.ended.cancel();
    }

    /// Resolves once [`Activity::end`] is called.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// A request head arrived; the guard counts it open until dropped
    /// (with its answer's body, see [`WatchedBody`]).
    pub fn request(self: &Arc<Self>, h2: bool) -> OpenRequest {
        if h2 {
            self.h2.store(true, Ordering::Relaxed);
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenRequest {
            activity: self.clone(),
        }
    }

    /// Bytes arrived from the caller.
    fn read_some(&self) {
        if self.open.load(Ordering::Relaxed) == 0
            && !self.h2.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(self.now(), Ordering::Relaxed);
        }
    }

    fn register(&self, handed: &Arc<AtomicU64>) {
        self.handed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::downgrade(handed));
    }

    /// The oldest frame handed to hyper and not yet taken, if any.
    fn oldest_handed(&self) -> Option<u64> {
        let mut handed = self
            .handed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        handed.retain(|w| w.strong_count() > 0);
        handed
            .iter()
            .filter_map(Weak::upgrade)
            .map(|h| h.load(Ordering::Relaxed))
            .filter(|&t| t != 0)
            .min()
    }

    /// Close now, or look again at this instant (or when state changes).
    fn verdict(&self, t: &Timeouts) -> Result<Instant, Closed> {
        let now = self.now();
        let ms = |d: Duration| d.as_millis() as u64;
        let due = |since: u64, limit: Duration, why: Closed| {
            let deadline = since + ms(limit);
            if now >= deadline {
                Err(why)
            } else {
                Ok(deadline)
            }
        };
        if self.open.load(Ordering::Acquire) > 0 {
            let next = match self.oldest_handed() {
                Some(handed) => due(handed, t.write_stall, Closed::StalledReader)?,
                None => now + ms(t.write_stall),
            };
            return Ok(self.at(next));
        }
        if self.requests.load(Ordering::Relaxed) == 0 {
            return due(1, t.header_read, Closed::NoRequest).map(|d| self.at(d));
        }
        let idle = due(
            self.idle_since.load(Ordering::Relaxed),
            t.idle,
            Closed::Idle,
        )?;
        let head = match self.head_started.load(Ordering::Relaxed) {
            0 => idle,
            started => due(started, t.header_read, Closed::SlowHead)?,
        };
        Ok(self.at(idle.min(head)))
    }
}

/// Resolves when the connection must close, with the reason. Looks at the
/// connection at its next deadline or after a tick, whichever is first.
pub async fn watch(activity: &Activity, timeouts: Timeouts) -> Closed {
    let tick = timeouts.tick();
    loop {
        let next = match activity.verdict(&timeouts) {
            Ok(next) => next.min(Instant::now() + tick),
            Err(closed) => return closed,
        };
        tokio::select! {
            biased;
            () = activity.evict.cancelled() => return Closed::Evicted,
            () = tokio::time::sleep_until(next) => {}
        }
    }
}

/// A request in progress on a connection; dropped with its answer.
#[derive(Debug)]
pub struct OpenRequest {
    activity: Arc<Activity>,
}

impl Drop for OpenRequest {
    fn drop(&mut self) {
        let a = &self.activity;
        a.idle_since.store(a.now(), Ordering::Relaxed);
        a.open.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// An answer's body as the watchdog sees it: a frame handed to hyper and
    /// not followed by another poll within the write-stall timeout means the
    /// caller takes nothing (hyper polls again as soon as it could write).
    pub struct WatchedBody<B> {
        #[pin]
        inner: B,
        handed: Arc<AtomicU64>,
        open: OpenRequest,
    }
}

impl<B> WatchedBody<B> {
    /// Wraps an answer's body; `open` is its request's guard.
    pub fn new(inner: B, open: OpenRequest) -> Self {
        let handed = Arc::new(AtomicU64::new(0));
        open.activity.register(&handed);
        Self {
            inner,
            handed,
            open,
        }
    }
}

impl<B> http_body::Body for WatchedBody<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let mut this = self.project();
        this.handed.store(0, Ordering::Relaxed);
        let polled = this.inner.as_mut().poll_frame(cx);
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && !this.inner.is_end_stream() {
            this.handed
                .store(this.open.activity.now(), Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's socket, telling its [`Activity`] when request bytes
/// arrive.
pub struct WatchedIo<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I> WatchedIo<I> {
    /// Wraps a socket (or a TLS stream).
    pub fn new(inner: I, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &I {
        &self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WatchedIo<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WatchedIo<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header_read: Duration::from_secs(2),
        idle: Duration::from_secs(75),
        write_stall: Duration::from_secs(10),
    };

    async fn closes_after(a: &Activity) -> (Closed, Duration) {
        let start = Instant::now();
        let why = watch(a, T).await;
        (why, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_without_a_request_closes_at_the_header_deadline() {
        let a = Activity::new();
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.read_some(); // half a preface
        let (why, after) = closes_after(&a).await;
        assert_eq!(why, Closed::NoRequest);
        assert_eq!(after, Duration::from_millis(1500));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_keep_alive_connection_closes_after_the_idle_timeout() {
        let a = Activity::new();
        drop(a.request(false));
        let (why, after) = closes_after(&a).await;
        assert_eq!(why, Closed::Idle);
        assert_eq!(after, T.idle);
        assert!(a.idle_keep_alive().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_head_begun_must_end_within_the_header_timeout() {
        let a = Activity::new();
        drop(a.request(false));
        tokio::time::sleep(Duration::from_secs(30)).await;
        a.read_some();
        let (why, after) = closes_after(&a).await;
        assert_eq!(why, Closed::SlowHead);
        assert_eq!(after, T.header_read);
    }

    /// An answer's body of three one-byte frames.
    fn three_frames() -> impl http_body::Body<Data = Bytes, Error = std::convert::Infallible> {
        http_body_util::StreamBody::new(futures_util::stream::iter(
            (0..3).map(|_| Ok(Frame::data(Bytes::from("x")))),
        ))
    }

    /// A connection after one request, its watchdog running in a task.
    fn watching_a_kept_alive_connection()
    -> (Arc<Activity>, tokio::task::JoinHandle<(Closed, Duration)>) {
        let a = Activity::new();
        drop(a.request(false));
        let watched = a.clone();
        let watcher = tokio::spawn(async move { closes_after(&watched).await });
        (a, watcher)
    }

    /// The watchdog already asleep when the head begins: nothing wakes
    /// it, and it still closes exactly at the head's deadline.
    #[tokio::test(start_paused = true)]
    async fn a_head_begun_while_the_watchdog_sleeps_is_timed_exactly() {
        let (a, watcher) = watching_a_kept_alive_connection();
        tokio::time::sleep(Duration::from_millis(30_500)).await;
        a.read_some();
        let (why, after) = watcher.await.expect("the watchdog task");
        assert_eq!(why, Closed::SlowHead);
        assert_eq!(after, Duration::from_millis(30_500) + T.header_read);
    }

    /// The same for an answer that stalls while the watchdog sleeps toward
    /// the idle deadline.
    #[tokio::test(start_paused = true)]
    async fn an_answer_stalled_while_the_watchdog_sleeps_is_timed_exactly() {
        let (a, watcher) = watching_a_kept_alive_connection();
        tokio::time::sleep(Duration::from_millis(40_300)).await;
        let mut body = WatchedBody::new(three_frames(), a.request(false));
        assert!(http_body_util::BodyExt::frame(&mut body).await.is_some());
        let (why, after) = watcher.await.expect("the watchdog task");
        assert_eq!(why, Closed::StalledReader);
        assert_eq!(after, Duration::from_millis(40_300) + T.write_stall);
    }

    #[tokio::test(start_paused = true)]
    async fn http2_frames_between_requests_do_not_start_a_head_timer() {
        let a = Activity::new();
        drop(a.request(true));
        a.read_some(); // a PING
        assert_eq!(closes_after(&a).await.0, Closed::Idle);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_not_taken_closes_after_the_write_stall_timeout() {
        let a = Activity::new();
        let mut body = WatchedBody::new(three_frames(), a.request(false));
        // One frame taken, then hyper stops polling (the caller reads nothing).
        let frame = http_body_util::BodyExt::frame(&mut body).await;
        assert!(frame.is_some());
        let watcher = { closes_after(&a) };
        let (why, after) = watcher.await;
        assert_eq!(why, Closed::StalledReader);
        assert_eq!(after, T.write_stall);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_upstream_is_not_a_stalled_reader() {
        let a = Activity::new();
        let (_tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let body = http_body_util::StreamBody::new(tokio_stream_like(rx));
        let mut body = WatchedBody::new(body, a.request(false));
        // hyper polls; nothing comes from upstream: the body is pending.
        let polled = tokio::time::timeout(
            Duration::from_secs(60),
            http_body_util::BodyExt::frame(&mut body),
        )
        .await;
        assert!(polled.is_err(), "nothing arrives");
        let outcome = tokio::time::timeout(Duration::from_secs(60), closes_after(&a)).await;
        assert!(outcome.is_err(), "not closed while the upstream is slow");
    }

    fn tokio_stream_like<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }

    #[tokio::test(start_paused = true)]
    async fn eviction_closes_at_once() {
        let a = Activity::new();
        drop(a.request(false));
        a.evict();
        let (why, after) = closes_after(&a).await;
        assert_eq!(why, Closed::Evicted);
        assert_eq!(after, Duration::ZERO);
    }
}
