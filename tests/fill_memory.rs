//! A cold fill reuses the memory it frees (issue 13, cold path): the
//! upstream body arrives in hyper's read buffers, each freed once written
//! and hashed, and glibc's defaults handed them back to the kernel so that
//! received bytes landed in pages faulted in and zeroed anew (thousands of
//! faults per cold 128 MiB blob, a large share of the fill's CPU on the
//! bench VM). stowage runs as the real binary, so its page faults are its
//! own (read from `/proc/<pid>/stat`).

mod common;

use common::*;

const MIB: usize = 1024 * 1024;

/// Minor page faults of `pid` so far (`/proc/<pid>/stat`, field 10).
fn minor_faults(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name (field 2) is in parentheses and may hold spaces:
    // count from after it, where field 3 is the first.
    let rest = stat.rsplit_once(')').unwrap().1;
    rest.split_whitespace().nth(7).unwrap().parse().unwrap()
}

/// After a first cold fill (the arenas reach their working size), a cold
/// 128 MiB blob costs fewer than one page fault per 32 pages received: the
/// receive buffers are reused. Measured in this debug build: 100-560
/// faults over 5 runs; with glibc's defaults (no `mallopt`), 1,900-2,400
/// over 3 (and 6,000 to 16,000 from the real upstream of `bench/`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_fill_reuses_freed_receive_buffers() {
    let up = FakeUpstream::start().await;
    let first_digest = up.add_blob(random_bytes(32 * MIB));
    let second_digest = up.add_blob(random_bytes(128 * MIB));
    let dir = tempfile::TempDir::new().unwrap();
    let config = write_config(dir.path(), &up.url(), "");
    let mut st = Process::with_config(&config, &[]);
    let base = format!("http://{}", st.listening_addr());
    let c = client();

    let (_, body) = within(
        60,
        "first cold GET",
        get_ok(&c, &format!("{base}/v2/library/a/blobs/{first_digest}")),
    )
    .await;
    assert_eq!(sha256_digest(&body), first_digest);
    drop(body);

    let pid = st.pid();
    let before = minor_faults(pid);
    let (_, body) = within(
        60,
        "second cold GET",
        get_ok(&c, &format!("{base}/v2/library/b/blobs/{second_digest}")),
    )
    .await;
    let faults = minor_faults(pid) - before;
    assert_eq!(sha256_digest(&body), second_digest);
    assert_eq!(up.blob_gets(&second_digest), 1, "it was a cold fill");
    let pages = (128 * MIB / 4096) as u64;
    eprintln!("cold fill of 128 MiB ({pages} pages): {faults} minor page faults");
    assert!(st.is_running(), "{}", st.log().join("\n"));
    assert!(
        faults < pages / 32,
        "a cold fill of {pages} pages took {faults} page faults: freed buffers are not reused"
    );
}
