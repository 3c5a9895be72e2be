//! The rows failure groups are made of: every instance's failed attempts, by step and
//! exact error text, and its pending dead letters.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Store, StoreError};
use crate::saga::coordinator::InstanceStatus;

/// One instance's failed attempts of one step and phase with one exact error.
#[derive(Debug, Clone)]
pub struct FailedAttempts {
    /// The instance.
    pub instance_id: Uuid,
    /// Its saga.
    pub saga: String,
    /// Its status now.
    pub status: InstanceStatus,
    /// The step's name.
    pub step: Option<String>,
    /// `forward` or `compensate`.
    pub phase: Option<String>,
    /// The error text as recorded.
    pub error: String,
    /// How many attempts failed so.
    pub attempts: i64,
    /// The first of them.
    pub first: DateTime<Utc>,
    /// The last of them.
    pub last: DateTime<Utc>,
    /// The instance's pending dead letters.
    pub pending_letters: Vec<Uuid>,
}

impl Store {
    /// Every failed attempt, per instance, step, phase and exact error (of `saga`
    /// only, when given).
    pub async fn failed_attempts(
        &self,
        saga: Option<&str>,
    ) -> Result<Vec<FailedAttempts>, StoreError> {
        type Row = (
            Uuid,
            String,
            String,
            Option<String>,
            Option<String>,
            String,
            i64,
            DateTime<Utc>,
            DateTime<Utc>,
            Vec<Uuid>,
        );
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT b.instance_id, i.saga, i.status, b.step_name, b.phase, \
                    coalesce(b.error, ''), count(*), min(b.finished_at), max(b.finished_at), \
                    coalesce((SELECT array_agg(d.id ORDER BY d.created_at) \
                              FROM skald.dead_letters d \
                              WHERE d.instance_id = b.instance_id AND d.status = 'pending'), \
                             '{}') \
             FROM skald.inbox b JOIN skald.instances i ON i.id = b.instance_id \
             WHERE b.outcome = 'failed' AND ($1::text IS NULL OR i.saga = $1) \
             GROUP BY b.instance_id, i.saga, i.status, b.step_name, b.phase, b.error",
        )
        .bind(saga)
        .fetch_all(self.pool())
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(FailedAttempts {
                    instance_id: r.0,
                    saga: r.1,
                    status: InstanceStatus::parse(&r.2).ok_or_else(|| {
                        StoreError::Corrupt(format!("unknown instance status {:?}", r.2))
                    })?,
                    step: r.3,
                    phase: r.4,
                    error: r.5,
                    attempts: r.6,
                    first: r.7,
                    last: r.8,
                    pending_letters: r.9,
                })
            })
            .collect()
    }
}
