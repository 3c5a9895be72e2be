//! Given a participant service in its own database, consuming its endpoint, and
//! messages sent to it as skald (or any publisher) sends them, then these effects,
//! replies, records and dead letters.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::{Map, Value, json};
use skald::participant::sample::{self, Sample};
use skald::participant::wire::{
    Reply, ReplyFailure, ReplyOutcome, ReplyTo, ServiceMessage, reply_id,
};
use skald::participant::{
    HandlerError, HandlerFuture, Incoming, MessageHandler, Participant, ParticipantBuilder,
    ParticipantError, RetryPolicy,
};
use skald::saga::coordinator::Cursor;
use skald::transport::rabbitmq::RabbitTransport;
use skald::transport::{Delivery, Endpoint, Transport};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::helpers::{TestEnv, test_sagas, wait_child};

/// A service's database, with its sample tables.
struct ServiceDb {
    url: String,
    pool: PgPool,
    endpoint: Endpoint,
}

async fn service_db(env: &TestEnv, sample: Sample) -> ServiceDb {
    let (url, pool) = env.service_database(sample.name()).await;
    sample.setup(&pool).await.expect("sample tables");
    ServiceDb {
        url,
        pool,
        endpoint: env.service(sample.name()),
    }
}

/// A participant consuming in the background of a test.
struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Result<(), ParticipantError>>,
}

impl Running {
    /// Graceful shutdown; panics if it fails.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle
            .await
            .expect("participant task")
            .expect("graceful shutdown");
    }
}

/// Builds `builder` on the service's database and endpoint and runs it.
async fn start(env: &TestEnv, db: &ServiceDb, builder: ParticipantBuilder) -> Running {
    let transport = RabbitTransport::connect_as(&env.config, db.endpoint.clone())
        .await
        .expect("connect the service");
    let participant = builder
        .pool(db.pool.clone())
        .transport(transport)
        .build()
        .await
        .expect("participant builds");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(participant.run(async {
        let _ = stopped.await;
    }));
    Running { stop, handle }
}

/// One scenario's world: skald's side (its intake, where replies arrive) and a
/// service in its own database, running `builder` (default: the sample's handlers).
struct Scene {
    env: TestEnv,
    db: ServiceDb,
    replies: Replies,
    service: Running,
}

impl Scene {
    async fn new(sample: Sample, builder: Option<ParticipantBuilder>) -> Scene {
        let env = TestEnv::new(test_sagas()).await;
        let db = service_db(&env, sample).await;
        let replies = Replies::new(&env).await;
        let builder =
            builder.unwrap_or_else(|| sample.register(Participant::builder(sample.name())));
        let service = start(&env, &db, builder).await;
        Scene {
            env,
            db,
            replies,
            service,
        }
    }
}

impl Scene {
    /// `skald participant dead-letters <args> --service <it> --database-url <its>`:
    /// stdout when it succeeds, its error line when it fails.
    fn dead_letters(&self, args: &[&str]) -> Result<String, String> {
        let Endpoint::Service(service) = &self.db.endpoint else {
            unreachable!("a service's endpoint")
        };
        let mut all = vec!["participant", "dead-letters"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--service", service, "--database-url", &self.db.url]);
        let out = self.env.skald(&all).output().expect("run skald");
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        if out.status.success() {
            Ok(text(out.stdout))
        } else {
            // The error is the last line (logs may come before it).
            let stderr = text(out.stderr);
            Err(format!("{}\n", stderr.lines().last().unwrap_or_default()))
        }
    }

    /// Stops the service gracefully and removes everything the scenario created.
    async fn end(self) {
        self.service.stop().await;
        self.replies.close().await;
        self.env.cleanup().await;
    }
}

/// A quick policy, so retries take milliseconds.
fn quick(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_delay: Duration::from_millis(50),
        max_delay: Duration::from_millis(100),
        jitter: 0.0,
    }
}

/// A command as a saga step sends it.
fn command(kind: &str, aggregate: &str, payload: Value) -> ServiceMessage {
    ServiceMessage {
        reply_to: Some(ReplyTo {
            saga: "order_checkout".into(),
            saga_version: 1,
            instance_id: Uuid::new_v4(),
            cursor: Cursor::START,
        }),
        ..event(kind, aggregate, payload)
    }
}

/// A plain event (no reply).
fn event(kind: &str, aggregate: &str, payload: Value) -> ServiceMessage {
    let Value::Object(payload) = payload else {
        panic!("payload must be an object")
    };
    ServiceMessage {
        message_id: Uuid::new_v4(),
        kind: kind.into(),
        aggregate_id: aggregate.into(),
        sequence: None,
        dispatched_at: None,
        payload,
        reply_to: None,
        errors: vec![],
        traceparent: None,
    }
}

fn reserve(order: &str, qty: i64) -> ServiceMessage {
    command(
        "reserve_stock",
        order,
        json!({"order_id": order, "sku": "SKU-1", "qty": qty}),
    )
}

/// Sends bodies to the service's endpoint under `key`, as skald does.
async fn send(env: &TestEnv, db: &ServiceDb, key: &str, bodies: &[Vec<u8>]) {
    let transport = env.transport().await;
    for body in bodies {
        transport
            .send_to(&db.endpoint, key, body)
            .await
            .expect("send to the service");
    }
    transport.close().await;
}

async fn send_messages(env: &TestEnv, db: &ServiceDb, msgs: &[&ServiceMessage]) {
    for m in msgs {
        send(env, db, &m.aggregate_id, &[m.to_body()]).await;
    }
}

/// Replies arriving at skald's intake, read as skald would.
struct Replies {
    transport: Arc<dyn Transport>,
    stream: BoxStream<'static, Delivery>,
}

impl Replies {
    async fn new(env: &TestEnv) -> Replies {
        let transport = env.transport().await;
        let stream = transport.consume().await.expect("consume skald's intake");
        Replies { transport, stream }
    }

    /// The next reply (acked); panics after 30 s.
    async fn next(&mut self) -> Reply {
        let delivery = tokio::time::timeout(Duration::from_secs(30), self.stream.next())
            .await
            .expect("a reply within 30 s")
            .expect("intake stream open");
        let reply = Reply::parse(&delivery.body).expect("a well-formed reply");
        delivery.ack().await.expect("ack");
        reply
    }

    /// Asserts nothing arrives for `wait`.
    async fn none_within(&mut self, wait: Duration) {
        if let Ok(Some(d)) = tokio::time::timeout(wait, self.stream.next()).await {
            panic!("unexpected reply: {}", String::from_utf8_lossy(&d.body));
        }
    }

    async fn close(self) {
        self.transport.close().await;
    }
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(pool)
        .await
        .expect(sql)
}

async fn available(pool: &PgPool) -> i64 {
    count(
        pool,
        "SELECT available::bigint FROM stock.items WHERE sku = 'SKU-1'",
    )
    .await
}

/// The processed-messages row of `id`: outcome, attempts, error history.
async fn processed(pool: &PgPool, id: Uuid) -> (String, i32, Vec<Value>) {
    let (outcome, attempts, errors): (String, i32, sqlx::types::Json<Vec<Value>>) = sqlx::query_as(
        "SELECT outcome, attempts, errors FROM skald_participant.processed \
             WHERE message_id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .expect("processed row");
    (outcome, attempts, errors.0)
}

fn succeeded(reply: &Reply) -> &Map<String, Value> {
    match &reply.outcome {
        ReplyOutcome::Succeeded { outputs } => outputs,
        other => panic!("expected success, got {other:?}"),
    }
}

const STOCK: i64 = 1_000_000_000;

#[actix_rt::test]
async fn a_command_delivered_twice_has_one_effect_and_the_same_reply_twice() {
    let mut s = Scene::new(Sample::Stock, None).await;

    let cmd = reserve("order-1", 2);
    send_messages(&s.env, &s.db, &[&cmd, &cmd]).await;
    let (first, second) = (s.replies.next().await, s.replies.next().await);

    assert_eq!(first, second, "the stored reply, sent again");
    assert_eq!(first.message_id, reply_id(cmd.message_id));
    assert_eq!(first.in_reply_to, cmd.message_id);
    assert_eq!(first.reply_to, cmd.reply_to.clone().unwrap());
    assert!(succeeded(&first).contains_key("reservation_id"));
    assert_eq!(
        count(&s.db.pool, "SELECT count(*) FROM stock.reservations").await,
        1
    );
    assert_eq!(available(&s.db.pool).await, STOCK - 2, "one effect");
    assert_eq!(processed(&s.db.pool, cmd.message_id).await.0, "succeeded");

    // Its compensation, delivered twice too: the items come back once.
    let reservation = succeeded(&first)["reservation_id"].clone();
    let release = command(
        "release_stock",
        "order-1",
        json!({"reservation_id": reservation}),
    );
    send_messages(&s.env, &s.db, &[&release, &release]).await;
    for _ in 0..2 {
        assert_eq!(succeeded(&s.replies.next().await)["released"], json!(true));
    }
    assert_eq!(available(&s.db.pool).await, STOCK);

    s.end().await;
}

/// Fails retryably until `fixed`, or its first `failures` tries, then reserves.
struct Flaky {
    failures: u32,
    fixed: Arc<AtomicBool>,
    tries: AtomicU32,
}

impl MessageHandler for Flaky {
    fn call<'a>(&'a self, conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
        let n = self.tries.fetch_add(1, Ordering::SeqCst) + 1;
        let fail = n <= self.failures && !self.fixed.load(Ordering::SeqCst);
        Box::pin(async move {
            // Written before failing: the rollback must take it back.
            sqlx::query("UPDATE stock.items SET available = available - 1 WHERE sku = 'SKU-1'")
                .execute(&mut *conn)
                .await?;
            if fail {
                return Err(HandlerError::Retryable(format!("warehouse busy (try {n})")));
            }
            sqlx::query("UPDATE stock.items SET available = available + 1 WHERE sku = 'SKU-1'")
                .execute(&mut *conn)
                .await?;
            let mut out = sample::reserve_stock(conn, msg.clone()).await?;
            out.insert("attempt".into(), msg.attempt.into());
            Ok(out)
        })
    }
}

fn flaky(failures: u32, fixed: &Arc<AtomicBool>) -> Flaky {
    Flaky {
        failures,
        fixed: fixed.clone(),
        tries: AtomicU32::new(0),
    }
}

#[actix_rt::test]
async fn a_retryable_failure_is_retried_with_its_error_history_then_succeeds() {
    let builder = Participant::builder("stock")
        .handler("reserve_stock", flaky(2, &Arc::default()))
        .retry(quick(5));
    let mut s = Scene::new(Sample::Stock, Some(builder)).await;

    let cmd = reserve("order-1", 3);
    send_messages(&s.env, &s.db, &[&cmd]).await;
    let reply = s.replies.next().await;

    assert_eq!(
        succeeded(&reply)["attempt"],
        json!(3),
        "the third try succeeded"
    );
    let (outcome, attempts, errors) = processed(&s.db.pool, cmd.message_id).await;
    assert_eq!((outcome.as_str(), attempts), ("succeeded", 3));
    // The history the message carried back to the service on its retries.
    let messages: Vec<&str> = errors
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        ["warehouse busy (try 1)", "warehouse busy (try 2)"]
    );
    assert_eq!(errors[1]["attempt"], json!(2));
    let failures: Vec<(i32, String, bool)> = sqlx::query_as(
        "SELECT attempt, error, retryable FROM skald_participant.failures ORDER BY attempt",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        failures,
        vec![
            (1, "warehouse busy (try 1)".into(), true),
            (2, "warehouse busy (try 2)".into(), true)
        ]
    );
    assert_eq!(
        available(&s.db.pool).await,
        STOCK - 3,
        "failed tries rolled back"
    );

    s.end().await;
}

#[actix_rt::test]
async fn past_the_threshold_a_dead_letter_with_its_history_and_an_exhausted_reply_then_a_replay_after_the_fix_is_handled()
 {
    let fixed = Arc::new(AtomicBool::new(false));
    let builder = Participant::builder("stock")
        .handler("reserve_stock", flaky(u32::MAX, &fixed))
        .retry(quick(3));
    let mut s = Scene::new(Sample::Stock, Some(builder)).await;

    let cmd = reserve("order-1", 4);
    send_messages(&s.env, &s.db, &[&cmd]).await;
    let reply = s.replies.next().await;
    let ReplyOutcome::Failed { kind, error } = &reply.outcome else {
        panic!("expected a failure: {reply:?}")
    };
    assert_eq!(*kind, ReplyFailure::Exhausted);
    assert!(error.starts_with("exhausted after 3 attempt(s)"), "{error}");
    assert_eq!(available(&s.db.pool).await, STOCK, "no effect");

    // The dead letter, in the service's database and its dead-letter queue.
    let listed = s.dead_letters(&["list", "--json"]).expect("lists");
    let letter: Value = serde_json::from_str(listed.trim()).expect("one JSON line");
    assert_eq!(letter["reason_code"], "exhausted");
    assert_eq!(letter["status"], "pending");
    assert_eq!(letter["message_id"], json!(cmd.message_id));
    assert_eq!(letter["errors"].as_array().unwrap().len(), 3, "{letter}");
    assert_eq!(
        letter["body"]["errors"].as_array().unwrap().len(),
        3,
        "{letter}"
    );
    let dead_queue = format!("{}.svc.stock.dead", s.env.config.namespace);
    assert_eq!(s.env.queue_depth(&dead_queue).await, 1);

    // After the fix, the operator replays it: the command runs again, once.
    fixed.store(true, Ordering::SeqCst);
    let id = letter["id"].as_str().unwrap();
    assert_eq!(
        s.dead_letters(&["replay", "--id", id]).unwrap().trim(),
        format!("replayed {id}")
    );
    let again = s.replies.next().await;
    assert!(succeeded(&again).contains_key("reservation_id"));
    assert_eq!(again.in_reply_to, cmd.message_id);
    assert_eq!(available(&s.db.pool).await, STOCK - 4);
    assert_eq!(processed(&s.db.pool, cmd.message_id).await.0, "succeeded");
    let status: String = sqlx::query_scalar("SELECT status FROM skald_participant.dead_letters")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(status, "replayed");
    let twice = s.dead_letters(&["replay", "--id", id]).unwrap_err();
    assert_eq!(
        twice,
        format!("error: dead letter {id} is replayed, not pending\n")
    );

    s.end().await;
}

/// Writes its effect, then refuses.
fn refuse_after_writing<'a>(conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
    Box::pin(async move {
        sample::reserve_stock(conn, msg).await?;
        Err(HandlerError::Fatal("credit check refused".into()))
    })
}

#[actix_rt::test]
async fn a_fatal_failure_replies_failed_and_its_effect_is_rolled_back() {
    let builder = Participant::builder("stock")
        .handler("reserve_stock", refuse_after_writing)
        .handler("note_stock", nul_outputs);
    let mut s = Scene::new(Sample::Stock, Some(builder)).await;

    let cmd = reserve("order-1", 5);
    send_messages(&s.env, &s.db, &[&cmd]).await;
    let reply = s.replies.next().await;
    assert_eq!(
        reply.outcome,
        ReplyOutcome::Failed {
            kind: ReplyFailure::Fatal,
            error: "credit check refused".into()
        }
    );
    assert_eq!(
        count(&s.db.pool, "SELECT count(*) FROM stock.reservations").await,
        0
    );
    assert_eq!(available(&s.db.pool).await, STOCK);
    let (outcome, attempts, errors) = processed(&s.db.pool, cmd.message_id).await;
    assert_eq!((outcome.as_str(), attempts, errors.len()), ("fatal", 1, 1));

    // Outputs PostgreSQL cannot store are the handler's bug: fatal, its effect undone.
    let note = command("note_stock", "order-2", json!({}));
    send_messages(&s.env, &s.db, &[&note]).await;
    let reply = s.replies.next().await;
    assert_eq!(
        reply.outcome,
        ReplyOutcome::Failed {
            kind: ReplyFailure::Fatal,
            error: "the handler's outputs hold a NUL character at outputs.note, \
                    which PostgreSQL cannot store"
                .into()
        }
    );
    assert_eq!(available(&s.db.pool).await, STOCK);

    s.end().await;
}

/// Takes one item, then returns an output PostgreSQL cannot store.
fn nul_outputs<'a>(conn: &'a mut PgConnection, _: Incoming) -> HandlerFuture<'a> {
    Box::pin(async move {
        sqlx::query("UPDATE stock.items SET available = available - 1 WHERE sku = 'SKU-1'")
            .execute(&mut *conn)
            .await?;
        let mut out = Map::new();
        out.insert("note".into(), Value::from("a\0b"));
        Ok(out)
    })
}

#[actix_rt::test]
async fn a_business_refusal_of_a_sample_service_is_fatal() {
    let mut s = Scene::new(Sample::Payments, None).await;

    let charge = |amount: Value| {
        command(
            "charge_card",
            "order-1",
            json!({"order_id": "order-1", "account": "alice", "amount": amount}),
        )
    };
    let (too_much, fine) = (charge(json!(2_000_000_000)), charge(json!(25.5)));
    send_messages(&s.env, &s.db, &[&too_much, &fine]).await;
    let refused = s.replies.next().await;
    assert!(
        matches!(&refused.outcome, ReplyOutcome::Failed { kind: ReplyFailure::Fatal, error }
            if error.contains("insufficient funds")),
        "{refused:?}"
    );
    let paid = s.replies.next().await;
    let payment_id = succeeded(&paid)["payment_id"].as_str().unwrap().to_string();
    let balance: String =
        sqlx::query_scalar("SELECT balance::text FROM payments.accounts WHERE account = 'alice'")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(balance, "999999974.50");

    // Refunding it, twice: once.
    let refund = command("refund_card", "order-1", json!({"payment_id": payment_id}));
    send_messages(&s.env, &s.db, &[&refund, &refund]).await;
    for _ in 0..2 {
        assert_eq!(succeeded(&s.replies.next().await)["refunded"], json!(true));
    }
    let balance: String =
        sqlx::query_scalar("SELECT balance::text FROM payments.accounts WHERE account = 'alice'")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!(balance, "1000000000.00");

    s.end().await;
}

#[actix_rt::test]
async fn a_malformed_message_is_dead_lettered_at_once_and_the_service_keeps_working() {
    let builder = Sample::Stock
        .register(Participant::builder("stock"))
        .handler("orphan_child", orphan_child);
    let mut s = Scene::new(Sample::Stock, Some(builder)).await;

    let unknown = command("teleport_stock", "order-1", json!({}));
    let mut nul = reserve("order-1", 1);
    nul.reply_to.as_mut().unwrap().saga = "order\0checkout".into();
    send(
        &s.env,
        &s.db,
        "order-1",
        &[
            b"not json".to_vec(),
            unknown.to_body(),
            nul.to_body(),
            command("orphan_child", "order-1", json!({})).to_body(),
        ],
    )
    .await;
    let good = reserve("order-1", 1);
    send_messages(&s.env, &s.db, &[&good]).await;

    let reply = s.replies.next().await;
    assert_eq!(
        reply.in_reply_to, good.message_id,
        "no reply to the bad ones"
    );
    s.replies.none_within(Duration::from_millis(500)).await;
    let letters: Vec<(String, String, Option<Uuid>)> = sqlx::query_as(
        "SELECT reason_code, reason, message_id FROM skald_participant.dead_letters \
         ORDER BY reason_code, reason",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    let codes: Vec<&str> = letters.iter().map(|l| l.0.as_str()).collect();
    assert_eq!(
        codes,
        ["malformed", "malformed", "unknown_type", "unprocessable"],
        "{letters:?}"
    );
    assert_eq!(
        letters[0].1,
        "malformed: not a valid envelope: expected ident at line 1 column 2"
    );
    assert_eq!(
        letters[1].1,
        "malformed: reply_to.saga contains a NUL character (\\u0000), which PostgreSQL cannot store"
    );
    assert_eq!((letters[0].2, letters[1].2), (None, None));
    assert_eq!(
        letters[2].1,
        "unknown type \"teleport_stock\": service stock has no handler for it"
    );
    assert_eq!(letters[2].2, Some(unknown.message_id));
    assert!(
        letters[3].1.starts_with(
            "unprocessable: the service's database refused to record it: SQLSTATE 23503"
        ),
        "{}",
        letters[3].1
    );
    let failures = count(
        &s.db.pool,
        "SELECT count(*) FROM skald_participant.failures",
    )
    .await;
    assert_eq!(failures, 0, "never tried");
    let dead_queue = format!("{}.svc.stock.dead", s.env.config.namespace);
    assert_eq!(s.env.queue_depth(&dead_queue).await, 4);

    // The operator sets the unreadable one aside, once.
    let id: Uuid = sqlx::query_scalar(
        "SELECT id FROM skald_participant.dead_letters WHERE reason LIKE '%expected ident%'",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    let id = id.to_string();
    let discard = ["discard", "--id", &id, "--by", "ops", "--note", "garbage"];
    assert_eq!(
        s.dead_letters(&discard).unwrap(),
        format!("discarded {id}\n")
    );
    let listed = s
        .dead_letters(&["list", "--status", "discarded", "--json"])
        .unwrap();
    let letter: Value = serde_json::from_str(listed.trim()).expect("one JSON line");
    assert_eq!(
        (
            &letter["id"],
            &letter["resolved_by"],
            &letter["note"],
            &letter["body"]
        ),
        (
            &json!(id),
            &json!("ops"),
            &json!("garbage"),
            &json!("not json")
        )
    );
    assert_eq!(
        s.dead_letters(&discard).unwrap_err(),
        format!("error: dead letter {id} is discarded, not pending\n")
    );
    assert_eq!(
        s.dead_letters(&["list", "--status", "lost"]).unwrap_err(),
        "error: unknown status \"lost\": expected pending, replayed or discarded\n"
    );
    let unknown = Uuid::new_v4();
    assert_eq!(
        s.dead_letters(&["discard", "--id", &unknown.to_string()])
            .unwrap_err(),
        format!("error: no dead letter {unknown} for this service\n")
    );
    let table = s.dead_letters(&["list", "--status", "pending"]).unwrap();
    assert_eq!(table.lines().count(), 3, "{table}");

    s.end().await;
}

/// Leaves a deferred foreign key broken: PostgreSQL refuses the commit, every time.
fn orphan_child<'a>(conn: &'a mut PgConnection, _: Incoming) -> HandlerFuture<'a> {
    Box::pin(async move {
        sqlx::raw_sql(
            "CREATE TABLE IF NOT EXISTS stock.parent (id int PRIMARY KEY); \
             CREATE TABLE IF NOT EXISTS stock.child (pid int REFERENCES stock.parent \
               DEFERRABLE INITIALLY DEFERRED); \
             INSERT INTO stock.child VALUES (42)",
        )
        .execute(&mut *conn)
        .await?;
        Ok(Map::new())
    })
}

/// Appends each event's `n` to `stock.log` (an effect whose order is visible).
fn log_event<'a>(conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
    Box::pin(async move {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS stock.log (id bigserial PRIMARY KEY, aggregate text, n bigint)",
        )
        .execute(&mut *conn)
        .await?;
        sqlx::query("INSERT INTO stock.log (aggregate, n) VALUES ($1, $2)")
            .bind(&msg.aggregate_id)
            .bind(msg.payload["n"].as_i64())
            .execute(&mut *conn)
            .await?;
        Ok(Map::new())
    })
}

async fn logged(pool: &PgPool, aggregate: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT n FROM stock.log WHERE aggregate = $1 ORDER BY id")
        .bind(aggregate)
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

async fn wait_processed(pool: &PgPool, n: i64) {
    for _ in 0..300 {
        if count(pool, "SELECT count(*) FROM skald_participant.processed").await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("fewer than {n} messages processed after 30 s");
}

#[actix_rt::test]
async fn a_plain_event_is_handled_once_in_aggregate_order_without_a_reply() {
    let builder = Participant::builder("stock").handler("stock_counted", log_event);
    let mut s = Scene::new(Sample::Stock, Some(builder)).await;

    let events: Vec<ServiceMessage> = (0..40)
        .map(|n| event("stock_counted", &format!("sku-{}", n % 4), json!({"n": n})))
        .collect();
    let copy = events[5].clone();
    let mut all: Vec<&ServiceMessage> = events.iter().collect();
    all.push(&copy);
    send_messages(&s.env, &s.db, &all).await;
    wait_processed(&s.db.pool, 40).await;

    for a in 0..4 {
        let expected: Vec<i64> = (0..40).filter(|n| n % 4 == a).collect();
        assert_eq!(logged(&s.db.pool, &format!("sku-{a}")).await, expected);
    }
    s.replies.none_within(Duration::from_millis(500)).await;

    s.end().await;
}

#[actix_rt::test]
async fn an_older_message_of_an_aggregate_is_discarded_and_recorded() {
    let builder = Participant::builder("stock").handler("stock_counted", log_event);
    let mut s = Scene::new(Sample::Stock, Some(builder)).await;

    // By sequence (events) ...
    let with_seq = |n: i64, seq: u64| ServiceMessage {
        sequence: Some(seq),
        ..event("stock_counted", "sku-1", json!({"n": n}))
    };
    let (newer, older) = (with_seq(2, 2), with_seq(1, 1));
    // ... and by dispatch time (a command: answered failed/fatal, unrun).
    let at = |n: i64, t: &str| ServiceMessage {
        dispatched_at: Some(t.parse().unwrap()),
        ..command("stock_counted", "sku-2", json!({"n": n}))
    };
    let (later, earlier) = (
        at(20, "2026-05-01T10:00:01Z"),
        at(10, "2026-05-01T10:00:00Z"),
    );
    send_messages(&s.env, &s.db, &[&newer, &older, &later, &earlier]).await;

    assert!(matches!(
        s.replies.next().await.outcome,
        ReplyOutcome::Succeeded { .. }
    ));
    let stale = s.replies.next().await;
    assert_eq!(stale.in_reply_to, earlier.message_id);
    assert!(
        matches!(&stale.outcome, ReplyOutcome::Failed { kind: ReplyFailure::Fatal, error }
            if error.starts_with("stale: dispatched_at")),
        "{stale:?}"
    );
    wait_processed(&s.db.pool, 4).await;
    assert_eq!(logged(&s.db.pool, "sku-1").await, vec![2]);
    assert_eq!(logged(&s.db.pool, "sku-2").await, vec![20]);
    let (outcome, attempts, _) = processed(&s.db.pool, older.message_id).await;
    assert_eq!((outcome.as_str(), attempts), ("stale", 0));
    assert_eq!(processed(&s.db.pool, earlier.message_id).await.0, "stale");

    s.end().await;
}

#[actix_rt::test]
async fn a_service_killed_after_its_commit_before_its_reply_answers_after_restart_with_one_effect()
{
    let env = TestEnv::new(test_sagas()).await;
    let db = service_db(&env, Sample::Stock).await;
    let mut replies = Replies::new(&env).await;
    let cmd = reserve("order-1", 7);
    send_messages(&env, &db, &[&cmd]).await;

    let sample = |crash: Option<&str>| {
        let mut cmd = env.skald(&["participant", "sample", "stock", "--database-url", &db.url]);
        if let Some(point) = crash {
            cmd.env(skald::participant::faults::CRASH_AT_VAR, point);
        }
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn the stock service")
    };
    let mut crashing = sample(Some("after_commit:reserve_stock"));
    let status = wait_child(&mut crashing, Duration::from_secs(60));
    assert!(!status.success(), "it must have crashed: {status:?}");
    assert_eq!(
        available(&db.pool).await,
        STOCK - 7,
        "committed before the crash"
    );
    replies.none_within(Duration::from_millis(300)).await;

    let mut restarted = sample(None);
    let reply = replies.next().await;
    assert_eq!(reply.in_reply_to, cmd.message_id);
    assert!(succeeded(&reply).contains_key("reservation_id"));
    assert_eq!(available(&db.pool).await, STOCK - 7, "one effect");
    assert_eq!(
        count(&db.pool, "SELECT count(*) FROM stock.reservations").await,
        1
    );
    restarted.kill().expect("stop the service");
    let _ = restarted.wait();

    replies.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_builder_without_handlers_or_with_a_bad_name_is_refused() {
    let env = TestEnv::new(test_sagas()).await;
    let db = service_db(&env, Sample::Shipping).await;
    let transport = RabbitTransport::connect_as(&env.config, db.endpoint.clone())
        .await
        .unwrap();
    let refused = |b: ParticipantBuilder| {
        let transport: Arc<dyn Transport> = transport.clone();
        let pool = db.pool.clone();
        async move {
            b.pool(pool)
                .transport(transport)
                .build()
                .await
                .err()
                .expect("refused")
                .to_string()
        }
    };
    let none = refused(Participant::builder("shipping")).await;
    assert!(none.contains("no handler registered"), "{none}");
    let bad = refused(
        Participant::builder("ship ping").handler("create_shipment", sample::create_shipment),
    )
    .await;
    assert!(bad.contains("service name must be"), "{bad}");
    // Three processes starting at once on a fresh database: the migrations apply once.
    let builds = (0..3).map(|_| {
        Sample::Shipping
            .register(Participant::builder("shipping"))
            .pool(db.pool.clone())
            .transport(transport.clone())
            .build()
    });
    for built in futures_util::future::join_all(builds).await {
        built.expect("builds");
    }
    let migrations = count(
        &db.pool,
        "SELECT count(*) FROM skald_participant._sqlx_migrations",
    )
    .await;
    assert_eq!(migrations, 1);
    transport.close().await;
    env.cleanup().await;
}

/// Lets connections to the service's database in (or keeps them out, ending those open).
async fn database_reachable(db: &ServiceDb, reachable: bool) {
    let name = db.url.rsplit('/').next().unwrap();
    let mut admin = <PgConnection as sqlx::Connection>::connect(&format!(
        "{}/postgres",
        crate::helpers::SERVER
    ))
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS {reachable}"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    if !reachable {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
            .bind(name)
            .execute(&mut admin)
            .await
            .unwrap();
    }
}

#[actix_rt::test]
async fn a_database_outage_holds_the_message_without_counting_an_attempt() {
    let builder = Participant::builder("stock")
        .handler("reserve_stock", sample::reserve_stock)
        .retry(quick(1));
    let mut s = Scene::new(Sample::Stock, Some(builder)).await;

    database_reachable(&s.db, false).await;
    let cmd = reserve("order-1", 6);
    send_messages(&s.env, &s.db, &[&cmd]).await;
    // With one attempt allowed, a counted failure would have answered `exhausted`.
    s.replies.none_within(Duration::from_secs(2)).await;
    database_reachable(&s.db, true).await;

    let reply = s.replies.next().await;
    assert!(succeeded(&reply).contains_key("reservation_id"));
    let (outcome, attempts, errors) = processed(&s.db.pool, cmd.message_id).await;
    assert_eq!(
        (outcome.as_str(), attempts, errors.len()),
        ("succeeded", 1, 0)
    );
    assert_eq!(available(&s.db.pool).await, STOCK - 6);

    s.end().await;
}

/// The first message in any of skald's partition queues, read with plain AMQP: its
/// properties and body. Panics after 30 s.
async fn raw_from_intake(env: &TestEnv) -> (lapin::BasicProperties, Value) {
    let conn = lapin::Connection::connect(crate::helpers::AMQP, Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    for _ in 0..300 {
        for queue in env.topology().partitions {
            let got = ch
                .basic_get(
                    queue.as_str().into(),
                    lapin::options::BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap();
            if let Some(message) = got {
                let body = serde_json::from_slice(&message.delivery.data).unwrap();
                let _ = conn.close(200, "".into()).await;
                return (message.delivery.properties, body);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no reply in skald's intake after 30 s");
}

#[actix_rt::test]
async fn a_command_published_as_the_readme_says_is_answered_as_the_readme_says() {
    let env = TestEnv::new(test_sagas()).await;
    let db = service_db(&env, Sample::Shipping).await;
    let service = start(
        &env,
        &db,
        Sample::Shipping.register(Participant::builder("shipping")),
    )
    .await;
    // skald runs: its intake exists.
    env.transport().await.close().await;

    // Written by hand from "Participant protocol", not built with skald's types.
    let (command_id, instance_id) = (Uuid::new_v4(), Uuid::new_v4());
    let reply_to = json!({
        "saga": "checkout", "saga_version": 3, "instance_id": instance_id,
        "cursor": {"step": 2, "phase": "forward", "attempt": 1}
    });
    let body = json!({
        "message_id": command_id, "type": "create_shipment", "aggregate_id": "o-7",
        "payload": {"order_id": "o-7", "sku": "SKU-2", "qty": 1},
        "reply_to": reply_to,
    });
    let exchange = format!("{}.svc.shipping", env.config.namespace);
    env.publish_raw_to(&exchange, "o-7", &[serde_json::to_vec(&body).unwrap()])
        .await;

    let (properties, reply) = raw_from_intake(&env).await;
    assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
    assert_eq!(
        properties.content_type().as_ref().map(|c| c.as_str()),
        Some("application/json")
    );
    let reply_id = Uuid::new_v5(&command_id, b"reply");
    assert_eq!(reply["message_id"], json!(reply_id));
    assert_eq!(reply["in_reply_to"], json!(command_id));
    assert_eq!(reply["service"], "shipping");
    assert_eq!(reply["aggregate_id"], "o-7");
    assert_eq!(reply["reply_to"], reply_to, "copied unchanged");
    assert_eq!(reply["outcome"]["status"], "succeeded");
    let shipment: String = sqlx::query_scalar(
        "SELECT shipment_id::text FROM shipping.shipments WHERE order_id = 'o-7'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(
        reply["outcome"]["outputs"],
        json!({"shipment_id": shipment})
    );

    service.stop().await;
    env.cleanup().await;
}

/// Reserves, slowly, saying when it started.
struct Slow(Arc<AtomicBool>);

impl MessageHandler for Slow {
    fn call<'a>(&'a self, conn: &'a mut PgConnection, msg: Incoming) -> HandlerFuture<'a> {
        self.0.store(true, Ordering::SeqCst);
        Box::pin(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            sample::reserve_stock(conn, msg).await
        })
    }
}

#[actix_rt::test]
async fn a_graceful_shutdown_lets_the_message_in_flight_commit_reply_and_ack() {
    let started = Arc::new(AtomicBool::new(false));
    let builder = Participant::builder("stock").handler("reserve_stock", Slow(started.clone()));
    let Scene {
        env,
        db,
        mut replies,
        service,
    } = Scene::new(Sample::Stock, Some(builder)).await;

    let cmd = reserve("order-1", 8);
    send_messages(&env, &db, &[&cmd]).await;
    while !started.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.stop().await;

    assert_eq!(replies.next().await.in_reply_to, cmd.message_id);
    assert_eq!(processed(&db.pool, cmd.message_id).await.0, "succeeded");
    let queues = env.topology().partitions.len();
    for i in 0..queues {
        let queue = format!("{}.svc.stock.p.{i}", env.config.namespace);
        assert_eq!(
            env.queue_depth(&queue).await,
            0,
            "acked: nothing to redeliver"
        );
    }
    replies.close().await;
    env.cleanup().await;
}
