//! When a durable bus's `await publish()` commits on the asyncio thread itself
//! (`Writer::log_now`, see `now.rs`) rather than through the writer thread, keeping the order
//! of publishes and letting concurrent publishers share commits.
//!
//! - A publish commits at once (no future, no thread round trip) only when no earlier bus-log
//!   request is still unsettled (`waiting`: sent the writer's way, or batched, and its
//!   publisher has not dispatched its event yet): an event never overtakes one published
//!   before it, in the log or in dispatch. (Events a saga step publishes are written with
//!   the step's state through the writer thread, unpaced: a publish made while such a write
//!   is on its way may be logged before them.)
//! - At most `PER_TURN` such commits per loop turn, and only while publishers seem alone (the
//!   last batch had at most one request): a publisher that commits at once never yields, so
//!   after `PER_TURN` it waits like the others and lets them publish; when several publish in
//!   the same turn, their requests go into one batch, committed by the turn's flush as one
//!   transaction, on the asyncio thread too when the writer thread is idle.
//!
//! The glue (`src/python/store`) keeps this state and resets `this_turn` at the end of each
//! loop turn.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};

/// Commits at once per loop turn, at most.
pub const PER_TURN: u32 = 16;

/// The state behind those rules, shared by a store and its flusher.
#[derive(Default)]
pub struct Pacing {
    /// Bus-log requests whose publisher has not dispatched its event yet.
    pub waiting: AtomicUsize,
    /// Commits at once in this loop turn (reset by the glue's `TurnEnd`).
    pub this_turn: AtomicU32,
    /// Bus-log requests in the last batch flushed.
    pub last_batch: AtomicUsize,
}

impl Pacing {
    /// Whether the next publish may commit at once.
    pub fn may_commit_now(&self) -> bool {
        self.waiting.load(Relaxed) == 0
            && self.this_turn.load(Relaxed) < PER_TURN
            && self.last_batch.load(Relaxed) <= 1
    }

    /// Counts a commit made at once; true for the first of this turn (the caller schedules
    /// `TurnEnd`).
    pub fn committed_now(&self) -> bool {
        self.this_turn.fetch_add(1, Relaxed) == 0
    }

    /// A bus-log request goes the writer's way (or into a batch).
    pub fn wait(&self) {
        self.waiting.fetch_add(1, Relaxed);
    }

    /// Its publisher dispatched (or gave up on) its event.
    pub fn settled(&self) {
        let _ = self
            .waiting
            .fetch_update(Relaxed, Relaxed, |n| Some(n.saturating_sub(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_commits_at_once_only_while_no_earlier_request_is_unsettled() {
        let p = Pacing::default();
        assert!(p.may_commit_now());
        p.wait();
        p.wait();
        assert!(!p.may_commit_now());
        p.settled();
        assert!(!p.may_commit_now());
        p.settled();
        assert!(p.may_commit_now());
        // A settle too many does not wrap around.
        p.settled();
        assert_eq!(p.waiting.load(Relaxed), 0);
        assert!(p.may_commit_now());
    }

    #[test]
    fn at_most_per_turn_commits_at_once_and_only_the_first_schedules_the_turn_end() {
        let p = Pacing::default();
        assert!(p.committed_now());
        for _ in 1..PER_TURN {
            assert!(p.may_commit_now());
            assert!(!p.committed_now());
        }
        assert!(!p.may_commit_now());
        // The end of the turn starts the count over.
        p.this_turn.store(0, Relaxed);
        assert!(p.may_commit_now());
        assert!(p.committed_now());
    }

    #[test]
    fn publishers_that_shared_the_last_batch_wait_for_the_writer() {
        let p = Pacing::default();
        p.last_batch.store(1, Relaxed);
        assert!(p.may_commit_now());
        p.last_batch.store(2, Relaxed);
        assert!(!p.may_commit_now());
        p.last_batch.store(1, Relaxed);
        assert!(p.may_commit_now());
    }
}
