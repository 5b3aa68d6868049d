//! The cache: blobs on disk under a byte budget ([`blob`], [`index`]),
//! manifests and tags ([`manifests`]), pinned images ([`pins`]).

pub mod blob;
pub mod config;
pub mod index;
pub mod journal;
pub mod layout;
pub mod manifests;
pub mod pins;
