//! Operator commands on a cache directory: `stowage cache stats|ls|purge`.
//!
//! They work on the directory of a running or a stopped instance without
//! corrupting it: they only read, or remove whole files (a running instance
//! notices a missing blob on its next request and fetches it again) and
//! append removal records to the journal with `O_APPEND`.
//! A running instance keeps serving manifests and tags it holds in memory
//! until their TTL; access times on disk lag memory by at most the flush
//! interval.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cache::journal::Journal;
use crate::cache::layout::{self, Layout, Record, Scanned};
use crate::config::Config;
use crate::oci::manifest::refs_of;
use crate::oci::{Digest, ImageRef, Reference};

/// One stored blob as seen on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlobFile {
    /// Its digest.
    pub(crate) digest: Digest,
    /// Size in bytes.
    pub(crate) size: u64,
    /// Last access as persisted (the file's mtime).
    pub(crate) last_access: SystemTime,
}

/// Lists every blob in the store of `cache_dir` (anything else found there
/// is left alone).
pub(crate) fn list_blobs(cache_dir: &Path) -> io::Result<Vec<BlobFile>> {
    a_cache_dir(cache_dir)?;
    let mut out = Vec::new();
    Layout::new(cache_dir).scan_blobs(|entry| {
        if let Scanned::Blob(digest, file) = entry
            && let Ok(meta) = file.metadata()
        {
            out.push(BlobFile {
                digest,
                size: meta.len(),
                last_access: meta.modified().unwrap_or(UNIX_EPOCH),
            });
        }
    });
    Ok(out)
}

/// Summary of a cache directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stats {
    /// Blobs stored.
    pub(crate) blobs: usize,
    /// Their total size.
    pub(crate) bytes: u64,
    /// The configured budget, if known.
    pub(crate) budget: Option<u64>,
    /// Oldest last access among the blobs.
    pub(crate) oldest_access: Option<SystemTime>,
    /// Newest last access among the blobs.
    pub(crate) newest_access: Option<SystemTime>,
    /// Fills in progress (temporary files).
    pub(crate) fills_in_progress: usize,
    /// Manifests stored.
    pub(crate) manifests: usize,
    /// Tags recorded.
    pub(crate) tags: usize,
}

/// An error unless `dir` is a directory (a mistyped `--cache-dir` is not
/// an empty cache).
fn a_cache_dir(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} is not a cache directory", dir.display()),
    ))
}

/// Computes [`Stats`] for `cache_dir`.
pub(crate) fn stats(cache_dir: &Path, budget: Option<u64>) -> io::Result<Stats> {
    a_cache_dir(cache_dir)?;
    let blobs = list_blobs(cache_dir)?;
    let layout = Layout::new(cache_dir);
    Ok(Stats {
        blobs: blobs.len(),
        bytes: blobs.iter().map(|b| b.size).sum(),
        budget,
        oldest_access: blobs.iter().map(|b| b.last_access).min(),
        newest_access: blobs.iter().map(|b| b.last_access).max(),
        fills_in_progress: count_fills(&layout.tmp()),
        manifests: count_files(&layout.manifests()),
        tags: count_tags(&layout.tags()),
    })
}

/// The fills' files in `tmp/`: not the dot-files of small files being
/// replaced or of the readiness probe.
fn count_fills(tmp: &Path) -> usize {
    std::fs::read_dir(tmp)
        .map(|rd| {
            rd.flatten()
                .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                .count()
        })
        .unwrap_or(0)
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => count_files(&e.path()),
            Ok(_) => 1,
            Err(_) => 0,
        })
        .sum()
}

fn count_tags(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.file_name() == layout::TAG_DIR {
                count_files(&e.path())
            } else if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                count_tags(&e.path())
            } else {
                0
            }
        })
        .sum()
}

/// Bytes in binary units, for people.
pub(crate) fn human_bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).display().iec().to_string()
}

/// How long ago `t` was, for people.
pub(crate) fn ago(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    humantime::format_duration(Duration::from_secs(secs)).to_string() + " ago"
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "blobs:           {}", self.blobs)?;
        match self.budget {
            Some(b) if b > 0 => writeln!(
                f,
                "usage:           {} of {} ({:.1}%)",
                human_bytes(self.bytes),
                human_bytes(b),
                self.bytes as f64 * 100.0 / b as f64
            )?,
            _ => writeln!(f, "usage:           {}", human_bytes(self.bytes))?,
        }
        if let Some(t) = self.oldest_access {
            writeln!(f, "oldest access:   {}", ago(t))?;
        }
        if let Some(t) = self.newest_access {
            writeln!(f, "newest access:   {}", ago(t))?;
        }
        writeln!(f, "fills running:   {}", self.fills_in_progress)?;
        writeln!(f, "manifests:       {}", self.manifests)?;
        write!(f, "tags:            {}", self.tags)
    }
}

/// What `purge` removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Purged {
    /// Blobs removed.
    pub(crate) blobs: usize,
    /// Bytes freed.
    pub(crate) bytes: u64,
    /// Manifests removed.
    pub(crate) manifests: usize,
    /// Tags removed.
    pub(crate) tags: usize,
    /// Manifests and blobs left because other tags, repositories or pins
    /// still use them.
    pub(crate) shared: usize,
}

/// Removes a blob (or manifest) by digest, or everything cached for a
/// repository: its tags, the manifests they point at (and, for indexes,
/// their platform manifests) and those manifests' blobs, except what
/// other tags, referrers records and pins still reach. A repository
/// without a host is the default upstream's; upstreams with
/// `library_prefix` get `library/` added to one-component names, as when
/// serving.
pub(crate) fn purge(config: &Config, target: &str) -> io::Result<Purged> {
    let layout = Layout::new(&config.cache_dir);
    let mut purged = Purged::default();
    let removed = remove_target(config, &layout, target, &mut purged);
    // A purge that failed part-way has removed files all the same.
    if purged != Purged::default() {
        let told = tell_a_running_instance(&layout);
        removed?;
        told?;
    } else {
        removed?;
    }
    Ok(purged)
}

/// Replaces `<cache>/purged`, which a running instance watches (a new
/// file each purge). Readable by all: the instance may run as another
/// user than the operator's command (`sudo stowage cache purge`).
fn tell_a_running_instance(layout: &Layout) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let text = format!("{} {nanos}\n", std::process::id());
    let path = layout.purged();
    layout::replace_file(&layout.tmp(), &path, text.as_bytes())?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
}

fn remove_target(
    config: &Config,
    layout: &Layout,
    target: &str,
    purged: &mut Purged,
) -> io::Result<()> {
    a_cache_dir(layout.dir())?;
    match Digest::parse(target) {
        Ok(digest) => {
            remove_blob(layout, &digest, purged)?;
            remove_manifest(layout, &digest, purged)?;
            return Ok(());
        }
        // Meant as a digest (a short id, upper-case hex), not as the
        // repository `library/sha256` with a tag.
        Err(e) if looks_like_a_digest(target) => {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, e.message));
        }
        Err(_) => {}
    }
    let image = ImageRef::parse(target)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.message))?;
    let upstream = match &image.host {
        Some(h) => config
            .upstreams
            .iter()
            .find(|u| crate::upstream::config::same_host(&u.host, h)),
        None => config.upstreams.first(),
    }
    .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no upstream for that host"))?;
    let tags_dir = layout.tag_dir(&upstream.host, image.repo.as_str(), upstream.library_prefix);
    // A bare repository purges all its tags; `repo:tag` only that tag;
    // `repo@digest` that manifest, no tag.
    let whole_repo = match &image.reference {
        Reference::Digest(_) => false,
        Reference::Tag(_) => target.rsplit_once(':').is_none_or(|(_, t)| t.contains('/')),
    };
    let tag_files: Vec<PathBuf> = match &image.reference {
        _ if whole_repo => std::fs::read_dir(&tags_dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default(),
        Reference::Tag(t) => layout.tag_files(
            &upstream.host,
            image.repo.as_str(),
            upstream.library_prefix,
            t,
        ),
        Reference::Digest(_) => Vec::new(),
    };
    let mut roots: Vec<Digest> = Vec::new();
    if let Reference::Digest(d) = &image.reference {
        roots.push(d.clone());
    }
    if whole_repo {
        // A whole repository: its referrers answers too (the indexes kept
        // for them list the repository's signatures and SBOMs).
        let mut dir = tags_dir.clone();
        dir.set_file_name(layout::REFERRERS_DIR);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Some((d, _)) = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| layout::decode_referrers(&t))
            {
                roots.push(d);
            }
            std::fs::remove_file(e.path())?;
        }
    }
    for f in tag_files {
        if let Ok(text) = std::fs::read_to_string(&f) {
            if let Some(d) = layout::decode_tag(&text) {
                roots.push(d);
            }
            std::fs::remove_file(&f)?;
            purged.tags += 1;
        }
    }
    // The store is shared by digest: what the tags, referrers records and
    // pins left still reach stays (a base layer, the same image under
    // another tag or repository).
    // A manifest named by digest goes even if tags still point at it.
    let named: HashSet<Digest> = match &image.reference {
        Reference::Digest(d) => HashSet::from([d.clone()]),
        Reference::Tag(_) => HashSet::new(),
    };
    let used = still_used(layout, &named);
    let mut seen = HashSet::new();
    let mut kept = HashSet::new();
    while let Some(m) = roots.pop() {
        if !seen.insert(m.clone()) {
            continue;
        }
        if used.contains(&m) {
            purged.shared += usize::from(kept.insert(m));
            continue;
        }
        if let Some(body) = read_manifest_body(layout, &m) {
            let refs = refs_of(&body);
            roots.extend(refs.manifests);
            for b in refs.blobs {
                if used.contains(&b) {
                    purged.shared += usize::from(kept.insert(b));
                } else {
                    remove_blob(layout, &b, purged)?;
                }
            }
        }
        remove_manifest(layout, &m, purged)?;
    }
    Ok(())
}

/// Every manifest and blob reachable from the tag files and referrers
/// records in the cache (but not through the manifests in `except`), and
/// the pinned blobs.
fn still_used(layout: &Layout, except: &HashSet<Digest>) -> HashSet<Digest> {
    let mut roots = Vec::new();
    records(&layout.tags(), &mut roots);
    roots.retain(|d| !except.contains(d));
    let mut used: HashSet<Digest> = std::fs::read_to_string(layout.pins())
        .map(|t| layout::decode_pins(&t).into_values().flatten().collect())
        .unwrap_or_default();
    while let Some(m) = roots.pop() {
        if except.contains(&m) || !used.insert(m.clone()) {
            continue;
        }
        if let Some(body) = read_manifest_body(layout, &m) {
            let refs = refs_of(&body);
            roots.extend(refs.manifests);
            used.extend(refs.blobs);
        }
    }
    used
}

/// The digests the tag files and referrers records under `dir` name.
fn records(dir: &Path, out: &mut Vec<Digest>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let path = e.path();
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            records(&path, out);
            continue;
        }
        let in_dir = |name: &str| dir.file_name().is_some_and(|n| n == name);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let named = if in_dir(layout::TAG_DIR) {
            layout::decode_tag(&text)
        } else if in_dir(layout::REFERRERS_DIR) {
            layout::decode_referrers(&text).map(|(d, _)| d)
        } else {
            None
        };
        out.extend(named);
    }
}

/// `<algorithm>:<anything>` with a known algorithm and no `/`.
fn looks_like_a_digest(target: &str) -> bool {
    target.split_once(':').is_some_and(|(alg, rest)| {
        matches!(
            alg.to_ascii_lowercase().as_str(),
            "sha256" | "sha384" | "sha512"
        ) && !rest.contains('/')
    })
}

fn read_manifest_body(layout: &Layout, digest: &Digest) -> Option<bytes::Bytes> {
    let data = std::fs::read(layout.manifest(digest)).ok()?;
    layout::decode_manifest(data.into()).map(|(_, body)| body)
}

fn remove_manifest(layout: &Layout, digest: &Digest, purged: &mut Purged) -> io::Result<()> {
    match std::fs::remove_file(layout.manifest(digest)) {
        Ok(()) => {
            purged.manifests += 1;
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn remove_blob(layout: &Layout, digest: &Digest, purged: &mut Purged) -> io::Result<()> {
    let path = layout.blob(digest);
    let size = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    std::fs::remove_file(&path)?;
    // Best effort: a running instance notices the missing file anyway.
    let _ = Journal::append_if_exists(&layout.journal(), &Record::Removed(digest.clone()));
    purged.blobs += 1;
    purged.bytes += size;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use crate::oci::manifest::AcceptClass;

    fn put_blob(cache: &Path, data: &[u8]) -> Digest {
        let d = Digest::of(Algorithm::Sha256, data);
        let p = Layout::new(cache).blob(&d);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
        d
    }

    fn put_manifest(cache: &Path, body: &str) -> Digest {
        let d = Digest::of(Algorithm::Sha256, body.as_bytes());
        let p = Layout::new(cache).manifest(&d);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(
            p,
            layout::encode_manifest(
                "application/vnd.oci.image.manifest.v1+json",
                body.as_bytes(),
            ),
        )
        .unwrap();
        d
    }

    #[test]
    fn stats_and_purge_by_digest_and_repository() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path();
        let config = put_blob(cache, b"config");
        let layer = put_blob(cache, b"layer-bytes");
        let other = put_blob(cache, b"unrelated");
        let manifest = put_manifest(
            cache,
            &format!(r#"{{"config":{{"digest":"{config}"}},"layers":[{{"digest":"{layer}"}}]}}"#),
        );
        let tag = Layout::new(cache).tag(
            "docker.io",
            "app",
            true,
            &crate::oci::Tag::parse("1.0").unwrap(),
            AcceptClass::ALL,
        );
        assert!(tag.ends_with("tags/docker.io/library/app/_tags/1.0"));
        std::fs::create_dir_all(tag.parent().unwrap()).unwrap();
        std::fs::write(&tag, layout::encode_tag(&manifest)).unwrap();
        // The same tag as a schema-2-only client was answered.
        std::fs::write(tag.with_file_name("1.0@v2"), layout::encode_tag(&manifest)).unwrap();

        // A fill in progress, a small file being replaced and the
        // readiness probe's file: one fill.
        let layout = Layout::new(cache);
        std::fs::create_dir_all(layout.tmp()).unwrap();
        std::fs::write(layout.tmp_file(&other, 1), b"unr").unwrap();
        std::fs::write(layout.tmp().join(".replaceAbC123"), b"x").unwrap();
        std::fs::write(layout.tmp().join(".readyz-1"), b"x").unwrap();

        let s = stats(cache, Some(1000)).unwrap();
        assert_eq!(
            (s.blobs, s.bytes, s.manifests, s.tags, s.fills_in_progress),
            (3, 6 + 11 + 9, 1, 2, 1)
        );
        assert!(s.to_string().contains("of 1000 B"), "{s}");

        let config = Config {
            cache_dir: cache.to_path_buf(),
            ..Config::default()
        };
        let p = purge(&config, &other.to_string()).unwrap();
        assert_eq!((p.blobs, p.bytes), (1, 9));
        let p = purge(&config, "docker.io/library/nothing").unwrap();
        assert_eq!(p, Purged::default());
        // "app" on Docker Hub is library/app; a tag goes in every class.
        let p = purge(&config, "app:1.0").unwrap();
        assert_eq!(
            p,
            Purged {
                blobs: 2,
                bytes: 17,
                manifests: 1,
                tags: 2,
                shared: 0
            }
        );
        assert_eq!(list_blobs(cache).unwrap(), vec![]);
        // A repository's referrers answers go with the repository.
        let answer = put_manifest(cache, r#"{"manifests":[]}"#);
        let subject = Digest::of(crate::oci::Algorithm::Sha256, b"subject");
        let record = Layout::new(cache).referrers("docker.io", "app", true, &subject, None);
        std::fs::create_dir_all(record.parent().unwrap()).unwrap();
        std::fs::write(&record, layout::encode_referrers(&answer, false)).unwrap();
        let p = purge(&config, "app").unwrap();
        assert_eq!(p.manifests, 1);
        assert!(!record.exists());
        assert!(stats(&cache.join("nope"), None).is_err());
    }
}
