//! Rust step handlers, registered by name, for library users whose step is code
//! rather than SQL.
//!
//! A handler runs inside the step's PostgreSQL transaction: whatever it writes
//! through the connection it is given commits (or rolls back) together with skald's
//! own bookkeeping, so its database effects happen exactly once. Effects outside the
//! database (HTTP calls, emails) should pass [`HandlerInput::idempotency_key`] on, so
//! that the receiver can recognise a retry.
//!
//! ```
//! use skald::handlers::{HandlerError, HandlerFuture, HandlerInput, Handlers};
//! use sqlx::PgConnection;
//!
//! fn audit<'a>(conn: &'a mut PgConnection, input: HandlerInput) -> HandlerFuture<'a> {
//!     Box::pin(async move {
//!         sqlx::query("SELECT 1").execute(&mut *conn).await.map_err(HandlerError::from)?;
//!         Ok(serde_json::json!({ "audited": input.params.len() }))
//!     })
//! }
//!
//! let mut handlers = Handlers::default();
//! handlers.register("audit", audit);
//! assert!(handlers.get("audit").is_some());
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::saga::coordinator::{FailureKind, Phase};

/// What a handler returns: its output (a JSON object whose keys become the step's
/// output), or why it failed.
pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = Result<Value, HandlerError>> + Send + 'a>>;

/// A step implemented in Rust.
pub trait StepHandler: Send + Sync + 'static {
    /// Runs the step (or its compensation: see [`HandlerInput::phase`]) on `conn`,
    /// which is inside the step's transaction.
    fn call<'a>(&'a self, conn: &'a mut PgConnection, input: HandlerInput) -> HandlerFuture<'a>;
}

impl<F> StepHandler for F
where
    F: for<'a> Fn(&'a mut PgConnection, HandlerInput) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    fn call<'a>(&'a self, conn: &'a mut PgConnection, input: HandlerInput) -> HandlerFuture<'a> {
        self(conn, input)
    }
}

/// What a handler is told about the attempt it runs.
#[derive(Debug, Clone)]
pub struct HandlerInput {
    /// The saga instance.
    pub instance_id: Uuid,
    /// The aggregate the instance belongs to.
    pub aggregate_id: String,
    /// The step's name.
    pub step: String,
    /// Action or compensation.
    pub phase: Phase,
    /// 1 for the first try.
    pub attempt: u32,
    /// Stable for this instance, step and phase across every retry and redelivery:
    /// hand it to external services so they apply a repeated call once.
    pub idempotency_key: String,
    /// The step's `params`, resolved.
    pub params: Map<String, Value>,
}

/// Why a handler failed, and whether trying again can help.
///
/// A `sqlx::Error` converts into it (so `?` works in a handler), classified like a SQL
/// step's error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    /// Transient: retried after the step's backoff delay.
    #[error("{0}")]
    Retryable(String),
    /// Will fail again: not retried; the saga compensates.
    #[error("{0}")]
    Fatal(String),
}

impl HandlerError {
    /// Whether a retry may help.
    pub fn kind(&self) -> FailureKind {
        match self {
            HandlerError::Retryable(_) => FailureKind::Retryable,
            HandlerError::Fatal(_) => FailureKind::Fatal,
        }
    }
}

/// The handlers a process knows, by name. Cheap to clone.
#[derive(Clone, Default)]
pub struct Handlers {
    by_name: HashMap<String, Arc<dyn StepHandler>>,
}

impl Handlers {
    /// Registers `handler` under `name`, replacing any earlier one of that name.
    pub fn register(&mut self, name: impl Into<String>, handler: impl StepHandler) -> &mut Self {
        self.by_name.insert(name.into(), Arc::new(handler));
        self
    }

    /// The handler registered under `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn StepHandler>> {
        self.by_name.get(name)
    }
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.by_name.keys()).finish()
    }
}
