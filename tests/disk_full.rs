//! A full cache filesystem (issue 11, item 4), for real: a small tmpfs
//! mounted as the cache directory and filled up. Verified manifests are
//! served without being stored, a moved tag falls back to its stale
//! manifest, blobs stream without caching; once space is back, everything
//! is cached again.
//!
//! Mounting needs root, which CI has: if the mount fails the test fails
//! (it is never skipped).

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use tempfile::TempDir;

const MIB: usize = 1 << 20;

/// A tmpfs mounted on a fresh directory; lazily unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        let out = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .expect("running mount(8)");
        assert!(
            out.status.success(),
            "cannot mount a tmpfs on {} (this test needs root, as CI has): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            path: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// Writes a file until the filesystem is full (ENOSPC); returns its path.
fn fill_up(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    // Down to the last byte.
    while f.write(&[0u8]).is_ok_and(|n| n == 1) {}
    let probe = std::fs::write(dir.join("probe"), b"x");
    assert!(probe.is_err(), "the tmpfs still takes writes");
    path
}

/// Waits for the fills running (prefetches a manifest started) to end: a
/// fill that fails once the disk is full frees its pages, and a write the
/// test expects to fail would find room.
async fn fills_done(st: &Stowage) {
    let hooks = st.hooks.clone();
    within(10, "fills done", async {
        while hooks.fills_in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_disk_still_serves_verified_content() {
    let dir = TempDir::new().unwrap();
    let mount = Tmpfs::mount(dir.path(), "8m");
    let cache = dir.path().to_path_buf();

    let up = FakeUpstream::start().await;
    let old = make_image(Format::Oci, &[1000]);
    let new = make_image(Format::Oci, &[MIB]);
    let other = make_image(Format::Docker, &[2000]);
    up.push_image("library/app", "1", &old);
    up.push_image_untagged("library/app", &new);
    up.push_image("library/app", "other", &other);
    let st = start_stowage_in(dir, &up.url(), "tag_ttl = \"400ms\"").await;
    let c = client();

    // With room: the tag is cached, on disk.
    check_manifest(&c, &st, "app", "1", &old.manifest, OCI_MANIFEST).await;
    assert!(stowage::test_hooks::manifest_path(&cache, &old.digest).exists());

    fills_done(&st).await;
    let filler = fill_up(&cache);

    // An uncached manifest, by digest: verified, served, not stored.
    let (h, body) = get_ok(&c, &st.manifest_url("app", &new.digest)).await;
    assert_eq!(body, new.manifest, "manifest by digest on a full disk");
    assert_eq!(h.get("x-stowage-cache").unwrap(), "miss");
    assert!(!stowage::test_hooks::manifest_path(&cache, &new.digest).exists());
    // An uncached tag: served too (twice: the second from memory).
    for _ in 0..2 {
        check_manifest(&c, &st, "app", "other", &other.manifest, DOCKER_MANIFEST).await;
    }
    // A moved tag whose new manifest cannot be stored: the stale one.
    up.set_tag("library/app", "1", &new.digest);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = c.get(st.manifest_url("app", "1")).send().await.unwrap();
    assert_eq!(r.status(), 200, "moved tag on a full disk");
    assert_eq!(header(&r, "x-stowage-cache").as_deref(), Some("stale"));
    assert_eq!(r.bytes().await.unwrap(), old.manifest);
    // Referrers of the old image, not cached yet: served too.
    let sig = make_artifact(&old, "application/vnd.dev.cosign.artifact.sig.v1+json");
    up.push_image_untagged("library/app", &sig);
    let (_, body) = get_ok(&c, &st.v2(&format!("app/referrers/{}", old.digest))).await;
    let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        index["manifests"][0]["digest"],
        sig.digest.as_str(),
        "{index}"
    );
    // Blobs stream without caching (the write fails at once).
    let layer = &new.layers[0];
    let (_, body) = get_ok(&c, &st.blob_url("app", &layer.digest)).await;
    assert_eq!(sha256_digest(&body), layer.digest);
    assert!(!stowage::test_hooks::blob_path(&cache, &layer.digest).exists());

    // Space is back: the tag moves, the manifest and blobs are stored.
    std::fs::remove_file(&filler).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    check_manifest(&c, &st, "app", "1", &new.manifest, OCI_MANIFEST).await;
    assert!(stowage::test_hooks::manifest_path(&cache, &new.digest).exists());
    let (_, body) = get_ok(&c, &st.blob_url("app", &layer.digest)).await;
    assert_eq!(sha256_digest(&body), layer.digest);
    let hooks = st.hooks.clone();
    within(10, "the blob committed", async {
        while hooks.fills_in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(stowage::test_hooks::blob_path(&cache, &layer.digest).exists());
    st.stop().await;
    drop(mount);
}

/// Referrers kept on disk, then a newer answer (a signature removed, one
/// added) that cannot be kept (the disk is full): the record of the old
/// answer goes. An outage afterwards must not bring back the removed
/// signature; it did, served stale from the old record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn referrers_that_cannot_be_kept_do_not_leave_an_older_answer_behind() {
    let dir = TempDir::new().unwrap();
    let mount = Tmpfs::mount(dir.path(), "8m");
    let cache = dir.path().to_path_buf();
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[1000]);
    up.push_image("library/app", "1", &img);
    let old_sig = make_artifact(&img, "application/vnd.dev.cosign.artifact.sig.v1+json");
    up.push_image_untagged("library/app", &old_sig);
    let st = start_stowage_in(dir, &up.url(), "tag_ttl = \"400ms\"").await;
    let c = client();
    let path = st.v2(&format!("app/referrers/{}", img.digest));
    let listed = async |want: &str| {
        let (_, body) = get_ok(&c, &path).await;
        let index: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(index["manifests"][0]["digest"], want, "{index}");
    };
    // The subject is cached, so its referrers are kept on disk.
    check_manifest(&c, &st, "app", "1", &img.manifest, OCI_MANIFEST).await;
    listed(&old_sig.digest).await;
    fills_done(&st).await;
    let filler = fill_up(&cache);
    up.remove_manifest(&old_sig.digest);
    let new_sig = make_artifact(&img, "application/vnd.example.sbom.v1+json");
    up.push_image_untagged("library/app", &new_sig);
    tokio::time::sleep(Duration::from_millis(700)).await;
    listed(&new_sig.digest).await;
    up.set_failure(Failure::Unavailable);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = c.get(&path).send().await.unwrap();
    let status = r.status();
    let body = r.bytes().await.unwrap();
    assert!(
        !String::from_utf8_lossy(&body).contains(&old_sig.digest),
        "{status}: a removed referrer served stale: {}",
        String::from_utf8_lossy(&body)
    );
    std::fs::remove_file(&filler).unwrap();
    st.stop().await;
    drop(mount);
}

/// Referrers kept on disk and unchanged upstream, refreshed while the disk
/// is full: their record still holds, so an outage afterwards serves them
/// stale. Removing the record of any answer that could not be kept (for
/// the test above) once removed this one too: the outage was a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unchanged_referrers_refreshed_on_a_full_disk_are_still_served_stale() {
    let dir = TempDir::new().unwrap();
    let mount = Tmpfs::mount(dir.path(), "8m");
    let cache = dir.path().to_path_buf();
    let up = FakeUpstream::start().await;
    let img = make_image(Format::Oci, &[1000]);
    up.push_image("library/app", "1", &img);
    let sig = make_artifact(&img, "application/vnd.dev.cosign.artifact.sig.v1+json");
    up.push_image_untagged("library/app", &sig);
    let st = start_stowage_in(dir, &up.url(), "tag_ttl = \"400ms\"").await;
    let c = client();
    let path = st.v2(&format!("app/referrers/{}", img.digest));
    check_manifest(&c, &st, "app", "1", &img.manifest, OCI_MANIFEST).await;
    let (_, kept) = get_ok(&c, &path).await;
    fills_done(&st).await;
    let filler = fill_up(&cache);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, again) = get_ok(&c, &path).await;
    assert_eq!(again, kept);
    up.set_failure(Failure::Unavailable);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let r = c.get(&path).send().await.unwrap();
    assert_eq!(r.status(), 200, "served stale in the outage");
    assert_eq!(header(&r, "x-stowage-cache").as_deref(), Some("stale"));
    assert_eq!(r.bytes().await.unwrap(), kept);
    std::fs::remove_file(&filler).unwrap();
    st.stop().await;
    drop(mount);
}
