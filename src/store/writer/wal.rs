//! The WAL guard: notices when the WAL the writer commits into is no longer the file at
//! `<path>-wal` (another SQLite in the process deleted it) and saves what it holds.

use super::Reply;
use crate::store::log::Log;
use crate::store::{Result, StoreError};

/// Watches that the WAL the writer commits into is still the file at `<path>-wal`.
///
/// Another copy of SQLite in the same process (Python's `sqlite3` module is one) keeps its own
/// POSIX lock bookkeeping: when it closes the file, the process's locks on it are gone, so it
/// (or the next process to open the file) takes itself for the last user and deletes the WAL
/// while this writer still appends to it, and whatever is committed there afterwards vanishes
/// with the process. The guard holds the WAL it first saw open; after every commit it checks
/// that file still has a name (a deleted or replaced WAL has none left: a link count of 0, read
/// from the open descriptor, cheaper than looking the path up). When it has none, the writer
/// checkpoints what its own WAL holds into the database file (so what it acknowledges is on
/// disk) and refuses every later write. (SQLite keeps no lock on the WAL file itself, so
/// closing this descriptor releases none of its locks.)
pub(crate) struct WalGuard {
    wal: Option<std::path::PathBuf>,
    file: Option<std::fs::File>,
    pub(crate) detached: bool,
}

impl WalGuard {
    pub(super) fn new(log: &Log, watch: bool) -> Self {
        let wal = (watch && !crate::store::log::in_memory(log.path()))
            .then(|| std::path::PathBuf::from(format!("{}-wal", log.path())));
        let file = wal.as_deref().and_then(|p| std::fs::File::open(p).ok());
        Self {
            wal,
            file,
            detached: false,
        }
    }

    /// Whether the WAL held open still has a name.
    #[cfg(unix)]
    fn linked(file: &std::fs::File) -> bool {
        use std::os::unix::fs::MetadataExt;
        file.metadata().is_ok_and(|m| m.nlink() > 0)
    }

    #[cfg(not(unix))]
    fn linked(_: &std::fs::File) -> bool {
        true
    }

    /// Whether the WAL is still the one the writer opened (or there is none to watch), and
    /// no replacement was seen before: what a commit on another thread checks after it
    /// commits.
    pub(crate) fn still_ours(&self) -> bool {
        if self.detached {
            return false;
        }
        match (&self.wal, &self.file) {
            (None, _) => true,
            (Some(_), Some(file)) => Self::linked(file),
            (Some(_), None) => false, // not seen yet: the writer records it first
        }
    }

    pub(super) fn error(log: &Log) -> StoreError {
        StoreError::Detached(log.path().to_owned())
    }

    /// Checks the WAL after commits and passes `results` on: unchanged while the WAL is ours
    /// (or when what it held was saved into the database file), else failed.
    pub(super) fn vet(
        &mut self,
        log: &Log,
        results: Vec<(u64, Result<Reply>)>,
    ) -> Vec<(u64, Result<Reply>)> {
        let Some(wal) = &self.wal else {
            return results;
        };
        match &self.file {
            None => {
                self.file = std::fs::File::open(wal).ok();
                return results;
            }
            Some(file) if self.detached || Self::linked(file) => return results,
            Some(_) => {}
        }
        self.detached = true;
        // Its space goes back once SQLite closes it too.
        self.file = None;
        // Our WAL is unlinked but still open: copy every frame it holds into the database.
        let mut saved = false;
        for _ in 0..500 {
            match log
                .conn()
                .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                    r.get::<_, i64>(0)
                }) {
                Ok(0) => {
                    saved = true;
                    break;
                }
                Ok(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                Err(_) => break,
            }
        }
        if saved {
            results
        } else {
            results
                .into_iter()
                .map(|(t, _)| (t, Err(Self::error(log))))
                .collect()
        }
    }
}
