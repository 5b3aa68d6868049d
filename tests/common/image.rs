//! Generated test content: random blobs, image manifests and indexes.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

static SEED: AtomicU64 = AtomicU64::new(0);

fn next_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let n = SEED.fetch_add(1, Ordering::Relaxed);
    (t ^ (n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ ((std::process::id() as u64) << 32)) | 1
}

/// `n` pseudo-random bytes (xorshift64*, unique per call).
pub fn random_bytes(n: usize) -> Bytes {
    let mut x = next_seed();
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(n);
    Bytes::from(v)
}

pub fn random_hex(n_bytes: usize) -> String {
    hex::encode(random_bytes(n_bytes))
}

/// A blob and its digest.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub data: Bytes,
}

impl Blob {
    pub fn new(data: impl Into<Bytes>) -> Blob {
        let data = data.into();
        Blob {
            digest: sha256_digest(&data),
            data,
        }
    }

    pub fn random(n: usize) -> Blob {
        Blob::new(random_bytes(n))
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Oci,
    Docker,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaType {
    OciManifest,
    OciIndex,
    DockerManifest,
    DockerList,
}

impl MediaType {
    pub fn as_str(self) -> &'static str {
        match self {
            MediaType::OciManifest => OCI_MANIFEST,
            MediaType::OciIndex => OCI_INDEX,
            MediaType::DockerManifest => DOCKER_MANIFEST,
            MediaType::DockerList => DOCKER_LIST,
        }
    }
}

/// An image: config blob, layer blobs and the manifest referring to them.
#[derive(Clone, Debug)]
pub struct Image {
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub manifest: Bytes,
    /// Digest of `manifest`.
    pub digest: String,
    pub media_type: MediaType,
}

impl Image {
    /// Config and layers, in that order.
    pub fn blobs(&self) -> Vec<&Blob> {
        std::iter::once(&self.config)
            .chain(self.layers.iter())
            .collect()
    }
}

/// Generates an image with random layers of the given sizes.
pub fn make_image(format: Format, layer_sizes: &[usize]) -> Image {
    make_image_for(format, layer_sizes, "amd64")
}

pub fn make_image_for(format: Format, layer_sizes: &[usize], arch: &str) -> Image {
    let layers: Vec<Blob> = layer_sizes.iter().map(|n| Blob::random(*n)).collect();
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|_| format!("sha256:{}", random_hex(32)))
        .collect();
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": {"Env": [format!("NONCE={}", random_hex(8))], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [],
    });
    let config = Blob::new(serde_json::to_vec_pretty(&config).unwrap());
    let (media_type, config_type, layer_type) = match format {
        Format::Oci => (
            MediaType::OciManifest,
            "application/vnd.oci.image.config.v1+json",
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        Format::Docker => (
            MediaType::DockerManifest,
            "application/vnd.docker.container.image.v1+json",
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
        ),
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type.as_str(),
        "config": {"mediaType": config_type, "digest": config.digest, "size": config.len()},
        "layers": layers
            .iter()
            .map(|l| serde_json::json!({"mediaType": layer_type, "digest": l.digest, "size": l.len()}))
            .collect::<Vec<_>>(),
    });
    // Pretty-printed on purpose: the digest is over these exact bytes, so a
    // mirror that re-serialises the JSON gets caught.
    let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap());
    Image {
        config,
        digest: sha256_digest(&manifest),
        layers,
        manifest,
        media_type,
    }
}

/// An OCI 1.1 artifact (a signature, an SBOM) referring to `subject`: an
/// OCI image manifest with `artifactType`, the empty config, one layer of
/// random payload and a `subject` descriptor.
pub fn make_artifact(subject: &Image, artifact_type: &str) -> Image {
    let config = Blob::new(Bytes::from_static(b"{}"));
    let payload = Blob::random(64);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config.digest, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": payload.digest, "size": payload.len()}],
        "subject": {"mediaType": subject.media_type.as_str(), "digest": subject.digest, "size": subject.manifest.len()},
        "annotations": {"org.example.nonce": random_hex(4)},
    });
    let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap());
    Image {
        config,
        digest: sha256_digest(&manifest),
        layers: vec![payload],
        manifest,
        media_type: MediaType::OciManifest,
    }
}

/// A multi-platform index over several images.
#[derive(Clone, Debug)]
pub struct Index {
    pub images: Vec<(Image, String)>,
    pub manifest: Bytes,
    pub digest: String,
    pub media_type: MediaType,
}

/// An OCI index (for `Format::Oci`) or Docker manifest list over
/// `(image, architecture)` pairs.
pub fn make_index(format: Format, images: Vec<(Image, &str)>) -> Index {
    let media_type = match format {
        Format::Oci => MediaType::OciIndex,
        Format::Docker => MediaType::DockerList,
    };
    let entries: Vec<_> = images
        .iter()
        .map(|(img, arch)| {
            serde_json::json!({
                "mediaType": img.media_type.as_str(),
                "digest": img.digest,
                "size": img.manifest.len(),
                "platform": {"architecture": arch, "os": "linux"},
            })
        })
        .collect();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type.as_str(),
        "manifests": entries,
    });
    let manifest = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap());
    Index {
        digest: sha256_digest(&manifest),
        manifest,
        media_type,
        images: images
            .into_iter()
            .map(|(i, a)| (i, a.to_string()))
            .collect(),
    }
}
