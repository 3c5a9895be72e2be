//! The publishing side of the PostgreSQL transport: one task per transport that
//! inserts every waiting publish in one statement (group commit).
//!
//! Publishes are queued in the order they are called and inserted in that order, so
//! the ids — the order consumers see — follow the order of the calls even when a
//! caller has many in flight at once (as it may on a broker channel); and a burst of
//! publishes costs one round trip and one commit instead of one each.

use futures_util::future::BoxFuture;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use super::db_err;
use crate::transport::TransportError;

/// At most this many publishes go into one statement.
pub const MAX_BATCH: usize = 1_000;

/// One publish waiting for its batch.
struct Pending {
    endpoint: String,
    key: String,
    body: Vec<u8>,
    delay_ms: i64,
    done: oneshot::Sender<Result<(), TransportError>>,
}

/// Queues publishes for the task that inserts them.
pub(super) struct Publisher {
    queue: mpsc::UnboundedSender<Pending>,
}

impl Publisher {
    /// Starts the task, which ends when the publisher is dropped.
    pub fn start(pool: PgPool) -> Publisher {
        let (queue, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(pool, rx));
        Publisher { queue }
    }

    /// Queues one publish (at the call, so the order of calls is kept) and resolves
    /// once its batch committed.
    pub fn publish(
        &self,
        endpoint: &str,
        key: &str,
        body: &[u8],
        delay_ms: u64,
    ) -> BoxFuture<'static, Result<(), TransportError>> {
        let (done, result) = oneshot::channel();
        let queued = self.queue.send(Pending {
            endpoint: endpoint.to_string(),
            key: key.to_string(),
            body: body.to_vec(),
            delay_ms: i64::try_from(delay_ms).unwrap_or(i64::MAX),
            done,
        });
        Box::pin(async move {
            let closed = || TransportError::Connection("the transport is closed".into());
            queued.map_err(|_| closed())?;
            result.await.map_err(|_| closed())?
        })
    }
}

async fn run(pool: PgPool, mut rx: mpsc::UnboundedReceiver<Pending>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let result = insert(&pool, &batch).await;
        for p in batch.drain(..) {
            let _ = p.done.send(result.as_ref().map(|_| ()).map_err(db_err));
        }
    }
}

/// Inserts `batch` in one statement (one transaction): ready messages in order into
/// `queue_messages`, delayed ones into `queue_delayed` with their due time. The
/// tables' insert triggers notify the consumers.
async fn insert(pool: &PgPool, batch: &[Pending]) -> Result<(), sqlx::Error> {
    let endpoints: Vec<&str> = batch.iter().map(|p| p.endpoint.as_str()).collect();
    let keys: Vec<&str> = batch.iter().map(|p| p.key.as_str()).collect();
    let bodies: Vec<&[u8]> = batch.iter().map(|p| p.body.as_slice()).collect();
    let delays: Vec<i64> = batch.iter().map(|p| p.delay_ms).collect();
    sqlx::query(
        "WITH batch AS MATERIALIZED (
            SELECT * FROM unnest($1::text[], $2::text[], $3::bytea[], $4::bigint[])
                   WITH ORDINALITY AS b(endpoint, key, body, delay_ms, n)),
         ready AS (
            INSERT INTO skald.queue_messages (endpoint, key, body)
            SELECT endpoint, key, body FROM batch WHERE delay_ms = 0 ORDER BY n
            RETURNING 1),
         delayed AS (
            -- now() is when this transaction began, after every caller asked: never early.
            INSERT INTO skald.queue_delayed (endpoint, key, body, due_at)
            SELECT endpoint, key, body, now() + delay_ms * interval '1 millisecond'
              FROM batch WHERE delay_ms > 0 ORDER BY n
            RETURNING 1)
         SELECT (SELECT count(*) FROM ready) + (SELECT count(*) FROM delayed)",
    )
    .bind(&endpoints)
    .bind(&keys)
    .bind(&bodies)
    .bind(&delays)
    .execute(pool)
    .await?;
    Ok(())
}
