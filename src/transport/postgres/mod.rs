//! PostgreSQL as skald's transport (`SKALD_TRANSPORT=postgres`): the queues are tables
//! in skald's own database (migration `20261128000010_queue.sql`), so skald needs no
//! broker. The design, its costs and its limits are in `docs/design.md`.
//!
//! - **Publish** is a committed `INSERT` (so "confirmed" means committed): the
//!   publishes waiting at a moment go in one statement, in call order
//!   ([`publisher`]); the table's insert trigger `NOTIFY`s idle consumers. A delayed
//!   publish is a row in `queue_delayed` with its due time.
//! - **Partitions**: a message's partition is its key's hash modulo
//!   `SKALD_PARTITIONS`. A consumer owns a partition by holding a session advisory lock
//!   on it ([`consumer`]); it fetches only owned partitions, oldest first, in batches,
//!   and acks by deleting the row on that same session — the lock is the fence.
//! - **Failover**: the server releases a dead session's locks at once; the next
//!   consumer takes the partition within [`consumer::POLL_INTERVAL`] and delivers the
//!   unacked rows first (they have the lowest ids), flagged redelivered.
//! - **Dead letters** go to `queue_dead_letters`, counted in the queue depths; the
//!   engine's own record in `skald.dead_letters` is what people list.
//! - **One transaction per step** (built, switched off as slower: [`SETTLE_IN_TRANSACTION`]):
//!   every delivery can be settled inside the step's own transaction
//!   ([`Transport::in_transaction`]): the step's messages are inserted and the
//!   delivery's row deleted there ([`outbox`]), so consume, effect, record, next
//!   message and ack commit once; afterwards the session only forgets the delivery.

pub mod consumer;
mod outbox;
pub mod partition;
pub mod publisher;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;

use super::{Delivery, Endpoint, Transport, TransportError, TxOutbox};
use crate::config::Config;
use crate::store::Store;
use consumer::{ConsumerHandle, ConsumerSetup, Control};
use outbox::PgOutbox;
use publisher::Publisher;

/// The `LISTEN/NOTIFY` channel the queue tables' insert triggers notify (payload: see
/// [`pg_notify_payload`]).
pub const CHANNEL: &str = "skald_queue";

/// Whether deliveries are settled inside the step's own transaction ([`outbox`]).
/// Off: measured slower. With it on, `skald bench --sagas 10000` ran 3,652 steps/s
/// against 6,210 with it off (medians of 3, BENCHMARKS.md 2026-12-07); the cause is not
/// found yet (docs/design.md, "One transaction per step", lists what was ruled out).
const SETTLE_IN_TRANSACTION: bool = false;

/// Connections the transport's pool opens at most (the publisher uses one at a time;
/// the consumer's session and the listener are two more of their own).
pub const POOL_SIZE: u32 = 3;

/// The notification payload for a publish to `endpoint`: `r:` a ready message, `d:` a
/// delayed one.
pub(crate) fn pg_notify_payload(endpoint: &str, delayed: bool) -> String {
    format!("{}:{endpoint}", if delayed { 'd' } else { 'r' })
}

pub(crate) fn db_err(e: impl std::fmt::Display) -> TransportError {
    TransportError::Connection(format!("PostgreSQL: {e}"))
}

/// The name of an endpoint's queues in the tables: `skald` for skald's intake, the
/// service's name otherwise.
pub fn endpoint_name(endpoint: &Endpoint) -> &str {
    match endpoint {
        Endpoint::Orchestrator => "skald",
        Endpoint::Service(name) => name,
    }
}

/// skald's PostgreSQL transport for one home endpoint.
pub struct PgTransport {
    pool: PgPool,
    publisher: Publisher,
    database_url: String,
    endpoint: String,
    partitions: u16,
    prefetch: u16,
    consumer: std::sync::Mutex<Option<ConsumerHandle>>,
    listener: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    arrived: Arc<Notify>,
    delays_changed: Arc<AtomicBool>,
    outbox: PgOutbox,
}

impl PgTransport {
    /// Connects to skald's database of `config` (creating it and applying the
    /// migrations if needed) for the queues of `home`.
    pub async fn connect(
        config: &Config,
        home: Endpoint,
    ) -> Result<Arc<PgTransport>, TransportError> {
        let store = Store::connect(&config.database_url, POOL_SIZE)
            .await
            .map_err(db_err)?;
        store.migrate().await.map_err(db_err)?;
        Ok(Arc::new(PgTransport {
            pool: store.pool().clone(),
            publisher: Publisher::start(store.pool().clone()),
            database_url: config.database_url.clone(),
            endpoint: endpoint_name(&home).to_string(),
            partitions: config.partitions.max(1),
            prefetch: config.prefetch,
            consumer: Default::default(),
            listener: Default::default(),
            arrived: Arc::new(Notify::new()),
            delays_changed: Arc::new(AtomicBool::new(false)),
            outbox: PgOutbox {
                endpoint: endpoint_name(&home).to_string(),
            },
        }))
    }

    /// The home endpoint's name in the queue tables.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Listens for publishes to the home endpoint (once per transport), waking the
    /// consumer; reconnects by itself, and the consumer's fallback poll covers a gap.
    async fn listen(&self) -> Result<(), TransportError> {
        if self
            .listener
            .lock()
            .expect("listener lock")
            .as_ref()
            .is_some_and(|h| !h.is_finished())
        {
            return Ok(());
        }
        let mut listener = PgListener::connect_with(&self.pool).await.map_err(db_err)?;
        listener.listen(CHANNEL).await.map_err(db_err)?;
        let ready = pg_notify_payload(&self.endpoint, false);
        let delayed = pg_notify_payload(&self.endpoint, true);
        let arrived = self.arrived.clone();
        let delays_changed = self.delays_changed.clone();
        let task = tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(n) if n.payload() == ready => arrived.notify_one(),
                    Ok(n) if n.payload() == delayed => {
                        delays_changed.store(true, Ordering::SeqCst);
                        arrived.notify_one();
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "queue listener lost its connection");
                        tokio::time::sleep(consumer::POLL_INTERVAL).await;
                    }
                }
            }
        });
        *self.listener.lock().expect("listener lock") = Some(task);
        Ok(())
    }

    fn control(&self, c: Control) {
        if let Some(h) = self.consumer.lock().expect("consumer lock").as_ref() {
            let _ = h.control.send(c);
        }
    }

    /// Ends the current consumer's session, returning once its locks are released.
    async fn end_consumer(&self) {
        let handle = self.consumer.lock().expect("consumer lock").take();
        if let Some(h) = handle {
            let _ = h.control.send(Control::Close);
            let _ = h.task.await;
        }
    }
}

impl Drop for PgTransport {
    /// A transport dropped without `close` stops listening (its consumer's session
    /// ends by itself when its handle goes).
    fn drop(&mut self) {
        if let Some(task) = self.listener.lock().expect("listener lock").take() {
            task.abort();
        }
    }
}

impl Transport for PgTransport {
    /// Publishes `body` to `to`'s intake under `key`, at once, returning once
    /// committed. An endpoint's queue needs no creating: a message sent before its
    /// service first starts waits in the table.
    fn send_to<'a>(
        &'a self,
        to: &'a Endpoint,
        key: &'a str,
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        self.publisher.publish(endpoint_name(to), key, body, 0)
    }

    fn publish<'a>(
        &'a self,
        key: &'a str,
        body: &'a [u8],
        delay_ms: u64,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        self.publisher.publish(&self.endpoint, key, body, delay_ms)
    }

    fn dead_letter<'a>(
        &'a self,
        body: &'a [u8],
        reason_code: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO skald.queue_dead_letters (endpoint, reason_code, reason, body)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(&self.endpoint)
            .bind(reason_code)
            .bind(reason)
            .bind(body)
            .execute(&self.pool)
            .await
            .map_err(db_err)?;
            Ok(())
        })
    }

    fn consume(&self) -> BoxFuture<'_, Result<BoxStream<'static, Delivery>, TransportError>> {
        Box::pin(async move {
            self.end_consumer().await;
            self.listen().await?;
            let (mut rx, handle) = consumer::start(ConsumerSetup {
                database_url: self.database_url.clone(),
                endpoint: self.endpoint.clone(),
                partitions: self.partitions,
                prefetch: self.prefetch,
                arrived: self.arrived.clone(),
                delays_changed: self.delays_changed.clone(),
            })
            .await?;
            *self.consumer.lock().expect("consumer lock") = Some(handle);
            Ok(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed())
        })
    }

    fn stop_consuming(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.control(Control::Stop) })
    }

    fn queue_depths(&self) -> BoxFuture<'_, Result<Vec<(String, u32)>, TransportError>> {
        Box::pin(async move {
            let ready: Vec<(i32, i64)> = sqlx::query_as(
                "SELECT (key_hash % $2)::int, count(*) FROM skald.queue_messages
                  WHERE endpoint = $1 GROUP BY 1",
            )
            .bind(&self.endpoint)
            .bind(i64::from(self.partitions))
            .fetch_all(&self.pool)
            .await
            .map_err(db_err)?;
            let (delayed, dead): (i64, i64) = sqlx::query_as(
                "SELECT (SELECT count(*) FROM skald.queue_delayed WHERE endpoint = $1),
                        (SELECT count(*) FROM skald.queue_dead_letters WHERE endpoint = $1)",
            )
            .bind(&self.endpoint)
            .fetch_one(&self.pool)
            .await
            .map_err(db_err)?;
            let count = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
            let mut depths: Vec<(String, u32)> = (0..self.partitions)
                .map(|p| {
                    let n = ready
                        .iter()
                        .find(|(q, _)| *q == i32::from(p))
                        .map_or(0, |r| r.1);
                    (format!("{}.p.{p}", self.endpoint), count(n))
                })
                .collect();
            depths.push((format!("{}.delayed", self.endpoint), count(delayed)));
            depths.push((format!("{}.dead", self.endpoint), count(dead)));
            Ok(depths)
        })
    }

    fn in_transaction(&self) -> Option<&dyn TxOutbox> {
        SETTLE_IN_TRANSACTION.then_some(&self.outbox as &dyn TxOutbox)
    }

    fn healthy(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move { sqlx::query("SELECT 1").execute(&self.pool).await.is_ok() })
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.end_consumer().await;
            if let Some(task) = self.listener.lock().expect("listener lock").take() {
                task.abort();
            }
            self.pool.close().await;
        })
    }
}
