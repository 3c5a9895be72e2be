//! Retry policies: a `retry:` block's limits, and how the saga's and a step's blocks
//! override [`RetryPolicy::default`] field by field.

use std::time::Duration;

use serde_saphyr::Spanned;

use super::Pos;
use super::checker::Checker;
use crate::saga::definition::{Backoff, RetryPolicy, limits};
use crate::saga::yaml::{RawBackoff, RawRetry};

/// The fields of a `retry:` block that were given (and valid).
#[derive(Debug, Default, Clone, PartialEq)]
struct RetryOverride {
    max_attempts: Option<u32>,
    backoff: Option<Backoff>,
    initial_delay: Option<Duration>,
    max_delay: Option<Duration>,
    jitter: Option<bool>,
}

impl RetryOverride {
    /// `base` with the given fields replaced.
    fn apply(&self, base: &RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.unwrap_or(base.max_attempts),
            backoff: self.backoff.unwrap_or(base.backoff),
            initial_delay: self.initial_delay.unwrap_or(base.initial_delay),
            max_delay: self.max_delay.unwrap_or(base.max_delay),
            jitter: self.jitter.unwrap_or(base.jitter),
        }
    }
}

impl Checker<'_> {
    /// Validates a `retry:` block and applies it to `base`. Invalid fields are reported
    /// and left at `base`'s value.
    pub(super) fn retry(
        &mut self,
        base: &RetryPolicy,
        raw: &Spanned<RawRetry>,
        field: &str,
    ) -> RetryPolicy {
        let r = &raw.value;
        // A longer delay would be cut to the longest delay tier: the retry would come
        // earlier than the policy says.
        let delay_cap = (
            limits::MAX_RETRY_DELAY_MS,
            "1 hour, the longest delay skald holds a retry for",
        );
        let given = RetryOverride {
            max_attempts: self
                .integer_in(
                    r.max_attempts.as_ref(),
                    &format!("{field}.max_attempts"),
                    1,
                    (
                        limits::MAX_ATTEMPTS,
                        "attempts are counted in a PostgreSQL integer",
                    ),
                )
                .map(|v| u32::try_from(v).expect("MAX_ATTEMPTS fits in u32")),
            backoff: r.backoff.as_ref().map(|b| match b.value {
                RawBackoff::Fixed => Backoff::Fixed,
                RawBackoff::Exponential => Backoff::Exponential,
            }),
            initial_delay: self.millis_in(
                r.initial_delay_ms.as_ref(),
                &format!("{field}.initial_delay_ms"),
                0,
                delay_cap,
            ),
            max_delay: self.millis_in(
                r.max_delay_ms.as_ref(),
                &format!("{field}.max_delay_ms"),
                0,
                delay_cap,
            ),
            jitter: r.jitter.as_ref().map(|j| j.value),
        };

        let merged = given.apply(base);
        // Only blame this block if it set one of the two delays; an inherited inversion has
        // already been reported where it was written.
        let blamed = r
            .max_delay_ms
            .as_ref()
            .map(|m| (m, "max_delay_ms"))
            .or(r.initial_delay_ms.as_ref().map(|m| (m, "initial_delay_ms")));
        if merged.max_delay < merged.initial_delay
            && let Some((at, name)) = blamed
        {
            self.error(
                Pos::at(at),
                format!("{field}.{name}"),
                format!(
                    "max_delay_ms ({}) must be >= initial_delay_ms ({})",
                    merged.max_delay.as_millis(),
                    merged.initial_delay.as_millis()
                ),
            );
        }
        merged
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::{load, loaded, render};
    use super::*;

    #[test]
    fn retry_override_replaces_only_given_fields() {
        let base = RetryPolicy::default();
        let over = RetryOverride {
            max_attempts: Some(9),
            jitter: Some(false),
            ..RetryOverride::default()
        };
        let merged = over.apply(&base);
        assert_eq!(merged.max_attempts, 9);
        assert!(!merged.jitter);
        assert_eq!(merged.backoff, base.backoff);
        assert_eq!(merged.initial_delay, base.initial_delay);
        assert_eq!(merged.max_delay, base.max_delay);
        assert_eq!(RetryOverride::default().apply(&base), base);
    }

    #[test]
    fn retry_merges_defaults_saga_and_step() {
        let def = loaded(
            "name: s\nversion: 1\naggregate: payload.id\n\
             retry: { max_attempts: 5, backoff: fixed, initial_delay_ms: 100 }\n\
             steps:\n\
             - name: a\n  role: retriable\n  action: { handler: h }\n\
             - name: b\n  role: retriable\n  action: { handler: h }\n\
             \x20 retry: { max_attempts: 10, max_delay_ms: 1000, jitter: false }\n",
        );
        let a = &def.steps[0].retry;
        assert_eq!(
            *a,
            RetryPolicy {
                max_attempts: 5,
                backoff: Backoff::Fixed,
                initial_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(30),
                jitter: true,
            }
        );
        let b = &def.steps[1].retry;
        assert_eq!(
            *b,
            RetryPolicy {
                max_attempts: 10,
                backoff: Backoff::Fixed,
                initial_delay: Duration::from_millis(100),
                max_delay: Duration::from_millis(1000),
                jitter: false,
            }
        );
    }

    #[test]
    fn retry_without_any_block_is_the_default() {
        let def = loaded(
            "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
             - name: a\n  role: retriable\n  action: { handler: h }\n",
        );
        assert_eq!(def.steps[0].retry, RetryPolicy::default());
        assert_eq!(def.setup_sql, None);
    }

    #[test]
    fn retry_values_are_checked() {
        let errors = load(
            "name: s\nversion: 1\naggregate: payload.id\n\
             retry: { max_attempts: 0, initial_delay_ms: -1 }\nsteps:\n\
             - name: a\n  role: retriable\n  action: { handler: h }\n\
             \x20 retry: { initial_delay_ms: 5000, max_delay_ms: 10 }\n",
        )
        .expect_err("invalid retry");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "retry.max_attempts",
                "retry.initial_delay_ms",
                "steps[0].retry.max_delay_ms"
            ],
            "{}",
            render(&errors)
        );
        assert!(errors[2].message.contains("must be >= initial_delay_ms"));
    }
}
