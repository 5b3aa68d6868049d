//! Requests to peers: ordinary registry requests (`GET` or `HEAD` of
//! `/v2/<repo>/blobs/<digest>` or `/v2/<repo>/manifests/<ref>`), naming
//! the upstream with `?ns=<host>`, marked with the hop header so the peer
//! never forwards them, and carrying the cluster secret when there is one.
//!
//! One pooled hyper-util client (HTTP/1.1, and h2 over TLS by ALPN) with
//! its own connect timeout, and a bound on the wait for response headers:
//! a peer answers a blob request once its own fill has its upstream's
//! headers, so that bound is the upstream timeout plus a margin.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::config::ClusterConfig;
use super::peers::Peer;
use crate::error::ConfigError;
use crate::oci::headers::{X_STOWAGE_CLUSTER_SECRET, X_STOWAGE_HOP};

type HttpClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A peer did not answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Unreachable(pub String);

/// The client side of peer requests.
pub(crate) struct PeerClient {
    client: HttpClient,
    /// This node's advertised URL: the hop header's value.
    hop: HeaderValue,
    /// The cluster secret header's value, if any.
    secret: Option<HeaderValue>,
    /// Bound on the wait for a peer's response headers.
    headers_timeout: Duration,
    /// `stowage/<version>`.
    user_agent: HeaderValue,
}

impl PeerClient {
    /// A client for `cfg`, presenting itself as `me`, waiting at most
    /// `headers_timeout` for answers.
    pub(crate) fn new(
        cfg: &ClusterConfig,
        me: &str,
        secret: Option<&[u8]>,
        headers_timeout: Duration,
    ) -> Result<PeerClient, ConfigError> {
        let invalid = |k: &str, m: String| ConfigError::invalid(format!("cluster.{k}"), m);
        let hop = HeaderValue::from_str(me).map_err(|e| invalid("advertise", e.to_string()))?;
        let secret = match secret {
            Some(s) => {
                let mut v = HeaderValue::from_bytes(s).map_err(|_| {
                    invalid(
                        "secret_file",
                        "the secret must be printable ASCII (it travels in a header)".into(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config(cfg)?)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(PeerClient {
            client,
            hop,
            secret,
            headers_timeout,
            user_agent: HeaderValue::from_static(concat!("stowage/", env!("CARGO_PKG_VERSION"))),
        })
    }

    /// Sends `method` to `peer` for `/v2/<repo>/<tail>?ns=<ns>` with
    /// `headers`. Any status is returned; no answer is [`Unreachable`].
    pub(crate) async fn send(
        &self,
        peer: &Peer,
        method: Method,
        repo: &str,
        tail: &str,
        ns: &str,
        headers: HeaderMap,
    ) -> Result<Response<Incoming>, Unreachable> {
        let query = form_urlencoded::Serializer::new(String::new())
            .append_pair("ns", ns)
            .finish();
        let url = format!("{}/v2/{repo}/{tail}?{query}", peer.url());
        self.request(method, &url, headers).await
    }

    /// `GET /v2/` on `peer`: is it there, and does it accept this node?
    pub(crate) async fn probe(&self, peer: &Peer) -> Result<(), Unreachable> {
        let url = format!("{}/v2/", peer.url());
        let resp = self.request(Method::GET, &url, HeaderMap::new()).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(Unreachable(format!(
                "GET {url} answered {} (a different cluster secret?)",
                resp.status()
            )))
        }
    }

    async fn request(
        &self,
        method: Method,
        url: &str,
        headers: HeaderMap,
    ) -> Result<Response<Incoming>, Unreachable> {
        let uri: Uri = url
            .parse()
            .map_err(|e| Unreachable(format!("bad peer URL {url:?}: {e}")))?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(Empty::<Bytes>::new())
            .map_err(|e| Unreachable(format!("cannot build a request to {url}: {e}")))?;
        let h = req.headers_mut();
        *h = headers;
        h.insert(X_STOWAGE_HOP, self.hop.clone());
        if let Some(s) = &self.secret {
            h.insert(X_STOWAGE_CLUSTER_SECRET, s.clone());
        }
        h.insert(header::USER_AGENT, self.user_agent.clone());
        match tokio::time::timeout(self.headers_timeout, self.client.request(req)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(Unreachable(format!(
                "{method} {url}: {}",
                crate::error::chain(&e)
            ))),
            Err(_) => Err(Unreachable(format!(
                "{method} {url}: no answer within {}",
                humantime::format_duration(self.headers_timeout)
            ))),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// System roots (webpki's when the system has none) plus `ca_file`, and the
/// client certificate when configured.
fn tls_config(cfg: &ClusterConfig) -> Result<rustls::ClientConfig, ConfigError> {
    let invalid = |k: &str, m: String| ConfigError::invalid(format!("cluster.{k}"), m);
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if roots.is_empty() {
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    }
    if let Some(path) = &cfg.ca_file {
        let certs = rustls_pemfile::certs(&mut read(path)?.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid("ca_file", format!("{}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(invalid(
                "ca_file",
                format!("{} holds no PEM certificates", path.display()),
            ));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| invalid("ca_file", format!("{}: {e}", path.display())))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("ca_file", format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots);
    match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => {
            let chain = rustls_pemfile::certs(&mut read(cert)?.as_slice())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid("client_cert", format!("{}: {e}", cert.display())))?;
            if chain.is_empty() {
                return Err(invalid(
                    "client_cert",
                    format!("{} holds no PEM certificates", cert.display()),
                ));
            }
            let key_der = rustls_pemfile::private_key(&mut read(key)?.as_slice())
                .map_err(|e| invalid("client_key", format!("{}: {e}", key.display())))?
                .ok_or_else(|| {
                    invalid(
                        "client_key",
                        format!("{} holds no PEM private key", key.display()),
                    )
                })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| invalid("client_key", e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}
