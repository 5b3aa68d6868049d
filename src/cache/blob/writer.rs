//! The blocking half of a fill: a thread of the blocking pool that writes
//! the upstream's chunks to the temporary file, hashes them and publishes
//! how far the file is written; once the disk fails (or the budget has no
//! room for the next chunk), it spills the chunks to the attached readers
//! instead (`spill.rs`: paced by the slowest, a reader stuck for the idle
//! timeout cut).

use std::fs::File;
use std::io::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::fill::Progress;
use super::spill::Spill;
use crate::cache::index::Reservation;
use crate::oci::{Algorithm, Digest, Hasher};

/// While frames keep arriving, readers are woken at least every this many
/// written bytes (and whenever the queue runs dry).
const PUBLISH_EVERY: u64 = 1024 * 1024;

/// Largest `write(2)` into the temporary file: a bigger chunk is written
/// in pieces of this size.
///
/// Measured, not derived: on the bench VM (kernel 6.18, ext4) writing
/// hyper's chunks (up to about 400 KiB) whole made the copy into the page
/// cache far slower in many runs, most likely because ext4 sizes a file's
/// page-cache folios by the write and large folios came from memory the
/// host had taken back (each first touch a fault in the host; nginx,
/// writing small pieces, rarely showed it). The cold 128 MiB fill, 17
/// alternating runs each: median 0.62 GB/s in 64 KiB writes, 0.42 GB/s in
/// whole chunks, with 4 and 7 runs under 0.4 GB/s (the slow kind, whose
/// profile is mostly that copy). 16 KiB pieces, nginx's size for its
/// temporary files, cost more in system calls (6 runs: median 0.57 GB/s).
const WRITE_PIECE: usize = 64 * 1024;

/// Where the bytes of a fill went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Landed {
    /// Every byte reached the file: it can be committed. The size.
    OnDisk(u64),
    /// Not every byte reached the file (disk failure, or no disk used):
    /// readers got the rest through the spill queue. The size.
    OffDisk(u64),
}

impl Landed {
    /// The blob's size.
    pub(super) fn size(self) -> u64 {
        match self {
            Landed::OnDisk(n) | Landed::OffDisk(n) => n,
        }
    }
}

/// What the writer saw: the digest of every byte, and where they went.
pub(super) struct Written {
    pub(super) digest: Digest,
    pub(super) landed: Landed,
}

/// The blocking half of a fill.
pub(super) struct Writer {
    /// The temporary file, or `None` when the fill runs without the disk.
    pub(super) file: Option<Arc<File>>,
    /// Where `written` (and a disk failure) is published to readers.
    pub(super) progress: watch::Sender<Progress>,
    /// Where chunks go once the disk is out of the picture.
    pub(super) spill: Arc<Spill>,
    /// The runtime, to wait on the readers' queues from this thread.
    pub(super) runtime: tokio::runtime::Handle,
    /// Test hook: fail writes past this many bytes.
    pub(super) fault: u64,
    /// Whether spilling is possible (the size is known).
    pub(super) can_spill: bool,
    /// Longest wait for a reader's full queue when spilling.
    pub(super) stall_limit: Duration,
    /// The fill's share of the budget, grown before each chunk reaches the
    /// file (and only if it fits).
    pub(super) reservation: Arc<Reservation>,
}

impl Writer {
    /// Consumes the chunks of `rx` until it closes. Fails on a disk error
    /// that cannot be spilled past, or when no reader is left to spill to.
    pub(super) fn run(
        self,
        mut rx: mpsc::Receiver<Bytes>,
        algorithm: Algorithm,
    ) -> io::Result<Written> {
        let mut hasher = Hasher::new(algorithm);
        let mut offset = 0u64;
        let mut published = 0u64;
        let mut on_disk = self.file.is_some();
        while let Some(chunk) = rx.blocking_recv() {
            let written = offset + chunk.len() as u64;
            if on_disk && !self.reservation.try_grow_to(written) {
                on_disk = self.leave_disk(offset, "the cache budget has no room for it")?;
            }
            if on_disk {
                on_disk = self.write(&chunk, offset)?;
                // Wake readers once per burst, not per frame: when nothing
                // more is queued, or every PUBLISH_EVERY.
                if on_disk && (rx.is_empty() || written - published >= PUBLISH_EVERY) {
                    self.progress.send_modify(|p| p.written = written);
                    published = written;
                }
            }
            if !on_disk {
                self.spill(offset, &chunk)?;
            }
            hasher.update(&chunk);
            offset += chunk.len() as u64;
        }
        if on_disk && published != offset {
            self.progress.send_modify(|p| p.written = offset);
        }
        Ok(Written {
            digest: hasher.finish(),
            landed: if on_disk {
                Landed::OnDisk(offset)
            } else {
                Landed::OffDisk(offset)
            },
        })
    }

    /// Writes `chunk` at `offset` (the end of the file). Returns whether the
    /// disk is still in use: false once a write failed and the rest can be
    /// spilled (published as `disk_end`).
    fn write(&self, chunk: &[u8], offset: u64) -> io::Result<bool> {
        let Some(file) = &self.file else {
            return Ok(false);
        };
        let result = if offset + chunk.len() as u64 > self.fault {
            Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "injected write failure",
            ))
        } else {
            let mut out: &File = file;
            chunk
                .chunks(WRITE_PIECE)
                .try_for_each(|piece| out.write_all(piece))
        };
        match result {
            Ok(()) => Ok(true),
            Err(e) if self.can_spill => {
                tracing::error!(error = %e, at = offset,
                    "writing a blob to the cache failed: streaming the rest without caching");
                self.publish_disk_end(offset);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Stops using the disk at `offset` for `why`: the rest is spilled to
    /// the readers (returns false, the disk no longer in use), or, when
    /// that is impossible (the size is unknown), the fill fails.
    fn leave_disk(&self, offset: u64, why: &str) -> io::Result<bool> {
        if !self.can_spill {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("{why}, and a blob of unknown size cannot be streamed without caching"),
            ));
        }
        tracing::warn!(
            at = offset,
            "{why}: streaming the rest of the blob without caching"
        );
        self.publish_disk_end(offset);
        Ok(false)
    }

    /// Tells the readers the file ends at `offset`: what follows comes
    /// through the spill queue.
    fn publish_disk_end(&self, offset: u64) {
        self.reservation.leave_disk();
        self.progress.send_modify(|p| {
            p.written = offset;
            p.disk_end = Some(offset);
        });
    }

    /// Hands `chunk` to the readers' queues, paced by the slowest: a
    /// reader whose queue stays full for the idle timeout is cut (see
    /// `spill.rs`). This is a thread of the blocking pool, so it may wait on
    /// the runtime. With no reader left there is no point going on; readers
    /// that need no spilled byte (a Range within what reached the disk) but
    /// wait for the verification of the whole blob before their last byte
    /// still count: the rest is hashed for them.
    fn spill(&self, offset: u64, chunk: &Bytes) -> io::Result<()> {
        let left = self
            .runtime
            .block_on(self.spill.send((offset, chunk.clone()), self.stall_limit));
        if left == 0 && self.progress.receiver_count() == 0 {
            return Err(io::Error::other(
                "no readers left for a blob that cannot be cached",
            ));
        }
        Ok(())
    }
}
