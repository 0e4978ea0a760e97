//! Committing bus-log events on the calling thread, when that costs no wait.
//!
//! A thread round trip to the writer costs ~200 µs on these machines; a commit that does not
//! fsync (WAL with synchronous=NORMAL, or an in-memory database) ~20 µs. So the asyncio thread
//! may commit a small bus-log group itself (with the GIL released by its caller), but only when
//! it can do so at once: the connection free (the writer thread is between batches), SQLite's
//! write lock free (no busy wait: no busy handler meanwhile), and never a checkpoint
//! (the WAL hook only wakes the checkpoint thread). When any of these fails, nothing is written
//! and the caller queues the request for the writer thread as before. After the commit, the WAL
//! must still be the one the writer opened (see `WalGuard`); if it is not, the positions are
//! acknowledged only once the writer thread has saved it (`Logged::Unconfirmed`). Nothing here
//! fsyncs, waits on a lock, or sleeps.

use crate::store::log::{now_iso, Log, NewEvent};
use crate::store::writer::{log_events, write_marks, Known, Marks, Writer};
use crate::store::{Result, StoreError};

/// One transaction of `items`, with the finished-delivery marks waiting for the writer once
/// they have waited half of `MARKS_LINGER` (see `Marks`): a busy bus records its progress with its
/// publishes, as when the writer thread committed them (a kill then repeats only the last few
/// milliseconds of deliveries). None when SQLite is busy or the
/// marks cannot be written (nothing written; the marks stay for the writer).
fn commit_group(
    log: &mut Log,
    known: &mut Known,
    marks: &Marks,
    items: &[(String, NewEvent)],
) -> Option<Result<Vec<i64>>> {
    let path = log.path().to_owned();
    let tx = log.begin().ok()?; // busy (or failing: the writer thread reports it)
    let positions = match log_events(&tx, &path, items, known, &now_iso()) {
        Ok(p) => p,
        Err(e) => {
            known.clear(); // it may hold versions the rollback undoes
            return Some(Err(e));
        }
    };
    let marked = marks.take_due(&mut known.new_types);
    // With the (subscription, type) pairs the skipped events among the marks add: a failure
    // puts them back with the marks, for the writer's next transaction.
    let types = known.new_types.clone();
    let undo = |known: &mut Known, marked| {
        known.clear(); // it may hold versions and ranges the rollback undoes
        known.new_types = types;
        marks.restore(marked);
    };
    if write_marks(&tx, &marked, known).is_err() {
        undo(known, marked);
        return None;
    }
    match tx.commit() {
        Ok(()) => Some(Ok(positions)),
        Err(e) => {
            undo(known, marked);
            match &e {
                rusqlite::Error::SqliteFailure(f, _)
                    if f.code == rusqlite::ErrorCode::DatabaseBusy =>
                {
                    None
                }
                _ => Some(Err(StoreError::Sqlite { path, source: e })),
            }
        }
    }
}

/// A group committed by `Writer::log_now`.
#[derive(Debug, PartialEq, Eq)]
pub enum Logged {
    /// Committed; the events' positions, in order.
    Positions(Vec<i64>),
    /// Committed, but the WAL was replaced meanwhile (another copy of SQLite in the process
    /// deleted it): the writer thread must save it before these positions are acknowledged
    /// (`Op::Confirm`).
    Unconfirmed(Vec<i64>),
}

impl Writer {
    /// Commits `items` (bus-log events, one atomic group) on this thread if that needs no
    /// wait (see the module documentation); None when it cannot, with nothing written.
    pub fn log_now(&self, items: &[(String, NewEvent)]) -> Option<Result<Logged>> {
        if !self.no_fsync || self.is_closed() {
            return None;
        }
        let mut guard = self.core.try_lock()?;
        let core = guard.as_mut()?;
        if core.guard.detached {
            return None; // only reads from here on
        }
        let (log, known) = (&mut core.log, &mut core.known);
        if log.checkpoint_overdue() || log.wait_when_busy(false).is_err() {
            return None; // an overdue checkpoint is the writer thread's, before more commits
        }
        let outcome = commit_group(log, known, &self.marks, items);
        let _ = log.wait_when_busy(true);
        let positions = match outcome? {
            Ok(p) => p,
            Err(e) => return Some(Err(e)),
        };
        Some(Ok(if core.guard.still_ours() {
            Logged::Positions(positions)
        } else {
            Logged::Unconfirmed(positions)
        }))
    }
}
