//! The RabbitMQ transport's settings, as `oxbus.RabbitMQ.native()` gives them.

use std::time::Duration;

use pyo3::prelude::*;

use crate::python::errors;
use crate::transport::rabbitmq::{binding_keys, Config};

/// Every setting by name (a dict from Python), checked once here.
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
pub struct RabbitSettings {
    url: String,
    exchange: String,
    group: String,
    queue: String,
    partitions: usize,
    bindings: Vec<String>,
    prefetch: usize,
    max_deliveries: u32,
    connect_timeout: f64,
    publish_timeout: f64,
    consume: bool,
}

impl RabbitSettings {
    /// The transport's `Config`, or a `ConfigurationError` naming the setting and its value.
    pub fn config(self) -> PyResult<Config> {
        for (name, v) in [
            ("connect_timeout", self.connect_timeout),
            ("publish_timeout", self.publish_timeout),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(errors::configuration_error(format!(
                    "{name} must be a number of seconds > 0, got {v}"
                )));
            }
        }
        let prefetch = u16::try_from(self.prefetch)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                errors::configuration_error(format!(
                    "prefetch must be between 1 and 65535 (basic.qos), got {}",
                    self.prefetch
                ))
            })?;
        Ok(Config {
            url: self.url,
            exchange: self.exchange,
            group: self.group,
            queue: self.queue,
            partitions: self.partitions.max(1),
            bindings: binding_keys(self.bindings).map_err(|e| errors::to_py(&e))?,
            prefetch,
            max_deliveries: self.max_deliveries.max(1),
            connect_timeout: Duration::from_secs_f64(self.connect_timeout),
            publish_timeout: Duration::from_secs_f64(self.publish_timeout),
            consume: self.consume,
            existing: None,
        })
    }
}
