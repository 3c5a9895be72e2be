//! Redis Streams as skald's transport (the `redis` crate).
//!
//! ## Keys (`NS` is the namespace, `P` an endpoint's prefix: `{NS}:skald` for skald's
//! intake, `{NS}:svc:<name>` for a participant service's)
//!
//! | key | type | what for |
//! |---|---|---|
//! | `P:p:<i>`, i in 0..N | stream, consumer group `skald` | the partitions: a message's key (aggregate id) hashed (FNV-1a) picks one |
//! | `P:lease:<i>` | string with an expiry | the token of the consumer that reads partition i now |
//! | `P:delayed` | sorted set, scored by due time | delayed messages waiting out their delay |
//! | `P:dead` | stream | dead letters, kept for a person |
//!
//! **Publish.** `XADD`, confirmed by its reply. A publish (a delayed one, a send to
//! another endpoint and a dead letter too) is queued at the call; one task sends the
//! queue in call order, what waits together in one pipeline (`publisher`), so a key's
//! entries keep the order of the calls however many are in flight. Redis replies
//! before the write is on disk unless the server runs with `appendonly yes` and
//! `appendfsync always`: with other settings an acknowledged message can be lost when
//! Redis restarts, and [`RedisTransport::connect`] logs a warning saying so — unless
//! every write waits for replicas (`SKALD_REDIS_WAIT_REPLICAS`: `WAIT` after each
//! pipeline of publishes and each ack, on a connection of its own; too few replicas in
//! `SKALD_REDIS_WAIT_MS` and the writes fail as not accepted, see `writer`).
//!
//! **Start-up.** A refused password, a missing one or a missing ACL permission is
//! [`TransportError::Refused`] at once, naming the server and what to change.
//!
//! **Partitions, leases, failover.** A process reads a partition only while it holds
//! the partition's lease (`SET NX PX` with a random token, renewed every third of
//! `SKALD_REDIS_LEASE_MS`). One reader per partition keeps each key's entries in
//! stream order. A process that dies stops renewing; once its lease expires another
//! process takes it and first claims every entry still pending in the group
//! (`XAUTOCLAIM` with no idle minimum: the lease, not an idle time, says the owner is
//! gone), hands those out in order, flagged redelivered, and only then reads new
//! entries (`>`). Acks are fenced: a Lua script acks (`XACK`, then `XDEL`, so
//! acknowledged entries do not pile up) only if the acking process still holds the
//! lease, so a stale owner cannot ack what the new owner now handles. An entry handed
//! out and not acked (refused in a lease blip, failed, dropped) is still pending: its
//! partition is claimed again, so it is delivered again (see `leases`). A graceful
//! `close` releases the leases so that another process takes over at once.
//!
//! **Delays.** A delayed message is added to `P:delayed`, scored by the server's clock
//! plus its delay (a Lua script reads `TIME`), and moved to its partition stream by
//! another script once due, atomically. Every consuming process runs the mover every
//! [`consumer::POLL`]: a delay is never early, and late by at most about that.
//!
//! **Dead letters.** `XADD P:dead` with the body, reason code, reason and time.

mod consumer;
pub mod durability;
pub mod keys;
mod leases;
mod publisher;
mod scripts;
mod writer;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use redis::AsyncConnectionConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::mpsc;

use self::consumer::{Reader, Shared};
use self::durability::Durability;
use self::keys::{GROUP, Keys};
use self::publisher::Publisher;
use self::writer::Writer;
use super::{Delivery, Endpoint, Transport, TransportError};
use crate::config::{Config, RedisWait};

/// How long one Redis command may take before it counts as failed (a script or an
/// `XADD` fsynced with `appendfsync always` on a busy disk can take a while).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

fn conn_err(e: redis::RedisError) -> TransportError {
    TransportError::Connection(e.to_string())
}

/// An error while connecting and creating the consumer groups: a refusal of skald's
/// credentials or permissions is [`TransportError::Refused`] (waiting does not fix
/// it), anything else a connection error. `server` names the server, without the
/// password.
fn setup_err(server: &str, e: redis::RedisError) -> TransportError {
    match refusal_fix(e.kind(), e.code()) {
        Some(fix) => TransportError::Refused(format!("Redis at {server} answered {e}; {fix}")),
        None => conn_err(e),
    }
}

/// What to change when Redis refuses skald's login or commands (`kind`, and `code`:
/// the server error's first word); `None` for errors that waiting may fix.
fn refusal_fix(kind: redis::ErrorKind, code: Option<&str>) -> Option<&'static str> {
    if kind == redis::ErrorKind::AuthenticationFailed || code == Some("WRONGPASS") {
        return Some(
            "check the user name and password in REDIS_URL \
             (redis://[user]:password@host[:port][/db]; without a user name Redis checks \
             the password of its `default` user)",
        );
    }
    match code {
        Some("NOAUTH") => Some(
            "the server requires a password: put it in REDIS_URL \
             (redis://[user]:password@host[:port][/db])",
        ),
        Some("NOPERM") => Some(
            "REDIS_URL's user lacks an ACL permission skald needs: allow it the stream, \
             sorted-set, string, scripting and CONFIG/INFO commands on the namespace's keys \
             (ACL SETUSER … ~{NS}:* +@stream +@sortedset +@string +@scripting +config|get \
             +info +wait +ping +client|id), or use another user",
        ),
        _ => None,
    }
}

/// skald's Redis transport for one home endpoint: a multiplexed connection (renewed
/// when lost) for every short command, and a connection of its own per consume
/// session for blocking reads.
pub struct RedisTransport {
    client: redis::Client,
    conn: ConnectionManager,
    /// Acks: `conn`, or with `WAIT` a connection of its own.
    writer: Writer,
    /// Publishes and dead letters, in call order, on the writer's connection.
    publisher: Publisher,
    wait: RedisWait,
    namespace: String,
    partitions: u16,
    shared: Arc<Shared>,
    keeper: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// `CLIENT ID`s of the reading connections, for [`RedisTransport::client_ids`].
    readers: std::sync::Mutex<Vec<i64>>,
    /// The reader of the current consume session.
    reader: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl RedisTransport {
    /// Connects to `REDIS_URL`, creates `home`'s consumer groups if they do not exist,
    /// and warns when the server's settings cannot keep acknowledged messages across a
    /// restart. Must be called inside a tokio runtime.
    pub async fn connect(
        config: &Config,
        home: Endpoint,
    ) -> Result<Arc<RedisTransport>, TransportError> {
        let client = redis::Client::open(config.redis_url.as_str()).map_err(conn_err)?;
        let server = client.get_connection_info().addr().to_string();
        let manager = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(3);
        let conn = ConnectionManager::new_with_config(client.clone(), manager.clone())
            .await
            .map_err(|e| setup_err(&server, e))?;
        // `WAIT` blocks its connection: the leases are renewed on another one.
        let writes = if config.redis_wait.enabled() {
            ConnectionManager::new_with_config(client.clone(), manager)
                .await
                .map_err(|e| setup_err(&server, e))?
        } else {
            conn.clone()
        };
        let keys = Keys::new(&config.namespace, &home, config.partitions);
        create_groups(&conn, &keys)
            .await
            .map_err(|e| setup_err(&server, e))?;
        let token = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4().simple());
        let writer = Writer::new(writes, config.redis_wait);
        let transport = RedisTransport {
            client,
            conn,
            publisher: Publisher::start(writer.clone(), keys.clone()),
            writer,
            wait: config.redis_wait,
            namespace: config.namespace.clone(),
            partitions: config.partitions,
            shared: Arc::new(Shared::new(
                keys,
                token,
                config.redis_lease,
                config.subscribe_stagger,
                config.prefetch,
            )),
            keeper: Default::default(),
            readers: Default::default(),
            reader: Default::default(),
        };
        match transport.durability().await {
            Durability::Kept => {}
            Durability::AtRisk(why) => tracing::warn!(
                "Redis can lose messages it acknowledged: {why} (see README, Transports)"
            ),
            Durability::Unknown(why) => tracing::warn!(
                "could not check whether Redis keeps the messages it acknowledged ({why}); \
                 it does only with appendonly yes and appendfsync always (or replicas and \
                 SKALD_REDIS_WAIT_REPLICAS), and maxmemory-policy noeviction"
            ),
        }
        Ok(Arc::new(transport))
    }

    /// What the server's persistence settings (`CONFIG GET`) and, with `WAIT`, its
    /// connected replicas (`INFO replication`) promise.
    pub async fn durability(&self) -> Durability {
        let mut conn = self.conn.clone();
        let read: redis::RedisResult<std::collections::HashMap<String, String>> =
            redis::cmd("CONFIG")
                .arg("GET")
                .arg("appendonly")
                .arg("appendfsync")
                .arg("maxmemory-policy")
                .query_async(&mut conn)
                .await;
        let replicas = if self.wait.enabled() {
            let info: redis::RedisResult<String> = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await;
            info.ok()
                .and_then(|text| durability::connected_replicas(&text))
        } else {
            None
        };
        match read {
            Ok(settings) => durability::judge(
                &durability::Settings {
                    appendonly: settings.get("appendonly").map(String::as_str),
                    appendfsync: settings.get("appendfsync").map(String::as_str),
                    maxmemory_policy: settings.get("maxmemory-policy").map(String::as_str),
                },
                self.wait.replicas,
                replicas,
            ),
            Err(e) => Durability::Unknown(format!("CONFIG GET failed: {e}")),
        }
    }

    /// The keys of `endpoint`'s queues.
    pub fn keys(&self, endpoint: &Endpoint) -> Keys {
        Keys::new(&self.namespace, endpoint, self.partitions)
    }

    /// The process died, as far as Redis can tell: stops reading and renewing leases
    /// at once, releasing nothing, so another process takes the partitions only when
    /// the leases expire, and the unacked deliveries are redelivered there (for
    /// failover tests and drills; a real crash needs no call).
    pub fn abandon(&self) {
        self.shared.consuming.store(false, Ordering::SeqCst);
        if let Some(keeper) = self.keeper.lock().expect("keeper lock").take() {
            keeper.abort();
        }
        self.shared.forget_all();
    }

    /// The `CLIENT ID`s of this transport's connections to Redis (the shared one and
    /// every reading one), so that a test can kill them with `CLIENT KILL ID`.
    pub async fn client_ids(&self) -> Vec<i64> {
        let mut ids = self.readers.lock().expect("readers lock").clone();
        let mut conn = self.conn.clone();
        if let Ok(id) = redis::cmd("CLIENT").arg("ID").query_async(&mut conn).await {
            ids.push(id);
        }
        ids
    }

    /// Waits for a reader told to stop (its blocking read ends within a poll).
    async fn stop_reader(&self, reader: Option<tokio::task::JoinHandle<()>>) {
        if let Some(reader) = reader
            && tokio::time::timeout(consumer::POLL + RESPONSE_TIMEOUT, reader)
                .await
                .is_err()
        {
            tracing::warn!("a Redis reader did not stop in time");
        }
    }

    fn start_keeper(&self) {
        let mut keeper = self.keeper.lock().expect("keeper lock");
        if keeper.as_ref().is_none_or(|k| k.is_finished()) {
            *keeper = Some(tokio::spawn(consumer::keep_leases(
                self.shared.clone(),
                self.conn.clone(),
            )));
        }
    }
}

impl Drop for RedisTransport {
    fn drop(&mut self) {
        if let Some(keeper) = self.keeper.lock().expect("keeper lock").take() {
            keeper.abort();
        }
    }
}

/// Creates the partition streams of `keys` and their consumer group (the publisher
/// does the same for another endpoint's queues, on its first send there).
async fn create_groups(conn: &ConnectionManager, keys: &Keys) -> Result<(), redis::RedisError> {
    let mut conn = conn.clone();
    for i in 0..keys.partitions() {
        let created: redis::RedisResult<()> = create_group(keys, i).query_async(&mut conn).await;
        match created {
            Err(e) if e.code() != Some("BUSYGROUP") => return Err(e),
            _ => {}
        }
    }
    Ok(())
}

/// The `XGROUP CREATE … MKSTREAM` of partition `i`'s stream among `keys` and its
/// consumer group, reading from the start, so that entries added before the first
/// consumer are kept for it. Redis answers `BUSYGROUP` when the group exists.
fn create_group(keys: &Keys, i: u16) -> redis::Cmd {
    let mut create = redis::cmd("XGROUP");
    create
        .arg("CREATE")
        .arg(keys.stream(i))
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM");
    create
}

/// The `XADD` of `body` under `key` to its partition stream among `keys`.
fn add(keys: &Keys, key: &str, body: &[u8]) -> redis::Cmd {
    let mut add = redis::cmd("XADD");
    add.arg(keys.stream(keys.partition_of(key)))
        .arg("*")
        .arg("k")
        .arg(key)
        .arg("b")
        .arg(body);
    add
}

/// Deletes every key of `namespace` (all endpoints) from the Redis at `url`; returns
/// how many (for tests and `skald bench`'s scratch namespace).
pub async fn delete_namespace(url: &str, namespace: &str) -> Result<u64, TransportError> {
    let client = redis::Client::open(url).map_err(conn_err)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(conn_err)?;
    let pattern = keys::namespace_pattern(namespace);
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(conn_err)?;
        if !found.is_empty() {
            deleted += redis::cmd("DEL")
                .arg(&found)
                .query_async::<u64>(&mut conn)
                .await
                .map_err(conn_err)?;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

impl Transport for RedisTransport {
    /// Publishes `body` to `to`'s intake under `key`, at once, returning once Redis
    /// accepted it; creates `to`'s queues if they do not exist yet (so a command sent
    /// before its service first starts is kept), in call order with the other writes.
    fn send_to<'a>(
        &'a self,
        to: &'a Endpoint,
        key: &'a str,
        body: &'a [u8],
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let keys = self.keys(to);
        let cmd = add(&keys, key, body);
        self.publisher.write(cmd, Some(keys))
    }

    fn publish<'a>(
        &'a self,
        key: &'a str,
        body: &'a [u8],
        delay_ms: u64,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let keys = &self.shared.keys;
        let cmd = if delay_ms == 0 {
            add(keys, key, body)
        } else {
            scripts::schedule(&keys.delayed(), delay_ms, keys.partition_of(key), key, body)
        };
        self.publisher.write(cmd, None)
    }

    fn dead_letter<'a>(
        &'a self,
        body: &'a [u8],
        reason_code: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), TransportError>> {
        let mut letter = redis::cmd("XADD");
        letter
            .arg(self.shared.keys.dead())
            .arg("*")
            .arg("b")
            .arg(body)
            .arg("reason_code")
            .arg(reason_code)
            .arg("reason")
            .arg(reason)
            .arg("at")
            .arg(chrono::Utc::now().to_rfc3339());
        self.publisher.write(letter, None)
    }

    fn consume(&self) -> BoxFuture<'_, Result<BoxStream<'static, Delivery>, TransportError>> {
        Box::pin(async move {
            // Blocking reads wait up to a poll; a reply later than that plus the
            // usual margin means the connection is gone.
            let config = AsyncConnectionConfig::new()
                .set_response_timeout(Some(consumer::POLL + RESPONSE_TIMEOUT));
            let mut reading = self
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(conn_err)?;
            if let Ok(id) = redis::cmd("CLIENT")
                .arg("ID")
                .query_async::<i64>(&mut reading)
                .await
            {
                self.readers.lock().expect("readers lock").push(id);
            }
            let session = self.shared.session.fetch_add(1, Ordering::SeqCst) + 1;
            // Entries the previous reader takes in its last read are pending to this
            // process: reclaimed below only once it has stopped.
            let mut reader = self.reader.lock().await;
            self.stop_reader(reader.take()).await;
            self.shared.reclaim_all();
            self.shared.consuming.store(true, Ordering::SeqCst);
            self.start_keeper();
            let (tx, mut rx) = mpsc::unbounded_channel();
            *reader = Some(tokio::spawn(
                Reader {
                    shared: self.shared.clone(),
                    session,
                    reading,
                    conn: self.conn.clone(),
                    writer: self.writer.clone(),
                    tx,
                }
                .run(),
            ));
            let deliveries = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            Ok(Box::pin(deliveries) as BoxStream<'static, Delivery>)
        })
    }

    fn stop_consuming(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // The leases stay held (and renewed) until `close`: deliveries already
            // received can still be acked.
            self.shared.consuming.store(false, Ordering::SeqCst);
        })
    }

    fn queue_depths(&self) -> BoxFuture<'_, Result<Vec<(String, u32)>, TransportError>> {
        Box::pin(async move {
            let keys = &self.shared.keys;
            let mut names: Vec<String> = (0..keys.partitions()).map(|i| keys.stream(i)).collect();
            let mut pipe = redis::pipe();
            for stream in &names {
                pipe.cmd("XLEN").arg(stream);
            }
            pipe.cmd("ZCARD").arg(keys.delayed());
            pipe.cmd("XLEN").arg(keys.dead());
            names.push(keys.delayed());
            names.push(keys.dead());
            let mut conn = self.conn.clone();
            let counts: Vec<u32> = pipe.query_async(&mut conn).await.map_err(conn_err)?;
            Ok(names.into_iter().zip(counts).collect())
        })
    }

    fn healthy(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<String>(&mut conn);
            matches!(
                tokio::time::timeout(Duration::from_secs(2), ping).await,
                Ok(Ok(_))
            )
        })
    }

    /// Closes the transport: the writes called before are sent and answered first, and
    /// a publish, send or dead letter called after fails at once; then the reader
    /// stops and the leases are released.
    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            // What was published before is written first; later publishes fail.
            self.publisher.close().await;
            self.shared.consuming.store(false, Ordering::SeqCst);
            // Whatever its last read takes is pending before the leases go, so the
            // next owner claims it.
            let reader = self.reader.lock().await.take();
            self.stop_reader(reader).await;
            if let Some(keeper) = self.keeper.lock().expect("keeper lock").take() {
                keeper.abort();
            }
            // Released rather than left to expire: another process takes over at once.
            let mut conn = self.conn.clone();
            for i in self.shared.held_partitions() {
                let released: redis::RedisResult<i64> = scripts::RELEASE
                    .key(self.shared.keys.lease(i))
                    .arg(&self.shared.token)
                    .invoke_async(&mut conn)
                    .await;
                if let Err(e) = released {
                    tracing::debug!(error = %e, partition = i, "releasing a lease failed; it expires");
                }
            }
            self.shared.forget_all();
        })
    }
}
