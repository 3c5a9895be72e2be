//! The operator's actions on a service's dead letters (`skald participant
//! dead-letters …`): list, replay, discard. The table
//! `skald_participant.dead_letters` is authoritative; the transport's dead-letter
//! queue holds copies for people browsing the broker.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::wire::ServiceMessage;
use crate::transport::{Endpoint, Transport, TransportError};

/// One dead letter of a service.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct DeadLetter {
    /// Its id (what `replay` and `discard` take).
    pub id: Uuid,
    /// The service it belongs to.
    pub service: String,
    /// `malformed`, `unknown_type` or `exhausted`.
    pub reason_code: String,
    /// Why, for a person.
    pub reason: String,
    /// The message's id, when the body could be read.
    pub message_id: Option<Uuid>,
    /// The message's type, when the body could be read.
    #[sqlx(rename = "type")]
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// The message's aggregate, when the body could be read.
    pub aggregate_id: Option<String>,
    /// The body as set apart: JSON when it is, else a string (lossy UTF-8).
    #[sqlx(try_from = "Vec<u8>")]
    pub body: Body,
    /// Every failed try, oldest first (`exhausted` only): `[{attempt, at, message}]`.
    pub errors: Json<Value>,
    /// `pending`, `replayed` or `discarded`.
    pub status: String,
    /// When it was set apart.
    pub created_at: DateTime<Utc>,
    /// When it was replayed or discarded.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Who replayed or discarded it.
    pub resolved_by: Option<String>,
    /// The note given when discarding.
    pub note: Option<String>,
}

/// A dead letter's body, shown as JSON when it is JSON.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Body(Value);

impl From<Vec<u8>> for Body {
    fn from(bytes: Vec<u8>) -> Self {
        Body(
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
        )
    }
}

/// What an operator action on a dead letter can meet.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    /// No dead letter of the service has this id.
    #[error("no dead letter {0} for this service")]
    NotFound(Uuid),
    /// It was already replayed or discarded.
    #[error("dead letter {id} is {status}, not pending")]
    NotPending {
        /// The letter.
        id: Uuid,
        /// Its status.
        status: String,
    },
    /// The status filter is not one of the statuses.
    #[error("unknown status {0:?}: expected pending, replayed or discarded")]
    BadStatus(String),
    /// The service's database failed.
    #[error("service database: {}", crate::store::error_text(.0))]
    Database(#[from] sqlx::Error),
    /// The broker did not take the replayed message.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

const COLUMNS: &str = "id, service, reason_code, reason, message_id, type, aggregate_id, body, \
                       errors, status, created_at, resolved_at, resolved_by, note";

/// The dead letters of `service`, newest first, optionally only those in `status`.
pub async fn list(
    pool: &PgPool,
    service: &str,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, DeadLetterError> {
    if let Some(s) = status
        && !matches!(s, "pending" | "replayed" | "discarded")
    {
        return Err(DeadLetterError::BadStatus(s.to_string()));
    }
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM skald_participant.dead_letters \
         WHERE service = $1 AND ($2::text IS NULL OR status = $2) \
         ORDER BY created_at DESC, id LIMIT $3"
    )))
    .bind(service)
    .bind(status)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// Locks one pending dead letter of `service`.
async fn pending(
    conn: &mut PgConnection,
    service: &str,
    id: Uuid,
) -> Result<DeadLetter, DeadLetterError> {
    let letter: DeadLetter = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM skald_participant.dead_letters \
         WHERE service = $1 AND id = $2 FOR UPDATE"
    )))
    .bind(service)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(DeadLetterError::NotFound(id))?;
    if letter.status != "pending" {
        return Err(DeadLetterError::NotPending {
            id,
            status: letter.status,
        });
    }
    Ok(letter)
}

/// Marks a dead letter resolved; it as it is now.
async fn resolve(
    conn: &mut PgConnection,
    id: Uuid,
    status: &str,
    by: &str,
    note: Option<&str>,
) -> Result<DeadLetter, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE skald_participant.dead_letters \
         SET status = $2, resolved_at = now(), resolved_by = $3, note = $4 WHERE id = $1 \
         RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(status)
    .bind(by)
    .bind(note)
    .fetch_one(conn)
    .await
}

/// Sends a pending dead letter back to its service's endpoint (under its aggregate
/// id), marked `replayed` by `by`, and returns it so marked.
///
/// An `exhausted` message goes back with an empty error history (a fresh set of
/// tries; the history stays on the letter) and its processed-messages row is removed
/// in the same transaction, so it runs again rather than being answered as a copy. A
/// `malformed` or `unknown_type` body goes back as it is (after a fix of the
/// publisher or a new handler). The publish is confirmed before the transaction
/// commits: a failure leaves the letter pending.
pub async fn replay(
    pool: &PgPool,
    transport: &dyn Transport,
    service: &str,
    id: Uuid,
    by: &str,
) -> Result<DeadLetter, DeadLetterError> {
    let mut tx = pool.begin().await?;
    let letter = pending(&mut tx, service, id).await?;
    let raw: Vec<u8> =
        sqlx::query_scalar("SELECT body FROM skald_participant.dead_letters WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
    let body = match ServiceMessage::parse(&raw) {
        Ok(msg) if letter.reason_code == "exhausted" => {
            sqlx::query(
                "DELETE FROM skald_participant.processed \
                 WHERE service = $1 AND message_id = $2 AND outcome = 'exhausted'",
            )
            .bind(service)
            .bind(msg.message_id)
            .execute(&mut *tx)
            .await?;
            ServiceMessage {
                errors: vec![],
                ..msg
            }
            .to_body()
        }
        _ => raw,
    };
    let replayed = resolve(&mut tx, id, "replayed", by, None).await?;
    let key = letter.aggregate_id.unwrap_or_else(|| id.to_string());
    transport
        .send_to(&Endpoint::Service(service.to_string()), &key, &body)
        .await?;
    tx.commit().await?;
    Ok(replayed)
}

/// Sets a pending dead letter aside for good, recording who and why; returns it so
/// marked.
pub async fn discard(
    pool: &PgPool,
    service: &str,
    id: Uuid,
    by: &str,
    note: Option<&str>,
) -> Result<DeadLetter, DeadLetterError> {
    let mut tx = pool.begin().await?;
    pending(&mut tx, service, id).await?;
    let discarded = resolve(&mut tx, id, "discarded", by, note).await?;
    tx.commit().await?;
    Ok(discarded)
}
