//! The handler contract: what a service's code for one message type receives and
//! returns.
//!
//! A handler runs inside a transaction on the **service's own database** (the
//! transaction that also records the message as processed). What it writes
//! through the connection commits together with that record, or not at all: its
//! database effect happens once per message, however often the message is delivered.
//!
//! ```
//! use serde_json::{Map, Value};
//! use skald::participant::{HandlerError, HandlerFuture, Incoming};
//! use sqlx::PgConnection;
//!
//! fn greet<'a>(conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
//!     Box::pin(async move {
//!         let name = msg.payload.get("name").and_then(Value::as_str)
//!             .ok_or_else(|| HandlerError::Fatal("payload.name: expected text".into()))?;
//!         // `?` on a sqlx error classifies it by SQLSTATE (retryable or fatal).
//!         sqlx::query("SELECT 1").execute(&mut *conn).await?;
//!         let mut out = Map::new();
//!         out.insert("greeting".into(), Value::from(format!("hello {name}")));
//!         Ok(out)
//!     })
//! }
//! ```

use std::future::Future;
use std::pin::Pin;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::PgConnection;
use uuid::Uuid;

/// Why a handler failed: `Fatal` (a business refusal; the command's reply is
/// `failed`/`fatal` and it is never retried) or `Retryable` (tried again after the
/// policy's delay, up to its attempts). A `sqlx::Error` converts with `?`, classified
/// by SQLSTATE exactly as skald classifies a step's database error.
pub use crate::handlers::HandlerError;

/// What a handler returns: the outputs (a JSON object, the reply's `outputs`), or why
/// it failed.
pub type HandlerFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Map<String, Value>, HandlerError>> + Send + 'a>>;

/// One message as its handler sees it.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// The message's id: the same on every copy and retry. Hand it on to anything
    /// outside the database as an idempotency key.
    pub message_id: Uuid,
    /// Its type (the handler's name).
    pub kind: String,
    /// The aggregate it is about.
    pub aggregate_id: String,
    /// Its parameters or data.
    pub payload: Map<String, Value>,
    /// Which try this is: 1 for the first.
    pub attempt: u32,
    /// A saga's command (a reply will be sent), not a plain event.
    pub is_command: bool,
    /// The publisher's sequence number, if any.
    pub sequence: Option<u64>,
    /// When the publisher first sent it, if it said.
    pub dispatched_at: Option<DateTime<Utc>>,
}

/// The code that handles one message type.
pub trait MessageHandler: Send + Sync + 'static {
    /// Handles `msg` on `conn`, inside the transaction that records it.
    fn call<'a>(&'a self, conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a>;
}

impl<F> MessageHandler for F
where
    F: for<'a> Fn(&'a mut PgConnection, Incoming) -> HandlerFuture<'a> + Send + Sync + 'static,
{
    fn call<'a>(&'a self, conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
        self(conn, msg)
    }
}
