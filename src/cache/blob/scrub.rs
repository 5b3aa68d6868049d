//! The scrubber: hashes the stored blobs again in the background, so that a
//! blob damaged on disk without changing size (a flipped bit, a stray
//! write) is found, dropped and fetched again at its next request, instead
//! of being served, and refused by every client that verifies it, until an
//! operator purges it. A change of size is caught sooner: at the next hit
//! (`store.rs`), or, if it happened while stowage was stopped, by the
//! start-up scan.
//!
//! A pass walks the index in 256 slices (by the first two hex digits, as
//! the store's directories), one blob at a time, reading each in pieces on
//! the blocking pool into one buffer. It is paced to spread a pass over the
//! stored bytes across `cache.scrub_interval`, at no less than
//! [`MIN_RATE`] (unless the maximum is lower) and no more than
//! `cache.scrub_max_rate`, making up at most [`CATCH_UP`] of lost time.
//! The next pass starts an interval after the last one started, the first
//! an interval (at most an hour) after start-up. Memory stays one piece
//! and one slice of the index, whatever the cache holds.
//!
//! After each slice the next one is noted in `<cache>/scrub`, and the first
//! pass after a start goes on from there: a pass longer than the process's
//! uptime (a large cache, restarted daily) would otherwise check the first
//! slices again and again and never reach the last ones. The note is not
//! synced: one lost in a crash only means that pass starts over.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt as _, MetadataExt as _};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::store::BlobStore;
use crate::cache::layout;
use crate::oci::{Digest, Hasher};

/// The slowest a pass reads, whatever the interval: a small cache is
/// checked in minutes, not spread thinly over a week.
const MIN_RATE: u64 = 1 << 20;

/// Bytes read per blocking call.
const PIECE: usize = 1 << 20;

/// The longest the first pass waits after start-up.
const FIRST_PASS_AFTER: Duration = Duration::from_secs(3600);

/// How long the scrubber waits for the start-up scan between looks.
const LOAD_POLL: Duration = Duration::from_millis(200);

/// How often and how fast stored blobs are hashed again
/// (`cache.scrub_interval`, `cache.scrub_max_rate`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scrub {
    /// How long a pass over the stored bytes should take, and how often
    /// one starts; zero turns the scrubber off.
    pub(crate) interval: Duration,
    /// The most bytes per second a pass reads.
    pub(crate) max_rate: u64,
}

/// The most time a pass that fell behind its pace (slow reads, a busy
/// blocking pool) makes up by reading faster than its rate.
const CATCH_UP: Duration = Duration::from_secs(1);

/// Keeps a pass's reads at `rate` bytes per second on average.
struct Pace {
    /// When reading at `rate` from then on would have read `done` by now.
    start: Instant,
    rate: u64,
    done: u64,
}

impl Pace {
    async fn wait(&mut self, bytes: u64) {
        self.done += bytes;
        let due = self.start + Duration::from_secs_f64(self.done as f64 / self.rate as f64);
        let now = Instant::now();
        if now > due + CATCH_UP {
            // Behind: the time lost is not made up at full speed.
            self.start += now - (due + CATCH_UP);
        }
        tokio::time::sleep_until(due).await;
    }
}

/// What hashing one stored blob found.
enum Checked {
    /// It still hashes to its digest (or was gone, or replaced, before it
    /// could be read).
    Whole,
    /// The file at `id` (device, inode) is damaged: why.
    Damaged((u64, u64), String),
}

impl BlobStore {
    /// Runs passes of the scrubber until `stop` is cancelled (never when
    /// `scrub.interval` is zero).
    pub(crate) fn spawn_scrubber(self: &Arc<Self>, scrub: Scrub, stop: &CancellationToken) {
        if scrub.interval.is_zero() {
            return;
        }
        let store = self.clone();
        tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
            // Not in the rush after a start: the first pass an interval (at
            // most FIRST_PASS_AFTER) later.
            tokio::time::sleep(scrub.interval.min(FIRST_PASS_AFTER)).await;
            while !store.index.is_loaded() {
                tokio::time::sleep(LOAD_POLL).await;
            }
            let mut from = store.scrub_cursor().await;
            loop {
                let started = Instant::now();
                store.scrub_pass(scrub, from).await;
                from = 0;
                tokio::time::sleep_until(started + scrub.interval).await;
            }
        }));
    }

    /// Where the last pass stopped (`<cache>/scrub`): the slice to go on
    /// with, 0 when none is noted or the note cannot be read.
    async fn scrub_cursor(&self) -> u8 {
        let path = self.layout.scrub_cursor();
        let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(path)).await;
        match read {
            Ok(Ok(text)) => layout::decode_scrub_cursor(&text).unwrap_or(0),
            _ => 0,
        }
    }

    /// Notes `slice` as the one to go on with after a restart.
    async fn note_scrub_cursor(&self, slice: u8) {
        let path = self.layout.scrub_cursor();
        let written = tokio::task::spawn_blocking(move || {
            std::fs::write(&path, layout::encode_scrub_cursor(slice))
        })
        .await;
        if let Ok(Err(e)) = written {
            tracing::debug!(error = %e, "cannot note where the scrub pass is");
        }
    }

    /// One pass over every stored blob, from slice `from` on (the slices
    /// before it were checked before a restart).
    async fn scrub_pass(self: &Arc<Self>, scrub: Scrub, from: u8) {
        if from != 0 {
            tracing::info!(
                slice = format_args!("{from:02x}"),
                "scrub pass goes on where it stopped before the restart"
            );
        }
        let started = Instant::now();
        let per_sec = self.index.used() / scrub.interval.as_secs().max(1);
        let max = scrub.max_rate.max(1);
        let rate = per_sec.clamp(MIN_RATE.min(max), max);
        let mut pace = Pace {
            start: started,
            rate,
            done: 0,
        };
        let (mut blobs, mut damaged) = (0u64, 0u64);
        let mut buf = vec![0u8; PIECE];
        for slice in from..=255u8 {
            // A walk over the whole index: not on a runtime worker.
            let index = self.index.clone();
            let prefix = format!("{slice:02x}");
            let Ok(stored) = tokio::task::spawn_blocking(move || index.stored_under(&prefix)).await
            else {
                continue;
            };
            for (digest, size) in stored {
                let checked;
                (checked, buf) = self.scrub_one(&digest, size, buf, &mut pace).await;
                blobs += 1;
                if let Checked::Damaged(id, why) = checked {
                    damaged += 1;
                    tracing::error!(%digest, size, reason = %why,
                        "stored blob damaged on disk: dropping it, to be fetched again");
                    let store = self.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || store.drop_damaged(&digest, id)).await;
                    self.metrics.damaged_blob();
                }
            }
            self.note_scrub_cursor(slice.wrapping_add(1)).await;
        }
        let took = started.elapsed();
        if took > scrub.interval {
            tracing::warn!(
                blobs,
                bytes = pace.done,
                secs = took.as_secs(),
                rate,
                "a scrub pass took longer than cache.scrub_interval: raise \
                 cache.scrub_max_rate or the interval"
            );
        } else {
            tracing::debug!(
                blobs,
                damaged,
                bytes = pace.done,
                secs = took.as_secs(),
                "scrub pass over the stored blobs done"
            );
        }
    }

    /// Hashes the stored blob `digest` (indexed at `size` bytes) again,
    /// reading it into `buf` (handed back) at the pace of `pace`.
    async fn scrub_one(
        &self,
        digest: &Digest,
        size: u64,
        buf: Vec<u8>,
        pace: &mut Pace,
    ) -> (Checked, Vec<u8>) {
        let path = self.layout.blob(digest);
        let opened = tokio::task::spawn_blocking(move || {
            let file = File::open(&path)?;
            let meta = file.metadata()?;
            io::Result::Ok((Arc::new(file), (meta.dev(), meta.ino()), meta.len()))
        })
        .await;
        let (file, id, len) = match opened {
            Ok(Ok(opened)) => opened,
            // Gone (evicted, purged) or unreadable: a lookup deals with it.
            _ => return (Checked::Whole, buf),
        };
        if len != size {
            let why = format!("{len} bytes, verified at {size}");
            return (Checked::Damaged(id, why), buf);
        }
        let mut hasher = Hasher::new(digest.algorithm());
        let mut buf = buf;
        let mut pos = 0u64;
        while pos < size {
            let n = (size - pos).min(PIECE as u64) as usize;
            let f = file.clone();
            let read = tokio::task::spawn_blocking(move || {
                let r = f.read_exact_at(&mut buf[..n], pos);
                if r.is_ok() {
                    hasher.update(&buf[..n]);
                }
                (r, hasher, buf)
            })
            .await;
            let r;
            (r, hasher, buf) = match read {
                Ok(read) => read,
                // The closure does not panic; if it did, this blob is
                // left for the next pass.
                Err(_) => return (Checked::Whole, vec![0u8; PIECE]),
            };
            if let Err(e) = r {
                return (Checked::Damaged(id, format!("unreadable: {e}")), buf);
            }
            pos += n as u64;
            self.metrics.scrubbed(n as u64);
            pace.wait(n as u64).await;
        }
        let found = hasher.finish();
        if found != *digest {
            return (Checked::Damaged(id, format!("hashes to {found}")), buf);
        }
        (Checked::Whole, buf)
    }
}
