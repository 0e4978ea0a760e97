//! Counters and a latency histogram.
//!
//! All of it lives behind the bus's lock, with a single writer at a time; per-type counters are
//! shared with route caches as `Arc<TypeCounters>` so the hot path bumps them without a map
//! lookup. They are atomics only so the struct is `Send + Sync`: with one writer a relaxed load
//! and store is enough and avoids a locked instruction per event.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use rustc_hash::FxHashMap;

/// Bumps a single-writer counter (see the module note on why not `fetch_add`).
#[inline]
pub fn bump(c: &AtomicU64, by: u64) {
    c.store(c.load(Relaxed) + by, Relaxed);
}

/// Counts for one event type.
#[derive(Debug, Default)]
pub struct TypeCounters {
    /// Events of this type accepted.
    pub published: AtomicU64,
    /// Events of this type whose every subscription finished.
    pub processed: AtomicU64,
    /// Handler calls for this type that raised.
    pub failed: AtomicU64,
}

/// Sub-buckets per power of two: the histogram's relative error is under 1/8.
const SUB: usize = 8;
const BUCKETS: usize = 64 * SUB;

/// A log-linear histogram of durations in nanoseconds (no allocation per sample).
#[derive(Clone)]
pub struct Histogram {
    counts: Box<[u64; BUCKETS]>,
    total: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: Box::new([0; BUCKETS]),
            total: 0,
        }
    }
}

impl std::fmt::Debug for Histogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .finish_non_exhaustive()
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB as u64 {
        return usize::try_from(ns).unwrap_or(0);
    }
    let exp = 63 - ns.leading_zeros() as usize; // ns >= 8, so exp >= 3
    let mantissa = usize::try_from((ns >> (exp - 3)) & 7).unwrap_or(0);
    ((exp - 2) * SUB + mantissa).min(BUCKETS - 1)
}

fn bucket_upper(b: usize) -> u64 {
    if b < SUB {
        return b as u64;
    }
    let exp = b / SUB + 2;
    let mantissa = (b % SUB) as u64;
    let upper = (u128::from(8 + mantissa + 1) << (exp - 3)) - 1;
    u64::try_from(upper).unwrap_or(u64::MAX)
}

impl Histogram {
    /// Records one duration.
    pub fn record(&mut self, ns: u64) {
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.total
    }

    /// The duration under which a fraction `q` (0..=1) of samples fall, in nanoseconds;
    /// 0 with no samples.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (b, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_upper(b);
            }
        }
        bucket_upper(BUCKETS - 1)
    }

    /// Cumulative counts at the given upper bounds (ns), for Prometheus-style buckets.
    pub fn cumulative(&self, bounds_ns: &[u64]) -> Vec<u64> {
        bounds_ns
            .iter()
            .map(|&le| {
                self.counts
                    .iter()
                    .enumerate()
                    .filter(|(b, _)| bucket_upper(*b) <= le)
                    .map(|(_, c)| c)
                    .sum()
            })
            .collect()
    }
}

/// The bus's counters (see DESIGN.md "statistics counting").
#[derive(Debug)]
pub struct Stats {
    /// When the bus was created.
    pub created_at: Instant,
    /// Events accepted.
    pub published: u64,
    /// Events whose every subscription finished (success or final failure).
    pub processed: u64,
    /// Handler calls that raised (every attempt).
    pub failed: u64,
    /// Handler calls that finished without raising.
    pub succeeded: u64,
    /// Retry attempts scheduled.
    pub retried: u64,
    /// (event, subscription) pairs sent to the dead-letter queue.
    pub dead_lettered: u64,
    /// Events that reached no subscription.
    pub unrouted: u64,
    /// Handler calls cut short because the bus was stopped.
    pub interrupted: u64,
    /// Sum of handler durations, ns.
    pub handler_ns: u128,
    /// Handler call durations.
    pub latency: Histogram,
    types: FxHashMap<String, Arc<TypeCounters>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            created_at: Instant::now(),
            published: 0,
            processed: 0,
            failed: 0,
            succeeded: 0,
            retried: 0,
            dead_lettered: 0,
            unrouted: 0,
            interrupted: 0,
            handler_ns: 0,
            latency: Histogram::default(),
            types: FxHashMap::default(),
        }
    }
}

impl Stats {
    /// The shared counters of one event type (created on first use).
    pub fn type_counters(&mut self, type_key: &str) -> Arc<TypeCounters> {
        if let Some(c) = self.types.get(type_key) {
            return Arc::clone(c);
        }
        let c = Arc::new(TypeCounters::default());
        self.types.insert(type_key.to_owned(), Arc::clone(&c));
        c
    }

    /// Records one handler call's outcome, and its duration when it was timed (calls may be
    /// sampled; the mean and quantiles are over the timed ones).
    pub fn record_call(&mut self, ns: Option<u64>, ok: bool) {
        if let Some(ns) = ns {
            self.handler_ns += u128::from(ns);
            self.latency.record(ns);
        }
        if ok {
            self.succeeded += 1;
        } else {
            self.failed += 1;
        }
    }

    /// Mean handler duration in milliseconds (0 before any call).
    pub fn avg_handler_ms(&self) -> f64 {
        let n = self.latency.count();
        if n == 0 {
            0.0
        } else {
            self.handler_ns as f64 / n as f64 / 1e6
        }
    }

    /// Per-type (published, processed, failed), sorted by type key.
    pub fn by_type(&self) -> Vec<(String, u64, u64, u64)> {
        let mut v: Vec<_> = self
            .types
            .iter()
            .map(|(k, c)| {
                (
                    k.clone(),
                    c.published.load(Relaxed),
                    c.processed.load(Relaxed),
                    c.failed.load(Relaxed),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Seconds since creation.
    pub fn uptime_seconds(&self) -> f64 {
        self.created_at.elapsed().as_secs_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_contain_their_samples() {
        for ns in [
            0u64,
            1,
            7,
            8,
            9,
            15,
            16,
            100,
            1_000,
            123_456,
            10_000_000_000,
        ] {
            let b = bucket_of(ns);
            assert!(
                bucket_upper(b) >= ns,
                "{ns} -> bucket {b} upper {}",
                bucket_upper(b)
            );
            if b > 0 {
                assert!(bucket_upper(b - 1) < ns, "{ns} belongs in a lower bucket");
            }
        }
    }

    #[test]
    fn quantiles_are_within_an_eighth() {
        let mut h = Histogram::default();
        for ns in 1..=1000u64 {
            h.record(ns * 1000);
        }
        let p50 = h.quantile(0.5) as f64;
        assert!((p50 - 500_000.0).abs() / 500_000.0 < 0.13, "p50 = {p50}");
        let p99 = h.quantile(0.99) as f64;
        assert!((p99 - 990_000.0).abs() / 990_000.0 < 0.13, "p99 = {p99}");
        assert_eq!(Histogram::default().quantile(0.5), 0);
    }

    #[test]
    fn type_counters_are_shared_per_type() {
        let mut s = Stats::default();
        let a = s.type_counters("A");
        bump(&a.published, 2);
        bump(&s.type_counters("A").published, 1);
        assert_eq!(s.by_type(), vec![("A".to_owned(), 3, 0, 0)]);
    }

    #[test]
    fn cumulative_counts_grow_with_the_bound() {
        let mut h = Histogram::default();
        h.record(500);
        h.record(5_000_000);
        assert_eq!(h.cumulative(&[1_000, 10_000_000_000]), vec![1, 2]);
    }
}
