//! Counters and a latency histogram.
//!
//! All of it has a single writer at a time: the bus's lock, or for the shared counters below
//! whatever serialises the bus's workers (the glue's workers all run on the asyncio thread,
//! under the GIL). Per-type and per-subscription counters are shared with route caches and
//! subscriptions as `Arc<TypeCounters>` / `Arc<SubCounters>`, so the hot path bumps them
//! without a map lookup. They are atomics only so the struct is `Send + Sync`: with one writer
//! a relaxed load and store is enough and avoids a locked instruction per event.
//!
//! Every handler call is timed: the histogram's count equals the calls made.

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

/// Counts for one subscription name (subscriptions sharing a name share them, and they
/// outlive an `unsubscribe`, as Prometheus counters must).
#[derive(Debug, Default)]
pub struct SubCounters {
    /// Handler calls made (every attempt).
    pub calls: AtomicU64,
    /// Handler calls that raised (every attempt).
    pub failed: AtomicU64,
    /// Retry attempts scheduled.
    pub retried: AtomicU64,
    /// (event, subscription) pairs sent to the dead-letter queue, parked ones included.
    pub dead_lettered: AtomicU64,
}

/// One subscription name's counters, read: (name, calls, failed, retried, dead-lettered).
pub type SubRow = (String, u64, u64, u64, u64);

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
    /// Handler call durations, every call.
    pub latency: Histogram,
    types: FxHashMap<String, Arc<TypeCounters>>,
    subs: FxHashMap<Arc<str>, Arc<SubCounters>>,
    /// Failed calls by event type, then by subscription name: an entry for every pair an
    /// event was routed to (0 until one fails), so the series exist before the first failure.
    failures: FxHashMap<String, FxHashMap<Arc<str>, u64>>,
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
            subs: FxHashMap::default(),
            failures: FxHashMap::default(),
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

    /// The shared counters of one subscription name (created on first use).
    pub fn sub_counters(&mut self, name: &Arc<str>) -> Arc<SubCounters> {
        Arc::clone(self.subs.entry(Arc::clone(name)).or_default())
    }

    /// An event type was routed to these subscriptions: their failure pairs exist from now on
    /// (at 0).
    pub fn routed<'a>(&mut self, type_key: &str, names: impl IntoIterator<Item = &'a Arc<str>>) {
        if !self.failures.contains_key(type_key) {
            self.failures
                .insert(type_key.to_owned(), FxHashMap::default());
        }
        let Some(by_sub) = self.failures.get_mut(type_key) else {
            return; // inserted above
        };
        for name in names {
            if !by_sub.contains_key(&**name) {
                by_sub.insert(Arc::clone(name), 0);
            }
        }
    }

    /// A handler call of subscription `name` raised on an event of `type_key` (the call itself
    /// is counted by `record_call`).
    pub fn call_failed(&mut self, type_key: &str, name: &Arc<str>) {
        self.routed(type_key, [name]);
        if let Some(n) = self
            .failures
            .get_mut(type_key)
            .and_then(|m| m.get_mut(&**name))
        {
            *n += 1;
        }
    }

    /// Records one handler call's outcome and duration.
    pub fn record_call(&mut self, ns: u64, ok: bool) {
        self.handler_ns += u128::from(ns);
        self.latency.record(ns);
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

    /// Per-subscription (name, calls, failed, retried, dead-lettered), sorted by name.
    pub fn by_subscription(&self) -> Vec<SubRow> {
        let mut v: Vec<_> = self
            .subs
            .iter()
            .map(|(k, c)| {
                (
                    k.to_string(),
                    c.calls.load(Relaxed),
                    c.failed.load(Relaxed),
                    c.retried.load(Relaxed),
                    c.dead_lettered.load(Relaxed),
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Failed calls per (event type, subscription name) pair an event was routed to, sorted.
    pub fn failures_by_pair(&self) -> Vec<(String, String, u64)> {
        let mut v: Vec<_> = self
            .failures
            .iter()
            .flat_map(|(t, subs)| {
                subs.iter()
                    .map(move |(s, n)| (t.clone(), s.to_string(), *n))
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
    fn every_recorded_call_is_in_the_histogram() {
        let mut s = Stats::default();
        for i in 0..10u64 {
            s.record_call(i * 1_000, i % 3 != 0);
        }
        assert_eq!(s.latency.count(), 10);
        assert_eq!(s.succeeded + s.failed, 10);
        assert_eq!(s.handler_ns, 45_000);
    }

    #[test]
    fn subscription_counters_are_shared_per_name() {
        let mut s = Stats::default();
        let name: Arc<str> = "billing.charge".into();
        let a = s.sub_counters(&name);
        bump(&a.calls, 2);
        bump(&s.sub_counters(&"billing.charge".into()).failed, 1);
        bump(&s.sub_counters(&"audit".into()).dead_lettered, 1);
        assert_eq!(
            s.by_subscription(),
            vec![
                ("audit".to_owned(), 0, 0, 0, 1),
                ("billing.charge".to_owned(), 2, 1, 0, 0)
            ]
        );
    }

    #[test]
    fn failures_are_counted_per_type_and_subscription_pair() {
        let mut s = Stats::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        s.routed("T", [&a, &b]);
        s.call_failed("T", &b);
        s.call_failed("T", &b);
        s.call_failed("U", &a); // never routed before: counted all the same
        assert_eq!(
            s.failures_by_pair(),
            vec![
                ("T".to_owned(), "a".to_owned(), 0),
                ("T".to_owned(), "b".to_owned(), 2),
                ("U".to_owned(), "a".to_owned(), 1)
            ]
        );
        s.routed("T", [&a]); // routing again keeps the counts
        assert_eq!(s.failures_by_pair()[1].2, 2);
    }

    #[test]
    fn cumulative_counts_grow_with_the_bound() {
        let mut h = Histogram::default();
        h.record(500);
        h.record(5_000_000);
        assert_eq!(h.cumulative(&[1_000, 10_000_000_000]), vec![1, 2]);
    }
}
