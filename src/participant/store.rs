//! The participant's SQL on the service's database: its schema (`skald_participant`,
//! from the migrations shipped in `src/participant/migrations/`), the processed
//! messages, the failures, what each aggregate last applied, and new dead letters.
//! The operator's side of dead letters is in [`super::dead_letters`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::decide::{LastApplied, Outcome};
use super::wire::{Reply, ServiceError, ServiceMessage};

/// The schema the participant's tables live in.
pub const SCHEMA: &str = "skald_participant";

/// Applies the participant's migrations to the service's database: idempotent, and
/// safe when several processes start at once (sqlx holds an advisory lock while it
/// migrates). Their bookkeeping is `skald_participant._sqlx_migrations`, apart from
/// the service's own sqlx migrations (`public._sqlx_migrations`) and skald's.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    let mut migrator = sqlx::migrate!("./src/participant/migrations");
    migrator.create_schema(SCHEMA);
    migrator.dangerous_set_table_name(format!("{SCHEMA}._sqlx_migrations"));
    migrator.run(pool).await
}

/// A message the service already finished with.
#[derive(Debug, Clone, PartialEq)]
pub struct Processed {
    /// `succeeded`, `fatal`, `exhausted` or `stale`.
    pub outcome: String,
    /// The reply it sent (commands only).
    pub reply: Option<Reply>,
}

/// In one round trip: the processed-messages row of `msg` and what its aggregate
/// last applied at `service`, both locked until the transaction ends (a replay
/// deleting the row concurrently is waited for).
pub async fn lookup(
    conn: &mut PgConnection,
    service: &str,
    msg: &ServiceMessage,
) -> Result<(Option<Processed>, LastApplied), sqlx::Error> {
    // Each locking SELECT is a CTE of its own: FOR UPDATE cannot lock the nullable
    // side of an outer join, and either row may be missing.
    type Row = (
        Option<String>,
        Option<Json<Reply>>,
        Option<i64>,
        Option<DateTime<Utc>>,
    );
    let (outcome, reply, sequence, dispatched_at): Row = sqlx::query_as(
        "WITH p AS (SELECT outcome, reply FROM skald_participant.processed \
                    WHERE service = $1 AND message_id = $2 FOR UPDATE), \
              a AS (SELECT last_sequence, last_dispatched_at FROM skald_participant.aggregates \
                    WHERE service = $1 AND aggregate_id = $3 FOR UPDATE) \
         SELECT (SELECT outcome FROM p), (SELECT reply FROM p), \
                (SELECT last_sequence FROM a), (SELECT last_dispatched_at FROM a)",
    )
    .bind(service)
    .bind(msg.message_id)
    .bind(&msg.aggregate_id)
    .fetch_one(conn)
    .await?;
    let processed = outcome.map(|outcome| Processed {
        outcome,
        reply: reply.map(|r| r.0),
    });
    let last = LastApplied {
        sequence,
        dispatched_at,
    };
    Ok((processed, last))
}

/// A message to record as processed.
#[derive(Debug)]
pub struct NewProcessed<'a> {
    /// The service.
    pub service: &'a str,
    /// The message.
    pub msg: &'a ServiceMessage,
    /// How it ended.
    pub outcome: &'a Outcome,
    /// The reply it is answered with (commands only).
    pub reply: Option<&'a Reply>,
    /// Tries it took.
    pub attempts: u32,
    /// Its error history.
    pub errors: &'a [ServiceError],
    /// What its aggregate last applied once it is (its handler succeeded): recorded
    /// with it, as the aggregate's new high-water mark.
    pub advance: Option<LastApplied>,
}

/// Records a message as processed (and, with `advance`, what its aggregate last
/// applied) in one statement; `false` when another process recorded it first (the
/// caller rolls back, the advance with it, and treats it as a copy).
pub async fn record(conn: &mut PgConnection, new: &NewProcessed<'_>) -> Result<bool, sqlx::Error> {
    let NewProcessed {
        service,
        msg,
        outcome,
        reply,
        attempts,
        errors,
        advance,
    } = *new;
    let outputs = match outcome {
        Outcome::Succeeded(outputs) => Some(Json(outputs)),
        _ => None,
    };
    // The advance is a data-modifying CTE: it runs whatever the insert does, and a
    // refused insert rolls the transaction (so the advance) back.
    let done = sqlx::query(
        "WITH advanced AS ( \
           INSERT INTO skald_participant.aggregates \
             (service, aggregate_id, last_sequence, last_dispatched_at) \
           SELECT $1, $4, $14, $15 WHERE $13 \
           ON CONFLICT (service, aggregate_id) DO UPDATE SET \
             last_sequence = EXCLUDED.last_sequence, \
             last_dispatched_at = EXCLUDED.last_dispatched_at, updated_at = now()) \
         INSERT INTO skald_participant.processed (service, message_id, type, aggregate_id, \
           sequence, dispatched_at, outcome, outputs, error, reply, attempts, errors) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
         ON CONFLICT (service, message_id) DO NOTHING",
    )
    .bind(service)
    .bind(msg.message_id)
    .bind(&msg.kind)
    .bind(&msg.aggregate_id)
    .bind(msg.sequence.map(|s| s as i64))
    .bind(msg.dispatched_at)
    .bind(outcome.as_str())
    .bind(outputs)
    .bind(outcome.error())
    .bind(reply.map(Json))
    .bind(attempts as i32)
    .bind(Json(errors))
    .bind(advance.is_some())
    .bind(advance.and_then(|a| a.sequence))
    .bind(advance.and_then(|a| a.dispatched_at))
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records one failed try of `msg` (a copy of the same try records nothing more).
pub async fn record_failure(
    conn: &mut PgConnection,
    service: &str,
    msg: &ServiceMessage,
    failure: &ServiceError,
    retryable: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO skald_participant.failures \
           (service, message_id, attempt, type, aggregate_id, retryable, error, failed_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
    )
    .bind(service)
    .bind(msg.message_id)
    .bind(failure.attempt as i32)
    .bind(&msg.kind)
    .bind(&msg.aggregate_id)
    .bind(retryable)
    .bind(&failure.message)
    .bind(failure.at)
    .execute(conn)
    .await?;
    Ok(())
}

/// Why a message is set apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// The body is not a service message.
    Malformed,
    /// No handler is registered for its type.
    UnknownType,
    /// Retryable failures past the policy.
    Exhausted,
    /// Readable, but the service's database refused to record it (its data).
    Unprocessable,
}

impl DeadReason {
    /// The `reason_code` column's (and the transport header's) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Malformed => "malformed",
            DeadReason::UnknownType => "unknown_type",
            DeadReason::Exhausted => "exhausted",
            DeadReason::Unprocessable => "unprocessable",
        }
    }
}

/// A dead letter to record.
#[derive(Debug, Clone)]
pub struct NewDeadLetter<'a> {
    /// Why.
    pub code: DeadReason,
    /// Why, for a person.
    pub reason: &'a str,
    /// The message, when the body could be read.
    pub msg: Option<&'a ServiceMessage>,
    /// The body as it is set apart (for `exhausted`: with its whole error history).
    pub body: &'a [u8],
}

/// Records a dead letter, unless the same body is already pending for `service` (the
/// delivery came again before its ack).
pub async fn insert_dead_letter(
    conn: &mut PgConnection,
    service: &str,
    letter: &NewDeadLetter<'_>,
) -> Result<(), sqlx::Error> {
    let digest = Sha256::digest(letter.body).to_vec();
    let errors = letter.msg.map_or(Value::Array(vec![]), |m| {
        serde_json::to_value(&m.errors).expect("errors serialise")
    });
    sqlx::query(
        "INSERT INTO skald_participant.dead_letters (id, service, reason_code, reason, \
           message_id, type, aggregate_id, body, body_sha256, errors) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (service, body_sha256) WHERE status = 'pending' DO NOTHING",
    )
    .bind(Uuid::new_v4())
    .bind(service)
    .bind(letter.code.as_str())
    .bind(letter.reason)
    .bind(letter.msg.map(|m| m.message_id))
    .bind(letter.msg.map(|m| m.kind.as_str()))
    .bind(letter.msg.map(|m| m.aggregate_id.as_str()))
    .bind(letter.body)
    .bind(digest)
    .bind(Json(errors))
    .execute(conn)
    .await?;
    Ok(())
}
