//! Dead letters in PostgreSQL: recorded, listed, inspected, resolved — never erased.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgExecutor, Row};
use uuid::Uuid;

use super::StoreError;

/// Why a message ended up in the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterKind {
    /// The message could not be read (promise 6: never retried).
    Malformed,
    /// The message was readable but names something that does not exist.
    Unprocessable,
    /// A step after the pivot failed for good; the instance is parked.
    Exhausted,
    /// A compensation failed for good; the instance is parked, half undone.
    CompensationFailed,
    /// The instance's saga version is no longer loaded; it was parked at start-up
    /// (`--orphaned=park`) where it stood.
    Orphaned,
}

impl DeadLetterKind {
    /// Every kind.
    pub const ALL: [DeadLetterKind; 5] = [
        DeadLetterKind::Malformed,
        DeadLetterKind::Unprocessable,
        DeadLetterKind::Exhausted,
        DeadLetterKind::CompensationFailed,
        DeadLetterKind::Orphaned,
    ];

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Malformed => "malformed",
            DeadLetterKind::Unprocessable => "unprocessable",
            DeadLetterKind::Exhausted => "exhausted",
            DeadLetterKind::CompensationFailed => "compensation_failed",
            DeadLetterKind::Orphaned => "orphaned",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Where a dead letter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterStatus {
    /// Waiting for a person.
    Pending,
    /// Sent back for processing.
    Replayed,
    /// Set aside on purpose.
    Discarded,
}

impl DeadLetterStatus {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterStatus::Pending => "pending",
            DeadLetterStatus::Replayed => "replayed",
            DeadLetterStatus::Discarded => "discarded",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Pending, Self::Replayed, Self::Discarded]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// A dead letter about to be recorded.
#[derive(Debug, Clone)]
pub struct NewDeadLetter<'a> {
    /// Its id (derived from the parking message for instances, so that a
    /// redelivered copy records nothing twice).
    pub id: Uuid,
    /// Why.
    pub kind: DeadLetterKind,
    /// A short stable code.
    pub reason_code: &'a str,
    /// A sentence for a person.
    pub reason: &'a str,
    /// The message's bytes.
    pub body: &'a [u8],
    /// The message's id, if it had a readable one.
    pub message_id: Option<Uuid>,
    /// The parked instance, if any.
    pub instance_id: Option<Uuid>,
    /// The saga, if known.
    pub saga: Option<&'a str>,
}

/// A recorded dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Its id.
    pub id: Uuid,
    /// Why it is here.
    pub kind: DeadLetterKind,
    /// A short stable code.
    pub reason_code: String,
    /// A sentence for a person.
    pub reason: String,
    /// The message's bytes (shown as text where they are UTF-8).
    #[serde(skip)]
    pub body: Vec<u8>,
    /// The message's id.
    pub message_id: Option<Uuid>,
    /// The parked instance.
    pub instance_id: Option<Uuid>,
    /// The saga.
    pub saga: Option<String>,
    /// Every failed attempt of the instance, oldest first.
    pub history: Value,
    /// Where it stands.
    pub status: DeadLetterStatus,
    /// When it was recorded.
    pub created_at: DateTime<Utc>,
    /// When it was replayed or discarded.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Who replayed or discarded it.
    pub resolved_by: Option<String>,
    /// What they changed or said.
    pub resolution: Option<Value>,
}

impl DeadLetter {
    /// The body as text, or `None` when it is not UTF-8.
    pub fn body_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.body).ok()
    }
}

/// Records a dead letter (once: a second insert with the same id does nothing). The
/// instance's failed attempts are copied in as its history.
pub async fn insert<'e>(
    exec: impl PgExecutor<'e>,
    dl: &NewDeadLetter<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO skald.dead_letters \
           (id, kind, reason_code, reason, body, message_id, instance_id, saga, history) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE( \
           (SELECT jsonb_agg(jsonb_build_object('step', step_name, 'phase', phase, \
                     'attempt', attempt, 'at', finished_at, 'kind', error_kind, 'message', error) \
                   ORDER BY finished_at) \
              FROM skald.inbox WHERE instance_id = $7 AND outcome = 'failed'), '[]'::jsonb)) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(dl.id)
    .bind(dl.kind.as_str())
    .bind(dl.reason_code)
    .bind(dl.reason)
    .bind(dl.body)
    .bind(dl.message_id)
    .bind(dl.instance_id)
    .bind(dl.saga)
    .execute(exec)
    .await?;
    Ok(())
}

const COLUMNS: &str = "id, kind, reason_code, reason, body, message_id, instance_id, saga, \
                       history, status, created_at, resolved_at, resolved_by, resolution";

/// Dead letters, newest first, optionally only of one kind and/or status.
pub async fn list<'e>(
    exec: impl PgExecutor<'e>,
    kind: Option<DeadLetterKind>,
    status: Option<DeadLetterStatus>,
    limit: i64,
) -> Result<Vec<DeadLetter>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM skald.dead_letters \
         WHERE ($1::text IS NULL OR kind = $1) AND ($2::text IS NULL OR status = $2) \
         ORDER BY created_at DESC, id LIMIT $3"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(kind.map(DeadLetterKind::as_str))
        .bind(status.map(DeadLetterStatus::as_str))
        .bind(limit)
        .fetch_all(exec)
        .await?;
    rows.iter().map(from_row).collect()
}

/// The oldest `limit` pending dead letters, optionally of one kind and one saga,
/// oldest first: the order a bulk replay sends them in.
pub async fn oldest_pending<'e>(
    exec: impl PgExecutor<'e>,
    kind: Option<DeadLetterKind>,
    saga: Option<&str>,
    limit: i64,
) -> Result<Vec<DeadLetter>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM skald.dead_letters \
         WHERE status = 'pending' AND ($1::text IS NULL OR kind = $1) \
           AND ($2::text IS NULL OR saga = $2) \
         ORDER BY created_at, id LIMIT $3"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(kind.map(DeadLetterKind::as_str))
        .bind(saga)
        .bind(limit)
        .fetch_all(exec)
        .await?;
    rows.iter().map(from_row).collect()
}

/// One dead letter; `lock` takes a row lock (inside a transaction) for resolving it.
pub async fn get<'e>(
    exec: impl PgExecutor<'e>,
    id: Uuid,
    lock: bool,
) -> Result<Option<DeadLetter>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM skald.dead_letters WHERE id = $1 {}",
        if lock { "FOR UPDATE" } else { "" }
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(exec)
        .await?;
    row.as_ref().map(from_row).transpose()
}

fn from_row(row: &PgRow) -> Result<DeadLetter, StoreError> {
    let kind: String = row.try_get("kind")?;
    let status: String = row.try_get("status")?;
    Ok(DeadLetter {
        id: row.try_get("id")?,
        kind: DeadLetterKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("dead letter kind {kind:?}")))?,
        reason_code: row.try_get("reason_code")?,
        reason: row.try_get("reason")?,
        body: row.try_get("body")?,
        message_id: row.try_get("message_id")?,
        instance_id: row.try_get("instance_id")?,
        saga: row.try_get("saga")?,
        history: row.try_get::<sqlx::types::Json<Value>, _>("history")?.0,
        status: DeadLetterStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("dead letter status {status:?}")))?,
        created_at: row.try_get("created_at")?,
        resolved_at: row.try_get("resolved_at")?,
        resolved_by: row.try_get("resolved_by")?,
        resolution: row
            .try_get::<Option<sqlx::types::Json<Value>>, _>("resolution")?
            .map(|j| j.0),
    })
}

/// Marks a pending dead letter replayed, recording who, what changed, and what the
/// replay sends (so that a repeated replay can send exactly that again).
pub async fn mark_replayed<'e>(
    exec: impl PgExecutor<'e>,
    id: Uuid,
    by: &str,
    resolution: Option<&Value>,
    replay: Option<&Value>,
    replay_body: Option<&[u8]>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE skald.dead_letters SET status = 'replayed', resolved_at = now(), \
           resolved_by = $2, resolution = $3, replay = $4, replay_body = $5 \
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .bind(by)
    .bind(resolution.map(sqlx::types::Json))
    .bind(replay.map(sqlx::types::Json))
    .bind(replay_body)
    .execute(exec)
    .await?;
    Ok(())
}

/// What an earlier replay sent: a message for the intake, or raw bytes.
pub async fn replayed_message<'e>(
    exec: impl PgExecutor<'e>,
    id: Uuid,
) -> Result<(Option<Value>, Option<Vec<u8>>), StoreError> {
    let row = sqlx::query("SELECT replay, replay_body FROM skald.dead_letters WHERE id = $1")
        .bind(id)
        .fetch_one(exec)
        .await?;
    Ok((
        row.try_get::<Option<sqlx::types::Json<Value>>, _>("replay")?
            .map(|j| j.0),
        row.try_get("replay_body")?,
    ))
}

/// Marks a pending dead letter discarded; `false` if it was not pending.
pub async fn mark_discarded<'e>(
    exec: impl PgExecutor<'e>,
    id: Uuid,
    by: &str,
    note: Option<&str>,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE skald.dead_letters SET status = 'discarded', resolved_at = now(), \
           resolved_by = $2, resolution = jsonb_build_object('note', $3::text) \
         WHERE id = $1 AND status = 'pending'",
    )
    .bind(id)
    .bind(by)
    .bind(note)
    .execute(exec)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The dead letters of one instance, oldest first.
pub async fn for_instance<'e>(
    exec: impl PgExecutor<'e>,
    instance_id: Uuid,
) -> Result<Vec<DeadLetter>, StoreError> {
    let sql = format!(
        "SELECT {COLUMNS} FROM skald.dead_letters WHERE instance_id = $1 ORDER BY created_at"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(instance_id)
        .fetch_all(exec)
        .await?;
    rows.iter().map(from_row).collect()
}
