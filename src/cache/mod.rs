//! The cache: blobs on disk under a byte budget ([`blob`], [`index`]),
//! manifests and tags ([`manifests`]), referrers answers ([`referrers`]),
//! pinned images ([`pins`]), fills started before clients ask
//! ([`prefetch`]).

pub(crate) mod blob;
pub(crate) mod config;
pub(crate) mod grants;
pub(crate) mod index;
pub(crate) mod journal;
pub(crate) mod layout;
pub(crate) mod manifests;
mod owner;
pub(crate) mod pins;
pub(crate) mod prefetch;
pub(crate) mod referrers;
