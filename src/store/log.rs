//! Schema and queries on one SQLite connection.
//!
//! `events.position` is the global order (an INTEGER PRIMARY KEY, so rows are stored in it;
//! without AUTOINCREMENT, which costs a write per insert: events are never deleted, so positions
//! are never reused);
//! `(stream_id, version)` is unique, which is what makes optimistic concurrency safe even
//! against another process writing the same file. Versions start at 1; `expected_version` is
//! the stream's version before the append (0 for a new stream).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

pub use crate::store::record::{now_iso, NewEvent};
use crate::store::{Result, StoreError};

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

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    position      INTEGER PRIMARY KEY,
    stream_id     TEXT    NOT NULL,
    version       INTEGER NOT NULL,
    event_type    TEXT    NOT NULL,
    event_version INTEGER NOT NULL,
    event_id      TEXT    NOT NULL UNIQUE,
    data          TEXT    NOT NULL,
    metadata      TEXT    NOT NULL,
    occurred_at   TEXT,
    recorded_at   TEXT    NOT NULL,
    UNIQUE (stream_id, version)
);
CREATE TABLE IF NOT EXISTS snapshots (
    stream_id TEXT PRIMARY KEY,
    version   INTEGER NOT NULL,
    state     TEXT    NOT NULL,
    taken_at  TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS progress_ranges (
    subscription TEXT    NOT NULL,
    first        INTEGER NOT NULL,
    last         INTEGER NOT NULL,
    PRIMARY KEY (subscription, first)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS skipped_types (
    subscription TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    PRIMARY KEY (subscription, event_type)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS subscriptions (
    name       TEXT PRIMARY KEY,
    start_after INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    position        INTEGER NOT NULL,
    subscription    TEXT    NOT NULL,
    attempts        INTEGER NOT NULL,
    first_failed_at TEXT    NOT NULL,
    last_failed_at  TEXT    NOT NULL,
    error_type      TEXT    NOT NULL,
    error_message   TEXT    NOT NULL,
    traceback       TEXT    NOT NULL,
    key_hash        INTEGER,
    parked_behind   INTEGER
);
";

/// `progress`: one row per (subscription, position it handled), read from the ranges, for the
/// command line and for SQL users. A subscription's ranges also cover the events it does not
/// take (so they stay few: one per run of finished positions, whatever the traffic), and
/// `skipped_types` names the types it was routed none of; the view leaves those out. Deleting
/// a row from it splits its range (the CLI's `dlq retry` re-queues a finished position so),
/// inserting one adds a one-position range.
const PROGRESS_VIEW: &str = "
CREATE VIEW IF NOT EXISTS progress (subscription, position) AS
    SELECT DISTINCT r.subscription, e.position
    FROM progress_ranges r JOIN events e ON e.position BETWEEN r.first AND r.last
    WHERE NOT EXISTS (SELECT 1 FROM skipped_types k
                      WHERE k.subscription = r.subscription AND k.event_type = e.event_type);
CREATE TRIGGER IF NOT EXISTS progress_delete INSTEAD OF DELETE ON progress BEGIN
    INSERT OR IGNORE INTO progress_ranges (subscription, first, last)
        SELECT subscription, OLD.position + 1, last FROM progress_ranges
        WHERE subscription = OLD.subscription AND first <= OLD.position AND last > OLD.position;
    DELETE FROM progress_ranges
        WHERE subscription = OLD.subscription AND first = OLD.position;
    UPDATE progress_ranges SET last = OLD.position - 1
        WHERE subscription = OLD.subscription AND first < OLD.position AND last >= OLD.position;
END;
CREATE TRIGGER IF NOT EXISTS progress_insert INSTEAD OF INSERT ON progress BEGIN
    INSERT OR IGNORE INTO progress_ranges (subscription, first, last)
        VALUES (NEW.subscription, NEW.position, NEW.position);
END;
";

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

/// Files written before progress was kept as ranges have a `progress` table of positions:
/// turn it into ranges (one per position; merged when the subscription is next replayed).
const MIGRATE_PROGRESS: &str = "
INSERT OR IGNORE INTO progress_ranges (subscription, first, last)
    SELECT subscription, position, position FROM progress;
DROP TABLE progress;
";

/// Why a file whose `progress` table is not oxbus's is refused (it is never dropped).
const FOREIGN_PROGRESS: &str = "has a table named \"progress\" that oxbus did not write (oxbus keeps a view of that name); the file is refused so the table is not touched: use another file for the event log";

/// A file path written for an SQLite URI (`file:` + the path, percent-encoded).
fn uri_path(path: &str) -> String {
    use std::fmt::Write as _;
    let abs = std::path::absolute(path)
        .map_or_else(|_| path.to_owned(), |p| p.to_string_lossy().into_owned());
    let mut out = String::with_capacity(abs.len());
    for b in abs.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
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
    /// Opens (creating if needed) the log at `path` (`":memory:"` for a private in-memory one).
    pub fn open(path: &str, sync: Synchronous) -> Result<Self> {
        let conn = Connection::open(path).map_err(|e| StoreError::Sqlite {
            path: path.to_owned(),
            source: e,
        })?;
        let log = Self {
            overdue: Arc::default(),
            conn,
            path: path.to_owned(),
        };
        let sync_sql = match sync {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        };
        // The bundled SQLite has STAT4, which re-prepares a statement whenever a value bound in
        // its WHERE clause changes (the stream version query, on every append): ask for stable
        // plans instead.
        log.conn
            .set_db_config(
                rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
                true,
            )
            .map_err(|e| log.err(e))?;
        // The busy timeout first: switching to WAL and creating the schema take locks that
        // another process or thread opening the same new file may hold for a moment.
        log.conn
            .busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| log.err(e))?;
        // Switching a brand-new file to WAL can report SQLITE_BUSY at once, without waiting
        // for the busy timeout, while another opener does the same: retry for a while.
        let pragmas = format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync_sql}; PRAGMA foreign_keys=ON; PRAGMA temp_store=MEMORY; PRAGMA cache_size=-32768;"
        );
        let mut tries = 0;
        loop {
            match log.conn.execute_batch(&pragmas) {
                Ok(()) => break,
                Err(rusqlite::Error::SqliteFailure(f, _))
                    if f.code == rusqlite::ErrorCode::DatabaseBusy && tries < 500 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(log.err(e)),
            }
        }
        // One transaction, so a concurrent opener sees the whole schema or waits for it.
        let schema = || -> Result<()> {
            let sql = |e| log.err(e);
            log.conn
                .execute_batch(&format!(
                    "BEGIN IMMEDIATE; {SCHEMA} {}",
                    crate::store::saga::SCHEMA
                ))
                .map_err(sql)?;
            let old_progress: bool = log
                .conn
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'progress' AND type = 'table')",
                    [],
                    |r| r.get(0),
                )
                .map_err(sql)?;
            if old_progress {
                if !Self::is_old_progress(&log.conn).map_err(sql)? {
                    return Err(StoreError::Invalid(format!("{path}: {FOREIGN_PROGRESS}")));
                }
                log.conn.execute_batch(MIGRATE_PROGRESS).map_err(sql)?;
            }
            let view: Option<String> = log
                .conn
                .query_row(
                    "SELECT sql FROM sqlite_master WHERE name = 'progress' AND type = 'view'",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql)?;
            if view.is_some_and(|v| !v.contains("skipped_types")) {
                // Written before ranges covered skipped events: the view (and its triggers)
                // is made again.
                log.conn.execute_batch("DROP VIEW progress").map_err(sql)?;
            }
            log.conn
                .execute_batch(&format!("{PROGRESS_VIEW} COMMIT;"))
                .map_err(sql)
        };
        if let Err(e) = schema() {
            if !log.conn.is_autocommit() {
                let _ = log.conn.execute_batch("ROLLBACK");
            }
            return Err(e);
        }
        // Files written before dead letters kept their key: add the columns.
        for col in ["key_hash", "parked_behind"] {
            let _ = log.conn.execute_batch(&format!(
                "ALTER TABLE dead_letters ADD COLUMN {col} INTEGER"
            ));
        }
        Ok(log)
    }

    /// Whether the `progress` table is the one oxbus wrote before progress was kept as ranges
    /// (exactly the columns `subscription`, `position`), beside the log's `events` table.
    fn is_old_progress(conn: &Connection) -> rusqlite::Result<bool> {
        let mut cols: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('progress')")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        cols.sort();
        Ok(cols == ["position", "subscription"])
    }

    /// Opens an existing log for reading only: never creates the file or changes it, and
    /// works in a read-only directory. A missing file, a file that is not SQLite, or a
    /// database without the log's tables is an error naming the path.
    pub fn open_read_only(path: &str) -> Result<Self> {
        use rusqlite::OpenFlags;
        let invalid = |why: String| StoreError::Invalid(format!("{path}: {why}"));
        if in_memory(path) {
            return Err(invalid(
                "a private in-memory database cannot be opened read-only".into(),
            ));
        }
        if !std::path::Path::new(path).is_file() {
            return Err(invalid("no such file".into()));
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let open = |target: &str, flags: OpenFlags| -> Result<(Self, Vec<String>)> {
            let conn =
                Connection::open_with_flags(target, flags).map_err(|e| StoreError::Sqlite {
                    path: path.to_owned(),
                    source: e,
                })?;
            let log = Self {
                overdue: Arc::default(),
                conn,
                path: path.to_owned(),
            };
            log.conn
                .busy_timeout(std::time::Duration::from_secs(5))
                .map_err(|e| log.err(e))?;
            let names: Vec<String> = (|| {
                log.conn
                    .prepare("SELECT name FROM sqlite_master WHERE type IN ('table', 'view')")?
                    .query_map([], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()
            })()
            .map_err(|e| invalid(format!("cannot read: {e}")))?;
            Ok((log, names))
        };
        let (log, names) = match open(path, flags) {
            Ok(found) => found,
            // A WAL database whose -wal and -shm are gone (closed cleanly) in a directory we
            // cannot write to: nobody can write it either, so it is read as immutable.
            Err(e) if !std::path::Path::new(&format!("{path}-wal")).exists() => {
                let uri = format!("file:{}?immutable=1", uri_path(path));
                open(&uri, flags | OpenFlags::SQLITE_OPEN_URI).map_err(|_| e)?
            }
            Err(e) => return Err(e),
        };
        let missing: Vec<&str> = ["events", "progress", "subscriptions", "dead_letters"]
            .into_iter()
            .filter(|t| !names.iter().any(|n| n == t))
            .collect();
        if !missing.is_empty() {
            return Err(invalid(format!(
                "not an oxbus event log (no table {})",
                missing.join(", ")
            )));
        }
        Ok(log)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(i: usize) -> NewEvent {
        NewEvent {
            event_id: format!("id-{i}"),
            event_type: "T".into(),
            event_version: 1,
            data: format!("{{\"i\":{i}}}"),
            metadata: "{}".into(),
            occurred_at: None,
        }
    }

    #[test]
    fn versions_start_at_one_and_expected_version_guards_appends() {
        let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
        let path = log.path().to_owned();
        let tx = log.begin().unwrap();
        assert_eq!(
            Log::append(&tx, &path, "s", &[ev(1), ev(2)], Some(0))
                .unwrap()
                .0,
            2
        );
        let err = Log::append(&tx, &path, "s", &[ev(3)], Some(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "concurrency conflict on stream \"s\": expected version 1, but it is at 2"
        );
        assert_eq!(Log::append(&tx, &path, "s", &[ev(3)], None).unwrap().0, 3);
        tx.commit().unwrap();
        let rows = log.read("s", 1).unwrap();
        assert_eq!(rows.iter().map(|r| r.version).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(log.read_all(0, 2).unwrap().len(), 2);
        assert_eq!(log.head().unwrap(), 3);
    }

    #[test]
    fn snapshots_replace_and_load() {
        let log = Log::open(":memory:", Synchronous::Full).unwrap();
        assert!(log.load_snapshot("a").unwrap().is_none());
        log.save_snapshot("a", 3, "{\"x\":1}").unwrap();
        log.save_snapshot("a", 5, "{\"x\":2}").unwrap();
        let s = log.load_snapshot("a").unwrap().unwrap();
        assert_eq!((s.version, s.state.as_str()), (5, "{\"x\":2}"));
    }

    #[test]
    fn undelivered_skips_done_positions_and_starts_where_registered() {
        let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
        let path = log.path().to_owned();
        let tx = log.begin().unwrap();
        Log::append(&tx, &path, "s", &[ev(1), ev(2), ev(3)], None).unwrap();
        Log::mark_range(&tx, "sub", 2, 2, None).unwrap();
        tx.commit().unwrap();
        assert_eq!(log.register_subscription("sub", true).unwrap(), 0);
        assert_eq!(log.register_subscription("late", false).unwrap(), 3);
        let left: Vec<i64> = log
            .undelivered("sub", 0)
            .unwrap()
            .iter()
            .map(|r| r.position)
            .collect();
        assert_eq!(left, [1, 3]);
    }

    fn positions(log: &Log, sub: &str, after: i64) -> Vec<i64> {
        log.undelivered(sub, after)
            .unwrap()
            .iter()
            .map(|r| r.position)
            .collect()
    }

    #[test]
    fn finished_ranges_leave_gaps_merge_and_split_through_the_progress_view() {
        let mut log = Log::open(":memory:", Synchronous::Normal).unwrap();
        let path = log.path().to_owned();
        let events: Vec<NewEvent> = (1..=10).map(ev).collect();
        let tx = log.begin().unwrap();
        Log::append(&tx, &path, "s", &events, None).unwrap();
        let tail = Log::mark_range(&tx, "sub", 1, 3, None).unwrap();
        assert_eq!(
            Log::mark_range(&tx, "sub", 4, 4, Some(tail)).unwrap(),
            (1, 4)
        );
        Log::mark_range(&tx, "sub", 6, 7, None).unwrap();
        Log::mark_range(&tx, "sub", 7, 8, None).unwrap(); // overlapping: merged when read
        Log::mark_range(&tx, "other", 1, 10, None).unwrap();
        tx.commit().unwrap();
        assert_eq!(positions(&log, "sub", 0), [5, 9, 10]);
        assert_eq!(positions(&log, "sub", 6), [9, 10]);
        let n: i64 = log
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM progress_ranges WHERE subscription = 'sub'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 2, "rewritten merged: 1-4 and 6-8");
        let viewed: i64 = log
            .conn()
            .query_row(
                "SELECT COUNT(*) FROM progress WHERE subscription = 'sub'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(viewed, 7);
        // Deleting a finished position through the view splits its range.
        log.conn()
            .execute(
                "DELETE FROM progress WHERE subscription = 'sub' AND position IN (2, 6)",
                [],
            )
            .unwrap();
        assert_eq!(positions(&log, "sub", 0), [2, 5, 6, 9, 10]);
        assert_eq!(positions(&log, "other", 0), Vec::<i64>::new());
    }

    #[test]
    fn a_file_with_the_old_progress_table_is_migrated_to_ranges() {
        let dir = std::env::temp_dir().join(format!("oxbus-migrate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("old.db").to_string_lossy().into_owned();
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE progress (subscription TEXT NOT NULL, position INTEGER NOT NULL,
                 PRIMARY KEY (subscription, position)) WITHOUT ROWID;
                 INSERT INTO progress VALUES ('sub', 1), ('sub', 2), ('sub', 4);",
            )
            .unwrap();
        }
        let mut log = Log::open(&path, Synchronous::Normal).unwrap();
        let p = log.path().to_owned();
        let tx = log.begin().unwrap();
        Log::append(&tx, &p, "s", &[ev(1), ev(2), ev(3), ev(4)], None).unwrap();
        tx.commit().unwrap();
        assert_eq!(positions(&log, "sub", 0), [3]);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_synchronous_names_the_value() {
        assert_eq!(
            Synchronous::parse("sometimes").unwrap_err().to_string(),
            "synchronous must be \"normal\" or \"full\", got \"sometimes\""
        );
    }
}
