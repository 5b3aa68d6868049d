//! The spill: how the bytes of a fill past a failed disk reach the readers
//! already attached to it, without the disk and without unbounded memory.
//!
//! Each reader has its own bounded queue ([`SPILL_QUEUE`] chunks of at most
//! [`SPILL_CHUNK`] bytes, copied out of upstream's chunks: else a queue's
//! memory would follow the size of upstream's reads). The fill
//! hands every chunk to every queue, waiting for a full one at most the idle
//! timeout: the slowest reader paces the fill (so memory stays bounded: a
//! chunk is shared, `Bytes`, by all the queues it sits in), and a reader
//! whose queue stays full that long is cut (its queue is closed, its body
//! fails) instead of stalling everyone else. A reader that leaves drops its
//! receiver; the next chunk finds the queue closed and forgets it.
//!
//! Readers subscribe when they join the fill, while the fill's progress is
//! held and before its disk failed (a fill that already spills cannot be
//! joined from the start of the blob), so every subscriber sees every
//! spilled chunk.

use std::sync::Mutex;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// Chunks queued per reader when the disk has failed.
pub(super) const SPILL_QUEUE: usize = 64;

/// Most bytes in one queued chunk: a reader's queue holds at most
/// `SPILL_QUEUE * SPILL_CHUNK` (4 MiB).
pub(super) const SPILL_CHUNK: usize = 64 * 1024;

/// A chunk of a blob at an offset, for readers when the disk has failed.
pub(super) type SpillChunk = (u64, Bytes);

/// The receiving end of one reader's queue.
pub(super) type SpillReceiver = mpsc::Receiver<SpillChunk>;

/// The queues of a fill's readers.
#[derive(Default)]
pub(super) struct Spill {
    /// One sender per reader still attached. Locked briefly (never across
    /// an await): to subscribe, and to take and put back the list around a
    /// send.
    readers: Mutex<Vec<mpsc::Sender<SpillChunk>>>,
}

impl Spill {
    /// A new reader's queue.
    pub(super) fn subscribe(&self) -> SpillReceiver {
        let (tx, rx) = mpsc::channel(SPILL_QUEUE);
        if let Ok(mut readers) = self.readers.lock() {
            readers.push(tx);
        }
        rx
    }

    /// Hands `chunk` to every reader, in pieces of at most
    /// [`SPILL_CHUNK`], waiting at most `idle` for each piece in all for
    /// queues that are full; a reader still full after that is cut.
    /// Returns how many readers are left. The pieces are copies: a slice
    /// would keep the whole buffer upstream's read landed in (hyper's, up
    /// to some 400 KiB) alive for as long as a stuck reader holds it.
    pub(super) async fn send(&self, chunk: SpillChunk, idle: Duration) -> usize {
        let (mut offset, mut rest) = chunk;
        loop {
            let piece = Bytes::copy_from_slice(&rest[..rest.len().min(SPILL_CHUNK)]);
            rest.advance(piece.len());
            let len = piece.len() as u64;
            let left = self.send_piece((offset, piece), idle).await;
            offset += len;
            if rest.is_empty() || left == 0 {
                return left;
            }
        }
    }

    async fn send_piece(&self, chunk: SpillChunk, idle: Duration) -> usize {
        let taken = match self.readers.lock() {
            Ok(mut readers) => std::mem::take(&mut *readers),
            Err(_) => return 0,
        };
        let offset = chunk.0;
        let deadline = tokio::time::Instant::now() + idle;
        let mut kept = Vec::with_capacity(taken.len());
        for tx in taken {
            match tx.try_send(chunk.clone()) {
                Ok(()) => kept.push(tx),
                Err(TrySendError::Closed(_)) => {}
                Err(TrySendError::Full(chunk)) => {
                    match tokio::time::timeout_at(deadline, tx.send(chunk)).await {
                        Ok(Ok(())) => kept.push(tx),
                        Ok(Err(_)) => {}
                        Err(_) => {
                            tracing::warn!(
                                offset,
                                idle_ms = idle.as_millis() as u64,
                                "a reader of an uncached blob stopped reading: cut"
                            );
                        }
                    }
                }
            }
        }
        match self.readers.lock() {
            Ok(mut readers) => {
                readers.extend(kept);
                readers.len()
            }
            Err(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that stops reading holds at most `SPILL_QUEUE *
    /// SPILL_CHUNK` bytes, whatever the size of upstream's chunks (hyper
    /// hands out reads of a few hundred KiB): the queue counted chunks,
    /// and 64 big ones held 32 MiB here. The reader that reads gets every
    /// byte, in order.
    #[tokio::test]
    async fn a_stuck_reader_holds_a_bounded_number_of_bytes() {
        let spill = Spill::default();
        let mut stuck = spill.subscribe();
        let mut reading = spill.subscribe();
        let reader = tokio::spawn(async move {
            let mut next = 0u64;
            while let Some((offset, bytes)) = reading.recv().await {
                assert_eq!(offset, next);
                assert!(bytes.len() <= SPILL_CHUNK);
                next += bytes.len() as u64;
            }
            next
        });
        let big = Bytes::from(vec![7u8; 512 * 1024]);
        let mut offset = 0;
        loop {
            let left = spill
                .send((offset, big.clone()), Duration::from_millis(50))
                .await;
            offset += big.len() as u64;
            if left < 2 {
                assert_eq!(left, 1, "only the stuck reader is cut");
                break;
            }
        }
        drop(spill);
        assert_eq!(reader.await.unwrap(), offset);
        let mut held = 0;
        while let Ok((_, bytes)) = stuck.try_recv() {
            held += bytes.len();
        }
        assert!(held > 0 && held <= SPILL_QUEUE * SPILL_CHUNK, "{held}");
    }

    /// The memory a stuck reader's queue keeps alive is what it holds: a
    /// byte of upstream's read kept the whole buffer it landed in (here
    /// 400 KiB each, 64 of them: 25 MiB for 64 bytes).
    #[tokio::test]
    async fn a_stuck_reader_keeps_no_upstream_buffer_alive() {
        let live = std::sync::Arc::default();
        let spill = Spill::default();
        let mut stuck = spill.subscribe();
        for offset in 0..(SPILL_QUEUE as u64 + 1) {
            let read = crate::body::tracked_buffer(400 * 1024, b"x", &live);
            spill
                .send((offset, read.slice(0..1)), Duration::from_millis(20))
                .await;
        }
        assert_eq!(stuck.recv().await.map(|(_, b)| b.len()), Some(1));
        assert_eq!(live.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
