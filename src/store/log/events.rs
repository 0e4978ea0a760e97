//! Events and snapshots: appends with their version check, single inserts, reads by stream
//! and by position, the head, snapshots.

use rusqlite::{params, Connection, OptionalExtension};

use super::{now_iso, row, Log, NewEvent, Snapshot, StoredRow, COLUMNS};
use crate::store::{Result, StoreError};

impl Log {
    /// The stream's version (0 when it has no events).
    pub fn version(tx: &Connection, stream: &str) -> rusqlite::Result<i64> {
        tx.prepare_cached("SELECT COALESCE(MAX(version), 0) FROM events WHERE stream_id = ?1")?
            .query_row([stream], |r| r.get(0))
    }

    /// Appends `events` to `stream` inside `tx`; returns (new version, first position).
    /// With `expected`, fails with `Concurrency` unless the stream is at that version.
    pub fn append(
        tx: &Connection,
        path: &str,
        stream: &str,
        events: &[NewEvent],
        expected: Option<i64>,
    ) -> Result<(i64, i64)> {
        let sqlite = |e| StoreError::Sqlite {
            path: path.to_owned(),
            source: e,
        };
        let current = Self::version(tx, stream).map_err(sqlite)?;
        if let Some(expected) = expected {
            if expected != current {
                return Err(StoreError::Concurrency {
                    stream: stream.to_owned(),
                    expected,
                    actual: current,
                });
            }
        }
        let recorded = now_iso();
        let mut version = current;
        let mut first = 0;
        let mut stmt = Self::inserter(tx, path)?;
        for e in events {
            version += 1;
            let Some(position) = Self::insert(&mut stmt, tx, path, stream, version, e, &recorded)?
            else {
                // Another process won the race between our version read and this insert.
                return Err(StoreError::Concurrency {
                    stream: stream.to_owned(),
                    expected: expected.unwrap_or(current),
                    actual: version,
                });
            };
            if first == 0 {
                first = position;
            }
        }
        Ok((version, first))
    }

    /// The statement `insert` runs (prepared once per batch of inserts).
    pub fn inserter<'c>(tx: &'c Connection, path: &str) -> Result<rusqlite::CachedStatement<'c>> {
        tx.prepare_cached(
            "INSERT INTO events (stream_id, version, event_type, event_version, event_id, data, metadata, occurred_at, recorded_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .map_err(|e| StoreError::Sqlite {
            path: path.to_owned(),
            source: e,
        })
    }

    /// Inserts one event as `version` of `stream` with `stmt` (from `inserter`); returns its
    /// position, or None when the stream already has that version (another writer got there
    /// first).
    pub fn insert(
        stmt: &mut rusqlite::CachedStatement<'_>,
        tx: &Connection,
        path: &str,
        stream: &str,
        version: i64,
        e: &NewEvent,
        recorded: &str,
    ) -> Result<Option<i64>> {
        let sqlite = |e| StoreError::Sqlite {
            path: path.to_owned(),
            source: e,
        };
        match stmt.execute(params![
            stream,
            version,
            e.event_type,
            e.event_version,
            e.event_id,
            e.data,
            e.metadata,
            e.occurred_at,
            recorded
        ]) {
            Ok(_) => Ok(Some(tx.last_insert_rowid())),
            Err(rusqlite::Error::SqliteFailure(f, Some(ref msg)))
                if f.code == rusqlite::ErrorCode::ConstraintViolation
                    && msg.contains("stream_id") =>
            {
                Ok(None)
            }
            Err(other) => Err(sqlite(other)),
        }
    }

    /// Events of one stream after `after_version`, in order.
    pub fn read(&self, stream: &str, after_version: i64) -> Result<Vec<StoredRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!("SELECT {COLUMNS} FROM events WHERE stream_id = ?1 AND version > ?2 ORDER BY version"))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![stream, after_version], row)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Up to `limit` events after `after_position`, in global order.
    pub fn read_all(&self, after_position: i64, limit: i64) -> Result<Vec<StoredRow>> {
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE position > ?1 ORDER BY position LIMIT ?2"
            ))
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![after_position, limit], row)
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// The last position in the log (0 when empty).
    pub fn head(&self) -> Result<i64> {
        self.conn
            .query_row("SELECT COALESCE(MAX(position), 0) FROM events", [], |r| {
                r.get(0)
            })
            .map_err(|e| self.err(e))
    }

    /// Saves (replacing) the snapshot of a stream.
    pub fn save_snapshot(&self, stream: &str, version: i64, state: &str) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO snapshots (stream_id, version, state, taken_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(stream_id) DO UPDATE SET version = excluded.version, state = excluded.state, taken_at = excluded.taken_at",
                params![stream, version, state, now_iso()],
            )
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    /// The latest snapshot of a stream.
    pub fn load_snapshot(&self, stream: &str) -> Result<Option<Snapshot>> {
        self.conn
            .query_row(
                "SELECT stream_id, version, state, taken_at FROM snapshots WHERE stream_id = ?1",
                [stream],
                |r| {
                    Ok(Snapshot {
                        stream_id: r.get(0)?,
                        version: r.get(1)?,
                        state: r.get(2)?,
                        taken_at: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// The row at a position.
    pub fn at(&self, position: i64) -> Result<Option<StoredRow>> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM events WHERE position = ?1"),
                [position],
                row,
            )
            .optional()
            .map_err(|e| self.err(e))
    }
}
