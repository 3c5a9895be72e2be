//! The structural rules of a saga and its steps: names, version, aggregate, setup,
//! ordering, isolation and timeouts; unique step names, the order of roles around the
//! pivot, which steps have a compensation, and that a check step only reads.

use std::collections::HashMap;
use std::time::Duration;

use serde_saphyr::Spanned;

use super::Pos;
use super::checker::Checker;
use super::value_refs::{Scope, StepOutputs, parse_value_ref};
use crate::saga::definition::{
    Isolation, OrderingPolicy, RetryPolicy, SagaDef, StepDef, StepRole, ValueRef, limits,
};
use crate::saga::setup::SetupLocation;
use crate::saga::sql::read_only_violation;
use crate::saga::yaml::{RawIsolation, RawOrdering, RawRole, RawSaga, RawStep};

/// How long a start waits for a missing predecessor under `ordering: strict` when
/// `ordering_max_wait_ms` is not given.
const DEFAULT_ORDERING_MAX_WAIT: Duration = Duration::from_millis(5000);

impl Checker<'_> {
    /// The whole saga; `None` when any part of it is invalid.
    pub(super) fn saga(&mut self, raw: RawSaga) -> Option<SagaDef> {
        let name = self.snake_name(&raw.name, "name", "saga");
        let version = self
            .integer_in(
                Some(&raw.version),
                "version",
                1,
                (limits::MAX_VERSION, "it is stored as a PostgreSQL integer"),
            )
            .map(|v| u32::try_from(v).expect("MAX_VERSION fits in u32"));
        let aggregate = match parse_value_ref(&raw.aggregate.value) {
            Ok(r @ ValueRef::Payload { .. }) => Some(r),
            _ => {
                self.error(
                    Pos::at(&raw.aggregate),
                    "aggregate",
                    format!(
                        "`aggregate` must be a payload reference such as `payload.order_id`, \
                         found `{}`",
                        raw.aggregate.value
                    ),
                );
                None
            }
        };
        let setup_at = raw.setup.as_ref().map_or_else(SetupLocation::default, |s| {
            let at = Pos::at(s);
            SetupLocation::of_value(self.src, at.line, at.column)
        });
        let setup_sql = raw.setup.map(|s| s.value).filter(|s| !s.trim().is_empty());
        let defaults = RetryPolicy::default();
        let saga_retry = match &raw.retry {
            Some(retry) => self.retry(&defaults, retry, "retry"),
            None => defaults,
        };
        let timeout = self.millis_in(
            raw.timeout_ms.as_ref(),
            "timeout_ms",
            1,
            (limits::MAX_SAGA_TIMEOUT_MS, "365 days"),
        );
        let ordering = self.ordering(raw.ordering.as_ref(), raw.ordering_max_wait_ms.as_ref());
        let isolation = match raw.isolation.as_ref().map(|i| i.value) {
            None | Some(RawIsolation::Interleave) => Isolation::Interleave,
            Some(RawIsolation::Exclusive) => Isolation::Exclusive,
        };
        let steps = self.steps(&raw.steps, &saga_retry);
        Some(SagaDef {
            name: name?,
            version: version?,
            version_line: u32::try_from(raw.version.referenced.line()).unwrap_or(0),
            aggregate: aggregate?,
            setup_sql,
            setup_at,
            steps: steps?,
            timeout,
            ordering,
            isolation,
            source: self.file.to_path_buf(),
        })
    }

    /// `ordering` and `ordering_max_wait_ms`; an invalid wait is reported and replaced by
    /// the default so that checking goes on.
    fn ordering(
        &mut self,
        ordering: Option<&Spanned<RawOrdering>>,
        wait: Option<&Spanned<i64>>,
    ) -> OrderingPolicy {
        match ordering.map(|o| o.value) {
            Some(RawOrdering::Strict) => OrderingPolicy::Strict {
                max_wait: self
                    .millis_in(
                        wait,
                        "ordering_max_wait_ms",
                        1,
                        (
                            limits::MAX_ORDERING_WAIT_MS,
                            "10 minutes: a held start stays unacked, and RabbitMQ's \
                             consumer_timeout is 30 minutes by default",
                        ),
                    )
                    .unwrap_or(DEFAULT_ORDERING_MAX_WAIT),
            },
            policy => {
                if let Some(wait) = wait {
                    let why = match policy {
                        Some(_) => "this saga has `ordering: latest_wins`",
                        None => "this saga has no `ordering`, so `latest_wins` applies",
                    };
                    self.error(
                        Pos::at(wait),
                        "ordering_max_wait_ms",
                        format!(
                            "`ordering_max_wait_ms` is only allowed with `ordering: strict` \
                             ({why}, which never waits)"
                        ),
                    );
                }
                OrderingPolicy::LatestWins
            }
        }
    }

    fn steps(
        &mut self,
        raw: &Spanned<Vec<Spanned<RawStep>>>,
        saga_retry: &RetryPolicy,
    ) -> Option<Vec<StepDef>> {
        let steps = &raw.value;
        if steps.is_empty() {
            self.error(Pos::at(raw), "steps", "a saga needs at least one step");
            return None;
        }

        let mut first_seen: HashMap<&str, Pos> = HashMap::new();
        let mut unique = true;
        for (i, step) in steps.iter().enumerate() {
            let name = &step.value.name;
            if let Some(first) = first_seen.get(name.value.as_str()) {
                let message = format!(
                    "duplicate step name `{}`: the step at line {} already has it",
                    name.value, first.line
                );
                self.error(Pos::at(name), format!("steps[{i}].name"), message);
                unique = false;
            } else {
                first_seen.insert(&name.value, Pos::at(name));
            }
        }

        let roles_ok = self.roles(steps);
        let outputs = StepOutputs::new(steps);
        let mut built = Vec::with_capacity(steps.len());
        for (i, step) in steps.iter().enumerate() {
            if let Some(step) = self.step(i, step, saga_retry, &outputs) {
                built.push(step);
            }
        }
        (unique && roles_ok && built.len() == steps.len()).then_some(built)
    }

    /// Checks the order of roles; returns whether it is valid.
    fn roles(&mut self, steps: &[Spanned<RawStep>]) -> bool {
        let errors_before = self.errors.len();
        let mut pivot: Option<(usize, &str, Pos)> = None;
        let mut first_retriable: Option<&str> = None;
        for (i, step) in steps.iter().enumerate() {
            let role = &step.value.role;
            let name = step.value.name.value.as_str();
            let field = format!("steps[{i}].role");
            match role.value {
                RawRole::Pivot => match pivot {
                    Some((_, first, at)) => self.error(
                        Pos::at(role),
                        field,
                        format!(
                            "two pivots: step `{first}` (line {}) is already the pivot and a \
                             saga has at most one",
                            at.line
                        ),
                    ),
                    None => pivot = Some((i, name, Pos::at(step))),
                },
                RawRole::Compensatable | RawRole::Check => {
                    let what = if role.value == RawRole::Check {
                        "check"
                    } else {
                        "compensatable"
                    };
                    if let Some((_, pivot_name, _)) = pivot {
                        self.error(
                            Pos::at(role),
                            field,
                            format!(
                                "{what} step after the pivot `{pivot_name}`: once the \
                                 pivot commits nothing is compensated, so the steps after it \
                                 must be retriable"
                            ),
                        );
                    } else if let Some(retriable) = first_retriable {
                        self.error(
                            Pos::at(role),
                            field,
                            format!(
                                "{what} step after the retriable step `{retriable}`: \
                                 compensatable and check steps must all come before \
                                 retriable ones"
                            ),
                        );
                    }
                }
                RawRole::Retriable => {
                    if first_retriable.is_none() {
                        first_retriable = Some(name);
                    }
                }
            }
        }
        if let Some((pivot_at, pivot_name, _)) = pivot {
            for (i, step) in steps[..pivot_at].iter().enumerate() {
                let role = &step.value.role;
                if role.value == RawRole::Retriable {
                    self.error(
                        Pos::at(role),
                        format!("steps[{i}].role"),
                        format!(
                            "retriable step before the pivot `{pivot_name}`: every step before \
                             the pivot must be compensatable (or a check)"
                        ),
                    );
                }
            }
        }
        self.errors.len() == errors_before
    }

    fn step(
        &mut self,
        i: usize,
        raw: &Spanned<RawStep>,
        saga_retry: &RetryPolicy,
        outputs: &StepOutputs<'_>,
    ) -> Option<StepDef> {
        let step = &raw.value;
        let prefix = format!("steps[{i}]");
        let name = self.snake_name(&step.name, &format!("{prefix}.name"), "step");
        let role = match step.role.value {
            RawRole::Compensatable => StepRole::Compensatable,
            RawRole::Pivot => StepRole::Pivot,
            RawRole::Retriable => StepRole::Retriable,
            RawRole::Check => StepRole::Check,
        };
        let action = self.action(
            &step.action,
            &format!("{prefix}.action"),
            Scope {
                step: i,
                compensation: false,
            },
            outputs,
        );
        let compensation = match (&step.compensation, role) {
            (Some(raw_comp), StepRole::Compensatable) => self
                .action(
                    raw_comp,
                    &format!("{prefix}.compensation"),
                    Scope {
                        step: i,
                        compensation: true,
                    },
                    outputs,
                )
                .map(Some),
            (None, StepRole::Compensatable) => {
                self.error(
                    Pos::at(raw),
                    prefix.clone(),
                    format!(
                        "step `{}` is compensatable but has no `compensation`",
                        step.name.value
                    ),
                );
                None
            }
            (Some(raw_comp), StepRole::Pivot) => {
                self.error(
                    Pos::at(raw_comp),
                    format!("{prefix}.compensation"),
                    "a pivot step cannot have a `compensation`: it is the point of no return \
                     and is never undone",
                );
                None
            }
            (Some(raw_comp), StepRole::Check) => {
                self.error(
                    Pos::at(raw_comp),
                    format!("{prefix}.compensation"),
                    "a check step cannot have a `compensation`: it only reads, so there is \
                     nothing to undo",
                );
                None
            }
            (Some(raw_comp), StepRole::Retriable) => {
                self.error(
                    Pos::at(raw_comp),
                    format!("{prefix}.compensation"),
                    "a retriable step cannot have a `compensation`: it runs after the point of \
                     no return and is retried until it succeeds",
                );
                None
            }
            (None, _) => Some(None),
        };
        if role == StepRole::Check
            && let Some(sql) = &step.action.value.sql
            && let Some(why) = read_only_violation(&sql.value)
        {
            self.error(
                Pos::at(sql),
                format!("{prefix}.action.sql"),
                format!(
                    "a check step must only read (a SELECT without data-modifying WITH or \
                     INTO), but {why}"
                ),
            );
        }
        if role == StepRole::Check
            && let Some(command) = &step.action.value.command
        {
            self.error(
                Pos::at(command),
                format!("{prefix}.action.command"),
                "a check step must be a read-only `sql` SELECT, not a `command`",
            );
        }
        if let (Some(timeout), Some(_)) = (&step.timeout_ms, &step.action.value.command) {
            self.error(
                Pos::at(timeout),
                format!("{prefix}.timeout_ms"),
                "a command step has no statement timeout: its reply timeout is \
                 `action.command.timeout_ms`",
            );
        }
        let retry = match &step.retry {
            Some(retry) => self.retry(saga_retry, retry, &format!("{prefix}.retry")),
            None => saga_retry.clone(),
        };
        // An invalid timeout is reported; the saga then fails as a whole.
        let timeout = self.millis_in(
            step.timeout_ms.as_ref(),
            &format!("{prefix}.timeout_ms"),
            1,
            (
                limits::MAX_STEP_TIMEOUT_MS,
                "the largest PostgreSQL statement_timeout",
            ),
        );
        Some(StepDef {
            name: name?,
            role,
            action: action?,
            compensation: compensation?,
            retry,
            timeout,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::test_support::{load, loaded, render};
    use super::*;

    /// A one-step saga with `saga_extra` lines after `aggregate` and `step_extra` lines
    /// at the end of its step (each line already indented for the step).
    fn with_fields(saga_extra: &str, step_extra: &str) -> String {
        format!(
            "name: s\nversion: 1\naggregate: payload.id\n{saga_extra}steps:\n\
             - name: a\n  role: retriable\n  action: {{ handler: h }}\n{step_extra}"
        )
    }

    #[test]
    fn timeouts_ordering_and_isolation_default() {
        let def = loaded(&with_fields("", ""));
        assert_eq!(def.timeout, None);
        assert_eq!(def.ordering, OrderingPolicy::LatestWins);
        assert_eq!(def.isolation, Isolation::Interleave);
        assert_eq!(def.steps[0].timeout, None);

        let def = loaded(&with_fields("ordering: strict\n", ""));
        assert_eq!(
            def.ordering,
            OrderingPolicy::Strict {
                max_wait: Duration::from_millis(5000)
            }
        );
        assert_eq!(DEFAULT_ORDERING_MAX_WAIT, Duration::from_millis(5000));
    }

    #[test]
    fn timeouts_ordering_and_isolation_parse() {
        // (saga lines, step lines, check)
        type Check = fn(&SagaDef) -> bool;
        let cases: &[(&str, &str, Check)] = &[
            ("timeout_ms: 1\n", "", |d| {
                d.timeout == Some(Duration::from_millis(1))
            }),
            ("timeout_ms: 60000\n", "", |d| {
                d.timeout == Some(Duration::from_secs(60))
            }),
            ("ordering: latest_wins\n", "", |d| {
                d.ordering == OrderingPolicy::LatestWins
            }),
            ("ordering: strict\nordering_max_wait_ms: 250\n", "", |d| {
                d.ordering
                    == OrderingPolicy::Strict {
                        max_wait: Duration::from_millis(250),
                    }
            }),
            // The order of the two keys does not matter.
            ("ordering_max_wait_ms: 1\nordering: strict\n", "", |d| {
                d.ordering
                    == OrderingPolicy::Strict {
                        max_wait: Duration::from_millis(1),
                    }
            }),
            ("isolation: interleave\n", "", |d| {
                d.isolation == Isolation::Interleave
            }),
            ("isolation: exclusive\n", "", |d| {
                d.isolation == Isolation::Exclusive
            }),
            ("", "  timeout_ms: 1500\n", |d| {
                d.steps[0].timeout == Some(Duration::from_millis(1500)) && d.timeout.is_none()
            }),
            ("", "  timeout_ms: 2147483647\n", |d| {
                d.steps[0].timeout == Some(Duration::from_millis(2_147_483_647))
            }),
            (
                "timeout_ms: 9000\nordering: strict\nisolation: exclusive\n",
                "  timeout_ms: 300\n",
                |d| {
                    d.timeout == Some(Duration::from_secs(9))
                        && d.ordering
                            == OrderingPolicy::Strict {
                                max_wait: DEFAULT_ORDERING_MAX_WAIT,
                            }
                        && d.isolation == Isolation::Exclusive
                        && d.steps[0].timeout == Some(Duration::from_millis(300))
                },
            ),
        ];
        for (saga, step, check) in cases {
            let def = loaded(&with_fields(saga, step));
            assert!(check(&def), "{saga:?} {step:?}: {def:?}");
        }
    }

    #[test]
    fn timeouts_ordering_and_isolation_are_checked() {
        // (saga lines, step lines, line, field, phrase): exactly this one error.
        let cases: &[(&str, &str, u32, &str, &str)] = &[
            (
                "timeout_ms: 0\n",
                "",
                4,
                "timeout_ms",
                "timeout_ms must be an integer >= 1, found 0",
            ),
            (
                "timeout_ms: -1\n",
                "",
                4,
                "timeout_ms",
                "integer >= 1, found -1",
            ),
            (
                "timeout_ms: 1.5\n",
                "",
                4,
                "timeout_ms",
                "expected an integer, found `1.5`",
            ),
            ("timeout_ms: [1]\n", "", 4, "timeout_ms", "expected"),
            (
                "timeout_ms: 99999999999999999999\n",
                "",
                4,
                "timeout_ms",
                "expected an integer",
            ),
            (
                "ordering: newest\n",
                "",
                4,
                "ordering",
                "unknown variant `newest`",
            ),
            ("ordering: 1\n", "", 4, "ordering", "unknown variant `1`"),
            (
                "ordering: Strict\n",
                "",
                4,
                "ordering",
                "unknown variant `Strict`",
            ),
            (
                "ordering_max_wait_ms: 10\n",
                "",
                4,
                "ordering_max_wait_ms",
                "no `ordering`, so `latest_wins` applies",
            ),
            (
                "ordering: latest_wins\nordering_max_wait_ms: 10\n",
                "",
                5,
                "ordering_max_wait_ms",
                "this saga has `ordering: latest_wins`",
            ),
            (
                // Not allowed at all, so its value is not checked on top.
                "ordering_max_wait_ms: 0\n",
                "",
                4,
                "ordering_max_wait_ms",
                "only allowed with `ordering: strict`",
            ),
            (
                "ordering: strict\nordering_max_wait_ms: 0\n",
                "",
                5,
                "ordering_max_wait_ms",
                "ordering_max_wait_ms must be an integer >= 1, found 0",
            ),
            (
                "ordering: strict\nordering_max_wait_ms: soon\n",
                "",
                5,
                "ordering_max_wait_ms",
                "expected an integer, found `soon`",
            ),
            (
                "isolation: serial\n",
                "",
                4,
                "isolation",
                "unknown variant `serial`",
            ),
            (
                "isolation: true\n",
                "",
                4,
                "isolation",
                "unknown variant `true`",
            ),
            (
                "",
                "  timeout_ms: 0\n",
                8,
                "steps[0].timeout_ms",
                "integer >= 1, found 0",
            ),
            (
                "",
                "  timeout_ms: -30\n",
                8,
                "steps[0].timeout_ms",
                "integer >= 1, found -30",
            ),
            (
                "",
                "  timeout_ms: 2147483648\n",
                8,
                "steps[0].timeout_ms",
                "at most 2147483647",
            ),
            (
                "",
                "  timeout_ms: true\n",
                8,
                "steps[0].timeout_ms",
                "expected an integer, found `true`",
            ),
            (
                "",
                "  timeout: 5000\n",
                8,
                "steps[0].timeout",
                "unknown field `timeout`",
            ),
        ];
        let mut failures = Vec::new();
        for &(saga, step, line, field, phrase) in cases {
            match load(&with_fields(saga, step)) {
                Ok(def) => failures.push(format!("{saga:?} {step:?}: loaded as {def:?}")),
                Err(errors) => {
                    let one = errors.len() == 1
                        && errors[0].line == line
                        && errors[0].field == field
                        && errors[0].message.contains(phrase)
                        && errors[0].column >= 1;
                    if !one {
                        failures.push(format!(
                            "{saga:?} {step:?}: wanted one error at line {line}, field \
                             {field}, containing {phrase:?}; got:\n{}",
                            render(&errors)
                        ));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }

    #[test]
    fn new_field_errors_are_collected_with_the_others() {
        let errors = load(&with_fields(
            "timeout_ms: 0\nordering_max_wait_ms: 5\n",
            "  timeout_ms: -1\n",
        ))
        .expect_err("three errors");
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            ["timeout_ms", "ordering_max_wait_ms", "steps[0].timeout_ms"],
            "{}",
            render(&errors)
        );
    }

    #[test]
    fn a_check_step_reads_only_has_no_compensation_and_stands_before_the_pivot() {
        let saga = |check: &str, after: &str| {
            format!(
                "name: s\nversion: 1\naggregate: payload.id\nsteps:\n\
                 - name: consumer_exists\n  role: check\n{check}\
                 - name: ship\n  role: pivot\n  action: {{ handler: ship }}\n{after}"
            )
        };
        let select = "  action:\n    sql: SELECT 1 FROM c WHERE id = :id\n    \
                      params: { id: payload.id }\n    expect_rows: 1\n";
        let def = loaded(&saga(select, ""));
        assert_eq!(def.steps[0].role, StepRole::Check);
        assert!(def.steps[0].compensation.is_none());
        loaded(&saga("  action: { handler: verify }\n", ""));

        let errors = load(&saga(
            &format!("{select}  compensation: {{ sql: SELECT 1 }}\n"),
            "",
        ))
        .expect_err("check with compensation");
        assert_eq!(errors.len(), 1, "{}", render(&errors));
        assert_eq!(
            (errors[0].line, errors[0].field.as_str()),
            (11, "steps[0].compensation")
        );
        assert!(
            errors[0].message.contains("nothing to undo"),
            "{}",
            errors[0]
        );

        let errors = load(&saga(
            "  action: { sql: 'WITH d AS (DELETE FROM c RETURNING 1) SELECT * FROM d' }\n",
            "",
        ))
        .expect_err("check that writes");
        assert_eq!(errors.len(), 1, "{}", render(&errors));
        assert_eq!(
            (errors[0].line, errors[0].field.as_str()),
            (7, "steps[0].action.sql")
        );
        assert!(
            errors[0]
                .message
                .contains("contains `DELETE`, which writes"),
            "{}",
            errors[0]
        );

        let errors = load(&saga(
            select,
            "- name: late\n  role: check\n  action: { sql: SELECT 1 }\n",
        ))
        .expect_err("check after the pivot");
        assert_eq!(errors.len(), 1, "{}", render(&errors));
        assert_eq!(errors[0].field, "steps[2].role");
        assert!(
            errors[0]
                .message
                .contains("check step after the pivot `ship`"),
            "{}",
            errors[0]
        );
    }
}
