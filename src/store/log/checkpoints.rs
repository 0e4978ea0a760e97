//! WAL checkpoints: handed to another thread after commits, run here only when the WAL
//! outgrew the inline threshold.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Log;
use crate::store::{Result, StoreError};

impl Log {
    /// Hands checkpoints to `wake` (called with the WAL's size in pages after each commit)
    /// instead of running them inside commits; runs one itself (passive) past `inline_at`
    /// pages, a safety net for when the other thread cannot keep up.
    pub fn delegate_checkpoints(
        &mut self,
        inline_at: i32,
        mut wake: impl FnMut(i32) + Send + 'static,
    ) -> Result<()> {
        self.conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| StoreError::Sqlite {
                path: self.path.clone(),
                source: e,
            })?;
        let path = self.path.clone();
        let overdue = Arc::clone(&self.overdue);
        self.conn
            .wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages: i32| {
                wake(pages);
                if pages >= inline_at {
                    // Only recorded: the writer thread checkpoints between two of its
                    // transactions (see `checkpoint_if_overdue`), never a commit made on the
                    // asyncio thread (`Writer::log_now`), which refuses while one is overdue.
                    overdue.store(true, Ordering::Relaxed);
                }
                Ok(())
            }))
            .map_err(|e| StoreError::Sqlite { path, source: e })
    }

    /// When the WAL outgrew the inline threshold (the checkpoint thread fell behind: a loaded
    /// machine starved it), a RESTART checkpoint on this connection, between two transactions,
    /// retried for up to a second: it copies every frame and lets the next commit start the WAL
    /// over. A PASSIVE one could not: this writer appends between two of them, so the WAL
    /// would never be wholly copied and would keep growing. It is retried because a checkpoint
    /// the other thread runs makes it BUSY at once (SQLite waits for writers and readers, not
    /// for another checkpointer); with no commit meanwhile, that one completes too. Still busy
    /// after the second: the next call tries again. So commits pause only when the WAL has
    /// already grown large.
    pub fn checkpoint_if_overdue(&self) {
        if !self.overdue.load(Ordering::Relaxed) {
            return;
        }
        let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let busy = self
                .conn
                .query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0));
            match busy {
                Ok(0) => {
                    self.overdue.store(false, Ordering::Relaxed);
                    return;
                }
                Ok(_) if std::time::Instant::now() < until => {
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                _ => return,
            }
        }
    }

    /// Whether the WAL outgrew the inline threshold and waits for the writer's checkpoint.
    pub fn checkpoint_overdue(&self) -> bool {
        self.overdue.load(Ordering::Relaxed)
    }
}
