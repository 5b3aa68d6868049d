//! The blob journal (`index.log`): an append-only record of what the store
//! holds and how big each blob is, so a restart need not hash every file.
//! Records (see [`Record`]) are appended without fsync: a record lost in a
//! crash only means the next start hashes that file before indexing it.
//!
//! Compaction rewrites the journal (a temporary file, an fsync, a rename)
//! while holding the lock every append takes, so no record appended
//! concurrently is lost:
//! * at start-up ([`Journal::mark`], then [`Journal::compact_to`]): the
//!   scan's view of the store, plus every record appended since the mark
//!   (commits and evictions while the scan ran), in order;
//! * while running ([`Journal::compact_if_due`], from the access-time
//!   flusher): the journal's own records folded (later lines win, removals
//!   forget), read under the lock, once it holds more than twice the lines
//!   it needs.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::layout::{Record, replace_file};
use crate::oci::Digest;

/// An append-only file of one-line records: the blob journal below, and
/// the marks of private content (`private.rs`). Appends go through one
/// handle opened on first use; reading hands over line by line (skipping
/// unparseable ones, such as a torn last line, is the reader's business);
/// a rewrite replaces the file via a uniquely named temporary file, an
/// fsync and a rename.
pub(crate) struct LineLog {
    /// The file.
    path: PathBuf,
    /// Where a rewrite writes its temporary file (the cache's `tmp/`).
    tmp: PathBuf,
    /// Append handle, opened on first use, after a rewrite and after a
    /// failed append.
    file: Mutex<Option<File>>,
    /// Test only: the next append writes this many bytes of its line and
    /// fails, as a write cut short by a full disk does.
    #[cfg(test)]
    short_write: Mutex<Option<usize>>,
}

impl LineLog {
    /// The log at `path` (created on the first append), rewritten through
    /// a temporary file in `tmp`.
    pub(crate) fn new(path: PathBuf, tmp: PathBuf) -> LineLog {
        LineLog {
            path,
            tmp,
            file: Mutex::new(None),
            #[cfg(test)]
            short_write: Mutex::new(None),
        }
    }

    /// Appends `line` (newline included), fsynced when `sync`. A failed
    /// append may have left part of its line (a full disk cuts a write
    /// short): the handle is dropped, and the next append opens the file
    /// again and cuts that part off first ([`open_at_line_end`]), or a
    /// line appended after it would be glued to it and lost.
    pub(crate) fn append(&self, line: &str, sync: bool) -> io::Result<()> {
        let mut guard = self
            .file
            .lock()
            .map_err(|_| io::Error::other("log lock poisoned"))?;
        let f = match guard.as_mut() {
            Some(f) => f,
            None => guard.insert(open_at_line_end(&self.path)?),
        };
        let written = self
            .write(f, line.as_bytes())
            .and_then(|()| if sync { f.sync_data() } else { Ok(()) });
        if written.is_err() {
            *guard = None;
        }
        written
    }

    fn write(&self, f: &mut File, bytes: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if let Some(n) = self.short_write.lock().ok().and_then(|mut s| s.take()) {
            f.write_all(&bytes[..n.min(bytes.len())])?;
            return Err(io::Error::from(io::ErrorKind::StorageFull));
        }
        f.write_all(bytes)
    }

    /// Test only: the next append writes `n` bytes of its line and fails.
    #[cfg(test)]
    pub(crate) fn cut_next_write_short(&self, n: usize) {
        if let Ok(mut s) = self.short_write.lock() {
            *s = Some(n);
        }
    }

    /// Hands every complete line to `each`, in order. A line that is not
    /// UTF-8 (a damaged byte) is skipped like any other unparseable one;
    /// the lines after it are still read. A last line without its newline
    /// is torn (a crash mid-append) and left out: a prefix of a record can
    /// parse as another record (`+<digest> 12` of `+<digest> 1234`). No
    /// file is no lines; a file that cannot be read to its end is an
    /// error (after `each` had the lines before the failure).
    pub(crate) fn read(&self, mut each: impl FnMut(&str)) -> io::Result<()> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut lines = io::BufReader::new(file);
        let mut line = Vec::new();
        loop {
            line.clear();
            if lines.read_until(b'\n', &mut line)? == 0 {
                return Ok(());
            }
            let Some(complete) = line.strip_suffix(b"\n") else {
                return Ok(()); // torn: the last line, without its newline
            };
            if let Ok(text) = std::str::from_utf8(complete) {
                each(text);
            }
        }
    }

    /// Replaces the file with `text` ([`replace_file`]).
    pub(crate) fn rewrite(&self, text: &str) -> io::Result<()> {
        self.rewrite_with(|| text.to_owned())
    }

    /// Replaces the file with what `text` makes, made while holding the
    /// lock every append takes: no line appended meanwhile is lost (one
    /// appended before is in what `text` reads, one after goes to the new
    /// file).
    pub(crate) fn rewrite_with(&self, text: impl FnOnce() -> String) -> io::Result<()> {
        let mut guard = self
            .file
            .lock()
            .map_err(|_| io::Error::other("log lock poisoned"))?;
        replace_file(&self.tmp, &self.path, text().as_bytes())?;
        *guard = None;
        Ok(())
    }
}

/// Opens `path` for appending (creating it), first cutting off a last
/// line without its newline: the part of a line a failed append left.
fn open_at_line_end(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)?;
    let len = file.metadata()?.len();
    let keep = line_end(&file, len)?;
    if keep < len {
        file.set_len(keep)?;
    }
    Ok(file)
}

/// Where the last complete line of `file` (`len` bytes) ends: `len` when
/// the file ends with a newline (or is empty), else just past the last
/// newline before the end (0 if there is none).
fn line_end(file: &File, len: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 4096];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let chunk = &mut buf[..(end - start) as usize];
        file.read_exact_at(chunk, start)?;
        if end == len && chunk.last() == Some(&b'\n') {
            return Ok(len);
        }
        if let Some(i) = chunk.iter().rposition(|&b| b == b'\n') {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// A running compaction waits for at least this many lines beyond twice
/// the live records.
const COMPACT_SLACK: u64 = 1024;

/// The journal of one cache directory.
pub(crate) struct Journal {
    /// `<cache>/index.log`.
    log: LineLog,
    /// What an append or a compaction counts; its lock is taken by every
    /// append and held across a compaction.
    inner: Mutex<Inner>,
}

/// The journal's state, under its lock.
#[derive(Default)]
struct Inner {
    /// Lines in the file, as far as this process knows (appends since the
    /// last compaction plus what that compaction wrote).
    lines: u64,
    /// Records the last compaction wrote (the live entries then).
    live: u64,
    /// Records appended since [`Journal::mark`], for the start-up
    /// compaction.
    since_mark: Option<Vec<Record>>,
}

impl Journal {
    /// The journal at `path` (created on the first append), rewritten
    /// through a temporary file in `tmp`.
    pub(crate) fn new(path: PathBuf, tmp: PathBuf) -> Journal {
        Journal {
            log: LineLog::new(path, tmp),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> io::Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| io::Error::other("journal lock poisoned"))
    }

    /// Appends one record.
    pub(crate) fn append(&self, record: &Record) -> io::Result<()> {
        let mut inner = self.lock()?;
        self.log.append(&record.line(), false)?;
        inner.lines += 1;
        if let Some(since) = inner.since_mark.as_mut() {
            since.push(record.clone());
        }
        Ok(())
    }

    /// Appends records in one write.
    /// Under the lock every append takes, as [`Journal::append`] (so a
    /// compaction loses none of them).
    pub(crate) fn append_all(&self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let text: String = records.iter().map(Record::line).collect();
        let mut inner = self.lock()?;
        self.log.append(&text, false)?;
        inner.lines += records.len() as u64;
        if let Some(since) = inner.since_mark.as_mut() {
            since.extend(records.iter().cloned());
        }
        Ok(())
    }

    /// Appends one record to the journal at `path` if there is one. For the
    /// operator commands next to a running instance: `O_APPEND` writes of
    /// one short line do not interleave with the instance's own appends.
    pub(crate) fn append_if_exists(path: &Path, record: &Record) -> io::Result<()> {
        match OpenOptions::new().append(true).open(path) {
            Ok(mut f) => f.write_all(record.line().as_bytes()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The sizes the journal records, by digest: later lines win, removals
    /// forget, unparseable lines (a torn last line) are skipped.
    pub(crate) fn read(&self) -> io::Result<HashMap<Digest, u64>> {
        Ok(fold(&self.log)?.0)
    }

    /// Starts remembering appended records, for [`Journal::compact_to`].
    pub(crate) fn mark(&self) -> io::Result<()> {
        self.lock()?.since_mark = Some(Vec::new());
        Ok(())
    }

    /// Replaces the journal with `records` (the start-up scan's view,
    /// taken after [`Journal::mark`]) followed by every record appended
    /// since the mark.
    pub(crate) fn compact_to(&self, records: impl Iterator<Item = Record>) -> io::Result<()> {
        let mut inner = self.lock()?;
        let since = inner.since_mark.take().unwrap_or_default();
        let mut text = String::new();
        let mut n = 0u64;
        for r in records.chain(since) {
            text.push_str(&r.line());
            n += 1;
        }
        self.replace(&mut inner, &text, n)
    }

    /// Compacts the journal if it holds more than twice the lines it needs
    /// (and [`COMPACT_SLACK`] more). Returns whether it did.
    pub(crate) fn compact_if_due(&self) -> io::Result<bool> {
        {
            let inner = self.lock()?;
            if inner.lines <= 2 * inner.live + COMPACT_SLACK {
                return Ok(false);
            }
        }
        self.compact()?;
        Ok(true)
    }

    /// Rewrites the journal as its own records folded, read under the lock
    /// appends take (so none is lost).
    pub(crate) fn compact(&self) -> io::Result<()> {
        let mut inner = self.lock()?;
        let (live, _) = fold(&self.log)?;
        let mut text = String::new();
        for (d, size) in &live {
            text.push_str(&Record::Stored(d.clone(), *size).line());
        }
        self.replace(&mut inner, &text, live.len() as u64)
    }

    /// Writes `text` (`lines` records) in place of the journal
    /// ([`LineLog::rewrite`]). Called with the lock held.
    fn replace(&self, inner: &mut Inner, text: &str, lines: u64) -> io::Result<()> {
        self.log.rewrite(text)?;
        inner.lines = lines;
        inner.live = lines;
        Ok(())
    }
}

/// The records of the journal `log` folded (later lines win, removals
/// forget, unparseable lines skipped), and how many lines it has.
fn fold(log: &LineLog) -> io::Result<(HashMap<Digest, u64>, u64)> {
    let mut map = HashMap::new();
    let mut lines = 0;
    log.read(|line| {
        lines += 1;
        match Record::parse(line) {
            Some(Record::Stored(d, size)) => {
                map.insert(d, size);
            }
            Some(Record::Removed(d)) => {
                map.remove(&d);
            }
            None => {}
        }
    })?;
    Ok((map, lines))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Algorithm;
    use std::sync::Arc;

    fn digest(i: u64) -> Digest {
        Digest::of(Algorithm::Sha256, &i.to_le_bytes())
    }

    /// A record torn by a crash mid-append (no newline) is not read as a
    /// record: its size would be a prefix of the real one.
    #[test]
    fn a_torn_last_line_is_not_a_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.log");
        let journal = Journal::new(path.clone(), dir.path().join("tmp"));
        let d = digest(1);
        journal.append(&Record::Stored(d.clone(), 1234)).unwrap();
        let torn = Record::Stored(d.clone(), 5678).line();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn.as_bytes()[..torn.len() - 3]).unwrap();
        assert_eq!(journal.read().unwrap().get(&d), Some(&1234));
    }

    /// An append cut short (a full disk) leaves part of its line; the
    /// next append must not be glued to it: both the lines before and the
    /// line after are read back.
    #[test]
    fn a_line_after_a_failed_append_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("private.log");
        let log = LineLog::new(path.clone(), dir.path().join("tmp"));
        log.append("+a\n", true).unwrap();
        log.cut_next_write_short(2);
        assert!(log.append("+bbbb\n", true).is_err());
        log.append("+c\n", true).unwrap();
        let mut lines = Vec::new();
        log.read(|l| lines.push(l.to_string())).unwrap();
        assert_eq!(lines, ["+a", "+c"]);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "+a\n+c\n");
    }

    /// Where the last complete line ends, across the read-back chunks.
    #[test]
    fn line_end_finds_the_last_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let long = "x".repeat(10_000);
        for (text, want) in [
            (String::new(), 0),
            ("ab\n".to_string(), 3),
            ("ab\ncd".to_string(), 3),
            ("abcd".to_string(), 0),
            (format!("ab\n{long}"), 3),
            (format!("{long}\n{long}\n"), 20_002),
        ] {
            std::fs::write(&path, &text).unwrap();
            let f = File::open(&path).unwrap();
            assert_eq!(line_end(&f, text.len() as u64).unwrap(), want, "{text:.20}");
        }
    }

    /// Compactions racing appends from several threads lose nothing: the
    /// journal ends up recording exactly what was appended, folded.
    #[test]
    fn compaction_loses_no_concurrent_record() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Arc::new(Journal::new(
            dir.path().join("index.log"),
            dir.path().join("tmp"),
        ));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let journal = journal.clone();
                std::thread::spawn(move || {
                    for i in 0..1500u64 {
                        let d = digest(t * 1_000_000 + i);
                        journal.append(&Record::Stored(d.clone(), i)).unwrap();
                        if i % 3 == 0 {
                            journal.append(&Record::Removed(d)).unwrap();
                        }
                    }
                })
            })
            .collect();
        let mut compactions = 0;
        while !threads.iter().all(|t| t.is_finished()) {
            journal.compact().unwrap();
            compactions += 1;
        }
        for t in threads {
            t.join().unwrap();
        }
        journal.compact().unwrap();
        let got = journal.read().unwrap();
        let mut want = HashMap::new();
        for t in 0..4u64 {
            for i in 0..1500u64 {
                if i % 3 != 0 {
                    want.insert(digest(t * 1_000_000 + i), i);
                }
            }
        }
        assert!(compactions > 1, "no compaction raced the appends");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "records lost or resurrected by compaction");
        let text = std::fs::read_to_string(dir.path().join("index.log")).unwrap();
        assert_eq!(text.lines().count(), want.len(), "compacted");
    }

    #[test]
    fn compacts_when_due_only() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path().join("index.log"), dir.path().join("tmp"));
        let d = digest(1);
        for _ in 0..COMPACT_SLACK / 2 {
            journal.append(&Record::Stored(d.clone(), 1)).unwrap();
            journal.append(&Record::Removed(d.clone())).unwrap();
        }
        assert!(!journal.compact_if_due().unwrap(), "not yet");
        for _ in 0..COMPACT_SLACK {
            journal.append(&Record::Stored(d.clone(), 1)).unwrap();
        }
        assert!(journal.compact_if_due().unwrap());
        let text = std::fs::read_to_string(dir.path().join("index.log")).unwrap();
        assert_eq!(text.lines().count(), 1);
        assert!(!journal.compact_if_due().unwrap());
    }

    /// The start-up compaction writes the scan's view and every record
    /// appended since the mark, in order.
    #[test]
    fn startup_compaction_keeps_records_appended_during_the_scan() {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::new(dir.path().join("index.log"), dir.path().join("tmp"));
        journal.append(&Record::Stored(digest(1), 1)).unwrap();
        journal.append(&Record::Stored(digest(9), 9)).unwrap();
        journal.mark().unwrap();
        // Appended while the scan runs: a commit and an eviction.
        journal.append(&Record::Stored(digest(2), 2)).unwrap();
        journal.append(&Record::Removed(digest(1))).unwrap();
        // The scan saw 1 (and dropped 9, a damaged file).
        journal
            .compact_to([Record::Stored(digest(1), 1)].into_iter())
            .unwrap();
        let got = journal.read().unwrap();
        assert_eq!(got, HashMap::from([(digest(2), 2)]));
    }
}
