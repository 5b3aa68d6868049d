//! Following redirects (registries send blob downloads to object storage):
//! at most [`MAX_REDIRECTS`] hops, `Authorization` on the first hop only,
//! `Location` resolved with the `url` crate (RFC 3986 reference resolution).
//!
//! A redirect target is trusted less than the registry:
//! * https is never downgraded to http;
//! * it may not be a loopback, link-local, private (or otherwise special)
//!   address unless the upstream itself is at an address of the same kind,
//!   or the upstream has `allow_private_redirects`. Literal addresses are
//!   checked before connecting; names are checked by the resolver of the
//!   client that redirect hops use ([`GuardedResolver`]), so the address
//!   checked is the address connected to (no second lookup to rebind);
//! * its 401 is not a registry challenge (see `Upstream::send`).
//!
//! The token realm a challenge names is held to the same address rules
//! (it gets the mirror's credentials; see `auth.rs`).

use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, Uri, header};
use hyper_util::client::legacy::connect::dns::Name;
use tokio::sync::OnceCell;

use super::client::{Hop, Upstream, UpstreamBody};
use super::error::UpstreamError;

/// Redirects followed for one request before giving up.
const MAX_REDIRECTS: usize = 5;

fn is_redirect(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::MOVED_PERMANENTLY
            | StatusCode::FOUND
            | StatusCode::SEE_OTHER
            | StatusCode::TEMPORARY_REDIRECT
            | StatusCode::PERMANENT_REDIRECT
    )
}

/// Resolves a `Location` value against the URL that produced it. Only http
/// and https targets are accepted; the fragment is dropped.
fn resolve_location(base: &Uri, location: &str) -> Result<Uri, UpstreamError> {
    let bad = |why: &str| UpstreamError::Protocol(format!("bad redirect to {location:?}: {why}"));
    let reference = location.split('#').next().unwrap_or("").trim();
    if reference.is_empty() {
        return Err(bad("empty Location"));
    }
    // `url` would percent-encode spaces and controls; a Location carrying
    // them is not a URI reference at all.
    if !reference.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("not a valid URL"));
    }
    let base = url::Url::parse(&base.to_string()).map_err(|_| bad("not a valid URL"))?;
    let mut target = base.join(reference).map_err(|_| bad("not a valid URL"))?;
    target.set_fragment(None);
    if !matches!(target.scheme(), "http" | "https") {
        return Err(bad("only http and https are followed"));
    }
    if target.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    target.as_str().parse().map_err(|_| bad("not a valid URL"))
}

/// What kind of address an IP address is, for redirect decisions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum AddrKind {
    /// Anything routable on the internet.
    Public,
    /// 127.0.0.0/8, ::1, and the unspecified addresses (which reach this
    /// host).
    Loopback,
    /// 169.254.0.0/16 (cloud metadata lives there), fe80::/10.
    LinkLocal,
    /// RFC 1918, shared address space (100.64.0.0/10), fc00::/7.
    Private,
    /// Multicast, broadcast, reserved, documentation ranges.
    Special,
}

/// The kind of `ip` (an IPv4-mapped IPv6 address as its IPv4 address).
pub(super) fn addr_kind(ip: IpAddr) -> AddrKind {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            if v4.is_loopback() || v4.is_unspecified() || a == 0 {
                AddrKind::Loopback
            } else if v4.is_link_local() {
                AddrKind::LinkLocal
            } else if v4.is_private() || (a == 100 && (64..128).contains(&b)) {
                AddrKind::Private
            } else if v4.is_multicast() || v4.is_broadcast() || v4.is_documentation() || a >= 240 {
                AddrKind::Special
            } else {
                AddrKind::Public
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return addr_kind(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            if v6.is_loopback() || v6.is_unspecified() {
                AddrKind::Loopback
            } else if first & 0xffc0 == 0xfe80 {
                AddrKind::LinkLocal
            } else if first & 0xfe00 == 0xfc00 {
                AddrKind::Private
            } else if v6.is_multicast() || first == 0x2001 && v6.segments()[1] == 0x0db8 {
                AddrKind::Special
            } else {
                AddrKind::Public
            }
        }
    }
}

/// Which addresses an upstream's redirects may lead to.
pub(super) struct RedirectPolicy {
    /// `allow_private_redirects`.
    allow_private: bool,
    /// The upstream's own host and port, resolved (once) to learn the
    /// kinds of address it is at.
    host: String,
    port: u16,
    own_kinds: OnceCell<HashSet<AddrKind>>,
}

impl RedirectPolicy {
    pub(super) fn new(base: &Uri, allow_private: bool) -> RedirectPolicy {
        let host = base
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = base.port_u16().unwrap_or(match base.scheme_str() {
            Some("https") => 443,
            _ => 80,
        });
        RedirectPolicy {
            allow_private,
            host,
            port,
            own_kinds: OnceCell::new(),
        }
    }

    /// Whether the upstream itself is at an address of `kind` (learnt once;
    /// while its name does not resolve, it is at none, and the lookup is
    /// tried again next time: a passing DNS failure must not refuse its
    /// redirects and token realms for good).
    async fn is_own_kind(&self, kind: AddrKind) -> bool {
        let own = self
            .own_kinds
            .get_or_try_init(|| async {
                if let Ok(ip) = self.host.parse::<IpAddr>() {
                    return Ok([addr_kind(ip)].into());
                }
                tokio::net::lookup_host((self.host.as_str(), self.port))
                    .await
                    .map(|addrs| addrs.map(|a| addr_kind(a.ip())).collect::<HashSet<_>>())
            })
            .await;
        own.is_ok_and(|kinds| kinds.contains(&kind))
    }

    /// Whether a redirect may lead to `ip`; the reason if not.
    pub(super) async fn check(&self, ip: IpAddr) -> Result<(), String> {
        let kind = addr_kind(ip);
        if kind == AddrKind::Public || self.allow_private || self.is_own_kind(kind).await {
            return Ok(());
        }
        Err(format!(
            "{ip} is a {kind:?} address and the upstream is not \
             (set allow_private_redirects to follow such redirects)"
        ))
    }
}

/// A redirect refused by the [`RedirectPolicy`] (found in the chain of a
/// connection error, to report it as such).
#[derive(Debug)]
pub(super) struct RedirectRefused(pub(super) String);

impl std::fmt::Display for RedirectRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "redirect refused: {}", self.0)
    }
}

impl std::error::Error for RedirectRefused {}

/// The resolver of the client redirect hops use: the system's (through
/// tokio's `lookup_host`), refusing a name if any of its addresses is one
/// the [`RedirectPolicy`] does not allow.
#[derive(Clone)]
pub(super) struct GuardedResolver {
    pub(super) policy: Arc<RedirectPolicy>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            for a in &addrs {
                if let Err(why) = policy.check(a.ip()).await {
                    let why = format!("{} resolves to {why}", name.as_str());
                    return Err(std::io::Error::other(RedirectRefused(why)));
                }
            }
            Ok(addrs.into_iter())
        })
    }
}

/// Whether `e`'s chain holds a [`RedirectRefused`].
pub(super) fn refused_in(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<RedirectRefused>() {
            return Some(r.to_string());
        }
        // An io::Error's source is its inner error's source, not the inner
        // error itself.
        if let Some(r) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<RedirectRefused>())
        {
            return Some(r.to_string());
        }
        cur = e.source();
    }
    None
}

/// Whether `a` and `b` share scheme, host and port.
pub(super) fn same_origin(a: &Uri, b: &Uri) -> bool {
    a.scheme() == b.scheme()
        && a.host() == b.host()
        && a.port_u16().or(default_port(a)) == b.port_u16().or(default_port(b))
}

fn default_port(u: &Uri) -> Option<u16> {
    match u.scheme_str() {
        Some("https") => Some(443),
        Some("http") => Some(80),
        _ => None,
    }
}

/// The checks of a redirect hop from `from` to `to` that need no lookup:
/// never from https to http.
fn check_hop(from: &Uri, to: &Uri) -> Result<(), UpstreamError> {
    if from.scheme_str() == Some("https") && to.scheme_str() != Some("https") {
        return Err(UpstreamError::Protocol(
            "redirect refused: from https to plain http".into(),
        ));
    }
    Ok(())
}

impl Upstream {
    /// Sends a request and follows redirects (at most [`MAX_REDIRECTS`]).
    /// `auth` goes to the first hop only, which is sent `via` the registry's
    /// own client, or the guarded one (a token realm: a place the registry
    /// named, held to the redirect targets' address rules). `kind` labels
    /// the metrics. Returns the final response and whether it came from
    /// the first hop's origin (the registry itself, or the token endpoint
    /// it named) rather than a redirect target elsewhere.
    pub(super) async fn follow(
        &self,
        kind: &'static str,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        auth: Option<&HeaderValue>,
        via: Hop,
    ) -> Result<(Response<UpstreamBody>, bool), UpstreamError> {
        let first = uri.clone();
        let mut uri = uri.clone();
        for hop in 0..=MAX_REDIRECTS {
            let (auth, via) = if hop == 0 {
                (auth, via)
            } else {
                (None, Hop::Redirect)
            };
            // A name is checked by the guarded client's resolver; a literal
            // address here.
            if via == Hop::Redirect {
                self.check_literal(&uri, hop == 0).await?;
            }
            let resp = self
                .exchange(kind, method, &uri, headers, auth, via)
                .await?;
            let from_origin = same_origin(&first, &uri);
            if !is_redirect(resp.status()) {
                return Ok((resp, from_origin));
            }
            let Some(location) = resp.headers().get(header::LOCATION) else {
                return Ok((resp, from_origin));
            };
            let location = location.to_str().map_err(|_| {
                UpstreamError::Protocol("redirect Location is not ASCII".to_string())
            })?;
            let next = resolve_location(&uri, location)?;
            check_hop(&uri, &next)?;
            uri = next;
        }
        Err(UpstreamError::Protocol(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// Refuses `uri` when its host is a literal address the
    /// [`RedirectPolicy`] does not allow.
    async fn check_literal(&self, uri: &Uri, realm: bool) -> Result<(), UpstreamError> {
        let literal = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<IpAddr>().ok());
        let Some(ip) = literal else {
            return Ok(());
        };
        self.redirects.check(ip).await.map_err(|why| {
            let what = if realm { "token realm" } else { "redirect" };
            UpstreamError::Protocol(format!("{what} refused: {why}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_kinds() {
        let k = |s: &str| addr_kind(s.parse().unwrap());
        assert_eq!(k("127.0.0.1"), AddrKind::Loopback);
        assert_eq!(k("127.8.9.1"), AddrKind::Loopback);
        assert_eq!(k("0.0.0.0"), AddrKind::Loopback);
        assert_eq!(k("::1"), AddrKind::Loopback);
        assert_eq!(k("::ffff:127.0.0.1"), AddrKind::Loopback);
        assert_eq!(k("169.254.169.254"), AddrKind::LinkLocal);
        assert_eq!(k("fe80::1"), AddrKind::LinkLocal);
        for p in [
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
        ] {
            assert_eq!(k(p), AddrKind::Private, "{p}");
        }
        for s in [
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "ff02::1",
            "2001:db8::1",
        ] {
            assert_eq!(k(s), AddrKind::Special, "{s}");
        }
        for p in ["8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111"] {
            assert_eq!(k(p), AddrKind::Public, "{p}");
        }
    }

    #[tokio::test]
    async fn policy_follows_the_upstreams_own_kind() {
        let public: Uri = "https://203.0.113.9/".parse().unwrap();
        let p = RedirectPolicy::new(&"https://8.8.8.8/".parse().unwrap(), false);
        assert!(p.check("1.1.1.1".parse().unwrap()).await.is_ok());
        for ip in ["127.0.0.1", "169.254.169.254", "10.0.0.1", "::1", "0.0.0.0"] {
            let e = p.check(ip.parse().unwrap()).await.unwrap_err();
            assert!(e.contains("allow_private_redirects"), "{e}");
        }
        let allowed = RedirectPolicy::new(&public, true);
        assert!(
            allowed
                .check("169.254.169.254".parse().unwrap())
                .await
                .is_ok()
        );
        // An upstream on loopback may redirect to loopback, not elsewhere
        // inside.
        let local = RedirectPolicy::new(&"http://127.0.0.1:5000/".parse().unwrap(), false);
        assert!(local.check("127.0.0.1".parse().unwrap()).await.is_ok());
        assert!(
            local
                .check("169.254.169.254".parse().unwrap())
                .await
                .is_err()
        );
        assert!(local.check("10.0.0.1".parse().unwrap()).await.is_err());
        // Names are resolved by the guarded resolver: localhost is
        // loopback.
        let mut resolver = GuardedResolver {
            policy: Arc::new(RedirectPolicy::new(
                &"https://8.8.8.8/".parse().unwrap(),
                false,
            )),
        };
        let name: Name = "localhost".parse().unwrap();
        let e = tower_service::Service::call(&mut resolver, name)
            .await
            .unwrap_err();
        assert!(refused_in(&e).is_some(), "{e}");
        let mut resolver = GuardedResolver {
            policy: Arc::new(local),
        };
        let name: Name = "localhost".parse().unwrap();
        assert!(
            tower_service::Service::call(&mut resolver, name)
                .await
                .is_ok()
        );
    }

    /// The upstream's own address kinds are learnt once, but a name that
    /// does not resolve (a passing DNS failure) is not remembered as "at
    /// no address": the next check looks it up again.
    #[tokio::test]
    async fn a_failed_lookup_of_the_upstream_is_not_remembered() {
        let p = RedirectPolicy::new(&"http://no-such-host.invalid:5000/".parse().unwrap(), false);
        assert!(p.check("10.0.0.1".parse().unwrap()).await.is_err());
        assert!(p.own_kinds.get().is_none(), "a failed lookup was kept");
        let p = RedirectPolicy::new(&"http://localhost:5000/".parse().unwrap(), false);
        assert!(p.check("127.0.0.1".parse().unwrap()).await.is_ok());
        assert!(p.own_kinds.get().is_some());
    }

    #[test]
    fn hops_never_downgrade() {
        let u = |s: &str| s.parse::<Uri>().unwrap();
        assert!(check_hop(&u("https://r/v2/"), &u("http://cdn/x")).is_err());
        assert!(check_hop(&u("https://r/v2/"), &u("https://cdn/x")).is_ok());
        assert!(check_hop(&u("http://r/v2/"), &u("https://cdn/x")).is_ok());
        assert!(check_hop(&u("http://r/v2/"), &u("http://cdn/x")).is_ok());
        assert!(same_origin(&u("https://r/a"), &u("https://r:443/b")));
        assert!(!same_origin(&u("https://r/a"), &u("http://r/b")));
        assert!(!same_origin(&u("https://r/a"), &u("https://cdn/b")));
    }

    #[test]
    fn location_resolution() {
        let base: Uri = "https://reg.example/v2/a/b/blobs/sha256:1?x=y"
            .parse()
            .unwrap();
        let r = |l: &str| resolve_location(&base, l).map(|u| u.to_string());
        assert_eq!(
            r("https://s3.example/bucket/k?sig=1").unwrap(),
            "https://s3.example/bucket/k?sig=1"
        );
        assert_eq!(r("//cdn.example/p").unwrap(), "https://cdn.example/p");
        assert_eq!(r("/other/path").unwrap(), "https://reg.example/other/path");
        assert_eq!(r("c/d").unwrap(), "https://reg.example/v2/a/b/blobs/c/d");
        assert_eq!(r("../../x?q=1").unwrap(), "https://reg.example/v2/a/x?q=1");
        assert_eq!(
            r("?page=2").unwrap(),
            "https://reg.example/v2/a/b/blobs/sha256:1?page=2"
        );
        assert_eq!(r("/a/b#frag").unwrap(), "https://reg.example/a/b");
        assert!(r("").is_err());
        assert!(r("ftp://x/y").is_err());
        assert!(r("http://").is_err());
        assert!(r("/bad path").is_err());
        // Dot segments (RFC 3986 section 5.2.4).
        assert_eq!(r("/a/b/../../../c").unwrap(), "https://reg.example/c");
        assert_eq!(r("/a/./b/.").unwrap(), "https://reg.example/a/b/");
    }
}
