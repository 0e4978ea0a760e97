//! Dead letters: adding, listing, removing, and re-queueing them for the next start.

use rusqlite::params;

use super::{DeadRow, Log};
use crate::store::{Result, StoreError};

/// Takes one position out of a subscription's finished ranges (?1 subscription, ?2 position),
/// splitting the range that holds it: the next start delivers it again.
const UNFINISH: [&str; 3] = [
    "INSERT OR IGNORE INTO progress_ranges (subscription, first, last)
        SELECT subscription, ?2 + 1, last FROM progress_ranges
        WHERE subscription = ?1 AND first <= ?2 AND last > ?2",
    "DELETE FROM progress_ranges WHERE subscription = ?1 AND first = ?2",
    "UPDATE progress_ranges SET last = ?2 - 1
        WHERE subscription = ?1 AND first < ?2 AND last >= ?2",
];

impl Log {
    /// Re-queues dead letters (all with None): removes them and the record that their
    /// subscription finished their event, in one transaction, so the next start delivers the
    /// event again to that subscription only. Returns (id, subscription, position) of each;
    /// when an id is unknown nothing is changed and the error names it.
    pub fn requeue_dead_letters(&self, ids: Option<&[i64]>) -> Result<Vec<(i64, String, i64)>> {
        type Chosen = std::result::Result<Vec<(i64, String, i64)>, Vec<i64>>;
        let run = || -> rusqlite::Result<Chosen> {
            let tx = self.conn.unchecked_transaction()?;
            let all: Vec<(i64, String, i64)> = tx
                .prepare("SELECT id, subscription, position FROM dead_letters ORDER BY id")?
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect::<rusqlite::Result<_>>()?;
            let chosen: Vec<(i64, String, i64)> = match ids {
                None => all,
                Some(ids) => {
                    let missing: Vec<i64> = ids
                        .iter()
                        .copied()
                        .filter(|i| !all.iter().any(|(id, _, _)| id == i))
                        .collect();
                    if !missing.is_empty() {
                        return Ok(Err(missing));
                    }
                    all.into_iter()
                        .filter(|(id, _, _)| ids.contains(id))
                        .collect()
                }
            };
            for (id, sub, pos) in &chosen {
                tx.execute("DELETE FROM dead_letters WHERE id = ?1", [id])?;
                for sql in UNFINISH {
                    tx.execute(sql, params![sub, pos])?;
                }
            }
            tx.commit()?;
            Ok(Ok(chosen))
        };
        match run().map_err(|e| self.err(e))? {
            Ok(rows) => Ok(rows),
            Err(missing) => Err(StoreError::Invalid(format!(
                "no dead letter with id {} in {}",
                missing
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                self.path
            ))),
        }
    }

    /// Adds a dead letter; returns its id.
    pub fn add_dead_letter(&self, d: &DeadRow) -> Result<i64> {
        self.conn
            .execute(
                "INSERT INTO dead_letters (position, subscription, attempts, first_failed_at, last_failed_at, error_type, error_message, traceback, key_hash, parked_behind)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![d.position, d.subscription, d.attempts, d.first_failed_at, d.last_failed_at, d.error_type, d.error_message, d.traceback, d.key_hash, d.parked_behind],
            )
            .map_err(|e| self.err(e))?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<DeadRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, position, subscription, attempts, first_failed_at, last_failed_at, error_type, error_message, traceback, key_hash, parked_behind
                 FROM dead_letters ORDER BY id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(DeadRow {
                    id: r.get(0)?,
                    position: r.get(1)?,
                    subscription: r.get(2)?,
                    attempts: r.get(3)?,
                    first_failed_at: r.get(4)?,
                    last_failed_at: r.get(5)?,
                    error_type: r.get(6)?,
                    error_message: r.get(7)?,
                    traceback: r.get(8)?,
                    key_hash: r.get(9)?,
                    parked_behind: r.get(10)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Deletes dead letters by id (all when `ids` is None); returns how many.
    pub fn remove_dead_letters(&self, ids: Option<&[i64]>) -> Result<usize> {
        match ids {
            None => self
                .conn
                .execute("DELETE FROM dead_letters", [])
                .map_err(|e| self.err(e)),
            Some(ids) => {
                let mut n = 0;
                for id in ids {
                    n += self
                        .conn
                        .execute("DELETE FROM dead_letters WHERE id = ?1", [id])
                        .map_err(|e| self.err(e))?;
                }
                Ok(n)
            }
        }
    }
}
