//! The bus's state machine: run state, admission and backpressure, per-key lanes, idle
//! workers, drain waiters, parking, and the counters — free of Python and of I/O.
//!
//! `Engine<E, W, H>` is generic over the queued payload `E` (the glue's envelope), the waiter
//! handle `W` (the glue's loop future; a plain id in tests) and the subscription payload `H`.
//! It never resolves a waiter itself: every operation that frees a worker, a publisher or a
//! drain *returns* the waiters to resolve, and the caller resolves them after releasing its
//! lock. That is what keeps Python out of the engine's lock: the glue holds the lock only
//! around these calls, and calls into Python (a future's `done()`, `set_result`) after them.
//!
//! Invariants:
//! - at most `workers` workers dispatch at once (`active`); an idle worker waits on a waiter,
//!   woken by the first event queued while nobody dispatches (one wake-up per batch);
//! - `lanes.len() + reserved <= capacity` for everything accepted from outside a handler
//!   (events published by a running handler are always taken: only handlers make room);
//! - a publisher given room enters its event only when it resumes (`enter`): one cancelled in
//!   between (`withdraw`) never published, and its room goes to the next in FIFO order;
//! - drained ⇔ nothing queued, blocked, admitted or being handled (a retry's backoff is part
//!   of its handler's turn, so it counts as being handled).

use std::collections::VecDeque;
use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

use crate::core::errors::{CoreError, Result};
use crate::core::health::{Readings, Thresholds};
use crate::core::lanes::Lanes;
use crate::core::routing::{Matcher, Router, Subscription};
use crate::core::stats::{bump, Stats, TypeCounters};

/// What becomes of a failed handler call (`Engine::call_failed`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Failed {
    /// It is retried, after a backoff.
    Retry,
    /// Its (event, subscription) pair goes to the dead letters; with the hash of its key,
    /// later events of that key wait behind it for that subscription.
    DeadLetter { park: Option<u64> },
}

/// Where the bus is in its life.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum RunState {
    /// Constructed, not started.
    Created,
    /// Accepting and dispatching.
    Running,
    /// `stop()` is draining: outside publishes are refused, handlers still run.
    Closing,
    /// Stopped.
    Closed,
}

/// The bus's settings, validated once (each error names the setting and the value).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Workers dispatching concurrently (>= 1).
    pub workers: usize,
    /// `max_queue_size`: events accepted and not yet handed to a handler (0 = unbounded).
    pub capacity: usize,
    /// Whether events are ordered per key (default: when `workers > 1`).
    pub keyed: bool,
    /// When health turns `degraded`.
    pub thresholds: Thresholds,
}

impl Settings {
    /// Validates `workers` (>= 1) and `max_queue_size` (>= 0).
    pub fn new(workers: i64, max_queue_size: i64, keyed: Option<bool>) -> Result<Self> {
        let workers = usize::try_from(workers)
            .ok()
            .filter(|w| *w >= 1)
            .ok_or_else(|| CoreError::InvalidSetting {
                name: "workers",
                rule: "an int >= 1",
                value: workers.to_string(),
            })?;
        let capacity = usize::try_from(max_queue_size).map_err(|_| CoreError::InvalidSetting {
            name: "max_queue_size",
            rule: "an int >= 0 (0 = unbounded)",
            value: max_queue_size.to_string(),
        })?;
        Ok(Self {
            workers,
            capacity,
            keyed: keyed.unwrap_or(workers > 1),
            thresholds: Thresholds::default(),
        })
    }
}

/// An accepted event waiting for a worker.
pub struct Queued<E> {
    /// The payload (the glue's envelope).
    pub item: E,
    /// `health::coarse_now_ns()` at publish.
    pub enqueued: u64,
}

/// A publisher waiting for room.
pub struct Blocked<E, W> {
    /// Its event.
    pub item: Queued<E>,
    /// Its lane (key hash) when keyed.
    pub lane: Option<u64>,
    /// Resolved when it is given room.
    pub waiter: W,
    /// Whether nobody awaits `waiter` (a transport's delivery, a replay): the event is queued
    /// at admission instead of when its publisher resumes.
    pub direct: bool,
    /// Identifies the publisher to `enter` / `withdraw`.
    pub token: u64,
}

struct Admitted<E> {
    item: Queued<E>,
    lane: Option<u64>,
}

/// What `accept` did with an event.
pub enum Accepted<E, W> {
    /// Queued; `wake` is an idle worker to wake (after unlocking), if one must be.
    Queued {
        /// The idle worker's waiter.
        wake: Option<W>,
    },
    /// No subscription matches it: accepted and finished at once (handed back).
    Unrouted(Queued<E>),
    /// The queue is full (or publishers wait before it): not accepted, handed back to block
    /// its publisher or to refuse with `QueueFull`.
    Full(Queued<E>),
}

/// What `admit` did with a blocked publisher given room.
pub enum Admission<E, W> {
    /// Queued at once (a direct delivery): resolve `waiter`; the event is `E`'s.
    Queued(W, E),
    /// Room reserved: resolve `waiter`; the event enters when its publisher resumes.
    Reserved(W),
}

/// What `close` leaves to the caller.
pub struct Closed<E, W> {
    /// Queued events discarded (on `discard`).
    pub discarded: Vec<Queued<E>>,
    /// Blocked publishers to fail with `BusClosed` (on `discard`).
    pub blocked: Vec<Blocked<E, W>>,
    /// Publishers given room that had not resumed: not accepted (`enter` says `BusClosed`).
    pub admitted: usize,
    /// Idle workers' waiters (dropped: the workers are cancelled).
    pub idle: Vec<W>,
    /// Drain waiters to resolve, if that left the bus drained.
    pub drains: Vec<W>,
}

/// The engine of one bus.
pub struct Engine<E, W, H> {
    settings: Settings,
    state: RunState,
    /// The subscriptions.
    pub router: Router<H>,
    lanes: Lanes<Queued<E>>,
    blocked: VecDeque<Blocked<E, W>>,
    admitted: FxHashMap<u64, Admitted<E>>,
    idle: Vec<W>,
    active: usize,
    in_flight: usize,
    drain_waiters: Vec<W>,
    /// The counters.
    pub stats: Stats,
    dead_letters: u64,
    retrying: usize,
    parked: FxHashSet<(u64, u64)>,
}

impl<E, W, H> Engine<E, W, H> {
    /// A new, not yet started engine.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            state: RunState::Created,
            router: Router::new(),
            lanes: Lanes::new(settings.capacity),
            blocked: VecDeque::new(),
            admitted: FxHashMap::default(),
            idle: Vec::new(),
            active: 0,
            in_flight: 0,
            drain_waiters: Vec::new(),
            stats: Stats::default(),
            dead_letters: 0,
            retrying: 0,
            parked: FxHashSet::default(),
        }
    }

    /// The validated settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Where the bus is in its life.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Whether the bus accepts events from outside.
    pub fn is_running(&self) -> bool {
        self.state == RunState::Running
    }

    // ------------------------------------------------------------------ life cycle

    /// Starts (idempotent): every worker is about to take its first step, so all count as
    /// active until they go idle. Returns the waiters of workers of an earlier run to drop.
    pub fn start(&mut self) -> Vec<W> {
        if self.state == RunState::Running {
            return Vec::new();
        }
        self.state = RunState::Running;
        self.active = self.settings.workers;
        std::mem::take(&mut self.idle)
    }

    /// Refuses publishes from outside from now on; handlers keep running (`stop()`'s first
    /// step: what was accepted is drained, nothing is accepted and then dropped).
    pub fn close_intake(&mut self) {
        if self.state == RunState::Running {
            self.state = RunState::Closing;
        }
    }

    /// Stops. With `discard`, drops what is queued and hands back the blocked publishers.
    pub fn close(&mut self, discard: bool) -> Closed<E, W> {
        self.state = RunState::Closed;
        let mut closed = Closed {
            discarded: Vec::new(),
            blocked: Vec::new(),
            admitted: 0,
            idle: std::mem::take(&mut self.idle),
            drains: Vec::new(),
        };
        if discard {
            closed.discarded = self.lanes.clear();
            closed.blocked = self.blocked.drain(..).collect();
            closed.admitted = self.admitted.len();
            for _ in 0..self.admitted.len() {
                self.lanes.unreserve();
            }
            self.admitted.clear();
        }
        closed.drains = self.take_drain_waiters();
        closed
    }

    /// Whether an event may be taken now: `inside` is an event from inside the bus (published
    /// by a running handler, a transport's delivery, a replay), taken while `stop()` drains.
    pub fn check_intake(&self, inside: bool) -> Result<()> {
        match self.state {
            RunState::Running => Ok(()),
            RunState::Closing if inside => Ok(()),
            RunState::Created => Err(CoreError::NotStarted),
            RunState::Closing | RunState::Closed => Err(CoreError::Closed {
                stopping: self.state == RunState::Closing,
            }),
        }
    }

    // ------------------------------------------------------------------- admission

    /// Takes an event: queued when there is room (or it comes from a running handler), else
    /// handed back as `Full` (the caller blocks its publisher, or refuses with `queue_full`).
    /// `routed` is whether any subscription matches it; `inside` whether it comes from inside
    /// the bus (taken while `stop()` drains). Refused with `NotStarted` / `Closed`.
    pub fn accept(
        &mut self,
        item: Queued<E>,
        lane: Option<u64>,
        routed: bool,
        from_handler: bool,
        inside: bool,
    ) -> Result<Accepted<E, W>> {
        self.check_intake(inside || from_handler)?;
        if !routed {
            self.stats.published += 1;
            self.stats.processed += 1;
            self.stats.unrouted += 1;
            return Ok(Accepted::Unrouted(item));
        }
        // A newcomer queues behind publishers still waiting for room *and* behind those given
        // room that have not entered yet: a thread's events of one key reach the queue in
        // the order they were published.
        let waiting = !self.blocked.is_empty() || !self.admitted.is_empty();
        if from_handler || (self.lanes.has_room() && !waiting) {
            self.lanes.push(item, lane);
            self.stats.published += 1;
            return Ok(Accepted::Queued {
                wake: self.wake_if_needed(),
            });
        }
        Ok(Accepted::Full(item))
    }

    /// The error for an event refused because the queue is full.
    pub fn queue_full(&self) -> CoreError {
        CoreError::QueueFull {
            capacity: self.lanes.capacity(),
        }
    }

    /// Parks a publisher until there is room (FIFO).
    pub fn block(&mut self, blocked: Blocked<E, W>) {
        self.blocked.push_back(blocked);
    }

    /// Takes as many blocked publishers as there is room for, oldest first. The caller checks
    /// (outside the lock) which still wait, then hands those to `admit` in the same order.
    pub fn take_blocked(&mut self) -> Vec<Blocked<E, W>> {
        let room = self.lanes.room().min(self.blocked.len());
        self.blocked.drain(..room).collect()
    }

    /// Gives a blocked publisher its room (see `Admission`).
    pub fn admit(&mut self, b: Blocked<E, W>) -> Admission<E, W>
    where
        E: Clone,
    {
        if b.direct {
            let item = b.item.item.clone();
            self.lanes.push(b.item, b.lane);
            self.stats.published += 1;
            Admission::Queued(b.waiter, item)
        } else {
            self.lanes.reserve();
            self.admitted.insert(
                b.token,
                Admitted {
                    item: b.item,
                    lane: b.lane,
                },
            );
            Admission::Reserved(b.waiter)
        }
    }

    /// A publisher given room resumed: its event enters the queue now. Returns the event and
    /// the idle worker to wake, or `Closed` when `stop()` discarded its room meanwhile.
    pub fn enter(&mut self, token: u64) -> Result<(E, Option<W>)>
    where
        E: Clone,
    {
        let a = self
            .admitted
            .remove(&token)
            .ok_or(CoreError::Closed { stopping: false })?;
        self.lanes.unreserve();
        let item = a.item.item.clone();
        self.lanes.push(a.item, a.lane);
        self.stats.published += 1;
        Ok((item, self.wake_if_needed()))
    }

    /// A publisher waiting for room was cancelled. True when it had been given room: that
    /// room is free again (the caller admits the next blocked publishers).
    pub fn withdraw(&mut self, token: u64) -> bool {
        if self.admitted.remove(&token).is_some() {
            self.lanes.unreserve();
            true
        } else {
            false
        }
    }

    // -------------------------------------------------------------------- dispatch

    /// Pops an idle worker to wake when nobody dispatches and work is ready; it counts as
    /// active. If its waiter turns out dead (its worker was cancelled), the caller gives the
    /// turn back with `turn_unused`.
    pub fn wake_if_needed(&mut self) -> Option<W> {
        if self.active > 0 || !self.lanes.has_ready() {
            return None;
        }
        let w = self.idle.pop()?;
        self.active += 1;
        Some(w)
    }

    /// The worker woken by `wake_if_needed` was gone: its turn goes to the next idle one.
    pub fn turn_unused(&mut self) -> Option<W> {
        self.active = self.active.saturating_sub(1);
        self.wake_if_needed()
    }

    /// A worker resumes dispatching (after a handler it awaited finished its step).
    pub fn resume(&mut self) {
        self.active += 1;
    }

    /// A worker awaits a handler: it stops dispatching; another idle worker is woken if work
    /// waits.
    pub fn suspend(&mut self) -> Option<W> {
        self.active = self.active.saturating_sub(1);
        self.wake_if_needed()
    }

    /// The next event for a worker, with its lane: no other event of its key is taken until
    /// `finish`, provided the worker calls `hold` before it lets another worker take.
    pub fn take(&mut self) -> Option<(Queued<E>, Option<u64>)> {
        let taken = self.lanes.take()?;
        self.in_flight += 1;
        Some(taken)
    }

    /// The worker that took the event of `lane` is about to let others take (it awaits): the
    /// key stays busy until `finish` (see `core::lanes`).
    pub fn hold(&mut self, lane: Option<u64>) {
        self.lanes.hold(lane);
    }

    /// The event `take` would return now, left in place.
    pub fn peek(&self) -> Option<&Queued<E>> {
        self.lanes.peek()
    }

    /// A worker found nothing to take: it waits on `waiter`. Returns the drain waiters to
    /// resolve if the bus is now drained.
    pub fn go_idle(&mut self, waiter: W) -> Vec<W> {
        self.active = self.active.saturating_sub(1);
        self.idle.push(waiter);
        self.take_drain_waiters()
    }

    /// An event's every subscription finished: its lane is free.
    pub fn finish(&mut self, lane: Option<u64>) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.lanes.done(lane);
        self.stats.processed += 1;
    }

    /// Adds a subscription, with the counters the statistics keep for its name.
    pub fn subscribe(
        &mut self,
        matcher: Matcher,
        priority: i64,
        name: &str,
        payload: H,
    ) -> Arc<Subscription<H>> {
        let name: Arc<str> = name.into();
        let counters = self.stats.sub_counters(&name);
        self.router
            .subscribe(matcher, priority, name, counters, payload)
    }

    /// A handler call ended: counted, with its duration (every call is timed).
    pub fn record_call(&mut self, ns: u64, ok: bool) {
        self.stats.record_call(ns, ok);
    }

    /// A failed call will be retried (after its hook, then a backoff).
    pub fn retry_decided(&mut self) {
        self.stats.retried += 1;
    }

    /// A retry's backoff started: counted in `retrying` until it ends.
    pub fn backoff_started(&mut self) {
        self.retrying += 1;
    }

    /// A backoff ended (the retry runs now, or the worker was cancelled).
    pub fn backoff_ended(&mut self) {
        self.retrying = self.retrying.saturating_sub(1);
    }

    /// An (event, subscription) pair went to the dead letters; with `park`, later events of
    /// its key wait behind it for that subscription.
    pub fn dead_lettered(&mut self, park: Option<(u64, u64)>) {
        self.stats.dead_lettered += 1;
        if let Some(p) = park {
            self.parked.insert(p);
        }
    }

    /// A handler call of `sub` on an event of `type_key` raised after `ns` nanoseconds: counted
    /// in the bus's totals and call histogram, the failures by (type, subscription), the
    /// type's and the subscription's counters; then its verdict: a retry, or a dead letter
    /// (which, with a key to park, parks that key for `sub`).
    pub fn call_failed(
        &mut self,
        ns: u64,
        type_key: &str,
        type_counters: &TypeCounters,
        sub: &Subscription<H>,
        verdict: Failed,
    ) {
        self.record_call(ns, false);
        self.stats.call_failed(type_key, &sub.name);
        bump(&type_counters.failed, 1);
        bump(&sub.counters.failed, 1);
        match verdict {
            Failed::Retry => {
                self.retry_decided();
                bump(&sub.counters.retried, 1);
            }
            Failed::DeadLetter { park } => {
                self.dead_lettered(park.map(|h| (sub.id, h)));
                bump(&sub.counters.dead_lettered, 1);
            }
        }
    }

    /// An event of a key parked for `sub` joins the dead letters behind it, without a call.
    pub fn parked_behind(&mut self, sub: &Subscription<H>) {
        self.dead_lettered(None);
        bump(&sub.counters.dead_lettered, 1);
    }

    /// A worker was interrupted by its own cancellation (shutdown).
    pub fn interrupted(&mut self) {
        self.stats.interrupted += 1;
    }

    // --------------------------------------------------------------------- parking

    /// Parks `(subscription id, key hash)` (a dead letter's key, restored after a restart).
    pub fn park(&mut self, sub: u64, key_hash: u64) {
        self.parked.insert((sub, key_hash));
    }

    /// Unparks; true when it was parked.
    pub fn unpark(&mut self, sub: u64, key_hash: u64) -> bool {
        self.parked.remove(&(sub, key_hash))
    }

    /// Whether events of this key wait behind a dead letter of this subscription.
    pub fn is_parked(&self, sub: u64, key_hash: u64) -> bool {
        self.parked.contains(&(sub, key_hash))
    }

    // --------------------------------------------------------------------- waiting

    /// Whether every accepted event has been handled, retries included.
    pub fn is_drained(&self) -> bool {
        self.in_flight == 0
            && self.lanes.is_empty()
            && self.blocked.is_empty()
            && self.admitted.is_empty()
    }

    /// Registers a drain waiter; hands it back when the bus is drained already.
    pub fn add_drain_waiter(&mut self, waiter: W) -> Option<W> {
        if self.is_drained() {
            return Some(waiter);
        }
        self.drain_waiters.push(waiter);
        None
    }

    /// The drain waiters to resolve, when drained.
    pub fn take_drain_waiters(&mut self) -> Vec<W> {
        if self.is_drained() {
            std::mem::take(&mut self.drain_waiters)
        } else {
            Vec::new()
        }
    }

    // ------------------------------------------------------------------ statistics

    /// Events accepted and not yet handed to a handler.
    pub fn queue_size(&self) -> usize {
        self.lanes.len()
    }

    /// Publishers waiting for room.
    pub fn blocked_publishers(&self) -> usize {
        self.blocked.len()
    }

    /// Events being handled (retries' backoff included).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// (event, subscription) pairs sleeping before a retry.
    pub fn retrying(&self) -> usize {
        self.retrying
    }

    /// The dead letters the bus holds (told by the Python side, which keeps them).
    pub fn set_dead_letters(&mut self, n: u64) {
        self.dead_letters = n;
    }

    /// The lanes, for health (`lane_count`, `longest_lanes`, the oldest queued event).
    pub fn lanes(&self) -> &Lanes<Queued<E>> {
        &self.lanes
    }

    /// What the health report is computed from; `now_ns` on `health::coarse_now_ns`'s clock.
    pub fn readings(&self, now_ns: u64) -> Readings {
        let oldest = self
            .lanes
            .heads()
            .map(|q| now_ns.saturating_sub(q.enqueued) as f64 / 1e9)
            .fold(0.0, f64::max);
        Readings {
            running: self.is_running(),
            queued: self.lanes.len(),
            capacity: self.lanes.capacity(),
            oldest_age_s: oldest,
            calls: self.stats.failed + self.stats.succeeded,
            failed_calls: self.stats.failed,
            dead_letters: self.dead_letters,
        }
    }
}

#[cfg(test)]
mod tests;
