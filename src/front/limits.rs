//! Connection limits: the connection slots of a listener, the idle and
//! first-byte timeouts on each connection ([`IdleIo`]), hyper's HTTP/1
//! header read timeout and head size, the HTTP/2 stream limit, and the
//! process-wide budget of read-ahead buffers ([`ReadBudget`]).

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use super::activity::Activity;

/// At most `max` connections at once; further ones wait in the kernel's
/// listen backlog.
pub(crate) struct Slots {
    max: usize,
    slots: Arc<Semaphore>,
    last_full_warning: Mutex<Option<Instant>>,
}

impl Slots {
    /// `max` connection slots.
    pub(crate) fn new(max: usize) -> Slots {
        Slots {
            max,
            slots: Arc::new(Semaphore::new(max)),
            last_full_warning: Mutex::new(None),
        }
    }

    /// Waits for a free connection slot; the connection holds the permit
    /// until it ends. While all slots are taken, new connections wait in the
    /// kernel's listen backlog.
    pub(crate) async fn acquire(&self) -> OwnedSemaphorePermit {
        if self.slots.available_permits() == 0 {
            self.warn_full();
        }
        match self.slots.clone().acquire_owned().await {
            Ok(p) => p,
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        }
    }

    fn warn_full(&self) {
        let now = Instant::now();
        let mut last = match self.last_full_warning.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10)) {
            *last = Some(now);
            tracing::warn!(
                max_connections = self.max,
                "connection limit reached; new connections wait"
            );
        }
    }
}

/// The largest HTTP/1 request head hyper reads (request line and headers):
/// a longer one is answered `431 Request Header Fields Too Large` and the
/// connection closed. hyper's default (about 400 KiB) let every connection
/// hold that much while its head trickled in, some 400 MiB over the default
/// 1,024 connections; registry clients send heads of a few KiB, a large
/// bearer token included (nginx allows 32 KiB by default). HTTP/2 heads are
/// bounded by hyper's own default (a 16 KiB header list).
///
/// hyper bounds its HTTP/1 read buffer and its write queue with the one
/// setting (`max_buf_size`). The write queue takes another chunk only
/// while it holds less than this, so it still holds the one chunk a body
/// hands it, whatever its size (a read-ahead chunk, a `sendfile` region).
pub(crate) const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// Applies the HTTP-level limits to hyper's connection builder: a timer,
/// the HTTP/1 header read timeout and head size, and the HTTP/2 stream
/// limit.
pub(crate) fn configure(
    builder: &mut auto::Builder<TokioExecutor>,
    header_read_timeout: Duration,
    max_concurrent_streams: u32,
) {
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_REQUEST_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(max_concurrent_streams);
}

/// The process-wide budget of read-ahead buffers: the bytes that response
/// bodies have read from blob files and handed to hyper but that have not
/// left the process yet (on TLS and HTTP/2 connections; plain HTTP/1 sends
/// with `sendfile` and needs no buffer).
///
/// hyper polls a body for its next chunk before the stream has flow-control
/// window to send it, so every stream whose client never opens its window
/// holds one chunk for as long as the connection lives. The budget is a
/// semaphore of bytes: a chunk takes its bytes before it is read and gives
/// them back when hyper drops it ([`Lease`] travels inside the `Bytes`). So
/// however many streams stall, these buffers never exceed the budget; when
/// the budget runs short, reads get smaller, and only when not even the
/// minimum is free does a body wait.
pub(crate) struct ReadBudget {
    bytes: Arc<Semaphore>,
    total: usize,
}

/// Bytes taken from the [`ReadBudget`]; given back when dropped.
#[derive(Debug)]
pub(crate) struct Lease {
    permit: OwnedSemaphorePermit,
}

impl Lease {
    /// How many bytes this lease covers.
    pub(crate) fn len(&self) -> usize {
        self.permit.num_permits()
    }
}

impl ReadBudget {
    /// A budget of `total` bytes.
    pub(crate) fn new(total: usize) -> Arc<ReadBudget> {
        let total = total.clamp(1, Semaphore::MAX_PERMITS);
        Arc::new(ReadBudget {
            bytes: Arc::new(Semaphore::new(total)),
            total,
        })
    }

    /// Takes as much of `want` bytes as is free now, but at least `min`
    /// (waiting for that much when less is free).
    pub(crate) async fn take(&self, want: usize, min: usize) -> Lease {
        let min = min.clamp(1, self.total);
        let want = want.clamp(min, self.total);
        loop {
            let free = self.bytes.available_permits().min(want);
            if free >= min {
                if let Ok(permit) = self.bytes.clone().try_acquire_many_owned(free as u32) {
                    return Lease { permit };
                }
                continue;
            }
            match self.bytes.clone().acquire_many_owned(min as u32).await {
                Ok(permit) => return Lease { permit },
                // The semaphore is never closed.
                Err(_) => std::future::pending().await,
            }
        }
    }

    /// Bytes currently taken.
    #[cfg(test)]
    pub(crate) fn in_use(&self) -> usize {
        self.total - self.bytes.available_permits()
    }
}

/// A connection that fails with `TimedOut` once nothing that counts as
/// activity has been read or written for the idle timeout, or when the
/// first byte does not arrive within the first-byte timeout. It wraps the
/// plaintext stream (above TLS), so that on HTTP/2 only request and
/// response frames count, not PINGs ([`Activity`]).
pub(crate) struct IdleIo<T> {
    inner: T,
    activity: Activity,
    idle: Duration,
    first_byte: Duration,
    got_first_byte: bool,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: T, idle: Duration, first_byte: Duration) -> IdleIo<T> {
        let now = Instant::now();
        IdleIo {
            inner,
            activity: Activity::default(),
            idle,
            first_byte,
            got_first_byte: false,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + first_byte)),
        }
    }

    /// The wrapped stream.
    pub(crate) fn get_ref(&self) -> &T {
        &self.inner
    }

    fn deadline(&self) -> Instant {
        let allowed = if self.got_first_byte {
            self.idle
        } else {
            self.first_byte
        };
        self.last_activity + allowed
    }

    /// Ready with an error once the deadline has passed; registers the
    /// waker otherwise. The timer is moved only when it fires early, so
    /// activity costs a clock read, not a timer update (the timer is never
    /// later than the deadline: activity only moves the deadline later).
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let deadline = self.deadline();
            if Instant::now() >= deadline {
                let what = if self.got_first_byte {
                    "connection idle timeout"
                } else {
                    "no request received in time"
                };
                return Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, what));
            }
            self.timer.as_mut().reset(deadline);
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    if this.activity.read(&buf.filled()[before..]) {
                        this.last_activity = Instant::now();
                    }
                    if !this.got_first_byte {
                        // The allowance changes from first-byte to idle:
                        // the timer must not be later than the deadline.
                        this.got_first_byte = true;
                        let deadline = this.deadline();
                        this.timer.as_mut().reset(deadline);
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_expired(cx).map(Err),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => {
                if this.activity.written(&data[..n.min(data.len())]) {
                    this.last_activity = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_expired(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                let mut left = n;
                let mut active = false;
                for b in bufs {
                    if left == 0 {
                        break;
                    }
                    let take = left.min(b.len());
                    active |= this.activity.written(&b[..take]);
                    left -= take;
                }
                if active {
                    this.last_activity = Instant::now();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.poll_expired(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    // A flush or a shutdown that cannot move is idle too: over TLS the last
    // records of a response (and close_notify) may wait in rustls once
    // hyper has stopped reading and writing (`Connection: close`), for as
    // long as the client does not read.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.poll_expired(cx).map(Err),
            done => done,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_shutdown(cx) {
            Poll::Pending => this.poll_expired(cx).map(Err),
            done => done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream on which nothing ever moves.
    struct Stuck;

    impl AsyncRead for Stuck {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Stuck {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    #[tokio::test]
    async fn a_flush_or_shutdown_that_never_moves_times_out() {
        use tokio::io::AsyncWriteExt as _;
        let idle = Duration::from_millis(100);
        let mut io = IdleIo::new(Stuck, idle, idle);
        let e = tokio::time::timeout(Duration::from_secs(5), io.flush())
            .await
            .expect("the flush waited past the idle timeout")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let mut io = IdleIo::new(Stuck, idle, idle);
        let e = tokio::time::timeout(Duration::from_secs(5), io.shutdown())
            .await
            .expect("the shutdown waited past the idle timeout")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn read_budget_shrinks_reads_then_waits_for_the_minimum() {
        let budget = ReadBudget::new(100);
        let a = budget.take(60, 10).await;
        assert_eq!(a.len(), 60);
        // 40 free: a smaller lease rather than a wait.
        let b = budget.take(60, 10).await;
        assert_eq!(b.len(), 40);
        assert_eq!(budget.in_use(), 100);
        // Nothing free: waits until a lease is dropped.
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(60, 10).await.len() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());
        drop(b);
        assert!((10..=60).contains(&waiting.await.unwrap()));
        drop(a);
        assert_eq!(budget.in_use(), 0);
    }
}
