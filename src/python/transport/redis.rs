//! The Redis Streams transport's settings, as `oxbus.RedisStreams.native()` gives them.

use std::time::Duration;

use pyo3::prelude::*;

use crate::python::errors;
use crate::transport::redis_streams::Config;

/// Every setting by name (a dict from Python), checked once here.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct RedisSettings {
    url: String,
    streams: Vec<String>,
    group: String,
    consumer: String,
    claim_idle: f64,
    maxlen: usize,
    prefetch: usize,
    max_deliveries: u32,
    dead_stream: String,
    publish_timeout: f64,
    consume: bool,
    #[pyo3(default = 256)]
    batch: usize,
}

impl RedisSettings {
    /// The transport's `Config`, or a `ConfigurationError` naming the setting and its value.
    pub fn config(self) -> PyResult<Config> {
        for (name, v) in [
            ("claim_idle", self.claim_idle),
            ("publish_timeout", self.publish_timeout),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(errors::configuration_error(format!(
                    "{name} must be a number of seconds > 0, got {v}"
                )));
            }
        }
        Ok(Config {
            url: self.url,
            streams: self.streams,
            group: self.group,
            consumer: self.consumer,
            claim_idle: Duration::from_secs_f64(self.claim_idle),
            maxlen: self.maxlen,
            batch: self.batch.max(1),
            prefetch: self.prefetch.max(1),
            max_deliveries: self.max_deliveries.max(1),
            dead_stream: self.dead_stream,
            publish_timeout: Duration::from_secs_f64(self.publish_timeout),
            consume: self.consume,
        })
    }
}
