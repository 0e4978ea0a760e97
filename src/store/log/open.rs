//! Opening a log: the schema (tables, the `progress` view and its triggers), the migration of
//! files written before progress was kept as ranges, and read-only opening.

use std::sync::Arc;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{in_memory, Log, Synchronous};
use crate::store::{Result, StoreError};

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

impl Log {
    /// A connection to `target` (the file, or a URI naming it) as the log at `path`.
    fn connect(target: &str, path: &str, flags: OpenFlags) -> Result<Self> {
        let conn = Connection::open_with_flags(target, flags).map_err(|e| StoreError::Sqlite {
            path: path.to_owned(),
            source: e,
        })?;
        Ok(Self {
            overdue: Arc::default(),
            conn,
            path: path.to_owned(),
        })
    }

    /// Opens (creating if needed) the log at `path` (`":memory:"` for a private in-memory one).
    pub fn open(path: &str, sync: Synchronous) -> Result<Self> {
        let log = Self::connect(path, path, OpenFlags::default())?;
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
        // The busy handler first: switching to WAL and creating the schema take locks that
        // another process or thread opening the same new file may hold for a moment.
        log.wait_when_busy(true)?;
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
            let log = Self::connect(target, path, flags)?;
            log.wait_when_busy(true)?;
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
}
