//! Zero-copy sends of blob bytes on plain HTTP/1 connections.
//!
//! hyper writes response bodies through the connection's `AsyncWrite`; it
//! has no notion of `sendfile`. So the body hands hyper `Bytes` that are
//! memory maps of the blob file ([`Regions::chunk`]), never touched by
//! stowage, and the connection's writer ([`ZeroCopyStream`]) recognises
//! such a slice by its address and sends it with `sendfile(2)` from the
//! file instead of copying it from memory. The page cache goes straight to
//! the socket; the mapping is never faulted in, so it costs no memory.
//!
//! Correctness never depends on the trick: a slice is the exact bytes of
//! the file region, so if hyper ever copied it, or wrote it with a plain
//! `write`, the client would still get the same bytes. Blob files are
//! never modified or truncated once written (they are written once, then
//! renamed or unlinked), which is what makes mapping them sound.

use std::fs::File;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// Most bytes one `sendfile` call may send.
const SENDFILE_MAX_CHUNK: usize = 2 * 1024 * 1024;

/// A mapped file region handed to hyper as `Bytes`.
struct Region {
    map: memmap2::Mmap,
    file: Arc<File>,
    offset: u64,
}

/// Owner of a region's bytes inside a `Bytes`.
struct Owner(Arc<Region>);

impl AsRef<[u8]> for Owner {
    fn as_ref(&self) -> &[u8] {
        &self.0.map
    }
}

/// A region that may still be queued in hyper.
struct Live {
    start: usize,
    len: usize,
    region: Weak<Region>,
}

/// The regions one connection's bodies have handed out. Only that
/// connection's body and writer touch it, so its lock is uncontended.
#[derive(Default)]
pub(crate) struct Regions {
    live: Mutex<Vec<Live>>,
    /// Bytes sent with `sendfile` so far.
    sent: std::sync::atomic::AtomicU64,
}

impl Regions {
    /// `len` bytes of `file` at `offset` as `Bytes` that the connection
    /// writer sends with `sendfile`. The bytes must already be on disk.
    pub(crate) fn chunk(&self, file: &Arc<File>, offset: u64, len: usize) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        // SAFETY: the mapped region lies within what has been written to
        // the file, and blob files are never modified or truncated while
        // open (see the module docs), so the mapping stays valid and its
        // contents never change underneath the `&[u8]` handed out.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(file.as_ref())?
        };
        let region = Arc::new(Region {
            map,
            file: file.clone(),
            offset,
        });
        let mut live = self
            .live
            .lock()
            .map_err(|_| io::Error::other("regions lock poisoned"))?;
        live.retain(|l| l.region.strong_count() > 0);
        live.push(Live {
            start: region.map.as_ptr() as usize,
            len,
            region: Arc::downgrade(&region),
        });
        Ok(Bytes::from_owner(Owner(region)))
    }

    /// The file and offset behind `slice`, if it lies in a live region.
    fn find(&self, slice: &[u8]) -> Option<(Arc<File>, u64)> {
        let ptr = slice.as_ptr() as usize;
        let live = self.live.lock().ok()?;
        live.iter().find_map(|l| {
            if ptr >= l.start && ptr + slice.len() <= l.start + l.len {
                let r = l.region.upgrade()?;
                Some((r.file.clone(), r.offset + (ptr - l.start) as u64))
            } else {
                None
            }
        })
    }

    /// Bytes this connection sent with `sendfile`.
    #[cfg(test)]
    fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Regions still referenced.
    #[cfg(test)]
    fn live(&self) -> usize {
        self.live
            .lock()
            .map(|l| l.iter().filter(|l| l.region.strong_count() > 0).count())
            .unwrap_or(0)
    }
}

/// A TCP stream that sends mapped blob regions with `sendfile`. Without
/// regions (TLS connections) it is a plain pass-through.
pub(crate) struct ZeroCopyStream {
    stream: TcpStream,
    regions: Option<Arc<Regions>>,
}

impl ZeroCopyStream {
    /// Wraps `stream`; `zero_copy` enables `sendfile` of mapped regions.
    pub(crate) fn new(stream: TcpStream, zero_copy: bool) -> ZeroCopyStream {
        ZeroCopyStream {
            stream,
            regions: zero_copy.then(|| Arc::new(Regions::default())),
        }
    }

    /// The regions registry, for bodies on this connection.
    pub(crate) fn regions(&self) -> Option<&Arc<Regions>> {
        self.regions.as_ref()
    }

    fn poll_sendfile(
        &self,
        cx: &mut Context<'_>,
        file: &File,
        offset: u64,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        // Like nginx's sendfile_max_chunk: one call never copies more than
        // this, so a fast connection cannot hold its worker thread for long
        // while others wait for their first bytes.
        let len = len.min(SENDFILE_MAX_CHUNK);
        loop {
            ready!(self.stream.poll_write_ready(cx))?;
            let sent = self.stream.try_io(Interest::WRITABLE, || {
                let mut off = offset;
                rustix::fs::sendfile(&self.stream, file, Some(&mut off), len)
                    .map_err(io::Error::from)
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Ok(n) => {
                    if let Some(r) = &self.regions {
                        r.sent
                            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncRead for ZeroCopyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for ZeroCopyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(regions) = &this.regions
            && let Some((file, offset)) = regions.find(buf)
        {
            return this.poll_sendfile(cx, &file, offset, buf.len());
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(regions) = this.regions.clone() else {
            return Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        };
        let Some(first) = bufs.iter().position(|b| !b.is_empty()) else {
            return Poll::Ready(Ok(0));
        };
        if let Some((file, offset)) = regions.find(&bufs[first]) {
            return this.poll_sendfile(cx, &file, offset, bufs[first].len());
        }
        // Plain bytes (headers, chunk framing) up to the next mapped region.
        let end = bufs[first..]
            .iter()
            .position(|b| !b.is_empty() && regions.find(b).is_some())
            .map_or(bufs.len(), |i| first + i);
        Pin::new(&mut this.stream).poll_write_vectored(cx, &bufs[first..end])
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn mapped_regions_go_out_with_sendfile_and_plain_bytes_as_usual() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(File::open(&path).unwrap());

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let mut out = ZeroCopyStream::new(TcpStream::connect(addr).await.unwrap(), true);
        let regions = out.regions().unwrap().clone();
        // An unaligned offset, and a slice of a region (as after a partial write).
        let chunk = regions.chunk(&file, 12_345, 2_000_000).unwrap();
        assert_eq!(&chunk[..], &data[12_345..2_012_345]);
        assert!(regions.find(&chunk[10..]).is_some());
        out.write_all(b"header\r\n").await.unwrap();
        out.write_all(&chunk).await.unwrap();
        out.write_all(b"trailer").await.unwrap();
        out.shutdown().await.unwrap();
        drop(out);
        let got = reader.await.unwrap();
        let mut want = b"header\r\n".to_vec();
        want.extend_from_slice(&data[12_345..2_012_345]);
        want.extend_from_slice(b"trailer");
        assert_eq!(got.len(), want.len());
        assert!(got == want);
        assert_eq!(regions.sent(), 2_000_000, "the region went out by sendfile");
        assert_eq!(regions.live(), 1);
        drop(chunk);
        assert_eq!(regions.live(), 0);
        assert!(regions.find(b"not mapped").is_none());
    }
}
