//! The dashboard's HTTP API (actix-web), served by `skald run`.
//!
//! JSON under `/api/v1`, Prometheus text at `/metrics`, the page at `/`. Every error
//! answer is JSON with a machine-readable code ([`error::ApiError`]); bad input is a
//! 4xx naming what is wrong ([`input`]), never a 5xx. Who may call, and from where,
//! is in [`access`]; skald refuses to start on a non-loopback address without a
//! token ([`check_exposure`]).

mod access;
pub mod error;
mod handlers;
mod input;
mod metrics;
pub mod openapi;
mod page;
pub(crate) mod search;
pub(crate) mod services;
pub mod views;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use actix_web::dev::ResourceDef;
use actix_web::middleware::from_fn;
use actix_web::{HttpRequest, web};

use crate::engine::Engine;
use crate::store::Store;
use crate::transport::Transport;
pub use error::ApiError;
pub use services::ServiceDatabases;

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
    /// The participant services' databases (`SKALD_SERVICE_DATABASES`).
    pub services: ServiceDatabases,
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
        // Only ids are typed path segments, so a path that does not parse names no
        // resource (the parser's own words would name Rust types). But `GET
        // /dead-letters/replay` reaches `GET /dead-letters/{id}`: that is the literal
        // path's wrong method (405), not an unknown id.
        let path = web::PathConfig::default().error_handler(|_, req| {
            match documented_methods(req.path(), false) {
                Some(allow) => not_allowed(allow),
                None => {
                    ApiError::NotFound("no such resource: the id in the path is not a UUID".into())
                }
            }
            .into()
        });
        let get_only = || web::to(|| async { Err::<String, _>(not_allowed("GET")) });
        cfg.app_data(web::Data::new(state))
            .app_data(web::PayloadConfig::new(MAX_BODY))
            .app_data(path)
            .service(
                web::scope("")
                    .service(
                        register(web::scope("/api/v1"))
                            .default_service(web::to(api_fallback))
                            .wrap(from_fn(access::token)),
                    )
                    .service(
                        web::resource("/metrics")
                            .route(web::get().to(metrics::metrics))
                            .default_service(get_only())
                            .wrap(from_fn(access::token)),
                    )
                    .service(
                        web::resource("/")
                            .route(web::get().to(page::page))
                            .default_service(get_only()),
                    )
                    .service(
                        web::resource("/dashboard.js")
                            .route(web::get().to(page::script))
                            .default_service(get_only()),
                    )
                    .service(
                        web::resource("/dashboard.css")
                            .route(web::get().to(page::style))
                            .default_service(get_only()),
                    )
                    .default_service(web::to(|| async {
                        Err::<String, _>(ApiError::NotFound("no such endpoint".into()))
                    }))
                    .wrap(from_fn(access::outer)),
            );
    }
}

fn not_allowed(allow: &str) -> ApiError {
    ApiError::MethodNotAllowed {
        allow: allow.to_string(),
    }
}

/// An `/api/v1` request no route took: 405 with `Allow` when the path is documented
/// (for other methods), 404 otherwise.
async fn api_fallback(req: HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(match documented_methods(req.path(), true) {
        Some(allow) => not_allowed(allow),
        None => ApiError::NotFound("no such endpoint".into()),
    })
}

/// The methods (`GET, POST`) the documented path matching `path` serves. A literal
/// path (`/dead-letters/replay`) wins over a template (`/dead-letters/{id}`);
/// `templates: false` looks at literal paths only.
fn documented_methods(path: &str, templates: bool) -> Option<&'static str> {
    static PATHS: OnceLock<Vec<(bool, ResourceDef, String)>> = OnceLock::new();
    let paths = PATHS.get_or_init(|| {
        let mut paths: Vec<_> = openapi::document()
            .paths
            .paths
            .iter()
            .map(|(path, item)| {
                let methods: Vec<&str> =
                    [("GET", item.get.is_some()), ("POST", item.post.is_some())]
                        .into_iter()
                        .filter_map(|(m, served)| served.then_some(m))
                        .collect();
                (
                    path.contains('{'),
                    ResourceDef::new(path.as_str()),
                    methods.join(", "),
                )
            })
            .collect();
        paths.sort_by_key(|(template, ..)| *template);
        paths
    });
    paths
        .iter()
        .filter(|(template, ..)| templates || !template)
        .find(|(_, def, _)| def.is_match(path))
        .map(|(.., allow)| allow.as_str())
}

/// Lists each `/api/v1` handler once: the same list registers the handlers (their
/// actix route macros give method and path) and makes the OpenAPI document (their
/// `#[utoipa::path]`), so the document cannot drift from the routes.
macro_rules! api_routes {
    ($( $module:ident :: $handler:ident ),* $(,)?) => {
        fn register(scope: actix_web::Scope) -> actix_web::Scope {
            scope $( .service($module::$handler) )*
        }

        /// The `/api/v1` handlers, by name; each is registered and documented.
        pub const ROUTES: &[&str] = &[ $( stringify!($handler), )* ];

        #[derive(utoipa::OpenApi)]
        #[openapi(paths( $( $module::$handler ),* ))]
        struct ApiDoc;
    };
}

api_routes! {
    handlers::health,
    handlers::readiness,
    handlers::openapi,
    handlers::list_sagas,
    handlers::saga_detail,
    handlers::list_instances,
    handlers::start,
    search::search,
    handlers::instance_detail,
    handlers::instance_commands,
    handlers::list_replies,
    handlers::retry_now,
    handlers::cancel,
    handlers::resume,
    handlers::list_dead_letters,
    handlers::bulk_replay,
    handlers::dead_letter_detail,
    handlers::replay,
    handlers::discard,
    services::list_services,
    services::list_service_dead_letters,
    services::replay_service_dead_letter,
    services::discard_service_dead_letter,
    handlers::list_failure_groups,
    handlers::retry_failure_group,
    handlers::discard_failure_group,
    handlers::stats,
}

#[cfg(test)]
mod tests {
    use super::*;

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
