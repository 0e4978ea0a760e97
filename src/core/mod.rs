//! The engine, free of Python: the bus's state machine, routing, per-key lanes, statistics,
//! health.
//!
//! Nothing in here imports pyo3. The Python glue in `src/python` instantiates these types
//! with Python objects as payloads; `cargo test --no-default-features` tests them alone.

pub mod breaker;
pub mod bus;
pub mod cache;
pub mod dispatch;
pub mod errors;
pub mod health;
pub mod lanes;
pub mod plan;
pub mod report;
pub mod retry;
pub mod routing;
pub mod stats;
pub mod watch;

pub use errors::{CoreError, Result};
