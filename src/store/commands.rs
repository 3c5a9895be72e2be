//! Command steps in PostgreSQL: one `skald.commands` row per command sent (what the
//! reply and the reply timers are decided on, and what every re-send sends again), and
//! one `skald.replies` row per reply delivery, applied or not (what an operator reads
//! to see late, duplicate and unknown replies).

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::{StoreError, cursor_from_row, state_from_row};
use crate::envelope::Envelope;
use crate::participant::wire::{Reply, ReplyOutcome, ServiceMessage};
use crate::saga::command::{CommandStatus, Pending};
use crate::saga::coordinator::{Cursor, InstanceState};

/// A command being sent for the first time.
#[derive(Debug, Clone)]
pub struct NewCommand<'a> {
    /// Its instance.
    pub instance_id: Uuid,
    /// The cursor that sends it.
    pub cursor: Cursor,
    /// The step's name.
    pub step_name: &'a str,
    /// The participant service.
    pub service: &'a str,
    /// The command, as every send sends it.
    pub message: &'a ServiceMessage,
    /// The run message it is sent for.
    pub context: &'a Envelope,
}

/// Records a command sent for the first time (status `waiting`, 1 send). `false`
/// (nothing written) when the command is recorded already.
pub async fn insert(conn: &mut PgConnection, new: &NewCommand<'_>) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "INSERT INTO skald.commands (id, instance_id, step, step_name, phase, attempt, service, \
           type, body, context, sent_at, last_sent_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(new.message.message_id)
    .bind(new.instance_id)
    .bind(new.cursor.step as i32)
    .bind(new.step_name)
    .bind(new.cursor.phase.as_str())
    .bind(new.cursor.attempt as i32)
    .bind(new.service)
    .bind(&new.message.kind)
    .bind(Json(new.message))
    .bind(Json(new.context))
    .bind(new.message.dispatched_at.unwrap_or_else(Utc::now))
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// A stored command, locked for the transaction deciding on it.
#[derive(Debug, Clone)]
pub struct Locked {
    /// What the decisions need.
    pub pending: Pending,
    /// The participant service.
    pub service: String,
    /// The command as sent.
    pub message: ServiceMessage,
    /// The run message it was sent for.
    pub context: Envelope,
}

/// The command `id` and its instance's state, both locked (`FOR UPDATE`) so that its
/// reply and its timers are decided one at a time. `None` for what does not exist.
pub async fn lock(
    conn: &mut PgConnection,
    id: Uuid,
    instance_id: Uuid,
) -> Result<(Option<Locked>, Option<InstanceState>), StoreError> {
    let state = sqlx::query(
        "SELECT status, step, phase, attempt FROM skald.instances WHERE id = $1 FOR UPDATE",
    )
    .bind(instance_id)
    .fetch_optional(&mut *conn)
    .await?
    .map(|row| state_from_row(&row))
    .transpose()?;
    let row = sqlx::query(
        "SELECT instance_id, step, phase, attempt, service, body, context, sends, status \
         FROM skald.commands WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(row) = row else {
        return Ok((None, state));
    };
    let status: String = row.try_get("status")?;
    let corrupt = |what: String| StoreError::Corrupt(what);
    let message = row.try_get::<Json<ServiceMessage>, _>("body")?.0;
    let pending = Pending {
        instance_id: row.try_get("instance_id")?,
        aggregate_id: message.aggregate_id.clone(),
        cursor: cursor_from_row(&row)?,
        status: CommandStatus::parse(&status)
            .ok_or_else(|| corrupt(format!("command status {status:?}")))?,
        sends: u32::try_from(row.try_get::<i32, _>("sends")?)
            .map_err(|_| corrupt("negative sends".into()))?,
    };
    Ok((
        Some(Locked {
            pending,
            service: row.try_get("service")?,
            message,
            context: row.try_get::<Json<Envelope>, _>("context")?.0,
        }),
        state,
    ))
}

/// Counts a re-send of command `id` (now send number `sends`).
pub async fn resent(conn: &mut PgConnection, id: Uuid, sends: u32) -> Result<(), StoreError> {
    sqlx::query("UPDATE skald.commands SET sends = $2, last_sent_at = now() WHERE id = $1")
        .bind(id)
        .bind(sends as i32)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records how command `id` ended: its reply (outputs or error), or its time-out.
pub async fn finish(
    conn: &mut PgConnection,
    id: Uuid,
    status: CommandStatus,
    error: Option<&str>,
    outputs: Option<&Value>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE skald.commands SET status = $2, error = $3, outputs = $4, answered_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(status.as_str())
    .bind(error)
    .bind(outputs.map(Json))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Marks the commands `instance_id` waits on as `cancelled` (an operator cancelled it):
/// their replies and timers no longer apply.
pub async fn cancel_waiting(conn: &mut PgConnection, instance_id: Uuid) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE skald.commands SET status = 'cancelled', answered_at = now() \
         WHERE instance_id = $1 AND status = 'waiting'",
    )
    .bind(instance_id)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What became of one reply delivery (`skald.replies.disposition`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyDisposition {
    /// It ended its step.
    Applied,
    /// A copy of an applied reply: nothing ran again.
    Duplicate,
    /// Its command was answered before, or its instance moved on.
    Late,
    /// skald sent no such command.
    Unknown,
}

impl ReplyDisposition {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplyDisposition::Applied => "applied",
            ReplyDisposition::Duplicate => "duplicate",
            ReplyDisposition::Late => "late",
            ReplyDisposition::Unknown => "unknown",
        }
    }
}

/// Records one delivery of `reply` and what became of it.
pub async fn record_reply(
    conn: &mut PgConnection,
    reply: &Reply,
    disposition: ReplyDisposition,
) -> Result<(), StoreError> {
    let status = match reply.outcome {
        ReplyOutcome::Succeeded { .. } => "succeeded",
        ReplyOutcome::Failed { .. } => "failed",
    };
    sqlx::query(
        "INSERT INTO skald.replies (message_id, in_reply_to, instance_id, service, status, \
           disposition, body) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(reply.message_id)
    .bind(reply.in_reply_to)
    .bind(reply.reply_to.instance_id)
    .bind(&reply.service)
    .bind(status)
    .bind(disposition.as_str())
    .bind(Json(reply))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Records that `reply` ended its command (now `status`, with the reply's error or
/// outputs) and that it was applied: [`finish`] and [`record_reply`] in one statement
/// (one round trip on the way every command step takes).
pub async fn apply_reply(
    conn: &mut PgConnection,
    reply: &Reply,
    status: CommandStatus,
    error: Option<&str>,
    outputs: Option<&Value>,
) -> Result<(), StoreError> {
    let reply_status = match reply.outcome {
        ReplyOutcome::Succeeded { .. } => "succeeded",
        ReplyOutcome::Failed { .. } => "failed",
    };
    sqlx::query(
        "WITH answered AS ( \
           UPDATE skald.commands SET status = $8, error = $9, outputs = $10, \
             answered_at = now() WHERE id = $2) \
         INSERT INTO skald.replies (message_id, in_reply_to, instance_id, service, status, \
           disposition, body) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(reply.message_id)
    .bind(reply.in_reply_to)
    .bind(reply.reply_to.instance_id)
    .bind(&reply.service)
    .bind(reply_status)
    .bind(ReplyDisposition::Applied.as_str())
    .bind(Json(reply))
    .bind(status.as_str())
    .bind(error)
    .bind(outputs.map(Json))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The command the instance waits on at `cursor`, if it is still waiting: what retry
/// now sends again.
pub async fn waiting_at(
    conn: &mut PgConnection,
    instance_id: Uuid,
    cursor: Cursor,
) -> Result<Option<(String, ServiceMessage)>, StoreError> {
    let row: Option<(String, Json<ServiceMessage>)> = sqlx::query_as(
        "SELECT service, body FROM skald.commands \
         WHERE instance_id = $1 AND step = $2 AND phase = $3 AND attempt = $4 \
           AND status = 'waiting'",
    )
    .bind(instance_id)
    .bind(cursor.step as i32)
    .bind(cursor.phase.as_str())
    .bind(cursor.attempt as i32)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|(service, body)| (service, body.0)))
}

/// One command of an instance, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct CommandView {
    /// The command's message id.
    pub command_id: Uuid,
    /// The step's index.
    pub step: i32,
    /// The step's name.
    pub step_name: String,
    /// `forward` or `compensate`.
    pub phase: String,
    /// The step attempt that sent it.
    pub attempt: i32,
    /// The participant service.
    pub service: String,
    /// The command type.
    #[serde(rename = "type")]
    pub kind: String,
    /// `waiting`, `succeeded`, `failed`, `timed_out` or `cancelled`.
    pub status: String,
    /// How many times it was sent (1 + re-sends after reply timeouts).
    pub sends: i32,
    /// When it was first sent.
    pub sent_at: DateTime<Utc>,
    /// When it was last sent.
    pub last_sent_at: DateTime<Utc>,
    /// When its reply was applied (or it timed out).
    pub answered_at: Option<DateTime<Utc>>,
    /// The failure reply's error, or the time-out.
    pub error: Option<String>,
    /// The success reply's outputs.
    #[schema(value_type = Option<Object>)]
    pub outputs: Option<Value>,
    /// The parameters it carried.
    #[schema(value_type = Object)]
    pub params: Value,
}

/// One reply delivery, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct ReplyView {
    /// The reply's message id.
    pub message_id: Uuid,
    /// The command it answers.
    pub in_reply_to: Uuid,
    /// The instance it names.
    pub instance_id: Uuid,
    /// The service that answered.
    pub service: String,
    /// `succeeded` or `failed`.
    pub status: String,
    /// `applied`, `duplicate`, `late` or `unknown`.
    pub disposition: String,
    /// When skald received it.
    pub received_at: DateTime<Utc>,
    /// The reply as received.
    #[schema(value_type = Object)]
    pub body: Value,
}

/// The commands of an instance, oldest first.
pub async fn of_instance(pool: &PgPool, instance_id: Uuid) -> Result<Vec<CommandView>, StoreError> {
    let rows = sqlx::query(
        "SELECT id, step, step_name, phase, attempt, service, type, status, sends, sent_at, \
           last_sent_at, answered_at, error, outputs, body -> 'payload' AS params \
         FROM skald.commands WHERE instance_id = $1 ORDER BY sent_at, step, attempt",
    )
    .bind(instance_id)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(CommandView {
                command_id: row.try_get("id")?,
                step: row.try_get("step")?,
                step_name: row.try_get("step_name")?,
                phase: row.try_get("phase")?,
                attempt: row.try_get("attempt")?,
                service: row.try_get("service")?,
                kind: row.try_get("type")?,
                status: row.try_get("status")?,
                sends: row.try_get("sends")?,
                sent_at: row.try_get("sent_at")?,
                last_sent_at: row.try_get("last_sent_at")?,
                answered_at: row.try_get("answered_at")?,
                error: row.try_get("error")?,
                outputs: row
                    .try_get::<Option<Json<Value>>, _>("outputs")?
                    .map(|j| j.0),
                params: row
                    .try_get::<Option<Json<Value>>, _>("params")?
                    .map_or(Value::Null, |j| j.0),
            })
        })
        .collect()
}

/// Reply deliveries, newest first: of one instance, or (`None`) those not applied
/// (late, duplicate, unknown) of every instance, at most `limit`.
pub async fn replies(
    pool: &PgPool,
    instance_id: Option<Uuid>,
    limit: i64,
) -> Result<Vec<ReplyView>, StoreError> {
    let rows = sqlx::query(
        "SELECT message_id, in_reply_to, instance_id, service, status, disposition, \
           received_at, body FROM skald.replies \
         WHERE CASE WHEN $1::uuid IS NULL THEN disposition <> 'applied' \
                    ELSE instance_id = $1 END \
         ORDER BY received_at DESC, id DESC LIMIT $2",
    )
    .bind(instance_id)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(ReplyView {
                message_id: row.try_get("message_id")?,
                in_reply_to: row.try_get("in_reply_to")?,
                instance_id: row.try_get("instance_id")?,
                service: row.try_get("service")?,
                status: row.try_get("status")?,
                disposition: row.try_get("disposition")?,
                received_at: row.try_get("received_at")?,
                body: row.try_get::<Json<Value>, _>("body")?.0,
            })
        })
        .collect()
}
