//! `GET /api/v1/search`: the dashboard's search box. One text finds the instances it
//! names, whichever id a person has at hand: the instance's id, its aggregate id, or
//! the id of a message it handled or sent (its start message, any message in its
//! inbox, a command it sent, a reply it received, a dead letter's message).

use actix_web::{HttpResponse, get, web};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::input::{Input, QueryParams, check_range};
use super::openapi::ErrorBody;
use super::{ApiError, ApiState};
use crate::store::Store;
use crate::store::queries::{InstanceFilter, InstanceSummary};

type Result<T> = std::result::Result<T, ApiError>;

/// The longest search text, in characters.
pub const MAX_QUERY: usize = 200;

/// Query of `GET /api/v1/search`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// An instance id, an aggregate id or a message id (1 to 200 characters; spaces
    /// around it ignored).
    #[param(min_length = 1, max_length = 200)]
    q: String,
    /// At most this many instances, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    limit: Option<i64>,
}

impl Input for SearchQuery {
    fn validate(&self) -> Result<()> {
        let q = self.q.trim();
        if q.is_empty() || q.chars().count() > MAX_QUERY {
            return Err(ApiError::BadRequest(format!(
                "q must be 1 to {MAX_QUERY} characters (spaces around it ignored)"
            )));
        }
        check_range("limit", self.limit, 1..=100)
    }
}

/// How a found instance matched the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
// The variants are spelled as the API answers them: `instance_id`, `message_id`...
#[allow(clippy::enum_variant_names)]
pub enum Matched {
    /// The text is its id.
    InstanceId,
    /// The text is the id of a message it handled or sent.
    MessageId,
    /// The text is its aggregate id.
    AggregateId,
}

/// One found instance: its summary (as in `GET /api/v1/instances`) and how it
/// matched.
#[derive(Debug, Serialize, ToSchema)]
pub struct Found {
    /// `instance_id`, `message_id` or `aggregate_id`.
    pub matched: Matched,
    /// The instance's summary.
    #[schema(value_type = Object)]
    pub instance: InstanceSummary,
}

/// What a search found.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResults {
    /// The text searched for (trimmed).
    pub q: String,
    /// Instance-id matches first, then message-id matches, then aggregate-id matches
    /// newest first; each instance once.
    pub items: Vec<Found>,
}

/// Instances a message id belongs to: the start message, an inbox row, a command
/// sent, a reply received, a dead letter.
const BY_MESSAGE: &str = "\
    SELECT id FROM skald.instances WHERE start_message_id = $1 \
    UNION SELECT instance_id FROM skald.inbox WHERE message_id = $1 \
    UNION SELECT instance_id FROM skald.commands WHERE id = $1 \
    UNION SELECT instance_id FROM skald.replies WHERE message_id = $1 \
    UNION SELECT instance_id FROM skald.dead_letters \
          WHERE message_id = $1 AND instance_id IS NOT NULL";

/// Finds instances by instance id, message id or aggregate id.
#[utoipa::path(
    tag = "instances",
    params(SearchQuery),
    responses(
        (status = 200, body = SearchResults),
        (status = 400, description = "q is missing, empty or too long, or limit is out of range", body = ErrorBody),
    )
)]
#[get("/search")]
pub async fn search(
    state: web::Data<ApiState>,
    query: QueryParams<SearchQuery>,
) -> Result<HttpResponse> {
    let found = find(&state.store, &query.0.q, query.0.limit).await?;
    Ok(HttpResponse::Ok().json(found))
}

/// What the search box and `skald search` find for `q` (trimmed): at most `limit`
/// (default 20) instances, instance-id matches first, then message-id matches, then
/// aggregate-id matches newest first. A text out of bounds is refused as the API
/// refuses it.
pub async fn find(store: &Store, q: &str, limit: Option<i64>) -> Result<SearchResults> {
    SearchQuery {
        q: q.to_string(),
        limit,
    }
    .validate()?;
    let q = q.trim().to_string();
    let limit = limit.unwrap_or(20);
    let mut items: Vec<Found> = Vec::new();
    if let Ok(id) = Uuid::parse_str(&q) {
        let mut candidates = vec![(id, Matched::InstanceId)];
        let by_message: Vec<Uuid> = sqlx::query_scalar(BY_MESSAGE)
            .bind(id)
            .fetch_all(store.pool())
            .await
            .map_err(crate::store::StoreError::from)?;
        candidates.extend(by_message.into_iter().map(|i| (i, Matched::MessageId)));
        for (id, matched) in candidates {
            if items.iter().any(|f| f.instance.id == id) {
                continue;
            }
            if let Some(detail) = store.instance(id).await? {
                items.push(Found {
                    matched,
                    instance: detail.summary,
                });
            }
        }
    }
    let by_aggregate = store
        .instances(&InstanceFilter {
            aggregate_id: Some(q.clone()),
            limit,
            ..InstanceFilter::default()
        })
        .await?;
    for instance in by_aggregate {
        if !items.iter().any(|f| f.instance.id == instance.id) {
            items.push(Found {
                matched: Matched::AggregateId,
                instance,
            });
        }
    }
    items.truncate(limit as usize);
    Ok(SearchResults { q, items })
}
