//! The statements of one message's transaction.
//!
//! A message is handled in one transaction of two statements besides BEGIN/COMMIT —
//! the same round trips as a hand-written consume→commit→ack worker:
//!
//! 1. the step's effect (see [`super::effects`]), with parameters bound from the
//!    message itself (run messages carry the payload and the outputs so far);
//! 2. the *record*: the inbox row (message id, the attempt, what to send next) and the
//!    instance's new state, guarded so that it only applies when the message is new
//!    and the instance still expects exactly this step.
//!
//! When the guard does not match, the caller rolls back — the effect with it — and
//! asks [`super::Store::disposal`] why: a copy of a handled message, or one that is
//! out of date. Concurrent handlers of one instance serialise on its row lock, and the
//! later one re-checks the guard against the committed state.
//!
//! **Batches.** Inside [`SharedTx::scope`], a [`StepTx`] is not a transaction of its
//! own but a part of the batch's one transaction: its begin is a `BEGIN` (the batch's
//! first) or a `SAVEPOINT`, its rollback a `ROLLBACK` or `ROLLBACK TO SAVEPOINT`, its
//! commit keeps the work for the batch's single `COMMIT` ([`SharedTx::commit`]). The
//! code that handles a message is the same either way; a step that fails, or that ends
//! in an error, is undone alone ([`SharedTx::undo_step`]).

use std::sync::{Arc, LazyLock};

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use super::StoreError;
use crate::envelope::Outgoing;
use crate::saga::coordinator::{Cursor, FailureKind, InstanceState, Outcome};

/// The instance a start message creates.
#[derive(Debug, Clone)]
pub struct NewInstance<'a> {
    /// The saga's name.
    pub saga: &'a str,
    /// The saga's version at start.
    pub saga_version: u32,
    /// That version's [`crate::saga::SagaDef::content_hash`].
    pub saga_hash: &'a str,
    /// The start message's id (the instance id derives from it).
    pub start_message_id: Uuid,
    /// The start's order key ([`crate::envelope::Envelope::order_key`]), if any.
    pub sequence: Option<u64>,
    /// The saga's deadline, if it has a timeout.
    pub deadline: Option<DateTime<Utc>>,
}

/// What one handled message leaves behind: the attempt, and the instance's new state.
#[derive(Debug, Clone)]
pub struct StepRecord<'a> {
    /// The handled message.
    pub message_id: Uuid,
    /// Its instance.
    pub instance_id: Uuid,
    /// The instance's aggregate.
    pub aggregate_id: &'a str,
    /// The instance's payload.
    pub payload: &'a Value,
    /// What ran.
    pub ran: Cursor,
    /// The step's name.
    pub step_name: &'a str,
    /// How it ended, or that it sent a command.
    pub outcome: InboxOutcome,
    /// The failure's message, if it failed.
    pub error: Option<&'a str>,
    /// When the attempt began.
    pub started_at: DateTime<Utc>,
    /// The instance's state after this attempt.
    pub new_state: InstanceState,
    /// All outputs after this attempt (the previous ones plus this step's).
    pub outputs: &'a Value,
    /// The messages to publish after commit.
    pub outgoing: &'a [Outgoing],
}

/// What an inbox row of an attempt says happened (`skald.inbox.outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboxOutcome {
    /// The step ran (or its reply was applied) and ended so.
    Ran(Outcome),
    /// A command step sent its command (or sent it again after a reply timeout, then
    /// with the reason as the row's `error`): the instance waits for the reply.
    Sent,
}

/// The record of a start (see [`StepTx::record_start`]), built once.
static RECORD_START: LazyLock<String> = LazyLock::new(|| {
    let watermark = watermark_cte("$18", "$20", "$23");
    format!(
        "{INBOX_CTE} \
         {watermark} \
         INSERT INTO skald.instances (id, status, step, phase, attempt, outputs, finished_at, \
           saga, saga_version, aggregate_id, payload, start_message_id, sequence, deadline, \
           saga_hash) \
         SELECT $2, $12, $13, $14, $15, $16, CASE WHEN $17 THEN now() END, \
           $18, $19, $20, $21, $22, $23, $24, $25 \
         WHERE EXISTS (SELECT 1 FROM inbox) \
           AND ($23::bigint IS NULL OR EXISTS (SELECT 1 FROM watermark)) \
         ON CONFLICT (id) DO NOTHING"
    )
});

/// The record of a run message (see [`StepTx::record_run`]), built once.
static RECORD_RUN: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{INBOX_CTE} \
         UPDATE skald.instances SET status = $12, step = $13, phase = $14, attempt = $15, \
           outputs = $16, finished_at = CASE WHEN $17 THEN now() END, updated_at = now() \
         WHERE id = $2 AND status IN ('running', 'compensating') \
           AND step = $18 AND phase = $19 AND attempt = $20 \
           AND EXISTS (SELECT 1 FROM inbox)"
    )
});

/// The record of a queued start (see [`StepTx::record_waiting`]), built once.
static RECORD_WAITING: LazyLock<String> = LazyLock::new(|| {
    let watermark = watermark_cte("$3", "$4", "$7");
    format!(
        "WITH inbox AS ( \
           INSERT INTO skald.inbox (message_id, instance_id, disposition) \
           VALUES ($1, $2, 'queued') ON CONFLICT (message_id) DO NOTHING RETURNING 1) \
         {watermark} \
         INSERT INTO skald.instances (id, status, step, phase, attempt, saga, saga_version, \
           aggregate_id, payload, start_message_id, sequence, saga_hash) \
         SELECT $2, 'waiting', 0, 'forward', 1, $3, $5, $4, $6, $1, $7, $8 \
         WHERE EXISTS (SELECT 1 FROM inbox) \
           AND ($7::bigint IS NULL OR EXISTS (SELECT 1 FROM watermark)) \
         ON CONFLICT (id) DO NOTHING"
    )
});

/// The transaction one message is handled in: its own, or its part of a batch's.
pub struct StepTx {
    inner: Inner,
}

enum Inner {
    /// A transaction of its own (`None` once committed or rolled back).
    Own(Option<Transaction<'static, Postgres>>),
    /// A part of the batch's transaction, from `mark` on.
    Shared {
        conn: OwnedMutexGuard<SharedConn>,
        mark: Mark,
        done: bool,
    },
}

/// Where a part of a shared transaction began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// It began the transaction (`BEGIN`): undoing it is `ROLLBACK`.
    Begin,
    /// `SAVEPOINT s<n>`: undoing it is `ROLLBACK TO SAVEPOINT s<n>`.
    Savepoint(u32),
}

impl Mark {
    fn undo_sql(self) -> String {
        match self {
            Mark::Begin => "ROLLBACK".to_string(),
            Mark::Savepoint(n) => format!("ROLLBACK TO SAVEPOINT s{n}"),
        }
    }
}

tokio::task_local! {
    /// The batch transaction the steps of the current task take part in.
    static SHARED: SharedTx;
}

/// One transaction shared by the steps of a batch, on one pooled connection. The steps
/// run one after the other; each is undone alone if it fails.
#[derive(Clone)]
pub struct SharedTx {
    conn: Arc<Mutex<SharedConn>>,
}

struct SharedConn {
    conn: PoolConnection<Postgres>,
    /// A transaction is open (`BEGIN` was sent, no `COMMIT`/`ROLLBACK` yet).
    open: bool,
    /// The number of the next savepoint.
    next: u32,
    /// Where the current step's first part began, if it has begun one.
    first: Option<Mark>,
    /// A part dropped without commit or rollback: undone before the next statement.
    abandoned: Option<Mark>,
}

impl SharedConn {
    async fn exec(&mut self, sql: &str) -> Result<(), StoreError> {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&mut *self.conn)
            .await?;
        Ok(())
    }

    /// Undoes the work from `mark` on.
    async fn undo(&mut self, mark: Mark) -> Result<(), StoreError> {
        if mark == Mark::Begin {
            // Whatever happens next, the transaction is no longer open.
            self.open = false;
        }
        self.exec(&mark.undo_sql()).await
    }

    async fn settle_abandoned(&mut self) -> Result<(), StoreError> {
        match self.abandoned.take() {
            Some(mark) => self.undo(mark).await,
            None => Ok(()),
        }
    }

    /// Opens a new part: `BEGIN` if no transaction is open, else a savepoint.
    async fn begin_part(&mut self) -> Result<Mark, StoreError> {
        self.settle_abandoned().await?;
        let mark = if self.open {
            self.next += 1;
            let n = self.next;
            self.exec(&format!("SAVEPOINT s{n}")).await?;
            Mark::Savepoint(n)
        } else {
            self.exec("BEGIN").await?;
            self.open = true;
            Mark::Begin
        };
        self.first.get_or_insert(mark);
        Ok(mark)
    }
}

impl Drop for SharedConn {
    fn drop(&mut self) {
        if self.open {
            // Never hand the pool a connection inside a transaction: closing it rolls
            // the transaction back.
            self.conn.close_on_drop();
        }
    }
}

impl SharedTx {
    /// Takes a connection from `pool` for a batch (the transaction opens with its first
    /// step's first part).
    pub async fn start(pool: &PgPool) -> Result<SharedTx, StoreError> {
        Ok(SharedTx {
            conn: Arc::new(Mutex::new(SharedConn {
                conn: pool.acquire().await?,
                open: false,
                next: 0,
                first: None,
                abandoned: None,
            })),
        })
    }

    /// Runs one step's handling `f`: every [`StepTx`] it begins is a part of this
    /// transaction.
    /// A step may be run in several scopes (its handling, then its transport's
    /// staging): it ends with [`SharedTx::end_step`] or [`SharedTx::undo_step`].
    pub async fn scope<F: Future>(&self, f: F) -> F::Output {
        SHARED.scope(self.clone(), f).await
    }

    /// Keeps what the step just run (in [`SharedTx::scope`]) committed in its parts,
    /// undoing only a part it abandoned.
    pub async fn end_step(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().await;
        conn.first = None;
        conn.settle_abandoned().await
    }

    /// Undoes everything the step just run did, its committed parts included; the
    /// other steps' work stays.
    pub async fn undo_step(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().await;
        conn.abandoned = None;
        match conn.first.take() {
            Some(mark) => conn.undo(mark).await,
            None => Ok(()),
        }
    }

    /// Commits every step's kept work at once (nothing to do if none began a part).
    pub async fn commit(self) -> Result<(), StoreError> {
        let mut conn = self.conn.lock().await;
        conn.settle_abandoned().await?;
        if conn.open {
            conn.exec("COMMIT").await?;
            conn.open = false;
        }
        Ok(())
    }
}

/// Inserts the inbox row unless the message id is there already; `inbox` is empty
/// then, and the statement that follows does nothing.
const INBOX_CTE: &str = "WITH inbox AS ( \
       INSERT INTO skald.inbox (message_id, instance_id, disposition, step, step_name, phase, \
         attempt, outcome, error_kind, error, outgoing, started_at) \
       VALUES ($1, $2, 'applied', $3, $4, $5, $6, $7, $8, $9, $10, $11) \
       ON CONFLICT (message_id) DO NOTHING RETURNING 1) ";

impl StepTx {
    /// Begins a step's transaction: a transaction of its own from `pool`, or, inside
    /// [`SharedTx::scope`], the next part of the batch's.
    pub async fn begin(pool: &PgPool) -> Result<Self, StoreError> {
        let Ok(shared) = SHARED.try_with(SharedTx::clone) else {
            return Ok(StepTx {
                inner: Inner::Own(Some(pool.begin().await?)),
            });
        };
        let mut conn = shared.conn.try_lock_owned().map_err(|_| {
            sqlx::Error::Protocol(
                "a step began a transaction while its previous one was open".into(),
            )
        })?;
        let mark = conn.begin_part().await?;
        Ok(StepTx {
            inner: Inner::Shared {
                conn,
                mark,
                done: false,
            },
        })
    }

    /// The transaction's connection, for the step's effect.
    pub fn conn(&mut self) -> &mut PgConnection {
        match &mut self.inner {
            Inner::Own(tx) => tx.as_mut().expect("an open transaction"),
            Inner::Shared { conn, .. } => &mut conn.conn,
        }
    }

    /// Records the first step of a new instance, creating the instance in its new
    /// state, and moves the aggregate's watermark to the start's sequence (if it has
    /// one). `false` (nothing written) when this start message was handled before, or
    /// when its sequence is not above the watermark (stale).
    pub async fn record_start(
        &mut self,
        rec: &StepRecord<'_>,
        new: &NewInstance<'_>,
    ) -> Result<bool, StoreError> {
        let done = bind_record(sqlx::query(RECORD_START.as_str()), rec)
            .bind(new.saga.to_string())
            .bind(new.saga_version as i32)
            .bind(rec.aggregate_id.to_string())
            .bind(sqlx::types::Json(rec.payload.clone()))
            .bind(new.start_message_id)
            .bind(new.sequence.map(|s| s as i64))
            .bind(new.deadline)
            .bind(new.saga_hash)
            .execute(self.conn())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records an attempt of a run message, moving the instance to its new state, but
    /// only if the message is new and the instance is live and expects exactly
    /// `expected`. `false` (nothing written) otherwise.
    pub async fn record_run(
        &mut self,
        rec: &StepRecord<'_>,
        expected: Cursor,
    ) -> Result<bool, StoreError> {
        let done = bind_record(sqlx::query(RECORD_RUN.as_str()), rec)
            .bind(expected.step as i32)
            .bind(expected.phase.as_str())
            .bind(expected.attempt as i32)
            .execute(self.conn())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether another instance of `saga` on `aggregate_id` is waiting or live — the
    /// semantic lock of `isolation: exclusive`.
    pub async fn exclusive_busy(
        &mut self,
        saga: &str,
        aggregate_id: &str,
    ) -> Result<bool, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM skald.instances WHERE aggregate_id = $2 AND saga = $1 \
               AND status IN ('waiting', 'running', 'compensating'))",
        )
        .bind(saga)
        .bind(aggregate_id)
        .fetch_one(self.conn())
        .await?)
    }

    /// Records a start of an exclusive saga that must wait its turn: the instance is
    /// created `waiting` (nothing runs) and the watermark moves as for any start.
    /// `false` (nothing written) for a copy or a stale start.
    pub async fn record_waiting(
        &mut self,
        message_id: Uuid,
        instance_id: Uuid,
        aggregate_id: &str,
        payload: &Value,
        new: &NewInstance<'_>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(RECORD_WAITING.as_str())
            .bind(message_id)
            .bind(instance_id)
            .bind(new.saga)
            .bind(aggregate_id)
            .bind(new.saga_version as i32)
            .bind(sqlx::types::Json(payload))
            .bind(new.sequence.map(|s| s as i64))
            .bind(new.saga_hash)
            .execute(self.conn())
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// [`promote_next`] inside this transaction.
    pub async fn promote_next(
        &mut self,
        saga: &str,
        aggregate_id: &str,
        deadline: Option<DateTime<Utc>>,
    ) -> Result<Option<Promoted>, StoreError> {
        promote_next(self.conn(), saga, aggregate_id, deadline).await
    }

    /// Records a message that was handled without running anything — out of date for
    /// its instance (`skipped`), or a start older than its aggregate's watermark
    /// (`stale`) — so that copies of it are recognised too.
    pub async fn record_skipped(
        &mut self,
        message_id: Uuid,
        instance_id: Uuid,
        stale: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO skald.inbox (message_id, instance_id, disposition) \
             VALUES ($1, $2, $3) ON CONFLICT (message_id) DO NOTHING",
        )
        .bind(message_id)
        .bind(instance_id)
        .bind(if stale { "stale" } else { "skipped" })
        .execute(self.conn())
        .await?;
        Ok(())
    }

    /// Commits everything the message did (in a batch: keeps it for the batch's
    /// commit).
    pub async fn commit(mut self) -> Result<(), StoreError> {
        match &mut self.inner {
            Inner::Own(tx) => tx.take().expect("an open transaction").commit().await?,
            Inner::Shared { done, .. } => *done = true,
        }
        Ok(())
    }

    /// Undoes everything the message did (in a batch: this part only).
    pub async fn rollback(mut self) -> Result<(), StoreError> {
        match &mut self.inner {
            Inner::Own(tx) => tx.take().expect("an open transaction").rollback().await?,
            Inner::Shared { conn, mark, done } => {
                *done = true;
                conn.undo(*mark).await?;
            }
        }
        Ok(())
    }
}

impl Drop for StepTx {
    /// Dropped unfinished (an error cut the handling short): undone, as a transaction
    /// of its own would be — in a batch, before the connection's next statement.
    fn drop(&mut self) {
        if let Inner::Shared {
            conn,
            mark,
            done: false,
        } = &mut self.inner
        {
            conn.abandoned = Some(*mark);
        }
    }
}

/// The CTE that moves the (saga, aggregate) watermark to `sequence` — only forward,
/// and only if the `inbox` CTE inserted the message. Empty when the start is stale,
/// so the statement that follows it creates nothing. Arguments are placeholders.
fn watermark_cte(saga: &str, aggregate_id: &str, sequence: &str) -> String {
    format!(
        ", watermark AS ( \
           INSERT INTO skald.watermarks (saga, aggregate_id, sequence) \
           SELECT {saga}, {aggregate_id}, {sequence} \
           WHERE {sequence} IS NOT NULL AND EXISTS (SELECT 1 FROM inbox) \
           ON CONFLICT (saga, aggregate_id) DO UPDATE \
             SET sequence = EXCLUDED.sequence, updated_at = now() \
             WHERE skald.watermarks.sequence < EXCLUDED.sequence \
           RETURNING 1)"
    )
}

/// Binds `$1..$17`: the inbox row (`$1..$11`) and the new state (`$12..$17`).
fn bind_record<'q>(
    q: Query<'q, Postgres, PgArguments>,
    rec: &StepRecord<'_>,
) -> Query<'q, Postgres, PgArguments> {
    let (outcome, error_kind) = match rec.outcome {
        InboxOutcome::Ran(Outcome::Succeeded) => ("succeeded", None),
        InboxOutcome::Ran(Outcome::Failed(FailureKind::Retryable)) => ("failed", Some("retryable")),
        InboxOutcome::Ran(Outcome::Failed(FailureKind::Fatal)) => ("failed", Some("fatal")),
        // A re-send after a reply timeout: the timeout was a retryable failure.
        InboxOutcome::Sent => ("sent", rec.error.map(|_| "retryable")),
    };
    q.bind(rec.message_id)
        .bind(rec.instance_id)
        .bind(rec.ran.step as i32)
        .bind(rec.step_name.to_string())
        .bind(rec.ran.phase.as_str())
        .bind(rec.ran.attempt as i32)
        .bind(outcome)
        .bind(error_kind)
        .bind(rec.error.map(str::to_string))
        .bind(sqlx::types::Json(rec.outgoing.to_vec()))
        .bind(rec.started_at)
        .bind(rec.new_state.status.as_str())
        .bind(rec.new_state.cursor.step as i32)
        .bind(rec.new_state.cursor.phase.as_str())
        .bind(rec.new_state.cursor.attempt as i32)
        .bind(sqlx::types::Json(rec.outputs.clone()))
        .bind(rec.new_state.status.is_terminal())
}

/// A waiting instance just promoted to running: what its first step message needs.
#[derive(Debug, Clone)]
pub struct Promoted {
    /// The instance.
    pub id: Uuid,
    /// The saga version it was started with (not necessarily the lock holder's).
    pub saga_version: u32,
    /// Its start payload.
    pub payload: Value,
}

/// Promotes the oldest waiting instance of `saga` on `aggregate_id` to running (the
/// semantic lock passes on) with its saga `deadline` (its clock starts now); returns
/// what its first step message needs.
pub async fn promote_next(
    conn: &mut PgConnection,
    saga: &str,
    aggregate_id: &str,
    deadline: Option<DateTime<Utc>>,
) -> Result<Option<Promoted>, StoreError> {
    let row: Option<(Uuid, i32, sqlx::types::Json<Value>)> = sqlx::query_as(
        "UPDATE skald.instances SET status = 'running', deadline = $3, updated_at = now() \
         WHERE id = (SELECT id FROM skald.instances \
                     WHERE saga = $1 AND aggregate_id = $2 AND status = 'waiting' \
                     ORDER BY created_at, sequence LIMIT 1 FOR UPDATE) \
         RETURNING id, saga_version, payload",
    )
    .bind(saga)
    .bind(aggregate_id)
    .bind(deadline)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|(id, version, payload)| {
        Ok(Promoted {
            id,
            saga_version: u32::try_from(version)
                .map_err(|_| StoreError::Corrupt(format!("saga_version {version}")))?,
            payload: payload.0,
        })
    })
    .transpose()
}
