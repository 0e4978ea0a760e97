//! Beyond one process: the bus over Redis Streams (consumer groups), and the plumbing for a
//! Pub/Sub bridge. Pure Rust on tokio; the glue in `src/python` turns deliveries into local
//! dispatch and batches every hand-off to the asyncio loop.

pub mod leases;
pub mod pubsub;
pub mod redis_streams;

pub use redis_streams::{Config, Deliver, Entry, Health, Transport, TransportError};
