//! Failure groups: across all instances, failed attempts and the dead letters they
//! led to, grouped by saga, step, phase and error [`signature`](mod@signature) (SQLSTATE or handler
//! code, normalised message), with counts, first and last seen; and the operator
//! actions on a whole group — retry its members, discard their dead letters — paced
//! and recorded.
//!
//! A group's *members* are the instances whose latest failure is in it (an instance
//! that has since failed otherwise belongs to its newer group), oldest first (by their
//! first failure in the group). [`group`] is pure; the actions carry it out through
//! [`crate::operator`] and [`crate::dlq`], so each member's action is recorded as the
//! same action on one instance is, and the group action once more in
//! `skald.operator_actions` (`retry_group`, `discard_group`).

pub mod signature;

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;
use uuid::Uuid;

use crate::dlq::{self, DlqError};
use crate::operator::{self, OperatorError};
use crate::saga::coordinator::InstanceStatus;
use crate::store::failures::FailedAttempts;
use crate::store::{Store, StoreError};
use crate::transport::Transport;
pub use signature::{Signature, group_id, signature};

/// Why a group action failed.
#[derive(Debug, thiserror::Error)]
pub enum FailureError {
    /// No group has this id (now).
    #[error("no failure group {0}")]
    NotFound(Uuid),
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A member's action failed for another reason than not applying (the members
    /// before it were acted on; repeat to go on).
    #[error(transparent)]
    Operator(#[from] OperatorError),
    /// Discarding a dead letter failed.
    #[error(transparent)]
    Dlq(#[from] DlqError),
}

impl From<sqlx::Error> for FailureError {
    fn from(e: sqlx::Error) -> Self {
        FailureError::Store(StoreError::Database(e))
    }
}

/// One failure group.
#[derive(Debug, Clone, Serialize)]
pub struct FailureGroup {
    /// Its id: the same saga, step, phase and signature always give the same id.
    pub id: Uuid,
    /// The saga.
    pub saga: String,
    /// The step's name.
    pub step: Option<String>,
    /// `forward` or `compensate`.
    pub phase: Option<String>,
    /// The SQLSTATE or handler code, if any.
    pub code: Option<String>,
    /// The normalised message.
    pub message: String,
    /// One error text as recorded (the latest).
    pub example: String,
    /// Failed attempts in the group.
    pub attempts: i64,
    /// Instances with a failed attempt in the group.
    pub instances: i64,
    /// Pending dead letters of its members.
    pub dead_letters: i64,
    /// The first failed attempt.
    pub first_seen: DateTime<Utc>,
    /// The last failed attempt.
    pub last_seen: DateTime<Utc>,
    /// Its members, oldest first (see the module).
    #[serde(skip)]
    pub members: Vec<Member>,
}

/// An instance whose latest failure is in a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The instance.
    pub id: Uuid,
    /// Its status now.
    pub status: InstanceStatus,
    /// Its pending dead letters, oldest first.
    pub pending_letters: Vec<Uuid>,
    /// Its first failure in the group.
    first: DateTime<Utc>,
}

/// Groups failed attempts: most attempts first, then the latest seen first.
pub fn group(rows: &[FailedAttempts]) -> Vec<FailureGroup> {
    // Each instance's latest failure decides the group it is a member of.
    let mut latest: HashMap<Uuid, (DateTime<Utc>, Uuid)> = HashMap::new();
    let mut groups: BTreeMap<Uuid, FailureGroup> = BTreeMap::new();
    let mut seen: HashMap<Uuid, HashMap<Uuid, DateTime<Utc>>> = HashMap::new();
    for r in rows {
        let sig = signature(&r.error);
        let id = group_id(&r.saga, r.step.as_deref(), r.phase.as_deref(), &sig);
        let g = groups.entry(id).or_insert_with(|| FailureGroup {
            id,
            saga: r.saga.clone(),
            step: r.step.clone(),
            phase: r.phase.clone(),
            code: sig.code.clone(),
            message: sig.message.clone(),
            example: r.error.clone(),
            attempts: 0,
            instances: 0,
            dead_letters: 0,
            first_seen: r.first,
            last_seen: r.last,
            members: Vec::new(),
        });
        g.attempts += r.attempts;
        g.first_seen = g.first_seen.min(r.first);
        if r.last >= g.last_seen {
            g.last_seen = r.last;
            g.example = r.error.clone();
        }
        let first = seen
            .entry(id)
            .or_default()
            .entry(r.instance_id)
            .or_insert(r.first);
        *first = (*first).min(r.first);
        let l = latest.entry(r.instance_id).or_insert((r.last, id));
        if r.last > l.0 {
            *l = (r.last, id);
        }
    }
    for (id, instances) in &seen {
        if let Some(g) = groups.get_mut(id) {
            g.instances = instances.len() as i64;
        }
    }
    for r in rows {
        let Some(&(_, id)) = latest.get(&r.instance_id) else {
            continue;
        };
        let g = groups.get_mut(&id).expect("grouped above");
        if g.members.iter().any(|m| m.id == r.instance_id) {
            continue;
        }
        g.dead_letters += r.pending_letters.len() as i64;
        g.members.push(Member {
            id: r.instance_id,
            status: r.status,
            pending_letters: r.pending_letters.clone(),
            first: seen[&id][&r.instance_id],
        });
    }
    let mut out: Vec<FailureGroup> = groups.into_values().collect();
    for g in &mut out {
        g.members.sort_by_key(|m| (m.first, m.id));
    }
    out.sort_by(|a, b| {
        b.attempts
            .cmp(&a.attempts)
            .then(b.last_seen.cmp(&a.last_seen))
            .then(a.id.cmp(&b.id))
    });
    out
}

/// The failure groups now (of `saga` only, when given).
pub async fn groups(store: &Store, saga: Option<&str>) -> Result<Vec<FailureGroup>, StoreError> {
    Ok(group(&store.failed_attempts(saga).await?))
}

async fn find(store: &Store, id: Uuid) -> Result<FailureGroup, FailureError> {
    groups(store, None)
        .await?
        .into_iter()
        .find(|g| g.id == id)
        .ok_or(FailureError::NotFound(id))
}

/// How many members a group retry takes: 1 to 1000.
pub const LIMIT: std::ops::RangeInclusive<i64> = 1..=1000;
/// The members a group retry takes by default.
pub const DEFAULT_LIMIT: i64 = 100;
/// How fast a group retry goes, in members a second: 1 to 1000.
pub const PER_SECOND: std::ops::RangeInclusive<u32> = 1..=1000;
/// A group retry's pace by default.
pub const DEFAULT_PER_SECOND: u32 = 10;

/// How a group retry goes.
#[derive(Debug, Clone, Copy)]
pub struct RetryGroup {
    /// The oldest this many members.
    pub limit: usize,
    /// At most this many members a second (at least 1).
    pub per_second: u32,
}

/// What a group action did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GroupOutcome {
    /// The members acted on (retried, resumed; or whose dead letters were
    /// discarded), in order.
    pub done: Vec<Uuid>,
    /// The members the action did not apply to (no retry pending, nothing to discard).
    pub skipped: Vec<Uuid>,
}

/// Retries group `id`'s members, oldest first, at most `how.per_second` a second: a
/// parked (failed) member is resumed, a live one has its pending retry run now.
pub async fn retry_group(
    store: &Store,
    transport: &dyn Transport,
    id: Uuid,
    how: RetryGroup,
    by: &str,
) -> Result<GroupOutcome, FailureError> {
    let group = find(store, id).await?;
    let pause = dlq::pace(how.per_second);
    let mut outcome = GroupOutcome::default();
    for (n, m) in group.members.iter().take(how.limit).enumerate() {
        if n > 0 {
            tokio::time::sleep(pause).await;
        }
        let acted = if m.status == InstanceStatus::Failed {
            operator::resume(store, transport, m.id, by).await
        } else {
            operator::retry_now(store, transport, m.id, by).await
        };
        match acted {
            Ok(_) => outcome.done.push(m.id),
            Err(OperatorError::Conflict(_) | OperatorError::NotFound(_)) => {
                outcome.skipped.push(m.id)
            }
            Err(e) => return Err(e.into()),
        }
    }
    record(store, "retry_group", &group, by, &outcome, how.per_second).await?;
    Ok(outcome)
}

/// Discards the pending dead letters of group `id`'s members (each recorded on its
/// letter, never erased), with `note`.
pub async fn discard_group(
    store: &Store,
    id: Uuid,
    by: &str,
    note: Option<&str>,
) -> Result<GroupOutcome, FailureError> {
    let group = find(store, id).await?;
    let mut outcome = GroupOutcome::default();
    for m in &group.members {
        if m.pending_letters.is_empty() {
            outcome.skipped.push(m.id);
            continue;
        }
        for letter in &m.pending_letters {
            dlq::discard(store, *letter, by, note).await?;
        }
        outcome.done.push(m.id);
    }
    record(store, "discard_group", &group, by, &outcome, 0).await?;
    Ok(outcome)
}

async fn record(
    store: &Store,
    action: &str,
    group: &FailureGroup,
    by: &str,
    outcome: &GroupOutcome,
    per_second: u32,
) -> Result<(), FailureError> {
    let detail = json!({
        "group": group.id, "saga": group.saga, "step": group.step, "phase": group.phase,
        "code": group.code, "message": group.message,
        "done": outcome.done, "skipped": outcome.skipped,
        "per_second": (per_second > 0).then_some(per_second),
    });
    sqlx::query(
        "INSERT INTO skald.operator_actions (instance_id, action, actor, detail) \
         VALUES (NULL, $1, $2, $3)",
    )
    .bind(action)
    .bind(by)
    .bind(sqlx::types::Json(detail))
    .execute(store.pool())
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(instance: u128, step: &str, error: &str, at: i64, letters: usize) -> FailedAttempts {
        let t = DateTime::from_timestamp(1_800_000_000 + at, 0).unwrap();
        FailedAttempts {
            instance_id: Uuid::from_u128(instance),
            saga: "s".into(),
            status: if letters > 0 {
                InstanceStatus::Failed
            } else {
                InstanceStatus::Running
            },
            step: Some(step.into()),
            phase: Some("forward".into()),
            error: error.into(),
            attempts: 2,
            first: t,
            last: t,
            pending_letters: (0..letters)
                .map(|k| Uuid::from_u128(1000 + k as u128))
                .collect(),
        }
    }

    #[test]
    fn same_step_and_normalised_error_make_one_group_with_exact_counts() {
        let mut rows: Vec<_> = (0..50)
            .map(|i| {
                row(
                    i,
                    "reserve",
                    &format!("SQLSTATE 55000: item {i} gone"),
                    100 - i as i64,
                    0,
                )
            })
            .collect();
        rows.extend((50..55).map(|i| {
            row(
                i,
                "reserve",
                &format!("SQLSTATE 23514: card '{i}'"),
                i as i64,
                1,
            )
        }));
        let groups = group(&rows);
        assert_eq!(groups.len(), 2);
        let (big, small) = (&groups[0], &groups[1]);
        assert_eq!(
            (big.attempts, big.instances, big.dead_letters),
            (100, 50, 0)
        );
        assert_eq!(
            (small.attempts, small.instances, small.dead_letters),
            (10, 5, 5)
        );
        assert_eq!(big.code.as_deref(), Some("55000"));
        assert_eq!(big.message, "item <n> gone");
        assert_eq!(small.message, "card <str>");
        // Oldest first: instance 49 failed first (at 51), instance 0 last (at 100).
        assert_eq!(big.members.first().unwrap().id, Uuid::from_u128(49));
        assert_eq!(big.members.last().unwrap().id, Uuid::from_u128(0));
        assert_eq!(
            big.first_seen,
            DateTime::from_timestamp(1_800_000_051, 0).unwrap()
        );
        assert_eq!(
            big.last_seen,
            DateTime::from_timestamp(1_800_000_100, 0).unwrap()
        );
    }

    #[test]
    fn an_instance_is_a_member_of_its_latest_failures_group_only() {
        // Status and letters are the instance's: the same on each of its rows.
        let rows = vec![
            row(1, "one", "SQLSTATE 40001: busy", 1, 1),
            row(1, "two", "SQLSTATE 23514: bad 3", 5, 1),
        ];
        let groups = group(&rows);
        assert_eq!(groups.len(), 2);
        let one = groups
            .iter()
            .find(|g| g.step.as_deref() == Some("one"))
            .unwrap();
        let two = groups
            .iter()
            .find(|g| g.step.as_deref() == Some("two"))
            .unwrap();
        assert_eq!(one.instances, 1);
        assert!(one.members.is_empty());
        assert_eq!(two.members.len(), 1);
        assert_eq!(two.dead_letters, 1);
    }
}
