//! Operator actions on dead letters — replay (optionally with an edited payload) and
//! discard — shared by the CLI and the dashboard API.
//!
//! Both are recorded on the dead letter (who, when, what changed) and idempotent:
//! - a replay marks the letter `replayed` and records the message it sends in the
//!   same transaction, then sends it. Replaying again sends *that same message* again
//!   (same id), which the inbox drops if the first copy arrived — so a crash between
//!   commit and send is repaired by replaying again, and a saga never runs twice;
//! - discarding a letter that is not pending changes nothing.
//!
//! Replaying a parked instance moves it back to life at the step (or compensation)
//! that failed, as a new attempt; replaying a malformed or unprocessable message
//! publishes its (edited) body to the intake again.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::envelope::{Envelope, Outgoing, UNROUTED_KEY, nul_path};
use crate::saga::decide;
use crate::store::dead_letters::{self, DeadLetterKind, DeadLetterStatus};
use crate::store::{Store, StoreError, lock_instance, resume_instance};
use crate::transport::{Transport, TransportError};

/// Why an operator action was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// No dead letter has this id.
    #[error("no dead letter {0}")]
    NotFound(Uuid),
    /// The dead letter was discarded; it cannot be replayed.
    #[error("dead letter {0} was discarded")]
    Discarded(Uuid),
    /// The parked instance is no longer parked (someone resumed it otherwise).
    #[error("instance {0} is {1}, not failed: nothing to replay")]
    NotParked(Uuid, &'static str),
    /// `--data` cannot be applied to this dead letter.
    #[error("cannot edit the payload: {0}")]
    BadPayload(String),
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker failed (the replay is recorded; replay again to send it).
    #[error(transparent)]
    Transport(#[from] TransportError),
}

impl From<sqlx::Error> for DlqError {
    fn from(e: sqlx::Error) -> Self {
        DlqError::Store(StoreError::Database(e))
    }
}

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// The letter was pending; it is now replayed and its message sent.
    Replayed,
    /// It had been replayed before (by, at); its message was sent again, and will be
    /// dropped as a copy if the first one arrived.
    AlreadyReplayed {
        /// Who replayed it first.
        by: Option<String>,
        /// When.
        at: Option<DateTime<Utc>>,
    },
}

enum Send {
    Message(Box<Outgoing>),
    Raw(Vec<u8>),
}

/// Which pending dead letters a bulk replay takes, and how fast it sends them.
#[derive(Debug, Clone)]
pub struct BulkReplay {
    /// Only this kind.
    pub kind: Option<DeadLetterKind>,
    /// Only this saga.
    pub saga: Option<String>,
    /// The oldest this many.
    pub limit: i64,
    /// At most this many replays a second (at least 1).
    pub per_second: u32,
}

/// Replays the oldest pending dead letters matching `what`, oldest first (so one
/// aggregate's letters keep their order), pausing `1 / per_second` between two.
/// Returns the ids replayed, in order.
pub async fn bulk_replay(
    store: &Store,
    transport: &dyn Transport,
    what: &BulkReplay,
    by: &str,
) -> Result<Vec<Uuid>, DlqError> {
    let letters =
        dead_letters::oldest_pending(store.pool(), what.kind, what.saga.as_deref(), what.limit)
            .await?;
    let pause = pace(what.per_second);
    let mut replayed = Vec::with_capacity(letters.len());
    for letter in &letters {
        if !replayed.is_empty() {
            tokio::time::sleep(pause).await;
        }
        replay(store, transport, letter.id, None, by).await?;
        replayed.push(letter.id);
    }
    Ok(replayed)
}

/// The pause between two paced operator actions, at most `per_second` a second (at
/// least 1).
pub fn pace(per_second: u32) -> std::time::Duration {
    std::time::Duration::from_secs_f64(1.0 / f64::from(per_second.max(1)))
}

/// Replays dead letter `id`, with `data` replacing the payload when given.
pub async fn replay(
    store: &Store,
    transport: &dyn Transport,
    id: Uuid,
    data: Option<Value>,
    by: &str,
) -> Result<ReplayOutcome, DlqError> {
    if let Some(d) = &data {
        if !d.is_object() {
            return Err(DlqError::BadPayload(
                "the payload must be a JSON object".into(),
            ));
        }
        // What PostgreSQL could not store is refused here, not by a database error.
        if let Some(path) = nul_path(d, "payload") {
            return Err(DlqError::BadPayload(format!(
                "{path} contains a NUL character (\\u0000), which PostgreSQL cannot store"
            )));
        }
    }
    let mut tx = store.pool().begin().await?;
    let letter = dead_letters::get(&mut *tx, id, true)
        .await?
        .ok_or(DlqError::NotFound(id))?;
    let (send, outcome) = match letter.status {
        DeadLetterStatus::Discarded => return Err(DlqError::Discarded(id)),
        DeadLetterStatus::Replayed => {
            let (message, raw) = dead_letters::replayed_message(&mut *tx, id).await?;
            let send = match (message, raw) {
                (Some(m), _) => Send::Message(Box::new(
                    serde_json::from_value(m)
                        .map_err(|e| StoreError::Corrupt(format!("stored replay: {e}")))?,
                )),
                (None, Some(raw)) => Send::Raw(raw),
                (None, None) => Send::Raw(letter.body.clone()),
            };
            let outcome = ReplayOutcome::AlreadyReplayed {
                by: letter.resolved_by.clone(),
                at: letter.resolved_at,
            };
            (send, outcome)
        }
        DeadLetterStatus::Pending => {
            let resolution = data.as_ref().map(|d| serde_json::json!({ "payload": d }));
            let send = match (letter.kind, letter.instance_id) {
                (
                    DeadLetterKind::Exhausted
                    | DeadLetterKind::CompensationFailed
                    | DeadLetterKind::Orphaned,
                    Some(instance),
                ) => {
                    let message = resume_parked(&mut tx, instance, data).await?;
                    let stored = serde_json::to_value(&message).expect("outgoing serialises");
                    dead_letters::mark_replayed(
                        &mut *tx,
                        id,
                        by,
                        resolution.as_ref(),
                        Some(&stored),
                        None,
                    )
                    .await?;
                    Send::Message(Box::new(message))
                }
                _ => {
                    let body = match &data {
                        None => letter.body.clone(),
                        Some(d) => with_payload(&letter.body, d)?,
                    };
                    dead_letters::mark_replayed(
                        &mut *tx,
                        id,
                        by,
                        resolution.as_ref(),
                        None,
                        Some(&body),
                    )
                    .await?;
                    Send::Raw(body)
                }
            };
            (send, ReplayOutcome::Replayed)
        }
    };
    tx.commit().await?;
    match send {
        Send::Message(m) => m.send(transport).await?,
        // A foreign body goes under its aggregate id, if it names one.
        Send::Raw(body) => {
            let aggregate = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("aggregate_id")?.as_str().map(str::to_string));
            let key = aggregate.as_deref().unwrap_or(UNROUTED_KEY);
            transport.publish(key, &body, 0).await?
        }
    }
    tracing::info!(dead_letter = %id, by, ?outcome, "dead letter replayed");
    Ok(outcome)
}

/// Moves a parked instance back to life at its failed step or compensation, as a new
/// attempt, and returns the message that runs it.
async fn resume_parked(
    tx: &mut sqlx::PgConnection,
    instance: Uuid,
    data: Option<Value>,
) -> Result<Outgoing, DlqError> {
    let snap = lock_instance(tx, instance)
        .await?
        .ok_or(DlqError::NotParked(instance, "missing"))?;
    let state = decide::resume(snap.state)
        .ok_or(DlqError::NotParked(instance, snap.state.status.as_str()))?;
    let payload = data.unwrap_or(snap.payload);
    resume_instance(tx, instance, state, &payload).await?;
    let cursor = state.cursor;
    Ok(Outgoing::to_intake(
        Envelope {
            outputs: snap.outputs,
            deadline: snap.deadline,
            ..Envelope::run(
                &snap.saga,
                snap.saga_version,
                &snap.aggregate_id,
                instance,
                cursor,
                payload,
            )
        },
        0,
    ))
}

/// `body` (a JSON object) with its `payload` replaced by `data`.
fn with_payload(body: &[u8], data: &Value) -> Result<Vec<u8>, DlqError> {
    let mut json: Value = serde_json::from_slice(body)
        .map_err(|e| DlqError::BadPayload(format!("the body is not JSON ({e})")))?;
    let obj = json
        .as_object_mut()
        .ok_or_else(|| DlqError::BadPayload("the body is not a JSON object".into()))?;
    obj.insert("payload".into(), data.clone());
    Ok(serde_json::to_vec(&json).expect("JSON serialises"))
}

/// What a discard did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiscardOutcome {
    /// It was pending and is now discarded.
    Discarded,
    /// It was already resolved this way.
    AlreadyResolved(DeadLetterStatus),
}

impl DiscardOutcome {
    /// The letter's status after the discard: `discarded`, or what it already was.
    pub fn status(&self) -> &'static str {
        match self {
            DiscardOutcome::Discarded => "discarded",
            DiscardOutcome::AlreadyResolved(s) => s.as_str(),
        }
    }
}

/// Sets dead letter `id` aside, recording who and why. A parked instance stays
/// `failed`.
pub async fn discard(
    store: &Store,
    id: Uuid,
    by: &str,
    note: Option<&str>,
) -> Result<DiscardOutcome, DlqError> {
    if dead_letters::mark_discarded(store.pool(), id, by, note).await? {
        tracing::info!(dead_letter = %id, by, "dead letter discarded");
        return Ok(DiscardOutcome::Discarded);
    }
    let letter = dead_letters::get(store.pool(), id, false)
        .await?
        .ok_or(DlqError::NotFound(id))?;
    Ok(DiscardOutcome::AlreadyResolved(letter.status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_edited_payload_replaces_only_the_payload() {
        let body = br#"{"message_id":"x","saga":"s","payload":{"a":1}}"#;
        let edited = with_payload(body, &serde_json::json!({"a": 2})).unwrap();
        let v: Value = serde_json::from_slice(&edited).unwrap();
        assert_eq!(v["payload"]["a"], 2);
        assert_eq!(v["saga"], "s");
        assert!(with_payload(b"not json", &serde_json::json!({})).is_err());
        assert!(with_payload(b"[1]", &serde_json::json!({})).is_err());
    }
}
