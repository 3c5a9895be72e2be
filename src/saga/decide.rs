//! Every decision about one message, as pure functions: the engine asks, runs the
//! effect, and carries out the [`Plan`] (record, commit, publish, ack).
//!
//! - [`target`]: what the message asks to run — a step's action or compensation — or
//!   why it cannot be run at all (a dead letter);
//! - [`deadline`] and [`expired`]: the saga's deadline, and whether it stops the step;
//! - [`decide`]: the step ran (or expired): the instance's new state, the outputs and
//!   error history it carries on, the messages to send, whether it parks (and as what),
//!   and whether an exclusive saga's lock passes on;
//! - [`dispose`]: the guarded record did not apply: is the message a copy, a stale
//!   start, out of date, or a run for no instance?
//!
//! Nothing here reads a clock, a random number, a database or a broker: the caller
//! passes `now` and `jitter`, so every rule is unit-tested below.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use super::coordinator::{
    self, Admission, Cursor, FailureKind, InstanceState, InstanceStatus, Outcome, Phase, SkipReason,
};
use super::definition::{Action, Isolation, SagaDef, StepDef, StepRole};
use crate::envelope::{AttemptError, Command, DeadLetterNote, Envelope, Outgoing};

/// What the message asks to run, or why it cannot.
#[derive(Debug)]
pub enum Target<'a> {
    /// Run this step's action (forward) or compensation.
    Run {
        /// The step.
        step: &'a StepDef,
        /// Its action or its compensation, as the cursor's phase says.
        action: &'a Action,
    },
    /// The message names nothing this saga can run: dead-letter it as unprocessable.
    DeadLetter {
        /// `unknown_step` or `no_compensation`.
        code: &'static str,
        /// For a person.
        reason: String,
    },
}

/// What `cursor` asks `saga` to run.
pub fn target(saga: &SagaDef, cursor: Cursor) -> Target<'_> {
    let Some(step) = saga.steps.get(cursor.step as usize) else {
        return Target::DeadLetter {
            code: "unknown_step",
            reason: format!("saga {} has no step {}", saga.name, cursor.step),
        };
    };
    match (cursor.phase, &step.compensation) {
        (Phase::Forward, _) => Target::Run {
            step,
            action: &step.action,
        },
        (Phase::Compensate, Some(action)) => Target::Run { step, action },
        (Phase::Compensate, None) => Target::DeadLetter {
            code: "no_compensation",
            reason: format!("step {} has no compensation", step.name),
        },
    }
}

/// The saga's deadline for this message: a start sets it (`now + timeout_ms`), a run
/// message carries the one its instance was given.
pub fn deadline(saga: &SagaDef, envelope: &Envelope, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    match envelope.command {
        Command::Start => deadline_after(now, saga.timeout),
        Command::Run { .. } | Command::Timer { .. } => envelope.deadline,
    }
}

/// `start + timeout`, or `None` without a timeout (or past the calendar's end).
pub fn deadline_after(
    start: DateTime<Utc>,
    timeout: Option<std::time::Duration>,
) -> Option<DateTime<Utc>> {
    start.checked_add_signed(chrono::Duration::from_std(timeout?).ok()?)
}

/// Why the step must not run, if the saga's deadline has passed: a forward step at or
/// before the pivot is stopped (the instance compensates); a retriable step after the
/// pivot always runs (nothing can be undone there, so it must finish), and so does
/// every compensation.
pub fn expired(
    step: &StepDef,
    cursor: Cursor,
    deadline: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<String> {
    let deadline = deadline?;
    (cursor.phase == Phase::Forward && step.role != StepRole::Retriable && now > deadline)
        .then(|| format!("saga timed out (deadline {deadline})"))
}

/// How the step's attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum StepResult {
    /// It committed; the output (captured `returning` columns, a handler's object).
    Succeeded(Option<Value>),
    /// It failed (or its deadline stopped it); its transaction was rolled back.
    Failed {
        /// Whether a retry may help.
        kind: FailureKind,
        /// What went wrong, for the error history.
        message: String,
    },
}

/// The message being decided on, and where it stands.
#[derive(Debug, Clone, Copy)]
pub struct Attempt<'a> {
    /// The saga.
    pub saga: &'a SagaDef,
    /// The message.
    pub envelope: &'a Envelope,
    /// Its aggregate.
    pub aggregate_id: &'a str,
    /// Its instance.
    pub instance_id: Uuid,
    /// What it ran.
    pub cursor: Cursor,
    /// The saga's deadline ([`deadline`]).
    pub deadline: Option<DateTime<Utc>>,
}

/// Which kind of dead letter a parked instance leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParkKind {
    /// A step after the pivot failed for good.
    Exhausted,
    /// A compensation failed for good.
    CompensationFailed,
}

impl ParkKind {
    /// The reason code in the dead-letter queue and in `skald.dead_letters`.
    pub fn code(self) -> &'static str {
        match self {
            ParkKind::Exhausted => "exhausted",
            ParkKind::CompensationFailed => "compensation_failed",
        }
    }
}

/// The instance is parked for a person.
#[derive(Debug, Clone, PartialEq)]
pub struct Park {
    /// Which kind of dead letter.
    pub kind: ParkKind,
    /// Why, for a person.
    pub reason: String,
    /// The message as it failed, with its whole error history: the dead letter's body.
    pub envelope: Envelope,
}

/// Everything one attempt leads to.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Succeeded or failed (and how), for the inbox row.
    pub outcome: Outcome,
    /// The failure's message, if it failed.
    pub error: Option<String>,
    /// The instance's state once the record commits.
    pub state: InstanceState,
    /// The outputs of every step so far, this one's included.
    pub outputs: Value,
    /// The error history so far, this attempt's failure appended.
    pub errors: Vec<AttemptError>,
    /// What to publish after commit: the next run message, and the dead-letter copy
    /// of a parked instance.
    pub outgoing: Vec<Outgoing>,
    /// The instance parks: record this dead letter in the same transaction.
    pub park: Option<Park>,
    /// The instance ended and its saga is exclusive: pass the aggregate's lock to the
    /// oldest waiting instance in the same transaction.
    pub pass_lock: bool,
    /// The failure is followed by another try of the same step.
    pub retries: bool,
}

/// Decides what an attempt leads to. `jitter` in `[0, 1)` spreads retry delays;
/// `now` stamps the error history and the messages.
pub fn decide(at: &Attempt<'_>, result: StepResult, now: DateTime<Utc>, jitter: f64) -> Plan {
    let env = at.envelope;
    let step_name = at
        .saga
        .steps
        .get(at.cursor.step as usize)
        .map_or("", |s| s.name.as_str());
    let (outcome, output, failure) = match result {
        StepResult::Succeeded(output) => (Outcome::Succeeded, output, None),
        StepResult::Failed { kind, message } => {
            (Outcome::Failed(kind), None, Some((kind, message)))
        }
    };
    let t = coordinator::transition(at.saga, at.cursor, outcome, jitter);

    let mut outputs = if env.outputs.is_object() {
        env.outputs.clone()
    } else {
        Value::Object(Default::default())
    };
    if let (Some(out), Value::Object(map)) = (output, &mut outputs) {
        map.insert(step_name.to_string(), out);
    }
    let mut errors = env.errors.clone();
    if let Some((kind, message)) = &failure {
        errors.push(AttemptError {
            step: step_name.to_string(),
            phase: at.cursor.phase,
            attempt: at.cursor.attempt,
            at: now,
            kind: *kind,
            message: message.clone(),
        });
    }

    let mut outgoing: Vec<Outgoing> = t
        .next
        .iter()
        .map(|next| {
            let envelope = Envelope {
                outputs: outputs.clone(),
                errors: errors.clone(),
                deadline: at.deadline,
                dispatched_at: Some(now),
                ..Envelope::run(
                    &at.saga.name,
                    at.saga.version,
                    at.aggregate_id,
                    at.instance_id,
                    next.cursor,
                    env.payload.clone(),
                )
            };
            Outgoing::to_intake(envelope, next.delay.as_millis() as u64)
        })
        .collect();

    let park = (t.state.status == InstanceStatus::Failed).then(|| {
        let kind = match at.cursor.phase {
            Phase::Forward => ParkKind::Exhausted,
            Phase::Compensate => ParkKind::CompensationFailed,
        };
        let reason = format!(
            "{} of step {} failed for good after {} attempt(s): {}",
            at.cursor.phase.as_str(),
            step_name,
            at.cursor.attempt,
            failure.as_ref().map_or("", |(_, m)| m.as_str())
        );
        Park {
            kind,
            reason,
            envelope: Envelope {
                errors: errors.clone(),
                ..env.clone()
            },
        }
    });
    if let Some(p) = &park {
        outgoing.push(Outgoing {
            dead_letter: Some(DeadLetterNote {
                code: p.kind.code().to_string(),
                reason: p.reason.clone(),
            }),
            ..Outgoing::to_intake(p.envelope.clone(), 0)
        });
    }
    let retries = failure.is_some()
        && t.next
            .is_some_and(|n| n.cursor.step == at.cursor.step && n.cursor.phase == at.cursor.phase);
    Plan {
        outcome,
        error: failure.map(|(_, m)| m),
        state: t.state,
        outputs,
        errors,
        outgoing,
        park,
        pass_lock: passes_lock(at.saga, InstanceStatus::Running, t.state.status),
        retries,
    }
}

/// Whether this message must first ask if its aggregate is taken: a start of an
/// `isolation: exclusive` saga waits (as a `waiting` instance) while another instance
/// of the saga is live on the aggregate.
pub fn takes_lock(saga: &SagaDef, envelope: &Envelope) -> bool {
    envelope.command == Command::Start && saga.isolation == Isolation::Exclusive
}

/// Whether an instance moving from `from` to `to` passes its exclusive saga's lock to
/// the oldest waiting instance: it held the lock (it was not waiting) and it ended.
pub fn passes_lock(saga: &SagaDef, from: InstanceStatus, to: InstanceStatus) -> bool {
    saga.isolation == Isolation::Exclusive && from != InstanceStatus::Waiting && to.is_terminal()
}

/// Where a parked (`failed`) instance resumes: the step or compensation that failed,
/// as a new attempt. `None` when the instance is not parked.
pub fn resume(state: InstanceState) -> Option<InstanceState> {
    if state.status != InstanceStatus::Failed {
        return None;
    }
    let cursor = Cursor {
        attempt: state.cursor.attempt + 1,
        ..state.cursor
    };
    let status = match cursor.phase {
        Phase::Forward => InstanceStatus::Running,
        Phase::Compensate => InstanceStatus::Compensating,
    };
    Some(InstanceState { status, cursor })
}

/// Why a message's guarded record did not apply, as PostgreSQL says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposal {
    /// The message id is in the inbox: a copy of a handled message.
    Seen,
    /// No instance has the message's instance id.
    NoInstance,
    /// The instance exists in this state (terminal, or at another cursor).
    Live(InstanceState),
}

/// What to do with a message whose record did not apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// A copy: run nothing, re-send what the original sent.
    ResendCopy,
    /// A start not newer than its aggregate's watermark: record it as stale.
    RecordStale,
    /// Out of date for its instance: record it as skipped.
    RecordSkipped(SkipReason),
    /// A run message for an instance that does not exist: dead-letter it.
    DeadLetter {
        /// `no_instance`.
        code: &'static str,
        /// For a person.
        reason: String,
    },
    /// The state moved between the record and this look: try the message again.
    Raced,
}

/// Whether [`dispose`] needs the aggregate's watermark (read it only then).
pub fn needs_watermark(disposal: Disposal, envelope: &Envelope) -> bool {
    disposal == Disposal::NoInstance
        && envelope.command == Command::Start
        && envelope.order_key().is_some()
}

/// Decides what a message whose guarded record did not apply is. `watermark` is the
/// aggregate's, read when [`needs_watermark`] says so.
///
/// Staleness is decided here and nowhere else: a start creates nothing when its order
/// key is not above the watermark; if it is above, the watermark moved meanwhile.
pub fn dispose(
    disposal: Disposal,
    envelope: &Envelope,
    instance_id: Uuid,
    requested: Cursor,
    watermark: Option<i64>,
) -> Disposition {
    match disposal {
        Disposal::Seen => Disposition::ResendCopy,
        Disposal::NoInstance => match (envelope.command, envelope.order_key()) {
            (Command::Start, Some(key)) if watermark.is_some_and(|w| (key as i64) <= w) => {
                Disposition::RecordStale
            }
            (Command::Start, _) => Disposition::Raced,
            (Command::Run { .. } | Command::Timer { .. }, _) => Disposition::DeadLetter {
                code: "no_instance",
                reason: format!("run message for unknown instance {instance_id}"),
            },
        },
        Disposal::Live(state) => match coordinator::admit(state, requested) {
            Admission::Skip(reason) => Disposition::RecordSkipped(reason),
            Admission::Run(_) => Disposition::Raced,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::load_str;
    use serde_json::json;

    const SAGA: &str = r#"
name: s
version: 1
aggregate: payload.key
timeout_ms: 1000
retry: { max_attempts: 2, backoff: fixed, initial_delay_ms: 100, max_delay_ms: 100, jitter: false }
steps:
  - name: one
    role: compensatable
    action: { sql: "SELECT 1" }
    compensation: { sql: "SELECT 2" }
  - name: two
    role: pivot
    action: { sql: "SELECT 3" }
  - name: three
    role: retriable
    action: { sql: "SELECT 4" }
"#;

    fn saga(extra: &str) -> SagaDef {
        let text = SAGA.replacen("timeout_ms", &format!("{extra}timeout_ms"), 1);
        load_str(&text, std::path::Path::new("s.yaml")).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn now() -> DateTime<Utc> {
        "2026-11-28T10:00:00Z".parse().unwrap()
    }

    fn cursor(step: u32, phase: Phase, attempt: u32) -> Cursor {
        Cursor {
            step,
            phase,
            attempt,
        }
    }

    fn start() -> Envelope {
        Envelope::start("s", Some("k".into()), json!({"key": "k"}))
    }

    fn attempt<'a>(saga: &'a SagaDef, env: &'a Envelope, at: Cursor) -> Attempt<'a> {
        Attempt {
            saga,
            envelope: env,
            aggregate_id: "k",
            instance_id: Uuid::nil(),
            cursor: at,
            deadline: deadline(saga, env, now()),
        }
    }

    fn failed(kind: FailureKind) -> StepResult {
        StepResult::Failed {
            kind,
            message: "boom".into(),
        }
    }

    #[test]
    fn targets_are_the_action_or_the_compensation_or_a_dead_letter() {
        let s = saga("");
        assert!(matches!(
            target(&s, cursor(0, Phase::Compensate, 1)),
            Target::Run { action, .. } if std::ptr::eq(action, s.steps[0].compensation.as_ref().unwrap())
        ));
        assert!(matches!(
            target(&s, cursor(1, Phase::Compensate, 1)),
            Target::DeadLetter {
                code: "no_compensation",
                ..
            }
        ));
        assert!(matches!(
            target(&s, cursor(9, Phase::Forward, 1)),
            Target::DeadLetter {
                code: "unknown_step",
                ..
            }
        ));
    }

    #[test]
    fn a_start_sets_the_deadline_and_a_run_carries_it() {
        let s = saga("");
        let env = start();
        assert_eq!(
            deadline(&s, &env, now()),
            Some(now() + chrono::Duration::seconds(1))
        );
        let run = Envelope {
            deadline: Some(now()),
            ..Envelope::run("s", 1, "k", Uuid::nil(), Cursor::START, json!({}))
        };
        assert_eq!(
            deadline(&s, &run, now() + chrono::Duration::hours(1)),
            Some(now())
        );
    }

    #[test]
    fn the_deadline_stops_forward_steps_up_to_the_pivot_only() {
        let s = saga("");
        let past = Some(now() - chrono::Duration::seconds(1));
        assert!(expired(&s.steps[0], cursor(0, Phase::Forward, 1), past, now()).is_some());
        assert!(expired(&s.steps[1], cursor(1, Phase::Forward, 1), past, now()).is_some());
        assert!(expired(&s.steps[2], cursor(2, Phase::Forward, 1), past, now()).is_none());
        assert!(expired(&s.steps[0], cursor(0, Phase::Compensate, 1), past, now()).is_none());
        assert!(expired(&s.steps[0], cursor(0, Phase::Forward, 1), None, now()).is_none());
        let future = Some(now() + chrono::Duration::seconds(1));
        assert!(expired(&s.steps[0], cursor(0, Phase::Forward, 1), future, now()).is_none());
    }

    #[test]
    fn a_success_moves_on_carrying_outputs_and_the_deadline() {
        let s = saga("");
        let env = start();
        let at = attempt(&s, &env, Cursor::START);
        let plan = decide(
            &at,
            StepResult::Succeeded(Some(json!({"id": 7}))),
            now(),
            0.0,
        );
        assert_eq!(plan.state.status, InstanceStatus::Running);
        assert_eq!(plan.state.cursor, cursor(1, Phase::Forward, 1));
        assert_eq!(plan.outputs, json!({"one": {"id": 7}}));
        assert_eq!(plan.outgoing.len(), 1);
        let next = &plan.outgoing[0];
        assert_eq!(next.delay_ms, 0);
        assert_eq!(next.envelope.outputs, plan.outputs);
        assert_eq!(next.envelope.deadline, at.deadline);
        assert_eq!(
            next.envelope.command,
            Command::Run {
                instance_id: Uuid::nil(),
                cursor: cursor(1, Phase::Forward, 1)
            }
        );
        assert!(plan.park.is_none() && !plan.pass_lock && !plan.retries);
    }

    #[test]
    fn a_retryable_failure_is_retried_after_the_delay_with_its_history() {
        let s = saga("");
        let env = start();
        let plan = decide(
            &attempt(&s, &env, Cursor::START),
            failed(FailureKind::Retryable),
            now(),
            0.0,
        );
        assert!(plan.retries);
        assert_eq!(plan.outgoing[0].delay_ms, 100);
        assert_eq!(plan.errors.len(), 1);
        assert_eq!(plan.outgoing[0].envelope.errors, plan.errors);
        assert_eq!(plan.error.as_deref(), Some("boom"));
    }

    #[test]
    fn a_compensation_failing_for_good_parks_with_its_whole_history() {
        let s = saga("");
        let env = start();
        let plan = decide(
            &attempt(&s, &env, cursor(0, Phase::Compensate, 2)),
            failed(FailureKind::Retryable),
            now(),
            0.0,
        );
        assert_eq!(plan.state.status, InstanceStatus::Failed);
        let park = plan.park.expect("parked");
        assert_eq!(park.kind, ParkKind::CompensationFailed);
        assert!(
            park.reason
                .contains("compensate of step one failed for good after 2")
        );
        assert_eq!(park.envelope.errors.len(), 1);
        let copy = plan.outgoing.last().unwrap();
        assert_eq!(
            copy.dead_letter.as_ref().unwrap().code,
            "compensation_failed"
        );
    }

    #[test]
    fn an_exclusive_saga_passes_its_lock_when_it_ends() {
        let s = saga("isolation: exclusive\n");
        let env = start();
        let ran = cursor(2, Phase::Forward, 1);
        assert!(
            decide(
                &attempt(&s, &env, ran),
                StepResult::Succeeded(None),
                now(),
                0.0
            )
            .pass_lock
        );
        assert!(
            !decide(
                &attempt(&s, &env, Cursor::START),
                StepResult::Succeeded(None),
                now(),
                0.0
            )
            .pass_lock
        );
    }

    #[test]
    fn a_parked_instance_resumes_where_it_failed_as_a_new_attempt() {
        let parked = InstanceState {
            status: InstanceStatus::Failed,
            cursor: cursor(0, Phase::Compensate, 3),
        };
        assert_eq!(
            resume(parked),
            Some(InstanceState {
                status: InstanceStatus::Compensating,
                cursor: cursor(0, Phase::Compensate, 4)
            })
        );
        let exhausted = InstanceState {
            status: InstanceStatus::Failed,
            cursor: cursor(2, Phase::Forward, 9),
        };
        assert_eq!(resume(exhausted).unwrap().status, InstanceStatus::Running);
        let running = InstanceState {
            status: InstanceStatus::Running,
            ..parked
        };
        assert_eq!(resume(running), None);
    }

    #[test]
    fn only_starts_of_exclusive_sagas_ask_for_the_lock() {
        let exclusive = saga("isolation: exclusive\n");
        let run = Envelope::run("s", 1, "k", Uuid::nil(), Cursor::START, json!({}));
        assert!(takes_lock(&exclusive, &start()));
        assert!(!takes_lock(&exclusive, &run));
        assert!(!takes_lock(&saga(""), &start()));
    }

    #[test]
    fn only_a_lock_holder_that_ends_passes_the_lock() {
        let s = saga("isolation: exclusive\n");
        assert!(passes_lock(
            &s,
            InstanceStatus::Running,
            InstanceStatus::Compensated
        ));
        assert!(!passes_lock(
            &s,
            InstanceStatus::Waiting,
            InstanceStatus::Compensated
        ));
        assert!(!passes_lock(
            &s,
            InstanceStatus::Running,
            InstanceStatus::Compensating
        ));
        assert!(!passes_lock(
            &saga(""),
            InstanceStatus::Running,
            InstanceStatus::Completed
        ));
    }

    #[test]
    fn copies_stale_starts_and_out_of_date_messages_are_told_apart() {
        let seq = |n: u64| Envelope {
            sequence: Some(n),
            ..start()
        };
        let id = Uuid::nil();
        assert_eq!(
            dispose(Disposal::Seen, &start(), id, Cursor::START, None),
            Disposition::ResendCopy
        );
        assert!(needs_watermark(Disposal::NoInstance, &seq(3)));
        assert!(!needs_watermark(Disposal::Seen, &seq(3)));
        assert_eq!(
            dispose(Disposal::NoInstance, &seq(3), id, Cursor::START, Some(3)),
            Disposition::RecordStale
        );
        assert_eq!(
            dispose(Disposal::NoInstance, &seq(4), id, Cursor::START, Some(3)),
            Disposition::Raced
        );
        assert_eq!(
            dispose(Disposal::NoInstance, &seq(4), id, Cursor::START, None),
            Disposition::Raced
        );
        let run = Envelope::run("s", 1, "k", id, Cursor::START, json!({}));
        assert!(matches!(
            dispose(Disposal::NoInstance, &run, id, Cursor::START, None),
            Disposition::DeadLetter {
                code: "no_instance",
                ..
            }
        ));
        let live = |status, c| Disposal::Live(InstanceState { status, cursor: c });
        assert_eq!(
            dispose(
                live(InstanceStatus::Completed, Cursor::START),
                &run,
                id,
                Cursor::START,
                None
            ),
            Disposition::RecordSkipped(SkipReason::Terminal)
        );
        assert_eq!(
            dispose(
                live(InstanceStatus::Running, cursor(1, Phase::Forward, 1)),
                &run,
                id,
                Cursor::START,
                None
            ),
            Disposition::RecordSkipped(SkipReason::NotCurrent)
        );
        assert_eq!(
            dispose(
                live(InstanceStatus::Running, Cursor::START),
                &run,
                id,
                Cursor::START,
                None
            ),
            Disposition::Raced
        );
    }
}
