//! The endpoints. Each validates its input into a 4xx before touching anything.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::{ApiError, ApiState};
use crate::envelope::{Command, Envelope, Outgoing, instance_id_for};
use crate::saga::SagaDef;
use crate::saga::coordinator::InstanceStatus;
use crate::store::dead_letters::{self, DeadLetter, DeadLetterKind, DeadLetterStatus};
use crate::store::queries::InstanceFilter;

type Result<T> = std::result::Result<T, ApiError>;

/// `GET /api/v1/health`: the process is alive.
pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({ "status": "ok" }))
}

/// `GET /api/v1/ready`: PostgreSQL and RabbitMQ answer and skald is consuming.
pub async fn ready(state: web::Data<ApiState>) -> HttpResponse {
    let database = state.store.ping().await.is_ok();
    let broker = state.transport.healthy().await;
    let consuming = state.engine.is_consuming();
    // Detail, not a condition: a stuck message means a dependency failed for long,
    // which the checks above already show while it lasts.
    let stuck = state.engine.stats().stuck.load(Ordering::Relaxed);
    let body = json!({ "database": database, "broker": broker, "consuming": consuming,
        "stuck_messages": stuck });
    if database && broker && consuming {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(json!({
            "error": { "code": "not_ready", "message": "a dependency is not ready" },
            "checks": body,
        }))
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

/// `GET /api/v1/sagas`: the loaded saga definitions.
pub async fn sagas(state: web::Data<ApiState>) -> HttpResponse {
    let all: Vec<Value> = state
        .engine
        .catalog()
        .all()
        .into_iter()
        .map(|s| saga_summary(s))
        .collect();
    HttpResponse::Ok().json(json!({ "items": all }))
}

/// `GET /api/v1/sagas/{name}`: one definition, with its step graph: `next` edges
/// forward, `compensate` edges from a step to the compensation run when a later
/// step fails for good.
pub async fn saga(state: web::Data<ApiState>, name: web::Path<String>) -> Result<HttpResponse> {
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
        if pair[0].compensation.is_some() {
            edges.push(json!({ "from": pair[1].name, "to": pair[0].name, "kind": "compensate" }));
        }
    }
    Ok(HttpResponse::Ok().json(json!({
        "summary": saga_summary(saga),
        "definition": **saga,
        "graph": { "nodes": nodes, "edges": edges },
    })))
}

/// Query of `GET /api/v1/instances`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancesQuery {
    saga: Option<String>,
    status: Option<String>,
    aggregate_id: Option<String>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    cursor: Option<String>,
    limit: Option<i64>,
}

/// Pages are cut at (created_at, id): the cursor is `<micros>_<uuid>` of the last
/// item of the previous page.
fn parse_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid)> {
    let bad = || ApiError::BadRequest(format!("invalid cursor {cursor:?}"));
    let (micros, id) = cursor.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    Ok((
        DateTime::from_timestamp_micros(micros).ok_or_else(bad)?,
        id.parse().map_err(|_| bad())?,
    ))
}

/// `GET /api/v1/instances`: filtered, newest first, cursor-paginated.
pub async fn instances(
    state: web::Data<ApiState>,
    query: web::Query<InstancesQuery>,
) -> Result<HttpResponse> {
    let q = query.into_inner();
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 500".into()));
    }
    let status = q
        .status
        .map(|s| {
            InstanceStatus::parse(&s)
                .ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}")))
        })
        .transpose()?;
    let filter = InstanceFilter {
        saga: q.saga,
        status,
        aggregate_id: q.aggregate_id,
        since: q.since,
        until: q.until,
        after: q.cursor.as_deref().map(parse_cursor).transpose()?,
        limit,
    };
    let items = state.store.instances(&filter).await?;
    let next_cursor = (items.len() as i64 == limit)
        .then(|| items.last())
        .flatten()
        .map(|last| format!("{}_{}", last.created_at.timestamp_micros(), last.id));
    Ok(HttpResponse::Ok().json(json!({ "items": items, "next_cursor": next_cursor })))
}

/// `GET /api/v1/instances/{id}`: one instance with its timeline.
pub async fn instance(state: web::Data<ApiState>, id: web::Path<Uuid>) -> Result<HttpResponse> {
    let detail = state
        .store
        .instance(*id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no instance {id}")))?;
    let letters: Vec<Value> = dead_letters::for_instance(state.store.pool(), *id)
        .await?
        .iter()
        .map(dead_letter_json)
        .collect();
    let mut body = serde_json::to_value(&detail).expect("instance serialises");
    body["dead_letters"] = Value::Array(letters);
    Ok(HttpResponse::Ok().json(body))
}

/// Body of `POST /api/v1/instances`: the start envelope's fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    saga: String,
    aggregate_id: Option<String>,
    message_id: Option<Uuid>,
    sequence: Option<u64>,
    #[serde(default)]
    payload: Value,
}

/// `POST /api/v1/instances`: start an instance, exactly like a start message (the
/// same `message_id` always means the same instance). Answers once the broker
/// confirmed the message.
pub async fn start(
    state: web::Data<ApiState>,
    body: web::Json<StartRequest>,
) -> Result<HttpResponse> {
    let req = body.into_inner();
    let saga = state
        .engine
        .catalog()
        .get(&req.saga)
        .ok_or_else(|| ApiError::BadRequest(format!("unknown saga {:?}", req.saga)))?;
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
        saga: req.saga,
        saga_version: None,
        aggregate_id: Some(aggregate_id),
        sequence: req.sequence,
        dispatched_at: Some(Utc::now()),
        command: Command::Start,
        payload: req.payload,
        outputs: Value::Null,
        errors: Vec::new(),
        deadline: None,
    };
    // The same content checks as a start arriving on the queue, answered here as 400
    // instead of a dead letter.
    envelope
        .check()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let message_id = envelope.message_id;
    state
        .transport
        .publish(&Outgoing::to_intake(envelope, 0))
        .await?;
    Ok(HttpResponse::Accepted().json(json!({
        "message_id": message_id,
        "instance_id": instance_id_for(message_id),
    })))
}

/// Query of `GET /api/v1/dead-letters`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLettersQuery {
    kind: Option<String>,
    status: Option<String>,
    limit: Option<i64>,
}

fn dead_letter_json(d: &DeadLetter) -> Value {
    let mut v = serde_json::to_value(d).expect("dead letter serialises");
    v["body"] = match d.body_text() {
        Some(text) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.into())),
        None => Value::String(format!("<{} bytes, not UTF-8>", d.body.len())),
    };
    v
}

/// `GET /api/v1/dead-letters`: newest first, by kind (malformed, unprocessable,
/// exhausted, compensation_failed) and status.
pub async fn dead_letters(
    state: web::Data<ApiState>,
    query: web::Query<DeadLettersQuery>,
) -> Result<HttpResponse> {
    let q = query.into_inner();
    let kind = q
        .kind
        .map(|k| {
            DeadLetterKind::parse(&k)
                .ok_or_else(|| ApiError::BadRequest(format!("unknown kind {k:?}")))
        })
        .transpose()?;
    let status = q
        .status
        .map(|s| {
            DeadLetterStatus::parse(&s)
                .ok_or_else(|| ApiError::BadRequest(format!("unknown status {s:?}")))
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::BadRequest("limit must be 1 to 1000".into()));
    }
    let items: Vec<Value> = dead_letters::list(state.store.pool(), kind, status, limit)
        .await?
        .iter()
        .map(dead_letter_json)
        .collect();
    Ok(HttpResponse::Ok().json(json!({ "items": items })))
}

/// `GET /api/v1/dead-letters/{id}`: the raw body, reason, history and resolution.
pub async fn dead_letter(state: web::Data<ApiState>, id: web::Path<Uuid>) -> Result<HttpResponse> {
    let letter = dead_letters::get(state.store.pool(), *id, false)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no dead letter {id}")))?;
    Ok(HttpResponse::Ok().json(dead_letter_json(&letter)))
}

/// Body of the dead-letter actions (all fields optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// Replay only: a payload replacing the original.
    data: Option<Value>,
    /// Discard only: why.
    note: Option<String>,
    /// Who acts (default: the `X-Skald-Operator` header, else `api`).
    by: Option<String>,
}

/// The action's body (empty when none was sent) and who acts.
fn action_body(
    req: &HttpRequest,
    body: Option<web::Json<ActionRequest>>,
) -> (ActionRequest, String) {
    let body = body.map(|b| b.into_inner()).unwrap_or_default();
    let by = operator(req, &body);
    (body, by)
}

fn operator(req: &HttpRequest, body: &ActionRequest) -> String {
    body.by
        .clone()
        .or_else(|| {
            req.headers()
                .get("x-skald-operator")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "api".to_string())
}

/// `POST /api/v1/dead-letters/{id}/replay`: idempotent (see [`crate::dlq`]).
pub async fn replay(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: Option<web::Json<ActionRequest>>,
) -> Result<HttpResponse> {
    let (body, by) = action_body(&req, body);
    let outcome =
        crate::dlq::replay(&state.store, state.transport.as_ref(), *id, body.data, &by).await?;
    let already = matches!(outcome, crate::dlq::ReplayOutcome::AlreadyReplayed { .. });
    Ok(
        HttpResponse::Ok()
            .json(json!({ "id": *id, "replayed": true, "already_replayed": already })),
    )
}

/// `POST /api/v1/dead-letters/{id}/discard`: recorded, idempotent.
pub async fn discard(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: Option<web::Json<ActionRequest>>,
) -> Result<HttpResponse> {
    let (body, by) = action_body(&req, body);
    let outcome = crate::dlq::discard(&state.store, *id, &by, body.note.as_deref()).await?;
    let status = match outcome {
        crate::dlq::DiscardOutcome::Discarded => "discarded",
        crate::dlq::DiscardOutcome::AlreadyResolved(s) => s.as_str(),
    };
    Ok(HttpResponse::Ok().json(json!({ "id": *id, "status": status })))
}

/// `GET /api/v1/stats`: counts by saga and state, engine counters, dead letters,
/// queue depths, and steps per minute over the last 15 minutes.
pub async fn stats(state: web::Data<ApiState>) -> Result<HttpResponse> {
    let counts = state.store.status_counts().await?;
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

/// Upper bounds (seconds) of the step-latency histogram buckets in `/metrics`.
const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `GET /metrics`: Prometheus text format (this process's counters, and instance
/// and dead-letter gauges from PostgreSQL).
pub async fn metrics(state: web::Data<ApiState>) -> Result<HttpResponse> {
    let s = state.engine.stats();
    let mut out = String::new();
    let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 10] = [
        (
            "skald_steps_applied_total",
            "Step and compensation attempts committed.",
            &s.applied,
        ),
        (
            "skald_step_failures_total",
            "Attempts that failed (each retried or compensated).",
            &s.failed_attempts,
        ),
        (
            "skald_retries_total",
            "Retries scheduled after a failed attempt.",
            &s.retries,
        ),
        (
            "skald_compensations_total",
            "Compensations committed.",
            &s.compensations,
        ),
        (
            "skald_duplicates_total",
            "Copies of handled messages dropped by the inbox.",
            &s.duplicates,
        ),
        (
            "skald_stale_discards_total",
            "Starts older than their aggregate's watermark.",
            &s.stale,
        ),
        (
            "skald_skipped_total",
            "Messages out of date for their instance.",
            &s.skipped,
        ),
        (
            "skald_malformed_total",
            "Unreadable messages sent to the dead-letter queue.",
            &s.malformed,
        ),
        (
            "skald_infra_retries_total",
            "Waits after a database or broker failure.",
            &s.infra_retries,
        ),
        (
            "skald_data_errors_total",
            "Messages whose data PostgreSQL refused (dead-lettered, code data_error).",
            &s.data_errors,
        ),
    ];
    for (name, help, value) in counters {
        let value = value.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP skald_live_actors Aggregate actors alive.\n# TYPE skald_live_actors gauge\nskald_live_actors {}",
        s.live_actors.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP skald_stuck_messages Messages held by infrastructure failures for longer than SKALD_STUCK_AFTER_MS.\n# TYPE skald_stuck_messages gauge\nskald_stuck_messages {}",
        s.stuck.load(Ordering::Relaxed)
    );
    let h = &s.step_latency;
    let _ = writeln!(
        out,
        "# HELP skald_step_seconds Time to handle one message, taken to acked.\n# TYPE skald_step_seconds histogram"
    );
    for (bound, count) in LATENCY_BOUNDS.iter().zip(h.cumulative(LATENCY_BOUNDS)) {
        let _ = writeln!(out, "skald_step_seconds_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(
        out,
        "skald_step_seconds_bucket{{le=\"+Inf\"}} {}",
        h.count()
    );
    let _ = writeln!(
        out,
        "skald_step_seconds_sum {}\nskald_step_seconds_count {}",
        h.sum_seconds(),
        h.count()
    );
    let _ = writeln!(
        out,
        "# HELP skald_instances Saga instances by saga and status.\n# TYPE skald_instances gauge"
    );
    for c in state.store.status_counts().await? {
        let _ = writeln!(
            out,
            "skald_instances{{saga=\"{}\",status=\"{}\"}} {}",
            c.saga,
            c.status.as_str(),
            c.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP skald_dead_letters Dead letters by kind and status.\n# TYPE skald_dead_letters gauge"
    );
    for (kind, status, n) in state.store.dead_letter_counts().await? {
        let _ = writeln!(
            out,
            "skald_dead_letters{{kind=\"{kind}\",status=\"{status}\"}} {n}"
        );
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out))
}

/// `GET /`: the dashboard page (embedded in the binary).
pub async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("dashboard.html"))
}

/// `GET /api/v1/openapi.json`: the OpenAPI 3 document, generated from the route list.
pub async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(super::openapi())
}

fn action_json(id: Uuid, action: &str, outcome: crate::operator::ActionOutcome) -> HttpResponse {
    HttpResponse::Ok().json(json!({ "id": id, "action": action, "outcome": outcome }))
}

/// `POST /api/v1/instances/{id}/retry`.
pub async fn retry_now(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: Option<web::Json<ActionRequest>>,
) -> Result<HttpResponse> {
    let (_, by) = action_body(&req, body);
    let outcome =
        crate::operator::retry_now(&state.store, state.transport.as_ref(), *id, &by).await?;
    Ok(action_json(*id, "retry", outcome))
}

/// `POST /api/v1/instances/{id}/cancel`.
pub async fn cancel(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: Option<web::Json<ActionRequest>>,
) -> Result<HttpResponse> {
    let (_, by) = action_body(&req, body);
    let outcome = crate::operator::cancel(
        &state.store,
        state.engine.catalog(),
        state.transport.as_ref(),
        *id,
        &by,
    )
    .await?;
    Ok(action_json(*id, "cancel", outcome))
}

/// `POST /api/v1/instances/{id}/resume`.
pub async fn resume(
    req: HttpRequest,
    state: web::Data<ApiState>,
    id: web::Path<Uuid>,
    body: Option<web::Json<ActionRequest>>,
) -> Result<HttpResponse> {
    let (_, by) = action_body(&req, body);
    let outcome = crate::operator::resume(&state.store, state.transport.as_ref(), *id, &by).await?;
    Ok(action_json(*id, "resume", outcome))
}

/// Body of `POST /api/v1/dead-letters/replay`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkReplayRequest {
    /// Only this kind.
    kind: Option<String>,
    /// Only this saga.
    saga: Option<String>,
    /// At most this many (default 100, at most 1000).
    limit: Option<i64>,
    /// Replays per second at most (default 50, at most 1000).
    per_second: Option<u32>,
    /// Who replays.
    by: Option<String>,
}

/// `POST /api/v1/dead-letters/replay`: replays pending dead letters matching the
/// filter one at a time, oldest first (so one aggregate's letters keep their order),
/// at most `per_second` a second.
pub async fn bulk_replay(
    req: HttpRequest,
    state: web::Data<ApiState>,
    body: Option<web::Json<BulkReplayRequest>>,
) -> Result<HttpResponse> {
    let body = body.map(|b| b.into_inner()).unwrap_or_default();
    let kind = body
        .kind
        .as_deref()
        .map(|k| {
            DeadLetterKind::parse(k)
                .ok_or_else(|| ApiError::BadRequest(format!("unknown kind {k:?}")))
        })
        .transpose()?;
    let limit = body.limit.unwrap_or(100);
    let per_second = body.per_second.unwrap_or(50);
    if !(1..=1000).contains(&limit) || !(1..=1000).contains(&per_second) {
        return Err(ApiError::BadRequest(
            "limit and per_second must be 1 to 1000".into(),
        ));
    }
    let by = body
        .by
        .clone()
        .or_else(|| {
            req.headers()
                .get("x-skald-operator")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "api".into());
    let what = crate::dlq::BulkReplay {
        kind,
        saga: body.saga.clone(),
        limit,
        per_second,
    };
    let replayed =
        crate::dlq::bulk_replay(&state.store, state.transport.as_ref(), &what, &by).await?;
    Ok(HttpResponse::Ok().json(json!({ "replayed": replayed })))
}
