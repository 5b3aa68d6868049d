//! Which upstream a request is for, and the repository name within it.
//!
//! In this order:
//! 1. containerd's `?ns=<host>` query parameter names the registry host;
//! 2. a path prefix `/v2/<host>/<repo>/...`, where the first component is a
//!    configured host, names it (for clients that can only give a mirror a
//!    path, like podman's `registries.conf`);
//! 3. anything else goes to the default (first) upstream.
//!
//! A host named by `ns` that no upstream is configured for is refused with
//! `404 NAME_UNKNOWN`: the mirror is never an open proxy.

use std::sync::Arc;

use crate::cache::pins::Route as Resolver;
use crate::error::Error;
use crate::metrics::RouteKind;
use crate::oci::{ImageRef, ParseError, RepoName, Route};
use crate::upstream::Upstream;
use crate::upstream::config::canonical_host;

/// The configured upstreams, the first being the default.
#[derive(Clone)]
pub(crate) struct Router {
    upstreams: Vec<Arc<Upstream>>,
}

impl Router {
    /// A router over `upstreams`; must not be empty (config validation
    /// guarantees it).
    pub(crate) fn new(upstreams: Vec<Arc<Upstream>>) -> Router {
        Router { upstreams }
    }

    /// Routing for pinned images (`host/repo` as configured): a closure
    /// the pin refresher can hold without the rest of the server.
    pub(crate) fn resolver(&self) -> Resolver {
        let router = self.clone();
        Box::new(move |image: &ImageRef| router.route(image.repo.as_str(), image.host.as_deref()))
    }

    fn find(&self, host: &str) -> Option<&Arc<Upstream>> {
        let host = canonical_host(host);
        self.upstreams
            .iter()
            .find(|u| canonical_host(u.host()) == host)
    }

    /// The upstream a `GET /v2/` is about: the one containerd's `?ns=`
    /// names, else the default (dockerd, podman and skopeo ping the
    /// mirror's root whatever the image).
    pub(crate) fn base(&self, ns: Option<&str>) -> Option<Arc<Upstream>> {
        ns.and_then(|ns| self.find(ns))
            .or_else(|| self.upstreams.first())
            .cloned()
    }

    /// Picks the upstream for `name` (the repository path as requested) and
    /// validates the repository name within it.
    pub(crate) fn route(
        &self,
        name: &str,
        ns: Option<&str>,
    ) -> Result<(Arc<Upstream>, RepoName), Error> {
        if let Some(ns) = ns {
            let upstream = self.find(ns).ok_or_else(|| {
                Error::name_unknown(format!(
                    "this mirror has no upstream for registry host {ns:?}"
                ))
            })?;
            // A client may still put the host in the path; tolerate it.
            let name = match name.split_once('/') {
                Some((first, rest)) if canonical_host(first) == canonical_host(ns) => rest,
                _ => name,
            };
            return Ok((upstream.clone(), RepoName::parse(name)?));
        }
        if let Some((first, rest)) = name.split_once('/')
            && let Some(upstream) = self.find(first)
        {
            return Ok((upstream.clone(), RepoName::parse(rest)?));
        }
        let default = self
            .upstreams
            .first()
            .ok_or_else(|| Error::internal("no upstream configured"))?;
        Ok((default.clone(), RepoName::parse(name)?))
    }
}

/// The value of `ns` in a query string, if present.
pub(crate) fn ns_param(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned())
        .filter(|v| !v.is_empty())
}

/// The `route` metrics label of a request path as parsed.
pub(crate) fn route_kind(route: &Result<Route, ParseError>) -> RouteKind {
    match route {
        Ok(Route::Base) => RouteKind::Base,
        Ok(Route::Manifest { .. }) => RouteKind::Manifest,
        Ok(Route::Blob { .. }) => RouteKind::Blob,
        Ok(Route::TagsList { .. }) => RouteKind::Tags,
        Ok(Route::Referrers { .. }) => RouteKind::Referrers,
        Ok(Route::Write) | Err(_) => RouteKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::parse_route;

    #[test]
    fn route_kinds() {
        let kind = |p: &str| route_kind(&parse_route(p));
        assert_eq!(kind("/v2/"), RouteKind::Base);
        assert_eq!(kind("/v2/library/alpine/manifests/3"), RouteKind::Manifest);
        assert_eq!(kind("/v2/a/b/tags/list"), RouteKind::Tags);
        assert_eq!(kind("/v2/a/blobs/uploads/"), RouteKind::Other);
        assert_eq!(kind("/nope"), RouteKind::Other);
    }
}
