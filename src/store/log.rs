//! Schema and queries on one SQLite connection.
//!
//! `events.position` is the global order (an INTEGER PRIMARY KEY, so rows are stored in it;
//! without AUTOINCREMENT, which costs a write per insert: events are never deleted, so positions
//! are never reused);
//! `(stream_id, version)` is unique, which is what makes optimistic concurrency safe even
//! against another process writing the same file. Versions start at 1; `expected_version` is
//! the stream's version before the append (0 for a new stream).
//!
//! Here: the rows, the connection and its accessors. Opening and the schema are in `open`,
//! events and snapshots in `events`, subscriptions and their progress in `progress`, dead
//! letters in `dead`, WAL checkpoints in `checkpoints`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use rusqlite::types::Value;
use rusqlite::{Connection, Transaction};

pub use crate::store::record::{now_iso, NewEvent};
use crate::store::{Result, StoreError};

mod checkpoints;
mod dead;
mod events;
mod open;
mod progress;

/// A row of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRow {
    /// Global order, from 1.
    pub position: i64,
    /// The stream.
    pub stream_id: String,
    /// Version within the stream, from 1.
    pub version: i64,
    /// The type key.
    pub event_type: String,
    /// The schema version of `data`.
    pub event_version: i64,
    /// JSON object.
    pub data: String,
    /// JSON object.
    pub metadata: String,
    /// Unique id.
    pub event_id: String,
    /// When it happened (ISO 8601), if known.
    pub occurred_at: Option<String>,
    /// When it was committed (ISO 8601, UTC).
    pub recorded_at: String,
}

/// A snapshot of an aggregate's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The stream it summarises.
    pub stream_id: String,
    /// The stream version it reflects.
    pub version: i64,
    /// JSON.
    pub state: String,
    /// When it was taken (ISO 8601, UTC).
    pub taken_at: String,
}

/// A dead letter row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadRow {
    /// Row id.
    pub id: i64,
    /// Position of the event in the log.
    pub position: i64,
    /// Subscription name.
    pub subscription: String,
    /// Attempts made.
    pub attempts: i64,
    /// First failure (ISO 8601).
    pub first_failed_at: String,
    /// Last failure (ISO 8601).
    pub last_failed_at: String,
    /// Qualified exception class name.
    pub error_type: String,
    /// `str(exception)`.
    pub error_message: String,
    /// Formatted traceback.
    pub traceback: String,
    /// The key's lane hash, when the subscription parks keys behind dead letters.
    pub key_hash: Option<i64>,
    /// For an event parked behind a dead letter: the log position of that dead letter.
    pub parked_behind: Option<i64>,
}

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// Survives a process crash (WAL, synchronous=NORMAL).
    Normal,
    /// Survives power loss (WAL, synchronous=FULL).
    Full,
}

impl Synchronous {
    /// Parses "normal" / "full" (any case).
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "normal" => Ok(Self::Normal),
            "full" => Ok(Self::Full),
            _ => Err(StoreError::Invalid(format!(
                "synchronous must be \"normal\" or \"full\", got {s:?}"
            ))),
        }
    }
}

/// Whether `path` names a private in-memory database.
pub fn in_memory(path: &str) -> bool {
    path.is_empty() || path == ":memory:" || path.contains("mode=memory")
}

/// One connection to the log.
pub struct Log {
    conn: Connection,
    path: String,
    /// Set by the WAL hook when the WAL outgrew `delegate_checkpoints`'s `inline_at`.
    overdue: Arc<AtomicBool>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<StoredRow> {
    Ok(StoredRow {
        position: r.get(0)?,
        stream_id: r.get(1)?,
        version: r.get(2)?,
        event_type: r.get(3)?,
        event_version: r.get(4)?,
        event_id: r.get(5)?,
        data: r.get(6)?,
        metadata: r.get(7)?,
        occurred_at: r.get(8)?,
        recorded_at: r.get(9)?,
    })
}

const COLUMNS: &str =
    "position, stream_id, version, event_type, event_version, event_id, data, metadata, occurred_at, recorded_at";

impl Log {
    /// Runs one read-only SQL statement (the admin tools' counts and listings) and returns
    /// its rows; a statement that would write is refused.
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Vec<Value>>> {
        let mut stmt = self.conn.prepare(sql).map_err(|e| self.err(e))?;
        if !stmt.readonly() {
            return Err(StoreError::Invalid(format!(
                "query() runs read-only statements only, got {sql:?}"
            )));
        }
        let n = stmt.column_count();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(params), |r| {
                (0..n).map(|i| r.get::<_, Value>(i)).collect()
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .map_err(|e| self.err(e))
    }

    /// Wraps a SQLite error with the file name.
    pub fn err(&self, e: rusqlite::Error) -> StoreError {
        StoreError::Sqlite {
            path: self.path.clone(),
            source: e,
        }
    }

    /// The connection itself (for tests and one-off queries on the writer thread).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Waits (`true`, the default of every log) or not (`false`) when SQLite is busy; see
    /// [`busy_wait`].
    pub fn wait_when_busy(&self, on: bool) -> Result<()> {
        wait_when_busy(&self.conn, on).map_err(|e| self.err(e))
    }

    /// The file path as given.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Starts a write transaction (`BEGIN IMMEDIATE`: the write lock is taken up front).
    pub fn begin(&mut self) -> Result<Transaction<'_>> {
        let path = self.path.clone();
        self.conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|e| StoreError::Sqlite { path, source: e })
    }
}

/// How a connection waits for a lock another connection holds: SQLite's own busy timeout
/// sleeps 1, 2, 5, 10 ms... between tries, so a writer held up for a moment by the checkpoint
/// thread (its RESTART pass holds the write lock through an fsync, ~0.5 ms here) waited 3 or
/// 8 ms. This tries again every 50 µs for the first 5 ms, then every millisecond: 5 s in all,
/// as before.
unsafe extern "C" fn busy_wait(
    _: *mut std::os::raw::c_void,
    tries: std::os::raw::c_int,
) -> std::os::raw::c_int {
    let pause_us = match tries {
        0..100 => 50,
        100..5_095 => 1_000,
        _ => return 0,
    };
    std::thread::sleep(std::time::Duration::from_micros(pause_us));
    1
}

/// Installs [`busy_wait`] on `conn` (`on`), or no busy handler: SQLITE_BUSY at once.
pub(crate) fn wait_when_busy(conn: &Connection, on: bool) -> rusqlite::Result<()> {
    // SAFETY: the handle is the live connection's; `busy_wait` is a plain function that
    // touches no state (its argument is unused) and cannot unwind.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_busy_handler(
            conn.handle(),
            on.then_some(busy_wait as _),
            std::ptr::null_mut(),
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        Ok(())
    } else {
        Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rc),
            None,
        ))
    }
}

#[cfg(test)]
mod tests;
