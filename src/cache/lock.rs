//! The exclusive lock on a cache directory: one stowage per directory.
//!
//! A second instance on the same directory would empty the first one's
//! `tmp/` at start-up (removing files of fills in progress) and append to
//! the same journal. So the server takes an exclusive `flock(2)` on
//! `<cache>/lock` before touching anything else, writes its pid into the
//! file, and holds it until the process ends (the kernel releases it on
//! exit, also after kill -9, so there is never a stale lock to clean up).
//!
//! The operator commands (`stowage cache stats|ls|purge`) do not take it:
//! they are written to be safe next to a running instance (see
//! `cli/ops.rs`).

use std::fs::File;
use std::io::{self, Read as _, Seek as _, Write as _};
use std::path::PathBuf;

use rustix::fs::{FlockOperation, flock};

use super::layout::Layout;

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LockError {
    /// Another process holds it.
    #[error(
        "cache directory {dir} is in use by another stowage process (pid {pid}); \
         each instance needs a cache_dir of its own"
    )]
    Held {
        /// The cache directory.
        dir: PathBuf,
        /// The pid written by the holder (`unknown` if unreadable).
        pid: String,
    },
    /// The lock file could not be created or locked.
    #[error("cannot lock cache directory {dir}: {source}")]
    Io {
        /// The cache directory.
        dir: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the exclusive lock on the cache directory of `layout`
    /// (creating the directory and the lock file if needed), without
    /// waiting.
    pub(crate) fn acquire(layout: &Layout) -> Result<DirLock, LockError> {
        let dir = layout.dir().to_path_buf();
        let io_err = |source| LockError::Io {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io_err)?;
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(layout.lock())
            .map_err(io_err)?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let pid = text.trim();
                let pid = if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
                    "unknown".to_string()
                } else {
                    pid.to_string()
                };
                return Err(LockError::Held { dir, pid });
            }
            Err(e) => return Err(io_err(e.into())),
        }
        file.set_len(0).map_err(io_err)?;
        file.rewind().map_err(io_err)?;
        writeln!(file, "{}", std::process::id()).map_err(io_err)?;
        Ok(DirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(&dir.path().join("cache"));
        let held = DirLock::acquire(&layout).unwrap();
        // flock belongs to the open file: a second open in this process
        // conflicts just like another process would.
        match DirLock::acquire(&layout) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(held);
        DirLock::acquire(&layout).unwrap();
    }
}
