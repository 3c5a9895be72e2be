//! Shared setup: every test gets its own PostgreSQL database and its own RabbitMQ
//! namespace (exchanges and queues), so tests run in parallel and rerun cleanly.
//!
//! The transport a test runs on is `SKALD_TRANSPORT` of the test run, or the one a
//! scenario names ([`TestEnv::on`], [`on_every_transport`]). Unset, it is `rabbitmq`
//! (not skald's default, `postgres`): the key scenarios run on both anyway, and the
//! rest of the suite keeps covering the broker; `SKALD_TRANSPORT=postgres cargo test
//! --test it` runs all of it on PostgreSQL.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;
use skald::app::{App, AppError};
use skald::config::{Config, TransportKind};
use skald::engine::{Engine, Faults};
use skald::envelope::{Envelope, Outgoing};
use skald::handlers::Handlers;
use skald::participant::ParticipantError;
use skald::participant::faults::ParticipantFaults;
use skald::participant::sample::Sample;
use skald::transport::rabbitmq::Topology;
use skald::transport::{Endpoint, Transport};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, Connection as _, PgConnection, PgPool};
use uuid::Uuid;

use crate::redis_server::RedisServer;

pub const SERVER: &str = "postgres://postgres@127.0.0.1:5432";
pub const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The sample sagas shipped in `sagas/`.
pub fn sample_sagas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("sagas")
}

/// The legacy flows shipped in `sagas/` (`<flow>.legacy.sql` beside `<flow>.yaml` and
/// `<flow>.observe.sql`), each with a start payload its legacy transaction commits.
pub const LEGACY_FLOWS: [(&str, &str); 3] = [
    (
        "order_checkout",
        r#"{"order_id":"o-1","sku":"SKU-1","qty":2,"account":"alice","amount":19.9}"#,
    ),
    (
        "transfer_funds",
        r#"{"transfer_id":"t-1","from_account":"north-001","to_account":"south-001","amount":250.5}"#,
    ),
    (
        "trip_booking",
        r#"{"trip_id":"trip-1","hotel":"H-OSLO","nights":3,"flight":"SK-4411","city":"oslo"}"#,
    ),
];

/// A start payload of a shipped legacy flow.
pub fn flow_data(flow: &str) -> &'static str {
    LEGACY_FLOWS
        .iter()
        .find(|(name, _)| *name == flow)
        .map(|(_, data)| *data)
        .expect("a shipped flow")
}

/// A directory holding only the sample `order_services` saga, edited by `edits`
/// (each `(from, to)` must occur in the sample: a test that no longer edits what it
/// means to fails here).
pub fn order_services_with(edits: &[(&str, String)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("skald_it_cmd_{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut saga = std::fs::read_to_string(sample_sagas().join("order_services.yaml")).unwrap();
    for (from, to) in edits {
        assert!(saga.contains(from), "the sample holds {from:?}");
        saga = saga.replace(from, to);
    }
    std::fs::write(dir.join("order_services.yaml"), saga).unwrap();
    dir
}

/// Sagas written for the tests, in `tests/fixtures/sagas/`.
pub fn test_sagas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sagas")
}

/// `skald explore <args>` from the crate's root, on scratch databases of the local
/// server, with warnings only in its log.
/// `skald bench` of the binary `bin`, from the checkout, on the test server's
/// PostgreSQL, logging warnings only; the caller adds arguments and settings.
pub fn bench_with(bin: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(bin);
    command
        .arg("bench")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", format!("{SERVER}/postgres"))
        .env("SKALD_LOG", "warn");
    command
}

/// `skald bench` of this build ([`bench_with`]).
pub fn skald_bench() -> Command {
    bench_with(env!("CARGO_BIN_EXE_skald"))
}

/// A run that takes longer has hung (a full exploration takes seconds): the test fails
/// instead of waiting forever.
pub fn explore(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_skald"))
        .arg("explore")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DATABASE_URL", format!("{SERVER}/postgres"))
        .env("SKALD_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run skald explore");
    // Read both pipes while waiting, so a long report never blocks the child.
    let drain = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut bytes);
            }
            bytes
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let status = wait_child(&mut child, Duration::from_secs(300));
    std::process::Output {
        status,
        stdout: stdout.join().expect("stdout"),
        stderr: stderr.join().expect("stderr"),
    }
}

/// One test's private database and broker namespace.
pub struct TestEnv {
    pub config: Config,
    pub name: String,
    pub pool: PgPool,
    /// Participant service endpoints the test used ([`TestEnv::service`]): their
    /// queues are removed with the environment's.
    services: std::sync::Mutex<Vec<String>>,
    /// Databases of participant services ([`TestEnv::service_database`]): dropped with
    /// the environment's.
    databases: std::sync::Mutex<Vec<String>>,
    /// The private Redis of a test on `SKALD_TRANSPORT=redis` (dropped with the test).
    _redis: Option<RedisServer>,
    /// [`TestEnv::cleanup`] ran; otherwise dropping the value cleans up.
    cleaned: bool,
}

impl TestEnv {
    /// A fresh database (created by skald itself on first build) and namespace, with
    /// sagas from `sagas_dir`, on the transport `SKALD_TRANSPORT` of the test run names
    /// (default `rabbitmq`).
    pub async fn new(sagas_dir: PathBuf) -> TestEnv {
        let transport = match std::env::var("SKALD_TRANSPORT") {
            Ok(name) => TransportKind::parse(&name)
                .unwrap_or_else(|| panic!("SKALD_TRANSPORT={name:?} is not a transport")),
            Err(_) => TransportKind::RabbitMq,
        };
        Self::on(transport, sagas_dir).await
    }

    /// [`TestEnv::new`] with skald on `transport`; on Redis, a private server that
    /// keeps what it acknowledged (see [`RedisServer`]).
    pub async fn on(transport: TransportKind, sagas_dir: PathBuf) -> TestEnv {
        let redis = (transport == TransportKind::Redis).then(RedisServer::start);
        let name = format!("skald_it_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let config = Config {
            database_url: format!("{SERVER}/{name}"),
            transport,
            amqp_url: AMQP.to_string(),
            redis_url: redis.as_ref().map_or_else(
                || skald::config::DEFAULT_REDIS_URL.to_string(),
                RedisServer::url,
            ),
            redis_lease: Duration::from_secs(2),
            redis_wait: Default::default(),
            sagas_dir,
            namespace: name.clone(),
            partitions: 4,
            subscribe_stagger: Duration::ZERO,
            startup_timeout: Duration::from_secs(10),
            prefetch: 64,
            db_pool: 5,
            actor_idle: Duration::from_millis(500),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            api_token: None,
            shutdown_timeout: Duration::from_secs(10),
            stuck_after: Duration::from_secs(60),
            orphaned: skald::config::Orphaned::Refuse,
            service_databases: Vec::new(),
            // Batching on, as by default: every scenario runs with it.
            batching: Default::default(),
            queue_type: skald::config::QueueType::Classic,
            delivery_limit: 20,
        };
        let store = skald::store::Store::connect(&config.database_url, 1)
            .await
            .expect("create the test database");
        store.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(3)
            .connect(&config.database_url)
            .await
            .expect("connect to the test database");
        TestEnv {
            config,
            name,
            pool,
            services: Default::default(),
            databases: Default::default(),
            _redis: redis,
            cleaned: false,
        }
    }

    /// Builds skald (migrations, setup SQL, topology) and consumes in the background.
    pub async fn start_app(&self) -> RunningApp {
        self.start_app_with(Handlers::default()).await
    }

    /// [`TestEnv::start_app`] with Rust step handlers registered.
    pub async fn start_app_with(&self, handlers: Handlers) -> RunningApp {
        let app = App::build(self.config.clone(), handlers, Faults::none())
            .await
            .expect("skald builds");
        let engine = app.engine().clone();
        let api = app.api_state();
        let http_addr = app.http_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = actix::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        RunningApp {
            stop,
            handle,
            engine,
            api,
            http_addr,
        }
    }

    /// The environment a `skald` child process needs to use this test's services.
    pub fn process_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("DATABASE_URL", self.config.database_url.clone()),
            ("AMQP_URL", self.config.amqp_url.clone()),
            ("SKALD_TRANSPORT", self.config.transport.as_str().into()),
            ("REDIS_URL", self.config.redis_url.clone()),
            (
                "SKALD_REDIS_LEASE_MS",
                self.config.redis_lease.as_millis().to_string(),
            ),
            ("SKALD_NAMESPACE", self.config.namespace.clone()),
            (
                "SKALD_SAGAS_DIR",
                self.config.sagas_dir.display().to_string(),
            ),
            ("SKALD_DB_POOL", "5".into()),
            ("SKALD_HTTP_ADDR", "127.0.0.1:0".into()),
            ("SKALD_PARTITIONS", self.config.partitions.to_string()),
            ("SKALD_LOG", "info".into()),
            ("SKALD_QUEUE_TYPE", self.config.queue_type.as_str().into()),
            (
                "SKALD_DELIVERY_LIMIT",
                self.config.delivery_limit.to_string(),
            ),
        ]
    }

    /// `skald <args>` against this test's services.
    pub fn skald(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skald"));
        cmd.args(args).envs(self.process_env());
        cmd
    }

    /// `skald <args>` run to its end, which must succeed (else the test fails with its
    /// stderr); its stdout.
    pub fn skald_ok(&self, args: &[&str]) -> String {
        let out = self.skald(args).output().expect("run skald");
        assert!(
            out.status.success(),
            "skald {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// Starts `skald run` as a child process (extra env on top of this test's).
    pub fn spawn_process(&self, extra_env: &[(&str, &str)]) -> Child {
        self.skald(&["run"])
            .envs(extra_env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn skald run")
    }

    /// A transport (this test's) for publishing test messages to skald's intake.
    pub async fn transport(&self) -> Arc<dyn Transport> {
        skald::transport::connect(&self.config, Endpoint::Orchestrator)
            .await
            .expect("connect to the transport")
    }

    /// Publishes start messages (confirmed, in order) and returns their message ids.
    pub async fn publish_starts(&self, starts: Vec<Envelope>) -> Vec<Uuid> {
        let transport = self.transport().await;
        let ids = starts.iter().map(|e| e.message_id).collect();
        let outgoing: Vec<Outgoing> = starts
            .into_iter()
            .map(|envelope| Outgoing::to_intake(envelope, 0))
            .collect();
        for window in outgoing.chunks(500) {
            let mut confirms: FuturesUnordered<_> =
                window.iter().map(|m| m.send(transport.as_ref())).collect();
            while let Some(r) = confirms.next().await {
                r.expect("publish confirmed");
            }
        }
        transport.close().await;
        ids
    }

    /// Publishes raw bodies (confirmed, in order) to the intake, as a foreign
    /// publisher would.
    pub async fn publish_raw(&self, bodies: &[Vec<u8>]) {
        let transport = self.transport().await; // declares the topology
        if self.config.transport != TransportKind::RabbitMq {
            for body in bodies {
                transport.publish("intake", body, 0).await.expect("publish");
            }
            transport.close().await;
            return;
        }
        transport.close().await;
        self.publish_raw_to(&self.config.namespace, "intake", bodies)
            .await;
    }

    /// Publishes raw bodies (persistent, confirmed, in order) to `exchange` under
    /// `routing_key` with plain AMQP, as a foreign publisher would.
    pub async fn publish_raw_to(&self, exchange: &str, routing_key: &str, bodies: &[Vec<u8>]) {
        let conn = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        for body in bodies {
            let confirm = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(confirm.is_ack(), "raw publish confirmed");
        }
        let _ = conn.close(200, "".into()).await;
    }

    /// Waits until `count` instances are terminal; panics after `timeout`.
    pub async fn wait_for_terminal(&self, count: i64, timeout: Duration) {
        let started = Instant::now();
        loop {
            let done: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM skald.instances \
                 WHERE status IN ('completed', 'compensated', 'failed')",
            )
            .fetch_one(&self.pool)
            .await
            .unwrap_or(0);
            if done >= count {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "only {done} of {count} instances terminal after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The applied attempts of `instance`, oldest first, as rows of `columns` of
    /// `skald.inbox` (one row per attempt: its step, outcome, error, what it sent...).
    pub async fn attempts<T>(&self, instance: Uuid, columns: &str) -> Vec<T>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {columns} FROM skald.inbox \
             WHERE instance_id = $1 AND disposition = 'applied' ORDER BY finished_at"
        )))
        .bind(instance)
        .fetch_all(&self.pool)
        .await
        .expect("read attempts")
    }

    /// Waits (up to a minute) until exactly `n` instances have a failed attempt.
    pub async fn wait_failing(&self, n: i64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let failing: i64 = sqlx::query_scalar(
                "SELECT count(DISTINCT instance_id) FROM skald.inbox WHERE outcome = 'failed'",
            )
            .fetch_one(&self.pool)
            .await
            .expect("count failing instances");
            if failing == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{failing} instances failing, not {n}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// How many instances are in `status`.
    pub async fn count_status(&self, status: &str) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM skald.instances WHERE status = $1")
            .bind(status)
            .fetch_one(&self.pool)
            .await
            .expect("count instances")
    }

    /// For the `ordered` test saga: exactly `expected` effects, one per step, and per
    /// aggregate each step's effects applied in publish (sequence) order.
    pub async fn assert_ordered_effects(&self, expected: u64) {
        let effects: Vec<(String, i64, String)> =
            sqlx::query_as("SELECT aggregate_id, seq, step FROM it.effects ORDER BY id")
                .fetch_all(&self.pool)
                .await
                .expect("read effects");
        assert_eq!(
            effects.len() as u64,
            expected,
            "exactly one effect per step"
        );
        let mut last: std::collections::HashMap<(String, String), i64> = Default::default();
        for (aggregate, seq, step) in &effects {
            if let Some(prev) = last.insert((aggregate.clone(), step.clone()), *seq) {
                assert!(
                    *seq > prev,
                    "aggregate {aggregate} step {step}: seq {seq} applied after {prev}"
                );
            }
        }
    }

    /// Status of every instance, by instance id.
    pub async fn statuses(&self) -> Vec<(Uuid, String)> {
        sqlx::query_as("SELECT id, status FROM skald.instances ORDER BY created_at")
            .fetch_all(&self.pool)
            .await
            .expect("read statuses")
    }

    /// Messages ready in one RabbitMQ queue of this test (a participant service's
    /// dead-letter queue, say).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let conn = Connection::connect(AMQP, ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = conn.close(200, "".into()).await;
        q.message_count()
    }

    /// Messages ready in all partition queues together (as the transport reports them
    /// to the dashboard).
    pub async fn intake_depth(&self) -> u32 {
        // RabbitMQ and PostgreSQL name partitions `NS.p.<i>`, Redis `{NS}:skald:p:<i>`.
        self.depths(|queue| queue.contains(".p.") || queue.contains(":p:"))
            .await
    }

    /// Dead letters in the transport's dead-letter store.
    pub async fn dead_letter_depth(&self) -> u32 {
        self.depths(|queue| queue.ends_with(".dead") || queue.ends_with(":dead"))
            .await
    }

    async fn depths(&self, counted: impl Fn(&str) -> bool) -> u32 {
        let transport = self.transport().await;
        let depths = transport.queue_depths().await.expect("queue depths");
        transport.close().await;
        depths
            .iter()
            .filter(|(queue, _)| counted(queue))
            .map(|(_, n)| n)
            .sum()
    }

    /// skald's transport connections of this test open now: RabbitMQ connection pids
    /// (named after the namespace), or PostgreSQL consumer sessions.
    pub async fn transport_connections(&self) -> Vec<String> {
        match self.config.transport {
            TransportKind::RabbitMq => {
                let name = format!("skald:{}", self.config.namespace);
                tokio::task::spawn_blocking(move || {
                    let out = Command::new("rabbitmqctl")
                        .args([
                            "list_connections",
                            "-q",
                            "--no-table-headers",
                            "pid",
                            "client_properties",
                        ])
                        .output()
                        .expect("rabbitmqctl");
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| l.contains(&name))
                        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                        .collect()
                })
                .await
                .expect("rabbitmqctl thread")
            }
            TransportKind::Redis => panic!(
                "kill a Redis consumer through the conformance harness (CLIENT KILL and an \
                 abandoned lease), not by listing connections"
            ),
            TransportKind::Postgres => sqlx::query_scalar(
                "SELECT pid::text FROM pg_stat_activity \
                 WHERE datname = current_database() AND application_name = $1",
            )
            .bind(skald::transport::postgres::consumer::SESSION_NAME)
            .fetch_all(&self.pool)
            .await
            .expect("list consumer sessions"),
        }
    }

    /// Kills `connections` (from [`TestEnv::transport_connections`]) on the server's
    /// side, as a crash or a network failure would end them.
    pub async fn kill_transport_connections(&self, connections: &[String]) {
        match self.config.transport {
            TransportKind::RabbitMq => {
                let pids = connections.to_vec();
                tokio::task::spawn_blocking(move || {
                    for pid in &pids {
                        let _ = Command::new("rabbitmqctl")
                            .args(["close_connection", pid, "killed by a test"])
                            .output();
                    }
                })
                .await
                .expect("rabbitmqctl thread");
            }
            TransportKind::Redis => unreachable!("no Redis connections are listed"),
            TransportKind::Postgres => {
                for pid in connections {
                    sqlx::query("SELECT pg_terminate_backend($1::text::int)")
                        .bind(pid)
                        .execute(&self.pool)
                        .await
                        .expect("terminate a session");
                }
            }
        }
    }

    /// The topology names of this test's namespace.
    pub fn topology(&self) -> Topology {
        Topology::new(&self.config.namespace, self.config.partitions)
    }

    /// The endpoint of participant service `name` in this environment's namespace;
    /// its queues are removed at cleanup.
    pub fn service(&self, name: &str) -> Endpoint {
        self.services.lock().unwrap().push(name.to_string());
        Endpoint::Service(name.to_string())
    }

    /// A database of its own for participant service `service` (created now, dropped
    /// at cleanup): its URL and a pool on it.
    pub async fn service_database(&self, service: &str) -> (String, PgPool) {
        let name = format!("{}_{service}", self.name);
        self.databases.lock().unwrap().push(name.clone());
        let url = format!("{SERVER}/{name}");
        let pool = skald::participant::connect_pool(&url, 5)
            .await
            .expect("create the service's database");
        (url, pool)
    }

    /// Every database of this environment: skald's and its services'.
    fn databases(&self) -> Vec<String> {
        let mut all = vec![self.name.clone()];
        all.extend(self.databases.lock().unwrap().iter().cloned());
        all
    }

    /// Every topology this environment's queues may be in: skald's and its services'.
    fn topologies(&self) -> Vec<Topology> {
        let mut all = vec![self.topology()];
        for name in self.services.lock().unwrap().iter() {
            let prefix = Endpoint::Service(name.clone()).prefix(&self.config.namespace);
            all.push(Topology::new(&prefix, self.config.partitions));
        }
        all
    }

    /// Drops the database and deletes the queues.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        self.pool.close().await;
        remove(self.databases(), self.topologies()).await;
    }
}

impl Drop for TestEnv {
    /// A test that failed before [`TestEnv::cleanup`] still leaves nothing behind: its
    /// database and queues are removed on a thread of their own (Drop cannot await).
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let (databases, topologies) = (self.databases(), self.topologies());
        let removed = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(remove(databases, topologies));
            }
        });
        let _ = removed.join();
    }
}

/// Deletes a test's queues and drops its databases.
async fn remove(databases: Vec<String>, topologies: Vec<Topology>) {
    if let Ok(conn) = Connection::connect(AMQP, ConnectionProperties::default()).await
        && let Ok(ch) = conn.create_channel().await
    {
        for topology in &topologies {
            for q in topology.all_queues() {
                let _ = ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            for x in [
                &topology.exchange,
                &topology.delay_exchange,
                &topology.dead_exchange,
            ] {
                let _ = ch
                    .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
            }
        }
        let _ = conn.close(200, "".into()).await;
    }
    // A pool that is being closed may still be handing a connection back: retry the
    // drop a few times rather than leave the database behind.
    if let Ok(mut admin) = PgConnection::connect(&format!("{SERVER}/postgres")).await {
        for name in &databases {
            drop_database(&mut admin, name).await;
        }
        let _ = admin.close().await;
    }
}

/// Drops one database, retrying a few times: a pool that is being closed may still be
/// handing a connection back.
async fn drop_database(admin: &mut PgConnection, name: &str) {
    for _ in 0..5 {
        let dropped = sqlx::query(AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut *admin)
        .await;
        match dropped {
            Ok(_) => break,
            Err(e) => {
                eprintln!("dropping {name}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// skald consuming in the background of a test.
pub struct RunningApp {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), AppError>>,
    pub engine: Arc<Engine>,
    /// The API's state, to serve it in-process with actix-web's test tools.
    pub api: skald::api::ApiState,
    /// Where its HTTP server (dashboard page and API) listens.
    pub http_addr: std::net::SocketAddr,
}

impl RunningApp {
    /// Graceful shutdown; panics if it fails.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.handle
            .await
            .expect("app task")
            .expect("graceful shutdown");
    }
}

/// A start message for `saga` on `aggregate` with `payload`.
pub fn start(saga: &str, aggregate: &str, sequence: u64, payload: Value) -> Envelope {
    Envelope {
        sequence: Some(sequence),
        ..Envelope::start(saga, Some(aggregate.into()), payload)
    }
}

/// Starts of the `ordered` test saga: `sagas` of them round-robin over `aggregates`
/// accounts, each account's sequence counting up from 0 in publish order.
pub fn ordered_starts(sagas: u64, aggregates: u64) -> Vec<Envelope> {
    (0..sagas)
        .map(|i| {
            let account = format!("acct-{}", i % aggregates);
            let seq = i / aggregates;
            start(
                "ordered",
                &account,
                seq,
                serde_json::json!({"account": account, "seq": seq}),
            )
        })
        .collect()
}

/// Waits for a child process to exit, killing it after `timeout`.
pub fn wait_child(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            panic!("child process did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `scenario` (an `async fn(TransportKind)`) as one test per transport, named
/// `<scenario>::<transport>`.
macro_rules! on_every_transport {
    ($scenario:ident) => {
        mod $scenario {
            #[actix_rt::test]
            async fn rabbitmq() {
                super::$scenario(skald::config::TransportKind::RabbitMq).await
            }
            #[actix_rt::test]
            async fn postgres() {
                super::$scenario(skald::config::TransportKind::Postgres).await
            }
            #[actix_rt::test]
            async fn redis() {
                super::$scenario(skald::config::TransportKind::Redis).await
            }
        }
    };
}
pub(crate) use on_every_transport;

/// The three sample participant services (stock, payments, shipping) of a test: each
/// in a database of its own ([`TestEnv::service_database`], its sample tables set up)
/// and on its own endpoint of the test's namespace, run in-process exactly as
/// `skald participant sample <service>` runs them, or as that child process where a
/// test must kill one.
pub struct Services {
    databases: Vec<(Sample, String, PgPool)>,
    running: Vec<(Sample, InProcessService)>,
}

type InProcessService = (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), ParticipantError>>,
);

/// The sample services, in saga order.
pub const SAMPLES: [Sample; 3] = [Sample::Stock, Sample::Payments, Sample::Shipping];

impl Services {
    /// Their databases, set up and seeded; none of them running yet.
    pub async fn new(env: &TestEnv) -> Services {
        let mut databases = Vec::new();
        for sample in SAMPLES {
            let (url, pool) = env.service_database(sample.name()).await;
            sample.setup(&pool).await.expect("the sample's tables");
            // Its bookkeeping tables exist before it first runs: tests may read them.
            skald::participant::store::migrate(&pool)
                .await
                .expect("the participant's tables");
            env.service(sample.name());
            databases.push((sample, url, pool));
        }
        Services {
            databases,
            running: Vec::new(),
        }
    }

    /// All three, running in-process.
    pub async fn running(env: &TestEnv) -> Services {
        let mut services = Services::new(env).await;
        for sample in SAMPLES {
            services.start(env, sample);
        }
        services
    }

    /// Runs `sample` in-process until [`Services::stop`].
    pub fn start(&mut self, env: &TestEnv, sample: Sample) {
        let url = self.url(sample).to_string();
        let config = env.config.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            sample
                .run(&url, &config, ParticipantFaults::none(), shutdown)
                .await
        });
        self.running.push((sample, (stop, handle)));
    }

    /// `skald participant sample <sample>` as a child process on its database, with
    /// `SKALD_PARTICIPANT_CRASH_AT=<crash_at>` when given.
    pub fn spawn(&self, env: &TestEnv, sample: Sample, crash_at: Option<&str>) -> Child {
        let url = self.url(sample);
        let mut cmd = env.skald(&[
            "participant",
            "sample",
            sample.name(),
            "--database-url",
            url,
        ]);
        if let Some(point) = crash_at {
            cmd.env(skald::participant::faults::CRASH_AT_VAR, point);
        }
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the sample service")
    }

    /// Stops the in-process `sample` gracefully; panics if it fails.
    pub async fn stop(&mut self, sample: Sample) {
        let at = self
            .running
            .iter()
            .position(|(s, _)| *s == sample)
            .expect("the service runs in-process");
        let (_, (stop, handle)) = self.running.remove(at);
        let _ = stop.send(());
        handle
            .await
            .expect("service task")
            .expect("graceful shutdown");
    }

    /// Stops every in-process service and closes the pools.
    pub async fn stop_all(mut self) {
        for sample in SAMPLES {
            if self.running.iter().any(|(s, _)| *s == sample) {
                self.stop(sample).await;
            }
        }
        for (_, _, pool) in self.databases {
            pool.close().await;
        }
    }

    /// A pool on `sample`'s own database.
    pub fn pool(&self, sample: Sample) -> &PgPool {
        &self.database(sample).2
    }

    /// The URL of `sample`'s own database.
    pub fn url(&self, sample: Sample) -> &str {
        &self.database(sample).1
    }

    fn database(&self, sample: Sample) -> &(Sample, String, PgPool) {
        self.databases
            .iter()
            .find(|(s, _, _)| *s == sample)
            .expect("a sample service")
    }

    /// Messages ready in the partition queues of every service's endpoint.
    pub async fn queued(&self, env: &TestEnv) -> u32 {
        let mut total = 0;
        for sample in SAMPLES {
            let prefix = Endpoint::Service(sample.name().into()).prefix(&env.config.namespace);
            for queue in Topology::new(&prefix, env.config.partitions).partitions {
                total += env.queue_depth(&queue).await;
            }
        }
        total
    }
}

/// [`wait_child`] that lets the test's runtime run meanwhile (skald and in-process
/// services share it).
pub async fn child_exited(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            panic!("child process did not exit within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls `ready` every 100 ms until it holds, for at most `timeout` (the assertions
/// that follow say what was wrong if it never does).
pub async fn until<F, Fut>(timeout: Duration, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while started.elapsed() < timeout {
        if ready().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The single number `sql` selects from `pool`.
pub async fn scalar(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}
