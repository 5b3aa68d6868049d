//! TLS test support: a CA generated with rcgen, server and client
//! certificates signed by it, PEM files on disk, and rustls clients that
//! report what was negotiated (ALPN, version, the server's certificate).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A certificate and its key, as PEM and as the leaf's DER.
#[derive(Clone)]
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM (PKCS#8).
    pub key_pem: String,
    /// The certificate, DER (what a TLS peer sees).
    pub der: CertificateDer<'static>,
}

/// A test CA.
pub struct Ca {
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA certificate, DER.
    pub der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A self-signed CA with this common name.
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca {
            cert_pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A server certificate for `localhost` and 127.0.0.1 with this subject
    /// common name and serial number.
    pub fn server(&self, cn: &str, serial: u64) -> Issued {
        let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params.distinguished_name = dn(cn);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate (for mTLS).
    pub fn client(&self, cn: &str) -> Issued {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name = dn(cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Issued {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().clone(),
        }
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "stowage tests");
    dn
}

/// Writes `data` to `path` atomically (temporary file, then rename), as a
/// certificate manager would.
pub fn write_atomic(path: &Path, data: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Writes `tls.crt` and `tls.key` into `dir`; returns their paths.
pub fn write_pair(dir: &Path, issued: &Issued) -> (PathBuf, PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    write_atomic(&key, &issued.key_pem);
    write_atomic(&cert, &issued.cert_pem);
    (cert, key)
}

/// A `[tls]` table for the stowage config, plus `extra` lines in it.
pub fn tls_table(cert: &Path, key: &Path, extra: &str) -> String {
    format!(
        "\n[tls]\ncert = {:?}\nkey = {:?}\n{extra}\n",
        cert.to_str().unwrap(),
        key.to_str().unwrap()
    )
}

/// A rustls client trusting `ca_pem`, offering `alpn`, optionally with a
/// client certificate and restricted protocol versions.
pub fn client_config(
    ca_pem: &str,
    alpn: &[&[u8]],
    identity: Option<&Issued>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(id) => {
            let chain = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Both TLS versions.
pub const BOTH: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Connects and completes the TLS handshake with server name `localhost`.
pub async fn connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The leaf certificate the server presented.
pub fn peer_leaf(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server presented no certificate")
        .clone()
        .into_owned()
}

/// The negotiated ALPN protocol, as a string.
pub fn alpn(s: &TlsStream<TcpStream>) -> Option<String> {
    s.get_ref()
        .1
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned())
}

/// An HTTP client on one established connection (HTTP/1.1 or h2).
pub enum Conn {
    /// HTTP/1.1.
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    /// HTTP/2.
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl Conn {
    /// Starts HTTP/1.1 or h2 (by `h2`) on `io`.
    pub async fn start<I>(io: I, h2: bool) -> hyper::Result<Conn>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        if h2 {
            let (tx, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
                    .await?;
            tokio::spawn(conn);
            Ok(Conn::H2(tx))
        } else {
            let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
            tokio::spawn(conn);
            Ok(Conn::H1(tx))
        }
    }

    /// GET `path`, optionally with an `Authorization` header; returns status,
    /// headers, body and the HTTP version of the response.
    pub async fn get(
        &mut self,
        path: &str,
        authorization: Option<&str>,
    ) -> Result<(u16, http::HeaderMap, Bytes, http::Version), hyper::Error> {
        let (uri, version) = match self {
            Conn::H1(_) => (path.to_string(), http::Version::HTTP_11),
            Conn::H2(_) => (format!("https://localhost{path}"), http::Version::HTTP_2),
        };
        let mut req = http::Request::builder()
            .method("GET")
            .uri(uri)
            .version(version);
        if matches!(self, Conn::H1(_)) {
            req = req.header("host", "localhost");
        }
        if let Some(a) = authorization {
            req = req.header("authorization", a);
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        let resp = match self {
            Conn::H1(tx) => {
                tx.ready().await?;
                tx.send_request(req).await?
            }
            Conn::H2(tx) => {
                tx.ready().await?;
                tx.send_request(req).await?
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let version = resp.version();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, headers, body, version))
    }

    /// Whether the connection has been closed (by either side).
    pub fn is_closed(&self) -> bool {
        match self {
            Conn::H1(tx) => tx.is_closed(),
            Conn::H2(tx) => tx.is_closed(),
        }
    }
}
