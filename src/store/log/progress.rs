//! Durable subscriptions: where each starts, its finished ranges, and the events it has not
//! finished.

use rusqlite::{params, Connection, OptionalExtension};

use super::{row, Log, StoredRow, COLUMNS};
use crate::store::Result;

impl Log {
    /// Registers a durable subscription; a new one starts after the current head unless
    /// `from_beginning`. Returns where it starts after.
    pub fn register_subscription(&self, name: &str, from_beginning: bool) -> Result<i64> {
        if let Some(start) = self
            .conn
            .query_row(
                "SELECT start_after FROM subscriptions WHERE name = ?1",
                [name],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .map_err(|e| self.err(e))?
        {
            return Ok(start);
        }
        let start = if from_beginning { 0 } else { self.head()? };
        self.conn
            .execute(
                "INSERT INTO subscriptions (name, start_after) VALUES (?1, ?2)",
                params![name, start],
            )
            .map_err(|e| self.err(e))?;
        Ok(start)
    }

    /// Records that `subscription` finished the events at `first..=last`: extends the range
    /// that ends just before (`tail`, the one this connection wrote last, when it is), else
    /// adds one. Returns the range now ending at `last`.
    pub fn mark_range(
        tx: &Connection,
        subscription: &str,
        first: i64,
        last: i64,
        tail: Option<(i64, i64)>,
    ) -> rusqlite::Result<(i64, i64)> {
        if let Some((start, end)) = tail {
            if end + 1 == first
                && tx
                    .prepare_cached(
                        "UPDATE progress_ranges SET last = ?3 WHERE subscription = ?1 AND first = ?2",
                    )?
                    .execute(params![subscription, start, last])?
                    == 1
            {
                return Ok((start, last));
            }
        }
        tx.prepare_cached(
            "INSERT INTO progress_ranges (subscription, first, last) VALUES (?1, ?2, ?3)
             ON CONFLICT (subscription, first) DO UPDATE SET last = MAX(last, excluded.last)",
        )?
        .execute(params![subscription, first, last])?;
        Ok((first, last))
    }

    /// The finished ranges of a subscription ending after `after`, merged, in order; rewrites
    /// them merged when they were not.
    fn done_ranges(&self, subscription: &str, after: i64) -> Result<Vec<(i64, i64)>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT first, last FROM progress_ranges WHERE subscription = ?1 AND last > ?2 ORDER BY first",
            )
            .map_err(|e| self.err(e))?;
        let stored = stmt
            .query_map(params![subscription, after], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?
            .collect::<rusqlite::Result<Vec<(i64, i64)>>>()
            .map_err(|e| self.err(e))?;
        let mut merged: Vec<(i64, i64)> = Vec::with_capacity(stored.len());
        for (first, last) in stored.iter().copied() {
            match merged.last_mut() {
                Some(prev) if first <= prev.1 + 1 => prev.1 = prev.1.max(last),
                _ => merged.push((first, last)),
            }
        }
        if merged.len() < stored.len() {
            let write = || -> rusqlite::Result<()> {
                let tx = self.conn.unchecked_transaction()?;
                tx.execute(
                    "DELETE FROM progress_ranges WHERE subscription = ?1 AND last > ?2",
                    params![subscription, after],
                )?;
                for (first, last) in &merged {
                    Self::mark_range(&tx, subscription, *first, *last, None)?;
                }
                tx.commit()
            };
            write().map_err(|e| self.err(e))?;
        }
        Ok(merged)
    }

    /// Events after `start_after` that `subscription` has not finished, in order: the gaps
    /// between its finished ranges.
    pub fn undelivered(&self, subscription: &str, start_after: i64) -> Result<Vec<StoredRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE position > ?1 AND position < ?2 ORDER BY position"
            ))
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let mut from = start_after;
        let ranges = self.done_ranges(subscription, start_after)?;
        for (first, last) in ranges.into_iter().chain([(i64::MAX, i64::MAX)]) {
            if first > from + 1 {
                let rows = stmt
                    .query_map(params![from, first], row)
                    .map_err(|e| self.err(e))?;
                for r in rows {
                    out.push(r.map_err(|e| self.err(e))?);
                }
            }
            from = from.max(last);
        }
        Ok(out)
    }
}
