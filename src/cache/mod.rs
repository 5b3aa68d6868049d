//! The cache: blobs on disk under a byte budget ([`blob`], [`index`]),
//! manifests and tags ([`manifests`]), referrers answers ([`referrers`]),
//! pinned images ([`pins`]), fills started before clients ask
//! ([`prefetch`]), what passthrough upstreams let callers read
//! ([`grants`]), content fetched only through them ([`private`]) and the
//! exclusive lock on the directory ([`lock`]).

pub(crate) mod blob;
pub(crate) mod config;
pub(crate) mod grants;
pub(crate) mod index;
pub(crate) mod journal;
pub(crate) mod layout;
pub(crate) mod lock;
pub(crate) mod manifests;
mod owner;
pub(crate) mod pins;
pub(crate) mod prefetch;
pub(crate) mod private;
pub(crate) mod referrers;
