//! The `/api/v1` endpoints. Each takes its input through [`super::input`], so it
//! runs only on a request that parsed and validated; its types are the ones the
//! OpenAPI document ([`super::openapi`]) describes.

use std::sync::atomic::Ordering;

use actix_web::{HttpRequest, HttpResponse, get, post, web};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::input::{Input, JsonBody, QueryParams, check_range};
use super::openapi::{
    ErrorBody, dead_letter_kind_schema, dead_letter_status_schema, nullable_dead_letter_kind_schema,
};
use super::views::{self, ActionDone, CommandExchanges, InstancePage, InstancesQuery};
use super::{ApiError, ApiState};
use crate::envelope::{Envelope, Malformed, Outgoing, instance_id_for};
use crate::saga::{SagaDef, StepRole};
use crate::store::commands::{self, ReplyView};
use crate::store::dead_letters::{self, DeadLetterKind, DeadLetterStatus};

type Result<T> = std::result::Result<T, ApiError>;

/// `{"status": "ok"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    status: &'static str,
}

/// The process is alive.
#[utoipa::path(tag = "health", responses((status = 200, body = Health)))]
#[get("/health")]
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// What `/ready` checked.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// PostgreSQL answers.
    database: bool,
    /// RabbitMQ answers.
    broker: bool,
    /// skald consumes its partition queues.
    consuming: bool,
    /// Messages held by database or broker failures for longer than
    /// `SKALD_STUCK_AFTER_MS` (detail, not a condition: the checks above show the
    /// failure while it lasts).
    stuck_messages: u64,
}

/// The 503 answer of `/ready`: the error, and what was checked.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotReady {
    /// Code `not_ready`.
    error: super::openapi::ErrorDetail,
    /// Which check failed.
    checks: Readiness,
}

/// PostgreSQL and RabbitMQ answer and skald consumes; 503 otherwise.
#[utoipa::path(tag = "health", responses(
    (status = 200, body = Readiness),
    (status = 503, description = "A dependency is not ready", body = NotReady),
))]
#[get("/ready")]
pub async fn readiness(state: web::Data<ApiState>) -> HttpResponse {
    let checks = Readiness {
        database: state.store.ping().await.is_ok(),
        broker: state.transport.healthy().await,
        consuming: state.engine.is_consuming(),
        stuck_messages: state.engine.stats().stuck.load(Ordering::Relaxed),
    };
    if checks.database && checks.broker && checks.consuming {
        HttpResponse::Ok().json(checks)
    } else {
        HttpResponse::ServiceUnavailable().json(NotReady {
            error: super::openapi::ErrorDetail {
                code: "not_ready".into(),
                message: "a dependency is not ready".into(),
            },
            checks,
        })
    }
}

fn saga_summary(s: &SagaDef) -> Value {
    json!({
        "name": s.name,
        "version": s.version,
        "steps": s.steps.len(),
        "ordering": s.ordering,
        "isolation": s.isolation,
        "timeout_ms": s.timeout.map(|t| t.as_millis() as u64),
        "source": s.source,
    })
}

/// A list of items (their fields are described in README.md).
#[derive(Debug, Serialize, ToSchema)]
pub struct Items {
    /// The items.
    #[schema(value_type = Vec<Object>)]
    items: Vec<Value>,
}

/// The loaded saga definitions.
#[utoipa::path(tag = "sagas", responses((status = 200, body = Items)))]
#[get("/sagas")]
pub async fn list_sagas(state: web::Data<ApiState>) -> HttpResponse {
    let items = state
        .engine
        .catalog()
        .all()
        .into_iter()
        .map(|s| saga_summary(s))
        .collect();
    HttpResponse::Ok().json(Items { items })
}

/// One definition with its steps, policies and step graph: `next` edges forward,
/// `compensate` edges from a step to the compensation run when a later step fails
/// for good.
#[utoipa::path(
    tag = "sagas",
    params(("name" = String, Path, description = "The saga's name")),
    responses(
        (status = 200, description = "`summary`, `definition` and `graph`", body = Object),
        (status = 404, description = "No saga of that name is loaded", body = ErrorBody),
    )
)]
#[get("/sagas/{name}")]
pub async fn saga_detail(
    state: web::Data<ApiState>,
    name: web::Path<String>,
) -> Result<HttpResponse> {
    let name = name.into_inner();
    let saga = state
        .engine
        .catalog()
        .get(&name)
        .ok_or_else(|| ApiError::NotFound(format!("no saga {name:?}")))?;
    let nodes: Vec<Value> = saga
        .steps
        .iter()
        .map(|s| json!({ "id": s.name, "role": s.role, "compensated": s.compensation.is_some() }))
        .collect();
    let mut edges = Vec::new();
    for pair in saga.steps.windows(2) {
        edges.push(json!({ "from": pair[0].name, "to": pair[1].name, "kind": "next" }));
    }
    // A step up to the pivot that fails for good starts compensation at the nearest
    // earlier step that has one (check steps are passed over); after the pivot nothing
    // compensates.
    for (j, step) in saga.steps.iter().enumerate() {
        if step.role == StepRole::Retriable {
            continue;
        }
        if let Some(undo) = saga.steps[..j]
            .iter()
            .rev()
            .find(|s| s.compensation.is_some())
        {
            edges.push(json!({ "from": step.name, "to": undo.name, "kind": "compensate" }));
        }
    }
    Ok(HttpResponse::Ok().json(json!({
        "summary": saga_summary(saga),
        "definition": **saga,
        "graph": { "nodes": nodes, "edges": edges },
    })))
}

/// Instances, newest first, filtered, cursor-paginated.
#[utoipa::path(
    tag = "instances",
    params(InstancesQuery),
    responses(
        (status = 200, body = InstancePage),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
    )
)]
#[get("/instances")]
pub async fn list_instances(
    state: web::Data<ApiState>,
    query: QueryParams<InstancesQuery>,
) -> Result<HttpResponse> {
    Ok(HttpResponse::Ok().json(views::instance_page(&state.store, query.0).await?))
}

/// One instance: payload, outputs, timeline (every attempt with its error,
/// compensations, skipped and stale messages, what each sent), dead letters, and its
/// commands with what each service recorded of them (`service_side`).
#[utoipa::path(
    tag = "instances",
    params(("id" = Uuid, Path, description = "The instance id")),
    responses(
        (status = 200, body = Object),
        (status = 404, description = "No such instance", body = ErrorBody),
    )
)]
#[get("/instances/{id}")]
pub async fn instance_detail(
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse> {
    let mut document = views::instance_document(&state.store, *id).await?;
    super::services::add_service_sides(&state.services, &mut document).await;
    Ok(HttpResponse::Ok().json(document))
}

/// The commands an instance's command steps sent (each with what its service
/// recorded of it, `service_side`), and the replies received for it.
#[utoipa::path(
    tag = "instances",
    params(("id" = Uuid, Path, description = "The instance id")),
    responses(
        (status = 200, body = CommandExchanges),
        (status = 404, description = "No such instance", body = ErrorBody),
    )
)]
#[get("/instances/{id}/commands")]
pub async fn instance_commands(
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse> {
    state
        .store
        .instance(*id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no instance {id}")))?;
    let exchanges = views::exchanges(&state.store, *id).await?;
    let mut document = serde_json::to_value(exchanges).expect("commands serialise");
    super::services::add_service_sides(&state.services, &mut document).await;
    Ok(HttpResponse::Ok().json(document))
}

/// Query of `GET /api/v1/replies`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RepliesQuery {
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

impl Input for RepliesQuery {
    fn validate(&self) -> Result<()> {
        check_range("limit", self.limit, 1..=1000)
    }
}

/// Replies that were not applied — `duplicate`, `late` or `unknown` — newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replies {
    /// The replies.
    items: Vec<ReplyView>,
}

/// Replies recorded without being applied (copies, late ones, unknown ones), newest
/// first.
#[utoipa::path(
    tag = "instances",
    params(RepliesQuery),
    responses(
        (status = 200, body = Replies),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
    )
)]
#[get("/replies")]
pub async fn list_replies(
    state: web::Data<ApiState>,
    query: QueryParams<RepliesQuery>,
) -> Result<HttpResponse> {
    let limit = query.0.limit.unwrap_or(100);
    let items = commands::replies(state.store.pool(), None, limit).await?;
    Ok(HttpResponse::Ok().json(Replies { items }))
}

/// Body of `POST /api/v1/instances`: the start envelope's fields.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct StartRequest {
    /// The saga's name.
    saga: String,
    /// The aggregate id (default: read from the payload where the saga says).
    aggregate_id: Option<String>,
    /// The message id (default: a new one); the same id always means the same instance.
    message_id: Option<Uuid>,
    /// The publisher's per-aggregate sequence number, 0 to 2^63 - 1 (PostgreSQL's
    /// `bigint`).
    #[schema(maximum = 9_223_372_036_854_775_807_u64)]
    sequence: Option<u64>,
    /// The saga's input, a JSON object.
    #[schema(value_type = Object)]
    payload: Value,
}

impl Input for StartRequest {
    fn validate(&self) -> Result<()> {
        check_range("sequence", self.sequence, 0..=i64::MAX as u64)
    }
}

/// The ids of a start.
#[derive(Debug, Serialize, ToSchema)]
pub struct Started {
    /// The start message's id.
    message_id: Uuid,
    /// The instance it starts (derived from `message_id`).
    instance_id: Uuid,
}

/// Start an instance, exactly like a start message (the same `message_id` always
/// means the same instance); answers once the broker confirmed the message.
#[utoipa::path(
    tag = "instances",
    params(
        ("traceparent" = Option<String>, Header, description = "A W3C traceparent: the saga joins the caller's trace (an invalid one is ignored)"),
    ),
    request_body(content = StartRequest, content_type = "application/json"),
    responses(
        (status = 202, description = "Published and confirmed", body = Started),
        (status = 400, description = "Invalid body, unknown saga, no aggregate id", body = ErrorBody),
    )
)]
#[post("/instances")]
pub async fn start(
    state: web::Data<ApiState>,
    request: HttpRequest,
    body: JsonBody<StartRequest>,
) -> Result<HttpResponse> {
    let req = body.0;
    let saga = state.engine.catalog().get(&req.saga).ok_or_else(|| {
        ApiError::BadRequest(Malformed::UnknownSaga(req.saga.clone()).to_string())
    })?;
    if !req.payload.is_object() {
        return Err(ApiError::BadRequest("payload must be a JSON object".into()));
    }
    let aggregate_id = match req.aggregate_id {
        Some(a) => a,
        None => saga.aggregate_of(&req.payload).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "no aggregate_id, and the payload has no {}",
                saga.aggregate
            ))
        })?,
    };
    let envelope = Envelope {
        message_id: req.message_id.unwrap_or_else(Uuid::new_v4),
        sequence: req.sequence,
        ..Envelope::start(&req.saga, Some(aggregate_id), req.payload)
    };
    // The caller's trace (W3C Trace Context over HTTP): a header that is not a valid
    // traceparent is ignored, as the standard says, and the saga starts its own trace.
    let envelope = Envelope {
        traceparent: crate::telemetry::checked_traceparent(
            request
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            envelope.message_id,
        ),
        ..envelope
    };
    // The same content checks as a start arriving on the queue, answered here as 400
    // instead of a dead letter.
    envelope
        .check()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let message_id = envelope.message_id;
    Outgoing::to_intake(envelope, 0)
        .send(state.transport.as_ref())
        .await?;
    Ok(HttpResponse::Accepted().json(Started {
        message_id,
        instance_id: instance_id_for(message_id),
    }))
}

/// Query of `GET /api/v1/dead-letters`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadLettersQuery {
    /// Only this kind.
    #[param(schema_with = dead_letter_kind_schema)]
    kind: Option<String>,
    /// Only this status.
    #[param(schema_with = dead_letter_status_schema)]
    status: Option<String>,
    /// At most this many, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
}

impl Input for DeadLettersQuery {
    fn validate(&self) -> Result<()> {
        check_range("limit", self.limit, 1..=1000)
    }
}

fn parse_kind(kind: Option<&str>) -> Result<Option<DeadLetterKind>> {
    kind.map(|k| {
        DeadLetterKind::parse(k).ok_or_else(|| ApiError::BadRequest(format!("unknown kind {k:?}")))
    })
    .transpose()
}

/// Dead letters, newest first, by kind and status.
#[utoipa::path(
    tag = "dead letters",
    params(DeadLettersQuery),
    responses(
        (status = 200, body = Items),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
    )
)]
#[get("/dead-letters")]
pub async fn list_dead_letters(
    state: web::Data<ApiState>,
    query: QueryParams<DeadLettersQuery>,
) -> Result<HttpResponse> {
    let q = query.0;
    let kind = parse_kind(q.kind.as_deref())?;
    let status = q
        .status
        .map(|s| {
            DeadLetterStatus::parse(&s)
                .ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}")))
        })
        .transpose()?;
    let items = dead_letters::list(state.store.pool(), kind, status, q.limit.unwrap_or(100))
        .await?
        .iter()
        .map(views::dead_letter_json)
        .collect();
    Ok(HttpResponse::Ok().json(Items { items }))
}

/// One dead letter: the raw body, reason, history and resolution.
#[utoipa::path(
    tag = "dead letters",
    params(("id" = Uuid, Path, description = "The dead letter's id")),
    responses(
        (status = 200, body = Object),
        (status = 404, description = "No such dead letter", body = ErrorBody),
    )
)]
#[get("/dead-letters/{id}")]
pub async fn dead_letter_detail(
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
) -> Result<HttpResponse> {
    let letter = dead_letters::get(state.store.pool(), *id, false)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter {id}")))?;
    Ok(HttpResponse::Ok().json(views::dead_letter_json(&letter)))
}

/// Who acts: `by` from the body, else the `X-Skald-Operator` header, else `api`.
pub(super) fn operator(req: &HttpRequest, by: Option<String>) -> String {
    by.or_else(|| {
        req.headers()
            .get("x-skald-operator")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    })
    .unwrap_or_else(|| "api".to_string())
}

/// Body of `POST /api/v1/dead-letters/{id}/replay` (optional: empty means none of
/// the fields).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct ReplayRequest {
    /// A payload (JSON object) replacing the original, recorded on the letter.
    data: Option<Map<String, Value>>,
    /// Who replays (default: the `X-Skald-Operator` header, else `api`).
    by: Option<String>,
}

impl Input for ReplayRequest {
    fn when_empty() -> Option<Self> {
        Some(Self::default())
    }
}

/// What a replay did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    /// The dead letter.
    id: Uuid,
    /// Always `true`: its message was sent.
    replayed: bool,
    /// It had been replayed before; its message was sent again (dropped as a copy).
    already_replayed: bool,
}

/// Replay, optionally with an edited payload (recorded, idempotent).
#[utoipa::path(
    tag = "dead letters",
    params(("id" = Uuid, Path, description = "The dead letter's id")),
    request_body(content = Option<ReplayRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = Replayed),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such dead letter", body = ErrorBody),
        (status = 409, description = "Discarded, or its instance is no longer parked", body = ErrorBody),
    )
)]
#[post("/dead-letters/{id}/replay")]
pub async fn replay(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: JsonBody<ReplayRequest>,
) -> Result<HttpResponse> {
    let body = body.0;
    let by = operator(&req, body.by);
    let data = body.data.map(Value::Object);
    let outcome =
        crate::dlq::replay(&state.store, state.transport.as_ref(), *id, data, &by).await?;
    let already_replayed = matches!(outcome, crate::dlq::ReplayOutcome::AlreadyReplayed { .. });
    Ok(HttpResponse::Ok().json(Replayed {
        id: *id,
        replayed: true,
        already_replayed,
    }))
}

/// Body of `POST /api/v1/dead-letters/{id}/discard` (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct DiscardRequest {
    /// Why (recorded).
    pub(super) note: Option<String>,
    /// Who discards (default: the `X-Skald-Operator` header, else `api`).
    pub(super) by: Option<String>,
}

impl Input for DiscardRequest {
    fn when_empty() -> Option<Self> {
        Some(Self::default())
    }
}

/// The letter's status after a discard.
#[derive(Debug, Serialize, ToSchema)]
pub struct Discarded {
    /// The dead letter.
    id: Uuid,
    /// `discarded`, or `replayed` when it had been replayed (then nothing changed).
    status: &'static str,
}

/// Set aside (recorded, never erased; idempotent).
#[utoipa::path(
    tag = "dead letters",
    params(("id" = Uuid, Path, description = "The dead letter's id")),
    request_body(content = Option<DiscardRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = Discarded),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such dead letter", body = ErrorBody),
    )
)]
#[post("/dead-letters/{id}/discard")]
pub async fn discard(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: JsonBody<DiscardRequest>,
) -> Result<HttpResponse> {
    let body = body.0;
    let by = operator(&req, body.by);
    let outcome = crate::dlq::discard(&state.store, *id, &by, body.note.as_deref()).await?;
    Ok(HttpResponse::Ok().json(Discarded {
        id: *id,
        status: outcome.status(),
    }))
}

/// Body of the instance actions (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct InstanceActionRequest {
    /// Who acts (default: the `X-Skald-Operator` header, else `api`).
    pub(super) by: Option<String>,
}

impl Input for InstanceActionRequest {
    fn when_empty() -> Option<Self> {
        Some(Self::default())
    }
}

/// Run a pending retry now instead of after its delay (recorded, idempotent).
#[utoipa::path(
    tag = "instances",
    params(("id" = Uuid, Path, description = "The instance id")),
    request_body(content = Option<InstanceActionRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = ActionDone),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "No retry is pending", body = ErrorBody),
    )
)]
#[post("/instances/{id}/retry")]
pub async fn retry_now(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: JsonBody<InstanceActionRequest>,
) -> Result<HttpResponse> {
    let by = operator(&req, body.0.by);
    let outcome =
        crate::operator::retry_now(&state.store, state.transport.as_ref(), *id, &by).await?;
    Ok(HttpResponse::Ok().json(ActionDone::new(*id, "retry", outcome)))
}

/// Stop going forward and compensate the completed steps (recorded, idempotent;
/// refused past the pivot).
#[utoipa::path(
    tag = "instances",
    params(("id" = Uuid, Path, description = "The instance id")),
    request_body(content = Option<InstanceActionRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = ActionDone),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "Past the pivot, or already finished", body = ErrorBody),
    )
)]
#[post("/instances/{id}/cancel")]
pub async fn cancel(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: JsonBody<InstanceActionRequest>,
) -> Result<HttpResponse> {
    let by = operator(&req, body.0.by);
    let outcome = crate::operator::cancel(
        &state.store,
        state.engine.catalog(),
        state.transport.as_ref(),
        *id,
        &by,
    )
    .await?;
    Ok(HttpResponse::Ok().json(ActionDone::new(*id, "cancel", outcome)))
}

/// Resume a parked (failed) instance by replaying its dead letter (recorded,
/// idempotent).
#[utoipa::path(
    tag = "instances",
    params(("id" = Uuid, Path, description = "The instance id")),
    request_body(content = Option<InstanceActionRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = ActionDone),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such instance", body = ErrorBody),
        (status = 409, description = "The instance is not parked", body = ErrorBody),
    )
)]
#[post("/instances/{id}/resume")]
pub async fn resume(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: JsonBody<InstanceActionRequest>,
) -> Result<HttpResponse> {
    let by = operator(&req, body.0.by);
    let outcome = crate::operator::resume(&state.store, state.transport.as_ref(), *id, &by).await?;
    Ok(HttpResponse::Ok().json(ActionDone::new(*id, "resume", outcome)))
}

/// Body of `POST /api/v1/dead-letters/replay` (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct BulkReplayRequest {
    /// Only this kind.
    #[schema(schema_with = nullable_dead_letter_kind_schema)]
    kind: Option<String>,
    /// Only this saga.
    saga: Option<String>,
    /// At most this many, 1 to 1000 (default 100).
    #[schema(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Replays per second at most, 1 to 1000 (default 50).
    #[schema(minimum = 1, maximum = 1000)]
    per_second: Option<u32>,
    /// Who replays (default: the `X-Skald-Operator` header, else `api`).
    by: Option<String>,
}

impl Input for BulkReplayRequest {
    fn when_empty() -> Option<Self> {
        Some(Self::default())
    }

    fn validate(&self) -> Result<()> {
        check_range("limit", self.limit, 1..=1000)?;
        check_range("per_second", self.per_second, 1..=1000)?;
        parse_kind(self.kind.as_deref()).map(drop)
    }
}

/// The letters a bulk replay replayed, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct BulkReplayed {
    /// Their ids, oldest first.
    replayed: Vec<Uuid>,
}

/// Replay the oldest `limit` pending dead letters matching a filter, oldest first (so
/// one aggregate's letters keep their order), at most `per_second` a second.
#[utoipa::path(
    tag = "dead letters",
    request_body(content = Option<BulkReplayRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = BulkReplayed),
        (status = 400, description = "Invalid body", body = ErrorBody),
    )
)]
#[post("/dead-letters/replay")]
pub async fn bulk_replay(
    req: HttpRequest,
    state: web::Data<ApiState>,
    body: JsonBody<BulkReplayRequest>,
) -> Result<HttpResponse> {
    let body = body.0;
    let kind = parse_kind(body.kind.as_deref())?;
    let limit = body.limit.unwrap_or(100);
    let per_second = body.per_second.unwrap_or(50);
    let by = operator(&req, body.by);
    let what = crate::dlq::BulkReplay {
        kind,
        saga: body.saga,
        limit,
        per_second,
    };
    let replayed =
        crate::dlq::bulk_replay(&state.store, state.transport.as_ref(), &what, &by).await?;
    Ok(HttpResponse::Ok().json(BulkReplayed { replayed }))
}

/// Query of `GET /api/v1/failure-groups`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FailureGroupsQuery {
    /// Only this saga.
    saga: Option<String>,
}

impl Input for FailureGroupsQuery {}

/// Failure groups, most failed attempts first.
#[derive(Debug, Serialize, ToSchema)]
pub struct FailureGroups {
    /// `{"id", "saga", "step", "phase", "code", "message", "example", "attempts",
    /// "instances", "dead_letters", "first_seen", "last_seen"}` each.
    #[schema(value_type = Vec<Object>)]
    items: Vec<crate::failures::FailureGroup>,
}

/// Failed attempts and dead letters across all instances, grouped by saga, step,
/// phase and error (SQLSTATE or handler code, normalised message).
#[utoipa::path(
    tag = "failure groups",
    params(FailureGroupsQuery),
    responses(
        (status = 200, body = FailureGroups),
        (status = 400, description = "A query parameter is invalid", body = ErrorBody),
    )
)]
#[get("/failure-groups")]
pub async fn list_failure_groups(
    state: web::Data<ApiState>,
    query: QueryParams<FailureGroupsQuery>,
) -> Result<HttpResponse> {
    let items = crate::failures::groups(&state.store, query.0.saga.as_deref()).await?;
    Ok(HttpResponse::Ok().json(FailureGroups { items }))
}

/// Body of `POST /api/v1/failure-groups/{id}/retry` (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, expecting = "a JSON object")]
pub struct RetryGroupRequest {
    /// The oldest this many members, 1 to 1000 (default 100).
    #[schema(minimum = 1, maximum = 1000)]
    limit: Option<i64>,
    /// Members per second at most, 1 to 1000 (default 10).
    #[schema(minimum = 1, maximum = 1000)]
    per_second: Option<u32>,
    /// Who retries (default: the `X-Skald-Operator` header, else `api`).
    by: Option<String>,
}

impl Input for RetryGroupRequest {
    fn when_empty() -> Option<Self> {
        Some(Self::default())
    }

    fn validate(&self) -> Result<()> {
        check_range("limit", self.limit, crate::failures::LIMIT)?;
        check_range("per_second", self.per_second, crate::failures::PER_SECOND)
    }
}

/// What a group action did.
#[derive(Debug, Serialize, ToSchema)]
pub struct GroupDone {
    /// The group.
    id: Uuid,
    /// The members acted on, in order (oldest first).
    done: Vec<Uuid>,
    /// The members the action did not apply to.
    skipped: Vec<Uuid>,
}

impl GroupDone {
    fn new(id: Uuid, outcome: crate::failures::GroupOutcome) -> Self {
        Self {
            id,
            done: outcome.done,
            skipped: outcome.skipped,
        }
    }
}

/// Retry a group's members, oldest first, at most `per_second` a second: a parked
/// member is resumed, a live one has its pending retry run now (recorded).
#[utoipa::path(
    tag = "failure groups",
    params(("id" = Uuid, Path, description = "The group's id")),
    request_body(content = Option<RetryGroupRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = GroupDone),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such failure group", body = ErrorBody),
    )
)]
#[post("/failure-groups/{id}/retry")]
pub async fn retry_failure_group(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: JsonBody<RetryGroupRequest>,
) -> Result<HttpResponse> {
    let body = body.0;
    let by = operator(&req, body.by);
    let how = crate::failures::RetryGroup {
        limit: body.limit.unwrap_or(crate::failures::DEFAULT_LIMIT) as usize,
        per_second: body
            .per_second
            .unwrap_or(crate::failures::DEFAULT_PER_SECOND),
    };
    let outcome =
        crate::failures::retry_group(&state.store, state.transport.as_ref(), *id, how, &by).await?;
    Ok(HttpResponse::Ok().json(GroupDone::new(*id, outcome)))
}

/// Discard the pending dead letters of a group's members (recorded, never erased).
#[utoipa::path(
    tag = "failure groups",
    params(("id" = Uuid, Path, description = "The group's id")),
    request_body(content = Option<DiscardRequest>, content_type = "application/json"),
    responses(
        (status = 200, body = GroupDone),
        (status = 400, description = "Invalid body", body = ErrorBody),
        (status = 404, description = "No such failure group", body = ErrorBody),
    )
)]
#[post("/failure-groups/{id}/discard")]
pub async fn discard_failure_group(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: JsonBody<DiscardRequest>,
) -> Result<HttpResponse> {
    let body = body.0;
    let by = operator(&req, body.by);
    let outcome =
        crate::failures::discard_group(&state.store, *id, &by, body.note.as_deref()).await?;
    Ok(HttpResponse::Ok().json(GroupDone::new(*id, outcome)))
}

/// This document: every operation, parameter, body and status.
#[utoipa::path(tag = "health", responses((status = 200, description = "OpenAPI 3.1", body = Object)))]
#[get("/openapi.json")]
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(super::openapi::document())
}

/// Counts by saga and state, live instances per saga version, engine counters, dead letters, queue depths, and steps
/// per minute over the last 15 minutes.
#[utoipa::path(tag = "health", responses((status = 200, body = Object)))]
#[get("/stats")]
pub async fn stats(state: web::Data<ApiState>) -> Result<HttpResponse> {
    let counts = state.store.status_counts().await?;
    let versions = state.store.live_per_version().await?;
    let letters = state.store.dead_letter_counts().await?;
    let throughput: Vec<Value> = state
        .store
        .throughput(15)
        .await?
        .into_iter()
        .map(
            |(minute, steps, failed)| json!({ "minute": minute, "steps": steps, "failed": failed }),
        )
        .collect();
    let queues: Value = match state.transport.queue_depths().await {
        Ok(depths) => depths
            .into_iter()
            .map(|(queue, ready)| json!({ "queue": queue, "ready": ready }))
            .collect(),
        Err(e) => json!({ "error": e.to_string() }),
    };
    let s = state.engine.stats();
    Ok(HttpResponse::Ok().json(json!({
        "queues": queues,
        "instances": counts,
        "live_per_version": versions,
        "dead_letters": letters.iter().map(|(k, st, n)| json!({"kind": k, "status": st, "count": n})).collect::<Vec<_>>(),
        "throughput": throughput,
        "engine": {
            "applied": s.applied.load(Ordering::Relaxed),
            "failed_attempts": s.failed_attempts.load(Ordering::Relaxed),
            "retries": s.retries.load(Ordering::Relaxed),
            "compensations": s.compensations.load(Ordering::Relaxed),
            "duplicates": s.duplicates.load(Ordering::Relaxed),
            "skipped": s.skipped.load(Ordering::Relaxed),
            "stale": s.stale.load(Ordering::Relaxed),
            "queued": s.queued.load(Ordering::Relaxed),
            "malformed": s.malformed.load(Ordering::Relaxed),
            "infra_retries": s.infra_retries.load(Ordering::Relaxed),
            "live_actors": s.live_actors.load(Ordering::Relaxed),
            "in_flight": state.engine.in_flight().count(),
        },
    })))
}
