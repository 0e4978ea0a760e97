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
/// with the process. After every commit the writer compares the WAL's inode with the one it
/// opened; when it changed or the file is gone, it checkpoints what its own WAL holds into the
/// database file (so what it acknowledges is on disk) and refuses every later write.
pub(crate) struct WalGuard {
    wal: Option<std::path::PathBuf>,
    id: Option<(u64, u64)>,
    pub(crate) detached: bool,
}

impl WalGuard {
    pub(super) fn new(log: &Log, watch: bool) -> Self {
        let wal = (watch && !crate::store::log::in_memory(log.path()))
            .then(|| std::path::PathBuf::from(format!("{}-wal", log.path())));
        let id = wal.as_deref().and_then(Self::file_id);
        Self {
            wal,
            id,
            detached: false,
        }
    }

    #[cfg(unix)]
    fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
    }

    #[cfg(not(unix))]
    fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
        std::fs::metadata(path).ok().map(|_| (0, 0))
    }

    /// Whether the WAL is still the one the writer opened (or there is none to watch), and
    /// no replacement was seen before: what a commit on another thread checks before and
    /// after it commits.
    pub(crate) fn still_ours(&self) -> bool {
        if self.detached {
            return false;
        }
        match (&self.wal, self.id) {
            (None, _) => true,
            (Some(wal), Some(id)) => Self::file_id(wal) == Some(id),
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
        if self.detached || self.id.is_none() || Self::file_id(wal) == self.id {
            if self.id.is_none() {
                self.id = Self::file_id(wal);
            }
            return results;
        }
        self.detached = true;
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
