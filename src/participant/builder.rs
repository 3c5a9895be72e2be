//! Putting a participant service together: its name, its database, its transport,
//! one handler per message type, its retry policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::consumer::{Participant, Parts};
use super::faults::ParticipantFaults;
use super::handler::MessageHandler;
use super::policy::{PolicyError, RetryPolicy};
use super::store;
use crate::transport::{Transport, TransportError};

/// What can stop a participant from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum ParticipantError {
    /// The builder was given something unusable (the message says what).
    #[error("participant: {0}")]
    Config(String),
    /// The retry policy is out of its limits.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The service's database failed.
    #[error("service database: {}", crate::store::error_text(.0))]
    Database(#[from] sqlx::Error),
    /// The participant's migrations could not be applied.
    #[error("participant migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The broker failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// The longest service name, in bytes. Names are `[A-Za-z0-9_-]`: they become queue
/// names (`NS.svc.<service>…`).
pub const MAX_SERVICE_BYTES: usize = 64;

/// Whether `name` can name a service.
pub fn check_service_name(name: &str) -> Result<(), ParticipantError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SERVICE_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ParticipantError::Config(format!(
            "service name must be 1 to {MAX_SERVICE_BYTES} of [A-Za-z0-9_-], got {name:?}"
        )))
    }
}

/// Opens a pool on a service's database, creating the database first if it does not
/// exist (as `skald run` does for its own).
pub async fn connect_pool(url: &str, max_connections: u32) -> Result<PgPool, ParticipantError> {
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e: sqlx::Error| ParticipantError::Config(format!("database URL: {e}")))?;
    crate::store::create_database_if_missing(&options)
        .await
        .map_err(|e| match e {
            crate::store::StoreError::Database(e) => ParticipantError::Database(e),
            other => ParticipantError::Config(other.to_string()),
        })?;
    Ok(PgPoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await?)
}

/// Builds a [`Participant`]: `Participant::builder("stock").pool(pool)
/// .transport(transport).handler("reserve_stock", reserve).build().await?`.
pub struct ParticipantBuilder {
    service: String,
    pool: Option<PgPool>,
    transport: Option<Arc<dyn Transport>>,
    handlers: HashMap<String, Arc<dyn MessageHandler>>,
    retry: RetryPolicy,
    faults: ParticipantFaults,
    shutdown_timeout: Duration,
}

impl Participant {
    /// Starts building the participant of service `service`.
    pub fn builder(service: impl Into<String>) -> ParticipantBuilder {
        ParticipantBuilder {
            service: service.into(),
            pool: None,
            transport: None,
            handlers: HashMap::new(),
            retry: RetryPolicy::default(),
            faults: ParticipantFaults::none(),
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl ParticipantBuilder {
    /// The service's own database (required). Its handlers' transactions, and the
    /// `skald_participant` tables, are there.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// The transport, opened for this service's endpoint (required): e.g.
    /// `RabbitTransport::connect_as(&config, Endpoint::Service("stock".into()))`.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Handles messages of type `kind` with `handler` (one handler per type; a second
    /// registration of a type replaces the first).
    pub fn handler(mut self, kind: impl Into<String>, handler: impl MessageHandler) -> Self {
        self.handlers.insert(kind.into(), Arc::new(handler));
        self
    }

    /// The retry policy (default [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// Faults to inject (crash tests; default none).
    pub fn faults(mut self, faults: ParticipantFaults) -> Self {
        self.faults = faults;
        self
    }

    /// How long a graceful shutdown waits for messages in flight (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = timeout;
        self
    }

    /// Checks the configuration and applies the participant's migrations to the
    /// service's database. Nothing is consumed yet: see [`Participant::run`].
    pub async fn build(self) -> Result<Participant, ParticipantError> {
        check_service_name(&self.service)?;
        self.retry.check()?;
        let pool = self
            .pool
            .ok_or_else(|| ParticipantError::Config("no database pool given".into()))?;
        let transport = self
            .transport
            .ok_or_else(|| ParticipantError::Config("no transport given".into()))?;
        if self.handlers.is_empty() {
            return Err(ParticipantError::Config(
                "no handler registered: nothing could be handled".into(),
            ));
        }
        for kind in self.handlers.keys() {
            super::wire::check_kind(kind)
                .map_err(|e| ParticipantError::Config(format!("handler type {kind:?}: {e}")))?;
        }
        store::migrate(&pool).await?;
        let parts = Parts {
            service: self.service,
            pool,
            transport,
            handlers: self.handlers,
            retry: self.retry,
            faults: self.faults,
        };
        Ok(Participant::new(parts, self.shutdown_timeout))
    }
}
