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

/// An append-only file of one-line records: the blob journal below, and
/// the marks of private content (`private.rs`). Appends go through one
/// handle opened on first use; reading hands over line by line (skipping
/// unparseable ones, such as a torn last line, is the reader's business);
/// a rewrite replaces the file via a uniquely named temporary file, an
/// fsync and a rename.
pub(crate) struct LineLog {
    /// The file.
    path: PathBuf,
    /// Append handle, opened on first use and after a rewrite.
    file: Mutex<Option<File>>,
}

impl LineLog {
    /// The log at `path` (created on the first append).
    pub(crate) fn new(path: PathBuf) -> LineLog {
        LineLog {
            path,
            file: Mutex::new(None),
        }
    }

    /// Appends `line` (newline included), fsynced when `sync`.
    pub(crate) fn append(&self, line: &str, sync: bool) -> io::Result<()> {
        let mut guard = self
            .file
            .lock()
            .map_err(|_| io::Error::other("log lock poisoned"))?;
        if guard.is_none() {
            *guard = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        if let Some(f) = guard.as_mut() {
            f.write_all(line.as_bytes())?;
            if sync {
                f.sync_data()?;
            }
        }
        Ok(())
    }

    /// Hands every line to `each`, in order, up to the first that cannot
    /// be read. No file is no lines.
    pub(crate) fn read(&self, mut each: impl FnMut(&str)) -> io::Result<()> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for line in io::BufReader::new(file).lines() {
            let Ok(line) = line else { break };
            each(&line);
        }
        Ok(())
    }

    /// Replaces the file with `text`.
    pub(crate) fn rewrite(&self, text: &str) -> io::Result<()> {
        let mut guard = self
            .file
            .lock()
            .map_err(|_| io::Error::other("log lock poisoned"))?;
        let dir = self
            .path
            .parent()
            .ok_or_else(|| io::Error::other("log file has no directory"))?;
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(text.as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        *guard = None;
        Ok(())
    }
}

/// The journal of one cache directory.
pub(crate) struct Journal {
    /// `<cache>/index.log`.
    log: LineLog,
}

impl Journal {
    /// The journal at `path` (created on the first append).
    pub(crate) fn new(path: PathBuf) -> Journal {
        Journal {
            log: LineLog::new(path),
        }
    }

    /// Appends one record.
    pub(crate) fn append(&self, record: &Record) -> io::Result<()> {
        self.log.append(&record.line(), false)
    }

    /// Appends records in one write.
    pub(crate) fn append_all(&self, records: &[Record]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let text: String = records.iter().map(Record::line).collect();
        self.log.append(&text, false)
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
        self.log.read(|line| match Record::parse(line) {
            Some(Record::Stored(d, size)) => {
                map.insert(d, size);
            }
            Some(Record::Removed(d)) => {
                map.remove(&d);
            }
            None => {}
        })?;
        Ok(map)
    }

    /// Replaces the journal with `records`.
    pub(crate) fn compact(&self, records: impl Iterator<Item = Record>) -> io::Result<()> {
        let text: String = records.map(|r| r.line()).collect();
        self.log.rewrite(&text)
    }
}
