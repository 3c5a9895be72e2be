//! The dashboard's HTTP API (actix-web), served by `skald run`.
//!
//! JSON under `/api/v1`, Prometheus text at `/metrics`. Every error answer is JSON
//! with a machine-readable code ([`error::ApiError`]); bad input is a 4xx, never a
//! 500.
//!
//! **Access.** With `SKALD_API_TOKEN` set, every `/api/v1` request needs
//! `Authorization: Bearer <token>` (compared in constant time). Without a token,
//! reads are open and mutations (POST) are refused unless skald listens on a loopback
//! address — and skald refuses to start on a non-loopback address without a token
//! ([`check_exposure`]).

pub mod error;
mod handlers;

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::{Next, from_fn};
use actix_web::{HttpResponse, ResponseError, web};

use crate::engine::Engine;
use crate::store::Store;
use crate::transport::Transport;
pub use error::ApiError;

/// Largest request body accepted (bytes).
pub const MAX_BODY: usize = 256 * 1024;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// PostgreSQL.
    pub store: Store,
    /// The broker, for starts and replays.
    pub transport: Arc<dyn Transport>,
    /// The engine: stats, catalog, consumption state.
    pub engine: Arc<Engine>,
    /// `SKALD_API_TOKEN`, if set.
    pub token: Option<String>,
    /// Whether the server listens on loopback only.
    pub loopback: bool,
}

/// Refuses a configuration that would expose mutations to the network: a
/// non-loopback address without `SKALD_API_TOKEN`.
pub fn check_exposure(addr: SocketAddr, token: Option<&str>) -> Result<(), String> {
    if addr.ip().is_loopback() || token.is_some_and(|t| !t.is_empty()) {
        Ok(())
    } else {
        Err(format!(
            "refusing to serve the API on {addr} without SKALD_API_TOKEN: \
             set a token, or bind to 127.0.0.1"
        ))
    }
}

/// Registers every route, the JSON error handlers and the access rules.
pub fn configure(state: ApiState) -> impl FnOnce(&mut web::ServiceConfig) {
    move |cfg| {
        let json = web::JsonConfig::default()
            .limit(MAX_BODY)
            .error_handler(|err, _| {
                let e = match &err {
                    actix_web::error::JsonPayloadError::Overflow { .. }
                    | actix_web::error::JsonPayloadError::OverflowKnownLength { .. } => {
                        ApiError::TooLarge(err.to_string())
                    }
                    _ => ApiError::BadRequest(format!("invalid JSON body: {err}")),
                };
                actix_web::error::InternalError::from_response(err, e.error_response()).into()
            });
        let query = web::QueryConfig::default().error_handler(|err, _| {
            let e = ApiError::BadRequest(format!("invalid query: {err}"));
            actix_web::error::InternalError::from_response(err, e.error_response()).into()
        });
        let path = web::PathConfig::default().error_handler(|err, _| {
            let e = ApiError::NotFound(format!("invalid path: {err}"));
            actix_web::error::InternalError::from_response(err, e.error_response()).into()
        });
        cfg.app_data(web::Data::new(state))
            .app_data(json)
            .app_data(query)
            .app_data(path)
            .route("/", web::get().to(handlers::page))
            .route("/metrics", web::get().to(handlers::metrics))
            .service(
                register(web::scope("/api/v1"))
                    .default_service(web::to(|| async {
                        Err::<HttpResponse, _>(ApiError::NotFound("no such endpoint".into()))
                    }))
                    .wrap(from_fn(access)),
            );
    }
}

/// Declares the `/api/v1` routes once: the same list registers the handlers and
/// generates the OpenAPI document, so the document cannot drift from the routes.
macro_rules! api_routes {
    ($( $method:ident $path:literal => $handler:path, $summary:literal; )*) => {
        fn register(scope: actix_web::Scope) -> actix_web::Scope {
            scope $( .route($path, web::$method().to($handler)) )*
        }

        /// Every `/api/v1` route: method, path (relative to `/api/v1`), summary.
        pub const ROUTES: &[(&str, &str, &str)] = &[ $( (stringify!($method), $path, $summary), )* ];
    };
}

api_routes! {
    get "/health" => handlers::health, "The process is alive.";
    get "/ready" => handlers::ready, "PostgreSQL and RabbitMQ answer and skald consumes; 503 otherwise.";
    get "/openapi.json" => handlers::openapi, "This document.";
    get "/sagas" => handlers::sagas, "The loaded saga definitions.";
    get "/sagas/{name}" => handlers::saga, "One definition with its steps, policies and step graph.";
    get "/instances" => handlers::instances, "Instances, newest first; filters saga, status, aggregate_id, since, until; cursor pages.";
    post "/instances" => handlers::start, "Start an instance (same message_id, same instance); 202 once the broker confirmed.";
    get "/instances/{id}" => handlers::instance, "One instance with its timeline and dead letters.";
    post "/instances/{id}/retry" => handlers::retry_now, "Run a pending retry now instead of after its delay (recorded, idempotent).";
    post "/instances/{id}/cancel" => handlers::cancel, "Stop going forward and compensate the completed steps (recorded, idempotent).";
    post "/instances/{id}/resume" => handlers::resume, "Resume a parked (failed) instance by replaying its dead letter.";
    get "/dead-letters" => handlers::dead_letters, "Dead letters, newest first; filters kind and status.";
    post "/dead-letters/replay" => handlers::bulk_replay, "Replay every pending dead letter matching a filter, rate-limited, in order.";
    get "/dead-letters/{id}" => handlers::dead_letter, "One dead letter: raw body, reason, history, resolution.";
    post "/dead-letters/{id}/replay" => handlers::replay, "Replay, optionally with an edited payload (recorded, idempotent).";
    post "/dead-letters/{id}/discard" => handlers::discard, "Set aside (recorded, never erased).";
    get "/stats" => handlers::stats, "Counts by saga and state, engine counters, dead letters, steps per minute.";
}

/// The OpenAPI 3 document of [`ROUTES`].
pub fn openapi() -> serde_json::Value {
    use serde_json::json;
    let error = json!({
        "description": "Error",
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    });
    let mut paths = serde_json::Map::new();
    for (method, path, summary) in ROUTES {
        let params: Vec<serde_json::Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        let mut op = json!({
            "summary": summary,
            "parameters": params,
            "responses": {
                "200": { "description": "OK", "content": { "application/json": {} } },
                "4XX": error.clone(),
                "5XX": error.clone(),
            },
        });
        if *method == "post" {
            op["requestBody"] = json!({ "required": false, "content": { "application/json": {} } });
        }
        let entry = paths
            .entry(format!("/api/v1{path}"))
            .or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": { "title": "skald dashboard API", "version": env!("CARGO_PKG_VERSION") },
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
            "schemas": { "Error": {
                "type": "object",
                "required": ["error"],
                "properties": { "error": { "type": "object", "required": ["code", "message"], "properties": {
                    "code": { "type": "string" }, "message": { "type": "string" } } } }
            } }
        },
        "security": [ { "bearer": [] } ],
        "paths": paths,
    })
}

/// Bearer-token check (constant time) and the no-token mutation rule. A refusal is
/// answered here, as a JSON error response.
async fn access(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<ApiState>>()
        .expect("ApiState is registered")
        .clone();
    let refusal = match &state.token {
        Some(token) => {
            let presented = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            (!constant_time_eq(presented.as_bytes(), token.as_bytes()))
                .then_some(ApiError::Unauthorized)
        }
        None => {
            let mutation = !matches!(*req.method(), Method::GET | Method::HEAD);
            (mutation && !state.loopback).then(|| {
                ApiError::Forbidden(
                    "mutations need SKALD_API_TOKEN when not bound to loopback".into(),
                )
            })
        }
    };
    match refusal {
        Some(e) => Ok(req.into_response(e.error_response()).map_into_right_body()),
        None => Ok(next.call(req).await?.map_into_left_body()),
    }
}

/// Compares two byte strings in time that depends only on their lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secrets"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn a_public_address_needs_a_token() {
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        assert!(check_exposure(public, None).is_err());
        assert!(check_exposure(public, Some("")).is_err());
        assert!(check_exposure(public, Some("t")).is_ok());
        assert!(check_exposure(local, None).is_ok());
    }
}
