//! The spill: how the bytes of a fill past a failed disk reach the readers
//! already attached to it, without the disk and without unbounded memory.
//!
//! Each reader has its own bounded queue ([`SPILL_QUEUE`] chunks). The fill
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

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// Chunks queued per reader when the disk has failed.
pub(super) const SPILL_QUEUE: usize = 64;

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

    /// Hands `chunk` to every reader, waiting at most `idle` in all for
    /// queues that are full; a reader still full after that is cut.
    /// Returns how many readers are left.
    pub(super) async fn send(&self, chunk: SpillChunk, idle: Duration) -> usize {
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
