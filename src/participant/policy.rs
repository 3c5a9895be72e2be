//! The participant's retry policy, and what a failed try leads to (pure).

use std::time::Duration;

use crate::saga::coordinator::FailureKind;
use crate::saga::definition::limits::MAX_RETRY_DELAY_MS;

/// How a service retries a message whose handler failed retryably.
///
/// The delay before try `n + 1` (after `n` failed tries) is
/// `min(max_delay, initial_delay × 2^(n−1))`, shortened by a random fraction of at
/// most `jitter` (so copies failing together spread out). On RabbitMQ a delay is then
/// rounded *up* to the next delay tier (100 ms, 250 ms, 500 ms, 1 s, 2 s, 5 s, 10 s,
/// 30 s, 1 min, 5 min, 15 min, 1 h).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    /// Tries in all, the first included (default 5, at least 1). Past it a retryable
    /// failure is `exhausted`: a dead letter and a failure reply.
    pub max_attempts: u32,
    /// The delay after the first failed try (default 200 ms).
    pub initial_delay: Duration,
    /// The longest delay (default 60 s, at most 1 h).
    pub max_delay: Duration,
    /// The largest fraction taken off a delay at random, 0.0 to 1.0 (default 0.2).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(60),
            jitter: 0.2,
        }
    }
}

/// What a failed try of a message leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Try again after this many milliseconds.
    Retry {
        /// The delay before the next try.
        delay_ms: u64,
    },
    /// Retryable, but the policy's tries are used up.
    Exhausted,
    /// The handler refused it: no retry can help.
    Fatal,
}

/// Why a policy cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("retry policy: {0}")]
pub struct PolicyError(String);

impl RetryPolicy {
    /// Checks the policy's limits.
    pub fn check(&self) -> Result<(), PolicyError> {
        if self.max_attempts == 0 {
            return Err(PolicyError("max_attempts must be at least 1".into()));
        }
        if self.max_delay.as_millis() > u128::from(MAX_RETRY_DELAY_MS) {
            return Err(PolicyError(format!(
                "max_delay must be at most {MAX_RETRY_DELAY_MS} ms"
            )));
        }
        if self.initial_delay > self.max_delay {
            return Err(PolicyError(
                "initial_delay must not exceed max_delay".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(PolicyError("jitter must be between 0.0 and 1.0".into()));
        }
        Ok(())
    }

    /// The delay after `failed` tries (1 for the first failure), before jitter.
    pub fn base_delay(&self, failed: u32) -> Duration {
        let doublings = failed.saturating_sub(1).min(40);
        self.initial_delay
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max_delay)
    }

    /// What try `attempt` (1 for the first) failing with `kind` leads to. `random` is
    /// a sample in `[0, 1)` choosing the jitter (a parameter, so the rule is pure).
    pub fn after_failure(&self, kind: FailureKind, attempt: u32, random: f64) -> AfterFailure {
        match kind {
            FailureKind::Fatal => AfterFailure::Fatal,
            FailureKind::Retryable if attempt >= self.max_attempts => AfterFailure::Exhausted,
            FailureKind::Retryable => {
                let base = self.base_delay(attempt).as_millis() as f64;
                let cut = self.jitter * random.clamp(0.0, 1.0);
                AfterFailure::Retry {
                    delay_ms: (base * (1.0 - cut)).round().max(1.0) as u64,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_jitter_only_shortens() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1_000),
            jitter: 0.5,
        };
        let delay = |attempt, random| match p.after_failure(FailureKind::Retryable, attempt, random)
        {
            AfterFailure::Retry { delay_ms } => delay_ms,
            other => panic!("{other:?}"),
        };
        assert_eq!(delay(1, 0.0), 100);
        assert_eq!(delay(2, 0.0), 200);
        assert_eq!(delay(4, 0.0), 800);
        assert_eq!(delay(5, 0.0), 1_000, "capped");
        assert_eq!(delay(9, 0.0), 1_000);
        assert_eq!(delay(1, 0.999_999), 50, "at most half off");
        assert_eq!(delay(2, 0.5), 150);
    }

    #[test]
    fn the_last_try_is_exhausted_and_fatal_is_never_retried() {
        let p = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        assert!(matches!(
            p.after_failure(FailureKind::Retryable, 2, 0.0),
            AfterFailure::Retry { .. }
        ));
        assert_eq!(
            p.after_failure(FailureKind::Retryable, 3, 0.0),
            AfterFailure::Exhausted
        );
        assert_eq!(
            p.after_failure(FailureKind::Retryable, 7, 0.0),
            AfterFailure::Exhausted,
            "a replayed history longer than the policy still ends"
        );
        assert_eq!(
            p.after_failure(FailureKind::Fatal, 1, 0.0),
            AfterFailure::Fatal
        );
        let once = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        assert_eq!(
            once.after_failure(FailureKind::Retryable, 1, 0.0),
            AfterFailure::Exhausted
        );
    }

    #[test]
    fn defaults_are_valid_and_bad_limits_are_refused() {
        assert_eq!(RetryPolicy::default().check(), Ok(()));
        let bad = |p: RetryPolicy| p.check().unwrap_err().to_string();
        assert!(
            bad(RetryPolicy {
                max_attempts: 0,
                ..Default::default()
            })
            .contains("max_attempts")
        );
        assert!(
            bad(RetryPolicy {
                jitter: 1.5,
                ..Default::default()
            })
            .contains("jitter")
        );
        assert!(
            bad(RetryPolicy {
                max_delay: Duration::from_secs(7_200),
                ..Default::default()
            })
            .contains("max_delay")
        );
    }
}
