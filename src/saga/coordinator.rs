//! The saga coordinator: pure decisions over an instance's state.
//!
//! Two questions are answered here, and nowhere else:
//! 1. [`admit`]: a message asks to run a step (or a compensation) — should it run, or is
//!    it out of date for this instance?
//! 2. [`transition`]: the step ran and succeeded or failed — what is the instance's new
//!    state, and which message must be sent next (with what delay)?
//!
//! Neither touches a database or a broker, so every rule is unit-tested below.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::definition::{Backoff, RetryPolicy, SagaDef, StepRole};

/// Where a saga instance is in its life. Three states are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Started, but queued behind another instance of its saga on the same aggregate
    /// (`isolation: exclusive`); it runs when that one is terminal.
    Waiting,
    /// Running its steps forward.
    Running,
    /// A step failed for good; completed steps are being undone in reverse.
    Compensating,
    /// Every step committed. Terminal.
    Completed,
    /// Every completed step was compensated. Terminal.
    Compensated,
    /// Parked for a person: a compensation or post-pivot step failed for good. Terminal.
    Failed,
}

impl InstanceStatus {
    /// Every status, in the order a report lists them.
    pub const ALL: [InstanceStatus; 6] = [
        InstanceStatus::Waiting,
        InstanceStatus::Running,
        InstanceStatus::Compensating,
        InstanceStatus::Completed,
        InstanceStatus::Compensated,
        InstanceStatus::Failed,
    ];

    /// The spelling stored in PostgreSQL and printed by the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Waiting => "waiting",
            InstanceStatus::Running => "running",
            InstanceStatus::Compensating => "compensating",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Compensated => "compensated",
            InstanceStatus::Failed => "failed",
        }
    }

    /// Parses the stored spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// No message changes a terminal instance any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            InstanceStatus::Completed | InstanceStatus::Compensated | InstanceStatus::Failed
        )
    }
}

/// Which way a step runs: its action, or its compensation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The step's action.
    Forward,
    /// The step's compensation.
    Compensate,
}

impl Phase {
    /// The spelling stored in PostgreSQL.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Forward => "forward",
            Phase::Compensate => "compensate",
        }
    }

    /// Parses the stored spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "forward" => Some(Phase::Forward),
            "compensate" => Some(Phase::Compensate),
            _ => None,
        }
    }
}

/// What an instance expects to run next: step `step` in `phase`, try number `attempt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cursor {
    /// Index into the saga's steps.
    pub step: u32,
    /// Action or compensation.
    pub phase: Phase,
    /// 1 for the first try.
    pub attempt: u32,
}

impl Cursor {
    /// The first thing every instance runs: step 0, forward, first try.
    pub const START: Cursor = Cursor {
        step: 0,
        phase: Phase::Forward,
        attempt: 1,
    };
}

/// The part of an instance's stored state the coordinator decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceState {
    /// Where it is in its life.
    pub status: InstanceStatus,
    /// What it runs next (meaningless once terminal).
    pub cursor: Cursor,
}

/// Why a message that asks to run something is disposed of without running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The instance already finished.
    Terminal,
    /// The instance has moved past (or not yet reached) what the message asks for.
    NotCurrent,
}

/// The answer to "should this message run?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Run the cursor's step in its phase.
    Run(Cursor),
    /// Record the message as seen and do nothing else.
    Skip(SkipReason),
}

/// Decides whether a message asking for `requested` runs on an instance in `state`.
///
/// Only the instance's current cursor runs; anything else is an older or foreign
/// message (a late retry, a duplicate the inbox did not catch because it carried a
/// different id) and must not apply an effect twice.
pub fn admit(state: InstanceState, requested: Cursor) -> Admission {
    if state.status.is_terminal() {
        Admission::Skip(SkipReason::Terminal)
    } else if state.status == InstanceStatus::Waiting || state.cursor != requested {
        Admission::Skip(SkipReason::NotCurrent)
    } else {
        Admission::Run(requested)
    }
}

/// Whether a failed attempt may succeed if tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Transient (lost connection, serialization failure, deadlock, timeout): retry.
    Retryable,
    /// Will fail again (business rule, expected rows not met, declared fatal): no retry.
    Fatal,
}

/// How one attempt of a step (or compensation) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Its transaction committed.
    Succeeded,
    /// It failed; its transaction was rolled back.
    Failed(FailureKind),
}

/// The next message an instance needs, and how long to hold it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextRun {
    /// What the message asks to run.
    pub cursor: Cursor,
    /// Zero for the next step; the backoff delay for a retry.
    pub delay: Duration,
}

/// The coordinator's verdict after an attempt: the new state and what to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The instance's state once this attempt's transaction commits.
    pub state: InstanceState,
    /// The message to publish after commit; `None` once the instance is terminal.
    pub next: Option<NextRun>,
}

/// Decides what follows an attempt of `ran` that ended with `outcome`.
///
/// `jitter` is a number in `[0, 1)` supplied by the caller (random in production,
/// fixed in tests) so that this function stays deterministic.
///
/// Rules:
/// - forward success → the next step, or `Completed` after the last;
/// - forward failure, retryable, attempts left (unbounded for retriable steps) → the
///   same step again after the policy's delay;
/// - forward failure otherwise → compensate the steps before it, last first (the
///   failed step's own transaction rolled back, so it has nothing to undo; `check`
///   steps changed nothing and are passed over); with nothing to undo → `Compensated`; after the pivot nothing can be undone, so a
///   fatal failure there parks the instance as `Failed`;
/// - compensation success → the previous step's compensation, or `Compensated`;
/// - compensation failure, retryable, attempts left → again after the delay;
///   otherwise → `Failed` (parked, never half-undone without a record).
pub fn transition(saga: &SagaDef, ran: Cursor, outcome: Outcome, jitter: f64) -> Transition {
    let step = &saga.steps[ran.step as usize];
    let retry = |kind: FailureKind| -> Option<Transition> {
        let unbounded = ran.phase == Phase::Forward && step.role == StepRole::Retriable;
        let attempts_left = unbounded || ran.attempt < step.retry.max_attempts;
        (kind == FailureKind::Retryable && attempts_left).then(|| {
            let cursor = Cursor {
                attempt: ran.attempt + 1,
                ..ran
            };
            let status = match ran.phase {
                Phase::Forward => InstanceStatus::Running,
                Phase::Compensate => InstanceStatus::Compensating,
            };
            Transition {
                state: InstanceState { status, cursor },
                next: Some(NextRun {
                    cursor,
                    delay: retry_delay(&step.retry, ran.attempt, jitter),
                }),
            }
        })
    };

    match (ran.phase, outcome) {
        (Phase::Forward, Outcome::Succeeded) => {
            let next = ran.step + 1;
            if (next as usize) < saga.steps.len() {
                run_next(
                    InstanceStatus::Running,
                    Cursor {
                        step: next,
                        phase: Phase::Forward,
                        attempt: 1,
                    },
                )
            } else {
                terminal(InstanceStatus::Completed, ran)
            }
        }
        (Phase::Forward, Outcome::Failed(kind)) => retry(kind).unwrap_or_else(|| {
            if step.role == StepRole::Retriable {
                terminal(InstanceStatus::Failed, ran)
            } else {
                compensate_below(saga, ran.step, ran)
            }
        }),
        (Phase::Compensate, Outcome::Succeeded) => compensate_below(saga, ran.step, ran),
        (Phase::Compensate, Outcome::Failed(kind)) => {
            retry(kind).unwrap_or_else(|| terminal(InstanceStatus::Failed, ran))
        }
    }
}

/// Why an instance cannot be cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelRefusal {
    /// It is already terminal.
    Terminal(InstanceStatus),
    /// It is already compensating (a repeated cancel: nothing more to do).
    AlreadyCompensating,
    /// It went past the pivot: its remaining steps can only go forward.
    PastPivot,
}

/// An operator's cancel: stop going forward and compensate the completed steps, as
/// if the current step had failed for good — unless the instance is past the point
/// of no return.
pub fn cancel(saga: &SagaDef, state: InstanceState) -> Result<Transition, CancelRefusal> {
    match state.status {
        s if s.is_terminal() => return Err(CancelRefusal::Terminal(s)),
        InstanceStatus::Compensating => return Err(CancelRefusal::AlreadyCompensating),
        _ => {}
    }
    let pivot_done = saga.steps[..state.cursor.step as usize]
        .iter()
        .any(|s| s.role == StepRole::Pivot);
    if pivot_done || saga.steps[state.cursor.step as usize].role == StepRole::Retriable {
        return Err(CancelRefusal::PastPivot);
    }
    Ok(compensate_below(saga, state.cursor.step, state.cursor))
}

/// Compensation of the nearest step below `step` that has one, or `Compensated` when
/// there is none. Validation guarantees every step before a pivot or compensatable step
/// is compensatable or a check; checks changed nothing, so they are passed over (no
/// message, no transaction).
fn compensate_below(saga: &SagaDef, step: u32, ran: Cursor) -> Transition {
    let below = saga.steps[..step as usize]
        .iter()
        .rposition(|s| s.compensation.is_some());
    match below {
        Some(below) => run_next(
            InstanceStatus::Compensating,
            Cursor {
                step: u32::try_from(below).expect("step indexes fit in u32"),
                phase: Phase::Compensate,
                attempt: 1,
            },
        ),
        None => terminal(InstanceStatus::Compensated, ran),
    }
}

fn run_next(status: InstanceStatus, cursor: Cursor) -> Transition {
    Transition {
        state: InstanceState { status, cursor },
        next: Some(NextRun {
            cursor,
            delay: Duration::ZERO,
        }),
    }
}

fn terminal(status: InstanceStatus, last: Cursor) -> Transition {
    Transition {
        state: InstanceState {
            status,
            cursor: last,
        },
        next: None,
    }
}

/// The delay before retry number `failed_attempt` (1 after the first failure).
///
/// Exponential backoff doubles from `initial_delay`; both shapes are capped at
/// `max_delay`. With jitter the delay is spread over `[d/2, d]` (`jitter` in `[0, 1)`),
/// so the policy's `initial_delay / 2` is the lowest delay ever used.
pub fn retry_delay(policy: &RetryPolicy, failed_attempt: u32, jitter: f64) -> Duration {
    let base = match policy.backoff {
        Backoff::Fixed => policy.initial_delay,
        Backoff::Exponential => {
            let doublings = failed_attempt.saturating_sub(1).min(32);
            policy
                .initial_delay
                .saturating_mul(1u32 << doublings.min(31))
        }
    }
    .min(policy.max_delay);
    if policy.jitter {
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::definition::{
        Action, HandlerAction, Isolation, OrderingPolicy, StepDef, ValueRef,
    };
    use std::path::PathBuf;

    fn step(name: &str, role: StepRole, max_attempts: u32) -> StepDef {
        let action = Action::Handler(HandlerAction {
            name: "noop".into(),
            params: vec![],
            fatal_errors: vec![],
        });
        StepDef {
            name: name.into(),
            role,
            compensation: (role == StepRole::Compensatable).then(|| action.clone()),
            action,
            retry: RetryPolicy {
                max_attempts,
                backoff: Backoff::Fixed,
                initial_delay: Duration::from_millis(100),
                max_delay: Duration::from_secs(1),
                jitter: false,
            },
            timeout: None,
        }
    }

    /// reserve (compensatable), charge (compensatable), ship (pivot), notify (retriable).
    fn saga() -> SagaDef {
        saga_of(vec![
            step("reserve", StepRole::Compensatable, 3),
            step("charge", StepRole::Compensatable, 3),
            step("ship", StepRole::Pivot, 2),
            step("notify", StepRole::Retriable, 1),
        ])
    }

    fn saga_of(steps: Vec<StepDef>) -> SagaDef {
        SagaDef {
            name: "checkout".into(),
            version: 1,
            version_line: 0,
            aggregate: ValueRef::AggregateId,
            setup_sql: None,
            setup_at: Default::default(),
            steps,
            timeout: None,
            ordering: OrderingPolicy::LatestWins,
            isolation: Isolation::Interleave,
            source: PathBuf::from("checkout.yaml"),
        }
    }

    fn cur(step: u32, phase: Phase, attempt: u32) -> Cursor {
        Cursor {
            step,
            phase,
            attempt,
        }
    }

    fn next_of(t: &Transition) -> Option<Cursor> {
        t.next.map(|n| n.cursor)
    }

    #[test]
    fn only_the_current_cursor_is_admitted() {
        let state = InstanceState {
            status: InstanceStatus::Running,
            cursor: cur(1, Phase::Forward, 2),
        };
        assert_eq!(
            admit(state, cur(1, Phase::Forward, 2)),
            Admission::Run(cur(1, Phase::Forward, 2))
        );
        for stale in [
            cur(1, Phase::Forward, 1),
            cur(0, Phase::Forward, 1),
            cur(2, Phase::Forward, 1),
            cur(1, Phase::Compensate, 2),
        ] {
            assert_eq!(admit(state, stale), Admission::Skip(SkipReason::NotCurrent));
        }
    }

    #[test]
    fn a_waiting_instance_admits_nothing_until_promoted() {
        let state = InstanceState {
            status: InstanceStatus::Waiting,
            cursor: Cursor::START,
        };
        assert_eq!(
            admit(state, Cursor::START),
            Admission::Skip(SkipReason::NotCurrent)
        );
        assert!(!InstanceStatus::Waiting.is_terminal());
    }

    #[test]
    fn cancel_compensates_completed_steps_and_refuses_past_the_pivot() {
        let s = saga();
        let running_at = |step| InstanceState {
            status: InstanceStatus::Running,
            cursor: cur(step, Phase::Forward, 2),
        };
        let t = cancel(&s, running_at(2)).unwrap();
        assert_eq!(t.state.status, InstanceStatus::Compensating);
        assert_eq!(next_of(&t), Some(cur(1, Phase::Compensate, 1)));
        let t = cancel(&s, running_at(0)).unwrap();
        assert_eq!(t.state.status, InstanceStatus::Compensated);
        assert_eq!(cancel(&s, running_at(3)), Err(CancelRefusal::PastPivot));
        let compensating = InstanceState {
            status: InstanceStatus::Compensating,
            cursor: cur(0, Phase::Compensate, 1),
        };
        assert_eq!(
            cancel(&s, compensating),
            Err(CancelRefusal::AlreadyCompensating)
        );
        let done = InstanceState {
            status: InstanceStatus::Completed,
            cursor: cur(3, Phase::Forward, 1),
        };
        assert_eq!(
            cancel(&s, done),
            Err(CancelRefusal::Terminal(InstanceStatus::Completed))
        );
    }

    #[test]
    fn terminal_instances_admit_nothing() {
        for status in [
            InstanceStatus::Completed,
            InstanceStatus::Compensated,
            InstanceStatus::Failed,
        ] {
            let state = InstanceState {
                status,
                cursor: Cursor::START,
            };
            assert_eq!(
                admit(state, Cursor::START),
                Admission::Skip(SkipReason::Terminal)
            );
        }
    }

    #[test]
    fn success_moves_forward_then_completes() {
        let s = saga();
        let t = transition(&s, Cursor::START, Outcome::Succeeded, 0.0);
        assert_eq!(t.state.status, InstanceStatus::Running);
        assert_eq!(next_of(&t), Some(cur(1, Phase::Forward, 1)));
        assert_eq!(t.next.unwrap().delay, Duration::ZERO);

        let last = transition(&s, cur(3, Phase::Forward, 1), Outcome::Succeeded, 0.0);
        assert_eq!(last.state.status, InstanceStatus::Completed);
        assert_eq!(last.next, None);
    }

    #[test]
    fn retryable_failure_retries_until_attempts_run_out_then_compensates() {
        let s = saga();
        let retryable = Outcome::Failed(FailureKind::Retryable);
        let t = transition(&s, cur(1, Phase::Forward, 1), retryable, 0.0);
        assert_eq!(next_of(&t), Some(cur(1, Phase::Forward, 2)));
        assert_eq!(t.next.unwrap().delay, Duration::from_millis(100));
        assert_eq!(t.state.status, InstanceStatus::Running);

        let exhausted = transition(&s, cur(1, Phase::Forward, 3), retryable, 0.0);
        assert_eq!(exhausted.state.status, InstanceStatus::Compensating);
        assert_eq!(next_of(&exhausted), Some(cur(0, Phase::Compensate, 1)));
    }

    #[test]
    fn fatal_failure_compensates_at_once_in_reverse() {
        let s = saga();
        let t = transition(
            &s,
            cur(2, Phase::Forward, 1),
            Outcome::Failed(FailureKind::Fatal),
            0.0,
        );
        assert_eq!(t.state.status, InstanceStatus::Compensating);
        assert_eq!(next_of(&t), Some(cur(1, Phase::Compensate, 1)));

        let t = transition(&s, cur(1, Phase::Compensate, 1), Outcome::Succeeded, 0.0);
        assert_eq!(next_of(&t), Some(cur(0, Phase::Compensate, 1)));
        let t = transition(&s, cur(0, Phase::Compensate, 1), Outcome::Succeeded, 0.0);
        assert_eq!(t.state.status, InstanceStatus::Compensated);
        assert_eq!(t.next, None);
    }

    /// check_customer (check), reserve (compensatable), check_stock (check), ship (pivot).
    fn saga_with_checks() -> SagaDef {
        saga_of(vec![
            step("check_customer", StepRole::Check, 3),
            step("reserve", StepRole::Compensatable, 3),
            step("check_stock", StepRole::Check, 3),
            step("ship", StepRole::Pivot, 2),
        ])
    }

    #[test]
    fn compensation_passes_over_check_steps() {
        let s = saga_with_checks();
        let fatal = Outcome::Failed(FailureKind::Fatal);
        // ship fails: check_stock is passed over, reserve is compensated.
        let t = transition(&s, cur(3, Phase::Forward, 1), fatal, 0.0);
        assert_eq!(t.state.status, InstanceStatus::Compensating);
        assert_eq!(next_of(&t), Some(cur(1, Phase::Compensate, 1)));
        // reserve compensated: only a check is left below, so nothing more runs.
        let t = transition(&s, cur(1, Phase::Compensate, 1), Outcome::Succeeded, 0.0);
        assert_eq!(t.state.status, InstanceStatus::Compensated);
        assert_eq!(t.next, None);
        // check_stock fails: the same, reserve is the one to undo.
        let t = transition(&s, cur(2, Phase::Forward, 1), fatal, 0.0);
        assert_eq!(next_of(&t), Some(cur(1, Phase::Compensate, 1)));
    }

    #[test]
    fn a_saga_whose_only_completed_steps_are_checks_is_compensated_at_once() {
        let s = saga_with_checks();
        let exhausted = transition(
            &s,
            cur(1, Phase::Forward, 3),
            Outcome::Failed(FailureKind::Retryable),
            0.0,
        );
        assert_eq!(exhausted.state.status, InstanceStatus::Compensated);
        assert_eq!(exhausted.next, None);
        // A check is retried by its policy like any step before the pivot.
        let t = transition(
            &s,
            cur(0, Phase::Forward, 1),
            Outcome::Failed(FailureKind::Retryable),
            0.0,
        );
        assert_eq!(next_of(&t), Some(cur(0, Phase::Forward, 2)));
        // Cancelled at ship: reserve is undone, the checks are passed over.
        let running = InstanceState {
            status: InstanceStatus::Running,
            cursor: cur(3, Phase::Forward, 1),
        };
        let t = cancel(&s, running).unwrap();
        assert_eq!(next_of(&t), Some(cur(1, Phase::Compensate, 1)));
    }

    #[test]
    fn failure_of_the_first_step_has_nothing_to_undo() {
        let t = transition(
            &saga(),
            Cursor::START,
            Outcome::Failed(FailureKind::Fatal),
            0.0,
        );
        assert_eq!(t.state.status, InstanceStatus::Compensated);
        assert_eq!(t.next, None);
    }

    #[test]
    fn retriable_steps_retry_without_cap_and_park_on_fatal() {
        let s = saga();
        let t = transition(
            &s,
            cur(3, Phase::Forward, 1000),
            Outcome::Failed(FailureKind::Retryable),
            0.0,
        );
        assert_eq!(next_of(&t), Some(cur(3, Phase::Forward, 1001)));
        let t = transition(
            &s,
            cur(3, Phase::Forward, 1),
            Outcome::Failed(FailureKind::Fatal),
            0.0,
        );
        assert_eq!(t.state.status, InstanceStatus::Failed);
        assert_eq!(t.next, None);
    }

    #[test]
    fn compensation_retries_then_parks_as_failed() {
        let s = saga();
        let retryable = Outcome::Failed(FailureKind::Retryable);
        let t = transition(&s, cur(0, Phase::Compensate, 1), retryable, 0.0);
        assert_eq!(t.state.status, InstanceStatus::Compensating);
        assert_eq!(next_of(&t), Some(cur(0, Phase::Compensate, 2)));
        let t = transition(&s, cur(0, Phase::Compensate, 3), retryable, 0.0);
        assert_eq!(t.state.status, InstanceStatus::Failed);
        let t = transition(
            &s,
            cur(1, Phase::Compensate, 1),
            Outcome::Failed(FailureKind::Fatal),
            0.0,
        );
        assert_eq!(t.state.status, InstanceStatus::Failed);
    }

    #[test]
    fn exponential_backoff_doubles_caps_and_jitters_within_bounds() {
        let policy = RetryPolicy {
            max_attempts: 10,
            backoff: Backoff::Exponential,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            jitter: false,
        };
        let delays: Vec<u128> = (1..=6)
            .map(|n| retry_delay(&policy, n, 0.0).as_millis())
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(retry_delay(&policy, u32::MAX, 0.0).as_millis(), 1000);

        let jittered = RetryPolicy {
            jitter: true,
            ..policy
        };
        assert_eq!(retry_delay(&jittered, 2, 0.0).as_millis(), 100);
        assert_eq!(retry_delay(&jittered, 2, 0.999_999).as_millis(), 199);
    }
}
