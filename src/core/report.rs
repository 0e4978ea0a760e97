//! What a bus reports about itself: its statistics and its health, as plain structs read under
//! the engine's lock. The glue turns them into the dicts of `get_statistics()` and
//! `get_health_status()` (field names are the keys, in this order) after releasing it.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::core::bus::Engine;
use crate::core::health::{self, ProcessSample, Thresholds};

/// Handler durations, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// One event type's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TypeRow {
    pub published: u64,
    pub processed: u64,
    pub failed: u64,
}

/// One subscription's counters (subscriptions sharing a name share them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SubRow {
    pub calls: u64,
    pub failed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
}

/// `EventBus.get_statistics()` (see DESIGN.md "statistics counting").
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Statistics {
    pub uptime_seconds: f64,
    pub avg_processing_time_ms: f64,
    pub events_published: u64,
    pub events_processed: u64,
    pub events_failed: u64,
    // The same counters under the names the contract also promises.
    pub published: u64,
    pub processed: u64,
    pub failed: u64,
    pub events_unrouted: u64,
    pub events_interrupted: u64,
    pub handler_calls: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    pub queue_size: usize,
    pub blocked_publishers: usize,
    pub in_flight: usize,
    pub retry_queue_size: usize,
    pub subscription_count: usize,
    pub max_queue_size: usize,
    pub handler_latency_ms: Latency,
    pub is_running: bool,
    pub worker_count: usize,
    pub by_event_type: BTreeMap<String, TypeRow>,
    pub by_subscription: BTreeMap<String, SubRow>,
}

/// The limits of a health report, as `get_health_status()["thresholds"]` shows them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    pub queue_fill: f64,
    pub oldest_age_seconds: f64,
    pub error_rate: f64,
    pub min_calls: u64,
    pub dead_letters: u64,
}

impl From<Thresholds> for Limits {
    fn from(t: Thresholds) -> Self {
        Self {
            queue_fill: t.queue_fill,
            oldest_age_seconds: t.oldest_age_s,
            error_rate: t.error_rate,
            min_calls: t.min_calls,
            dead_letters: t.dead_letters,
        }
    }
}

/// `EventBus.get_health_status()`, before the transport adds its part.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HealthReport {
    /// `healthy`, `degraded` or `stopped`.
    pub status: &'static str,
    /// Why it is degraded.
    pub reasons: Vec<String>,
    pub is_running: bool,
    pub queue_size: usize,
    pub max_queue_size: usize,
    pub blocked_publishers: usize,
    pub lane_count: usize,
    /// The lengths of the five longest lanes.
    pub longest_lanes: Vec<usize>,
    pub in_flight: usize,
    pub oldest_queued_age_seconds: f64,
    pub worker_count: usize,
    pub uptime_seconds: f64,
    pub memory_usage_mb: f64,
    pub cpu_percent: f64,
    pub cpu_window_seconds: f64,
    pub system_memory_total_mb: f64,
    pub system_memory_available_mb: f64,
    /// Share of handler calls that raised, over the bus's life.
    pub error_rate: f64,
    pub dead_letters: u64,
    pub thresholds: Limits,
}

impl<E, W, H> Engine<E, W, H> {
    /// The counters now.
    pub fn statistics(&self) -> Statistics {
        let s = &self.stats;
        #[allow(clippy::cast_precision_loss)]
        let ms = |q: f64| s.latency.quantile(q) as f64 / 1e6;
        Statistics {
            uptime_seconds: s.uptime_seconds(),
            avg_processing_time_ms: s.avg_handler_ms(),
            events_published: s.published,
            events_processed: s.processed,
            events_failed: s.failed,
            published: s.published,
            processed: s.processed,
            failed: s.failed,
            events_unrouted: s.unrouted,
            events_interrupted: s.interrupted,
            handler_calls: s.failed + s.succeeded,
            retried: s.retried,
            dead_lettered: s.dead_lettered,
            queue_size: self.queue_size(),
            blocked_publishers: self.blocked_publishers(),
            in_flight: self.in_flight(),
            retry_queue_size: self.retrying(),
            subscription_count: self.router.len(),
            max_queue_size: self.settings().capacity,
            handler_latency_ms: Latency {
                p50: ms(0.5),
                p90: ms(0.9),
                p99: ms(0.99),
                max: ms(1.0),
            },
            is_running: self.is_running(),
            worker_count: self.settings().workers,
            by_event_type: s
                .by_type()
                .into_iter()
                .map(|(k, published, processed, failed)| {
                    let row = TypeRow {
                        published,
                        processed,
                        failed,
                    };
                    (k, row)
                })
                .collect(),
            by_subscription: s
                .by_subscription()
                .into_iter()
                .map(|(k, calls, failed, retried, dead_lettered)| {
                    let row = SubRow {
                        calls,
                        failed,
                        retried,
                        dead_lettered,
                    };
                    (k, row)
                })
                .collect(),
        }
    }

    /// The health report at `now_ns` (`health::coarse_now_ns`), with a sample of the process
    /// taken outside the lock.
    pub fn health_report(&self, now_ns: u64, sample: ProcessSample) -> HealthReport {
        let r = self.readings(now_ns);
        let t = self.settings().thresholds;
        let (status, reasons) = health::status(&r, &t);
        #[allow(clippy::cast_precision_loss)]
        let error_rate = if r.calls == 0 {
            0.0
        } else {
            r.failed_calls as f64 / r.calls as f64
        };
        HealthReport {
            status,
            reasons,
            is_running: r.running,
            queue_size: r.queued,
            max_queue_size: r.capacity,
            blocked_publishers: self.blocked_publishers(),
            lane_count: self.lanes().lane_count(),
            longest_lanes: self
                .lanes()
                .longest_lanes(5)
                .into_iter()
                .map(|(n, _)| n)
                .collect(),
            in_flight: self.in_flight(),
            oldest_queued_age_seconds: r.oldest_age_s,
            worker_count: self.settings().workers,
            uptime_seconds: self.stats.uptime_seconds(),
            memory_usage_mb: sample.rss_mb,
            cpu_percent: sample.cpu_percent,
            cpu_window_seconds: sample.cpu_window_s,
            system_memory_total_mb: sample.system_total_mb,
            system_memory_available_mb: sample.system_available_mb,
            error_rate,
            dead_letters: r.dead_letters,
            thresholds: t.into(),
        }
    }
}
