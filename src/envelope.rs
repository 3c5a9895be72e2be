//! The message envelope: the JSON body of every message skald consumes.
//!
//! Other services start sagas by publishing a *start* envelope; skald publishes *run*
//! envelopes to itself to move an instance from one step to the next. Reading a raw
//! body either yields an [`Envelope`] or a [`Malformed`] reason — never a retry: a body
//! that cannot be read today cannot be read tomorrow either (promise 6).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::participant::wire::ServiceMessage;
use crate::saga::coordinator::{Cursor, FailureKind, Phase};
use crate::transport::{Endpoint, Outbound, Transport, TransportError};

/// Bodies above this many bytes are malformed without being parsed (1 MiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// The longest aggregate id, in bytes: it is the broker's routing key, which AMQP
/// caps at 255 bytes.
pub const MAX_AGGREGATE_ID_BYTES: usize = 255;

/// One message, as it travels on the wire.
///
/// ```
/// use skald::envelope::{Command, Envelope};
/// let body = br#"{"message_id":"6f1c2a4e-0000-4000-8000-000000000001",
///                 "saga":"order_checkout","aggregate_id":"order-1",
///                 "payload":{"order_id":"order-1"}}"#;
/// let env = Envelope::parse(body).unwrap();
/// assert_eq!(env.command, Command::Start);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Unique per message; a redelivered or re-sent copy keeps it. Deduplication keys on it.
    pub message_id: Uuid,
    /// The saga this message belongs to.
    pub saga: String,
    /// The saga version the message is for. A start may name one (else it runs the
    /// newest loaded version); a run message names the version its instance started
    /// with. A version that is not loaded makes the message malformed
    /// (`unknown_version`): it is never run with another version's steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saga_version: Option<u32>,
    /// The aggregate (order, account...) the message is about. Optional on a start:
    /// then it is read from the payload where the saga's `aggregate` says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aggregate_id: Option<String>,
    /// The publisher's per-aggregate sequence number, if it keeps one (>= 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// When the publisher sent it (RFC 3339), if it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<DateTime<Utc>>,
    /// What the message asks for; a start when absent.
    #[serde(default)]
    pub command: Command,
    /// The saga's input (a JSON object). Run messages carry the instance's copy too.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub payload: Value,
    /// On run messages: the outputs of the steps so far, keyed by step name, as
    /// committed when this message was decided. The step binds its parameters from
    /// here and from `payload`, so it need not read the instance first.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub outputs: Value,
    /// Every failed attempt of this instance so far, oldest first: the error history
    /// travels with the message (and is in PostgreSQL too, one inbox row per attempt).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<AttemptError>,
    /// On run messages of a saga with a `timeout_ms`: past this instant the instance
    /// goes no further forward and compensates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<DateTime<Utc>>,
    /// The W3C trace context of the span that sent it
    /// (`00-<trace-id>-<parent-id>-<flags>`): the attempt it starts joins that trace. A
    /// value that is not a valid traceparent (of any JSON type) is ignored with a
    /// warning when the message is read; it never makes the message malformed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "any_as_text"
    )]
    pub traceparent: Option<String>,
}

/// One failed attempt, as carried in a message's error history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttemptError {
    /// The step's name.
    pub step: String,
    /// Action or compensation.
    pub phase: Phase,
    /// Which try failed (1 for the first).
    pub attempt: u32,
    /// When it failed.
    pub at: DateTime<Utc>,
    /// Whether it could be retried.
    pub kind: FailureKind,
    /// What went wrong.
    pub message: String,
}

/// A message to publish once the transaction that decided it has committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    /// What to send.
    pub envelope: Envelope,
    /// Hold it back this long first (a retry's backoff); 0 sends at once.
    #[serde(default)]
    pub delay_ms: u64,
    /// Send it to the dead-letter queue (with this reason) instead of the intake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_letter: Option<DeadLetterNote>,
    /// A command step's command: sent to its participant service (under the
    /// aggregate id, at once) instead of `envelope`, which is then the run message the
    /// command was sent for, kept for its context. Stored with the rest in the inbox,
    /// so a copy of the message that sent it sends the very same command again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<ServiceCommand>,
}

/// A command on its way to a participant service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceCommand {
    /// The service ([`Endpoint::Service`]).
    pub service: String,
    /// The message, exactly as every send sends it (same id, same `dispatched_at`).
    pub message: ServiceMessage,
}

/// Why a message is dead-lettered, as attached to it in the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterNote {
    /// A short stable code (`malformed`, `exhausted`, `compensation_failed`...).
    pub code: String,
    /// A sentence for a person.
    pub reason: String,
}

/// The key a body without an aggregate id is published under (a malformed body
/// replayed by a person): it lands in some partition.
pub const UNROUTED_KEY: &str = "unrouted";

impl Outgoing {
    /// A message for skald's intake, sent `delay_ms` from now.
    pub fn to_intake(envelope: Envelope, delay_ms: u64) -> Self {
        Outgoing {
            envelope,
            delay_ms,
            dead_letter: None,
            command: None,
        }
    }

    /// `message` for participant `service`, sent at once; `context` is the run message
    /// it was sent for.
    pub fn to_service(service: &str, message: ServiceMessage, context: Envelope) -> Self {
        Outgoing {
            command: Some(ServiceCommand {
                service: service.to_string(),
                message,
            }),
            ..Outgoing::to_intake(context, 0)
        }
    }

    /// Sends it: a command to its service's intake; to the dead-letter queue when it
    /// carries a [`DeadLetterNote`]; else to skald's intake under its aggregate id (after
    /// its delay). Returns once confirmed.
    pub async fn send(&self, transport: &dyn Transport) -> Result<(), TransportError> {
        self.outbound().send(transport).await
    }

    /// Where and what [`Outgoing::send`] sends, as the transport sees it.
    pub fn outbound(&self) -> Outbound {
        if let Some(command) = &self.command {
            return Outbound::Endpoint {
                to: Endpoint::Service(command.service.clone()),
                key: command.message.aggregate_id.clone(),
                body: command.message.to_body(),
            };
        }
        let body = self.envelope.to_body();
        match &self.dead_letter {
            Some(note) => Outbound::DeadLetter {
                body,
                reason_code: note.code.clone(),
                reason: note.reason.clone(),
            },
            None => Outbound::Intake {
                key: self
                    .envelope
                    .aggregate_id
                    .as_deref()
                    .unwrap_or(UNROUTED_KEY)
                    .to_string(),
                body,
                delay_ms: self.delay_ms,
            },
        }
    }
}

/// What an envelope asks skald to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Create an instance (id derived from the message id) and run its first step.
    #[default]
    Start,
    /// Run the instance's step/compensation at `cursor`; sent by skald itself.
    Run {
        /// The instance to advance.
        instance_id: Uuid,
        /// What to run.
        cursor: Cursor,
    },
    /// A command step's reply timer, sent by skald to itself delayed by the command's
    /// `timeout_ms` when it sends the command for the `send`-th time: if the instance
    /// still waits for that command's reply when it arrives, the command is sent again
    /// (or, past the retry policy's attempts, the step fails).
    Timer {
        /// The waiting instance.
        instance_id: Uuid,
        /// The step, phase and attempt whose command it times.
        cursor: Cursor,
        /// Which send of the command it times (1 for the first).
        send: u32,
    },
}

impl Command {
    /// The instance and cursor a run or timer message is about; `None` for a start.
    pub fn target(self) -> Option<(Uuid, Cursor)> {
        match self {
            Command::Start => None,
            Command::Run {
                instance_id,
                cursor,
            }
            | Command::Timer {
                instance_id,
                cursor,
                ..
            } => Some((instance_id, cursor)),
        }
    }
}

/// Why a body is not a usable envelope. Each reason sends the message to the
/// dead-letter queue as it is, with this reason attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The body was empty.
    #[error("empty body")]
    Empty,
    /// The body exceeded [`MAX_BODY_BYTES`].
    #[error("body of {0} bytes is over the {MAX_BODY_BYTES}-byte limit")]
    TooLarge(usize),
    /// The body is not UTF-8.
    #[error("body is not valid UTF-8: {0}")]
    NotUtf8(String),
    /// Not JSON, or JSON of the wrong shape or types.
    #[error("not a valid envelope: {0}")]
    Invalid(String),
    /// A JSON object repeats a key, which serde would silently resolve.
    #[error("duplicate key {0:?} in JSON object")]
    DuplicateKey(String),
    /// No saga of that name is loaded.
    #[error("unknown saga {0:?}")]
    UnknownSaga(String),
    /// The saga is loaded, but not in the version the message names.
    #[error("saga {saga:?} version {wanted} is not loaded (loaded: {})", version_list(.loaded))]
    UnknownVersion {
        /// The saga.
        saga: String,
        /// The version the message asked for.
        wanted: u32,
        /// The versions that are loaded, ascending.
        loaded: Vec<u32>,
        /// The instance, when the message is a run message: it is then readable but
        /// unprocessable here, and recorded with its instance.
        instance: Option<Uuid>,
    },
    /// A start without `aggregate_id` whose payload lacks the saga's aggregate field.
    #[error("no aggregate id: envelope has none and payload has no {0}")]
    NoAggregate(String),
    /// A start payload that is not a JSON object.
    #[error("payload of a start must be a JSON object")]
    PayloadNotObject,
    /// The aggregate id is empty or longer than [`MAX_AGGREGATE_ID_BYTES`].
    #[error("aggregate id must be 1 to {MAX_AGGREGATE_ID_BYTES} bytes, got {0}")]
    BadAggregate(usize),
    /// A string holds NUL (`\u0000`), which PostgreSQL cannot store in text or jsonb;
    /// where (`payload.note`).
    #[error("{0} contains a NUL character (\\u0000), which PostgreSQL cannot store")]
    NulCharacter(String),
}

/// `1, 2, 3`.
pub fn version_list(versions: &[u32]) -> String {
    versions
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl Malformed {
    /// A short stable code for counting and filtering dead letters by reason.
    pub fn code(&self) -> &'static str {
        match self {
            Malformed::Empty => "empty",
            Malformed::TooLarge(_) => "too_large",
            Malformed::NotUtf8(_) => "not_utf8",
            Malformed::Invalid(_) => "invalid",
            Malformed::DuplicateKey(_) => "duplicate_key",
            Malformed::UnknownSaga(_) => "unknown_saga",
            Malformed::UnknownVersion { .. } => "unknown_version",
            Malformed::NoAggregate(_) => "no_aggregate",
            Malformed::PayloadNotObject => "payload_not_object",
            Malformed::BadAggregate(_) => "bad_aggregate",
            Malformed::NulCharacter(_) => "nul_character",
        }
    }
}

impl Envelope {
    /// A start of `saga` with `payload`, dispatched now, under a fresh message id; set
    /// `message_id`, `sequence` or `aggregate_id` with struct update syntax.
    pub fn start(saga: &str, aggregate_id: Option<String>, payload: Value) -> Envelope {
        Envelope {
            message_id: Uuid::new_v4(),
            saga: saga.to_string(),
            saga_version: None,
            aggregate_id,
            sequence: None,
            dispatched_at: Some(Utc::now()),
            command: Command::Start,
            payload,
            outputs: Value::Null,
            errors: Vec::new(),
            deadline: None,
            traceparent: None,
        }
    }

    /// The run message that moves `instance_id` of `saga` (in the version it started
    /// with, `saga_version`) on `aggregate_id` to `cursor`, dispatched now, with its
    /// deterministic id ([`run_message_id`]). It carries the start `payload`; set
    /// `outputs`, `errors` and `deadline` with struct update syntax.
    pub fn run(
        saga: &str,
        saga_version: u32,
        aggregate_id: &str,
        instance_id: Uuid,
        cursor: Cursor,
        payload: Value,
    ) -> Envelope {
        Envelope {
            message_id: run_message_id(instance_id, cursor),
            saga: saga.to_string(),
            saga_version: Some(saga_version),
            aggregate_id: Some(aggregate_id.to_string()),
            sequence: None,
            dispatched_at: Some(Utc::now()),
            command: Command::Run {
                instance_id,
                cursor,
            },
            payload,
            outputs: Value::Object(Default::default()),
            errors: Vec::new(),
            deadline: None,
            traceparent: None,
        }
    }

    /// Reads a raw body: size, UTF-8, duplicate keys, then the envelope's shape.
    pub fn parse(body: &[u8]) -> Result<Envelope, Malformed> {
        if body.is_empty() {
            return Err(Malformed::Empty);
        }
        if body.len() > MAX_BODY_BYTES {
            return Err(Malformed::TooLarge(body.len()));
        }
        let text = std::str::from_utf8(body).map_err(|e| Malformed::NotUtf8(e.to_string()))?;
        reject_duplicate_keys(text)?;
        let mut env: Envelope =
            serde_json::from_str(text).map_err(|e| Malformed::Invalid(e.to_string()))?;
        env.check()?;
        env.traceparent = crate::telemetry::checked_traceparent(env.traceparent, env.message_id);
        Ok(env)
    }

    /// The checks on content that every start must pass wherever it comes from (the
    /// queue, the API, the CLI): a start's payload is an object, the aggregate id (when
    /// given) is 1 to [`MAX_AGGREGATE_ID_BYTES`] bytes, and no string holds NUL — data
    /// PostgreSQL cannot store would otherwise fail every attempt to record it.
    pub fn check(&self) -> Result<(), Malformed> {
        if self.command == Command::Start && !self.payload.is_object() {
            return Err(Malformed::PayloadNotObject);
        }
        if let Some(id) = &self.aggregate_id {
            check_aggregate_id(id)?;
        }
        // Sequences are stored as PostgreSQL bigints: a larger one would wrap.
        if let Some(seq) = self.sequence
            && seq > i64::MAX as u64
        {
            return Err(Malformed::Invalid(format!(
                "sequence {seq} is over {}",
                i64::MAX
            )));
        }
        if self.saga.contains('\0') {
            return Err(Malformed::NulCharacter("saga".into()));
        }
        for (field, value) in [("payload", &self.payload), ("outputs", &self.outputs)] {
            if let Some(path) = nul_path(value, field) {
                return Err(Malformed::NulCharacter(path));
            }
        }
        Ok(())
    }

    /// What orders this start among its aggregate's starts: its `sequence`, or, for a
    /// publisher that keeps none, its `dispatched_at` in microseconds. `None`: never
    /// stale.
    pub fn order_key(&self) -> Option<u64> {
        self.sequence.or_else(|| {
            self.dispatched_at
                .and_then(|t| u64::try_from(t.timestamp_micros()).ok())
        })
    }

    /// The JSON body to publish.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serialises")
    }
}

/// Reads any JSON value as text: a string as it is, `null` as absent, anything else as
/// its JSON text — so that a field checked later (a `traceparent`) cannot make the whole
/// message unreadable by its type.
pub(crate) fn any_as_text<'de, D: serde::Deserializer<'de>>(
    de: D,
) -> Result<Option<String>, D::Error> {
    Ok(match Value::deserialize(de)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

/// An aggregate id is 1 to [`MAX_AGGREGATE_ID_BYTES`] bytes without NUL.
pub fn check_aggregate_id(id: &str) -> Result<(), Malformed> {
    if id.is_empty() || id.len() > MAX_AGGREGATE_ID_BYTES {
        return Err(Malformed::BadAggregate(id.len()));
    }
    if id.contains('\0') {
        return Err(Malformed::NulCharacter("aggregate_id".into()));
    }
    Ok(())
}

/// The path (`at.b[2]`, or `.` for `value` itself when `at` is empty) of the first
/// string or object key in `value` holding a NUL character, which PostgreSQL cannot
/// store in text or jsonb; `None` when there is none.
pub fn nul_path(value: &Value, at: &str) -> Option<String> {
    let here = || if at.is_empty() { ".".into() } else { at.into() };
    match value {
        Value::String(s) if s.contains('\0') => Some(here()),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, v)| nul_path(v, &format!("{at}[{i}]"))),
        Value::Object(map) => map.iter().find_map(|(k, v)| {
            let path = if at.is_empty() {
                k.clone()
            } else {
                format!("{at}.{k}")
            };
            if k.contains('\0') {
                Some(path.replace('\0', "\\0"))
            } else {
                nul_path(v, &path)
            }
        }),
        _ => None,
    }
}

/// Walks the JSON once more to find repeated keys in any object. serde_json keeps the
/// last value of a repeated key, which would let two readers of one message disagree.
pub(crate) fn reject_duplicate_keys(text: &str) -> Result<(), Malformed> {
    use serde::de::{Deserializer, MapAccess, SeqAccess, Visitor};
    use std::collections::HashSet;
    use std::fmt;

    struct Check;
    impl<'de> Visitor<'de> for Check {
        type Value = Result<(), Malformed>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            // Keep reading to the end so that the parser's own checks still run.
            let mut seen = HashSet::new();
            let mut verdict = Ok(());
            while let Some(key) = map.next_key::<String>()? {
                let inner = map.next_value_seed(Seed)?;
                if verdict.is_ok() {
                    verdict = if seen.insert(key.clone()) {
                        inner
                    } else {
                        Err(Malformed::DuplicateKey(key))
                    };
                }
            }
            Ok(verdict)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut verdict = Ok(());
            while let Some(inner) = seq.next_element_seed(Seed)? {
                verdict = verdict.and(inner);
            }
            Ok(verdict)
        }
        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok(Ok(()))
        }
        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok(Ok(()))
        }
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok(Ok(()))
        }
        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok(Ok(()))
        }
        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok(Ok(()))
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(Ok(()))
        }
    }
    struct Seed;
    impl<'de> serde::de::DeserializeSeed<'de> for Seed {
        type Value = Result<(), Malformed>;
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(Check)
        }
    }

    let mut de = serde_json::Deserializer::from_str(text);
    match de.deserialize_any(Check) {
        Ok(result) => result,
        Err(e) => Err(Malformed::Invalid(e.to_string())),
    }
}

/// The message id of the run message that moves `instance_id` to `cursor`.
///
/// Deterministic, so that re-sending after a crash produces the same id and the
/// receiver's inbox recognises the copy.
pub fn run_message_id(instance_id: Uuid, cursor: Cursor) -> Uuid {
    cursor_id(instance_id, "run", cursor)
}

/// A deterministic id of `kind` (`run`, `command`) for `cursor` of `instance_id`: a
/// UUID v5 under the instance of `<kind>/<step>/<phase>/<attempt>`.
pub fn cursor_id(instance_id: Uuid, kind: &str, cursor: Cursor) -> Uuid {
    let name = format!(
        "{kind}/{}/{}/{}",
        cursor.step,
        cursor.phase.as_str(),
        cursor.attempt
    );
    Uuid::new_v5(&instance_id, name.as_bytes())
}

/// The deterministic id of the reply timer of `cursor`'s command for its `send`-th
/// send: a re-sent timer (a copy after a crash) is recognised by the inbox.
pub fn timer_message_id(instance_id: Uuid, cursor: Cursor, send: u32) -> Uuid {
    // Its run message's id names the cursor; the send number makes each timer distinct.
    Uuid::new_v5(
        &run_message_id(instance_id, cursor),
        format!("timer/{send}").as_bytes(),
    )
}

/// The instance a start message creates: derived from the message id, so the same
/// start message (however often delivered) always names the same instance.
pub fn instance_id_for(start_message_id: Uuid) -> Uuid {
    Uuid::new_v5(&start_message_id, b"instance")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "6f1c2a4e-0000-4000-8000-000000000001";
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn start(extra: &str) -> String {
        format!(r#"{{"message_id":"{ID}","saga":"s","payload":{{"a":1}}{extra}}}"#)
    }

    #[test]
    fn a_minimal_start_parses_and_round_trips() {
        let env = Envelope::parse(start("").as_bytes()).unwrap();
        assert_eq!(env.command, Command::Start);
        assert_eq!(env.aggregate_id, None);
        assert_eq!(Envelope::parse(&env.to_body()).unwrap(), env);
    }

    #[test]
    fn a_run_message_round_trips() {
        let env = Envelope {
            message_id: Uuid::new_v4(),
            saga: "s".into(),
            saga_version: None,
            aggregate_id: Some("a".into()),
            sequence: Some(3),
            dispatched_at: None,
            command: Command::Run {
                instance_id: Uuid::new_v4(),
                cursor: Cursor {
                    step: 2,
                    phase: Phase::Compensate,
                    attempt: 4,
                },
            },
            payload: serde_json::json!({"a": 1}),
            outputs: serde_json::json!({"s": {"c": 2}}),
            errors: vec![AttemptError {
                step: "s".into(),
                phase: Phase::Forward,
                attempt: 1,
                at: Utc::now(),
                kind: FailureKind::Retryable,
                message: "boom".into(),
            }],
            deadline: Some(Utc::now()),
            traceparent: Some(TP.into()),
        };
        assert_eq!(Envelope::parse(&env.to_body()).unwrap(), env);
    }

    #[test]
    fn unreadable_bodies_are_malformed_with_their_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![], "empty"),
            (vec![b' '; MAX_BODY_BYTES + 1], "too_large"),
            (vec![0xff, 0xfe, b'{'], "not_utf8"),
            (b"not json".to_vec(), "invalid"),
            (b"[1,2]".to_vec(), "invalid"),
            (start(r#","message_id":"x""#).into_bytes(), "duplicate_key"),
            (br#"{"saga":"s","payload":{}}"#.to_vec(), "invalid"),
            (start(r#","sequence":-1"#).into_bytes(), "invalid"),
            (start(r#","unknown":1"#).into_bytes(), "invalid"),
            (
                format!(r#"{{"message_id":"{ID}","saga":"s","payload":[1]}}"#).into_bytes(),
                "payload_not_object",
            ),
            (
                br#"{"message_id":"not-a-uuid","saga":"s","payload":{}}"#.to_vec(),
                "invalid",
            ),
            (start(r#","aggregate_id":"""#).into_bytes(), "bad_aggregate"),
            (
                start(r#","sequence":9223372036854775808"#).into_bytes(),
                "invalid",
            ),
            (
                start(&format!(r#","aggregate_id":"{}""#, "a".repeat(256))).into_bytes(),
                "bad_aggregate",
            ),
            (
                start(r#","aggregate_id":"a\u0000b""#).into_bytes(),
                "nul_character",
            ),
            (
                format!(r#"{{"message_id":"{ID}","saga":"s","payload":{{"a":["x\u0000"]}}}}"#)
                    .into_bytes(),
                "nul_character",
            ),
            (
                format!(r#"{{"message_id":"{ID}","saga":"s","payload":{{"k\u0000":1}}}}"#)
                    .into_bytes(),
                "nul_character",
            ),
        ];
        for (body, code) in cases {
            let err = Envelope::parse(&body).unwrap_err();
            assert_eq!(err.code(), code, "{err}");
        }
    }

    #[test]
    fn a_valid_traceparent_is_kept_and_a_malformed_one_ignored() {
        let env = Envelope::parse(start(&format!(r#","traceparent":"{TP}""#)).as_bytes()).unwrap();
        assert_eq!(env.traceparent.as_deref(), Some(TP));
        assert!(String::from_utf8(env.to_body()).unwrap().contains(TP));
        for bad in [
            r#""garbage""#,
            r#""00-00000000000000000000000000000000-00f067aa0ba902b7-01""#,
            r#""a\u0000b""#,
            "42",
            "[1]",
            r#"{"a":1}"#,
            "true",
            "null",
        ] {
            let env = Envelope::parse(start(&format!(r#","traceparent":{bad}"#)).as_bytes())
                .unwrap_or_else(|e| panic!("{bad}: {e}"));
            assert_eq!(env.traceparent, None, "{bad}");
            assert!(
                !String::from_utf8(env.to_body())
                    .unwrap()
                    .contains("traceparent")
            );
        }
        // Still one key: a repeated traceparent is a repeated key like any other.
        let twice = start(&format!(r#","traceparent":"{TP}","traceparent":"{TP}""#));
        assert_eq!(
            Envelope::parse(twice.as_bytes()).unwrap_err().code(),
            "duplicate_key"
        );
    }

    #[test]
    fn nul_characters_are_found_with_their_path() {
        let v = serde_json::json!({"a": {"b": ["x", "y\u{0}"]}, "c": 1});
        assert_eq!(nul_path(&v, "").as_deref(), Some("a.b[1]"));
        let key = serde_json::json!({"k\u{0}": 1});
        assert_eq!(nul_path(&key, "").as_deref(), Some("k\\0"));
        assert_eq!(nul_path(&serde_json::json!({"a": "fine"}), ""), None);
    }

    #[test]
    fn an_escaped_backslash_before_u0000_is_not_nul() {
        let body = start(r#","aggregate_id":"a\\u0000""#);
        let env = Envelope::parse(body.as_bytes()).unwrap();
        assert_eq!(env.aggregate_id.as_deref(), Some("a\\u0000"));
        assert!(
            Envelope::parse(start(&format!(r#","aggregate_id":"{}""#, "a".repeat(255))).as_bytes())
                .is_ok()
        );
    }

    #[test]
    fn the_order_key_is_the_sequence_else_the_dispatch_time() {
        let mut env = Envelope::parse(start(r#","sequence":7"#).as_bytes()).unwrap();
        assert_eq!(env.order_key(), Some(7));
        env.sequence = None;
        assert_eq!(env.order_key(), None);
        env.dispatched_at = Some("2026-01-01T00:00:00.000001Z".parse().unwrap());
        assert_eq!(env.order_key(), Some(1_767_225_600_000_001));
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let instance = Uuid::new_v4();
        let a = run_message_id(instance, Cursor::START);
        assert_eq!(a, run_message_id(instance, Cursor::START));
        let retry = Cursor {
            attempt: 2,
            ..Cursor::START
        };
        assert_ne!(a, run_message_id(instance, retry));
        assert_eq!(instance_id_for(a), instance_id_for(a));
        assert_ne!(instance_id_for(a), a);
    }

    #[tokio::test]
    async fn a_command_goes_to_its_service_and_survives_the_inbox_round_trip() {
        use crate::transport::memory::MemoryTransport;
        let context = Envelope::run(
            "s",
            1,
            "k",
            Uuid::nil(),
            Cursor::START,
            serde_json::json!({}),
        );
        let message = ServiceMessage {
            message_id: Uuid::nil(),
            kind: "reserve_stock".into(),
            aggregate_id: "k".into(),
            sequence: None,
            dispatched_at: Some(Utc::now()),
            payload: Default::default(),
            reply_to: None,
            errors: Vec::new(),
            traceparent: Some(TP.into()),
        };
        let out = Outgoing::to_service("stock", message.clone(), context);
        // As stored in the inbox's `outgoing` and read back for a copy.
        let stored: Outgoing = serde_json::from_value(serde_json::to_value(&out).unwrap()).unwrap();
        assert_eq!(stored, out);
        let skald = MemoryTransport::new();
        stored.send(&skald).await.unwrap();
        assert!(skald.next().is_none(), "nothing reaches skald's intake");
        let stock = skald.endpoint(&Endpoint::Service("stock".into()));
        let got = stock.next().expect("the command reached its service");
        assert_eq!(ServiceMessage::parse(&got.body).unwrap(), message);
    }
}
