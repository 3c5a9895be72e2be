//! The participant protocol on the wire: the message skald (or any publisher) sends a
//! participant service, and the reply a service sends back to skald's intake.
//!
//! Both are JSON objects, documented field by field in README's "Participant protocol",
//! precisely enough for a service written in another language. This file is the one
//! place their shape and their deterministic ids are defined: skald's engine builds
//! [`ServiceMessage`]s and reads [`Reply`]s; the participant library
//! ([`crate::participant`]) reads the former and builds the latter.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::envelope::{
    MAX_BODY_BYTES, Malformed, check_aggregate_id, nul_path, reject_duplicate_keys,
};
use crate::saga::coordinator::{Cursor, FailureKind};

/// A message for a participant service: a command from a saga step (with
/// [`ServiceMessage::reply_to`]) or a plain event (without).
///
/// ```
/// use skald::participant::wire::ServiceMessage;
/// let body = br#"{"message_id":"6f1c2a4e-0000-4000-8000-000000000001",
///                 "type":"reserve_stock","aggregate_id":"order-1",
///                 "payload":{"sku":"SKU-1","qty":2}}"#;
/// let msg = ServiceMessage::parse(body).unwrap();
/// assert_eq!(msg.kind, "reserve_stock");
/// assert!(msg.reply_to.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceMessage {
    /// Unique per message; every copy and every re-send keeps it. The service's
    /// processed-messages table keys on it. For a saga's command it is
    /// [`command_id`]`(instance, cursor)`.
    pub message_id: Uuid,
    /// The command or event type: which handler runs it (`[A-Za-z0-9_.-]`, 1 to 128).
    #[serde(rename = "type")]
    pub kind: String,
    /// The aggregate it is about: the partitioning key, 1 to 255 bytes.
    pub aggregate_id: String,
    /// The publisher's per-aggregate sequence number, if it keeps one: a message whose
    /// sequence is below the last applied one for its aggregate is stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<u64>,
    /// When the publisher first sent it (RFC 3339). Without a `sequence`, a message
    /// dispatched before the last applied one of its aggregate is stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<DateTime<Utc>>,
    /// The command's parameters or the event's data (a JSON object).
    #[serde(default)]
    pub payload: Map<String, Value>,
    /// Where the answer goes: present on a saga's command, absent on a plain event.
    /// The service copies it into its [`Reply`] unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<ReplyTo>,
    /// The service's own failed tries of this message, oldest first, appended by the
    /// participant before each delayed retry (never by the publisher).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ServiceError>,
    /// The W3C trace context of the saga step's attempt that sent it: the service's
    /// handling joins that trace. Optional; a value that is not a valid traceparent is
    /// ignored with a warning, never making the message malformed.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::envelope::any_as_text"
    )]
    pub traceparent: Option<String>,
}

/// Which saga step a command belongs to; opaque to the service, copied into the reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyTo {
    /// The saga's name.
    pub saga: String,
    /// The version the instance runs.
    pub saga_version: u32,
    /// The instance waiting for the answer.
    pub instance_id: Uuid,
    /// The step, phase and attempt that sent the command.
    pub cursor: Cursor,
}

/// One failed try of a message at a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceError {
    /// Which try failed (1 for the first).
    pub attempt: u32,
    /// When it failed.
    pub at: DateTime<Utc>,
    /// What went wrong.
    pub message: String,
}

/// A service's answer to a command, published to skald's intake under the command's
/// aggregate id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    /// [`reply_id`]`(in_reply_to)`: the same for every copy of the answer, so skald's
    /// inbox applies it once.
    pub message_id: Uuid,
    /// The command's `message_id`.
    pub in_reply_to: Uuid,
    /// The service that answers.
    pub service: String,
    /// The command's aggregate id.
    pub aggregate_id: String,
    /// The command's `reply_to`, unchanged.
    pub reply_to: ReplyTo,
    /// How the command ended.
    pub outcome: ReplyOutcome,
    /// The W3C trace context of the service's handling of the command: skald's
    /// handling of the reply joins that trace. Optional, checked like the command's.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::envelope::any_as_text"
    )]
    pub traceparent: Option<String>,
}

/// How a command ended at the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case", deny_unknown_fields)]
pub enum ReplyOutcome {
    /// The handler's transaction committed; `outputs` (a JSON object) become the
    /// step's outputs, referenced by later steps as `steps.<step>.<field>`.
    Succeeded {
        /// The handler's result.
        #[serde(default)]
        outputs: Map<String, Value>,
    },
    /// The command failed for good at the service: `fatal` (a business refusal) or
    /// `exhausted` (retryable failures past the service's retry policy; the service
    /// also dead-lettered it). The saga compensates.
    Failed {
        /// Why it failed.
        kind: ReplyFailure,
        /// What went wrong, for a person.
        error: String,
    },
}

/// Why a command failed at the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyFailure {
    /// The handler refused it (a business rule): no retry can help.
    Fatal,
    /// The handler failed with retryable errors on every try the service's policy allows.
    Exhausted,
}

impl From<ReplyFailure> for FailureKind {
    fn from(_: ReplyFailure) -> FailureKind {
        // Either way the service will not do it: the step failed for good.
        FailureKind::Fatal
    }
}

/// The id of the command a saga step sends for `cursor` of `instance_id`:
/// deterministic, so a re-sent command (after a reply timeout, or a crash before the
/// ack) is recognised by the service as a copy.
pub fn command_id(instance_id: Uuid, cursor: Cursor) -> Uuid {
    crate::envelope::cursor_id(instance_id, "command", cursor)
}

/// The id of the reply to the message `in_reply_to`: every copy of one answer has it.
pub fn reply_id(in_reply_to: Uuid) -> Uuid {
    Uuid::new_v5(&in_reply_to, b"reply")
}

/// The longest message or command type, in bytes.
pub const MAX_TYPE_BYTES: usize = 128;

/// Reads a JSON body of type `T` with the envelope's rules: not empty, at most
/// [`MAX_BODY_BYTES`], UTF-8, no repeated keys, no unknown fields.
fn read<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Malformed> {
    if body.is_empty() {
        return Err(Malformed::Empty);
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(Malformed::TooLarge(body.len()));
    }
    let text = std::str::from_utf8(body).map_err(|e| Malformed::NotUtf8(e.to_string()))?;
    reject_duplicate_keys(text)?;
    serde_json::from_str(text).map_err(|e| Malformed::Invalid(e.to_string()))
}

/// Whether `kind` is a valid message or command type: 1 to [`MAX_TYPE_BYTES`] of
/// `[A-Za-z0-9_.-]` (also what `skald validate` checks of a command step's `type`).
pub fn is_command_type(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= MAX_TYPE_BYTES
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// [`is_command_type`], or why not as a malformed reason.
pub fn check_kind(kind: &str) -> Result<(), Malformed> {
    if is_command_type(kind) {
        Ok(())
    } else {
        Err(Malformed::Invalid(format!(
            "type must be 1 to {MAX_TYPE_BYTES} of [A-Za-z0-9_.-], got {kind:?}"
        )))
    }
}

impl ServiceMessage {
    /// Reads a raw body, or says why it is malformed (the service dead-letters it at
    /// once, never retrying).
    pub fn parse(body: &[u8]) -> Result<ServiceMessage, Malformed> {
        let mut msg: ServiceMessage = read(body)?;
        msg.traceparent = crate::telemetry::checked_traceparent(msg.traceparent, msg.message_id);
        check_kind(&msg.kind)?;
        check_aggregate_id(&msg.aggregate_id)?;
        if let Some(seq) = msg.sequence
            && seq > i64::MAX as u64
        {
            return Err(Malformed::Invalid(format!(
                "sequence {seq} is over {}",
                i64::MAX
            )));
        }
        // Anywhere, not only in the payload: the service stores the whole message
        // (`reply_to`, `errors`) in PostgreSQL, which cannot hold a NUL.
        let whole = serde_json::to_value(&msg).expect("a service message always serialises");
        if let Some(path) = nul_path(&whole, "") {
            return Err(Malformed::NulCharacter(path));
        }
        Ok(msg)
    }

    /// The JSON body to publish.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a service message always serialises")
    }
}

impl Reply {
    /// Reads a raw body from skald's intake as a reply, or says why it is malformed.
    pub fn parse(body: &[u8]) -> Result<Reply, Malformed> {
        let mut reply: Reply = read(body)?;
        reply.traceparent =
            crate::telemetry::checked_traceparent(reply.traceparent, reply.message_id);
        check_aggregate_id(&reply.aggregate_id)?;
        if let ReplyOutcome::Succeeded { outputs } = &reply.outcome
            && let Some(path) = nul_path(&Value::Object(outputs.clone()), "outputs")
        {
            return Err(Malformed::NulCharacter(path));
        }
        Ok(reply)
    }

    /// Whether a body read from skald's intake is a reply (it has `in_reply_to`)
    /// rather than a start or run envelope. Cheap: a substring test, confirmed by
    /// [`Reply::parse`].
    pub fn looks_like(body: &[u8]) -> bool {
        body.windows(b"\"in_reply_to\"".len())
            .any(|w| w == b"\"in_reply_to\"")
    }

    /// The JSON body to publish.
    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a reply always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::saga::coordinator::Phase;

    fn reply_to() -> ReplyTo {
        ReplyTo {
            saga: "order_checkout".into(),
            saga_version: 1,
            instance_id: Uuid::nil(),
            cursor: Cursor::START,
        }
    }

    #[test]
    fn ids_are_deterministic_and_distinct_per_attempt_and_phase() {
        let i = Uuid::new_v4();
        let c = Cursor::START;
        assert_eq!(command_id(i, c), command_id(i, c));
        assert_ne!(command_id(i, c), command_id(i, Cursor { attempt: 2, ..c }));
        assert_ne!(
            command_id(i, c),
            command_id(
                i,
                Cursor {
                    phase: Phase::Compensate,
                    ..c
                }
            )
        );
        assert_ne!(reply_id(command_id(i, c)), command_id(i, c));
    }

    #[test]
    fn a_reply_round_trips_and_is_told_apart_from_an_envelope() {
        let reply = Reply {
            message_id: reply_id(Uuid::nil()),
            in_reply_to: Uuid::nil(),
            service: "stock".into(),
            aggregate_id: "order-1".into(),
            reply_to: reply_to(),
            outcome: ReplyOutcome::Failed {
                kind: ReplyFailure::Fatal,
                error: "out of stock".into(),
            },
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        };
        let body = reply.to_body();
        assert!(Reply::looks_like(&body));
        assert_eq!(Reply::parse(&body).unwrap(), reply);
        assert!(!Reply::looks_like(br#"{"message_id":"x","saga":"s"}"#));
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains(r#""outcome":{"status":"failed","kind":"fatal""#),
            "{text}"
        );
    }

    #[test]
    fn malformed_service_messages_say_why() {
        let id = "6f1c2a4e-0000-4000-8000-000000000001";
        let bad = |body: String| ServiceMessage::parse(body.as_bytes()).unwrap_err();
        assert_eq!(bad(String::new()), Malformed::Empty);
        assert!(matches!(
            bad(format!(r#"{{"message_id":"{id}","type":"a b","aggregate_id":"o"}}"#)),
            Malformed::Invalid(m) if m.contains("type must be")
        ));
        assert_eq!(
            bad(format!(
                r#"{{"message_id":"{id}","type":"t","aggregate_id":""}}"#
            )),
            Malformed::BadAggregate(0)
        );
        assert!(matches!(
            bad(format!(r#"{{"message_id":"{id}","type":"t","aggregate_id":"o","x":1}}"#)),
            Malformed::Invalid(m) if m.contains("unknown field")
        ));
        assert_eq!(
            bad(format!(
                r#"{{"message_id":"{id}","type":"t","aggregate_id":"o","payload":{{"n":"a\u0000"}}}}"#
            )),
            Malformed::NulCharacter("payload.n".into())
        );
        assert_eq!(
            bad(format!(
                r#"{{"message_id":"{id}","type":"t","aggregate_id":"o",
                    "errors":[{{"attempt":1,"at":"2026-01-01T00:00:00Z","message":"\u0000"}}]}}"#
            )),
            Malformed::NulCharacter("errors[0].message".into())
        );
    }
}
