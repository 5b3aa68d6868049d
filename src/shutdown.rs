//! Stopping: one [`CancellationToken`] that every background task watches
//! (evictor, access-time flusher, manifest pruner, pin refresher, reload
//! watcher, admin listener), and a [`TaskTracker`] the blob fills run on,
//! so that shutdown can wait for them (a fill's clients may be done while
//! it still commits) instead of polling.
//!
//! The server holds a [`DropGuard`] of the token: dropping the server, run
//! or not, ends its background work.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

/// The stop signal of one server and the tracker of its blob fills.
#[derive(Clone, Default)]
pub(crate) struct Shutdown {
    token: CancellationToken,
    fills: TaskTracker,
}

impl Shutdown {
    /// Nothing stopped yet.
    pub(crate) fn new() -> Shutdown {
        Shutdown::default()
    }

    /// The token background tasks stop on.
    pub(crate) fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// The tracker blob fills run on.
    pub(crate) fn fills(&self) -> TaskTracker {
        self.fills.clone()
    }

    /// Cancels the token when dropped (unless it is disarmed).
    pub(crate) fn drop_guard(&self) -> DropGuard {
        self.token.clone().drop_guard()
    }

    /// Runs `task` until it ends or the token is cancelled.
    pub(crate) fn spawn_background(&self, task: impl Future<Output = ()> + Send + 'static) {
        let token = self.token.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = task => {}
                () = token.cancelled() => {}
            }
        });
    }

    /// Waits up to `timeout` for the fills running now (no new one is
    /// expected). Returns whether they all finished.
    pub(crate) async fn wait_for_fills(&self, timeout: Duration) -> bool {
        self.fills.close();
        tokio::time::timeout(timeout, self.fills.wait())
            .await
            .is_ok()
    }

    /// Stops every background task.
    pub(crate) fn cancel(&self) {
        self.token.cancel();
    }
}
