//! What one kind of event reaches, resolved once and cached until the subscriptions change.
//!
//! A `Plan` is the engine's half of a route: the subscriptions an event of one type key (and
//! class ancestry) reaches, in call order; the ones it leaves out, whose durable progress
//! moves past it; the type's counters. The glue wraps it with what only Python knows (the
//! class, how its key is read) and keeps the wrapped routes in a `Cache`, keyed by the class's
//! id and, where string subscriptions or dict events need it, the type key.

use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::core::bus::Engine;
use crate::core::routing::Subscription;
use crate::core::stats::TypeCounters;

/// Subscription names, shared.
pub type Names = Arc<[Arc<str>]>;

/// The subscriptions one kind of event reaches.
pub struct Plan<H> {
    /// In call order: smaller priority first, ties in subscription order.
    pub subs: Vec<Arc<Subscription<H>>>,
    /// On a durable bus: the type key and the subscriptions this kind leaves out, whose
    /// progress moves past an event of it (`Writer::skip`); None when it leaves none out.
    pub skip: Option<(Arc<str>, Names)>,
    pub type_key: String,
    /// The ids of the event's class and its bases (what class subscriptions match).
    pub mro: Vec<usize>,
    pub counters: Arc<TypeCounters>,
}

impl<H> Plan<H> {
    /// The same kind of event, reaching `subs` only (a redelivery to one subscription): no
    /// skips, the same counters.
    #[must_use]
    pub fn narrowed(&self, subs: Vec<Arc<Subscription<H>>>) -> Self {
        Self {
            subs,
            skip: None,
            type_key: self.type_key.clone(),
            mro: self.mro.clone(),
            counters: Arc::clone(&self.counters),
        }
    }
}

impl<E, W, H> Engine<E, W, H> {
    /// Resolves what an event of `type_key`, whose class ancestry is `mro`, reaches, and counts
    /// the (type, subscription) pairs in the statistics; `durable` lists the subscriptions it
    /// leaves out.
    pub fn plan(&mut self, type_key: String, mro: Vec<usize>, durable: bool) -> Plan<H> {
        let subs = self.router.resolve(&type_key, &mro);
        self.stats.routed(&type_key, subs.iter().map(|s| &s.name));
        let skip = durable.then(|| {
            let out: Names = self
                .router
                .iter()
                .filter(|s| !subs.iter().any(|m| m.id == s.id))
                .map(|s| Arc::clone(&s.name))
                .collect();
            (Arc::from(type_key.as_str()), out)
        });
        Plan {
            subs,
            skip: skip.filter(|(_, out)| !out.is_empty()),
            counters: self.stats.type_counters(&type_key),
            type_key,
            mro,
        }
    }
}

/// What a route is cached by: the class's id, and the type key where it takes part.
pub type CacheKey = (usize, Option<String>);

/// Routes (`R`: the glue's, wrapping a `Plan`) by `CacheKey`, valid while the router's
/// generation is the one they were resolved under.
pub struct Cache<R> {
    map: FxHashMap<CacheKey, Arc<R>>,
    generation: u64,
}

impl<R> Default for Cache<R> {
    fn default() -> Self {
        Self {
            map: FxHashMap::default(),
            generation: 0,
        }
    }
}

impl<R> Cache<R> {
    /// The route cached for `key`, unless the subscriptions changed since (`generation`).
    pub fn get(&self, key: &CacheKey, generation: u64) -> Option<&Arc<R>> {
        if self.generation == generation {
            self.map.get(key)
        } else {
            None
        }
    }

    /// Readies the cache for routes resolved under `generation`; when the subscriptions
    /// changed since it was filled, hands back the stale routes, for the caller to drop once
    /// it released its lock (they may hold the last reference to a handler).
    #[must_use = "the stale routes are to be dropped outside the lock"]
    pub fn renew(&mut self, generation: u64) -> FxHashMap<CacheKey, Arc<R>> {
        if self.generation == generation {
            return FxHashMap::default();
        }
        self.generation = generation;
        std::mem::take(&mut self.map)
    }

    /// Caches `route` for `key` (after `renew`).
    pub fn insert(&mut self, key: CacheKey, route: Arc<R>) {
        self.map.insert(key, route);
    }

    /// Every cached route.
    pub fn values(&self) -> impl Iterator<Item = &Arc<R>> {
        self.map.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::bus::Settings;
    use crate::core::routing::Matcher;

    type E = Engine<u32, u32, &'static str>;

    fn engine() -> E {
        Engine::new(Settings::new(1, 0, None).unwrap())
    }

    fn names<H>(p: &Plan<H>) -> Vec<&str> {
        p.subs.iter().map(|s| &*s.name).collect()
    }

    #[test]
    fn a_plan_lists_what_an_event_reaches_in_call_order_and_counts_the_pairs() {
        let mut e = engine();
        e.subscribe(Matcher::for_str("Paid").unwrap(), 5, "late", "h1");
        e.subscribe(Matcher::for_str("Shipped").unwrap(), 0, "other", "h2");
        e.subscribe(Matcher::for_str("Paid").unwrap(), 0, "early", "h3");
        let p = e.plan("Paid".to_owned(), vec![1, 2], false);
        assert_eq!(names(&p), ["early", "late"]);
        assert!(p.skip.is_none(), "in memory nothing is skipped");
        assert_eq!(
            (p.type_key.as_str(), p.mro.as_slice()),
            ("Paid", &[1, 2][..])
        );
        assert_eq!(
            e.stats
                .by_type()
                .iter()
                .map(|r| r.0.as_str())
                .collect::<Vec<_>>(),
            ["Paid"]
        );
        assert!(Arc::ptr_eq(&p.counters, &e.stats.type_counters("Paid")));
    }

    #[test]
    fn a_durable_plan_names_the_subscriptions_it_leaves_out() {
        let mut e = engine();
        e.subscribe(Matcher::for_str("Paid").unwrap(), 0, "billing", "h1");
        e.subscribe(Matcher::for_str("Shipped").unwrap(), 0, "shipping", "h2");
        let p = e.plan("Paid".to_owned(), vec![], true);
        let (t, out) = p.skip.as_ref().expect("one left out");
        assert_eq!(
            (&**t, out.iter().map(|n| &**n).collect::<Vec<_>>()),
            ("Paid", vec!["shipping"])
        );
        // An event every subscription takes leaves nothing out.
        let p = e.plan("Any".to_owned(), vec![], true);
        assert!(p.subs.is_empty());
        let p2 = e.plan("Paid".to_owned(), vec![], true);
        let narrowed = p2.narrowed(vec![Arc::clone(&p2.subs[0])]);
        assert_eq!(names(&narrowed), ["billing"]);
        assert!(narrowed.skip.is_none());
        assert!(Arc::ptr_eq(&narrowed.counters, &p2.counters));
    }

    #[test]
    fn a_plan_reaching_every_subscription_skips_nothing() {
        let mut e = engine();
        e.subscribe(Matcher::for_str("Paid").unwrap(), 0, "billing", "h1");
        assert!(e.plan("Paid".to_owned(), vec![], true).skip.is_none());
    }

    #[test]
    fn the_cache_forgets_its_routes_when_the_subscriptions_change() {
        let mut c: Cache<&'static str> = Cache::default();
        assert!(c.renew(0).is_empty());
        c.insert((7, None), Arc::new("route"));
        assert_eq!(c.get(&(7, None), 0).map(|r| **r), Some("route"));
        assert!(c.get(&(7, Some("Paid".into())), 0).is_none());
        assert!(
            c.get(&(7, None), 1).is_none(),
            "stale once the generation moved"
        );
        let stale = c.renew(1);
        assert_eq!(stale.len(), 1);
        assert!(c.get(&(7, None), 1).is_none());
        assert_eq!(c.values().count(), 0);
    }
}
