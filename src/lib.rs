//! oxbus: the Rust engine of an asyncio event bus.
//!
//! `core` (routing, lanes, statistics, health) never imports pyo3; `python` is the glue that
//! builds the `oxbus._oxbus` extension module. `cargo test --no-default-features` proves the
//! engine builds and passes without Python.

pub mod core;
#[cfg(feature = "python")]
mod python;
pub mod store;
pub mod transport;
