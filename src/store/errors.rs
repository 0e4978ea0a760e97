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
    /// The store was closed.
    #[error("the event store {0} is closed")]
    Closed(String),
}

/// The store's result type.
pub type Result<T> = std::result::Result<T, StoreError>;
