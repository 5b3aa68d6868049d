//! The front door of the registry listener: the connection limit, the TLS
//! handshake (with a timeout), the idle and first-byte timeouts on the
//! socket, the HTTP/1 header read timeout, client authentication, and the
//! reloading of the files behind TLS and authentication.
//!
//! `server.rs` keeps the accept loop and hands every accepted socket to
//! [`Front::handshake`], which returns the stream hyper serves ([`FrontIo`]:
//! plain TCP or TLS over TCP).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::config::{Config, LimitsConfig};

pub mod access;
pub mod tls;
pub mod zerocopy;

use access::{Access, AccessError};
use tls::{Tls, TlsError};
use zerocopy::{Regions, ZeroCopyStream};

/// Why the front door could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    /// Certificate, key or client CA unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// htpasswd file unusable.
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// Connection limits, TLS and access control of one listener.
pub struct Front {
    tls: Option<Arc<Tls>>,
    access: Arc<Access>,
    limits: LimitsConfig,
    slots: Arc<Semaphore>,
    last_full_warning: Mutex<Option<Instant>>,
}

impl Front {
    /// Loads the TLS material and the htpasswd file named in `config`.
    pub fn new(config: &Config) -> Result<Front, FrontError> {
        let tls = config
            .tls
            .as_ref()
            .map(Tls::load)
            .transpose()?
            .map(Arc::new);
        let access = Arc::new(Access::new(config.access.as_ref())?);
        Ok(Front {
            tls,
            access,
            limits: config.limits.clone(),
            slots: Arc::new(Semaphore::new(config.limits.max_connections)),
            last_full_warning: Mutex::new(None),
        })
    }

    /// The TLS state, when this listener terminates TLS.
    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.as_ref()
    }

    /// The access control every request goes through.
    pub fn access(&self) -> Arc<Access> {
        self.access.clone()
    }

    /// Applies the HTTP-level limits to hyper's connection builder: a timer
    /// and the HTTP/1 header read timeout.
    pub fn configure(&self, builder: &mut auto::Builder<TokioExecutor>) {
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.limits.header_read_timeout);
        builder.http2().timer(TokioTimer::new());
    }

    /// Waits for a free connection slot; the connection holds the permit
    /// until it ends. While all slots are taken, new connections wait in the
    /// kernel's listen backlog.
    pub async fn slot(&self) -> OwnedSemaphorePermit {
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
                max_connections = self.limits.max_connections,
                "connection limit reached; new connections wait"
            );
        }
    }

    /// Wraps an accepted socket with the idle timeout and, on a TLS
    /// listener, completes the handshake within the handshake timeout.
    /// `None` when the handshake failed (logged at debug level).
    pub async fn handshake(&self, stream: TcpStream, peer: SocketAddr) -> Option<FrontIo> {
        // A client that sends nothing at all is both idle and slow with its
        // headers: whichever limit is shorter applies.
        let io = IdleIo::new(
            ZeroCopyStream::new(stream, self.tls.is_none()),
            self.limits.idle_timeout,
            self.limits
                .header_read_timeout
                .min(self.limits.idle_timeout),
        );
        let Some(tls) = &self.tls else {
            return Some(FrontIo::Plain(io));
        };
        match tokio::time::timeout(tls.handshake_timeout(), tls.acceptor().accept(io)).await {
            Ok(Ok(stream)) => Some(FrontIo::Tls(Box::new(stream))),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, timeout = ?tls.handshake_timeout(), "TLS handshake timed out");
                None
            }
        }
    }

    /// A handle that reloads the certificate and htpasswd files.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            tls: self.tls.clone(),
            access: self.access.clone(),
        }
    }
}

/// Reloads TLS material and the htpasswd file (SIGHUP, file changes).
#[derive(Clone)]
pub struct Reloader {
    tls: Option<Arc<Tls>>,
    access: Arc<Access>,
}

impl Reloader {
    /// Re-reads every file now (blocking file IO and possibly bcrypt: call
    /// it off the async threads, or use [`Reloader::reload_now`]). With
    /// `force` false only files whose contents changed are taken up. Returns
    /// false if something was rejected (and logged; the old one stays).
    pub fn reload(&self, force: bool) -> bool {
        let mut ok = true;
        if let Some(tls) = &self.tls {
            ok &= tls.reload(force).is_ok();
        }
        ok &= self.access.reload(force).is_ok();
        ok
    }

    /// [`Reloader::reload`] with `force` on the blocking pool (SIGHUP).
    pub async fn reload_now(&self) -> bool {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.reload(true))
            .await
            .unwrap_or(false)
    }

    /// Whether there is anything to reload.
    pub fn has_files(&self) -> bool {
        self.tls.is_some() || self.access.enabled()
    }

    /// Starts polling the files for changes (every `[tls] reload_interval`
    /// and `[access] reload_interval`; a zero interval means never).
    pub fn spawn_watch(&self) -> Watch {
        let mut tasks = Vec::new();
        if let Some(tls) = &self.tls {
            let tls = tls.clone();
            tasks.extend(every(tls.reload_interval(), move || {
                let _ = tls.reload(false);
            }));
        }
        if let Some(interval) = self.access.reload_interval() {
            let access = self.access.clone();
            tasks.extend(every(interval, move || {
                let _ = access.reload(false);
            }));
        }
        Watch(tasks)
    }
}

/// Runs `f` on the blocking pool every `interval` (never when zero).
fn every(
    interval: Duration,
    f: impl Fn() + Clone + Send + Sync + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    if interval.is_zero() {
        return None;
    }
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let _ = tokio::task::spawn_blocking(f.clone()).await;
        }
    }))
}

/// The file-polling tasks; stopped when dropped.
pub struct Watch(Vec<tokio::task::JoinHandle<()>>);

impl Watch {
    /// Stops polling.
    pub fn stop(self) {}
}

impl Drop for Watch {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// A socket that fails with `TimedOut` once nothing has been read or
/// written for the idle timeout, or when the first byte does not arrive
/// within the first-byte timeout.
pub struct IdleIo<T> {
    inner: T,
    idle: Duration,
    first_byte: Duration,
    got_first_byte: bool,
    last_activity: Instant,
    timer: Pin<Box<Sleep>>,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, idle: Duration, first_byte: Duration) -> IdleIo<T> {
        let now = Instant::now();
        IdleIo {
            inner,
            idle,
            first_byte,
            got_first_byte: false,
            last_activity: now,
            timer: Box::pin(tokio::time::sleep_until(now + first_byte)),
        }
    }

    /// The wrapped stream.
    pub fn get_ref(&self) -> &T {
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
                    this.last_activity = Instant::now();
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
                if n > 0 {
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
                if n > 0 {
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An accepted connection after the front door: plain or TLS.
pub enum FrontIo {
    /// Plain TCP.
    Plain(IdleIo<ZeroCopyStream>),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::server::TlsStream<IdleIo<ZeroCopyStream>>>),
}

impl FrontIo {
    /// Where bodies register mapped blob regions for `sendfile`: plain
    /// connections only (TLS must encrypt in user space).
    pub fn regions(&self) -> Option<Arc<Regions>> {
        match self {
            FrontIo::Plain(s) => s.get_ref().regions().cloned(),
            FrontIo::Tls(_) => None,
        }
    }

    /// The ALPN protocol negotiated in the TLS handshake, if any.
    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            FrontIo::Plain(_) => None,
            FrontIo::Tls(s) => s.get_ref().1.alpn_protocol(),
        }
    }
}

impl AsyncRead for FrontIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            FrontIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            FrontIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for FrontIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            FrontIo::Plain(s) => Pin::new(s).poll_write(cx, data),
            FrontIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            FrontIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            FrontIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            FrontIo::Plain(s) => s.is_write_vectored(),
            FrontIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            FrontIo::Plain(s) => Pin::new(s).poll_flush(cx),
            FrontIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            FrontIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            FrontIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
