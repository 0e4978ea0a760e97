//! The queue between publishers and workers, with per-key ordering.
//!
//! Events that share a key form a lane: a lane hands out one event at a time and the next only
//! after `done(key)`, so same-key events are handled in publish order, one at a time, whatever
//! the number of workers. Keyless events and the heads of idle lanes wait in one FIFO (`ready`),
//! so different keys proceed in publish order across workers.
//!
//! Invariants: a key sits in `ready` at most once, and only while its lane is not busy and not
//! empty; `len` counts events pushed and not yet taken.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

enum Slot<T> {
    Keyless(T),
    Key(u64),
}

struct Lane<T> {
    queue: VecDeque<T>,
    busy: bool,
}

/// A bounded or unbounded queue with per-key lanes.
pub struct Lanes<T> {
    ready: VecDeque<Slot<T>>,
    by_key: FxHashMap<u64, Lane<T>>,
    /// Emptied lane queues kept for reuse: keys come and go per event, allocations need not.
    spare: Vec<VecDeque<T>>,
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
            by_key: FxHashMap::default(),
            spare: Vec::new(),
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

    /// Whether `take` would return something now.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Keys that have a lane (queued or being handled).
    pub fn lane_count(&self) -> usize {
        self.by_key.len()
    }

    /// Queues an event. The bound is the caller's to check with `has_room`: a publisher that
    /// waited for room must still get its event in.
    pub fn push(&mut self, item: T, key: Option<u64>) {
        self.len += 1;
        let Some(k) = key else {
            self.ready.push_back(Slot::Keyless(item));
            return;
        };
        let spare = &mut self.spare;
        let lane = self.by_key.entry(k).or_insert_with(|| Lane {
            queue: spare.pop().unwrap_or_default(),
            busy: false,
        });
        if !lane.busy && lane.queue.is_empty() {
            self.ready.push_back(Slot::Key(k));
        }
        lane.queue.push_back(item);
    }

    /// The next event whose key is not being handled, with its key. The caller must call
    /// `done(key)` when a keyed event has been handled.
    ///
    /// # Panics
    ///
    /// Never: a key in `ready` always has a non-empty lane (the module's invariant).
    pub fn take(&mut self) -> Option<(T, Option<u64>)> {
        let slot = self.ready.pop_front()?;
        self.len -= 1;
        match slot {
            Slot::Keyless(item) => Some((item, None)),
            Slot::Key(k) => {
                let lane = self.by_key.get_mut(&k).expect("a ready key has a lane");
                lane.busy = true;
                let item = lane.queue.pop_front().expect("a ready lane is not empty");
                Some((item, Some(k)))
            }
        }
    }

    /// The event `take` would return now, left in place: a worker asks the CPU to fetch its
    /// memory while it handles the one it took (see `core::cache`).
    pub fn peek(&self) -> Option<&T> {
        match self.ready.front()? {
            Slot::Keyless(item) => Some(item),
            Slot::Key(k) => self.by_key.get(k)?.queue.front(),
        }
    }

    /// Marks a keyed event handled: the lane's next event becomes ready.
    pub fn done(&mut self, key: Option<u64>) {
        let Some(k) = key else { return };
        let Some(lane) = self.by_key.get_mut(&k) else {
            return;
        };
        lane.busy = false;
        if lane.queue.is_empty() {
            if let Some(lane) = self.by_key.remove(&k) {
                if self.spare.len() < 1024 {
                    self.spare.push(lane.queue);
                }
            }
        } else {
            self.ready.push_back(Slot::Key(k));
        }
    }

    /// Removes every queued event (not those being handled) and returns them.
    pub fn clear(&mut self) -> Vec<T> {
        let mut out = Vec::with_capacity(self.len);
        for slot in self.ready.drain(..) {
            if let Slot::Keyless(item) = slot {
                out.push(item);
            }
        }
        self.by_key.retain(|_, lane| {
            out.extend(lane.queue.drain(..));
            lane.busy
        });
        self.len = 0;
        out
    }

    /// Visits every queued event: the oldest keyless one and each lane's head are enough to
    /// find the oldest, so this visits only those.
    pub fn heads(&self) -> impl Iterator<Item = &T> {
        let keyless = self.ready.iter().find_map(|s| match s {
            Slot::Keyless(item) => Some(item),
            Slot::Key(_) => None,
        });
        keyless
            .into_iter()
            .chain(self.by_key.values().filter_map(|l| l.queue.front()))
    }

    /// The longest lanes as (events queued, key), longest first, at most `n`.
    pub fn longest_lanes(&self, n: usize) -> Vec<(usize, u64)> {
        let mut v: Vec<(usize, u64)> = self
            .by_key
            .iter()
            .map(|(k, l)| (l.queue.len(), *k))
            .collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v.truncate(n);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peek_shows_what_take_returns_next() {
        let mut l = Lanes::new(0);
        assert_eq!(l.peek(), None);
        l.push(1, Some(7));
        l.push(2, Some(7));
        l.push(3, None);
        l.push(4, Some(8));
        for _ in 0..3 {
            let next = l.peek().copied();
            let (item, key) = l.take().expect("something is ready");
            assert_eq!(next, Some(item));
            l.done(key);
        }
        // 7's second event became ready after the first was done.
        assert_eq!(l.peek(), Some(&2));
        assert_eq!(l.take(), Some((2, Some(7))));
        assert_eq!(l.peek(), None);
    }

    #[test]
    fn same_key_events_come_out_one_at_a_time_in_order() {
        let mut l = Lanes::new(0);
        l.push(1, Some(7));
        l.push(2, Some(7));
        l.push(3, Some(8));
        assert_eq!(l.take(), Some((1, Some(7))));
        // 2 waits for 1: the next ready event is the other key's.
        assert_eq!(l.take(), Some((3, Some(8))));
        assert_eq!(l.take(), None);
        l.done(Some(7));
        assert_eq!(l.take(), Some((2, Some(7))));
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
        l.take();
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
        let _ = l.take();
        let mut rest = l.clear();
        rest.sort_unstable();
        assert_eq!(rest, [2, 3]);
        assert_eq!(l.len(), 0);
        l.done(Some(1));
        assert_eq!(l.take(), None);
    }

    #[test]
    fn heads_and_longest_lanes_describe_the_backlog() {
        let mut l = Lanes::new(0);
        l.push(10, Some(1));
        l.push(11, Some(1));
        l.push(20, Some(2));
        l.push(30, None);
        let mut heads: Vec<i32> = l.heads().copied().collect();
        heads.sort_unstable();
        assert_eq!(heads, [10, 20, 30]);
        assert_eq!(l.longest_lanes(1), [(2, 1)]);
    }
}
