//! Wiring: build every part from a [`Config`], consume until shutdown, drain.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr};
use futures_util::StreamExt;

use crate::actors::{Dispatch, Router};
use crate::config::{Config, Orphaned};
use crate::engine::{Engine, Faults};
use crate::handlers::Handlers;
use crate::saga::versions::{self, ChangedVersion, OrphanedVersion};
use crate::saga::{Catalog, LoadError, load_dir};
use crate::store::{Store, StoreError};
use crate::transport::rabbitmq::RECONNECT_DELAY;
use crate::transport::{Endpoint, Transport, TransportError};

/// Why skald could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Saga files are invalid; every error is listed.
    #[error("{} saga definition error(s):\n{}", .0.len(), .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Sagas(Vec<LoadError>),
    /// A loaded saga file keeps a version number the database knows with other content
    /// (one line each, naming the file and the line of its `version:`).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    ChangedVersions(Vec<ChangedVersion>),
    /// Live instances run on saga versions that are no longer loaded, and start-up was
    /// not told to park them (one line each: saga, version, count).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Orphaned(Vec<OrphanedVersion>),
    /// Sagas use handlers that were not registered.
    #[error("saga steps use unregistered handler(s): {}", .0.join(", "))]
    MissingHandlers(Vec<String>),
    /// A saga's `setup` SQL failed: where (the statement's line when PostgreSQL says
    /// where, else the `setup:` line) and PostgreSQL's error, said once.
    #[error("{}:{}:{}: setup: {}", .file.display(), .line, .column, .message)]
    Setup {
        /// The saga file.
        file: std::path::PathBuf,
        /// 1-based line in the file.
        line: u32,
        /// 1-based column in the file.
        column: u32,
        /// PostgreSQL's error: SQLSTATE, message, detail and hint.
        message: String,
    },
    /// PostgreSQL failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The API would be exposed without a token, or its address cannot be bound.
    #[error("API: {0}")]
    Api(String),
}

/// A built skald process, ready to consume.
pub struct App {
    config: Config,
    store: Store,
    transport: Arc<dyn Transport>,
    engine: Arc<Engine>,
    /// Bound in `build`, so that a port-0 address is known before serving.
    http: std::net::TcpListener,
}

impl App {
    /// Loads and validates the sagas, connects to PostgreSQL (creating the database
    /// and applying migrations and saga setup SQL) and to RabbitMQ (declaring the
    /// topology). Nothing is consumed yet.
    pub async fn build(
        config: Config,
        handlers: Handlers,
        faults: Faults,
    ) -> Result<App, AppError> {
        crate::api::check_exposure(config.http_addr, config.api_token.as_deref())
            .map_err(AppError::Api)?;
        let sagas = load_dir(&config.sagas_dir).map_err(AppError::Sagas)?;
        for saga in &sagas {
            tracing::info!(saga = %saga.name, version = saga.version, steps = saga.steps.len(),
                file = %saga.source.display(), "loaded saga");
        }
        let catalog = Catalog::new(sagas);
        let missing = catalog.missing_handlers(|name| handlers.get(name).is_some());
        if !missing.is_empty() {
            return Err(AppError::MissingHandlers(missing));
        }
        // A service that is (re)starting at the same moment delays start-up; it
        // does not fail it.
        let store = until_reachable("PostgreSQL", config.startup_timeout, || {
            Store::connect(&config.database_url, config.db_pool)
        })
        .await?;
        store.migrate().await?;
        // Before anything runs: instances must find the definition they started with.
        let stored = store.stored_versions().await?;
        let changed = versions::changed_versions(&catalog, &stored);
        if !changed.is_empty() {
            return Err(AppError::ChangedVersions(changed));
        }
        let orphaned = versions::orphaned_versions(&catalog, &stored);
        match config.orphaned {
            _ if orphaned.is_empty() => {}
            Orphaned::Refuse => return Err(AppError::Orphaned(orphaned)),
            Orphaned::Park => {
                for o in &orphaned {
                    let parked = store.park_orphaned(&o.saga, o.version).await?;
                    tracing::warn!(saga = %o.saga, version = o.version, parked,
                        "saga version no longer loaded: its live instances are parked (dead letters `orphaned`)");
                }
            }
        }
        store.record_definitions(&catalog).await?;
        let all: Vec<_> = catalog.all().into_iter().map(|s| (**s).clone()).collect();
        store
            .run_setup(&all)
            .await
            .map_err(|e| setup_failed(&catalog, e))?;
        let transport = until_reachable(config.transport.server(), config.startup_timeout, || {
            crate::transport::connect(&config, Endpoint::Orchestrator)
        })
        .await?;
        let engine = Arc::new(
            Engine::new(store.clone(), transport.clone(), catalog, handlers, faults)
                .with_stuck_after(config.stuck_after)
                .with_batching(config.batching),
        );
        let http = std::net::TcpListener::bind(config.http_addr)
            .map_err(|e| AppError::Api(format!("cannot listen on {}: {e}", config.http_addr)))?;
        Ok(App {
            config,
            store,
            transport,
            engine,
            http,
        })
    }

    /// The engine (for its stats and in-flight count).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// What the API handlers share (for serving it, or testing it in-process).
    pub fn api_state(&self) -> crate::api::ApiState {
        crate::api::ApiState {
            store: self.store.clone(),
            transport: self.transport.clone(),
            engine: self.engine.clone(),
            token: self.config.api_token.clone(),
            loopback: self.http_addr().ip().is_loopback(),
            services: crate::api::ServiceDatabases::lazy(&self.config.service_databases),
        }
    }

    /// Where the API listens.
    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Consumes until `shutdown` resolves, then shuts down gracefully: stop
    /// consuming, let in-flight steps finish (commit, publish, ack) within the
    /// shutdown timeout, close the connections. Must run inside an actix system.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
        let router = Router::new(self.engine.clone(), self.config.actor_idle).start();
        let http_addr = self.http_addr();
        let state = self.api_state();
        let listener = self
            .http
            .try_clone()
            .map_err(|e| AppError::Api(e.to_string()))?;
        let server = actix_web::HttpServer::new(move || {
            actix_web::App::new().configure(crate::api::configure(state.clone()))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(5)
        .listen(listener)
        .map_err(|e| AppError::Api(e.to_string()))?
        .run();
        let http = server.handle();
        actix::spawn(server);
        tracing::info!(%http_addr, auth = self.config.api_token.is_some(), "dashboard API listening");
        tracing::info!(transport = self.config.transport.as_str(),
            namespace = %self.config.namespace,
            partitions = self.config.partitions,
            prefetch = self.config.prefetch, "consuming");
        tokio::pin!(shutdown);
        loop {
            let mut deliveries = match self.transport.consume().await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot consume; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(RECONNECT_DELAY) => continue,
                        _ = &mut shutdown => break,
                    }
                }
            };
            self.engine.set_consuming(true);
            let stopped = loop {
                tokio::select! {
                    next = deliveries.next() => match next {
                        Some(delivery) => self.dispatch(&router, delivery),
                        None => break false,
                    },
                    _ = &mut shutdown => break true,
                }
            };
            self.engine.set_consuming(false);
            if stopped {
                break;
            }
            tracing::warn!("consumer stream ended; reconnecting");
            tokio::time::sleep(RECONNECT_DELAY).await;
        }
        http.stop(true).await;
        self.shut_down().await;
        Ok(())
    }

    fn dispatch(&self, router: &Addr<Router>, delivery: crate::transport::Delivery) {
        self.engine.in_flight().enter();
        match self.engine.read(&delivery.body) {
            Ok(job) => router.do_send(Dispatch { job, delivery }),
            Err(reason) => {
                let engine = self.engine.clone();
                actix::spawn(async move { engine.dead_letter(delivery, reason).await });
            }
        }
    }

    async fn shut_down(self) {
        tracing::info!(
            in_flight = self.engine.in_flight().count(),
            "shutting down: draining"
        );
        self.transport.stop_consuming().await;
        let drained = tokio::time::timeout(
            self.config.shutdown_timeout,
            self.engine.in_flight().drained(),
        )
        .await;
        self.engine.begin_shutdown();
        if drained.is_err() {
            tracing::warn!(
                in_flight = self.engine.in_flight().count(),
                "shutdown timeout: unfinished messages will be redelivered"
            );
        }
        self.transport.close().await;
        self.store.close().await;
        let applied = self
            .engine
            .stats()
            .applied
            .load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(applied, "stopped");
    }
}

/// Points a failed `setup` at its saga file: the failing statement's line when
/// PostgreSQL reports a position, the `setup:` line otherwise. Other errors pass.
fn setup_failed(catalog: &Catalog, error: StoreError) -> AppError {
    let StoreError::Setup {
        saga,
        version,
        source,
    } = &error
    else {
        return error.into();
    };
    let Some(def) = catalog.get_version(saga, *version) else {
        return error.into();
    };
    let sql = def.setup_sql.as_deref().unwrap_or_default();
    let pg = source
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>());
    let offset = pg.and_then(|e| match e.position()? {
        sqlx::postgres::PgErrorPosition::Original(p) => Some(p.saturating_sub(1)),
        _ => None,
    });
    let at = def.setup_at;
    let (line, column) = offset.map_or((at.line, at.column), |o| at.of_offset(sql, o));
    let message = crate::store::error_text(source);
    AppError::Setup {
        file: def.source.clone(),
        line,
        column,
        message,
    }
}

/// Runs `connect` until it succeeds or `timeout` has passed, waiting 0.5 s doubling
/// to 5 s between tries, and logging each failure. Errors that no wait can fix (a
/// malformed URL, a broker that refuses skald's login or topology) are returned at once.
async fn until_reachable<T, E, F, Fut>(
    what: &str,
    timeout: Duration,
    mut connect: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display + Retriable,
{
    // A timeout beyond the clock's range waits without end (rather than panic).
    let deadline = tokio::time::Instant::now().checked_add(timeout);
    let mut wait = Duration::from_millis(500);
    loop {
        match connect().await {
            Ok(value) => return Ok(value),
            Err(e)
                if e.worth_retrying()
                    && deadline.is_none_or(|d| tokio::time::Instant::now() + wait < d) =>
            {
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64,
                    "{what} is not reachable yet");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether waiting may fix a start-up error.
trait Retriable {
    fn worth_retrying(&self) -> bool;
}

impl Retriable for StoreError {
    fn worth_retrying(&self) -> bool {
        matches!(self, StoreError::Database(_))
    }
}

impl Retriable for TransportError {
    /// A broker that answers but refuses skald is misconfigured, not restarting.
    fn worth_retrying(&self) -> bool {
        !matches!(self, TransportError::Refused(_))
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test]
    async fn start_up_waits_for_a_service_that_comes_up() {
        let tries = Cell::new(0);
        let result: Result<u32, TransportError> =
            until_reachable("test", Duration::from_secs(10), || {
                tries.set(tries.get() + 1);
                let n = tries.get();
                async move {
                    if n < 3 {
                        Err(TransportError::Connection("refused".into()))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(result.unwrap(), 3);
    }

    #[tokio::test]
    async fn start_up_gives_up_after_its_timeout_and_at_once_on_a_bad_url() {
        let started = std::time::Instant::now();
        let result: Result<(), TransportError> =
            until_reachable("test", Duration::from_millis(800), || async {
                Err(TransportError::Connection("refused".into()))
            })
            .await;
        assert!(result.is_err());
        assert!(started.elapsed() < Duration::from_secs(3));
        let tries = Cell::new(0);
        let result: Result<(), StoreError> =
            until_reachable("test", Duration::from_secs(10), || {
                tries.set(tries.get() + 1);
                async { Err(StoreError::Url("nonsense".into())) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(tries.get(), 1, "a bad URL is not retried");
    }

    #[tokio::test]
    async fn a_start_up_timeout_beyond_the_clock_waits_instead_of_panicking() {
        let tries = Cell::new(0);
        let result: Result<u32, TransportError> =
            until_reachable("test", Duration::from_millis(u64::MAX), || {
                tries.set(tries.get() + 1);
                let n = tries.get();
                async move {
                    if n < 2 {
                        Err(TransportError::Connection("refused".into()))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(result.unwrap(), 2);
    }

    #[tokio::test]
    async fn start_up_stops_at_once_when_the_broker_refuses_the_configuration() {
        let tries = Cell::new(0);
        let result: Result<(), TransportError> =
            until_reachable("test", Duration::from_secs(10), || {
                tries.set(tries.get() + 1);
                async { Err(TransportError::Refused("ACCESS_REFUSED".into())) }
            })
            .await;
        assert!(matches!(result, Err(TransportError::Refused(_))));
        assert_eq!(tries.get(), 1, "a refusal is not waited on");
    }
}
