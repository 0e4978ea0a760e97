//! The store's errors; messages name the stream, versions or file involved.

/// What can go wrong in the event log.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to the stream first.
    #[error("concurrency conflict on stream {stream:?}: expected version {expected}, but it is at {actual}")]
    Concurrency {
        /// The stream appended to.
        stream: String,
        /// The version the caller expected the stream to be at.
        expected: i64,
        /// The version it was at.
        actual: i64,
    },
    /// SQLite failed (file missing, read-only, locked, corrupt, disk full, ...).
    #[error("SQLite error on {path}: {source}")]
    Sqlite {
        /// The database file.
        path: String,
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
    },
    /// A setting or argument out of range.
    #[error("{0}")]
    Invalid(String),
    /// The WAL was deleted or replaced while the store had the file open (another copy of
    /// SQLite in the process closed the file): writes are refused from then on.
    #[error("the SQLite WAL of {0} was deleted or replaced while oxbus had the file open: another copy of SQLite in this process (Python's sqlite3 module, for one) opened and closed the file. Everything acknowledged before was saved into the database file; this store takes no more writes: close it and open the file again, and read the log through oxbus (SqliteEventStore, oxbus.flow, the oxbus command), not sqlite3, while a bus has it open")]
    Detached(String),
    /// The store was closed.
    #[error("the event store {0} is closed")]
    Closed(String),
}

/// The store's result type.
pub type Result<T> = std::result::Result<T, StoreError>;
