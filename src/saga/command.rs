//! Command steps as pure decisions: what sending a command leads to, and what its
//! reply or its reply timer leads to.
//!
//! A command step runs in three kinds of message, each handled in one transaction:
//! 1. the run message of its cursor: [`send`] builds the command (deterministic id
//!    [`command_id`]) and its first reply timer; the instance stays at the cursor,
//!    waiting ([`CommandStatus::Waiting`]);
//! 2. the service's reply: [`on_reply`] applies it once — its result then goes through
//!    [`crate::saga::decide::decide`] like any attempt's — or records it as late,
//!    a duplicate or unknown;
//! 3. the reply timer: [`on_timer`] re-sends the *same* command and re-arms the timer
//!    while the retry policy allows, then fails the step (timed out); a timer that
//!    finds the reply already applied is skipped.
//!
//! Nothing here reads a clock, a database or a broker.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::context::StepInput;
use super::coordinator::{Cursor, FailureKind, InstanceState, InstanceStatus, Phase};
use super::decide::{Attempt, StepResult};
use super::definition::{CommandAction, StepDef, StepRole};
use crate::envelope::{Command, Envelope, Outgoing, timer_message_id};
use crate::participant::wire::{Reply, ReplyFailure, ReplyOutcome, ReplyTo, ServiceMessage};

pub use crate::participant::wire::command_id;

/// Where a command stands, as stored with it (`skald.commands.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    /// Sent; the instance waits for its reply.
    Waiting,
    /// The service replied `succeeded`.
    Succeeded,
    /// The service replied `failed`.
    Failed,
    /// No reply after the retry policy's sends: the step failed.
    TimedOut,
    /// An operator cancelled the instance while it waited: a reply is late.
    Cancelled,
}

impl CommandStatus {
    /// The spelling stored in PostgreSQL and shown by the API.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Waiting => "waiting",
            CommandStatus::Succeeded => "succeeded",
            CommandStatus::Failed => "failed",
            CommandStatus::TimedOut => "timed_out",
            CommandStatus::Cancelled => "cancelled",
        }
    }

    /// Parses the stored spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        [
            CommandStatus::Waiting,
            CommandStatus::Succeeded,
            CommandStatus::Failed,
            CommandStatus::TimedOut,
            CommandStatus::Cancelled,
        ]
        .into_iter()
        .find(|c| c.as_str() == s)
    }
}

/// Binds a command's `params` from the step's input, as a JSON object in YAML order;
/// the first reference with no value is an error message (a fatal failure of the step,
/// as for SQL parameters).
pub fn bind(action: &CommandAction, input: &StepInput<'_>) -> Result<Map<String, Value>, String> {
    action
        .params
        .iter()
        .map(|(name, r)| {
            r.resolve(input)
                .map(|v| (name.clone(), v))
                .ok_or_else(|| format!("parameter `{name}`: {r} has no value"))
        })
        .collect()
}

/// What sending a command leads to.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    /// The command, as every send of it sends it.
    pub message: ServiceMessage,
    /// The instance's state once recorded: at the command's cursor, waiting.
    pub state: InstanceState,
    /// The command (to its service) and its first reply timer (to skald, delayed).
    pub outgoing: Vec<Outgoing>,
}

/// The running status of a cursor's phase.
fn live_status(phase: Phase) -> InstanceStatus {
    match phase {
        Phase::Forward => InstanceStatus::Running,
        Phase::Compensate => InstanceStatus::Compensating,
    }
}

/// The run message of `at` as the context every later message of the command keeps:
/// payload, outputs so far, error history and deadline.
fn context(at: &Attempt<'_>, now: DateTime<Utc>) -> Envelope {
    let env = at.envelope;
    Envelope {
        outputs: if env.outputs.is_object() {
            env.outputs.clone()
        } else {
            Value::Object(Default::default())
        },
        errors: env.errors.clone(),
        deadline: at.deadline,
        dispatched_at: Some(now),
        ..Envelope::run(
            &at.saga.name,
            at.saga.version,
            at.aggregate_id,
            at.instance_id,
            at.cursor,
            env.payload.clone(),
        )
    }
}

/// The reply timer of the `send`-th send of the command of `context`'s cursor,
/// delayed by the command's timeout.
pub fn timer(context: &Envelope, action: &CommandAction, send: u32) -> Outgoing {
    let (instance_id, cursor) = context
        .command
        .target()
        .expect("a command's context is a run message");
    Outgoing::to_intake(
        Envelope {
            message_id: timer_message_id(instance_id, cursor, send),
            command: Command::Timer {
                instance_id,
                cursor,
                send,
            },
            ..context.clone()
        },
        action.timeout.as_millis() as u64,
    )
}

/// Sends the command of step `at` with its bound `params`, dispatched `now`.
pub fn send(
    at: &Attempt<'_>,
    action: &CommandAction,
    params: Map<String, Value>,
    now: DateTime<Utc>,
) -> Sent {
    let context = context(at, now);
    let message = ServiceMessage {
        message_id: command_id(at.instance_id, at.cursor),
        kind: action.kind.clone(),
        aggregate_id: at.aggregate_id.to_string(),
        sequence: None,
        dispatched_at: Some(now),
        payload: params,
        reply_to: Some(ReplyTo {
            saga: at.saga.name.clone(),
            saga_version: at.saga.version,
            instance_id: at.instance_id,
            cursor: at.cursor,
        }),
        errors: Vec::new(),
        // The engine stamps its attempt's span over it when it exports traces.
        traceparent: at.envelope.traceparent.clone(),
    };
    let outgoing = vec![
        Outgoing::to_service(&action.service, message.clone(), context.clone()),
        timer(&context, action, 1),
    ];
    Sent {
        message,
        state: InstanceState {
            status: live_status(at.cursor.phase),
            cursor: at.cursor,
        },
        outgoing,
    }
}

/// A command as stored while and after it is awaited: what its reply and its timers
/// are decided on.
#[derive(Debug, Clone, PartialEq)]
pub struct Pending {
    /// Its instance.
    pub instance_id: Uuid,
    /// The aggregate it was sent for (a reply must name the same one).
    pub aggregate_id: String,
    /// The cursor that sent it.
    pub cursor: Cursor,
    /// Waiting, or how it ended.
    pub status: CommandStatus,
    /// How many times it was sent so far (1 for the first).
    pub sends: u32,
}

/// Why a reply is recorded without being applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LateReason {
    /// skald sent no such command (no instance, or an id, cursor or aggregate that is
    /// not its command's).
    Unknown,
    /// The command was answered before (another reply id, or it timed out).
    AlreadyAnswered,
    /// The instance moved on (cancelled, compensated, parked) or finished.
    NotCurrent,
}

impl LateReason {
    /// The disposition stored in `skald.replies`.
    pub fn as_str(self) -> &'static str {
        match self {
            LateReason::Unknown => "unknown",
            LateReason::AlreadyAnswered | LateReason::NotCurrent => "late",
        }
    }
}

/// What a reply leads to.
#[derive(Debug, Clone, PartialEq)]
pub enum OnReply {
    /// Apply it: the step's attempt ended with this result.
    Apply(StepResult),
    /// Record it and do nothing else.
    Record(LateReason),
}

/// Decides a reply (a new one: copies are recognised by the inbox first) against the
/// command it answers (`pending`, if skald has it) and its instance's state.
pub fn on_reply(reply: &Reply, pending: Option<&Pending>, state: Option<InstanceState>) -> OnReply {
    let to = &reply.reply_to;
    let (Some(pending), Some(state)) = (pending, state) else {
        return OnReply::Record(LateReason::Unknown);
    };
    if pending.instance_id != to.instance_id
        || pending.aggregate_id != reply.aggregate_id
        || pending.cursor != to.cursor
        || command_id(to.instance_id, to.cursor) != reply.in_reply_to
    {
        return OnReply::Record(LateReason::Unknown);
    }
    if pending.status != CommandStatus::Waiting {
        return OnReply::Record(LateReason::AlreadyAnswered);
    }
    if state.status.is_terminal() || state.cursor != pending.cursor {
        return OnReply::Record(LateReason::NotCurrent);
    }
    OnReply::Apply(match &reply.outcome {
        ReplyOutcome::Succeeded { outputs } => {
            StepResult::Succeeded(Some(Value::Object(outputs.clone())))
        }
        ReplyOutcome::Failed { kind, error } => StepResult::Failed {
            kind: FailureKind::from(*kind),
            message: format!(
                "service {} replied {}: {error}",
                reply.service,
                match kind {
                    ReplyFailure::Fatal => "fatal",
                    ReplyFailure::Exhausted => "exhausted",
                }
            ),
        },
    })
}

/// Why a reply timer does nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimerSkip {
    /// The command was answered (or timed out) before.
    Answered,
    /// A later send re-armed another timer: this one is stale.
    Superseded,
    /// The instance is not at this command's cursor any more, or finished.
    NotCurrent,
}

/// What a reply timer leads to.
#[derive(Debug, Clone, PartialEq)]
pub enum OnTimer {
    /// Send the same command again, as send number `send`, and arm its timer.
    Resend {
        /// The new send's number.
        send: u32,
        /// Why, for the attempt history.
        note: String,
    },
    /// The policy's sends are used up: the step failed with this result.
    TimedOut(StepResult),
    /// Record the timer as skipped.
    Skip(TimerSkip),
}

/// Decides the timer of the `send`-th send of `step`'s command (its `action`) at
/// `cursor`. Every send counts as an attempt of the step's retry policy (`max_attempts`
/// sends in all; unbounded for a retriable step going forward, which must finish).
pub fn on_timer(
    step: &StepDef,
    action: &CommandAction,
    cursor: Cursor,
    send: u32,
    pending: Option<&Pending>,
    state: Option<InstanceState>,
) -> OnTimer {
    let (Some(pending), Some(state)) = (pending, state) else {
        return OnTimer::Skip(TimerSkip::NotCurrent);
    };
    if pending.status != CommandStatus::Waiting {
        return OnTimer::Skip(TimerSkip::Answered);
    }
    if state.status.is_terminal() || state.cursor != cursor || pending.cursor != cursor {
        return OnTimer::Skip(TimerSkip::NotCurrent);
    }
    if pending.sends != send {
        return OnTimer::Skip(TimerSkip::Superseded);
    }
    let timeout = action.timeout.as_millis();
    let unbounded = cursor.phase == Phase::Forward && step.role == StepRole::Retriable;
    if unbounded || send < step.retry.max_attempts {
        OnTimer::Resend {
            send: send + 1,
            note: format!(
                "no reply from service {} within {timeout} ms: command {} sent again \
                 (send {})",
                action.service,
                action.kind,
                send + 1
            ),
        }
    } else {
        OnTimer::TimedOut(StepResult::Failed {
            kind: FailureKind::Fatal,
            message: format!(
                "no reply from service {} to command {} within {timeout} ms, after {send} \
                 send(s)",
                action.service, action.kind
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::participant::wire::reply_id;
    use crate::saga::definition::Action;
    use crate::saga::{SagaDef, load_str};
    use serde_json::json;

    const SAGA: &str = r#"
name: s
version: 1
aggregate: payload.key
retry: { max_attempts: 3, backoff: fixed, initial_delay_ms: 100, max_delay_ms: 100, jitter: false }
steps:
  - name: reserve
    role: compensatable
    action:
      command: { service: stock, type: reserve_stock, params: { sku: payload.sku, qty: payload.qty }, returning: [reservation_id], timeout_ms: 500 }
    compensation:
      command: { service: stock, type: release_stock, params: { reservation_id: steps.reserve.reservation_id } }
  - name: ship
    role: retriable
    action:
      command: { service: shipping, type: ship, params: { r: steps.reserve.reservation_id } }
"#;

    fn saga() -> SagaDef {
        load_str(SAGA, std::path::Path::new("s.yaml")).unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn command(step: &StepDef) -> &CommandAction {
        match &step.action {
            Action::Command(c) => c,
            other => panic!("{other:?}"),
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-28T10:00:00Z".parse().unwrap()
    }

    fn start() -> Envelope {
        Envelope::start(
            "s",
            Some("k".into()),
            json!({"key": "k", "sku": "A", "qty": 2}),
        )
    }

    fn attempt<'a>(saga: &'a SagaDef, env: &'a Envelope, cursor: Cursor) -> Attempt<'a> {
        Attempt {
            saga,
            envelope: env,
            aggregate_id: "k",
            instance_id: Uuid::nil(),
            cursor,
            deadline: None,
        }
    }

    fn waiting(cursor: Cursor, sends: u32) -> (Pending, InstanceState) {
        (
            Pending {
                instance_id: Uuid::nil(),
                aggregate_id: "k".into(),
                cursor,
                status: CommandStatus::Waiting,
                sends,
            },
            InstanceState {
                status: InstanceStatus::Running,
                cursor,
            },
        )
    }

    fn reply(cursor: Cursor, outcome: ReplyOutcome) -> Reply {
        let id = command_id(Uuid::nil(), cursor);
        Reply {
            message_id: reply_id(id),
            in_reply_to: id,
            service: "stock".into(),
            aggregate_id: "k".into(),
            reply_to: ReplyTo {
                saga: "s".into(),
                saga_version: 1,
                instance_id: Uuid::nil(),
                cursor,
            },
            outcome,
            traceparent: None,
        }
    }

    #[test]
    fn the_yaml_fields_load_with_their_default_timeout() {
        let s = saga();
        let c = command(&s.steps[0]);
        assert_eq!(
            (c.service.as_str(), c.kind.as_str()),
            ("stock", "reserve_stock")
        );
        assert_eq!(c.returning, ["reservation_id"]);
        assert_eq!(c.timeout.as_millis(), 500);
        let keys: Vec<_> = c.params.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["sku", "qty"]);
        assert_eq!(command(&s.steps[1]).timeout.as_millis(), 30_000);
    }

    #[test]
    fn params_bind_in_yaml_order_and_a_missing_value_is_an_error() {
        let s = saga();
        let payload = json!({"sku": "A", "qty": 2});
        let outputs = json!({});
        let input = StepInput {
            instance_id: Uuid::nil(),
            aggregate_id: "k",
            payload: &payload,
            outputs: &outputs,
        };
        let bound = bind(command(&s.steps[0]), &input).unwrap();
        assert_eq!(Value::Object(bound), json!({"sku": "A", "qty": 2}));
        let err = bind(command(&s.steps[1]), &input).unwrap_err();
        assert!(
            err.contains("steps.reserve.reservation_id has no value"),
            "{err}"
        );
    }

    #[test]
    fn sending_waits_at_the_cursor_with_the_command_and_its_timer() {
        let s = saga();
        let env = start();
        let at = attempt(&s, &env, Cursor::START);
        let params = Map::from_iter([("sku".to_string(), json!("A"))]);
        let sent = send(&at, command(&s.steps[0]), params.clone(), now());
        assert_eq!(
            sent.message.message_id,
            command_id(Uuid::nil(), Cursor::START)
        );
        assert_eq!(sent.message.kind, "reserve_stock");
        assert_eq!(sent.message.payload, params);
        assert_eq!(sent.message.dispatched_at, Some(now()));
        assert_eq!(
            sent.message.reply_to.as_ref().unwrap().cursor,
            Cursor::START
        );
        assert_eq!(
            sent.state,
            InstanceState {
                status: InstanceStatus::Running,
                cursor: Cursor::START
            }
        );
        let [cmd, timer] = sent.outgoing.as_slice() else {
            panic!("{:?}", sent.outgoing)
        };
        assert_eq!(cmd.command.as_ref().unwrap().service, "stock");
        assert_eq!(cmd.command.as_ref().unwrap().message, sent.message);
        assert!(timer.command.is_none());
        assert_eq!(timer.delay_ms, 500);
        assert_eq!(
            timer.envelope.command,
            Command::Timer {
                instance_id: Uuid::nil(),
                cursor: Cursor::START,
                send: 1
            }
        );
        assert_eq!(
            timer.envelope.message_id,
            timer_message_id(Uuid::nil(), Cursor::START, 1)
        );
    }

    #[test]
    fn a_reply_to_the_waiting_command_is_applied_as_the_attempt_result() {
        let c = Cursor::START;
        let (pending, state) = waiting(c, 1);
        let ok = reply(
            c,
            ReplyOutcome::Succeeded {
                outputs: Map::from_iter([("reservation_id".to_string(), json!("r-1"))]),
            },
        );
        assert_eq!(
            on_reply(&ok, Some(&pending), Some(state)),
            OnReply::Apply(StepResult::Succeeded(Some(
                json!({"reservation_id": "r-1"})
            )))
        );
        let no = reply(
            c,
            ReplyOutcome::Failed {
                kind: ReplyFailure::Exhausted,
                error: "db down".into(),
            },
        );
        assert_eq!(
            on_reply(&no, Some(&pending), Some(state)),
            OnReply::Apply(StepResult::Failed {
                kind: FailureKind::Fatal,
                message: "service stock replied exhausted: db down".into()
            })
        );
    }

    #[test]
    fn late_answered_and_unknown_replies_are_only_recorded() {
        let c = Cursor::START;
        let (pending, state) = waiting(c, 1);
        let ok = reply(
            c,
            ReplyOutcome::Succeeded {
                outputs: Map::new(),
            },
        );
        assert_eq!(
            on_reply(&ok, None, None),
            OnReply::Record(LateReason::Unknown)
        );
        let answered = Pending {
            status: CommandStatus::Succeeded,
            ..pending.clone()
        };
        assert_eq!(
            on_reply(&ok, Some(&answered), Some(state)),
            OnReply::Record(LateReason::AlreadyAnswered)
        );
        let compensated = InstanceState {
            status: InstanceStatus::Compensated,
            ..state
        };
        assert_eq!(
            on_reply(&ok, Some(&pending), Some(compensated)),
            OnReply::Record(LateReason::NotCurrent)
        );
        let moved = InstanceState {
            status: InstanceStatus::Compensating,
            cursor: Cursor {
                phase: Phase::Compensate,
                ..c
            },
        };
        assert_eq!(
            on_reply(&ok, Some(&pending), Some(moved)),
            OnReply::Record(LateReason::NotCurrent)
        );
        let forged = Reply {
            in_reply_to: Uuid::new_v4(),
            ..ok.clone()
        };
        assert_eq!(
            on_reply(&forged, Some(&pending), Some(state)),
            OnReply::Record(LateReason::Unknown)
        );
        let elsewhere = Reply {
            aggregate_id: "other".into(),
            ..ok.clone()
        };
        assert_eq!(
            on_reply(&elsewhere, Some(&pending), Some(state)),
            OnReply::Record(LateReason::Unknown)
        );
        assert_eq!(LateReason::NotCurrent.as_str(), "late");
    }

    #[test]
    fn a_timer_resends_up_to_the_policy_then_times_the_step_out() {
        let s = saga();
        let c = Cursor::START;
        let action = command(&s.steps[0]);
        for send in 1..3 {
            let (pending, state) = waiting(c, send);
            assert!(matches!(
                on_timer(&s.steps[0], action, c, send, Some(&pending), Some(state)),
                OnTimer::Resend { send: next, .. } if next == send + 1
            ));
        }
        let (pending, state) = waiting(c, 3);
        match on_timer(&s.steps[0], action, c, 3, Some(&pending), Some(state)) {
            OnTimer::TimedOut(StepResult::Failed { kind, message }) => {
                assert_eq!(kind, FailureKind::Fatal);
                assert!(
                    message.contains("within 500 ms, after 3 send(s)"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_retriable_steps_timer_resends_without_end() {
        let s = saga();
        let c = Cursor {
            step: 1,
            ..Cursor::START
        };
        let (pending, state) = waiting(c, 50);
        assert!(matches!(
            on_timer(
                &s.steps[1],
                command(&s.steps[1]),
                c,
                50,
                Some(&pending),
                Some(state)
            ),
            OnTimer::Resend { send: 51, .. }
        ));
    }

    #[test]
    fn timers_after_the_reply_or_superseded_or_off_cursor_are_skipped() {
        let s = saga();
        let c = Cursor::START;
        let action = command(&s.steps[0]);
        let (pending, state) = waiting(c, 2);
        let skip =
            |p: &Pending, st, send| on_timer(&s.steps[0], action, c, send, Some(p), Some(st));
        assert_eq!(
            skip(&pending, state, 1),
            OnTimer::Skip(TimerSkip::Superseded)
        );
        let answered = Pending {
            status: CommandStatus::Succeeded,
            ..pending.clone()
        };
        assert_eq!(
            skip(&answered, state, 2),
            OnTimer::Skip(TimerSkip::Answered)
        );
        let done = InstanceState {
            status: InstanceStatus::Completed,
            ..state
        };
        assert_eq!(
            skip(&pending, done, 2),
            OnTimer::Skip(TimerSkip::NotCurrent)
        );
        assert_eq!(
            on_timer(&s.steps[0], action, c, 1, None, None),
            OnTimer::Skip(TimerSkip::NotCurrent)
        );
    }

    #[test]
    fn command_status_round_trips() {
        for st in [
            CommandStatus::Waiting,
            CommandStatus::Succeeded,
            CommandStatus::Failed,
            CommandStatus::TimedOut,
            CommandStatus::Cancelled,
        ] {
            assert_eq!(CommandStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(CommandStatus::parse("x"), None);
    }
}
