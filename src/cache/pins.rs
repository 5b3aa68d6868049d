//! Pinned images: their blobs are never evicted.
//!
//! A background task resolves every configured image (`cache.pin`) through
//! the manifest cache, at start and then every `cache.pin_refresh`, follows
//! indexes to every platform's manifest, and hands the set of config and
//! layer digests to the blob index. A pin that cannot be resolved keeps its
//! previous blobs pinned, across restarts too: the blobs of each image are
//! kept in `<cache>/pins` (`layout.rs`), read before the first resolution
//! (for the images still configured), so that no restart unpins them, not
//! even for the time the first resolution takes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::index::BlobIndex;
use super::layout::{self, Layout};
use super::manifests::{Manifest, ManifestStore};
use super::private::Access;
use crate::cluster::Hop;
use crate::error::Error;
use crate::oci::manifest::{AcceptClass, refs_of};
use crate::oci::{Digest, ImageRef, Reference, RepoName};
use crate::upstream::Upstream;
use crate::upstream::caller::Caller;

/// Picks the upstream and the repository of an image (the server's router).
pub(crate) type Route =
    Box<dyn Fn(&ImageRef) -> Result<(Arc<Upstream>, RepoName), Error> + Send + Sync>;

/// The pinned images and what resolving them needs.
pub(crate) struct Pins {
    /// `cache.pin`.
    pub(crate) images: Vec<ImageRef>,
    /// `cache.pin_refresh`.
    pub(crate) every: Duration,
    /// Where manifests are resolved.
    pub(crate) manifests: Arc<ManifestStore>,
    /// Where the pinned set goes.
    pub(crate) index: Arc<BlobIndex>,
    /// Which upstream and repository an image is.
    pub(crate) route: Route,
    /// Where the pinned set is kept.
    pub(crate) layout: Layout,
}

impl Pins {
    /// Keeps the pinned set current until `stop` is cancelled.
    pub(crate) fn spawn(self, stop: CancellationToken) {
        if self.images.is_empty() {
            return;
        }
        let mut last = self.saved();
        self.pin(&last);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(self.every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = stop.cancelled() => return,
                }
                let before = last.clone();
                self.refresh(&mut last).await;
                self.pin(&last);
                if last != before {
                    self.save(&last).await;
                }
            }
        });
    }

    /// Hands the blobs of every pinned image to the index.
    fn pin(&self, pins: &HashMap<String, HashSet<Digest>>) {
        self.index
            .set_pinned(pins.values().flatten().cloned().collect());
    }

    /// The pinned blobs kept on disk, of the images still configured.
    /// Blocking, but small, and read once at start-up.
    fn saved(&self) -> HashMap<String, HashSet<Digest>> {
        let text = match std::fs::read_to_string(self.layout.pins()) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the pinned blobs of the last run");
                String::new()
            }
        };
        let configured: HashSet<String> = self.images.iter().map(|i| i.to_string()).collect();
        let mut pins = layout::decode_pins(&text);
        pins.retain(|image, _| configured.contains(image));
        pins
    }

    /// Keeps the pinned blobs on disk (replacing the file).
    async fn save(&self, pins: &HashMap<String, HashSet<Digest>>) {
        let data = layout::encode_pins(pins.iter().map(|(i, b)| (i.as_str(), b)));
        let (tmp, path) = (self.layout.tmp(), self.layout.pins());
        let saved =
            tokio::task::spawn_blocking(move || layout::replace_file(&tmp, &path, &data)).await;
        if let Err(e) = saved.map_err(std::io::Error::other).and_then(|r| r) {
            tracing::warn!(error = %e, "cannot keep the pinned blobs on disk");
        }
    }

    /// Resolves every image again; one that fails keeps its previous blobs.
    async fn refresh(&self, last: &mut HashMap<String, HashSet<Digest>>) {
        for image in &self.images {
            let key = image.to_string();
            match self.resolve(image).await {
                Ok(blobs) => {
                    tracing::debug!(image = %key, blobs = blobs.len(), "pinned image resolved");
                    last.insert(key, blobs);
                }
                Err(e) => {
                    tracing::warn!(image = %key, error = %e, "cannot resolve pinned image; keeping its previous blobs")
                }
            }
        }
    }

    /// Resolves one pinned image to the blobs of its current manifests.
    async fn resolve(&self, image: &ImageRef) -> Result<HashSet<Digest>, Error> {
        let (upstream, repo) = (self.route)(image)?;
        // The mirror's own request, served to nobody: anything held will do.
        let by_digest = |d: &Digest| {
            let (upstream, repo, d) = (upstream.clone(), repo.clone(), d.clone());
            async move {
                self.manifests
                    .by_digest(
                        &upstream,
                        &repo,
                        &d,
                        AcceptClass::ALL,
                        &Caller::Mirror,
                        Hop::Client,
                        Access::Any,
                    )
                    .await?
                    .map(|(m, _)| m)
                    .ok_or_else(|| Error::internal(format!("pinned manifest {d} not served")))
            }
        };
        let top: Arc<Manifest> = match &image.reference {
            Reference::Tag(t) => {
                self.manifests
                    .by_tag(
                        &upstream,
                        &repo,
                        t,
                        AcceptClass::ALL,
                        &Caller::Mirror,
                        Hop::Client,
                    )
                    .await?
                    .0
            }
            Reference::Digest(d) => by_digest(d).await?,
        };
        let mut blobs = HashSet::new();
        let refs = refs_of(&top.body);
        blobs.extend(refs.blobs);
        for child in refs.manifests {
            let m = by_digest(&child).await?;
            blobs.extend(refs_of(&m.body).blobs);
        }
        Ok(blobs)
    }
}
