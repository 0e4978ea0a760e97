//! One event's way through its subscriptions, as a resumable state machine.
//!
//! The subscriptions an event reaches are called in priority order, one at a time. A failed
//! call is retried alone — the event's other subscriptions are not called again — after a
//! backoff from its subscription's `RetryPolicy`, while the event keeps its key's lane (so
//! later events of that key wait: per-key order). After its last attempt (or at once for a
//! failure outside `retry_on`) the pair is dead-lettered and the next subscription is called.
//! A subscription whose key is parked behind an earlier dead letter is skipped (the pair joins
//! the dead letters in order). The glue keeps one `Delivery` per worker and reports how each
//! call ended; `drive` runs the same machine synchronously through a `Runner`, which is how
//! the rules are tested without Python.

use crate::core::retry::RetryPolicy;

/// Where one event is in its subscriptions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    subs: usize,
    idx: usize,
    attempt: u32,
    /// Decided after the last call: retry the same subscription next.
    retry: bool,
}

/// What to do next for the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Call subscription `sub` (its index in priority order), attempt `attempt` (1-based).
    Call {
        /// The subscription's index.
        sub: usize,
        /// The attempt, 1-based.
        attempt: u32,
    },
    /// Every subscription finished: the event is done.
    Done,
}

/// How a call ended, as the engine decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It succeeded.
    Ok,
    /// It failed and will be retried after a backoff.
    Retry,
    /// It failed for good: the pair goes to the dead letters.
    DeadLetter,
}

impl Delivery {
    /// An event reaching `subs` subscriptions.
    pub fn new(subs: usize) -> Self {
        Self {
            subs,
            idx: 0,
            attempt: 1,
            retry: false,
        }
    }

    /// The next call, or `Done`.
    pub fn next(&self) -> Next {
        if self.idx < self.subs {
            Next::Call {
                sub: self.idx,
                attempt: self.attempt,
            }
        } else {
            Next::Done
        }
    }

    /// The subscription being called (or last called).
    pub fn sub(&self) -> usize {
        self.idx
    }

    /// The attempt being made (1-based).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Records how the current call ended; `retryable` is whether the failure is worth a
    /// retry (its exception is in `retry_on`), `cancelled` whether the worker is being
    /// cancelled. Call `advance` after any bookkeeping (the after-call hook).
    pub fn ended(
        &mut self,
        ok: bool,
        policy: &RetryPolicy,
        retryable: bool,
        cancelled: bool,
    ) -> Verdict {
        self.retry = !ok && policy.should_retry(self.attempt, retryable, cancelled);
        match (ok, self.retry) {
            (true, _) => Verdict::Ok,
            (false, true) => Verdict::Retry,
            (false, false) => Verdict::DeadLetter,
        }
    }

    /// The current subscription is skipped (its key is parked behind a dead letter).
    pub fn skipped(&mut self) {
        self.retry = false;
    }

    /// Whether the last call is to be retried (then `advance` needs its policy).
    pub fn retry_pending(&self) -> bool {
        self.retry
    }

    /// Moves on: the same subscription again after the returned backoff (seconds; `u` a
    /// uniform sample in [0, 1) for the jitter), or the next subscription (`None`).
    pub fn advance(&mut self, policy: &RetryPolicy, u: f64) -> Option<f64> {
        if std::mem::take(&mut self.retry) {
            let delay = policy.delay(self.attempt, u);
            self.attempt += 1;
            Some(delay)
        } else {
            self.next_subscription();
            None
        }
    }

    /// Moves to the next subscription (no retry pending: the hot path, no policy needed).
    pub fn next_subscription(&mut self) {
        self.retry = false;
        self.idx += 1;
        self.attempt = 1;
    }
}

/// How a test (or any synchronous host) runs handlers.
pub trait Runner {
    /// Calls subscription `sub`; `Err(retryable)` when it failed.
    fn call(&mut self, sub: usize, attempt: u32) -> Result<(), bool>;
    /// Whether the event's key is parked for subscription `sub`.
    fn parked(&mut self, _sub: usize) -> bool {
        false
    }
    /// The pair (event, `sub`) went to the dead letters after `attempts` attempts (0: parked).
    fn dead_letter(&mut self, sub: usize, attempts: u32);
    /// Waits `seconds` before a retry.
    fn backoff(&mut self, seconds: f64);
}

/// Runs one event through `policies.len()` subscriptions (in that order) with `runner`,
/// jitter sample `u`.
pub fn drive<R: Runner>(policies: &[RetryPolicy], runner: &mut R, u: f64) {
    let mut d = Delivery::new(policies.len());
    while let Next::Call { sub, attempt } = d.next() {
        let policy = &policies[sub];
        if runner.parked(sub) {
            d.skipped();
            runner.dead_letter(sub, 0);
        } else {
            let result = runner.call(sub, attempt);
            let verdict = d.ended(result.is_ok(), policy, result.err().unwrap_or(true), false);
            if verdict == Verdict::DeadLetter {
                runner.dead_letter(sub, attempt);
            }
        }
        if let Some(delay) = d.advance(policy, u) {
            runner.backoff(delay);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails the calls listed (`(sub, attempt)`), records everything.
    #[derive(Default)]
    struct Fake {
        fail: Vec<(usize, u32, bool)>,
        parked: Vec<usize>,
        log: Vec<String>,
    }

    impl Runner for Fake {
        fn call(&mut self, sub: usize, attempt: u32) -> Result<(), bool> {
            self.log.push(format!("call {sub}#{attempt}"));
            match self
                .fail
                .iter()
                .find(|(s, a, _)| *s == sub && *a == attempt)
            {
                Some((_, _, retryable)) => Err(*retryable),
                None => Ok(()),
            }
        }
        fn parked(&mut self, sub: usize) -> bool {
            self.parked.contains(&sub)
        }
        fn dead_letter(&mut self, sub: usize, attempts: u32) {
            self.log.push(format!("dead {sub} after {attempts}"));
        }
        fn backoff(&mut self, seconds: f64) {
            self.log.push(format!("sleep {seconds}"));
        }
    }

    fn policy(attempts: i64) -> RetryPolicy {
        RetryPolicy::new(attempts, 0.5, 10.0, 2.0, 0.0).unwrap()
    }

    fn run(policies: &[RetryPolicy], fake: &mut Fake) -> Vec<String> {
        drive(policies, fake, 0.5);
        std::mem::take(&mut fake.log)
    }

    #[test]
    fn subscriptions_are_called_in_order_once_each() {
        let mut f = Fake::default();
        assert_eq!(
            run(&[policy(1), policy(1), policy(1)], &mut f),
            ["call 0#1", "call 1#1", "call 2#1"]
        );
    }

    #[test]
    fn an_event_without_subscriptions_is_done_at_once() {
        assert_eq!(Delivery::new(0).next(), Next::Done);
        let mut f = Fake::default();
        assert!(run(&[], &mut f).is_empty());
    }

    #[test]
    fn a_failed_call_is_retried_alone_after_its_backoff() {
        let mut f = Fake {
            fail: vec![(1, 1, true), (1, 2, true)],
            ..Fake::default()
        };
        assert_eq!(
            run(&[policy(1), policy(3), policy(1)], &mut f),
            [
                "call 0#1",
                "call 1#1",
                "sleep 0.5",
                "call 1#2",
                "sleep 1",
                "call 1#3",
                "call 2#1"
            ]
        );
    }

    #[test]
    fn after_the_last_attempt_the_pair_is_dead_lettered_and_the_next_runs() {
        let mut f = Fake {
            fail: vec![(0, 1, true), (0, 2, true)],
            ..Fake::default()
        };
        assert_eq!(
            run(&[policy(2), policy(1)], &mut f),
            [
                "call 0#1",
                "sleep 0.5",
                "call 0#2",
                "dead 0 after 2",
                "call 1#1"
            ]
        );
    }

    #[test]
    fn a_failure_outside_retry_on_is_dead_lettered_at_once() {
        let mut f = Fake {
            fail: vec![(0, 1, false)],
            ..Fake::default()
        };
        assert_eq!(run(&[policy(5)], &mut f), ["call 0#1", "dead 0 after 1"]);
    }

    #[test]
    fn a_parked_key_skips_the_call_and_dead_letters_in_order() {
        let mut f = Fake {
            parked: vec![0],
            ..Fake::default()
        };
        assert_eq!(
            run(&[policy(3), policy(1)], &mut f),
            ["dead 0 after 0", "call 1#1"]
        );
    }

    #[test]
    fn the_default_policy_never_retries() {
        let mut f = Fake {
            fail: vec![(0, 1, true)],
            ..Fake::default()
        };
        assert_eq!(
            run(&[RetryPolicy::default()], &mut f),
            ["call 0#1", "dead 0 after 1"]
        );
    }

    #[test]
    fn backoff_grows_and_stops_at_max_delay() {
        let p = RetryPolicy::new(6, 1.0, 3.0, 2.0, 0.0).unwrap();
        let mut f = Fake {
            fail: (1..=6).map(|a| (0, a, true)).collect(),
            ..Fake::default()
        };
        let sleeps: Vec<String> = run(&[p], &mut f)
            .into_iter()
            .filter(|l| l.starts_with("sleep"))
            .collect();
        assert_eq!(
            sleeps,
            ["sleep 1", "sleep 2", "sleep 3", "sleep 3", "sleep 3"]
        );
    }

    #[test]
    fn a_cancelled_worker_does_not_retry() {
        let mut d = Delivery::new(1);
        assert_eq!(d.ended(false, &policy(5), true, true), Verdict::DeadLetter);
        assert_eq!(d.advance(&policy(5), 0.5), None);
        assert_eq!(d.next(), Next::Done);
    }

    #[test]
    fn a_success_after_retries_moves_on_with_attempt_one() {
        let p = policy(3);
        let mut d = Delivery::new(2);
        assert_eq!(d.ended(false, &p, true, false), Verdict::Retry);
        assert_eq!(d.advance(&p, 0.5), Some(0.5));
        assert_eq!(d.next(), Next::Call { sub: 0, attempt: 2 });
        assert_eq!(d.ended(true, &p, true, false), Verdict::Ok);
        assert_eq!(d.advance(&p, 0.5), None);
        assert_eq!(d.next(), Next::Call { sub: 1, attempt: 1 });
        assert_eq!((d.sub(), d.attempt()), (1, 1));
    }

    #[test]
    fn each_subscription_uses_its_own_policy() {
        let mut f = Fake {
            fail: vec![(0, 1, true), (1, 1, true), (1, 2, true)],
            ..Fake::default()
        };
        assert_eq!(
            run(&[policy(1), policy(3)], &mut f),
            [
                "call 0#1",
                "dead 0 after 1",
                "call 1#1",
                "sleep 0.5",
                "call 1#2",
                "sleep 1",
                "call 1#3"
            ]
        );
    }
}
