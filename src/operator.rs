//! Operator actions on instances — retry now, cancel, resume — shared by the API
//! (and any future CLI). Each is recorded in `skald.operator_actions` (who, when,
//! what) and idempotent:
//!
//! - every message an action sends is the run message of the instance's current
//!   cursor, whose id is deterministic: sending it twice, or alongside the delayed
//!   copy of a pending retry, runs the step once (the inbox drops the other copy);
//! - cancel changes the instance only while it is still going forward; a repeated
//!   cancel re-sends the compensation message of the current cursor, which also
//!   repairs a crash between the cancel's commit and its send.

use chrono::Utc;
use serde_json::{Value, json};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::dlq::{self, DlqError, ReplayOutcome};
use crate::engine::first_step_message;
use crate::envelope::{Envelope, Outgoing};
use crate::saga::coordinator::{self, CancelRefusal, InstanceStatus};
use crate::saga::decide::deadline_after;
use crate::saga::{Catalog, decide};
use crate::store::commands;
use crate::store::dead_letters::{self, DeadLetterStatus};
use crate::store::steps::promote_next;
use crate::store::{InstanceSnapshot, Store, StoreError, lock_instance, resume_instance};
use crate::transport::{Endpoint, Transport, TransportError};

/// Why an action was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// No such instance.
    #[error("no instance {0}")]
    NotFound(Uuid),
    /// The action does not apply to the instance's state.
    #[error("{0}")]
    Conflict(String),
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker failed (the action is recorded; repeat it to send again).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Replaying the dead letter failed.
    #[error(transparent)]
    Dlq(#[from] DlqError),
}

impl From<sqlx::Error> for OperatorError {
    fn from(e: sqlx::Error) -> Self {
        OperatorError::Store(StoreError::Database(e))
    }
}

/// What an action did, for the caller to show.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionOutcome {
    /// The action took effect now.
    Done,
    /// It had taken effect before; its message was sent again (dropped as a copy if
    /// the first arrived).
    AlreadyDone,
}

async fn record(
    conn: &mut PgConnection,
    instance: Uuid,
    action: &str,
    by: &str,
    detail: Value,
) -> Result<(), OperatorError> {
    sqlx::query(
        "INSERT INTO skald.operator_actions (instance_id, action, actor, detail) \
         VALUES ($1, $2, $3, $4)",
    )
    .bind(instance)
    .bind(action)
    .bind(by)
    .bind(sqlx::types::Json(detail))
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The run message of the instance's current cursor (deterministic id), carrying the
/// state a step needs.
fn current_message(id: Uuid, snap: &InstanceSnapshot) -> Outgoing {
    Outgoing::to_intake(
        Envelope {
            outputs: snap.outputs.clone(),
            deadline: snap.deadline,
            ..Envelope::run(
                &snap.saga,
                snap.saga_version,
                &snap.aggregate_id,
                id,
                snap.state.cursor,
                snap.payload.clone(),
            )
        },
        0,
    )
}

async fn locked(conn: &mut PgConnection, id: Uuid) -> Result<InstanceSnapshot, OperatorError> {
    lock_instance(conn, id)
        .await?
        .ok_or(OperatorError::NotFound(id))
}

/// Runs the instance's pending retry now instead of after its backoff delay; for an
/// instance waiting for a command's reply, sends that command again (same id).
pub async fn retry_now(
    store: &Store,
    transport: &dyn Transport,
    id: Uuid,
    by: &str,
) -> Result<ActionOutcome, OperatorError> {
    let mut tx = store.pool().begin().await?;
    let snap = locked(&mut tx, id).await?;
    let live = matches!(
        snap.state.status,
        InstanceStatus::Running | InstanceStatus::Compensating
    );
    // Waiting for a command's reply: send the very same command again (the service
    // answers a copy without running it twice); its reply timer keeps running.
    if live
        && let Some((service, command)) =
            commands::waiting_at(&mut tx, id, snap.state.cursor).await?
    {
        record(
            &mut tx,
            id,
            "retry",
            by,
            json!({ "cursor": snap.state.cursor, "resent_command": command.message_id }),
        )
        .await?;
        tx.commit().await?;
        transport
            .send_to(
                &Endpoint::Service(service),
                &command.aggregate_id,
                &command.to_body(),
            )
            .await?;
        tracing::info!(instance = %id, by, command_id = %command.message_id,
            "operator: retry now re-sent the awaited command");
        return Ok(ActionOutcome::Done);
    }
    let last_failed: bool = sqlx::query_scalar(
        "SELECT coalesce((SELECT outcome = 'failed' FROM skald.inbox \
           WHERE instance_id = $1 AND disposition = 'applied' \
           ORDER BY finished_at DESC LIMIT 1), false)",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await?;
    if !live || !last_failed {
        return Err(OperatorError::Conflict(format!(
            "instance {id} has no retry pending (it is {})",
            snap.state.status.as_str()
        )));
    }
    let message = current_message(id, &snap);
    record(
        &mut tx,
        id,
        "retry",
        by,
        json!({ "cursor": snap.state.cursor }),
    )
    .await?;
    tx.commit().await?;
    message.send(transport).await?;
    tracing::info!(instance = %id, by, "operator: retry now");
    Ok(ActionOutcome::Done)
}

/// Stops the instance going forward and compensates its completed steps.
pub async fn cancel(
    store: &Store,
    catalog: &Catalog,
    transport: &dyn Transport,
    id: Uuid,
    by: &str,
) -> Result<ActionOutcome, OperatorError> {
    let mut tx = store.pool().begin().await?;
    let snap = locked(&mut tx, id).await?;
    // The instance's own version decides how it compensates, never the newest.
    let saga = catalog
        .get_version(&snap.saga, snap.saga_version)
        .ok_or_else(|| {
            OperatorError::Conflict(format!(
                "saga {} version {} is not loaded",
                snap.saga, snap.saga_version
            ))
        })?;
    let (messages, outcome) = match coordinator::cancel(saga, snap.state) {
        Ok(t) => {
            resume_instance(&mut tx, id, t.state, &snap.payload).await?;
            // A command the instance waited on no longer applies: its reply is late.
            commands::cancel_waiting(&mut tx, id).await?;
            if t.state.status.is_terminal() {
                sqlx::query("UPDATE skald.instances SET finished_at = now() WHERE id = $1")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            let moved = InstanceSnapshot {
                state: t.state,
                ..snap.clone()
            };
            let mut messages: Vec<Outgoing> = t
                .next
                .map(|_| current_message(id, &moved))
                .into_iter()
                .collect();
            // The lock holder ended at once (nothing to undo): an exclusive saga's lock
            // passes on. A cancelled *waiting* instance never held it.
            if decide::passes_lock(saga, snap.state.status, t.state.status)
                && let deadline = deadline_after(Utc::now(), saga.timeout)
                && let Some(promoted) =
                    promote_next(&mut tx, &snap.saga, &snap.aggregate_id, deadline).await?
            {
                messages.push(first_step_message(
                    &snap.saga,
                    &snap.aggregate_id,
                    promoted,
                    deadline,
                ));
            }
            record(
                &mut tx,
                id,
                "cancel",
                by,
                json!({ "from": snap.state.cursor }),
            )
            .await?;
            (messages, ActionOutcome::Done)
        }
        Err(CancelRefusal::AlreadyCompensating) => {
            (vec![current_message(id, &snap)], ActionOutcome::AlreadyDone)
        }
        Err(CancelRefusal::Terminal(InstanceStatus::Compensated)) => {
            (Vec::new(), ActionOutcome::AlreadyDone)
        }
        Err(CancelRefusal::Terminal(status)) => {
            return Err(OperatorError::Conflict(format!(
                "instance {id} is already {}",
                status.as_str()
            )));
        }
        Err(CancelRefusal::PastPivot) => {
            return Err(OperatorError::Conflict(format!(
                "instance {id} is past its pivot step: it can only go forward"
            )));
        }
    };
    tx.commit().await?;
    for m in &messages {
        m.send(transport).await?;
    }
    tracing::info!(instance = %id, by, ?outcome, "operator: cancel");
    Ok(outcome)
}

/// Resumes a parked (failed) instance by replaying its pending dead letter.
pub async fn resume(
    store: &Store,
    transport: &dyn Transport,
    id: Uuid,
    by: &str,
) -> Result<ActionOutcome, OperatorError> {
    let letters = dead_letters::for_instance(store.pool(), id).await?;
    let Some(letter) = letters
        .iter()
        .rev()
        .find(|l| l.status != DeadLetterStatus::Discarded)
    else {
        // No letter to replay: an unknown instance is NotFound, as for retry and cancel.
        locked(&mut *store.pool().acquire().await?, id).await?;
        return Err(OperatorError::Conflict(format!(
            "instance {id} is not parked"
        )));
    };
    let outcome = dlq::replay(store, transport, letter.id, None, by).await?;
    let mut conn = store.pool().acquire().await?;
    record(
        &mut conn,
        id,
        "resume",
        by,
        json!({ "dead_letter": letter.id }),
    )
    .await?;
    Ok(match outcome {
        ReplayOutcome::Replayed => ActionOutcome::Done,
        ReplayOutcome::AlreadyReplayed { .. } => ActionOutcome::AlreadyDone,
    })
}
