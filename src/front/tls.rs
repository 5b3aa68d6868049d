//! TLS termination with rustls (ring provider): certificate chain and key
//! from PEM files, ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3, optional client
//! certificate verification (mTLS), and hot reload.
//!
//! The certificate is served by [`ReloadableCert`], a `ResolvesServerCert`
//! whose `CertifiedKey` sits behind an `ArcSwap`: a reload swaps it, every
//! handshake after that uses the new one, and established connections keep
//! the session they negotiated. A client CA bundle is part of the rustls
//! `ServerConfig` itself, so when it changes a new `ServerConfig` (sharing
//! the resolver and the session cache) is swapped in the same way.
//!
//! A reload reads every file once and swaps nothing unless all of them
//! parse and the key matches the certificate: a bad new file is logged (once:
//! the digest of the bytes rejected is remembered) and the old certificate
//! stays.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use sha2::{Digest as _, Sha256};

use super::config::TlsConfig;

/// Why certificate material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TlsError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A file's contents are not what was expected.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration refused: {0}")]
    Rustls(#[from] rustls::Error),
}

fn invalid(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The ring crypto provider, the only one stowage builds with.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Serves whatever certificate was loaded last.
#[derive(Debug)]
pub(crate) struct ReloadableCert {
    current: ArcSwap<CertifiedKey>,
}

impl ReloadableCert {
    /// A resolver serving `key` until [`ReloadableCert::set`] is called.
    pub(crate) fn new(key: Arc<CertifiedKey>) -> ReloadableCert {
        ReloadableCert {
            current: ArcSwap::new(key),
        }
    }

    /// Serves `key` to every handshake from now on.
    pub(crate) fn set(&self, key: Arc<CertifiedKey>) {
        self.current.store(key);
    }
}

impl ResolvesServerCert for ReloadableCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Everything read from the files at one moment.
struct Material {
    key: Arc<CertifiedKey>,
    client_roots: Option<Arc<RootCertStore>>,
    /// SHA-256 over all the file contents, to notice changes.
    files_digest: [u8; 32],
    /// SHA-256 of the client CA file alone (zero without one).
    ca_digest: [u8; 32],
}

/// What [`Tls::reload`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reloaded {
    /// New material is in use.
    Changed,
    /// The files are the ones already loaded (or already rejected).
    Unchanged,
}

/// How the files are read: `std::fs::read`, or in tests a stand-in whose
/// contents change between reads.
type ReadFile = Arc<dyn Fn(&Path) -> std::io::Result<Vec<u8>> + Send + Sync>;

/// TLS termination state of one listener: the current `ServerConfig` and
/// the files it came from.
pub(crate) struct Tls {
    files: TlsConfig,
    read: ReadFile,
    provider: Arc<CryptoProvider>,
    resolver: Arc<ReloadableCert>,
    config: ArcSwap<rustls::ServerConfig>,
    /// Digest of the files last tried (loaded or rejected) and of the CA
    /// bundle in use.
    seen: Mutex<Seen>,
}

#[derive(Clone, Copy)]
struct Seen {
    files: [u8; 32],
    ca: [u8; 32],
}

impl Tls {
    /// Loads the certificate, key and client CA named in `files`.
    pub(crate) fn load(files: &TlsConfig) -> Result<Tls, TlsError> {
        Tls::load_with(files, Arc::new(|p: &Path| std::fs::read(p)))
    }

    fn load_with(files: &TlsConfig, read: ReadFile) -> Result<Tls, TlsError> {
        let provider = provider();
        let m = material(files, read_files(files, &read), &provider)?;
        let resolver = Arc::new(ReloadableCert::new(m.key.clone()));
        let config = build_config(&provider, &resolver, m.client_roots.clone())?;
        log_loaded(files, &m, "TLS certificate loaded");
        Ok(Tls {
            files: files.clone(),
            read,
            provider,
            resolver,
            config: ArcSwap::new(Arc::new(config)),
            seen: Mutex::new(Seen {
                files: m.files_digest,
                ca: m.ca_digest,
            }),
        })
    }

    /// An acceptor for one new connection, using the current configuration.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// How often the files should be polled (zero: never).
    pub(crate) fn reload_interval(&self) -> std::time::Duration {
        self.files.reload_interval
    }

    /// The TLS handshake timeout.
    pub(crate) fn handshake_timeout(&self) -> std::time::Duration {
        self.files.handshake_timeout
    }

    /// Re-reads the files. With `force` false nothing happens unless their
    /// contents differ from the last attempt (so a rejected file is reported
    /// once, not at every poll). On error the old material stays in use.
    pub(crate) fn reload(&self, force: bool) -> Result<Reloaded, TlsError> {
        // Read once: the bytes compared are the bytes loaded or rejected.
        let contents = read_files(&self.files, &self.read);
        let digest = contents.digest;
        if !force && self.seen().files == digest {
            return Ok(Reloaded::Unchanged);
        }
        let result = self.swap_in(contents);
        if let Err(e) = &result {
            // Remember what was rejected, to report it once: these bytes,
            // not the files read again, which may hold a good pair by now.
            self.set_seen(|s| s.files = digest);
            tracing::error!(error = %e, "TLS reload rejected; still serving the previous certificate");
        }
        result
    }

    fn swap_in(&self, contents: Contents) -> Result<Reloaded, TlsError> {
        let m = material(&self.files, contents, &self.provider)?;
        let seen = self.seen();
        if m.ca_digest != seen.ca {
            let config = build_config(&self.provider, &self.resolver, m.client_roots.clone())?;
            self.config.store(Arc::new(config));
        }
        self.resolver.set(m.key.clone());
        self.set_seen(|s| {
            s.files = m.files_digest;
            s.ca = m.ca_digest;
        });
        log_loaded(&self.files, &m, "TLS certificate reloaded");
        Ok(Reloaded::Changed)
    }

    fn seen(&self) -> Seen {
        match self.seen.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        }
    }

    fn set_seen(&self, f: impl FnOnce(&mut Seen)) {
        match self.seen.lock() {
            Ok(mut g) => f(&mut g),
            Err(p) => f(&mut p.into_inner()),
        }
    }
}

fn log_loaded(files: &TlsConfig, m: &Material, what: &str) {
    let leaf = m
        .key
        .cert
        .first()
        .map(|c| hex::encode(Sha256::digest(c.as_ref())))
        .unwrap_or_default();
    tracing::info!(
        cert = %files.cert.display(),
        chain = m.key.cert.len(),
        leaf_sha256 = %leaf,
        mtls = m.client_roots.is_some(),
        "{what}"
    );
}

/// A `ServerConfig` trusting `client_roots` for client certificates (none:
/// no client authentication), with a session store of its own: a resumed
/// session skips the client certificate check, so sessions must not
/// outlive the trust they were made under (a certificate-only reload keeps
/// the config, and so its sessions).
fn build_config(
    provider: &Arc<CryptoProvider>,
    resolver: &Arc<ReloadableCert>,
    client_roots: Option<Arc<RootCertStore>>,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match client_roots {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| TlsError::Rustls(rustls::Error::General(e.to_string())))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config.session_storage = rustls::server::ServerSessionMemoryCache::new(1024);
    Ok(config)
}

/// The files' contents, read once, and their digest.
struct Contents {
    cert: std::io::Result<Vec<u8>>,
    key: std::io::Result<Vec<u8>>,
    ca: Option<std::io::Result<Vec<u8>>>,
    /// SHA-256 over them all, to notice changes; an unreadable file counts
    /// by its error kind, so a missing file is reported once rather than at
    /// every poll.
    digest: [u8; 32],
}

fn read_files(files: &TlsConfig, read: &ReadFile) -> Contents {
    let cert = read(&files.cert);
    let key = read(&files.key);
    let ca = files.client_ca.as_deref().map(|p| read(p));
    let mut h = Sha256::new();
    for r in [Some(&cert), Some(&key), ca.as_ref()].into_iter().flatten() {
        match r {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(bytes);
            }
            Err(e) => h.update(format!("unreadable: {:?}", e.kind())),
        }
    }
    Contents {
        cert,
        key,
        ca,
        digest: h.finalize().into(),
    }
}

/// The material in `contents`, checked: every file read and parsed, and
/// the key matching the certificate.
fn material(
    files: &TlsConfig,
    contents: Contents,
    provider: &CryptoProvider,
) -> Result<Material, TlsError> {
    let readable = |path: &Path, r: std::io::Result<Vec<u8>>| {
        r.map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = readable(&files.cert, contents.cert)?;
    let key_pem = readable(&files.key, contents.key)?;
    let ca_pem = match (&files.client_ca, contents.ca) {
        (Some(path), Some(r)) => Some(readable(path, r)?),
        _ => None,
    };

    let chain = parse_certs(&files.cert, &cert_pem)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        invalid(
            &files.key,
            format!("no usable PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
        )
    })?;
    let key = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        invalid(
            &files.key,
            format!(
                "does not go with the certificate in {}: {e}",
                files.cert.display()
            ),
        )
    })?;

    let (client_roots, ca_digest) = match (&files.client_ca, &ca_pem) {
        (Some(path), Some(pem)) => {
            let mut roots = RootCertStore::empty();
            for cert in parse_certs(path, pem)? {
                roots
                    .add(cert)
                    .map_err(|e| invalid(path, format!("not a usable CA certificate: {e}")))?;
            }
            (Some(Arc::new(roots)), Sha256::digest(pem).into())
        }
        _ => (None, [0; 32]),
    };
    Ok(Material {
        key: Arc::new(key),
        client_roots,
        files_digest: contents.digest,
        ca_digest,
    })
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn cert_pem(key: &rcgen::KeyPair, name: &str) -> String {
        rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(key)
            .unwrap()
            .pem()
    }

    fn der(pem: &str) -> Vec<u8> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
            .as_ref()
            .to_vec()
    }

    fn served_cert(tls: &Tls) -> Vec<u8> {
        tls.resolver.current.load().cert[0].as_ref().to_vec()
    }

    /// What a rejected reload remembers is the digest of the bytes it
    /// rejected. It used to read the files again for it, so a good
    /// certificate written in between was taken for the rejected one and
    /// skipped until the files changed again (SIGHUP aside). Here the
    /// certificate file changes between reads: the start-up load reads the
    /// first certificate, the next two reads garbage, and every read after
    /// them a new good certificate.
    #[test]
    fn a_certificate_written_while_a_reload_rejects_the_old_files_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let first = cert_pem(&key, "first.example");
        let second = cert_pem(&key, "second.example");
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&key_path, key.serialize_pem()).unwrap();

        let reads = Arc::new(AtomicUsize::new(0));
        let read: ReadFile = {
            let (cert_path, first, second) = (cert_path.clone(), first.clone(), second.clone());
            let reads = reads.clone();
            Arc::new(move |p: &Path| {
                if p != cert_path {
                    return std::fs::read(p);
                }
                Ok(match reads.fetch_add(1, Ordering::Relaxed) {
                    0 => first.clone().into_bytes(),
                    1 | 2 => b"not a certificate".to_vec(),
                    _ => second.clone().into_bytes(),
                })
            })
        };
        let tls = Tls::load_with(&TlsConfig::new(cert_path, key_path), read).unwrap();
        assert_eq!(served_cert(&tls), der(&first));
        assert!(tls.reload(false).is_err(), "garbage is rejected");
        // Polls: the good certificate is loaded by the third.
        let polls: Vec<_> = (0..3).map(|_| tls.reload(false).ok()).collect();
        assert!(
            served_cert(&tls) == der(&second),
            "the new certificate is not served (polls: {polls:?})"
        );
    }
}
