//! The front door of the registry listener: the connection limit, the TLS
//! handshake (with a timeout), the idle and first-byte timeouts on the
//! plaintext stream (HTTP/2 PINGs are not activity: [`activity`]), the
//! HTTP/1 header read timeout and head size, HTTP/2 stream limits and the
//! read budget ([`limits`]), TLS termination ([`tls`]), client
//! authentication ([`access`]), the reloading of the files behind TLS and
//! authentication ([`reload`]) and zero-copy sends ([`zerocopy`]).
//!
//! `server.rs` keeps the accept loop and hands every accepted socket to
//! [`Front::handshake`], which returns the stream hyper serves ([`FrontIo`]:
//! plain TCP or TLS over TCP).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use tokio::sync::OwnedSemaphorePermit;

use config::{AccessConfig, LimitsConfig, TlsConfig};

pub(crate) mod access;
mod activity;
pub(crate) mod config;
mod failures;
pub(crate) mod limits;
pub(crate) mod reload;
pub(crate) mod tls;
pub(crate) mod zerocopy;

use limits::Slots;
pub(crate) use limits::{IdleIo, ReadBudget};
pub(crate) use reload::Reloader;

use access::{Access, AccessError};
use tls::{Tls, TlsError};
use zerocopy::{Regions, ZeroCopyStream};

/// Why the front door could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrontError {
    /// Certificate, key or client CA unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// htpasswd file unusable.
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// Connection limits, TLS and access control of one listener.
pub(crate) struct Front {
    tls: Option<Arc<Tls>>,
    access: Arc<Access>,
    limits: LimitsConfig,
    slots: Slots,
    /// Whether plain connections may send blob bytes with `sendfile`.
    zero_copy: bool,
}

impl Front {
    /// Loads the TLS material and the htpasswd file named in the `[tls]`
    /// and `[access]` sections, with the `[limits]`.
    pub(crate) fn new(
        tls: Option<&TlsConfig>,
        access: Option<&AccessConfig>,
        limits: &LimitsConfig,
    ) -> Result<Front, FrontError> {
        let tls = tls.map(Tls::load).transpose()?.map(Arc::new);
        let access = Arc::new(Access::new(access)?);
        Ok(Front {
            tls,
            access,
            limits: limits.clone(),
            slots: Slots::new(limits.max_connections),
            zero_copy: true,
        })
    }

    /// The front door of the admin listener: plain HTTP, open, with the
    /// same `[limits]` but connection slots of its own.
    pub(crate) fn admin(limits: &LimitsConfig) -> Front {
        Front {
            tls: None,
            access: Arc::new(Access::open()),
            limits: limits.clone(),
            slots: Slots::new(limits.max_connections),
            zero_copy: false,
        }
    }

    /// The TLS state, when this listener terminates TLS.
    pub(crate) fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.as_ref()
    }

    /// The access control every request goes through.
    pub(crate) fn access(&self) -> Arc<Access> {
        self.access.clone()
    }

    /// Applies the HTTP-level limits to hyper's connection builder: a timer,
    /// the HTTP/1 header read timeout and head size, and the HTTP/2 stream
    /// limit.
    pub(crate) fn configure(&self, builder: &mut auto::Builder<TokioExecutor>) {
        limits::configure(
            builder,
            self.limits.header_read_timeout,
            self.limits.max_concurrent_streams,
        );
    }

    /// Waits for a free connection slot; see [`Slots::acquire`].
    pub(crate) async fn slot(&self) -> OwnedSemaphorePermit {
        self.slots.acquire().await
    }

    /// On a TLS listener, completes the handshake within the handshake
    /// timeout; then wraps the (plaintext) stream with the idle and
    /// first-byte timeouts. `None` when the handshake failed (logged at
    /// debug level).
    pub(crate) async fn handshake(&self, stream: TcpStream, peer: SocketAddr) -> Option<FrontIo> {
        let stream = ZeroCopyStream::new(stream, self.zero_copy && self.tls.is_none());
        // A client that sends nothing at all is both idle and slow with its
        // headers: whichever limit is shorter applies.
        let (idle, first_byte) = (
            self.limits.idle_timeout,
            self.limits
                .header_read_timeout
                .min(self.limits.idle_timeout),
        );
        let Some(tls) = &self.tls else {
            return Some(FrontIo::Plain(IdleIo::new(stream, idle, first_byte)));
        };
        match tokio::time::timeout(tls.handshake_timeout(), tls.acceptor().accept(stream)).await {
            Ok(Ok(stream)) => Some(FrontIo::Tls(IdleIo::new(
                Box::new(stream),
                idle,
                first_byte,
            ))),
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
    pub(crate) fn reloader(&self) -> Reloader {
        Reloader::new(self.tls.clone(), self.access.clone())
    }
}

/// An accepted connection after the front door: plain or TLS.
pub(crate) enum FrontIo {
    /// Plain TCP.
    Plain(IdleIo<ZeroCopyStream>),
    /// TLS over TCP (the timeouts watch the plaintext).
    Tls(IdleIo<Box<tokio_rustls::server::TlsStream<ZeroCopyStream>>>),
}

impl FrontIo {
    /// Where bodies register mapped blob regions for `sendfile`: plain
    /// connections only (TLS must encrypt in user space).
    pub(crate) fn regions(&self) -> Option<Arc<Regions>> {
        match self {
            FrontIo::Plain(s) => s.get_ref().regions().cloned(),
            FrontIo::Tls(_) => None,
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
            FrontIo::Tls(s) => Pin::new(s).poll_read(cx, buf),
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
            FrontIo::Tls(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            FrontIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            FrontIo::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
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
            FrontIo::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            FrontIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            FrontIo::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
