//! Reloading the files behind TLS and client authentication: on SIGHUP
//! ([`Reloader::reload_now`]) and by polling them for changes
//! ([`Reloader::spawn_watch`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::access::Access;
use super::tls::Tls;

/// Reloads TLS material and the htpasswd file (SIGHUP, file changes).
#[derive(Clone)]
pub(crate) struct Reloader {
    tls: Option<Arc<Tls>>,
    access: Arc<Access>,
}

impl Reloader {
    /// Reloads `tls` (when the listener terminates TLS) and `access`.
    pub(crate) fn new(tls: Option<Arc<Tls>>, access: Arc<Access>) -> Reloader {
        Reloader { tls, access }
    }

    /// Re-reads every file now (blocking file IO and possibly bcrypt: call
    /// it off the async threads, or use [`Reloader::reload_now`]). With
    /// `force` false only files whose contents changed are taken up. Returns
    /// false if something was rejected (and logged; the old one stays).
    pub(crate) fn reload(&self, force: bool) -> bool {
        let mut ok = true;
        if let Some(tls) = &self.tls {
            ok &= tls.reload(force).is_ok();
        }
        ok &= self.access.reload(force).is_ok();
        ok
    }

    /// [`Reloader::reload`] with `force` on the blocking pool (SIGHUP).
    pub(crate) async fn reload_now(&self) -> bool {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.reload(true))
            .await
            .unwrap_or(false)
    }

    /// Whether there is anything to reload.
    pub(crate) fn has_files(&self) -> bool {
        self.tls.is_some() || self.access.enabled()
    }

    /// Starts polling the files for changes (every `[tls] reload_interval`
    /// and `[access] reload_interval`; a zero interval means never), until
    /// `stop` is cancelled.
    pub(crate) fn spawn_watch(&self, stop: &CancellationToken) {
        if let Some(tls) = &self.tls {
            let tls = tls.clone();
            every(tls.reload_interval(), stop, move || {
                let _ = tls.reload(false);
            });
        }
        if let Some(interval) = self.access.reload_interval() {
            let access = self.access.clone();
            every(interval, stop, move || {
                let _ = access.reload(false);
            });
        }
    }
}

/// Runs `f` on the blocking pool every `interval` (never when zero) until
/// `stop` is cancelled.
fn every(
    interval: Duration,
    stop: &CancellationToken,
    f: impl Fn() + Clone + Send + Sync + 'static,
) {
    if interval.is_zero() {
        return;
    }
    tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let _ = tokio::task::spawn_blocking(f.clone()).await;
        }
    }));
}
