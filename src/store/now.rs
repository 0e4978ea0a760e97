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
use crate::store::writer::{log_events, write_marks, Known, Marks, Op, Writer};
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

/// The bus-log requests of one loop turn, merged into one group for `Writer::log_now`, then
/// split back into their own answers, or into requests for the writer thread.
pub struct LogBatch {
    /// Each request's token and number of events, in order.
    parts: Vec<(u64, usize)>,
    /// Every request's events, in order.
    pub items: Vec<(String, NewEvent)>,
}

impl LogBatch {
    /// Merges `ops` when each is a bus-log request with a future (a nonzero token); hands
    /// them back as they were otherwise (other requests in them, or none).
    pub fn merge(ops: Vec<(u64, Op)>) -> std::result::Result<Self, Vec<(u64, Op)>> {
        let mergeable = !ops.is_empty()
            && ops
                .iter()
                .all(|(t, op)| *t != 0 && matches!(op, Op::Log { .. }));
        if !mergeable {
            return Err(ops);
        }
        let mut parts = Vec::with_capacity(ops.len());
        let mut items = Vec::new();
        for (token, op) in ops {
            if let Op::Log { items: mut part } = op {
                parts.push((token, part.len()));
                items.append(&mut part);
            }
        }
        Ok(Self { parts, items })
    }

    /// How many requests it merged.
    pub fn requests(&self) -> usize {
        self.parts.len()
    }

    /// The requests' tokens, in order.
    pub fn tokens(&self) -> Vec<u64> {
        self.parts.iter().map(|(t, _)| *t).collect()
    }

    /// Each request's positions, by token, from the group's `positions` (in order).
    pub fn split(&self, positions: Vec<i64>) -> Vec<(u64, Vec<i64>)> {
        let mut rest = positions.into_iter();
        self.parts
            .iter()
            .map(|&(t, n)| (t, rest.by_ref().take(n).collect()))
            .collect()
    }

    /// The requests again, for the writer thread: with the `positions` of a commit whose WAL
    /// the writer must save before they are acknowledged (`Logged::Unconfirmed`), to confirm;
    /// without (nothing was written), to log.
    pub fn unmerge(self, positions: Option<Vec<i64>>) -> Vec<(u64, Op)> {
        if let Some(p) = positions {
            return self
                .split(p)
                .into_iter()
                .map(|(t, part)| (t, Op::Confirm(part)))
                .collect();
        }
        let mut rest = self.items.into_iter();
        self.parts
            .into_iter()
            .map(|(t, n)| {
                let items = rest.by_ref().take(n).collect();
                (t, Op::Log { items })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(id: &str) -> (String, NewEvent) {
        (
            "s".to_owned(),
            NewEvent {
                event_type: "T".into(),
                event_version: 1,
                event_id: id.into(),
                data: "{}".into(),
                metadata: "{}".into(),
                occurred_at: None,
            },
        )
    }

    fn log(ids: &[&str]) -> Op {
        Op::Log {
            items: ids.iter().map(|id| event(id)).collect(),
        }
    }

    fn ids(op: &Op) -> Vec<&str> {
        match op {
            Op::Log { items } => items.iter().map(|(_, e)| e.event_id.as_str()).collect(),
            _ => panic!("a log request"),
        }
    }

    #[test]
    fn a_batch_merges_bus_log_requests_and_splits_their_positions_back() {
        let b = LogBatch::merge(vec![(7, log(&["a", "b"])), (9, log(&["c"]))])
            .ok()
            .unwrap();
        assert_eq!(
            (b.requests(), b.tokens(), b.items.len()),
            (2, vec![7, 9], 3)
        );
        assert_eq!(
            b.split(vec![10, 11, 12]),
            vec![(7, vec![10, 11]), (9, vec![12])]
        );
    }

    #[test]
    fn a_batch_unmerges_into_confirms_after_an_unconfirmed_commit_else_into_logs() {
        let b = LogBatch::merge(vec![(7, log(&["a", "b"])), (9, log(&["c"]))])
            .ok()
            .unwrap();
        let back = b.unmerge(Some(vec![10, 11, 12]));
        assert!(
            matches!(&back[..], [(7, Op::Confirm(p)), (9, Op::Confirm(q))] if *p == [10, 11] && *q == [12])
        );
        let b = LogBatch::merge(vec![(7, log(&["a", "b"])), (9, log(&["c"]))])
            .ok()
            .unwrap();
        let back = b.unmerge(None);
        assert_eq!(
            back.iter().map(|(t, op)| (*t, ids(op))).collect::<Vec<_>>(),
            vec![(7, vec!["a", "b"]), (9, vec!["c"])]
        );
    }

    #[test]
    fn requests_without_a_future_or_of_another_kind_are_handed_back_as_they_were() {
        for ops in [
            vec![(7, log(&["a"])), (0, log(&["b"]))],
            vec![(7, log(&["a"])), (8, Op::Confirm(vec![1]))],
            vec![],
        ] {
            let n = ops.len();
            let back = LogBatch::merge(ops).err().expect("not merged");
            assert_eq!(back.len(), n);
        }
    }
}
