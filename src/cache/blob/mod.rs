//! The blob cache: a content-addressed store on disk and the *fills* that
//! populate it.
//!
//! ## Store
//! A verified blob lives at `<cache>/blobs/<alg>/<hex[..2]>/<hex>`. Files only
//! get there by an fsynced, atomic rename from `<cache>/tmp/`, so anything in
//! the store is complete and verified; `tmp/` is emptied at start-up.
//!
//! ## Fills
//! A miss starts one fill per digest, process-wide (`fill.rs`): a task detached from
//! any request that streams the upstream body into a temporary file while
//! hashing it. The fill publishes its progress on a `watch` channel.
//!
//! Every request for the digest while the fill runs (the first included)
//! reads that file with `pread` up to what has been written and waits for
//! more, so there is one upstream request however many clients ask, nobody
//! waits for the end, and a slow client slows nobody but itself.
//!
//! A reader never sends the last byte of its response before the fill has
//! verified the digest: until then it holds back one byte. If verification
//! fails or upstream breaks off, the fill publishes `Failed`, the temporary
//! file is removed, and every reader's body ends with an error, which cuts
//! the connection: no client can complete a corrupt blob.
//!
//! A fill outlives its readers: when every client has hung up it goes on,
//! so the retry finds the blob cached, as long as it holds one of the
//! `cache.max_detached_fills` permits; without one it is stopped and
//! nothing of it kept (`fill::Audience`).
//!
//! States of a fill, in order: `Connecting` (upstream request sent; once
//! answered, the size is published while the fill waits for room and its
//! file) -> `Streaming` (bytes arriving) -> `Verified` or `Failed`.
//!
//! ## Budget
//! The [`BlobIndex`](crate::cache::index::BlobIndex) accounts for every
//! stored blob and, through each fill's
//! [`Reservation`](crate::cache::index::Reservation), for the bytes fills
//! have written so far; passing the high watermark wakes the evictor. A
//! blob larger than `cache.max_blob_size` is streamed but not cached; a
//! fill without `Content-Length` that grows past it fails.
//!
//! ## Files
//! * `mod.rs`: [`BlobStore::serve`], where a blob request enters.
//! * `store.rs`: the store on disk (open, lookup, commit) and its
//!   background work.
//! * `fill.rs`: the fill table (typed lookups, fill permits) and the fill
//!   task.
//! * `source.rs`: where a fill's bytes come from (the cluster owner, the
//!   shared store, upstream), going on from the next source when one
//!   breaks off.
//! * `writer.rs`: the blocking writer thread of a fill.
//! * `spill.rs`: the readers' queues past a failed disk.
//! * `scrub.rs`: the scrubber, which hashes stored blobs again in the
//!   background and drops those damaged on disk.
//! * `reader.rs`: response bodies (stored blobs and fills, spill queue).
//! * `response.rs`: 200/206 responses and their headers; `range.rs`:
//!   `Range` parsing.
//!
//! ## When the disk fails
//! If the temporary file cannot be created or a write fails (disk full), the
//! fill keeps going without the disk: bytes past what reached the file are
//! handed to the readers already attached through bounded per-reader queues
//! (`spill.rs`: the slowest reader paces the fill, so memory stays bounded;
//! one stuck for the idle timeout is cut), the digest is still verified, and
//! nothing is cached. A request arriving after that leads a new fill that
//! takes the old one's place in the table; requests after it join that one.

use std::sync::Arc;

use http::Response;
use tokio::sync::OwnedSemaphorePermit;

mod fill;
pub(crate) mod range;
mod reader;
mod response;
mod scrub;
mod source;
mod spill;
mod store;
mod writer;

pub(crate) use scrub::Scrub;
pub(crate) use store::BlobStore;

use crate::body::Body;
use crate::cache::OriginKey;
use crate::cache::private::Access;
use crate::cluster::Hop;
use crate::error::Error;
use crate::front::zerocopy::Regions;
use crate::metrics::Outcome;
use crate::oci::{Digest, RepoName};
use crate::upstream::Upstream;
use crate::upstream::caller::Caller;
use fill::{Asker, Fill, FillReader, Lookup, MAX_ROUNDS, OwnFetch, Phase, PreReserved};
use reader::{Delivery, Feed};
use response::{file_response, head_response, unsized_response};
use source::{Origin, Sources};
use store::StoredBlob;

/// What [`BlobStore::prefetch`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prefetched {
    /// A fill started.
    Started,
    /// Stored already, or a fill is running.
    Skipped,
    /// Not enough room under the high watermark.
    NoRoom,
}

/// The blob part of a response before the handler adds common headers.
pub(crate) struct BlobResponse {
    /// How it was answered.
    pub(crate) outcome: Outcome,
    /// The HTTP response, or the error to answer with (an unsatisfiable
    /// range of a stored blob is still a hit).
    pub(crate) response: Result<Response<Body>, Error>,
}

impl BlobStore {
    /// Answers `GET` (or `HEAD` when `head_only`) for a blob: from the store,
    /// by joining a running fill, or by starting one. `range` is the raw
    /// `Range` header, if any. This is where a blob request enters, and
    /// where a fill starts. Upstream is asked with `caller`'s credentials.
    /// A fill asks the digest's owner first when this node is in a cluster
    /// and the request did not come from a peer (`hop`: a peer's request is
    /// never forwarded), then the shared store; passthrough callers use
    /// neither (an owner could not ask upstream with this caller's
    /// credentials, and private content stays off the shared store).
    ///
    /// Held content (stored, or a fill running) is served only as `access`
    /// allows (`cache/private.rs`); `None` when it does not: the caller
    /// must be confirmed upstream first. A fill this request leads is
    /// private when `caller` is a passthrough caller.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn serve(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        range: Option<&str>,
        head_only: bool,
        zero_copy: Option<Arc<Regions>>,
        caller: Caller,
        hop: Hop,
        access: Access,
    ) -> Result<Option<BlobResponse>, Error> {
        let range = range.and_then(range::parse);
        let delivery = match zero_copy {
            Some(regions) => Delivery::ZeroCopy(regions),
            None => Delivery::Buffered(self.read_budget().clone()),
        };
        if let Some(blob) = self.open_stored(digest).await? {
            return Ok(self.hit(digest, blob, range, head_only, delivery, access));
        }
        // Boxed: a miss's state (a fill's lookup, the sources, reading the
        // fill) is many KiB, and unboxed it would sit inline in every
        // request's future, hits included (see `routes::handle`).
        let missing = self.serve_missing(
            upstream, repo, digest, range, head_only, delivery, caller, hop, access,
        );
        Box::pin(missing).await
    }

    /// The response for the stored blob `blob`, complete and verified, if
    /// `access` allows it.
    fn hit(
        &self,
        digest: &Digest,
        blob: StoredBlob,
        range: Option<range::ByteRange>,
        head_only: bool,
        delivery: Delivery,
        access: Access,
    ) -> Option<BlobResponse> {
        if !access.allows(|| self.private.contains(digest), false) {
            return None;
        }
        Some(BlobResponse {
            outcome: Outcome::Hit,
            response: file_response(
                digest,
                Some(blob.file),
                blob.size,
                range,
                head_only,
                None,
                delivery,
            ),
        })
    }

    /// [`Self::serve`] for a blob not stored: a running fill joined, or a
    /// new one led (`HEAD`: answered without one).
    #[allow(clippy::too_many_arguments)]
    async fn serve_missing(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        range: Option<range::ByteRange>,
        head_only: bool,
        delivery: Delivery,
        caller: Caller,
        hop: Hop,
        access: Access,
    ) -> Result<Option<BlobResponse>, Error> {
        let origin = Origin {
            upstream: upstream.clone(),
            repo: repo.clone(),
            caller,
        };
        let own = OwnFetch::of(&origin);
        let sources = || self.sources(origin.clone(), digest, hop);
        if head_only {
            return self.head_miss(&sources(), digest, access).await;
        }
        // A fill that failed for its own origin only (another repository's
        // 404, say) sends its readers from other origins round again; see
        // the fill module's docs.
        let key = origin.key();
        let mut prior = None;
        for _ in 0..MAX_ROUNDS {
            // The table is asked under its lock, which is never held across
            // a syscall: whether the blob was committed meanwhile is the
            // index's in-memory answer; the file is opened after.
            let committed = |d: &Digest| self.index.contains(d);
            let reader = match self.fills.lookup(
                digest,
                Asker::Client,
                &key,
                prior.as_ref(),
                committed,
                own.clone(),
            )? {
                Lookup::Stored => match self.open_stored(digest).await? {
                    Some(blob) => {
                        let delivery = delivery.clone();
                        return Ok(self.hit(digest, blob, range, head_only, delivery, access));
                    }
                    // Evicted in between: look again.
                    None => continue,
                },
                Lookup::Join(reader)
                    if !access.allows(
                        || reader.fill.private,
                        reader.fill.fetches_for(own.as_ref()),
                    ) =>
                {
                    return Ok(None);
                }
                Lookup::Join(reader) => reader,
                Lookup::Lead(permit, reader) => {
                    self.spawn_fill(permit, sources(), digest, None);
                    reader
                }
            };
            match read_fill(reader, digest, range, delivery.clone(), &key).await? {
                Read::Answer(response) => return Ok(Some(response)),
                Read::Again(fill) => {
                    tracing::debug!(%digest, failed = %fill.origin, origin = %key,
                        "blob fill failed for its own repository only: asking again");
                    prior = Some(fill);
                }
            }
        }
        Err(Error::unavailable(format!(
            "gave up on {digest} after {MAX_ROUNDS} failed upstream requests"
        )))
    }

    /// Starts a fill of `digest` (of `size` bytes, as its descriptor says)
    /// for a prefetch, unless the blob is stored, a fill of it is running
    /// (which a prefetch never joins or reads), or `size` does not fit
    /// under the high watermark (a prefetch never makes anything be
    /// evicted). `slot` is held until that fill ends. Returns whether a fill
    /// started. A prefetch fill is an ordinary shared fill: clients asking
    /// for the blob join it. Upstream is asked with `caller`'s credentials:
    /// the caller whose manifest request started the prefetch (in
    /// passthrough, one upstream has just let read that manifest).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn prefetch(
        self: &Arc<Self>,
        upstream: &Arc<Upstream>,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        slot: OwnedSemaphorePermit,
        caller: Caller,
    ) -> Result<Prefetched, Error> {
        if self.index.contains(digest) {
            return Ok(Prefetched::Skipped);
        }
        // Reserved now, before upstream answers, so the next blob of the
        // same manifest sees it; the fill swaps it for its own reservation.
        if !self.index.reserve_free_room(size) {
            return Ok(Prefetched::NoRoom);
        }
        let pre = PreReserved::new(self.index.clone(), size);
        // Whether it was committed meanwhile: the index's answer, in
        // memory, under the fill table's lock.
        let committed = |d: &Digest| self.index.contains(d);
        let origin = Origin {
            upstream: upstream.clone(),
            repo: repo.clone(),
            caller,
        };
        // A passthrough caller's fill is private, as a client's
        // (`cache/private.rs`), and the caller's own request for the blob
        // may read it as its own fetch.
        let own = OwnFetch::of(&origin);
        let key = origin.key();
        match self
            .fills
            .lookup(digest, Asker::Prefetch, &key, None, committed, own)?
        {
            Lookup::Lead(permit, _nobody_reads) => {
                // The same sources as a client's fill: a prefetch is never a
                // peer's hop.
                let sources = self.sources(origin, digest, Hop::Client);
                self.metrics.prefetch_started();
                self.spawn_fill(permit, sources, digest, Some((slot, pre)));
                Ok(Prefetched::Started)
            }
            Lookup::Stored | Lookup::Join(_) => Ok(Prefetched::Skipped),
        }
    }

    /// Where a fill for `origin` gets `digest`: the owner and the nodes
    /// ranked above this one, the shared store, then upstream. A
    /// passthrough caller's fill asks upstream only (an owner could not ask
    /// upstream with its credential, and private content stays off the
    /// shared store), and a peer's request (`hop`) is never forwarded.
    fn sources(&self, origin: Origin, digest: &Digest, hop: Hop) -> Sources {
        let shared = origin.caller.credential().is_none();
        let cluster = self.cluster.clone().filter(|_| shared && !hop.is_peer());
        let bucket = self.bucket.clone().filter(|_| shared);
        Sources::new(origin, cluster, bucket, digest)
    }

    /// `HEAD` on a blob that is not stored: answer from a running fill when
    /// it knows the size (and `access` allows), otherwise ask the sources
    /// with `HEAD` (the owner, the shared store, upstream). Never starts a
    /// fill.
    async fn head_miss(
        &self,
        sources: &Sources,
        digest: &Digest,
        access: Access,
    ) -> Result<Option<BlobResponse>, Error> {
        let (size, outcome) = match self.fills.head(digest) {
            Some((_, _, private)) if !access.allows(|| private, false) => return Ok(None),
            Some((size, outcome, _)) => (Some(size), outcome),
            None => (sources.head(digest).await?, Outcome::Upstream),
        };
        Ok(Some(BlobResponse {
            outcome,
            response: Ok(head_response(digest, size)),
        }))
    }
}

/// What reading a fill came to.
enum Read {
    /// The response (or what failed mid-body, in the body).
    Answer(BlobResponse),
    /// The fill failed before streaming, for its own origin only: look up
    /// again with it as the prior fill.
    Again(Arc<Fill>),
}

/// The response of a request under origin `me` reading a fill, once the
/// fill has an answer from upstream (its failure, if it failed before
/// streaming and that failure applies to `me`).
async fn read_fill(
    reader: FillReader,
    digest: &Digest,
    range: Option<range::ByteRange>,
    delivery: Delivery,
    me: &OriginKey,
) -> Result<Read, Error> {
    let FillReader {
        fill,
        progress: mut rx,
        spill,
        outcome,
    } = reader;
    let progress = rx
        .wait_for(|p| !matches!(p.phase, Phase::Connecting))
        .await
        .map_err(|_| Error::internal("blob fill ended without a result"))?
        .clone();
    if let Phase::Failed(e) = progress.phase {
        return match fill.failure_for(&e, me) {
            Some(e) => Err(e),
            None => Ok(Read::Again(fill)),
        };
    }
    let file = fill.file.get().cloned();
    let feed = Feed {
        progress: rx,
        spill: Some(spill),
    };
    let response = match progress.total {
        Some(size) => file_response(digest, file, size, range, false, Some(feed), delivery),
        None => Ok(unsized_response(digest, file, feed, delivery)),
    };
    Ok(Read::Answer(BlobResponse { outcome, response }))
}
