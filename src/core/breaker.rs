//! A subscription's circuit breaker: after `failures` failed calls in a row, the next call
//! waits until `cool_down` seconds have passed, then runs once (half-open): a success closes
//! the breaker, a failure opens it again. Events wait; nothing is dropped or dead-lettered
//! because of the breaker. Times are on the bus clock (seconds, any origin), so a manual clock
//! drives it in tests.

use parking_lot::Mutex;

use crate::core::errors::{CoreError, Result};

/// A circuit breaker's settings and state.
#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    cool_down: f64,
    state: Mutex<State>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct State {
    /// Failures in a row so far.
    consecutive: u32,
    /// Bus-clock time until which calls wait (`None` = closed).
    open_until: Option<f64>,
}

impl Breaker {
    /// A closed breaker; `failures >= 1`, `cool_down >= 0` seconds.
    pub fn new(failures: u32, cool_down: f64) -> Result<Self> {
        if failures < 1 || !(cool_down.is_finite() && cool_down >= 0.0) {
            return Err(CoreError::InvalidSetting {
                name: "circuit_breaker",
                rule: "(failures >= 1, cool_down >= 0)",
                value: format!("({failures}, {cool_down})"),
            });
        }
        Ok(Self {
            failures,
            cool_down,
            state: Mutex::new(State::default()),
        })
    }

    /// Whether no call would wait (no clock read needed to know).
    pub fn is_closed(&self) -> bool {
        self.state.lock().open_until.is_none()
    }

    /// Seconds the next call must wait at `now`, if the breaker is open.
    pub fn wait(&self, now: f64) -> Option<f64> {
        let until = self.state.lock().open_until?;
        (now < until).then_some(until - now)
    }

    /// Counts a call that ended at `now`: a success closes the breaker, the `failures`-th
    /// failure in a row (or a failure while half-open) opens it for `cool_down`.
    pub fn record(&self, ok: bool, now: f64) {
        let mut s = self.state.lock();
        if ok {
            *s = State::default();
        } else {
            s.consecutive += 1;
            if s.consecutive >= self.failures {
                s.open_until = Some(now + self.cool_down);
            }
        }
    }

    /// Whether the breaker is open at `now`.
    pub fn is_open(&self, now: f64) -> bool {
        self.wait(now).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_breaker_is_closed() {
        let b = Breaker::new(3, 10.0).unwrap();
        assert!(b.is_closed());
        assert_eq!(b.wait(0.0), None);
        assert!(!b.is_open(0.0));
    }

    #[test]
    fn it_opens_after_failures_in_a_row() {
        let b = Breaker::new(3, 10.0).unwrap();
        b.record(false, 1.0);
        b.record(false, 2.0);
        assert!(!b.is_open(2.0));
        b.record(false, 3.0);
        assert!(!b.is_closed());
        assert_eq!(b.wait(3.0), Some(10.0));
        assert_eq!(b.wait(8.0), Some(5.0));
    }

    #[test]
    fn a_success_resets_the_count() {
        let b = Breaker::new(2, 10.0).unwrap();
        b.record(false, 1.0);
        b.record(true, 2.0);
        b.record(false, 3.0);
        assert!(!b.is_open(3.0));
    }

    #[test]
    fn after_the_cool_down_one_call_runs_half_open() {
        let b = Breaker::new(1, 5.0).unwrap();
        b.record(false, 0.0);
        assert!(b.is_open(4.9));
        assert_eq!(b.wait(5.0), None, "half-open: the next call runs");
    }

    #[test]
    fn a_half_open_failure_opens_it_again() {
        let b = Breaker::new(2, 5.0).unwrap();
        b.record(false, 0.0);
        b.record(false, 0.0);
        b.record(false, 5.0); // the half-open call failed
        assert_eq!(b.wait(5.0), Some(5.0));
    }

    #[test]
    fn a_half_open_success_closes_it() {
        let b = Breaker::new(1, 5.0).unwrap();
        b.record(false, 0.0);
        b.record(true, 5.0);
        assert!(!b.is_open(5.0));
        b.record(false, 6.0);
        assert!(b.is_open(6.0), "one failure opens it again, as configured");
    }

    #[test]
    fn a_zero_cool_down_never_makes_a_call_wait() {
        let b = Breaker::new(1, 0.0).unwrap();
        b.record(false, 1.0);
        assert_eq!(b.wait(1.0), None);
    }

    #[test]
    fn bad_settings_are_refused_naming_them() {
        let e = Breaker::new(0, 1.0).unwrap_err();
        assert_eq!(
            e.to_string(),
            "circuit_breaker must be (failures >= 1, cool_down >= 0), got (0, 1)"
        );
        assert!(Breaker::new(1, -1.0).is_err());
        assert!(Breaker::new(1, f64::NAN).is_err());
        assert!(Breaker::new(1, f64::INFINITY).is_err());
    }
}
