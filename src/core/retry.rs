//! Retry timing: exponential backoff with jitter.
//!
//! The delay before retry n (n = 1, 2, ...) is `min(max_delay, base_delay * multiplier^(n-1))`,
//! scaled by a uniform factor in `[1 - jitter, 1 + jitter]`.

use crate::core::{CoreError, Result};

/// How often and how patiently to retry one (event, subscription) pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Seconds before the first retry.
    pub base_delay: f64,
    /// Upper bound of any delay, seconds.
    pub max_delay: f64,
    /// Growth factor per retry.
    pub multiplier: f64,
    /// Fraction of the delay to randomise, 0..=1.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 1,
            base_delay: 0.1,
            max_delay: 30.0,
            multiplier: 2.0,
            jitter: 0.1,
        }
    }
}

fn check(name: &'static str, ok: bool, rule: &'static str, value: f64) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(CoreError::InvalidSetting {
            name,
            rule,
            value: value.to_string(),
        })
    }
}

impl RetryPolicy {
    /// Validates every field; the error names the first bad one.
    pub fn new(
        max_attempts: i64,
        base_delay: f64,
        max_delay: f64,
        multiplier: f64,
        jitter: f64,
    ) -> Result<Self> {
        let attempts = u32::try_from(max_attempts)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| CoreError::InvalidSetting {
                name: "max_attempts",
                rule: ">= 1",
                value: max_attempts.to_string(),
            })?;
        check(
            "base_delay",
            base_delay.is_finite() && base_delay >= 0.0,
            ">= 0",
            base_delay,
        )?;
        check(
            "max_delay",
            max_delay.is_finite() && max_delay >= base_delay,
            ">= base_delay",
            max_delay,
        )?;
        check(
            "multiplier",
            multiplier.is_finite() && multiplier >= 1.0,
            ">= 1",
            multiplier,
        )?;
        check(
            "jitter",
            (0.0..=1.0).contains(&jitter),
            "between 0 and 1",
            jitter,
        )?;
        Ok(Self {
            max_attempts: attempts,
            base_delay,
            max_delay,
            multiplier,
            jitter,
        })
    }

    /// Whether a failed call (attempt `attempt`, 1-based) is retried: the failure is worth a
    /// retry (`retryable`: its exception is in `retry_on`), attempts are left, and the worker
    /// is not being cancelled (shutdown interrupts, it does not retry).
    pub fn should_retry(&self, attempt: u32, retryable: bool, cancelled: bool) -> bool {
        retryable && !cancelled && attempt < self.max_attempts
    }

    /// Seconds to wait before retry `n` (1-based), given a uniform sample `u` in [0, 1).
    pub fn delay(&self, n: u32, u: f64) -> f64 {
        let exp = i32::try_from(n.saturating_sub(1)).unwrap_or(i32::MAX);
        let raw = (self.base_delay * self.multiplier.powi(exp)).min(self.max_delay);
        raw * (1.0 - self.jitter + 2.0 * self.jitter * u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let p = RetryPolicy::new(5, 0.1, 0.5, 2.0, 0.0).unwrap();
        let d: Vec<f64> = (1..=4).map(|n| p.delay(n, 0.5)).collect();
        assert_eq!(d, [0.1, 0.2, 0.4, 0.5]);
    }

    #[test]
    fn jitter_scales_within_its_fraction() {
        let p = RetryPolicy::new(3, 1.0, 10.0, 2.0, 0.1).unwrap();
        assert!((p.delay(1, 0.0) - 0.9).abs() < 1e-9);
        assert!((p.delay(1, 1.0) - 1.1).abs() < 1e-9);
    }

    #[test]
    fn the_default_policy_does_not_retry() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_attempts, 1);
        assert!(!p.should_retry(1, true, false));
    }

    #[test]
    fn retries_until_max_attempts() {
        let p = RetryPolicy::new(3, 0.1, 1.0, 2.0, 0.0).unwrap();
        assert!(p.should_retry(1, true, false));
        assert!(p.should_retry(2, true, false));
        assert!(
            !p.should_retry(3, true, false),
            "the third attempt was the last"
        );
    }

    #[test]
    fn a_failure_outside_retry_on_is_not_retried() {
        let p = RetryPolicy::new(5, 0.1, 1.0, 2.0, 0.0).unwrap();
        assert!(!p.should_retry(1, false, false));
    }

    #[test]
    fn a_cancelled_worker_does_not_retry() {
        let p = RetryPolicy::new(5, 0.1, 1.0, 2.0, 0.0).unwrap();
        assert!(!p.should_retry(1, true, true));
    }

    #[test]
    fn the_first_retry_waits_base_delay() {
        let p = RetryPolicy::new(4, 0.25, 30.0, 3.0, 0.0).unwrap();
        assert!((p.delay(1, 0.7) - 0.25).abs() < 1e-12);
        assert!((p.delay(2, 0.7) - 0.75).abs() < 1e-12);
        assert!((p.delay(3, 0.7) - 2.25).abs() < 1e-12);
    }

    #[test]
    fn a_huge_attempt_number_stays_at_the_cap() {
        let p = RetryPolicy::new(1000, 0.1, 5.0, 2.0, 0.0).unwrap();
        assert!((p.delay(u32::MAX, 0.5) - 5.0).abs() < 1e-12);
    }

    #[test]
    fn jitter_never_makes_a_delay_negative() {
        let p = RetryPolicy::new(3, 1.0, 10.0, 2.0, 1.0).unwrap();
        assert!(p.delay(1, 0.0) >= 0.0);
        assert!((p.delay(1, 1.0) - 2.0).abs() < 1e-9);
    }

    #[test]
    fn bad_settings_name_the_field_and_value() {
        let e = RetryPolicy::new(0, 0.1, 1.0, 2.0, 0.1).unwrap_err();
        assert_eq!(e.to_string(), "max_attempts must be >= 1, got 0");
        let e = RetryPolicy::new(2, 0.1, 1.0, 2.0, 1.5).unwrap_err();
        assert_eq!(e.to_string(), "jitter must be between 0 and 1, got 1.5");
    }
}
