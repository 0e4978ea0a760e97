//! The engine's rules, driven by hand: events are `u32`, waiters `&'static str`-like ids
//! (`u32`), and a "worker" is whatever calls `take` / `finish` in the test.

use super::*;

type E = Engine<u32, u32, ()>;

fn engine(workers: i64, capacity: i64) -> E {
    Engine::new(Settings::new(workers, capacity, None).unwrap())
}

fn q(n: u32) -> Queued<u32> {
    Queued {
        item: n,
        enqueued: 0,
    }
}

/// A started engine whose workers all went idle (waiters 100, 101, ...).
fn idle(workers: i64, capacity: i64) -> E {
    let mut e = engine(workers, capacity);
    assert!(e.start().is_empty());
    for w in 0..u32::try_from(workers).unwrap() {
        assert!(e.go_idle(100 + w).is_empty() || e.is_drained());
    }
    e
}

/// What a publisher from outside sees: `Ok(wake)` when queued, `QueueFull` when full.
fn publish(e: &mut E, n: u32, lane: Option<u64>) -> Result<Option<u32>> {
    match e.accept(q(n), lane, true, false, false)? {
        Accepted::Queued { wake } => Ok(wake),
        Accepted::Full(_) => Err(e.queue_full()),
        Accepted::Unrouted(_) => panic!("routed"),
    }
}

fn blocked(n: u32, token: u64, direct: bool) -> Blocked<u32, u32> {
    Blocked {
        item: q(n),
        lane: None,
        waiter: 1000 + n,
        direct,
        token,
    }
}

// ------------------------------------------------------------------- settings

#[test]
fn settings_refuse_zero_workers_naming_the_value() {
    let err = Settings::new(0, 10, None).unwrap_err();
    assert_eq!(err.to_string(), "workers must be an int >= 1, got 0");
}

#[test]
fn settings_refuse_negative_workers() {
    assert!(Settings::new(-3, 10, None).is_err());
}

#[test]
fn settings_refuse_a_negative_queue_size_naming_it() {
    let err = Settings::new(1, -1, None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "max_queue_size must be an int >= 0 (0 = unbounded), got -1"
    );
}

#[test]
fn settings_key_events_by_default_only_with_several_workers() {
    assert!(!Settings::new(1, 0, None).unwrap().keyed);
    assert!(Settings::new(4, 0, None).unwrap().keyed);
    assert!(Settings::new(1, 0, Some(true)).unwrap().keyed);
    assert!(!Settings::new(4, 0, Some(false)).unwrap().keyed);
}

#[test]
fn settings_zero_capacity_is_unbounded() {
    let mut e = idle(1, 0);
    for n in 0..10_000 {
        publish(&mut e, n, None).unwrap();
    }
    assert_eq!(e.queue_size(), 10_000);
}

// ------------------------------------------------------------------ run state

#[test]
fn publishing_before_start_is_refused_as_not_started() {
    let mut e = engine(1, 0);
    assert_eq!(publish(&mut e, 1, None), Err(CoreError::NotStarted));
    assert_eq!(e.stats.published, 0);
}

#[test]
fn start_is_idempotent() {
    let mut e = idle(2, 0);
    assert!(e.start().is_empty());
    assert_eq!(e.state(), RunState::Running);
    // Idle workers stay idle: a second start does not reset them.
    assert_eq!(publish(&mut e, 1, None), Ok(Some(101)));
}

#[test]
fn a_restart_counts_every_worker_active_until_it_goes_idle_again() {
    let mut e = idle(2, 0);
    assert_eq!(e.close(false).idle.len(), 2);
    assert!(e.start().is_empty());
    assert_eq!(publish(&mut e, 1, None), Ok(None));
    assert!(e.go_idle(7).is_empty());
}

#[test]
fn closing_intake_refuses_outside_publishes_and_takes_handler_publishes() {
    let mut e = idle(1, 0);
    e.close_intake();
    assert!(!e.is_running());
    assert_eq!(
        publish(&mut e, 1, None),
        Err(CoreError::Closed { stopping: true })
    );
    assert!(e.accept(q(2), None, true, true, false).is_ok()); // from a handler
    assert!(e.accept(q(3), None, true, false, true).is_ok()); // a delivery it owes
    assert_eq!(e.queue_size(), 2);
}

#[test]
fn close_intake_before_start_does_nothing() {
    let mut e = engine(1, 0);
    e.close_intake();
    assert_eq!(e.state(), RunState::Created);
}

#[test]
fn publishing_after_close_is_refused_as_closed() {
    let mut e = idle(1, 0);
    e.close(false);
    assert_eq!(
        publish(&mut e, 1, None),
        Err(CoreError::Closed { stopping: false })
    );
    assert!(e.accept(q(1), None, true, true, true).is_err());
}

#[test]
fn closed_messages_say_what_happened() {
    assert!(CoreError::Closed { stopping: true }
        .to_string()
        .contains("stopping"));
    assert!(CoreError::Closed { stopping: false }
        .to_string()
        .contains("after `stop()`"));
    assert!(CoreError::NotStarted.to_string().contains("bus.start()"));
}

#[test]
fn close_with_discard_returns_queued_and_blocked() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    e.block(blocked(2, 7, false));
    let c = e.close(true);
    assert_eq!(c.discarded.iter().map(|q| q.item).collect::<Vec<_>>(), [1]);
    assert_eq!(c.blocked.len(), 1);
    assert_eq!(c.blocked[0].waiter, 1002);
    assert!(e.is_drained());
}

#[test]
fn close_without_discard_keeps_what_is_queued() {
    let mut e = idle(1, 0);
    publish(&mut e, 1, None).unwrap();
    let c = e.close(false);
    assert!(c.discarded.is_empty());
    assert_eq!(e.queue_size(), 1);
}

#[test]
fn close_hands_back_idle_waiters() {
    let mut e = idle(3, 0);
    let c = e.close(false);
    assert_eq!(c.idle.len(), 3);
}

#[test]
fn close_with_discard_resolves_drain_waiters() {
    let mut e = idle(1, 0);
    publish(&mut e, 1, None).unwrap();
    assert_eq!(e.add_drain_waiter(9), None);
    let c = e.close(true);
    assert_eq!(c.drains, [9]);
}

#[test]
fn close_with_discard_drops_admitted_rooms_and_enter_then_says_closed() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    e.block(blocked(2, 7, false));
    e.take().unwrap();
    let b = e.take_blocked();
    assert!(matches!(
        e.admit(b.into_iter().next().unwrap()),
        Admission::Reserved(1002)
    ));
    let c = e.close(true);
    assert_eq!(c.admitted, 1);
    assert!(matches!(e.enter(7), Err(CoreError::Closed { .. })));
    assert_eq!(e.lanes().reserved(), 0);
}

// ------------------------------------------------------------------- admission

#[test]
fn an_unrouted_event_is_accepted_and_finished_at_once() {
    let mut e = idle(1, 1);
    let Accepted::Unrouted(back) = e.accept(q(1), None, false, false, false).unwrap() else {
        panic!("unrouted")
    };
    assert_eq!(back.item, 1);
    assert_eq!(
        (e.stats.published, e.stats.processed, e.stats.unrouted),
        (1, 1, 1)
    );
    assert_eq!(e.queue_size(), 0);
}

#[test]
fn an_unrouted_event_is_accepted_even_when_the_queue_is_full() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    assert!(e.accept(q(2), None, false, false, false).is_ok());
}

#[test]
fn a_full_queue_refuses_with_queue_full_naming_the_capacity() {
    let mut e = idle(1, 2);
    publish(&mut e, 1, None).unwrap();
    publish(&mut e, 2, None).unwrap();
    let err = publish(&mut e, 3, None).unwrap_err();
    assert_eq!(err, CoreError::QueueFull { capacity: 2 });
    assert!(err.to_string().contains("max_queue_size=2"));
    assert_eq!(e.stats.published, 2);
}

#[test]
fn a_handler_publish_is_taken_past_the_bound() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    assert!(e.accept(q(2), None, true, true, false).is_ok());
    assert_eq!(e.queue_size(), 2);
}

#[test]
fn a_newcomer_waits_behind_blocked_publishers_even_when_room_appears() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    e.block(blocked(2, 1, false));
    e.take().unwrap(); // room for one, but the blocked publisher is first
    assert!(matches!(
        publish(&mut e, 3, None),
        Err(CoreError::QueueFull { .. })
    ));
}

#[test]
fn blocked_publishers_get_room_in_fifo_order() {
    let mut e = idle(1, 2);
    publish(&mut e, 1, None).unwrap();
    publish(&mut e, 2, None).unwrap();
    for (n, t) in [(3, 1), (4, 2), (5, 3)] {
        e.block(blocked(n, t, false));
    }
    e.take().unwrap();
    let first: Vec<u32> = e.take_blocked().iter().map(|b| b.item.item).collect();
    assert_eq!(first, [3]);
    e.take().unwrap();
    // The room of 3 is not reserved yet (not admitted): 4 gets the next one.
    let next: Vec<u32> = e.take_blocked().iter().map(|b| b.item.item).collect();
    assert_eq!(next, [4, 5]);
}

#[test]
fn take_blocked_takes_no_more_than_the_room() {
    let mut e = idle(1, 3);
    for n in 0..3 {
        publish(&mut e, n, None).unwrap();
    }
    for t in 0..5 {
        e.block(blocked(10 + u32::try_from(t).unwrap(), t, false));
    }
    e.take().unwrap();
    e.take().unwrap();
    assert_eq!(e.take_blocked().len(), 2);
    assert_eq!(e.blocked_publishers(), 3);
}

#[test]
fn an_admitted_publisher_holds_its_room_until_it_enters() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    e.block(blocked(2, 7, false));
    e.take().unwrap();
    let b = e.take_blocked().pop().unwrap();
    assert!(matches!(e.admit(b), Admission::Reserved(1002)));
    assert_eq!(e.queue_size(), 0);
    assert_eq!(e.stats.published, 1, "not published before it resumes");
    assert!(matches!(
        publish(&mut e, 3, None),
        Err(CoreError::QueueFull { .. })
    ));
    let (item, _) = e.enter(7).unwrap();
    assert_eq!(item, 2);
    assert_eq!((e.queue_size(), e.stats.published), (1, 2));
}

#[test]
fn a_newcomer_waits_behind_an_admitted_publisher_that_has_not_entered() {
    // Room appears after the admission (a worker took an event): the newcomer must still not
    // overtake the admitted publisher, or one key's events would be queued out of order.
    let mut e = idle(1, 2);
    publish(&mut e, 1, Some(9)).unwrap();
    publish(&mut e, 2, None).unwrap();
    e.block(blocked(3, 7, false));
    e.take().unwrap();
    let b = e.take_blocked().pop().unwrap();
    let _ = e.admit(b);
    e.take().unwrap(); // more room now
    assert!(matches!(
        publish(&mut e, 4, None),
        Err(CoreError::QueueFull { .. })
    ));
    e.enter(7).unwrap();
    assert!(publish(&mut e, 5, None).is_ok());
}

#[test]
fn a_withdrawn_publisher_gives_its_room_to_the_next() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    e.block(blocked(2, 7, false));
    e.block(blocked(3, 8, false));
    e.take().unwrap();
    let b = e.take_blocked().pop().unwrap();
    let _ = e.admit(b);
    assert!(e.withdraw(7));
    assert!(e.enter(7).is_err(), "a withdrawn publisher cannot enter");
    let next: Vec<u32> = e.take_blocked().iter().map(|b| b.item.item).collect();
    assert_eq!(next, [3]);
    assert_eq!(e.stats.published, 1);
}

#[test]
fn withdrawing_a_publisher_never_given_room_changes_nothing() {
    let mut e = idle(1, 1);
    assert!(!e.withdraw(42));
    assert_eq!(e.lanes().reserved(), 0);
}

#[test]
fn a_direct_blocked_delivery_is_queued_at_admission() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    e.block(blocked(2, 7, true));
    e.take().unwrap();
    let b = e.take_blocked().pop().unwrap();
    match e.admit(b) {
        Admission::Queued(w, item) => assert_eq!((w, item), (1002, 2)),
        Admission::Reserved(_) => panic!("a direct delivery is queued at once"),
    }
    assert_eq!((e.queue_size(), e.stats.published), (1, 2));
}

#[test]
fn admitted_and_blocked_publishers_keep_the_bus_undrained() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    e.block(blocked(2, 7, false));
    let (_, lane) = e.take().unwrap();
    e.finish(lane);
    assert!(!e.is_drained(), "a blocked publisher is pending");
    let b = e.take_blocked().pop().unwrap();
    let _ = e.admit(b);
    assert!(!e.is_drained(), "an admitted publisher is pending");
    e.withdraw(7);
    assert!(e.is_drained());
}

// -------------------------------------------------------------------- wake-ups

#[test]
fn the_first_event_into_an_idle_bus_wakes_one_worker() {
    let mut e = idle(2, 0);
    assert_eq!(publish(&mut e, 1, None), Ok(Some(101)));
}

#[test]
fn later_events_of_a_batch_wake_nobody() {
    let mut e = idle(4, 0);
    publish(&mut e, 1, None).unwrap();
    for n in 2..100 {
        assert_eq!(publish(&mut e, n, None), Ok(None), "one wake-up per batch");
    }
}

#[test]
fn a_started_bus_wakes_nobody_until_its_workers_went_idle() {
    let mut e = engine(2, 0);
    e.start();
    assert_eq!(publish(&mut e, 1, None), Ok(None));
}

#[test]
fn a_suspending_worker_wakes_another_when_work_waits() {
    let mut e = idle(2, 0);
    publish(&mut e, 1, None).unwrap(); // wakes 101, active = 1
    publish(&mut e, 2, None).unwrap();
    e.take().unwrap();
    assert_eq!(e.suspend(), Some(100));
}

#[test]
fn a_suspending_worker_wakes_nobody_when_nothing_waits() {
    let mut e = idle(2, 0);
    publish(&mut e, 1, None).unwrap();
    e.take().unwrap();
    assert_eq!(e.suspend(), None);
}

#[test]
fn a_dead_waiter_gives_its_turn_to_the_next_idle_worker() {
    let mut e = idle(3, 0);
    let Ok(Some(w)) = publish(&mut e, 1, None) else {
        panic!("a wake-up")
    };
    assert_eq!(w, 102);
    assert_eq!(e.turn_unused(), Some(101));
    assert_eq!(e.turn_unused(), Some(100));
    assert_eq!(e.turn_unused(), None);
}

#[test]
fn a_resumed_worker_counts_as_active_again() {
    let mut e = idle(2, 0);
    publish(&mut e, 1, None).unwrap();
    e.take().unwrap();
    assert_eq!(e.suspend(), None);
    e.resume();
    publish(&mut e, 2, None).unwrap();
    assert_eq!(e.suspend(), Some(100));
}

// ---------------------------------------------------------------- per-key order

#[test]
fn events_of_one_key_are_taken_one_at_a_time_in_order() {
    let mut e = idle(4, 0);
    for n in 0..4 {
        publish(&mut e, n, Some(7)).unwrap();
    }
    let (first, lane) = e.take().unwrap();
    assert_eq!((first.item, lane), (0, Some(7)));
    e.hold(lane); // its worker awaits the handler
    assert!(e.take().is_none(), "the key's lane is busy");
    e.finish(lane);
    assert_eq!(e.take().map(|(q, _)| q.item), Some(1));
}

#[test]
fn different_keys_are_taken_concurrently() {
    let mut e = idle(4, 0);
    for (n, k) in [(0, 1), (1, 2), (2, 3)] {
        publish(&mut e, n, Some(k)).unwrap();
    }
    let taken: Vec<u32> = (0..3)
        .filter_map(|_| e.take().map(|(q, _)| q.item))
        .collect();
    assert_eq!(taken, [0, 1, 2]);
}

#[test]
fn keyless_events_run_concurrently_in_publish_order() {
    let mut e = idle(4, 0);
    for n in 0..3 {
        publish(&mut e, n, None).unwrap();
    }
    let taken: Vec<u32> = (0..3)
        .filter_map(|_| e.take().map(|(q, _)| q.item))
        .collect();
    assert_eq!(taken, [0, 1, 2]);
}

#[test]
fn per_key_order_holds_with_n_simulated_workers_and_many_keys() {
    // Workers take and finish in a shuffled order; each key's events must still come out in
    // publish order, one at a time.
    for workers in [1_i64, 2, 4, 8] {
        let mut e = idle(workers, 0);
        let mut rng = fastrand::Rng::with_seed(u64::try_from(workers).unwrap());
        let mut next_seq = [0u32; 16];
        for n in 0..2000u32 {
            publish(&mut e, n, Some(u64::from(n % 16))).unwrap();
        }
        let mut running: Vec<(u32, Option<u64>)> = Vec::new();
        let mut seen = 0;
        while seen < 2000 {
            while running.len() < usize::try_from(workers).unwrap() {
                let Some((q, lane)) = e.take() else { break };
                e.hold(lane);
                let key = usize::try_from(lane.unwrap()).unwrap();
                assert!(
                    running.iter().all(|(_, l)| *l != lane),
                    "two events of one key at once"
                );
                assert_eq!(q.item / 16, next_seq[key], "key {key} out of order");
                next_seq[key] += 1;
                running.push((q.item, lane));
            }
            let i = rng.usize(..running.len());
            let (_, lane) = running.swap_remove(i);
            e.finish(lane);
            seen += 1;
        }
        assert!(e.is_drained());
        assert_eq!(e.stats.processed, 2000);
    }
}

#[test]
fn capacity_counts_queued_events_not_those_being_handled() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    e.take().unwrap();
    assert!(publish(&mut e, 2, None).is_ok());
}

// --------------------------------------------------------------------- draining

#[test]
fn a_fresh_bus_is_drained() {
    let mut e = idle(1, 0);
    assert!(e.is_drained());
    assert_eq!(e.add_drain_waiter(5), Some(5));
}

#[test]
fn drain_waits_for_queued_and_in_flight_events() {
    let mut e = idle(1, 0);
    publish(&mut e, 1, None).unwrap();
    assert_eq!(e.add_drain_waiter(5), None);
    let (_, lane) = e.take().unwrap();
    assert!(e.take_drain_waiters().is_empty(), "still in flight");
    e.finish(lane);
    assert_eq!(e.take_drain_waiters(), [5]);
}

#[test]
fn drain_waits_while_a_retry_sleeps() {
    // A retry's backoff is part of its event's turn: the event stays in flight.
    let mut e = idle(1, 0);
    publish(&mut e, 1, None).unwrap();
    let (_, lane) = e.take().unwrap();
    e.record_call(0, false);
    e.retry_decided();
    e.backoff_started();
    assert_eq!(e.retrying(), 1);
    assert_eq!(e.add_drain_waiter(5), None);
    e.backoff_ended();
    e.record_call(0, true);
    e.finish(lane);
    assert_eq!(e.take_drain_waiters(), [5]);
    assert_eq!((e.retrying(), e.stats.retried), (0, 1));
}

#[test]
fn going_idle_resolves_drain_waiters_when_drained() {
    let mut e = idle(1, 0);
    publish(&mut e, 1, None).unwrap();
    e.add_drain_waiter(5);
    let (_, lane) = e.take().unwrap();
    e.finish(lane);
    assert_eq!(e.go_idle(100), [5]);
}

#[test]
fn several_drain_waiters_are_all_resolved_once() {
    let mut e = idle(1, 0);
    publish(&mut e, 1, None).unwrap();
    for w in 1..=3 {
        e.add_drain_waiter(w);
    }
    let (_, lane) = e.take().unwrap();
    e.finish(lane);
    assert_eq!(e.take_drain_waiters(), [1, 2, 3]);
    assert!(e.take_drain_waiters().is_empty());
}

// ---------------------------------------------------------------------- parking

#[test]
fn a_dead_letter_with_park_parks_its_key_for_its_subscription_only() {
    let mut e = idle(1, 0);
    e.dead_lettered(Some((3, 42)));
    assert!(e.is_parked(3, 42));
    assert!(!e.is_parked(4, 42));
    assert!(!e.is_parked(3, 43));
    assert_eq!(e.stats.dead_lettered, 1);
}

#[test]
fn a_failed_call_is_counted_everywhere_then_as_its_verdict() {
    let mut e = idle(1, 0);
    let sub = e.subscribe(Matcher::for_str("Paid").unwrap(), 0, "billing", ());
    let paid = e.stats.type_counters("Paid");
    e.call_failed(2_000_000, "Paid", &paid, &sub, Failed::Retry);
    e.call_failed(
        4_000_000,
        "Paid",
        &paid,
        &sub,
        Failed::DeadLetter { park: Some(42) },
    );
    e.parked_behind(&sub);
    let s = &e.stats;
    assert_eq!((s.failed, s.retried, s.dead_lettered), (2, 1, 2));
    assert_eq!(s.latency.count(), 2, "both calls are timed");
    assert_eq!(
        s.failures_by_pair(),
        vec![("Paid".to_owned(), "billing".to_owned(), 2)]
    );
    assert_eq!(paid.failed.load(std::sync::atomic::Ordering::Relaxed), 2);
    let c = &sub.counters;
    let read = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        (read(&c.failed), read(&c.retried), read(&c.dead_lettered)),
        (2, 1, 2)
    );
    assert!(e.is_parked(sub.id, 42));
    assert!(!e.is_parked(sub.id, 43));
}

#[test]
fn a_dead_letter_without_park_parks_nothing() {
    let mut e = idle(1, 0);
    e.dead_lettered(None);
    assert!(!e.is_parked(3, 42));
}

#[test]
fn unpark_releases_a_parked_key_once() {
    let mut e = idle(1, 0);
    e.park(1, 2);
    assert!(e.unpark(1, 2));
    assert!(!e.unpark(1, 2));
    assert!(!e.is_parked(1, 2));
}

// ------------------------------------------------------------------- statistics

#[test]
fn statistics_count_calls_failures_retries_and_dead_letters() {
    let mut e = idle(1, 0);
    publish(&mut e, 1, None).unwrap();
    let (_, lane) = e.take().unwrap();
    e.record_call(1_000_000, false);
    e.retry_decided();
    e.backoff_started();
    e.backoff_ended();
    e.record_call(3_000_000, false);
    e.dead_lettered(None);
    e.finish(lane);
    let s = &e.stats;
    assert_eq!(
        (
            s.published,
            s.processed,
            s.failed,
            s.retried,
            s.dead_lettered
        ),
        (1, 1, 2, 1, 1)
    );
    assert!((s.avg_handler_ms() - 2.0).abs() < 1e-9);
}

#[test]
fn subscriptions_of_one_name_share_counters_that_outlive_them() {
    let mut e = idle(1, 0);
    let a = e.subscribe(Matcher::Exact("T".into()), 1, "billing", ());
    let b = e.subscribe(Matcher::Exact("U".into()), 1, "billing", ());
    assert!(Arc::ptr_eq(&a.counters, &b.counters));
    crate::core::stats::bump(&a.counters.failed, 1);
    assert!(e.router.unsubscribe(a.id) && e.router.unsubscribe(b.id));
    assert_eq!(
        e.stats.by_subscription(),
        vec![("billing".to_owned(), 0, 1, 0, 0)]
    );
}

#[test]
fn interrupted_calls_are_counted_apart() {
    let mut e = idle(1, 0);
    e.interrupted();
    assert_eq!((e.stats.interrupted, e.stats.failed), (1, 0));
}

#[test]
fn published_counts_accepted_events_only() {
    let mut e = idle(1, 1);
    publish(&mut e, 1, None).unwrap();
    assert!(publish(&mut e, 2, None).is_err());
    assert_eq!(e.stats.published, 1);
}

// ----------------------------------------------------------------------- health

#[test]
fn readings_report_the_queue_and_the_oldest_event() {
    let mut e = idle(1, 10);
    e.accept(
        Queued {
            item: 1,
            enqueued: 1_000_000_000,
        },
        Some(1),
        true,
        false,
        false,
    )
    .unwrap();
    let r = e.readings(4_000_000_000);
    assert_eq!((r.queued, r.capacity), (1, 10));
    assert!((r.oldest_age_s - 3.0).abs() < 1e-9);
    assert!(r.running);
}

#[test]
fn readings_count_failed_calls_and_dead_letters() {
    let mut e = idle(1, 0);
    e.record_call(0, true);
    e.record_call(0, false);
    e.set_dead_letters(4);
    let r = e.readings(0);
    assert_eq!((r.calls, r.failed_calls, r.dead_letters), (2, 1, 4));
}

#[test]
fn health_turns_degraded_when_the_queue_is_80_percent_full() {
    let mut e = idle(1, 10);
    for n in 0..8 {
        publish(&mut e, n, None).unwrap();
    }
    let (status, reasons) = crate::core::health::status(&e.readings(0), &Thresholds::default());
    assert_eq!(status, "degraded");
    assert_eq!(reasons.len(), 1);
}

#[test]
fn health_is_stopped_after_close() {
    let mut e = idle(1, 0);
    e.close(false);
    let (status, _) = crate::core::health::status(&e.readings(0), &Thresholds::default());
    assert_eq!(status, "stopped");
}

// ------------------------------------------------------------------- reports

#[test]
fn statistics_count_published_calls_and_what_waits() {
    let mut e = idle(1, 10);
    publish(&mut e, 1, None).unwrap();
    publish(&mut e, 2, None).unwrap();
    e.take().unwrap();
    e.record_call(2_000_000, true);
    e.record_call(4_000_000, false);
    let s = e.statistics();
    assert_eq!((s.published, s.events_published), (2, 2));
    assert_eq!((s.handler_calls, s.failed), (2, 1));
    assert_eq!((s.queue_size, s.in_flight, s.max_queue_size), (1, 1, 10));
    assert!(s.is_running);
    assert_eq!(s.worker_count, 1);
    assert!((s.avg_processing_time_ms - 3.0).abs() < 1e-9);
    assert!(s.handler_latency_ms.max >= s.handler_latency_ms.p50);
    assert!(
        s.handler_latency_ms.max >= 3.9,
        "{:?}",
        s.handler_latency_ms
    );
}

#[test]
fn statistics_list_event_types_and_subscriptions_by_name() {
    let mut e = idle(1, 0);
    let (a, b): (Arc<str>, Arc<str>) = ("audit".into(), "billing".into());
    e.stats.type_counters("Paid");
    e.stats.sub_counters(&b);
    e.stats.sub_counters(&a);
    e.stats.routed("Paid", [&b, &a]);
    e.stats.call_failed("Paid", &a);
    let s = e.statistics();
    assert_eq!(
        s.by_event_type.keys().collect::<Vec<_>>(),
        vec!["Paid"],
        "{s:?}"
    );
    assert_eq!(
        s.by_subscription.keys().cloned().collect::<Vec<_>>(),
        vec!["audit".to_owned(), "billing".to_owned()]
    );
}

#[test]
fn a_health_report_of_a_stopped_bus_says_stopped_and_shows_its_limits() {
    let e = engine(2, 100);
    let r = e.health_report(0, crate::core::health::ProcessSample::default());
    assert_eq!(r.status, "stopped");
    assert!(r.reasons.is_empty());
    assert_eq!((r.worker_count, r.max_queue_size), (2, 100));
    assert!((r.thresholds.queue_fill - 0.8).abs() < 1e-12);
    assert!(r.error_rate.abs() < 1e-12);
}

#[test]
fn a_health_report_turns_degraded_naming_a_full_queue() {
    let mut e = idle(2, 10);
    for n in 0..9 {
        publish(&mut e, n, Some(7)).unwrap();
    }
    let r = e.health_report(0, crate::core::health::ProcessSample::default());
    assert_eq!(r.status, "degraded");
    assert!(r.reasons[0].contains("9/10"), "{:?}", r.reasons);
    assert_eq!((r.queue_size, r.lane_count), (9, 1));
    assert_eq!(r.longest_lanes, vec![9]);
}
