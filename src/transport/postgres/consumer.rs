//! The consuming side of the PostgreSQL transport: one task per `consume`, on one
//! connection of its own (the *session*).
//!
//! The session holds a shared advisory lock per endpoint (so consumers can count each
//! other) and an exclusive one per partition it owns. Everything that must be fenced
//! runs on that session: fetching a partition's messages and deleting acked ones. When
//! the session ends — `close`, a killed connection, `kill -9` of the process — the
//! server releases its locks at once, the task ends (and with it the delivery stream),
//! and any later ack fails: another consumer takes the partitions and delivers the
//! unacked messages again, oldest first, before anything newer of their keys.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use sqlx::{Connection, PgConnection};
use tokio::sync::{Notify, mpsc, oneshot};

use super::db_err;
use super::partition::{self, MEMBER_LOCK};
use crate::transport::{Acknowledge, Delivery, TransportError, TxSettle};

/// How often a consumer looks for partitions to take or give up, and for due delayed
/// messages, when nothing wakes it earlier (the fallback poll).
pub const POLL_INTERVAL: Duration = Duration::from_millis(1_000);

/// The `application_name` of a consumer's session (for `pg_stat_activity`).
pub const SESSION_NAME: &str = "skald-queue-consumer";

/// What a consumer task is told from outside.
pub(super) enum Control {
    /// Stop fetching; keep serving acks and holding the partitions.
    Stop,
    /// End the session (unacked deliveries go back).
    Close,
}

/// One ack waiting to be carried out by the session.
pub(super) struct AckRequest {
    id: i64,
    /// Settled in a step's committed transaction already: only forget it.
    settled: bool,
    done: oneshot::Sender<Result<(), TransportError>>,
}

/// The handle `PgTransport` keeps on its running consumer.
pub(super) struct ConsumerHandle {
    pub control: mpsc::UnboundedSender<Control>,
    /// Ends when the session has ended (its locks released).
    pub task: tokio::task::JoinHandle<()>,
}

/// What a consumer task needs to start.
pub(super) struct ConsumerSetup {
    pub database_url: String,
    pub endpoint: String,
    pub partitions: u16,
    pub prefetch: u16,
    /// Woken by `NOTIFY` (a message was published to this endpoint).
    pub arrived: Arc<Notify>,
    /// Set by `NOTIFY` of a delayed publish: look at due times again.
    pub delays_changed: Arc<AtomicBool>,
}

struct PgAcker {
    id: i64,
    acks: mpsc::UnboundedSender<AckRequest>,
}

impl PgAcker {
    fn request(self, settled: bool) -> BoxFuture<'static, Result<(), TransportError>> {
        Box::pin(async move {
            let (done, result) = oneshot::channel();
            let gone = || TransportError::Connection("the consumer's session has ended".into());
            self.acks
                .send(AckRequest {
                    id: self.id,
                    settled,
                    done,
                })
                .map_err(|_| gone())?;
            result.await.map_err(|_| gone())?
        })
    }
}

impl Acknowledge for PgAcker {
    fn ack(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        self.request(false)
    }

    fn settled(self: Box<Self>) -> BoxFuture<'static, Result<(), TransportError>> {
        self.request(true)
    }
}

/// Opens the session, joins the endpoint's consumers and starts the task; returns the
/// delivery stream's receiver and the handle.
pub(super) async fn start(
    setup: ConsumerSetup,
) -> Result<(mpsc::Receiver<Delivery>, ConsumerHandle), TransportError> {
    let options: sqlx::postgres::PgConnectOptions = setup
        .database_url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .map_err(db_err)?
        .application_name(SESSION_NAME);
    let mut conn = PgConnection::connect_with(&options).await.map_err(db_err)?;
    // What the session writes needs no flush to disk before it goes on: a lost ack
    // (the server crashed right after it) redelivers a message the inbox recognises,
    // a lost mark only drops a hint, a lost move of due messages is done again. The
    // publishes, which must be durable, go through the pool.
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut conn)
        .await
        .map_err(db_err)?;
    let class = partition::lock_class(&setup.endpoint);
    sqlx::query("SELECT pg_advisory_lock_shared($1, $2)")
        .bind(class)
        .bind(MEMBER_LOCK)
        .execute(&mut conn)
        .await
        .map_err(db_err)?;
    let (tx, rx) = mpsc::channel(setup.prefetch as usize);
    let (control, control_rx) = mpsc::unbounded_channel();
    let (acks_tx, acks_rx) = mpsc::unbounded_channel();
    let session = Session {
        conn,
        class,
        owned: BTreeMap::new(),
        in_flight: HashMap::new(),
        draining: Default::default(),
        tx: Some(tx),
        acks_tx,
        next_due: None,
        setup,
    };
    let task = tokio::spawn(session.run(control_rx, acks_rx));
    Ok((rx, ConsumerHandle { control, task }))
}

struct Session {
    conn: PgConnection,
    class: i32,
    /// Partitions owned, with the highest id handed out before this session took it.
    owned: BTreeMap<u16, i64>,
    /// Deliveries handed out and not acked yet, with their partition.
    in_flight: HashMap<i64, u16>,
    /// Owned partitions being handed over: nothing more is fetched from them, and each
    /// is unlocked once nothing of it is in flight.
    draining: std::collections::BTreeSet<u16>,
    /// `None` once told to stop: no more fetching.
    tx: Option<mpsc::Sender<Delivery>>,
    acks_tx: mpsc::UnboundedSender<AckRequest>,
    /// When the earliest delayed message is due, if known.
    next_due: Option<Instant>,
    setup: ConsumerSetup,
}

impl Session {
    async fn run(
        mut self,
        mut control: mpsc::UnboundedReceiver<Control>,
        mut acks: mpsc::UnboundedReceiver<AckRequest>,
    ) {
        let mut last_tick: Option<Instant> = None;
        let mut pending: Vec<AckRequest> = Vec::new();
        loop {
            while let Ok(req) = acks.try_recv() {
                pending.push(req);
            }
            if !pending.is_empty() && self.ack(std::mem::take(&mut pending)).await.is_err() {
                break;
            }
            let mut full_batch = false;
            if self.tx.is_some() {
                let tick = last_tick.is_none_or(|t| t.elapsed() >= POLL_INTERVAL);
                let due = self.next_due.is_some_and(|d| d <= Instant::now())
                    || self.setup.delays_changed.swap(false, Ordering::SeqCst);
                let step = async {
                    if tick {
                        self.rebalance().await?;
                    }
                    if tick || due {
                        self.move_due().await?;
                    }
                    // Between ticks, fetch only once a quarter of the prefetch is free:
                    // fewer, larger batches (each scans the head of the queue).
                    let min_room = if tick {
                        1
                    } else {
                        (self.setup.prefetch as usize / 4).max(1)
                    };
                    self.fetch(min_room).await
                };
                match step.await {
                    Ok(full) => full_batch = full,
                    Err(e) => {
                        tracing::warn!(error = %e, "queue consumer session failed");
                        break;
                    }
                }
                if tick {
                    last_tick = Some(Instant::now());
                }
            }
            if full_batch {
                continue; // more may be waiting
            }
            let wait = self
                .next_due
                .map_or(POLL_INTERVAL, |d| {
                    d.saturating_duration_since(Instant::now())
                })
                .min(POLL_INTERVAL);
            tokio::select! {
                req = acks.recv() => match req {
                    Some(req) => pending.push(req),
                    None => break,
                },
                c = control.recv() => match c {
                    Some(Control::Stop) => self.tx = None,
                    Some(Control::Close) | None => break,
                },
                _ = self.setup.arrived.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // Dropping the session ends it: the server releases the locks; the stream ends.
        let _ = self.conn.close().await;
    }

    /// Deletes the acked messages in one statement, on the session (so an ack after
    /// the session ended fails instead of deleting what another consumer now owns).
    async fn ack(&mut self, batch: Vec<AckRequest>) -> Result<(), ()> {
        // A delivery settled in its step's transaction is deleted already.
        let ids: Vec<i64> = batch.iter().filter(|r| !r.settled).map(|r| r.id).collect();
        if ids.is_empty() {
            for req in batch {
                self.in_flight.remove(&req.id);
                let _ = req.done.send(Ok(()));
            }
            return Ok(());
        }
        let result = sqlx::query("DELETE FROM skald.queue_messages WHERE id = ANY($1)")
            .bind(&ids)
            .execute(&mut self.conn)
            .await;
        match result {
            Ok(_) => {
                for req in batch {
                    self.in_flight.remove(&req.id);
                    let _ = req.done.send(Ok(()));
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "queue consumer session failed on ack");
                for req in batch {
                    let _ = req.done.send(Err(db_err(&e)));
                }
                Err(())
            }
        }
    }

    /// Takes or gives up partitions towards this consumer's fair share.
    async fn rebalance(&mut self) -> Result<(), sqlx::Error> {
        let members: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks
              WHERE locktype = 'advisory' AND granted
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
                AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 2",
        )
        .bind(i64::from(self.class))
        .bind(i64::from(MEMBER_LOCK))
        .fetch_one(&mut self.conn)
        .await?;
        let owned: Vec<u16> = self.owned.keys().copied().collect();
        let busy: std::collections::HashSet<u16> = self.in_flight.values().copied().collect();
        let plan = partition::rebalance(
            self.setup.partitions,
            members as usize,
            &owned,
            |p| busy.contains(&p),
            fastrand::u16(..self.setup.partitions.max(1)),
        );
        for p in plan.try_acquire {
            if self.owned.len() >= plan.want {
                break;
            }
            let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(self.class)
                .bind(i32::from(p))
                .fetch_one(&mut self.conn)
                .await?;
            if locked {
                let mark: Option<i64> = sqlx::query_scalar(
                    "SELECT delivered_upto FROM skald.queue_marks
                      WHERE endpoint = $1 AND partition = $2",
                )
                .bind(&self.setup.endpoint)
                .bind(i32::from(p))
                .fetch_optional(&mut self.conn)
                .await?;
                tracing::debug!(partition = p, "queue partition taken");
                self.owned.insert(p, mark.unwrap_or(0));
            }
        }
        self.draining = plan.release.into_iter().collect();
        self.unlock_drained().await
    }

    /// Unlocks the partitions being handed over that have nothing in flight.
    async fn unlock_drained(&mut self) -> Result<(), sqlx::Error> {
        let drained: Vec<u16> = self
            .draining
            .iter()
            .copied()
            .filter(|p| !self.in_flight.values().any(|q| q == p))
            .collect();
        for p in drained {
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(self.class)
                .bind(i32::from(p))
                .execute(&mut self.conn)
                .await?;
            tracing::debug!(partition = p, "queue partition handed over");
            self.owned.remove(&p);
            self.draining.remove(&p);
        }
        Ok(())
    }

    /// Moves the endpoint's due delayed messages to the queue (behind what is there),
    /// and learns when the next one is due.
    async fn move_due(&mut self) -> Result<(), sqlx::Error> {
        // The insert trigger wakes the owners of what was moved.
        sqlx::query(
            "WITH due AS (
                DELETE FROM skald.queue_delayed WHERE id IN (
                    SELECT id FROM skald.queue_delayed
                     WHERE endpoint = $1 AND due_at <= clock_timestamp()
                     ORDER BY due_at, id LIMIT 1000 FOR UPDATE SKIP LOCKED)
                RETURNING id, due_at, endpoint, key, body)
             INSERT INTO skald.queue_messages (endpoint, key, body)
             SELECT endpoint, key, body FROM due ORDER BY due_at, id",
        )
        .bind(&self.setup.endpoint)
        .execute(&mut self.conn)
        .await?;
        let next_ms: Option<f64> = sqlx::query_scalar(
            "SELECT (extract(epoch FROM min(due_at) - clock_timestamp()) * 1000)::float8
               FROM skald.queue_delayed WHERE endpoint = $1",
        )
        .bind(&self.setup.endpoint)
        .fetch_one(&mut self.conn)
        .await?;
        self.next_due =
            next_ms.map(|ms| Instant::now() + Duration::from_millis(ms.max(0.0).ceil() as u64));
        Ok(())
    }

    /// Hands out the oldest messages of the owned partitions that are not in flight,
    /// up to the prefetch, when at least `min_room` are free; whether the batch was full
    /// (more may be waiting).
    async fn fetch(&mut self, min_room: usize) -> Result<bool, sqlx::Error> {
        let room = (self.setup.prefetch as usize).saturating_sub(self.in_flight.len());
        if room == 0 || room < min_room || self.owned.is_empty() {
            return Ok(false);
        }
        let owned: Vec<i32> = self
            .owned
            .keys()
            .filter(|p| !self.draining.contains(p))
            .map(|&p| i32::from(p))
            .collect();
        if owned.is_empty() {
            return Ok(false);
        }
        let in_flight: Vec<i64> = self.in_flight.keys().copied().collect();
        let rows: Vec<(i64, i32, Vec<u8>)> = sqlx::query_as(
            "WITH picked AS MATERIALIZED (
                SELECT id, (key_hash % $2)::int AS part, body FROM skald.queue_messages
                 WHERE endpoint = $1 AND (key_hash % $2)::int = ANY($3) AND id <> ALL($4)
                 ORDER BY id LIMIT $5),
             marked AS (
                INSERT INTO skald.queue_marks AS m (endpoint, partition, delivered_upto)
                SELECT $1, part, max(id) FROM picked GROUP BY part
                ON CONFLICT (endpoint, partition) DO UPDATE
                   SET delivered_upto = greatest(m.delivered_upto, excluded.delivered_upto))
             SELECT id, part, body FROM picked ORDER BY id",
        )
        .bind(&self.setup.endpoint)
        .bind(i64::from(self.setup.partitions.max(1)))
        .bind(&owned)
        .bind(&in_flight)
        .bind(room as i64)
        .fetch_all(&mut self.conn)
        .await?;
        let full = rows.len() == room;
        let Some(tx) = &self.tx else {
            return Ok(false);
        };
        for (id, part, body) in rows {
            let part = part as u16;
            let redelivered = self.owned.get(&part).is_some_and(|&mark| id <= mark);
            self.in_flight.insert(id, part);
            let acker = PgAcker {
                id,
                acks: self.acks_tx.clone(),
            };
            // Never blocks: the channel holds the prefetch, and no more is in flight.
            if tx
                .send(Delivery::new(body, redelivered, Box::new(acker)).settleable(TxSettle { id }))
                .await
                .is_err()
            {
                // Nobody reads any more: stop handing out (acks are still served).
                self.in_flight.remove(&id);
                self.tx = None;
                return Ok(false);
            }
        }
        Ok(full)
    }
}
