//! The SQLite event log: streams with optimistic concurrency, a global order, snapshots,
//! durable subscription progress, dead letters and saga instances.
//!
//! `log` is the schema and the queries on one connection; `writer` owns that connection on a
//! thread of its own and applies requests in batches (group commit), handing results back in
//! batches too; `now` commits a small bus-log group on the calling thread when that costs no
//! wait, and `pacing` says when a publish may do so. Nothing here imports pyo3.

pub mod errors;
pub mod log;
pub mod now;
pub mod pacing;
pub mod record;
pub mod saga;
pub mod writer;

pub use errors::{Result, StoreError};
