//! What the API and the CLI show alike: the instances page (with its query's rules)
//! and the instance document (timeline, dead letters, commands and replies). The
//! dashboard's endpoints and `skald instances list` / `skald instance show` both call
//! these, so a filter is validated, and an instance shown, one way.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::ApiError;
use super::input::{Input, check_range, check_time};
use super::openapi::instance_status_schema;
use crate::operator::ActionOutcome;
use crate::saga::coordinator::InstanceStatus;
use crate::store::Store;
use crate::store::commands::{self, CommandView, ReplyView};
use crate::store::dead_letters::{self, DeadLetter};
use crate::store::queries::{InstanceFilter, InstanceSummary};

type Result<T> = std::result::Result<T, ApiError>;

/// Query of `GET /api/v1/instances` (and the flags of `skald instances list`).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct InstancesQuery {
    /// Only this saga.
    pub saga: Option<String>,
    /// Only this status.
    #[param(schema_with = instance_status_schema)]
    pub status: Option<String>,
    /// Only this aggregate.
    pub aggregate_id: Option<String>,
    /// Created at or after this time (RFC 3339, years 1 to 9999).
    pub since: Option<DateTime<Utc>>,
    /// Created before this time (RFC 3339, years 1 to 9999).
    pub until: Option<DateTime<Utc>>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Page size, 1 to 500 (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

impl Input for InstancesQuery {
    fn validate(&self) -> Result<()> {
        check_range("limit", self.limit, 1..=500)?;
        check_time("since", self.since.as_ref())?;
        check_time("until", self.until.as_ref())
    }
}

impl InstancesQuery {
    /// The store's filter this query stands for; a 400 naming what is invalid.
    fn filter(self) -> Result<InstanceFilter> {
        self.validate()?;
        let status = self
            .status
            .map(|s| {
                InstanceStatus::parse(&s)
                    .ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}")))
            })
            .transpose()?;
        Ok(InstanceFilter {
            saga: self.saga,
            status,
            aggregate_id: self.aggregate_id,
            since: self.since,
            until: self.until,
            after: self.cursor.as_deref().map(parse_cursor).transpose()?,
            limit: self.limit.unwrap_or(50),
        })
    }
}

/// Pages are cut at (created_at, id): the cursor is `<micros>_<uuid>` of the last
/// item of the previous page.
fn parse_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid)> {
    let bad = || ApiError::BadRequest(format!("invalid cursor {cursor:?}"));
    let (micros, id) = cursor.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(bad)?;
    check_time("cursor", Some(&at))?;
    Ok((at, id.parse().map_err(|_| bad())?))
}

/// A page of instances.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstancePage {
    /// Instances, newest first.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<InstanceSummary>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
}

/// The instances `query` selects, newest first, and the cursor of the next page.
pub async fn instance_page(store: &Store, query: InstancesQuery) -> Result<InstancePage> {
    let filter = query.filter()?;
    let items = store.instances(&filter).await?;
    let next_cursor = (items.len() as i64 == filter.limit)
        .then(|| items.last())
        .flatten()
        .map(|last| format!("{}_{}", last.created_at.timestamp_micros(), last.id));
    Ok(InstancePage { items, next_cursor })
}

/// An instance's command steps: every command sent (service, type, sends, when sent
/// and answered, error or outputs) and every reply received, applied or not.
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandExchanges {
    /// Oldest first.
    pub commands: Vec<CommandView>,
    /// Newest first.
    pub replies: Vec<ReplyView>,
}

/// The commands instance `id`'s command steps sent and the replies received for it;
/// 404 for an unknown instance.
pub async fn exchanges(store: &Store, id: Uuid) -> Result<CommandExchanges> {
    store
        .instance(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no instance {id}")))?;
    instance_exchanges(store, id).await
}

async fn instance_exchanges(store: &Store, id: Uuid) -> Result<CommandExchanges> {
    Ok(CommandExchanges {
        commands: commands::of_instance(store.pool(), id).await?,
        replies: commands::replies(store.pool(), Some(id), 1000).await?,
    })
}

/// One instance: its detail and timeline, `dead_letters`, `commands` and `replies`;
/// 404 for an unknown instance.
pub async fn instance_document(store: &Store, id: Uuid) -> Result<Value> {
    let detail = store
        .instance(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no instance {id}")))?;
    let letters: Vec<Value> = dead_letters::for_instance(store.pool(), id)
        .await?
        .iter()
        .map(dead_letter_json)
        .collect();
    let mut body = serde_json::to_value(&detail).expect("instance serialises");
    body["dead_letters"] = Value::Array(letters);
    let exchanges = instance_exchanges(store, id).await?;
    body["commands"] = serde_json::to_value(exchanges.commands).expect("commands serialise");
    body["replies"] = serde_json::to_value(exchanges.replies).expect("replies serialise");
    Ok(body)
}

/// A dead letter as JSON, its body as JSON when it is, else as text.
pub fn dead_letter_json(d: &DeadLetter) -> Value {
    let mut v = serde_json::to_value(d).expect("dead letter serialises");
    v["body"] = match d.body_text() {
        Some(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into())),
        None => Value::String(format!("<{} bytes, not UTF-8>", d.body.len())),
    };
    v
}

/// What an instance action (retry, cancel, resume) did.
#[derive(Debug, Serialize, ToSchema)]
pub struct ActionDone {
    /// The instance.
    pub id: Uuid,
    /// `retry`, `cancel` or `resume`.
    pub action: &'static str,
    /// `done` now, or `already_done` before (its message was sent again).
    #[schema(value_type = String)]
    pub outcome: ActionOutcome,
}

impl ActionDone {
    /// `action` on instance `id` ended with `outcome`.
    pub fn new(id: Uuid, action: &'static str, outcome: ActionOutcome) -> Self {
        Self {
            id,
            action,
            outcome,
        }
    }
}
