//! The participant's rules, as pure functions: whether a message is stale, how a
//! message ended, and the reply that says so.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::wire::{Reply, ReplyFailure, ReplyOutcome, ServiceMessage, reply_id};

/// What a service last applied for one aggregate: the highest `sequence` and
/// `dispatched_at` among the messages whose handler succeeded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastApplied {
    /// The highest sequence applied, if any message carried one.
    pub sequence: Option<i64>,
    /// The latest dispatch time applied, if any message carried one.
    pub dispatched_at: Option<DateTime<Utc>>,
}

impl LastApplied {
    /// What is last applied once `msg` is.
    pub fn after(self, msg: &ServiceMessage) -> LastApplied {
        let seq = msg.sequence.map(|s| s as i64);
        LastApplied {
            sequence: self.sequence.max(seq),
            dispatched_at: self.dispatched_at.max(msg.dispatched_at),
        }
    }
}

/// Why `msg` is older than what its aggregate last applied, or `None` when it is not.
///
/// By `sequence` when both the message and the aggregate's record have one; else by
/// `dispatched_at` when both have one; else never stale. Equal is not older: a
/// publisher that sends several messages per sequence number or instant keeps them.
pub fn stale(msg: &ServiceMessage, last: &LastApplied) -> Option<String> {
    if let (Some(seq), Some(last_seq)) = (msg.sequence, last.sequence) {
        return ((seq as i64) < last_seq).then(|| {
            format!(
                "stale: sequence {seq} is below {last_seq}, the last applied for aggregate {:?}",
                msg.aggregate_id
            )
        });
    }
    if let (Some(at), Some(last_at)) = (msg.dispatched_at, last.dispatched_at) {
        return (at < last_at).then(|| {
            format!(
                "stale: dispatched_at {} is before {}, the last applied for aggregate {:?}",
                at.to_rfc3339(),
                last_at.to_rfc3339(),
                msg.aggregate_id
            )
        });
    }
    None
}

/// How a message ended at the service: what its processed-messages row records.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The handler's transaction committed with these outputs.
    Succeeded(Map<String, Value>),
    /// The handler refused it (a business rule, or a fatal database error).
    Fatal(String),
    /// Retryable failures on every try the policy allows; also dead-lettered.
    Exhausted(String),
    /// Older than the last applied message of its aggregate: discarded unrun.
    Stale(String),
}

impl Outcome {
    /// The `outcome` column's spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Succeeded(_) => "succeeded",
            Outcome::Fatal(_) => "fatal",
            Outcome::Exhausted(_) => "exhausted",
            Outcome::Stale(_) => "stale",
        }
    }

    /// Why it did not succeed.
    pub fn error(&self) -> Option<&str> {
        match self {
            Outcome::Succeeded(_) => None,
            Outcome::Fatal(e) | Outcome::Exhausted(e) | Outcome::Stale(e) => Some(e),
        }
    }

    /// What the reply says. A stale command is answered `failed`/`fatal`: it will
    /// never be applied (a newer message of its aggregate was), every copy of it is
    /// discarded the same way, so the saga waiting for it learns at once rather than
    /// through reply timeouts and re-sends that can only end the same.
    pub fn reply_outcome(&self) -> ReplyOutcome {
        match self {
            Outcome::Succeeded(outputs) => ReplyOutcome::Succeeded {
                outputs: outputs.clone(),
            },
            Outcome::Fatal(e) | Outcome::Stale(e) => ReplyOutcome::Failed {
                kind: ReplyFailure::Fatal,
                error: e.clone(),
            },
            Outcome::Exhausted(e) => ReplyOutcome::Failed {
                kind: ReplyFailure::Exhausted,
                error: e.clone(),
            },
        }
    }
}

/// The reply `service` sends for `msg` ending with `outcome`: `None` for a plain
/// event (no `reply_to`).
pub fn reply(service: &str, msg: &ServiceMessage, outcome: &Outcome) -> Option<Reply> {
    let reply_to = msg.reply_to.clone()?;
    Some(Reply {
        message_id: reply_id(msg.message_id),
        in_reply_to: msg.message_id,
        service: service.to_string(),
        aggregate_id: msg.aggregate_id.clone(),
        reply_to,
        outcome: outcome.reply_outcome(),
        // Passed on as received; the consumer stamps its own span's when it exports.
        traceparent: msg.traceparent.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::participant::wire::ReplyTo;
    use crate::saga::coordinator::Cursor;
    use uuid::Uuid;

    fn msg(sequence: Option<u64>, dispatched_at: Option<&str>) -> ServiceMessage {
        ServiceMessage {
            message_id: Uuid::new_v4(),
            kind: "reserve_stock".into(),
            aggregate_id: "order-1".into(),
            sequence,
            dispatched_at: dispatched_at.map(|t| t.parse().unwrap()),
            payload: Map::new(),
            reply_to: None,
            errors: vec![],
            traceparent: None,
        }
    }

    #[test]
    fn staleness_is_by_sequence_else_dispatch_time() {
        let last = LastApplied::default()
            .after(&msg(Some(5), Some("2026-01-01T00:00:10Z")))
            .after(&msg(Some(3), None));
        assert_eq!(last.sequence, Some(5), "the highest, not the latest");
        assert!(
            stale(&msg(Some(4), None), &last)
                .unwrap()
                .contains("sequence 4 is below 5")
        );
        assert_eq!(
            stale(&msg(Some(5), None), &last),
            None,
            "equal is not older"
        );
        assert_eq!(stale(&msg(Some(6), None), &last), None);
        // The sequence decides when both have one, even against the dispatch time.
        assert_eq!(
            stale(&msg(Some(6), Some("2020-01-01T00:00:00Z")), &last),
            None
        );
        assert!(
            stale(&msg(None, Some("2026-01-01T00:00:09Z")), &last)
                .unwrap()
                .contains("dispatched_at")
        );
        assert_eq!(stale(&msg(None, Some("2026-01-01T00:00:10Z")), &last), None);
        assert_eq!(stale(&msg(None, None), &last), None, "nothing to compare");
        assert_eq!(stale(&msg(Some(0), None), &LastApplied::default()), None);
    }

    #[test]
    fn a_command_gets_a_reply_with_its_ids_and_an_event_none() {
        let mut command = msg(None, None);
        command.reply_to = Some(ReplyTo {
            saga: "order_checkout".into(),
            saga_version: 1,
            instance_id: Uuid::new_v4(),
            cursor: Cursor::START,
        });
        let mut outputs = Map::new();
        outputs.insert("reservation_id".into(), Value::from("r-1"));
        let r = reply("stock", &command, &Outcome::Succeeded(outputs.clone())).unwrap();
        assert_eq!(r.message_id, reply_id(command.message_id));
        assert_eq!(r.in_reply_to, command.message_id);
        assert_eq!(r.reply_to, command.reply_to.clone().unwrap());
        assert_eq!(
            (r.service.as_str(), r.aggregate_id.as_str()),
            ("stock", "order-1")
        );
        assert_eq!(r.outcome, ReplyOutcome::Succeeded { outputs });

        let failed = |o: Outcome| reply("stock", &command, &o).unwrap().outcome;
        assert_eq!(
            failed(Outcome::Exhausted("db".into())),
            ReplyOutcome::Failed {
                kind: ReplyFailure::Exhausted,
                error: "db".into()
            }
        );
        assert_eq!(
            failed(Outcome::Stale("stale: x".into())),
            ReplyOutcome::Failed {
                kind: ReplyFailure::Fatal,
                error: "stale: x".into()
            }
        );
        assert_eq!(
            reply("stock", &msg(None, None), &Outcome::Fatal("no".into())),
            None
        );
    }
}
