//! The blocking half of a fill: on a thread of the blocking pool while
//! chunks keep coming (given back when none has come for [`LINGER`]), it
//! writes the upstream's chunks to the temporary file, hashes them and
//! publishes how far the file is written; once the disk fails (or the
//! budget has no room for the next chunk), it spills the chunks to the
//! attached readers instead (`spill.rs`: paced by the slowest, a reader
//! stuck for the idle timeout cut).

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
/// in pieces of this size. hyper's HTTP/1 chunks (its read buffer, at most
/// 408 KiB) go whole; the cap keeps a piece within a core's L2 cache (1 MiB
/// here), where the receive just put it and the hash reads it again.
///
/// Measured, not derived (the cold 128 MiB fill, bench VM, kernel 6.18,
/// ext4). ext4 sizes a file's page-cache folios by the write, and bigger
/// folios likely cost the kernel less per byte: with the machine's free
/// memory recently touched, 18 alternating fills each gave a median of
/// 0.68 GB/s and 0.15 s of system CPU in whole chunks against 0.58 GB/s
/// and 0.17 s in 64 KiB pieces (nginx in the same rounds: 0.68 GB/s).
/// Reading 1 MiB chunks from upstream (hyper's buffer raised) and writing
/// them whole was slower (0.18-0.22 s of system CPU; likely as they no
/// longer fit in L2).
///
/// Where the host has taken back the guest's free memory (a VM's free
/// page reporting, which this VM's balloon offers), the first touch of
/// each page faults in the host, and big folios likely came from such
/// memory more often: before the bench warmed the free memory, 64 KiB
/// pieces were faster (17 runs each: 0.62 GB/s against 0.42). A server's
/// page cache soon fills its memory, and the bench now warms it
/// (`bench/bench.py`, `warm_free_memory`).
const WRITE_PIECE: usize = 512 * 1024;

/// The writer's error when the disk is out of the picture and no reader is
/// left to hand the bytes to: the fill was abandoned, not broken.
#[derive(Debug, thiserror::Error)]
#[error("no readers left for a blob that cannot be cached")]
pub(super) struct NoReaders;

impl NoReaders {
    /// Whether `e` is this error.
    pub(super) fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<NoReaders>())
    }
}

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
    /// The runtime, to wait for the next chunk from a thread of the
    /// blocking pool ([`LINGER`]).
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

/// How long a writer thread waits for the next chunk before it gives its
/// thread back to the blocking pool (the fill's task waits for the chunk
/// instead, and starts the writer on a thread again when it comes).
///
/// A writer that kept its thread for the whole fill let fills that wait on
/// a slow upstream (or on a client-chosen pace) take every thread of the
/// pool (512), and every blocking call behind them (opening a stored blob
/// for a hit, committing a blob) waited for some fill to end. A thread is
/// now held only while chunks keep coming: within a burst the writer takes
/// the next one on the same thread, as before.
const LINGER: Duration = Duration::from_millis(2);

/// Where a writer stopped.
enum Step {
    /// The chunks ended (the channel closed), or the writer failed.
    Done(io::Result<Written>),
    /// No chunk came for [`LINGER`]: the writer, to be resumed on a thread
    /// with the next chunk ([`Running::resume`]), and its channel.
    Idle(Box<Running>, mpsc::Receiver<Bytes>),
    /// The disk is out of the picture: the first chunk past it (hashed
    /// already) and its offset. The rest of the fill runs on the runtime
    /// ([`Running::spill_rest`]).
    Spill(Box<Running>, mpsc::Receiver<Bytes>, (u64, Bytes)),
}

/// A writer between chunks: the writer and what it has seen so far.
struct Running {
    writer: Writer,
    hasher: Hasher,
    offset: u64,
    published: u64,
    on_disk: bool,
}

impl Writer {
    /// Consumes the chunks of `rx` until it closes, on the blocking pool,
    /// a thread at a time while chunks keep coming ([`LINGER`]). Fails on a
    /// disk error that cannot be spilled past, or when no reader is left to
    /// spill to; the outer error is a writer thread that panicked.
    pub(super) async fn run(
        self,
        rx: mpsc::Receiver<Bytes>,
        algorithm: Algorithm,
    ) -> Result<io::Result<Written>, tokio::task::JoinError> {
        let on_disk = self.file.is_some();
        let mut running = Running {
            writer: self,
            hasher: Hasher::new(algorithm),
            offset: 0,
            published: 0,
            on_disk,
        };
        let (mut rx, mut first) = (rx, None);
        loop {
            match tokio::task::spawn_blocking(move || running.resume(rx, first)).await? {
                Step::Done(result) => return Ok(result),
                Step::Idle(idle, mut chunks) => match chunks.recv().await {
                    Some(chunk) => (running, rx, first) = (*idle, chunks, Some(chunk)),
                    None => return Ok(Ok(idle.finish())),
                },
                Step::Spill(spilling, chunks, first) => {
                    return Ok(spilling.spill_rest(chunks, first).await);
                }
            }
        }
    }
}

impl Running {
    /// Takes `first` (if any) and then the chunks of `rx` as they come,
    /// until it closes (`Done`: the digest of every byte and where they
    /// went), the writer fails on a disk error that cannot be spilled past
    /// (`Done` with the error), the disk is left (`Spill`), or no chunk
    /// comes for [`LINGER`] (`Idle`). Blocking: on a thread of the
    /// blocking pool, which may wait on the runtime.
    fn resume(mut self, mut rx: mpsc::Receiver<Bytes>, first: Option<Bytes>) -> Step {
        let mut next = first;
        loop {
            let chunk = match next.take() {
                Some(chunk) => chunk,
                None => match rx.try_recv() {
                    Ok(chunk) => chunk,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        return Step::Done(Ok(self.finish()));
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let waited = self
                            .writer
                            .runtime
                            .block_on(tokio::time::timeout(LINGER, rx.recv()));
                        match waited {
                            Ok(Some(chunk)) => chunk,
                            Ok(None) => return Step::Done(Ok(self.finish())),
                            Err(_) => return Step::Idle(Box::new(self), rx),
                        }
                    }
                },
            };
            match self.take(&chunk, rx.is_empty()) {
                Ok(None) => {}
                Ok(Some(spill)) => return Step::Spill(Box::new(self), rx, spill),
                Err(e) => return Step::Done(Err(e)),
            }
        }
    }

    /// Writes and hashes one chunk, or hashes it and returns it with its
    /// offset to be spilled (the disk is out of the picture). `dry`:
    /// nothing more is queued behind it.
    fn take(&mut self, chunk: &Bytes, dry: bool) -> io::Result<Option<(u64, Bytes)>> {
        let w = &self.writer;
        let written = self.offset + chunk.len() as u64;
        if self.on_disk && !w.reservation.try_grow_to(written) {
            self.on_disk = w.leave_disk(self.offset, "the cache budget has no room for it")?;
        }
        if self.on_disk {
            self.on_disk = w.write(chunk, self.offset)?;
            // Wake readers once per burst, not per frame: when nothing
            // more is queued, or every PUBLISH_EVERY.
            if self.on_disk && (dry || written - self.published >= PUBLISH_EVERY) {
                w.progress.send_modify(|p| p.written = written);
                self.published = written;
            }
        }
        let spill = (!self.on_disk).then(|| (self.offset, chunk.clone()));
        self.hasher.update(chunk);
        self.offset = written;
        Ok(spill)
    }

    /// Hands `first` and then every chunk still to come to the readers,
    /// hashing them: the fill past the disk, on the runtime. A thread of
    /// the blocking pool is not needed without the disk, and the slowest
    /// reader paces this (for up to the idle timeout per chunk): a client
    /// reading slowly must not hold a thread. Hashing a chunk (a few
    /// hundred KiB at most) on a worker is what encrypting it for TLS
    /// costs too.
    async fn spill_rest(
        mut self,
        mut rx: mpsc::Receiver<Bytes>,
        first: (u64, Bytes),
    ) -> io::Result<Written> {
        let (offset, chunk) = first;
        self.writer.spill(offset, chunk).await?;
        while let Some(chunk) = rx.recv().await {
            let offset = self.offset;
            self.hasher.update(&chunk);
            self.offset += chunk.len() as u64;
            self.writer.spill(offset, chunk).await?;
        }
        Ok(self.finish())
    }

    /// What the writer saw, once the chunks have ended.
    fn finish(self) -> Written {
        if self.on_disk && self.published != self.offset {
            let offset = self.offset;
            self.writer.progress.send_modify(|p| p.written = offset);
        }
        Written {
            digest: self.hasher.finish(),
            landed: if self.on_disk {
                Landed::OnDisk(self.offset)
            } else {
                Landed::OffDisk(self.offset)
            },
        }
    }
}

impl Writer {
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
    /// `spill.rs`). On the runtime, not a thread of the blocking pool: a
    /// client reading slowly must not hold one. With no reader left there
    /// is no point going on; readers that need no spilled byte (a Range
    /// within what reached the disk) but wait for the verification of the
    /// whole blob before their last byte still count: the rest is hashed
    /// for them.
    async fn spill(&self, offset: u64, chunk: Bytes) -> io::Result<()> {
        let left = self.spill.send((offset, chunk), self.stall_limit).await;
        if left == 0 && self.progress.receiver_count() == 0 {
            return Err(io::Error::other(NoReaders));
        }
        Ok(())
    }
}
