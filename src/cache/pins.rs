//! Pinned images: their blobs are never evicted.
//!
//! A background task resolves every configured image (`cache.pin`) through
//! the manifest cache, at start and then every `cache.pin_refresh`, follows
//! indexes to every platform's manifest, and hands the set of config and
//! layer digests to the blob index. A pin that cannot be resolved keeps its
//! previous blobs pinned.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use crate::cache::manifests::Manifest;
use crate::http::AppState;
use crate::oci::manifest::refs_of;
use crate::oci::{Digest, ImageRef, Reference};

/// Resolves one pinned image to the blobs of its current manifests.
async fn resolve(state: &AppState, image: &ImageRef) -> Result<HashSet<Digest>, String> {
    let name = image.repo.as_str();
    let (upstream, repo) = state
        .router
        .route(name, image.host.as_deref())
        .map_err(|e| e.to_string())?;
    let top: Arc<Manifest> = match &image.reference {
        Reference::Tag(t) => state.manifests.by_tag(&upstream, &repo, t).await,
        Reference::Digest(d) => state.manifests.by_digest(&upstream, &repo, d).await,
    }
    .map_err(|e| e.to_string())?
    .0;
    let mut blobs = HashSet::new();
    let refs = refs_of(&top.body);
    blobs.extend(refs.blobs);
    for child in refs.manifests {
        let (m, _) = state
            .manifests
            .by_digest(&upstream, &repo, &child)
            .await
            .map_err(|e| e.to_string())?;
        blobs.extend(refs_of(&m.body).blobs);
    }
    Ok(blobs)
}

/// Keeps the pinned set current until the process ends.
pub fn spawn(state: Arc<AppState>, pins: Vec<ImageRef>, every: Duration) {
    if pins.is_empty() {
        return;
    }
    let mut stop = state.blobs.stop_signal();
    tokio::spawn(async move {
        let mut last: HashMap<String, HashSet<Digest>> = HashMap::new();
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            for image in &pins {
                let key = image.to_string();
                match resolve(&state, image).await {
                    Ok(blobs) => {
                        tracing::debug!(image = %key, blobs = blobs.len(), "pinned image resolved");
                        last.insert(key, blobs);
                    }
                    Err(e) => {
                        tracing::warn!(image = %key, error = %e, "cannot resolve pinned image; keeping its previous blobs")
                    }
                }
            }
            let all: HashSet<Digest> = last.values().flatten().cloned().collect();
            state.blobs.index().set_pinned(all);
        }
    });
}
