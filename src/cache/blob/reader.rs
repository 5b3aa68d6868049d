//! Response bodies of blobs: a [`Reader`] streams a span of a stored blob,
//! or of a fill in progress, in bounded chunks.
//!
//! Reading a fill, it waits for bytes to arrive, takes the bytes past a
//! failed disk from the fill's spill queue, never sends its final byte
//! before the fill is verified, and fails (cutting the connection) if the
//! fill fails.

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tokio::sync::watch;

use super::fill::{Phase, Progress};
use super::spill::SpillReceiver;
use crate::body::Body;
use crate::front::zerocopy::Regions;
use crate::front::{ReadBudget, limits::Lease};

/// Most bytes read from disk per body frame.
const CHUNK: usize = 256 * 1024;

/// The first read of a buffered body, and the smallest one when the read
/// budget runs short. A stream whose client never opens its flow-control
/// window holds this much and no more (see [`Delivery::Buffered`]).
const MIN_CHUNK: usize = 4 * 1024;

/// On a zero-copy connection, a tail up to this size is read in place on
/// the runtime thread with a plain `pread`: the one blocking filesystem
/// call left on a runtime worker, on purpose: it is bounded (at most 64 KiB
/// of a descriptor already open, bytes this process has verified or just
/// written, in the page cache in practice), and a blocking-pool hop costs
/// more than the copy. Buffered reads ask the page cache without waiting
/// (`RWF_NOWAIT`) and go to the blocking pool only when the read would
/// wait; opens, creates and removals never run on a worker (`store.rs`,
/// `fill.rs`).
const INLINE_READ: u64 = 64 * 1024;

/// Largest frame of mapped file bytes handed to hyper on a zero-copy
/// connection (see [`crate::front::zerocopy`]). The mapping is never
/// touched, so its size costs address space only.
const ZERO_COPY_CHUNK: u64 = 16 * 1024 * 1024;

/// The first frame of a zero-copy body, and the smallest: later frames grow
/// with the bytes handed over before them (each at most as large as all
/// its predecessors), up to [`ZERO_COPY_CHUNK`].
///
/// Slow start, as for buffered bodies, here for the others' sake: each
/// frame is one `sendfile`, which on loopback also runs the receiving
/// side, and under a storm every response of a fill becomes ready at the
/// same publication. With frames as large as what was on disk (hundreds of
/// KiB at the first publication), the clients served first held both
/// workers while the rest waited for their first byte. 32 plain clients
/// of one cold 256 MiB blob, from a perf trace of stowage's system calls:
/// the median client's first body `sendfile` went out 3.2 ms after the
/// first client's (32 of 334 KiB each); with this start, 0.6-1.1 ms after
/// (three traces). What the bench's clients measure did not move beyond
/// its spread (their own 32 threads share the two cores), and warm CPU
/// per GiB is the same: a warm body pays about ten more frames.
const FIRST_ZERO_COPY: u64 = 64 * 1024;

/// What a reader of a fill listens to.
pub(super) struct Feed {
    /// The fill's progress.
    pub(super) progress: watch::Receiver<Progress>,
    /// Bytes past a failed disk; let go of once this reader cannot need them.
    pub(super) spill: Option<SpillReceiver>,
}

/// How a body's file bytes reach the connection.
#[derive(Clone)]
pub(crate) enum Delivery {
    /// Plain HTTP/1: mapped regions the connection sends with `sendfile`;
    /// no buffer.
    ZeroCopy(Arc<Regions>),
    /// TLS or HTTP/2: bytes read into buffers leased from the process-wide
    /// read budget. Reads start at [`MIN_CHUNK`] and grow with what the
    /// connection has actually sent (the bytes of this body's earlier
    /// chunks that hyper has let go of), up to [`CHUNK`]: slow start, so a
    /// stream that never moves pins one small buffer, not a full chunk.
    Buffered(Arc<ReadBudget>),
}

/// A buffer read under a [`Lease`] of the read budget, handed to hyper
/// inside `Bytes`: dropping it returns the bytes to the budget and counts
/// them as sent.
struct Leased {
    buf: Bytes,
    _lease: Lease,
    sent: Arc<AtomicU64>,
}

impl AsRef<[u8]> for Leased {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        self.sent
            .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
    }
}

/// Reader state for one response body.
struct Reader {
    file: Option<Arc<File>>,
    /// Next offset to send.
    pos: u64,
    /// Where the body starts: `pos - start` bytes are handed over.
    start: u64,
    /// End of the span to send (exclusive); `None` = to the end of a blob
    /// whose size is not known yet.
    end: Option<u64>,
    /// The fill being read, or `None` for a stored blob.
    feed: Option<Feed>,
    /// The final byte of the response, received from the spill queue and
    /// held until the fill is verified.
    held: Option<Bytes>,
    /// How file bytes reach the connection.
    delivery: Delivery,
    /// Bytes of this body's buffered chunks that hyper has let go of.
    sent: Arc<AtomicU64>,
    /// Whether a frame has been sent: every later one waits for its turn.
    ///
    /// A connection whose client keeps up never finds its socket full, so
    /// without a yield hyper would pull frame after frame in one poll of
    /// the connection's task (only tokio's budget of 128 socket operations
    /// and hyper's 16 rounds end it: megabytes over TLS). Under a storm
    /// every response of one fill becomes ready at once, and those polled
    /// first held both workers while the others' heads and first bytes
    /// waited. 32 TLS clients of one cold 256 MiB blob, 5 alternating
    /// rounds: time to first byte p50 9.8-72.4 ms (median 40.7) without the
    /// yield, 6.3-8.8 ms (median 6.4) with it; warm TLS CPU per GiB the
    /// same within noise (0.59 and 0.54 s). The cost is one more trip
    /// through the run queue per frame (frames are at most 256 KiB
    /// buffered, 16 MiB mapped), also after a wait for the fill's bytes,
    /// where it is not needed: skipping it there measured no different.
    framed: bool,
}

/// What to do next.
enum Step {
    /// Read `[pos, limit)` from the file.
    Disk(u64),
    /// Send these bytes.
    Send(Bytes),
    /// The response is complete.
    Done,
}

/// A body that streams `[start, end)` of a blob in bounded chunks, from
/// `file` (complete when `feed` is `None`, else a fill's file).
pub(super) fn file_body(
    file: Option<Arc<File>>,
    start: u64,
    end: Option<u64>,
    feed: Option<Feed>,
    delivery: Delivery,
) -> Body {
    let reader = Reader {
        file,
        pos: start,
        start,
        end,
        feed,
        held: None,
        delivery,
        sent: Arc::new(AtomicU64::new(0)),
        framed: false,
    };
    let stream = futures_util::stream::try_unfold(reader, |mut r| async move {
        let step = r.next_step().await?;
        if matches!(step, Step::Done) {
            return Ok(None);
        }
        // One frame per turn: see `Reader::framed`.
        if std::mem::replace(&mut r.framed, true) {
            tokio::task::yield_now().await;
        }
        let chunk = match step {
            Step::Done => return Ok(None),
            Step::Send(bytes) => bytes,
            Step::Disk(limit) => r.read(limit).await?,
        };
        Ok(Some((Frame::data(chunk), r)))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

impl Reader {
    /// Reads the next chunk of `[pos, limit)` from the file.
    async fn read(&mut self, limit: u64) -> io::Result<Bytes> {
        let file = self
            .file
            .clone()
            .ok_or_else(|| io::Error::other("blob has no file to read"))?;
        let pos = self.pos;
        let left = limit - pos;
        let chunk = match &self.delivery {
            // Mapped, never touched: the connection sends it with sendfile,
            // so a large frame costs no memory. `mmap` itself reads nothing
            // (no I/O here); sendfile does, in the connection's writer, as
            // a `pread` would.
            Delivery::ZeroCopy(regions) if left > INLINE_READ => {
                let frame = (pos - self.start).clamp(FIRST_ZERO_COPY, ZERO_COPY_CHUNK);
                regions.chunk(&file, pos, left.min(frame) as usize)?
            }
            // A few KiB from the page cache: cheaper to copy in place than
            // to map.
            Delivery::ZeroCopy(_) => read_exact_at(&file, pos, left as usize)?,
            Delivery::Buffered(budget) => {
                let sent = self.sent.load(Ordering::Relaxed) as usize;
                let want = sent.clamp(MIN_CHUNK, CHUNK).min(left as usize);
                let lease = budget.take(want, want.min(MIN_CHUNK)).await;
                let len = lease.len().min(want);
                // What the page cache holds is read in place: a hop to a
                // blocking thread and back costs more than the copy (two
                // context switches a chunk, a TLS connection's largest
                // cost after the copies). Only a read that would wait for
                // the disk goes to a blocking thread.
                let buf = match read_cached_at(&file, pos, len)? {
                    Some(cached) => cached,
                    None => tokio::task::spawn_blocking(move || read_exact_at(&file, pos, len))
                        .await
                        .map_err(io::Error::other)??,
                };
                Bytes::from_owner(Leased {
                    buf,
                    _lease: lease,
                    sent: self.sent.clone(),
                })
            }
        };
        self.pos += chunk.len() as u64;
        Ok(chunk)
    }

    /// Waits until there is something to send.
    async fn next_step(&mut self) -> io::Result<Step> {
        loop {
            let Some(feed) = self.feed.as_mut() else {
                return Ok(self.stored_step());
            };
            let p = feed.progress.borrow_and_update().clone();
            let verified = match &p.phase {
                Phase::Failed(e) => {
                    return Err(io::Error::other(format!(
                        "blob fill failed: {}",
                        e.message()
                    )));
                }
                Phase::Verified => true,
                Phase::Connecting | Phase::Streaming => false,
            };
            // The end of this response, when known.
            let end = self.end.or(if verified { p.total } else { None });
            feed.keep_spill_if_needed(&p, end, verified);
            if let Some(step) = self.ready(&p, end, verified) {
                return Ok(step);
            }
            if let Some(e) = self.past_disk(&p, end) {
                if let Some(step) = self.next_spilled(e, verified).await? {
                    return Ok(step);
                }
                continue;
            }
            if let Some(feed) = self.feed.as_mut() {
                wait_change(&mut feed.progress).await?;
            }
        }
    }

    /// The next step of a stored (complete) blob.
    fn stored_step(&self) -> Step {
        let end = self.end.unwrap_or(self.pos);
        if self.pos < end {
            Step::Disk(end)
        } else {
            Step::Done
        }
    }

    /// Whether this reader has sent everything up to `end` (a held final
    /// byte aside).
    fn finished(&self, end: Option<u64>) -> bool {
        end.is_some_and(|e| self.pos >= e) && self.held.is_none()
    }

    /// What can be sent now without waiting: the held final byte once
    /// verified, the end, or bytes already on disk. Never the final byte of
    /// the response before verification: the last byte of the response is
    /// held back, or, size unknown, the last byte written so far.
    fn ready(&mut self, p: &Progress, end: Option<u64>, verified: bool) -> Option<Step> {
        if verified && let Some(h) = self.held.take() {
            return Some(Step::Send(h));
        }
        let finished = self.finished(end);
        if finished && verified {
            return Some(Step::Done);
        }
        if finished || self.held.is_some() {
            return None;
        }
        let max_send = match (verified, end) {
            (true, Some(e)) => e,
            (false, Some(e)) => e - 1,
            (_, None) => p.written.saturating_sub(1),
        };
        let on_disk = p.disk_end.unwrap_or(p.written);
        let limit = on_disk.min(max_send);
        (self.pos < limit).then_some(Step::Disk(limit))
    }

    /// The end of the response when its next bytes lie past a failed disk
    /// (they come from the spill queue).
    fn past_disk(&self, p: &Progress, end: Option<u64>) -> Option<u64> {
        if self.finished(end) || self.held.is_some() {
            return None;
        }
        match (p.disk_end, end) {
            (Some(d), Some(e)) if self.pos >= d => Some(e),
            _ => None,
        }
    }

    /// Waits for spilled bytes (or, unverified, a change of progress).
    /// `None`: look again.
    async fn next_spilled(&mut self, end: u64, verified: bool) -> io::Result<Option<Step>> {
        let Some(feed) = self.feed.as_mut() else {
            return Ok(None);
        };
        let spill = feed
            .spill
            .as_mut()
            .ok_or_else(|| io::Error::other("uncached blob stream unavailable"))?;
        tokio::select! {
            chunk = spill.recv() => match chunk {
                Some((off, bytes)) => self.take_spilled(off, bytes, end, verified),
                // Every chunk queued for this reader came before its queue
                // closed: closed while bytes are missing, the reader was cut
                // for not reading (or the fill failed).
                None => Err(io::Error::other(match &feed.progress.borrow().phase {
                    Phase::Failed(e) => format!("blob fill failed: {}", e.message()),
                    Phase::Verified => "uncached blob stream ended early".to_string(),
                    _ => "cut from an uncached blob stream: not reading".to_string(),
                })),
            },
            changed = wait_change(&mut feed.progress), if !verified => changed.map(|()| None),
        }
    }

    /// Takes what this reader needs from a spilled chunk at `off`, holding
    /// back the response's final byte until verification.
    fn take_spilled(
        &mut self,
        off: u64,
        bytes: Bytes,
        end: u64,
        verified: bool,
    ) -> io::Result<Option<Step>> {
        let chunk_end = off + bytes.len() as u64;
        if chunk_end <= self.pos {
            return Ok(None);
        }
        if off > self.pos {
            return Err(io::Error::other("missed part of an uncached blob stream"));
        }
        let from = (self.pos - off) as usize;
        let to = (end.min(chunk_end) - off) as usize;
        let mut slice = bytes.slice(from..to);
        self.pos += slice.len() as u64;
        if self.pos == end && !verified && !slice.is_empty() {
            self.held = Some(slice.split_off(slice.len() - 1));
        }
        Ok((!slice.is_empty()).then_some(Step::Send(slice)))
    }
}

impl Feed {
    /// A reader that will never need spilled bytes lets go of the queue, so
    /// it cannot hold up a fill that lost its disk.
    fn keep_spill_if_needed(&mut self, p: &Progress, end: Option<u64>, verified: bool) {
        let needs_spill = match (p.disk_end, end) {
            (Some(d), Some(e)) => e > d,
            (None, _) => !verified,
            (Some(_), None) => true,
        };
        if !needs_spill {
            self.spill = None;
        }
    }
}

/// Waits for the fill's progress to change. When the fill is gone its final
/// state is already published; anything else is an error.
async fn wait_change(progress: &mut watch::Receiver<Progress>) -> io::Result<()> {
    if progress.changed().await.is_ok() {
        return Ok(());
    }
    match progress.borrow().phase {
        Phase::Verified | Phase::Failed(_) => Ok(()),
        _ => Err(io::Error::other("blob fill vanished")),
    }
}

/// Reads exactly `len` bytes at `pos` (the bytes are known to be on disk).
fn read_exact_at(file: &File, pos: u64, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let at = pos + buf.len() as u64;
        let n = pread_into(file, &mut buf, at, len, false)?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
    }
    Ok(buf.freeze())
}

/// Reads up to `len` bytes at `pos` if the page cache holds at least the
/// first of them (`RWF_NOWAIT`): `None` when the read would wait for the
/// disk. Never blocks on I/O, so it may run on a runtime thread.
fn read_cached_at(file: &File, pos: u64, len: usize) -> io::Result<Option<Bytes>> {
    let mut buf = BytesMut::with_capacity(len);
    match pread_into(file, &mut buf, pos, len, true) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(buf.freeze())),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        // Old kernels and some file systems refuse the flag: read as before.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) => Err(e),
    }
}

/// One `preadv2` into the spare capacity of `buf` (up to `len` bytes in
/// all), without zeroing it first; `nowait` adds `RWF_NOWAIT`. Returns the
/// bytes read (0 at the end of the file) and grows `buf` by that much.
///
/// Written against libc because the safe wrappers (std's `read_at`,
/// rustix's `preadv2`) want initialised memory, and zeroing every chunk
/// cost 6% of a TLS connection's CPU.
fn pread_into(
    file: &File,
    buf: &mut BytesMut,
    pos: u64,
    len: usize,
    nowait: bool,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let want = len.saturating_sub(buf.len());
    buf.reserve(want);
    let spare = buf.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: want.min(spare.len()),
    };
    let offset = libc::off_t::try_from(pos).map_err(|_| io::Error::other("offset too large"))?;
    let flags = if nowait { libc::RWF_NOWAIT } else { 0 };
    let n = loop {
        // SAFETY: `iov` describes `iov_len` bytes of `buf`'s spare
        // capacity, which stays allocated and unaliased for the call; the
        // kernel writes at most that many bytes.
        let n = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, flags) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // SAFETY: the kernel initialised the first `n` bytes of the spare
    // capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

#[cfg(test)]
mod pread_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_without_zeroing_match_the_file() {
        let data: Vec<u8> = (0..(3 * CHUNK + 123))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        for (pos, len) in [(0, CHUNK), (CHUNK + 5, CHUNK), (3 * CHUNK, 123), (10, 1)] {
            let got = read_exact_at(&f, pos as u64, len).unwrap();
            assert_eq!(&got[..], &data[pos..pos + len]);
            // Just written: in the page cache.
            let cached = read_cached_at(&f, pos as u64, len).unwrap().unwrap();
            assert!(!cached.is_empty() && cached.len() <= len);
            assert_eq!(&cached[..], &data[pos..pos + cached.len()]);
        }
        let e = read_exact_at(&f, data.len() as u64 - 10, 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert!(read_cached_at(&f, data.len() as u64, 10).unwrap().is_none());
    }
}

#[cfg(test)]
mod turn_tests {
    use super::*;
    use std::io::Write;
    use std::sync::Mutex;

    /// Two responses on one worker, their clients keeping up (frames are
    /// taken as soon as offered): the second's first frame goes out after
    /// one frame of the first, not after the whole of the first body.
    #[tokio::test]
    async fn a_response_lets_others_run_after_each_frame() {
        let len = 8 * CHUNK;
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![7u8; len]).unwrap();
        let file = Arc::new(f);
        let budget = ReadBudget::new(64 * CHUNK);
        let body = || {
            let delivery = Delivery::Buffered(budget.clone());
            file_body(Some(file.clone()), 0, Some(len as u64), None, delivery)
        };
        let (mut first, mut second) = (body(), body());
        let order = Arc::new(Mutex::new(String::new()));
        let log = order.clone();
        let drain = tokio::spawn(async move {
            let mut bytes = 0;
            while let Some(frame) = first.frame().await {
                bytes += frame.unwrap().into_data().unwrap().len();
                log.lock().unwrap().push('1');
            }
            bytes
        });
        let log = order.clone();
        let head = tokio::spawn(async move {
            second.frame().await.unwrap().unwrap();
            log.lock().unwrap().push('2');
        });
        assert_eq!(drain.await.unwrap(), len);
        head.await.unwrap();
        let order = order.lock().unwrap().clone();
        assert!(order.len() > 3, "{order}");
        assert!(order.starts_with("12"), "{order}");
    }

    /// A zero-copy body's frames start small and grow with what went
    /// before them, up to the largest frame: one response's first sendfile
    /// is never a large one (see [`FIRST_ZERO_COPY`]).
    #[tokio::test]
    async fn a_zero_copy_body_starts_small_and_grows() {
        let len = 2 * ZERO_COPY_CHUNK + 12_345;
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        let regions = Arc::new(Regions::default());
        let delivery = Delivery::ZeroCopy(regions);
        let mut body = file_body(Some(Arc::new(f)), 0, Some(len), None, delivery);
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            frames.push(frame.unwrap().into_data().unwrap().len() as u64);
        }
        assert_eq!(frames.iter().sum::<u64>(), len);
        assert_eq!(frames[0], FIRST_ZERO_COPY, "{frames:?}");
        let mut before = 0;
        for &n in &frames {
            assert!(n <= before.max(FIRST_ZERO_COPY), "{frames:?}");
            before += n;
        }
        assert_eq!(frames.iter().max(), Some(&ZERO_COPY_CHUNK), "{frames:?}");
        assert!(frames.len() < 16, "{frames:?}");
    }
}
