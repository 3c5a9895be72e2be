//! The statements of one message's transaction.
//!
//! A message is handled in one transaction, in at most three statements besides
//! BEGIN/COMMIT: *claim* (create or lock the instance, see whether the message was
//! already handled), the step's effect (see [`super::effects`]), and *record* (inbox
//! row with what to send next, the attempt, the instance's new state) — so that the
//! effect and the record that it happened commit together or not at all.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use super::StoreError;
use crate::envelope::Outgoing;
use crate::saga::coordinator::{
    Cursor, FailureKind, InstanceState, InstanceStatus, Outcome, Phase,
};

/// A saga instance as stored.
#[derive(Debug, Clone)]
pub struct InstanceRow {
    /// Its id.
    pub id: Uuid,
    /// The saga it runs.
    pub saga: String,
    /// The aggregate it belongs to.
    pub aggregate_id: String,
    /// Status and cursor.
    pub state: InstanceState,
    /// The start message's payload.
    pub payload: Value,
    /// Outputs captured so far, keyed by step name.
    pub outputs: Value,
}

/// The instance a start message creates.
#[derive(Debug, Clone)]
pub struct NewInstance<'a> {
    /// Derived from the start message id.
    pub id: Uuid,
    /// The start message's id.
    pub start_message_id: Uuid,
    /// The saga's name.
    pub saga: &'a str,
    /// The saga's version at start.
    pub saga_version: u32,
    /// The aggregate.
    pub aggregate_id: &'a str,
    /// The saga's input.
    pub payload: &'a Value,
    /// The publisher's sequence number, if given.
    pub sequence: Option<u64>,
}

/// The result of claiming a run message.
#[derive(Debug)]
pub enum RunClaim {
    /// First time this message is handled; the instance row is locked.
    Fresh(InstanceRow),
    /// This message id was handled (and committed) before.
    Seen,
    /// No such instance.
    NoInstance,
}

/// One attempt of a step, for the error history.
#[derive(Debug, Clone)]
pub struct AttemptRecord<'a> {
    /// What ran.
    pub cursor: Cursor,
    /// The step's name.
    pub step_name: &'a str,
    /// How it ended.
    pub outcome: Outcome,
    /// The failure's message, if it failed.
    pub error: Option<&'a str>,
    /// When the attempt began.
    pub started_at: DateTime<Utc>,
}

/// The transaction one message is handled in.
pub struct StepTx {
    tx: Transaction<'static, Postgres>,
}

const INSTANCE_COLUMNS: &str =
    "id, saga, aggregate_id, status, step, phase, attempt, payload, outputs";

impl StepTx {
    pub(super) fn new(tx: Transaction<'static, Postgres>) -> Self {
        StepTx { tx }
    }

    /// The transaction's connection, for the step's effect.
    pub fn conn(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Creates the instance a start message asks for; `None` when it already exists,
    /// i.e. this start message was handled before (the instance id derives from the
    /// message id). A concurrent copy waits on the primary key until this commits.
    pub async fn claim_start(
        &mut self,
        new: &NewInstance<'_>,
    ) -> Result<Option<InstanceRow>, StoreError> {
        let sql = format!(
            "INSERT INTO skald.instances \
               (id, saga, saga_version, aggregate_id, status, step, phase, attempt, payload, \
                start_message_id, sequence) \
             VALUES ($1, $2, $3, $4, 'running', 0, 'forward', 1, $5, $6, $7) \
             ON CONFLICT (id) DO NOTHING RETURNING {INSTANCE_COLUMNS}"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(new.id)
            .bind(new.saga)
            .bind(new.saga_version as i32)
            .bind(new.aggregate_id)
            .bind(sqlx::types::Json(new.payload))
            .bind(new.start_message_id)
            .bind(new.sequence.map(|s| s as i64))
            .fetch_optional(&mut *self.tx)
            .await?;
        row.as_ref().map(instance_from_row).transpose()
    }

    /// Locks the instance a run message is for and tells whether the message was
    /// handled before.
    pub async fn claim_run(
        &mut self,
        message_id: Uuid,
        instance_id: Uuid,
    ) -> Result<RunClaim, StoreError> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM skald.inbox WHERE message_id = $1) AS seen, \
                    {INSTANCE_COLUMNS} \
             FROM skald.instances WHERE id = $2 FOR UPDATE"
        );
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(message_id)
            .bind(instance_id)
            .fetch_optional(&mut *self.tx)
            .await?;
        match row {
            None => Ok(RunClaim::NoInstance),
            Some(row) if row.try_get::<bool, _>("seen")? => Ok(RunClaim::Seen),
            Some(row) => Ok(RunClaim::Fresh(instance_from_row(&row)?)),
        }
    }

    /// Records an attempt that ran: the inbox row (with what it sends on), the
    /// attempt, the instance's new state and, on success, the step's output.
    pub async fn record_applied(
        &mut self,
        message_id: Uuid,
        instance_id: Uuid,
        attempt: &AttemptRecord<'_>,
        new_state: InstanceState,
        output: Option<&Value>,
        outgoing: &[Outgoing],
    ) -> Result<(), StoreError> {
        let (outcome, error_kind) = match attempt.outcome {
            Outcome::Succeeded => ("succeeded", None),
            Outcome::Failed(FailureKind::Retryable) => ("failed", Some("retryable")),
            Outcome::Failed(FailureKind::Fatal) => ("failed", Some("fatal")),
        };
        sqlx::query(
            "WITH inbox AS ( \
               INSERT INTO skald.inbox (message_id, instance_id, disposition, outgoing) \
               VALUES ($1, $2, 'applied', $3) \
             ), attempt AS ( \
               INSERT INTO skald.step_attempts (instance_id, step, step_name, phase, attempt, \
                 outcome, error_kind, error, message_id, started_at) \
               VALUES ($2, $4, $5, $6, $7, $8, $9, $10, $1, $11) \
             ) \
             UPDATE skald.instances SET \
               status = $12, step = $13, phase = $14, attempt = $15, \
               outputs = CASE WHEN $16::jsonb IS NULL THEN outputs \
                              ELSE outputs || jsonb_build_object($5::text, $16::jsonb) END, \
               updated_at = now(), \
               finished_at = CASE WHEN $17 THEN now() ELSE NULL END \
             WHERE id = $2",
        )
        .bind(message_id)
        .bind(instance_id)
        .bind(sqlx::types::Json(outgoing))
        .bind(attempt.cursor.step as i32)
        .bind(attempt.step_name)
        .bind(attempt.cursor.phase.as_str())
        .bind(attempt.cursor.attempt as i32)
        .bind(outcome)
        .bind(error_kind)
        .bind(attempt.error)
        .bind(attempt.started_at)
        .bind(new_state.status.as_str())
        .bind(new_state.cursor.step as i32)
        .bind(new_state.cursor.phase.as_str())
        .bind(new_state.cursor.attempt as i32)
        .bind(output.map(sqlx::types::Json))
        .bind(new_state.status.is_terminal())
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Records a message that was handled without running anything (out of date for
    /// its instance), so that copies of it are recognised too.
    pub async fn record_skipped(
        &mut self,
        message_id: Uuid,
        instance_id: Uuid,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO skald.inbox (message_id, instance_id, disposition) \
             VALUES ($1, $2, 'skipped')",
        )
        .bind(message_id)
        .bind(instance_id)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Commits everything the message did.
    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }

    /// Undoes everything the message did.
    pub async fn rollback(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }
}

fn instance_from_row(row: &PgRow) -> Result<InstanceRow, StoreError> {
    let status: String = row.try_get("status")?;
    let phase: String = row.try_get("phase")?;
    let step: i32 = row.try_get("step")?;
    let attempt: i32 = row.try_get("attempt")?;
    let corrupt = |what: String| StoreError::Corrupt(what);
    Ok(InstanceRow {
        id: row.try_get("id")?,
        saga: row.try_get("saga")?,
        aggregate_id: row.try_get("aggregate_id")?,
        state: InstanceState {
            status: InstanceStatus::parse(&status)
                .ok_or_else(|| corrupt(format!("status {status:?}")))?,
            cursor: Cursor {
                step: u32::try_from(step).map_err(|_| corrupt(format!("step {step}")))?,
                phase: Phase::parse(&phase).ok_or_else(|| corrupt(format!("phase {phase:?}")))?,
                attempt: u32::try_from(attempt)
                    .map_err(|_| corrupt(format!("attempt {attempt}")))?,
            },
        },
        payload: row.try_get::<sqlx::types::Json<Value>, _>("payload")?.0,
        outputs: row.try_get::<sqlx::types::Json<Value>, _>("outputs")?.0,
    })
}
