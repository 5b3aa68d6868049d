//! The blob journal (`index.log`): an append-only record of what the store
//! holds and how big each blob is, so a restart need not hash every file.
//! Records (see [`Record`]) are appended without fsync: a record lost in a
//! crash only means the next start hashes that file before indexing it.
//! The start-up scan rewrites the journal compacted.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::layout::Record;
use crate::oci::Digest;

/// The journal of one cache directory.
pub(crate) struct Journal {
    /// `<cache>/index.log`.
    path: PathBuf,
    /// Append handle, opened on first use and after a compaction.
    file: Mutex<Option<File>>,
}

impl Journal {
    /// The journal at `path` (created on the first append).
    pub(crate) fn new(path: PathBuf) -> Journal {
        Journal {
            path,
            file: Mutex::new(None),
        }
    }

    /// Appends one record.
    pub(crate) fn append(&self, record: &Record) -> io::Result<()> {
        self.append_all(std::slice::from_ref(record))
    }

    /// Appends records in one write.
    pub(crate) fn append_all(&self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut guard = self
            .file
            .lock()
            .map_err(|_| io::Error::other("journal lock poisoned"))?;
        if guard.is_none() {
            *guard = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        if let Some(f) = guard.as_mut() {
            let text: String = records.iter().map(Record::line).collect();
            f.write_all(text.as_bytes())?;
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
        let mut map = HashMap::new();
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(map),
            Err(e) => return Err(e),
        };
        for line in io::BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            match Record::parse(&line) {
                Some(Record::Stored(d, size)) => {
                    map.insert(d, size);
                }
                Some(Record::Removed(d)) => {
                    map.remove(&d);
                }
                None => {}
            }
        }
        Ok(map)
    }

    /// Replaces the journal with `records` (via a uniquely named temporary
    /// file, an fsync and a rename).
    pub(crate) fn compact(&self, records: impl Iterator<Item = Record>) -> io::Result<()> {
        let mut guard = self
            .file
            .lock()
            .map_err(|_| io::Error::other("journal lock poisoned"))?;
        let dir = self
            .path
            .parent()
            .ok_or_else(|| io::Error::other("journal has no directory"))?;
        let mut text = String::new();
        for r in records {
            text.push_str(&r.line());
        }
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(text.as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        *guard = None;
        Ok(())
    }
}
