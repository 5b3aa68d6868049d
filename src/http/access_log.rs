//! The request log: one line per request, written when its response body
//! ends (complete, failed, or dropped because the client went away), and the
//! per-request metrics recorded at the same moment.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{Method, StatusCode};
use hyper::body::{Frame, SizeHint};

use crate::body::Body;
use crate::metrics::{Metrics, Outcome, RouteKind, Source};

/// What the request log line says, written once the body ends.
pub(super) struct LogLine {
    pub(super) method: Method,
    pub(super) path: String,
    pub(super) status: StatusCode,
    pub(super) outcome: Option<Outcome>,
    pub(super) peer: SocketAddr,
    pub(super) started: Instant,
    pub(super) request_id: String,
    pub(super) route: RouteKind,
    pub(super) metrics: Arc<Metrics>,
}

/// A body that counts what it sends and logs the request when it is done,
/// failed, or dropped early (client gone).
pub(super) struct LoggedBody {
    inner: Body,
    bytes: u64,
    /// The body's exact length when known: hyper stops polling a body once
    /// that many bytes are sent, so reaching it means complete.
    expected: Option<u64>,
    failed: bool,
    log: Option<LogLine>,
}

impl LoggedBody {
    /// Wraps `inner`, whose exact length is `expected` when known; `log` is
    /// written when the body ends.
    pub(super) fn new(inner: Body, expected: Option<u64>, log: LogLine) -> LoggedBody {
        LoggedBody {
            inner,
            bytes: 0,
            expected,
            failed: false,
            log: Some(log),
        }
    }

    fn finish(&mut self, complete: bool) {
        if let Some(l) = self.log.take() {
            let elapsed = l.started.elapsed();
            l.metrics
                .response_finished(l.route, Source::of(l.outcome), self.bytes, elapsed);
            crate::logging::request_line(&crate::logging::RequestLine {
                request_id: &l.request_id,
                method: &l.method,
                path: &l.path,
                status: l.status.as_u16(),
                bytes: self.bytes,
                ms: elapsed.as_millis() as u64,
                cache: l.outcome.map_or("-", Outcome::as_str),
                peer: l.peer,
                complete: complete && !self.failed,
            });
        }
    }
}

impl hyper::body::Body for LoggedBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.failed = true;
                this.finish(false);
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
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

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let complete = hyper::body::Body::is_end_stream(&self.inner)
            || self.expected.is_some_and(|n| n == self.bytes);
        self.finish(complete);
    }
}
