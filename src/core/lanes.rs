//! The queue between publishers and workers, with per-key ordering.
//!
//! Events that share a key form a lane: a key hands out one event at a time and the next only
//! after `done(key)`, so same-key events are handled in publish order, one at a time, whatever
//! the number of workers. Every event waits in one FIFO (`ready`), in publish order, with its
//! key; only a key being handled has an entry in `busy`. `take` hands out the oldest event whose
//! key is free; an event met while its key is busy moves to that key's `waiting` queue, and
//! `done(key)` puts the key back in `ready` (once) if events wait for it. So a push is one
//! append whatever the key, and the map holds as many keys as events are being handled
//! (a keyed push that looked its lane up in a map of every queued key, and a take that read
//! the head of one of many lane queues, were a fifth of an ordered bus's event: issue 13).
//!
//! A key becomes busy when its event's worker lets another take: `hold(key)`, called by a
//! worker before it yields to the event loop with the event unfinished. A worker that handles
//! the event to its end first (a plain function, a coroutine that never suspends) takes the
//! next event only after `done(key)`, so nobody could have taken one of the same key in
//! between, and the map is never touched: all workers take on the one event-loop thread.
//!
//! Invariants: `busy` has an entry for a key while one of its events is being handled or its
//! `waiting` queue is not empty; an event of a key with an entry is never handed out from
//! `ready` (it joins `waiting`); a `Key` slot is in `ready` at most once per key, and only
//! while its entry is not handling and `waiting` is not empty; `len` counts events pushed and
//! not yet taken.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

enum Slot<T> {
    /// An event as published, with its key (`NO_KEY` for none: an `Option` would make every
    /// slot a word longer, and the queue is the one structure as long as the backlog).
    Event(T, u64),
    /// The key's `waiting` queue holds its next event.
    Key(u64),
}

/// A busy key: a small map value (a key enters and leaves `busy` once per event).
#[derive(Clone, Copy)]
struct Lane {
    /// Index of its `waiting` queue in `Lanes::queues`, or `NONE` while nothing waits.
    waiting: u32,
    /// One of its events is being handled.
    handling: bool,
}

const NONE: u32 = u32::MAX;

/// The key of a keyless event in a `Slot`. A key equal to it is queued as `NO_KEY - 1`: keys
/// that share a value share a lane, which only costs parallelism, never order.
const NO_KEY: u64 = u64::MAX;

fn key_of(key: u64) -> Option<u64> {
    (key != NO_KEY).then_some(key)
}

/// A bounded or unbounded queue with per-key lanes.
pub struct Lanes<T> {
    ready: VecDeque<Slot<T>>,
    busy: FxHashMap<u64, Lane>,
    /// The `waiting` queues: events of a busy key met in `ready`, in publish order. Queues of
    /// keys no longer busy are empty and listed in `free` for reuse.
    queues: Vec<VecDeque<T>>,
    free: Vec<u32>,
    len: usize,
    /// Room promised to publishers that were admitted but have not pushed yet.
    reserved: usize,
    capacity: usize,
}

impl<T> Lanes<T> {
    /// `capacity` 0 means unbounded.
    pub fn new(capacity: usize) -> Self {
        Self {
            ready: VecDeque::new(),
            busy: FxHashMap::default(),
            queues: Vec::new(),
            free: Vec::new(),
            len: 0,
            reserved: 0,
            capacity,
        }
    }

    /// Events queued (pushed, not yet taken).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The configured bound (0 = none).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether one more event fits (reserved room counts as taken).
    pub fn has_room(&self) -> bool {
        self.capacity == 0 || self.len + self.reserved < self.capacity
    }

    /// Promises one event's room to a publisher that will `push` it later (or `unreserve`).
    pub fn reserve(&mut self) {
        self.reserved += 1;
    }

    /// Gives back room promised by `reserve`.
    pub fn unreserve(&mut self) {
        self.reserved = self.reserved.saturating_sub(1);
    }

    /// Rooms promised and not yet used.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// How many more events fit (`usize::MAX` when unbounded).
    pub fn room(&self) -> usize {
        if self.capacity == 0 {
            usize::MAX
        } else {
            self.capacity.saturating_sub(self.len + self.reserved)
        }
    }

    /// Whether `take` may return something now. It may still return `None`: when every
    /// event in `ready` belongs to a busy key (a worker woken for them finds nothing and
    /// goes idle again; `take` has then moved them out of `ready`).
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Keys that have a lane: events queued or being handled. Counts the queue (for health
    /// reports, not per event).
    pub fn lane_count(&self) -> usize {
        self.queued_per_key().len()
    }

    /// Queues an event. The bound is the caller's to check with `has_room`: a publisher that
    /// waited for room must still get its event in.
    pub fn push(&mut self, item: T, key: Option<u64>) {
        self.len += 1;
        let key = match key {
            None => NO_KEY,
            Some(k) => k.min(NO_KEY - 1),
        };
        self.ready.push_back(Slot::Event(item, key));
    }

    /// The next event whose key is not being handled, with its key. The caller must call
    /// `hold(key)` before anyone else may `take` while it handles the event, and `done(key)`
    /// when it has been handled.
    ///
    /// # Panics
    ///
    /// Never: a `Key` slot always has a non-empty `waiting` queue (the module's invariant).
    pub fn take(&mut self) -> Option<(T, Option<u64>)> {
        loop {
            match self.ready.pop_front()? {
                Slot::Event(item, NO_KEY) => {
                    self.len -= 1;
                    return Some((item, None));
                }
                Slot::Event(item, k) => {
                    // Usually nothing is held: no hashing then.
                    let held = if self.busy.is_empty() {
                        None
                    } else {
                        self.busy.get_mut(&k)
                    };
                    if let Some(lane) = held {
                        if lane.waiting == NONE {
                            lane.waiting = self.free.pop().unwrap_or_else(|| {
                                self.queues.push(VecDeque::new());
                                u32::try_from(self.queues.len() - 1)
                                    .expect("fewer busy keys than u32::MAX")
                            });
                        }
                        self.queues[lane.waiting as usize].push_back(item);
                    } else {
                        self.len -= 1;
                        return Some((item, Some(k)));
                    }
                }
                Slot::Key(k) => {
                    let lane = self.busy.get_mut(&k).expect("a ready key has a lane");
                    lane.handling = true;
                    let item = self.queues[lane.waiting as usize]
                        .pop_front()
                        .expect("a ready lane is not empty");
                    self.len -= 1;
                    return Some((item, Some(k)));
                }
            }
        }
    }

    /// Marks `key`, whose event the caller took, busy until `done(key)`: others may now take
    /// (see the module's notes). Holding a key already held does nothing.
    pub fn hold(&mut self, key: Option<u64>) {
        if let Some(k) = key {
            self.busy.entry(k).or_insert(Lane {
                waiting: NONE,
                handling: true,
            });
        }
    }

    /// The queue of events waiting for `lane`'s key, if any.
    fn waiting(&self, lane: Lane) -> Option<&VecDeque<T>> {
        self.queues.get(lane.waiting as usize)
    }

    /// The event `take` would most likely return now, left in place: a worker asks the CPU to
    /// fetch its memory while it handles the one it took (see `core::cache`).
    pub fn peek(&self) -> Option<&T> {
        match self.ready.front()? {
            Slot::Event(item, _) => Some(item),
            Slot::Key(k) => self.waiting(*self.busy.get(k)?)?.front(),
        }
    }

    /// Marks a keyed event handled: the key's next waiting event becomes ready.
    pub fn done(&mut self, key: Option<u64>) {
        let Some(k) = key else { return };
        let Some(lane) = self.busy.get_mut(&k) else {
            return;
        };
        lane.handling = false;
        let lane = *lane;
        if self.waiting(lane).is_some_and(|q| !q.is_empty()) {
            self.ready.push_back(Slot::Key(k));
        } else {
            if lane.waiting != NONE {
                self.free.push(lane.waiting);
            }
            self.busy.remove(&k);
        }
    }

    /// Removes every queued event (not those being handled) and returns them.
    pub fn clear(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len);
        for slot in self.ready.drain(..) {
            if let Slot::Event(item, _) = slot {
                out.push(item);
            }
        }
        for q in &mut self.queues {
            out.extend(q.drain(..));
        }
        self.free.clear();
        self.free
            .extend((0..self.queues.len()).filter_map(|q| u32::try_from(q).ok()));
        self.busy.retain(|_, lane| {
            lane.waiting = NONE;
            lane.handling
        });
        self.len = 0;
        out
    }

    /// Visits queued events that include the oldest: the first in `ready` and each waiting
    /// queue's head (a waiting event is older than every event of its key still in `ready`).
    pub fn heads(&self) -> impl Iterator<Item = &T> {
        let first = self.ready.iter().find_map(|s| match s {
            Slot::Event(item, _) => Some(item),
            Slot::Key(_) => None,
        });
        first
            .into_iter()
            .chain(self.queues.iter().filter_map(VecDeque::front))
    }

    /// The longest lanes as (events queued, key), longest first, at most `n`. Counts the
    /// queue (for health reports, not per event).
    pub fn longest_lanes(&self, n: usize) -> Vec<(usize, u64)> {
        let mut v: Vec<(usize, u64)> = self
            .queued_per_key()
            .into_iter()
            .map(|(k, queued)| (queued, k))
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.truncate(n);
        v
    }

    /// Events queued per key, for every key that has queued events or one being handled.
    fn queued_per_key(&self) -> FxHashMap<u64, usize> {
        let mut counts: FxHashMap<u64, usize> = self
            .busy
            .iter()
            .map(|(k, lane)| (*k, self.waiting(*lane).map_or(0, VecDeque::len)))
            .collect();
        for slot in &self.ready {
            if let Slot::Event(_, k) = slot {
                if let Some(k) = key_of(*k) {
                    *counts.entry(k).or_default() += 1;
                }
            }
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes as a worker that awaits its handler: holding the key.
    fn take(l: &mut Lanes<i32>) -> Option<(i32, Option<u64>)> {
        let taken = l.take();
        if let Some((_, key)) = taken {
            l.hold(key);
        }
        taken
    }

    #[test]
    fn a_slot_is_no_longer_than_an_event_and_its_key() {
        assert_eq!(
            std::mem::size_of::<Slot<(std::sync::Arc<u8>, u64)>>(),
            3 * std::mem::size_of::<u64>()
        );
    }

    #[test]
    fn a_key_equal_to_the_keyless_mark_still_orders() {
        let mut l = Lanes::new(0);
        l.push(1, Some(NO_KEY));
        l.push(2, Some(NO_KEY));
        assert_eq!(take(&mut l), Some((1, Some(NO_KEY - 1))));
        assert_eq!(take(&mut l), None);
    }

    #[test]
    fn a_key_not_held_is_never_looked_up() {
        // A worker that handles its event to the end before taking again never holds.
        let mut l = Lanes::new(0);
        for i in 1..=3 {
            l.push(i, Some(7));
        }
        for want in 1..=3 {
            assert_eq!(l.take(), Some((want, Some(7))));
            assert!(l.busy.is_empty());
            l.done(Some(7));
        }
        // Held, the same key waits; holding twice changes nothing.
        l.push(4, Some(7));
        l.push(5, Some(7));
        assert_eq!(take(&mut l), Some((4, Some(7))));
        l.hold(Some(7));
        assert_eq!(l.take(), None);
        l.done(Some(7));
        assert_eq!(l.take(), Some((5, Some(7))));
    }

    #[test]
    fn peek_shows_what_take_returns_next_while_no_key_is_busy() {
        let mut l = Lanes::new(0);
        assert_eq!(l.peek(), None);
        l.push(1, Some(7));
        l.push(2, Some(7));
        l.push(3, None);
        l.push(4, Some(8));
        for want in [1, 2, 3, 4] {
            let next = l.peek().copied();
            let (item, key) = take(&mut l).expect("something is ready");
            assert_eq!((next, item), (Some(want), want));
            l.done(key);
        }
        assert_eq!(l.peek(), None);
    }

    #[test]
    fn events_met_while_their_key_is_busy_wait_and_keep_their_order() {
        let mut l = Lanes::new(0);
        for (item, key) in [(1, 7), (2, 7), (3, 8), (4, 7), (5, 8)] {
            l.push(item, Some(key));
        }
        assert_eq!(take(&mut l), Some((1, Some(7))));
        assert_eq!(take(&mut l), Some((3, Some(8)))); // 2 moved to 7's waiting queue
        assert_eq!(take(&mut l), None); // 4 and 5 wait too
        assert_eq!((l.len(), l.has_ready()), (3, false));
        assert_eq!(l.longest_lanes(2), [(2, 7), (1, 8)]);
        l.done(Some(8));
        assert_eq!(l.peek(), Some(&5));
        assert_eq!(take(&mut l), Some((5, Some(8))));
        l.done(Some(7));
        assert_eq!(take(&mut l), Some((2, Some(7))));
        l.push(6, Some(7)); // behind 4, which waits
        assert_eq!(take(&mut l), None);
        l.done(Some(7));
        assert_eq!(take(&mut l), Some((4, Some(7))));
        l.done(Some(7));
        assert_eq!(take(&mut l), Some((6, Some(7))));
        l.done(Some(7));
        l.done(Some(8));
        assert_eq!((l.len(), l.lane_count(), take(&mut l)), (0, 0, None));
    }

    #[test]
    fn same_key_events_come_out_one_at_a_time_in_order() {
        let mut l = Lanes::new(0);
        l.push(1, Some(7));
        l.push(2, Some(7));
        l.push(3, Some(8));
        assert_eq!(take(&mut l), Some((1, Some(7))));
        // 2 waits for 1: the next ready event is the other key's.
        assert_eq!(take(&mut l), Some((3, Some(8))));
        assert_eq!(take(&mut l), None);
        l.done(Some(7));
        assert_eq!(take(&mut l), Some((2, Some(7))));
        l.done(Some(7));
        l.done(Some(8));
        assert!(l.is_empty());
        assert_eq!(l.lane_count(), 0);
    }

    #[test]
    fn keyless_events_keep_fifo_order() {
        let mut l = Lanes::new(0);
        for i in 0..5 {
            l.push(i, None);
        }
        let out: Vec<i32> = std::iter::from_fn(|| l.take().map(|(x, _)| x)).collect();
        assert_eq!(out, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn capacity_counts_queued_events_only() {
        let mut l = Lanes::new(2);
        l.push(1, None);
        assert!(l.has_room());
        l.push(2, Some(1));
        assert!(!l.has_room());
        assert_eq!(l.room(), 0);
        take(&mut l);
        assert!(l.has_room());
        assert_eq!(l.room(), 1);
        assert_eq!(Lanes::<u8>::new(0).room(), usize::MAX);
    }

    #[test]
    fn reserved_room_counts_as_taken_until_used_or_given_back() {
        let mut l = Lanes::new(2);
        l.push(1, None);
        l.reserve();
        assert!(!l.has_room());
        assert_eq!((l.room(), l.reserved(), l.len()), (0, 1, 1));
        l.unreserve();
        assert_eq!(l.room(), 1);
        l.reserve();
        l.unreserve();
        l.push(2, Some(3)); // the publisher used its room
        assert_eq!((l.room(), l.reserved(), l.len()), (0, 0, 2));
    }

    #[test]
    fn clear_returns_queued_events_and_keeps_busy_lanes() {
        let mut l = Lanes::new(0);
        l.push(1, Some(1));
        l.push(2, Some(1));
        l.push(3, None);
        l.push(4, Some(1));
        l.push(5, None);
        assert_eq!(take(&mut l), Some((1, Some(1))));
        assert_eq!(take(&mut l), Some((3, None))); // 2 now waits for key 1
        let mut rest = l.clear();
        rest.sort_unstable();
        assert_eq!(rest, [2, 4, 5]);
        assert_eq!((l.len(), l.lane_count()), (0, 1));
        l.done(Some(1));
        assert_eq!((take(&mut l), l.lane_count()), (None, 0));
        l.push(6, Some(1));
        assert_eq!(take(&mut l), Some((6, Some(1))));
    }

    #[test]
    fn heads_and_longest_lanes_describe_the_backlog() {
        let mut l = Lanes::new(0);
        l.push(10, Some(1));
        l.push(11, Some(1));
        l.push(20, Some(2));
        l.push(30, None);
        assert_eq!(l.heads().copied().min(), Some(10));
        assert_eq!(l.longest_lanes(1), [(2, 1)]);
        assert_eq!(l.lane_count(), 2);
        assert_eq!(take(&mut l), Some((10, Some(1))));
        assert_eq!(take(&mut l), Some((20, Some(2)))); // 11 now waits for key 1
        assert_eq!(l.heads().copied().min(), Some(11));
        assert_eq!(l.longest_lanes(5), [(1, 1), (0, 2)]);
    }
}
