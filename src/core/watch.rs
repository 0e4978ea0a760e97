//! `wait_for` calls: each waits for the first accepted event its matcher accepts (and, in the
//! glue, the caller's predicate: Python code, run outside the engine's lock).

use crate::core::routing::Matcher;

/// One `wait_for` call: its matcher, and what the glue keeps with it (`P`: the predicate and
/// the future to resolve).
pub struct Watch<P> {
    pub id: u64,
    pub matcher: Matcher,
    pub payload: P,
}

/// The `wait_for` calls waiting, oldest first.
pub struct Watches<P> {
    list: Vec<Watch<P>>,
    next_id: u64,
}

impl<P> Default for Watches<P> {
    fn default() -> Self {
        Self {
            list: Vec::new(),
            next_id: 1,
        }
    }
}

impl<P> Watches<P> {
    /// Adds a watch; returns its id (never reused).
    pub fn add(&mut self, matcher: Matcher, payload: P) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.list.push(Watch {
            id,
            matcher,
            payload,
        });
        id
    }

    /// Removes watch `id`; hands it back (for the caller to drop once it released its lock).
    pub fn remove(&mut self, id: u64) -> Option<Watch<P>> {
        let at = self.list.iter().position(|w| w.id == id)?;
        Some(self.list.remove(at))
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Whether none waits.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Every watch, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Watch<P>> {
        self.list.iter()
    }

    /// Takes out the watches an event of `type_key` (class ancestry `mro`) matches, oldest
    /// first; the others stay.
    pub fn take_matching(&mut self, type_key: &str, mro: &[usize]) -> Vec<Watch<P>> {
        let (hit, rest) = std::mem::take(&mut self.list)
            .into_iter()
            .partition(|w| w.matcher.matches(type_key, mro));
        self.list = rest;
        hit
    }

    /// Puts back watches taken out whose predicate declined the event: in their places, by
    /// age, among those added or left meanwhile.
    pub fn put_back(&mut self, back: Vec<Watch<P>>) {
        if back.is_empty() {
            return;
        }
        self.list.extend(back);
        self.list.sort_by_key(|w| w.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids<P>(w: &[Watch<P>]) -> Vec<u64> {
        w.iter().map(|w| w.id).collect()
    }

    #[test]
    fn matching_watches_are_taken_out_oldest_first_and_the_declined_go_back_in_their_places() {
        let mut ws = Watches::default();
        let paid = || Matcher::for_str("Paid").unwrap();
        let a = ws.add(paid(), "a");
        let b = ws.add(Matcher::for_str("Shipped").unwrap(), "b");
        let c = ws.add(paid(), "c");
        assert_eq!(ws.len(), 3);
        let hit = ws.take_matching("Paid", &[]);
        assert_eq!(ids(&hit), [a, c]);
        assert_eq!(ws.iter().map(|w| w.id).collect::<Vec<_>>(), [b]);
        // Added while the predicates ran; then `a` declined, `c` was resolved.
        let d = ws.add(paid(), "d");
        ws.put_back(hit.into_iter().filter(|w| w.payload == "a").collect());
        assert_eq!(ws.iter().map(|w| w.id).collect::<Vec<_>>(), [a, b, d]);
    }

    #[test]
    fn a_removed_watch_is_handed_back_once_and_ids_are_never_reused() {
        let mut ws = Watches::default();
        let a = ws.add(Matcher::for_str("Paid").unwrap(), ());
        assert_eq!(ws.remove(a).map(|w| w.id), Some(a));
        assert!(ws.remove(a).is_none());
        assert!(ws.is_empty());
        assert!(ws.add(Matcher::for_str("Paid").unwrap(), ()) > a);
    }
}
