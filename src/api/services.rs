//! The participant services' side, seen from skald's API: their dead letters (list,
//! replay, discard) and, for a command, what the service recorded of it (its
//! attempts, outcome and dead letters). skald reaches each service's own database
//! through `SKALD_SERVICE_DATABASES` ([`crate::config::ServiceDatabase`]); the tables
//! are the participant library's (`skald_participant`), read and changed through
//! [`crate::participant::dead_letters`] exactly as `skald participant dead-letters`
//! does.

use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use actix_web::{HttpRequest, HttpResponse, get, post, web};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::handlers::{DiscardRequest, InstanceActionRequest, operator};
use super::input::{Input, JsonBody, QueryParams, check_range};
use super::openapi::{ErrorBody, dead_letter_status_schema};
use super::{ApiError, ApiState};
use crate::config::ServiceDatabase;
use crate::participant::dead_letters::{self, DeadLetter, DeadLetterError};

type Result<T> = std::result::Result<T, ApiError>;

/// Connections skald opens at most to one service's database (the API's reads and
/// operator actions only).
const POOL_SIZE: u32 = 2;
/// How long a call waits for a service's database before answering 503.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A pool per configured service database, opened on first use (a service whose
/// database is down does not keep skald from starting; its calls answer 503).
#[derive(Clone, Default)]
pub struct ServiceDatabases {
    pools: BTreeMap<String, PgPool>,
}

impl std::fmt::Debug for ServiceDatabases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.pools.keys()).finish()
    }
}

impl ServiceDatabases {
    /// Lazy pools on `databases` (as validated by the configuration); an URL that does
    /// not parse is left out with an error in the log. Must run inside a runtime.
    pub fn lazy(databases: &[ServiceDatabase]) -> ServiceDatabases {
        let mut pools = BTreeMap::new();
        for db in databases {
            match PgConnectOptions::from_str(&db.url) {
                Ok(options) => {
                    let pool = PgPoolOptions::new()
                        .max_connections(POOL_SIZE)
                        .acquire_timeout(CONNECT_TIMEOUT)
                        .connect_lazy_with(options);
                    pools.insert(db.service.clone(), pool);
                }
                Err(e) => {
                    tracing::error!(service = %db.service, error = %e,
                        "SKALD_SERVICE_DATABASES: the URL does not parse; service left out");
                }
            }
        }
        ServiceDatabases { pools }
    }

    /// The configured services, by name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.pools.keys().map(String::as_str)
    }

    /// The pool of `service`, or a 404 naming the setting.
    fn pool(&self, service: &str) -> Result<&PgPool> {
        self.pools.get(service).ok_or_else(|| {
            ApiError::NotFound(format!(
                "no service {service:?}: it is not in SKALD_SERVICE_DATABASES"
            ))
        })
    }
}

impl From<DeadLetterError> for ApiError {
    fn from(e: DeadLetterError) -> Self {
        match e {
            DeadLetterError::NotFound(_) => ApiError::NotFound(e.to_string()),
            DeadLetterError::NotPending { .. } => ApiError::Conflict(e.to_string()),
            DeadLetterError::BadStatus(_) => ApiError::BadRequest(e.to_string()),
            DeadLetterError::Database(_) => {
                tracing::warn!(error = %e, "API: service database error");
                ApiError::Unavailable(
                    "the service's database is unavailable (or has no skald_participant \
                     tables); try again"
                        .into(),
                )
            }
            DeadLetterError::Transport(t) => t.into(),
        }
    }
}

/// A configured service.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceItem {
    /// Its name, as in `SKALD_SERVICE_DATABASES` (never its URL).
    name: String,
}

/// The services whose databases skald knows.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceList {
    /// By name.
    items: Vec<ServiceItem>,
}

/// The participant services named in `SKALD_SERVICE_DATABASES`, by name.
#[utoipa::path(tag = "services", responses((status = 200, body = ServiceList)))]
#[get("/services")]
pub async fn list_services(state: web::Data<ApiState>) -> HttpResponse {
    let items = state
        .services
        .names()
        .map(|name| ServiceItem { name: name.into() })
        .collect();
    HttpResponse::Ok().json(ServiceList { items })
}

/// Query of `GET /api/v1/services/{service}/dead-letters`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ServiceDeadLettersQuery {
    /// Only this status.
    #[param(schema_with = dead_letter_status_schema)]
    status: Option<String>,
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

impl Input for ServiceDeadLettersQuery {
    fn validate(&self) -> Result<()> {
        check_range("limit", self.limit, 1..=1000)
    }
}

/// A service's dead letters.
#[derive(Debug, Serialize, ToSchema)]
pub struct ServiceDeadLetters {
    /// The service.
    service: String,
    /// Newest first: `{"id", "service", "reason_code", "reason", "message_id", "type",
    /// "aggregate_id", "body", "errors", "status", "created_at", "resolved_at",
    /// "resolved_by", "note"}` each.
    #[schema(value_type = Vec<Object>)]
    items: Vec<DeadLetter>,
}

/// A participant service's dead letters (from its own database), newest first, with
/// each one's error history.
#[utoipa::path(
    tag = "services",
    params(
        ("service" = String, Path, description = "The service's name in SKALD_SERVICE_DATABASES"),
        ServiceDeadLettersQuery,
    ),
    responses(
        (status = 200, body = ServiceDeadLetters),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
        (status = 404, description = "The service is not in SKALD_SERVICE_DATABASES", body = ErrorBody),
    )
)]
#[get("/services/{service}/dead-letters")]
pub async fn list_service_dead_letters(
    state: web::Data<ApiState>,
    service: web::Path<String>,
    query: QueryParams<ServiceDeadLettersQuery>,
) -> Result<HttpResponse> {
    let service = service.into_inner();
    let pool = state.services.pool(&service)?;
    let q = query.0;
    let items =
        dead_letters::list(pool, &service, q.status.as_deref(), q.limit.unwrap_or(100)).await?;
    Ok(HttpResponse::Ok().json(ServiceDeadLetters { service, items }))
}

/// Send a pending service dead letter back to its service (an `exhausted` one with a
/// fresh set of tries; its history stays on the letter), recorded as `replayed`.
#[utoipa::path(
    tag = "services",
    params(
        ("service" = String, Path, description = "The service's name in SKALD_SERVICE_DATABASES"),
        ("id" = Uuid, Path, description = "The dead letter's id"),
    ),
    request_body(content = Option<InstanceActionRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "The letter as it is now (fields as in the list; `status` `replayed` or `discarded`)", body = Object),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "Unknown service, or no such dead letter of it", body = ErrorBody),
        (status = 409, description = "Already replayed or discarded", body = ErrorBody),
    )
)]
#[post("/services/{service}/dead-letters/{id}/replay")]
pub async fn replay_service_dead_letter(
    req: HttpRequest,
    state: web::Data<ApiState>,
    path: web::Path<(String, Uuid)>,
    body: JsonBody<InstanceActionRequest>,
) -> Result<HttpResponse> {
    let (service, id) = path.into_inner();
    let pool = state.services.pool(&service)?;
    let by = operator(&req, body.0.by);
    let letter = dead_letters::replay(pool, state.transport.as_ref(), &service, id, &by).await?;
    Ok(HttpResponse::Ok().json(letter))
}

/// Set a pending service dead letter aside for good (recorded with who and why).
#[utoipa::path(
    tag = "services",
    params(
        ("service" = String, Path, description = "The service's name in SKALD_SERVICE_DATABASES"),
        ("id" = Uuid, Path, description = "The dead letter's id"),
    ),
    request_body(content = Option<DiscardRequest>, content_type = "application/json"),
    responses(
        (status = 200, description = "The letter as it is now (fields as in the list; `status` `replayed` or `discarded`)", body = Object),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "Unknown service, or no such dead letter of it", body = ErrorBody),
        (status = 409, description = "Already replayed or discarded", body = ErrorBody),
    )
)]
#[post("/services/{service}/dead-letters/{id}/discard")]
pub async fn discard_service_dead_letter(
    req: HttpRequest,
    state: web::Data<ApiState>,
    path: web::Path<(String, Uuid)>,
    body: JsonBody<DiscardRequest>,
) -> Result<HttpResponse> {
    let (service, id) = path.into_inner();
    let pool = state.services.pool(&service)?;
    let body = body.0;
    let by = operator(&req, body.by);
    let letter = dead_letters::discard(pool, &service, id, &by, body.note.as_deref()).await?;
    Ok(HttpResponse::Ok().json(letter))
}

/// What a service recorded of one command: its outcome once finished, every failed
/// try, and its dead letters.
#[derive(Debug, Serialize)]
pub struct ServiceSide {
    /// `{"outcome", "attempts", "error", "processed_at"}` once the service finished
    /// with it (`succeeded`, `fatal`, `exhausted`, `stale`); `null` before.
    processed: Option<Value>,
    /// Every failed try, oldest first: `{"attempt", "retryable", "error", "failed_at"}`.
    failures: Vec<Value>,
    /// `{"id", "reason_code", "status"}` of its dead letters at the service.
    dead_letters: Vec<Value>,
}

#[derive(sqlx::FromRow)]
struct ProcessedRow {
    outcome: String,
    attempts: i32,
    error: Option<String>,
    processed_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct FailureRow {
    attempt: i32,
    retryable: bool,
    error: String,
    failed_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct LetterRow {
    id: Uuid,
    reason_code: String,
    status: String,
}

async fn service_side(pool: &PgPool, service: &str, message_id: Uuid) -> sqlx::Result<ServiceSide> {
    let processed: Option<ProcessedRow> = sqlx::query_as(
        "SELECT outcome, attempts, error, processed_at FROM skald_participant.processed \
         WHERE service = $1 AND message_id = $2",
    )
    .bind(service)
    .bind(message_id)
    .fetch_optional(pool)
    .await?;
    let failures: Vec<FailureRow> = sqlx::query_as(
        "SELECT attempt, retryable, error, failed_at FROM skald_participant.failures \
         WHERE service = $1 AND message_id = $2 ORDER BY attempt",
    )
    .bind(service)
    .bind(message_id)
    .fetch_all(pool)
    .await?;
    let letters: Vec<LetterRow> = sqlx::query_as(
        "SELECT id, reason_code, status FROM skald_participant.dead_letters \
         WHERE service = $1 AND message_id = $2 ORDER BY created_at",
    )
    .bind(service)
    .bind(message_id)
    .fetch_all(pool)
    .await?;
    Ok(ServiceSide {
        processed: processed.map(|p| {
            serde_json::json!({
                "outcome": p.outcome, "attempts": p.attempts,
                "error": p.error, "processed_at": p.processed_at,
            })
        }),
        failures: failures
            .into_iter()
            .map(|f| {
                serde_json::json!({
                    "attempt": f.attempt, "retryable": f.retryable,
                    "error": f.error, "failed_at": f.failed_at,
                })
            })
            .collect(),
        dead_letters: letters
            .into_iter()
            .map(|l| serde_json::json!({"id": l.id, "reason_code": l.reason_code, "status": l.status}))
            .collect(),
    })
}

/// Adds `service_side` to each command of an instance document: what the service
/// recorded of it ([`ServiceSide`]), `null` when the service is not in
/// `SKALD_SERVICE_DATABASES`, or `{"unavailable": "…"}` when its database does not
/// answer (the document is still served).
pub async fn add_service_sides(services: &ServiceDatabases, document: &mut Value) {
    let Some(commands) = document.get_mut("commands").and_then(Value::as_array_mut) else {
        return;
    };
    for command in commands {
        let service = command["service"].as_str().unwrap_or_default().to_string();
        let id = command["command_id"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok());
        let side = match (services.pools.get(&service), id) {
            (Some(pool), Some(id)) => match service_side(pool, &service, id).await {
                Ok(side) => serde_json::to_value(side).expect("service side serialises"),
                Err(e) => {
                    tracing::warn!(service = %service, error = %e, "API: service database error");
                    serde_json::json!({ "unavailable": "the service's database does not answer" })
                }
            },
            _ => Value::Null,
        };
        command["service_side"] = side;
    }
}
