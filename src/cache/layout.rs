//! The on-disk layout of a cache directory: every path and every file
//! format, in this one place. The server (`index.rs`, `blob/`,
//! `manifests.rs`) and the operator commands (`cli/ops.rs`) both go through
//! it, so they cannot drift apart.
//!
//! ```text
//! <cache>/blobs/<alg>/<hex[..2]>/<hex>    verified blobs, content-addressed
//! <cache>/tmp/<hex>-<pid>-<n>             fills in progress (emptied at start-up)
//! <cache>/tmp/.replace*                   a small file being replaced (below)
//! <cache>/index.log                       journal: `+<digest> <size>`, `-<digest>`
//! <cache>/private.log                     digests fetched only through passthrough
//!                                         upstreams: `+<digest>`, `-<digest>` (public now)
//! <cache>/lock                            flock of the running instance, its pid inside
//! <cache>/pins                            the blobs each pinned image last resolved to:
//!                                         `<image> <digest>` lines
//! <cache>/scrub                           the slice of the blob store (two hex digits)
//!                                         the scrubber's pass goes on with after a restart
//! <cache>/purged                          rewritten by each `stowage cache purge`: a
//!                                         running instance seeing it change re-checks
//!                                         what it holds against the disk
//! <cache>/manifests/<alg>/<hex>           first line the media type, then the exact bytes
//! <cache>/tags/<host>/<repo>/_referrers/<alg>-<hex>[@<filter hash>]
//!                                         a referrers answer: its body's digest, and
//!                                         whether upstream applied the filter
//! <cache>/tags/<host>/<repo>/_tags/<tag>[@<class>]
//!                                         the digest a tag pointed at for an accept
//!                                         class (none: all four types), and a newline
//! ```
//!
//! Every path is built from validated types (`Digest`, `RepoName`, `Tag`,
//! configured host names), never from raw request text. `_tags` cannot be a
//! repository component (components start with `[a-z0-9]`), so tag files
//! never collide with nested repositories.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::oci::manifest::AcceptClass;
use crate::oci::{Algorithm, Digest, Tag, library_prefixed};

/// The name of the directory holding a repository's tag files.
pub(crate) const TAG_DIR: &str = "_tags";

/// The name of the directory holding a repository's referrers records
/// (beside `_tags`; `_` cannot start a repository component either).
pub(crate) const REFERRERS_DIR: &str = "_referrers";

/// The paths of one cache directory.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// The layout of the cache at `dir`.
    pub(crate) fn new(dir: &Path) -> Layout {
        Layout {
            dir: dir.to_path_buf(),
        }
    }

    /// The cache directory itself.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// `<cache>/lock`: held (`flock`) by the running instance, which wrote
    /// its pid into it.
    pub(crate) fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }

    /// `<cache>/blobs`: verified blobs.
    pub(crate) fn blobs(&self) -> PathBuf {
        self.dir.join("blobs")
    }

    /// `<cache>/tmp`: files of fills in progress, and of small files
    /// being replaced ([`replace_file`]). Emptied at start-up.
    pub(crate) fn tmp(&self) -> PathBuf {
        self.dir.join("tmp")
    }

    /// `<cache>/index.log`: the blob journal.
    pub(crate) fn journal(&self) -> PathBuf {
        self.dir.join("index.log")
    }

    /// `<cache>/private.log`: marks of private content (`cache/private.rs`).
    pub(crate) fn private_log(&self) -> PathBuf {
        self.dir.join("private.log")
    }

    /// `<cache>/purged`: changed by each purge (`cli/ops.rs`), watched by
    /// a running instance (`server.rs`).
    pub(crate) fn purged(&self) -> PathBuf {
        self.dir.join("purged")
    }

    /// `<cache>/scrub`: where the scrubber's pass goes on after a restart
    /// (`blob/scrub.rs`).
    pub(crate) fn scrub_cursor(&self) -> PathBuf {
        self.dir.join("scrub")
    }

    /// `<cache>/pins`: the pinned blobs, per image (`cache/pins.rs`).
    pub(crate) fn pins(&self) -> PathBuf {
        self.dir.join("pins")
    }

    /// `<cache>/manifests`.
    pub(crate) fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// `<cache>/tags`.
    pub(crate) fn tags(&self) -> PathBuf {
        self.dir.join("tags")
    }

    /// Where a verified blob lives: `blobs/<alg>/<hex[..2]>/<hex>`.
    pub(crate) fn blob(&self, digest: &Digest) -> PathBuf {
        self.blobs()
            .join(digest.algorithm().as_str())
            .join(&digest.hex()[..2])
            .join(digest.hex())
    }

    /// The temporary file of a fill: `tmp/<hex>-<pid>-<n>`, unique per
    /// process and `n`.
    pub(crate) fn tmp_file(&self, digest: &Digest, n: u64) -> PathBuf {
        self.tmp()
            .join(format!("{}-{}-{n}", digest.hex(), std::process::id()))
    }

    /// Where a manifest lives: `manifests/<alg>/<hex>`.
    pub(crate) fn manifest(&self, digest: &Digest) -> PathBuf {
        self.manifests()
            .join(digest.algorithm().as_str())
            .join(digest.hex())
    }

    /// The directory of a repository's tag files:
    /// `tags/<host>/<repo>/_tags`, with Docker Hub's `library/` added to a
    /// one-component `repo` when the upstream has `library_prefix`.
    pub(crate) fn tag_dir(&self, host: &str, repo: &str, library_prefix: bool) -> PathBuf {
        let mut p = self.tags().join(host);
        for c in library_prefixed(repo, library_prefix).split('/') {
            p.push(c);
        }
        p.push(TAG_DIR);
        p
    }

    /// The file of one tag as one accept class was answered:
    /// `tags/<host>/<repo>/_tags/<tag>` for clients accepting all four
    /// manifest types (the file name caches written before accept classes
    /// existed already use), `…/_tags/<tag>@<class>` for the others
    /// (`latest@v2`, `latest@oci+index`; `@` and `+` cannot be part of a
    /// tag, so no tag's file collides with another's).
    pub(crate) fn tag(
        &self,
        host: &str,
        repo: &str,
        library_prefix: bool,
        tag: &Tag,
        class: AcceptClass,
    ) -> PathBuf {
        let dir = self.tag_dir(host, repo, library_prefix);
        if class == AcceptClass::ALL {
            dir.join(tag.as_str())
        } else {
            dir.join(format!("{tag}@{}", class.name()))
        }
    }

    /// The record of a referrers answer: what upstream's OCI referrers API
    /// answered for `subject` in a repository, with an `artifactType`
    /// filter or without: `tags/<host>/<repo>/_referrers/<alg>-<hex>`, and
    /// `…@<first 16 hex digits of the filter's sha256>` when filtered (a
    /// filter is a media type, not a file name).
    pub(crate) fn referrers(
        &self,
        host: &str,
        repo: &str,
        library_prefix: bool,
        subject: &Digest,
        filter: Option<&str>,
    ) -> PathBuf {
        let mut dir = self.tag_dir(host, repo, library_prefix);
        dir.set_file_name(REFERRERS_DIR);
        let name = format!("{}-{}", subject.algorithm().as_str(), subject.hex());
        match filter {
            None => dir.join(name),
            Some(f) => {
                let h = Digest::of(Algorithm::Sha256, f.as_bytes());
                dir.join(format!("{name}@{}", &h.hex()[..16]))
            }
        }
    }

    /// Every file of one tag (all accept classes) that exists.
    pub(crate) fn tag_files(
        &self,
        host: &str,
        repo: &str,
        library_prefix: bool,
        tag: &Tag,
    ) -> Vec<PathBuf> {
        let prefix = format!("{tag}@");
        std::fs::read_dir(self.tag_dir(host, repo, library_prefix))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| {
                        let name = e.file_name();
                        let name = name.to_string_lossy();
                        name == tag.as_str() || name.starts_with(&prefix)
                    })
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Visits every entry of the blob store: blobs with the digest their
    /// path names, and anything else found there (a stray file or
    /// directory, with why it does not belong).
    pub(crate) fn scan_blobs(&self, mut visit: impl FnMut(Scanned)) {
        for alg in [Algorithm::Sha256, Algorithm::Sha512] {
            let Ok(prefixes) = std::fs::read_dir(self.blobs().join(alg.as_str())) else {
                continue;
            };
            for prefix in prefixes.flatten() {
                let prefix_path = prefix.path();
                let prefix_name = prefix.file_name().to_string_lossy().into_owned();
                if !prefix.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    visit(Scanned::Stray(prefix_path, "not a blob directory"));
                    continue;
                }
                let Ok(files) = std::fs::read_dir(&prefix_path) else {
                    continue;
                };
                for file in files.flatten() {
                    let name = file.file_name().to_string_lossy().into_owned();
                    match Digest::parse(&format!("{}:{name}", alg.as_str())) {
                        Ok(d) if name.starts_with(&prefix_name) && prefix_name.len() == 2 => {
                            visit(Scanned::Blob(d, file))
                        }
                        _ => visit(Scanned::Stray(file.path(), "name is not a valid digest")),
                    }
                }
            }
        }
    }
}

/// One entry found by [`Layout::scan_blobs`].
#[derive(Debug)]
pub(crate) enum Scanned {
    /// A file (or whatever else) named like a blob.
    Blob(Digest, std::fs::DirEntry),
    /// Something that does not belong in the store, and why.
    Stray(PathBuf, &'static str),
}

/// A manifest file: the media type, a newline, the exact manifest bytes.
pub(crate) fn encode_manifest(media_type: &str, body: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(media_type.len() + 1 + body.len());
    data.extend_from_slice(media_type.as_bytes());
    data.push(b'\n');
    data.extend_from_slice(body);
    data
}

/// The media type and body of a manifest file, or `None` when it has no
/// first line.
pub(crate) fn decode_manifest(data: Bytes) -> Option<(String, Bytes)> {
    let nl = data.iter().position(|b| *b == b'\n')?;
    let media_type = String::from_utf8_lossy(&data[..nl]).into_owned();
    Some((media_type, data.slice(nl + 1..)))
}

/// A tag file: the digest and a newline.
pub(crate) fn encode_tag(digest: &Digest) -> Vec<u8> {
    format!("{digest}\n").into_bytes()
}

/// The digest in a tag file.
pub(crate) fn decode_tag(text: &str) -> Option<Digest> {
    Digest::parse(text.trim()).ok()
}

/// The pins file: a line `<image> <digest>` for each blob of each pinned
/// image (an image reference holds no space), sorted.
pub(crate) fn encode_pins<'a>(
    pins: impl Iterator<Item = (&'a str, &'a std::collections::HashSet<Digest>)>,
) -> Vec<u8> {
    let mut lines: Vec<String> = pins
        .flat_map(|(image, blobs)| blobs.iter().map(move |d| format!("{image} {d}\n")))
        .collect();
    lines.sort_unstable();
    lines.concat().into_bytes()
}

/// The blobs of each image in a pins file; lines that do not parse are
/// skipped.
pub(crate) fn decode_pins(
    text: &str,
) -> std::collections::HashMap<String, std::collections::HashSet<Digest>> {
    let mut pins = std::collections::HashMap::<_, std::collections::HashSet<_>>::new();
    for line in text.lines() {
        if let Some((image, digest)) = line.split_once(' ')
            && let Ok(d) = Digest::parse(digest)
        {
            pins.entry(image.to_string()).or_default().insert(d);
        }
    }
    pins
}

/// The scrubber's cursor: the next slice of the blob store (the first two
/// hex digits of a digest), and a newline.
pub(crate) fn encode_scrub_cursor(slice: u8) -> Vec<u8> {
    format!("{slice:02x}\n").into_bytes()
}

/// The slice an [`encode_scrub_cursor`] text names; `None` for anything
/// else (a file cut short by a crash).
pub(crate) fn decode_scrub_cursor(text: &str) -> Option<u8> {
    let hex = text.strip_suffix('\n')?;
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// A referrers record: the digest of the answer's body (kept as a
/// manifest), a newline, and `artifactType` and a newline when upstream
/// applied the filter (`OCI-Filters-Applied`).
pub(crate) fn encode_referrers(body: &Digest, filters_applied: bool) -> Vec<u8> {
    if filters_applied {
        format!("{body}\nartifactType\n").into_bytes()
    } else {
        format!("{body}\n").into_bytes()
    }
}

/// The body digest and whether filters were applied, of a referrers
/// record.
pub(crate) fn decode_referrers(text: &str) -> Option<(Digest, bool)> {
    let mut lines = text.lines();
    let digest = Digest::parse(lines.next()?.trim()).ok()?;
    Some((digest, lines.next().map(str::trim) == Some("artifactType")))
}

/// One line of the blob journal (`index.log`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Record {
    /// `+<digest> <size>`: stored, written before the commit's rename.
    Stored(Digest, u64),
    /// `-<digest>`: removed.
    Removed(Digest),
}

impl Record {
    /// The line, newline included.
    pub(crate) fn line(&self) -> String {
        match self {
            Record::Stored(d, size) => format!("+{d} {size}\n"),
            Record::Removed(d) => format!("-{d}\n"),
        }
    }

    /// Parses a line (without its newline); `None` for anything else (a
    /// torn last line after a crash).
    pub(crate) fn parse(line: &str) -> Option<Record> {
        if let Some(rest) = line.strip_prefix('+') {
            let (d, s) = rest.split_once(' ')?;
            Some(Record::Stored(Digest::parse(d).ok()?, s.parse().ok()?))
        } else {
            Some(Record::Removed(
                Digest::parse(line.strip_prefix('-')?).ok()?,
            ))
        }
    }
}

/// One line of `private.log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PrivateRecord {
    /// `+<digest>`: fetched through a passthrough upstream only.
    Private(Digest),
    /// `-<digest>`: a mirror-mode upstream has it too.
    Public(Digest),
}

impl PrivateRecord {
    /// The line, newline included.
    pub(crate) fn line(&self) -> String {
        match self {
            PrivateRecord::Private(d) => format!("+{d}\n"),
            PrivateRecord::Public(d) => format!("-{d}\n"),
        }
    }

    /// Parses a line (without its newline); `None` for anything else.
    pub(crate) fn parse(line: &str) -> Option<PrivateRecord> {
        if let Some(d) = line.strip_prefix('+') {
            Some(PrivateRecord::Private(Digest::parse(d).ok()?))
        } else {
            Some(PrivateRecord::Public(
                Digest::parse(line.strip_prefix('-')?).ok()?,
            ))
        }
    }
}

/// Replaces the file at `path` with `data`, so that readers (and a crash)
/// see the old or the new content, never a torn one: written to a
/// temporary file in `tmp` (the cache's `tmp/`, same file system), fsynced,
/// renamed over `path`, and the directory of `path` synced (best effort:
/// some file systems refuse it, and the rename has happened either way).
/// The temporary file is in `tmp` rather than beside `path` because
/// start-up empties `tmp`: one left by a kill -9 is removed there, where
/// beside a tag or manifest it would stay for good. Blocking.
pub(crate) fn replace_file(tmp: &Path, path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("no parent directory"))?;
    std::fs::create_dir_all(dir)?;
    std::fs::create_dir_all(tmp)?;
    let mut file = tempfile::Builder::new()
        .prefix(".replace")
        .tempfile_in(tmp)?;
    file.write_all(data)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    if let Err(e) = std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        tracing::debug!(dir = %dir.display(), error = %e, "cannot sync the directory of a replaced file");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_round_trip() {
        let d = |b: &[u8]| Digest::of(Algorithm::Sha256, b);
        let mut pins = std::collections::HashMap::new();
        pins.insert(
            "docker.io/library/a:1".to_string(),
            [d(b"x"), d(b"y")].into_iter().collect(),
        );
        pins.insert(
            "ghcr.io/b/c@".to_string() + &d(b"c").to_string(),
            [d(b"z")].into_iter().collect(),
        );
        let text = encode_pins(pins.iter().map(|(i, b)| (i.as_str(), b)));
        let text = String::from_utf8(text).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert_eq!(decode_pins(&text), pins);
        let damaged = format!("{text}junk\nimage sha256:zz\n");
        assert_eq!(decode_pins(&damaged), pins);
    }

    #[test]
    fn paths() {
        let l = Layout::new(Path::new("/c"));
        let d = Digest::of(Algorithm::Sha256, b"");
        let hex = d.hex();
        assert_eq!(
            l.blob(&d),
            PathBuf::from(format!("/c/blobs/sha256/{}/{hex}", &hex[..2]))
        );
        assert_eq!(
            l.manifest(&d),
            PathBuf::from(format!("/c/manifests/sha256/{hex}"))
        );
        let t = Tag::parse("1.0").unwrap();
        assert_eq!(
            l.tag("docker.io", "app", true, &t, AcceptClass::ALL),
            PathBuf::from("/c/tags/docker.io/library/app/_tags/1.0")
        );
        assert_eq!(
            l.tag("ghcr.io", "app", false, &t, AcceptClass::ALL),
            PathBuf::from("/c/tags/ghcr.io/app/_tags/1.0")
        );
        let v2 = AcceptClass::of(&[crate::oci::manifest::DOCKER_MANIFEST]);
        assert_eq!(
            l.tag("ghcr.io", "app", false, &t, v2),
            PathBuf::from("/c/tags/ghcr.io/app/_tags/1.0@v2")
        );
        assert!(
            l.tmp_file(&d, 7)
                .to_string_lossy()
                .ends_with(&format!("{hex}-{}-7", std::process::id()))
        );
        assert_eq!(l.journal(), PathBuf::from("/c/index.log"));
        assert_eq!(l.private_log(), PathBuf::from("/c/private.log"));
    }

    #[test]
    fn formats() {
        let data = encode_manifest("application/x", b"{}\n");
        assert_eq!(
            decode_manifest(Bytes::from(data)),
            Some(("application/x".to_string(), Bytes::from_static(b"{}\n")))
        );
        assert_eq!(decode_manifest(Bytes::from_static(b"no newline")), None);
        let d = Digest::of(Algorithm::Sha256, b"x");
        assert_eq!(
            decode_tag(std::str::from_utf8(&encode_tag(&d)).unwrap()),
            Some(d.clone())
        );
        for r in [Record::Stored(d.clone(), 42), Record::Removed(d.clone())] {
            assert_eq!(Record::parse(r.line().trim_end()), Some(r));
        }
        for r in [
            PrivateRecord::Private(d.clone()),
            PrivateRecord::Public(d.clone()),
        ] {
            assert_eq!(PrivateRecord::parse(r.line().trim_end()), Some(r));
        }
        assert_eq!(PrivateRecord::parse("+sha256:abc"), None);
        for slice in [0u8, 0x7f, 0xff] {
            let text = String::from_utf8(encode_scrub_cursor(slice)).unwrap();
            assert_eq!(decode_scrub_cursor(&text), Some(slice));
        }
        for cut in ["", "a", "0a", "+a\n", "100\n", "zz\n"] {
            assert_eq!(decode_scrub_cursor(cut), None, "{cut:?}");
        }
        for applied in [false, true] {
            let text = String::from_utf8(encode_referrers(&d, applied)).unwrap();
            assert_eq!(decode_referrers(&text), Some((d.clone(), applied)));
        }
        let l = Layout::new(Path::new("/c"));
        let r = l.referrers("ghcr.io", "a/b", false, &d, None);
        assert_eq!(
            r,
            PathBuf::from(format!("/c/tags/ghcr.io/a/b/_referrers/sha256-{}", d.hex()))
        );
        let f = l.referrers("ghcr.io", "a/b", false, &d, Some("application/x+json"));
        assert!(
            f.to_string_lossy()
                .contains(&format!("sha256-{}@", d.hex()))
        );
        assert_ne!(f, l.referrers("ghcr.io", "a/b", false, &d, Some("y")));
        assert_eq!(Record::parse("+sha256:abc 1"), None);
        assert_eq!(Record::parse(&format!("+{d} x")), None);
        assert_eq!(Record::parse("garbage"), None);
    }
}
