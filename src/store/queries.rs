//! Read models for the dashboard and the CLI: instances and their timelines.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::{Store, StoreError, state_from_row};
use crate::saga::coordinator::{Cursor, InstanceStatus};

/// Which instances to list. Every field narrows the list; `after` pages.
#[derive(Debug, Clone, Default)]
pub struct InstanceFilter {
    /// Only this saga.
    pub saga: Option<String>,
    /// Only this status.
    pub status: Option<InstanceStatus>,
    /// Only this aggregate.
    pub aggregate_id: Option<String>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    /// Continue after this (created_at, id) — the cursor of the previous page.
    pub after: Option<(DateTime<Utc>, Uuid)>,
    /// At most this many (the caller bounds it).
    pub limit: i64,
}

/// One instance in a list.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceSummary {
    /// Its id.
    pub id: Uuid,
    /// Its saga.
    pub saga: String,
    /// The saga's version at start.
    pub saga_version: i32,
    /// Its aggregate.
    pub aggregate_id: String,
    /// Where it is.
    pub status: InstanceStatus,
    /// What it runs next (or ran last).
    pub cursor: Cursor,
    /// When it started.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it became terminal.
    pub finished_at: Option<DateTime<Utc>>,
}

/// One handled message of an instance: an attempt of a step or compensation (with
/// its error), or a message recorded without running anything.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    /// The message.
    pub message_id: Uuid,
    /// `applied`, `skipped` (out of date), `stale`, or `queued` (waiting its turn).
    pub disposition: String,
    /// The step's index, name and phase (for applied messages).
    pub step: Option<i32>,
    /// The step's name.
    pub step_name: Option<String>,
    /// `forward` or `compensate`.
    pub phase: Option<String>,
    /// Which try.
    pub attempt: Option<i32>,
    /// `succeeded` or `failed`.
    pub outcome: Option<String>,
    /// `retryable` or `fatal`.
    pub error_kind: Option<String>,
    /// The failure's message.
    pub error: Option<String>,
    /// The messages this one sent on.
    pub sent: Value,
    /// When the attempt began.
    pub started_at: Option<DateTime<Utc>>,
    /// When it committed.
    pub finished_at: DateTime<Utc>,
}

/// One instance with everything that happened to it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceDetail {
    /// The summary fields.
    #[serde(flatten)]
    pub summary: InstanceSummary,
    /// The start payload.
    pub payload: Value,
    /// Outputs captured so far.
    pub outputs: Value,
    /// The start message's id.
    pub start_message_id: Uuid,
    /// The publisher's sequence number.
    pub sequence: Option<i64>,
    /// Every handled message, in commit order.
    pub timeline: Vec<TimelineEntry>,
}

const SUMMARY_COLUMNS: &str = "id, saga, saga_version, aggregate_id, status, step, phase, \
                               attempt, created_at, updated_at, finished_at";

fn summary_from_row(row: &PgRow) -> Result<InstanceSummary, StoreError> {
    let state = state_from_row(row)?;
    Ok(InstanceSummary {
        id: row.try_get("id")?,
        saga: row.try_get("saga")?,
        saga_version: row.try_get("saga_version")?,
        aggregate_id: row.try_get("aggregate_id")?,
        status: state.status,
        cursor: state.cursor,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

impl Store {
    /// Instances matching `filter`, newest first.
    pub async fn instances(
        &self,
        filter: &InstanceFilter,
    ) -> Result<Vec<InstanceSummary>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS} FROM skald.instances \
             WHERE ($1::text IS NULL OR saga = $1) AND ($2::text IS NULL OR status = $2) \
               AND ($3::text IS NULL OR aggregate_id = $3) \
               AND ($4::timestamptz IS NULL OR created_at >= $4) \
               AND ($5::timestamptz IS NULL OR created_at < $5) \
               AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7)) \
             ORDER BY created_at DESC, id DESC LIMIT $8"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(filter.saga.as_deref())
            .bind(filter.status.map(InstanceStatus::as_str))
            .bind(filter.aggregate_id.as_deref())
            .bind(filter.since)
            .bind(filter.until)
            .bind(filter.after.map(|(t, _)| t))
            .bind(filter.after.map(|(_, id)| id))
            .bind(filter.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(summary_from_row).collect()
    }

    /// One instance with its timeline; `None` if there is no such instance.
    pub async fn instance(&self, id: Uuid) -> Result<Option<InstanceDetail>, StoreError> {
        let sql = format!(
            "SELECT {SUMMARY_COLUMNS}, payload, outputs, start_message_id, sequence \
             FROM skald.instances WHERE id = $1"
        );
        let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let timeline = sqlx::query(
            "SELECT message_id, disposition, step, step_name, phase, attempt, outcome, \
                    error_kind, error, outgoing, started_at, finished_at \
             FROM skald.inbox WHERE instance_id = $1 ORDER BY finished_at, message_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            Ok(TimelineEntry {
                message_id: r.try_get("message_id")?,
                disposition: r.try_get("disposition")?,
                step: r.try_get("step")?,
                step_name: r.try_get("step_name")?,
                phase: r.try_get("phase")?,
                attempt: r.try_get("attempt")?,
                outcome: r.try_get("outcome")?,
                error_kind: r.try_get("error_kind")?,
                error: r.try_get("error")?,
                sent: r.try_get::<sqlx::types::Json<Value>, _>("outgoing")?.0,
                started_at: r.try_get("started_at")?,
                finished_at: r.try_get("finished_at")?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(InstanceDetail {
            summary: summary_from_row(&row)?,
            payload: row.try_get::<sqlx::types::Json<Value>, _>("payload")?.0,
            outputs: row.try_get::<sqlx::types::Json<Value>, _>("outputs")?.0,
            start_message_id: row.try_get("start_message_id")?,
            sequence: row.try_get("sequence")?,
            timeline,
        }))
    }

    /// Dead letters per kind and status, for stats and metrics.
    pub async fn dead_letter_counts(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT kind, status, count(*) FROM skald.dead_letters GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Steps committed per minute over the last `minutes` minutes (oldest first),
    /// with how many of them failed.
    pub async fn throughput(
        &self,
        minutes: i32,
    ) -> Result<Vec<(DateTime<Utc>, i64, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT date_trunc('minute', finished_at) AS minute, count(*), \
                    count(*) FILTER (WHERE outcome = 'failed') \
             FROM skald.inbox \
             WHERE disposition = 'applied' \
               AND finished_at >= now() - make_interval(mins => $1) \
             GROUP BY 1 ORDER BY 1",
        )
        .bind(minutes)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Whether PostgreSQL answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}
