//! The Redis Streams transport's settings, as `oxbus.RedisStreams.native()` gives them.

use std::time::Duration;

use pyo3::prelude::*;

use crate::python::errors;
use crate::transport::leases::{self, LeaseConfig};
use crate::transport::redis_streams::{redact, Config};
use crate::transport::TransportError;

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
    /// The base stream name (the lease keys derive from it), with `lease_ttl`.
    #[pyo3(default)]
    stream: Option<String>,
    /// Seconds; `None`: no partition leases.
    #[pyo3(default)]
    lease_ttl: Option<f64>,
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
        let leases = match (self.stream, self.lease_ttl) {
            (Some(stream), Some(ttl)) => Some(LeaseConfig {
                stream,
                ttl: lease_ttl_of(ttl)?,
            }),
            _ => None,
        };
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
            leases,
        })
    }
}

/// A lease TTL in seconds, checked: 0.1 s to a day (the heartbeat runs every third of it).
fn lease_ttl_of(ttl: f64) -> PyResult<Duration> {
    if (0.1..=86_400.0).contains(&ttl) {
        Ok(Duration::from_secs_f64(ttl))
    } else {
        Err(errors::configuration_error(format!(
            "lease_ttl must be a number of seconds from 0.1 to 86400, got {ttl}"
        )))
    }
}

/// What `oxbus health redis://...` shows of a group: (partitions, lease TTL in s, [(member,
/// s left)], [(holder, s left) or None per partition]).
pub type GroupView = (usize, f64, Vec<(String, f64)>, Vec<Option<(String, f64)>>);

/// Reads the members and partition leases of `group` on `stream` (changes nothing).
pub async fn read_group(url: String, stream: String, group: String) -> PyResult<GroupView> {
    let v = leases::read_group(&url, &stream, &group)
        .await
        .map_err(|e| {
            errors::to_py(&TransportError::Broker {
                broker: "redis",
                url: redact(&url),
                message: e.to_string(),
            })
        })?;
    #[allow(clippy::cast_precision_loss)]
    let s = |ms: i64| ms as f64 / 1000.0;
    Ok((
        v.partitions,
        v.lease_ttl_ms as f64 / 1000.0,
        v.members
            .into_iter()
            .map(|(m, left)| (m, s(left)))
            .collect(),
        v.owners
            .into_iter()
            .map(|o| o.map(|(h, left)| (h, s(left))))
            .collect(),
    ))
}
