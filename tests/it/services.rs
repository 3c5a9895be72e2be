//! skald and the three sample participant services together (the library, not raw
//! messages), each service in its own database, on real PostgreSQL and RabbitMQ:
//! given the sample `order_services` saga and a fault at a service, then this state in
//! skald's database and in every service's.

use std::time::Duration;

use serde_json::json;
use skald::envelope::Envelope;
use skald::participant::sample::Sample;
use skald::participant::wire::{ReplyTo, ServiceMessage};
use skald::saga::coordinator::Cursor;
use skald::transport::Endpoint;
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{
    SAMPLES, Services, TestEnv, child_exited, order_services_with, scalar, start, until,
};

/// The sample's seed: items of each SKU, balance of each account.
const SEED: i64 = 1_000_000_000;

/// An order of 2 × SKU-1 paid 25.50 by alice; its aggregate is the order.
fn order(id: &str) -> Envelope {
    Envelope::start(
        "order_services",
        None,
        json!({"order_id": id, "sku": "SKU-1", "qty": 2, "account": "alice", "amount": 25.5}),
    )
}

/// The sample saga with every reply timeout set to `timeout_ms`.
fn timeouts(timeout_ms: u64) -> (&'static str, String) {
    ("timeout_ms: 5000", format!("timeout_ms: {timeout_ms}"))
}

async fn stock_available(services: &Services) -> i64 {
    scalar(
        services.pool(Sample::Stock),
        "SELECT available::bigint FROM stock.items WHERE sku = 'SKU-1'",
    )
    .await
}

async fn alice_balance(services: &Services) -> i64 {
    scalar(
        services.pool(Sample::Payments),
        "SELECT (balance * 100)::bigint FROM payments.accounts WHERE account = 'alice'",
    )
    .await
}

/// The one instance's id and status.
async fn the_instance(env: &TestEnv) -> (Uuid, String) {
    sqlx::query_as("SELECT id, status FROM skald.instances")
        .fetch_one(&env.pool)
        .await
        .expect("one instance")
}

/// A service's processed rows of one message type: (message_id, outcome, attempts).
async fn processed(pool: &PgPool, kind: &str) -> Vec<(Uuid, String, i32)> {
    sqlx::query_as(
        "SELECT message_id, outcome, attempts FROM skald_participant.processed \
         WHERE type = $1 ORDER BY processed_at",
    )
    .bind(kind)
    .fetch_all(pool)
    .await
    .expect("read processed")
}

/// skald's command rows of one type: (id, sends, status).
async fn commands(env: &TestEnv, kind: &str) -> Vec<(Uuid, i32, String)> {
    sqlx::query_as("SELECT id, sends, status FROM skald.commands WHERE type = $1 ORDER BY sent_at")
        .bind(kind)
        .fetch_all(&env.pool)
        .await
        .expect("read commands")
}

/// Makes `table` of a service refuse every insert or update with `sqlstate` (a rule of
/// the service's own database: the handler meets it as a database error).
async fn refuse(pool: &PgPool, table: &str, event: &str, sqlstate: &str, why: &str) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION {table}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION '{why}' USING ERRCODE = '{sqlstate}'; END $$; \
         CREATE TRIGGER refuse BEFORE {event} ON {table} \
         FOR EACH ROW EXECUTE FUNCTION {table}_refuse();"
    )))
    .execute(pool)
    .await
    .expect("install the refusal");
}

async fn stop(env: TestEnv, app: crate::helpers::RunningApp, services: Services) {
    app.stop().await;
    services.stop_all().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn the_three_services_complete_an_order_each_effect_in_its_own_database_and_queues_drain() {
    let env = TestEnv::new(order_services_with(&[])).await;
    let services = Services::running(&env).await;
    let app = env.start_app().await;
    env.publish_starts(vec![order("order-1"), order("order-2")])
        .await;
    env.wait_for_terminal(2, Duration::from_secs(60)).await;

    assert_eq!(env.count_status("completed").await, 2);
    // Each effect is in its own service's database, once per order.
    assert_eq!(stock_available(&services).await, SEED - 4);
    assert_eq!(alice_balance(&services).await, SEED * 100 - 2 * 2550);
    let per_order = [
        (
            Sample::Stock,
            "SELECT count(DISTINCT order_id) FROM stock.reservations",
        ),
        (
            Sample::Payments,
            "SELECT count(DISTINCT order_id) FROM payments.payments",
        ),
        (Sample::Shipping, "SELECT count(*) FROM shipping.shipments"),
    ];
    for (sample, sql) in per_order {
        assert_eq!(scalar(services.pool(sample), sql).await, 2, "{sql}");
    }
    // ... and nowhere else: skald's database holds no sample tables.
    let foreign = "SELECT count(*) FROM information_schema.schemata \
                   WHERE schema_name IN ('stock', 'payments', 'shipping')";
    assert_eq!(scalar(&env.pool, foreign).await, 0);
    // The outputs of each reply reached the instance.
    let outputs: Vec<sqlx::types::Json<serde_json::Value>> =
        sqlx::query_scalar("SELECT outputs FROM skald.instances")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    for o in outputs {
        for field in ["reservation_id", "payment_id", "shipment_id"] {
            assert!(o.0.to_string().contains(field), "{field} in {}", o.0);
        }
    }
    // Queues drain: skald's intake and every service's partitions.
    until(Duration::from_secs(10), || async {
        env.intake_depth().await + services.queued(&env).await == 0
    })
    .await;
    assert_eq!(env.intake_depth().await, 0);
    assert_eq!(services.queued(&env).await, 0);

    stop(env, app, services).await;
}

#[actix_rt::test]
async fn a_service_killed_after_its_commit_before_its_reply_answers_on_redelivery_and_the_saga_completes()
 {
    // A reply timeout far longer than the restart: the answer comes from redelivery.
    let env = TestEnv::new(order_services_with(&[timeouts(60_000)])).await;
    let mut services = Services::new(&env).await;
    services.start(&env, Sample::Stock);
    services.start(&env, Sample::Shipping);
    let app = env.start_app().await;

    // Given payments dies like kill -9 once it committed the charge, before replying.
    let mut crashing = services.spawn(&env, Sample::Payments, Some("after_commit:charge_card"));
    env.publish_starts(vec![order("order-k")]).await;
    let status = child_exited(&mut crashing, Duration::from_secs(60)).await;
    assert!(!status.success(), "it crashed: {status:?}");
    assert_eq!(
        alice_balance(&services).await,
        SEED * 100 - 2550,
        "committed"
    );
    assert_eq!(the_instance(&env).await.1, "running", "no reply yet");

    // When it restarts: the command is redelivered, answered from the stored reply.
    let mut restarted = services.spawn(&env, Sample::Payments, None);
    env.wait_for_terminal(1, Duration::from_secs(60)).await;
    assert_eq!(the_instance(&env).await.1, "completed");
    assert_eq!(
        alice_balance(&services).await,
        SEED * 100 - 2550,
        "one effect"
    );
    let payments = services.pool(Sample::Payments);
    assert_eq!(
        scalar(payments, "SELECT count(*) FROM payments.payments").await,
        1
    );
    let charges = processed(payments, "charge_card").await;
    assert_eq!(charges.len(), 1);
    assert_eq!((charges[0].1.as_str(), charges[0].2), ("succeeded", 1));
    let sent = commands(&env, "charge_card").await;
    assert_eq!(
        sent,
        vec![(charges[0].0, 1, "succeeded".into())],
        "sent once"
    );

    restarted.kill().expect("stop the service");
    let _ = restarted.wait();
    stop(env, app, services).await;
}

#[actix_rt::test]
async fn a_service_down_longer_than_the_reply_timeout_gets_the_same_command_again_and_the_saga_completes()
 {
    let env = TestEnv::new(order_services_with(&[
        timeouts(400),
        ("max_attempts: 3", "max_attempts: 20".into()),
    ]))
    .await;
    let mut services = Services::new(&env).await;
    services.start(&env, Sample::Stock);
    services.start(&env, Sample::Shipping);
    let app = env.start_app().await;
    env.publish_starts(vec![order("order-d")]).await;

    // Given payments is down while skald's reply timer fires, and re-sends.
    until(Duration::from_secs(20), || async {
        commands(&env, "charge_card")
            .await
            .first()
            .is_some_and(|c| c.1 >= 3)
    })
    .await;
    let waiting = commands(&env, "charge_card").await;
    assert!(waiting.len() == 1 && waiting[0].1 >= 3, "{waiting:?}");

    // When it comes back: every copy has the same id, one runs, the saga completes.
    services.start(&env, Sample::Payments);
    env.wait_for_terminal(1, Duration::from_secs(30)).await;
    assert_eq!(the_instance(&env).await.1, "completed");
    let payments = services.pool(Sample::Payments);
    assert_eq!(
        scalar(payments, "SELECT count(*) FROM payments.payments").await,
        1
    );
    assert_eq!(
        alice_balance(&services).await,
        SEED * 100 - 2550,
        "one effect"
    );
    let charges = processed(payments, "charge_card").await;
    assert_eq!(charges.len(), 1, "one command id: {charges:?}");
    assert_eq!(charges[0].0, waiting[0].0, "the command skald re-sent");
    assert_eq!(commands(&env, "charge_card").await.len(), 1);

    stop(env, app, services).await;
}

#[actix_rt::test]
async fn a_refusal_at_the_third_service_compensates_the_first_two_in_reverse_back_to_their_state_before()
 {
    let env = TestEnv::new(order_services_with(&[])).await;
    let mut services = Services::new(&env).await;
    // Given the warehouse refuses to ship (a rule of the shipping service's database:
    // SQLSTATE class 22, a fatal error for the handler).
    let shipping = services.pool(Sample::Shipping).clone();
    refuse(
        &shipping,
        "shipping.shipments",
        "INSERT",
        "22023",
        "the warehouse is closed",
    )
    .await;
    for sample in SAMPLES {
        services.start(&env, sample);
    }
    let app = env.start_app().await;
    env.publish_starts(vec![order("order-r")]).await;
    env.wait_for_terminal(1, Duration::from_secs(60)).await;

    assert_eq!(the_instance(&env).await.1, "compensated");
    // The first two services' databases are as before the saga (their records kept).
    assert_eq!(stock_available(&services).await, SEED);
    assert_eq!(alice_balance(&services).await, SEED * 100);
    let released = "SELECT count(*) FROM stock.reservations WHERE released";
    assert_eq!(scalar(services.pool(Sample::Stock), released).await, 1);
    let refunded = "SELECT count(*) FROM payments.payments WHERE refunded";
    assert_eq!(scalar(services.pool(Sample::Payments), refunded).await, 1);
    assert_eq!(
        scalar(&shipping, "SELECT count(*) FROM shipping.shipments").await,
        0
    );
    let refusal = processed(&shipping, "create_shipment").await;
    assert_eq!(refusal.len(), 1);
    assert_eq!(refusal[0].1, "fatal");
    // In reverse: the refund was answered before the release was sent.
    let (refund_answered, release_sent): (
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    ) = sqlx::query_as(
        "SELECT (SELECT answered_at FROM skald.commands WHERE type = 'refund_card'), \
                    (SELECT sent_at FROM skald.commands WHERE type = 'release_stock')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(refund_answered <= release_sent, "refund, then release");
    for (sample, kind) in [
        (Sample::Payments, "refund_card"),
        (Sample::Stock, "release_stock"),
    ] {
        let undo = processed(services.pool(sample), kind).await;
        assert_eq!(undo.len(), 1, "{kind}");
        assert_eq!(undo[0].1, "succeeded", "{kind}");
    }

    stop(env, app, services).await;
}

#[actix_rt::test]
async fn a_compensation_exhausted_at_a_service_parks_the_saga_and_a_replay_after_the_fix_finishes_it()
 {
    let env = TestEnv::new(order_services_with(&[timeouts(30_000)])).await;
    let mut services = Services::new(&env).await;
    let stock = services.pool(Sample::Stock).clone();
    // Given the stock service cannot release (a lock it keeps meeting: retryable), and
    // the card is declined (an unknown account: fatal).
    refuse(
        &stock,
        "stock.reservations",
        "UPDATE",
        "55P03",
        "reservation locked",
    )
    .await;
    for sample in SAMPLES {
        services.start(&env, sample);
    }
    let app = env.start_app().await;
    let mut declined = order("order-x");
    declined.payload["account"] = json!("mallory");
    env.publish_starts(vec![declined]).await;

    // Then the instance is parked: skald's dead letter holds the whole history ...
    env.wait_for_terminal(1, Duration::from_secs(60)).await;
    let (id, status) = the_instance(&env).await;
    assert_eq!(status, "failed");
    let (letter, history): (Uuid, String) = sqlx::query_as(
        "SELECT id, convert_from(body, 'UTF8') FROM skald.dead_letters \
         WHERE instance_id = $1 AND kind = 'compensation_failed'",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .expect("skald's dead letter");
    assert!(history.contains("unknown account"), "{history}");
    assert!(history.contains("replied exhausted"), "{history}");
    // ... and the stock service's, the side that failed, every try's error.
    let (code, errors): (String, sqlx::types::Json<Vec<serde_json::Value>>) = sqlx::query_as(
        "SELECT reason_code, errors FROM skald_participant.dead_letters WHERE status = 'pending'",
    )
    .fetch_one(&stock)
    .await
    .expect("the service's dead letter");
    assert_eq!(code, "exhausted");
    assert_eq!(
        errors.0.len(),
        5,
        "the default policy's 5 tries: {:?}",
        errors.0
    );
    assert!(errors.0.iter().all(|e| {
        e["message"]
            .as_str()
            .unwrap()
            .contains("reservation locked")
    }));
    assert_eq!(stock_available(&services).await, SEED - 2, "still reserved");

    // When the fault is fixed and the operator replays skald's dead letter: the release
    // is sent as a new attempt (a new command id), runs, and the saga is compensated.
    sqlx::raw_sql("DROP TRIGGER refuse ON stock.reservations")
        .execute(&stock)
        .await
        .unwrap();
    let out = env.skald_ok(&["dlq", "replay", &letter.to_string(), "--by", "ops"]);
    assert!(out.contains("replayed"), "{out}");
    until(Duration::from_secs(30), || async {
        the_instance(&env).await.1 == "compensated"
    })
    .await;
    assert_eq!(the_instance(&env).await.1, "compensated");
    assert_eq!(stock_available(&services).await, SEED, "released once");
    let releases = commands(&env, "release_stock").await;
    assert_eq!(
        releases.len(),
        2,
        "attempt 1 exhausted, attempt 2 applied: {releases:?}"
    );
    assert_eq!(releases[1].2, "succeeded");

    // The service's own letter is then only a record: replaying it too (the same
    // command id) changes nothing, its reply is recorded but never applied.
    let replay = [
        "participant",
        "dead-letters",
        "list",
        "--service",
        "stock",
        "--database-url",
        services.url(Sample::Stock),
        "--json",
    ];
    let listed: serde_json::Value =
        serde_json::from_str(env.skald_ok(&replay).lines().next().unwrap()).unwrap();
    let service_letter = listed["id"].as_str().unwrap().to_string();
    env.skald_ok(&[
        "participant",
        "dead-letters",
        "replay",
        "--service",
        "stock",
        "--database-url",
        services.url(Sample::Stock),
        "--id",
        &service_letter,
    ]);
    until(Duration::from_secs(10), || async {
        processed(&stock, "release_stock")
            .await
            .iter()
            .filter(|p| p.1 == "succeeded")
            .count()
            == 2
    })
    .await;
    let copies = "SELECT count(*) FROM skald.replies WHERE disposition <> 'applied'";
    until(Duration::from_secs(10), || async {
        scalar(&env.pool, copies).await >= 1
    })
    .await;
    assert!(
        scalar(&env.pool, copies).await >= 1,
        "its reply recorded, not applied"
    );
    assert_eq!(
        stock_available(&services).await,
        SEED,
        "still released once"
    );
    assert_eq!(the_instance(&env).await.1, "compensated");

    stop(env, app, services).await;
}

#[actix_rt::test]
async fn garbage_at_a_service_is_dead_lettered_with_its_reason_while_the_service_keeps_working() {
    let env = TestEnv::new(order_services_with(&[])).await;
    let services = Services::running(&env).await;
    let app = env.start_app().await;

    // Given garbage published to the stock service's endpoint alongside a real order.
    let exchange = Endpoint::Service("stock".into()).prefix(&env.config.namespace);
    env.publish_raw_to(&exchange, "order-g", &[b"{not json".to_vec()])
        .await;
    env.publish_starts(vec![order("order-g")]).await;

    env.wait_for_terminal(1, Duration::from_secs(60)).await;
    assert_eq!(the_instance(&env).await.1, "completed");
    let stock = services.pool(Sample::Stock);
    let letters: Vec<(String, String)> =
        sqlx::query_as("SELECT reason_code, reason FROM skald_participant.dead_letters")
            .fetch_all(stock)
            .await
            .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].0, "malformed");
    assert!(letters[0].1.starts_with("malformed: "), "{}", letters[0].1);
    let dead_queue = format!("{exchange}.dead");
    until(Duration::from_secs(5), || async {
        env.queue_depth(&dead_queue).await == 1
    })
    .await;
    assert_eq!(
        env.queue_depth(&dead_queue).await,
        1,
        "its copy in the dead-letter queue"
    );

    stop(env, app, services).await;
}

#[actix_rt::test]
async fn a_command_the_service_cannot_handle_is_dead_lettered_there_and_the_saga_times_out_and_compensates()
 {
    // Given a saga deployed ahead of its service: payments has no `charge_card_v2`.
    let env = TestEnv::new(order_services_with(&[
        timeouts(300),
        ("type: charge_card\n", "type: charge_card_v2\n".into()),
    ]))
    .await;
    let services = Services::running(&env).await;
    let app = env.start_app().await;
    env.publish_starts(vec![order("order-u")]).await;

    // Then each send is set apart at the service, never answered; skald's policy (3
    // sends) runs out and the reservation is released.
    env.wait_for_terminal(1, Duration::from_secs(60)).await;
    assert_eq!(the_instance(&env).await.1, "compensated");
    let sent = commands(&env, "charge_card_v2").await;
    assert_eq!(
        (sent.len(), sent[0].1, sent[0].2.as_str()),
        (1, 3, "timed_out")
    );
    let payments = services.pool(Sample::Payments);
    let reasons: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT reason FROM skald_participant.dead_letters WHERE reason_code = 'unknown_type'",
    )
    .fetch_all(payments)
    .await
    .unwrap();
    assert_eq!(
        reasons,
        vec![
            r#"unknown type "charge_card_v2": service payments has no handler for it"#.to_string()
        ]
    );
    assert_eq!(
        scalar(payments, "SELECT count(*) FROM payments.payments").await,
        0
    );
    assert_eq!(stock_available(&services).await, SEED, "released");

    stop(env, app, services).await;
}

#[actix_rt::test]
async fn an_out_of_order_command_at_a_sample_service_is_discarded_and_recorded() {
    let env = TestEnv::new(order_services_with(&[])).await;
    let services = Services::running(&env).await;
    // Given two reservations for one aggregate, the later one (sequence 2) delivered
    // first, as skald or any publisher would send them.
    let reserve = |order_id: &str, sequence: u64| ServiceMessage {
        message_id: Uuid::new_v4(),
        kind: "reserve_stock".into(),
        aggregate_id: "basket-7".into(),
        sequence: Some(sequence),
        dispatched_at: None,
        payload: json!({"order_id": order_id, "sku": "SKU-1", "qty": 1})
            .as_object()
            .cloned()
            .unwrap(),
        reply_to: Some(ReplyTo {
            saga: "order_services".into(),
            saga_version: 1,
            instance_id: Uuid::new_v4(),
            cursor: Cursor::START,
        }),
        errors: vec![],
        traceparent: None,
    };
    let (newer, older) = (reserve("order-new", 2), reserve("order-old", 1));
    let transport = env.transport().await;
    for m in [&newer, &older] {
        transport
            .send_to(
                &Endpoint::Service("stock".into()),
                &m.aggregate_id,
                &m.to_body(),
            )
            .await
            .expect("sent");
    }
    transport.close().await;

    let stock = services.pool(Sample::Stock);
    until(Duration::from_secs(20), || async {
        scalar(stock, "SELECT count(*) FROM skald_participant.processed").await == 2
    })
    .await;
    let rows = processed(stock, "reserve_stock").await;
    let outcome = |id: Uuid| rows.iter().find(|r| r.0 == id).map(|r| (r.1.clone(), r.2));
    assert_eq!(outcome(newer.message_id), Some(("succeeded".into(), 1)));
    assert_eq!(
        outcome(older.message_id),
        Some(("stale".into(), 0)),
        "recorded, not run"
    );
    let orders: Vec<String> = sqlx::query_scalar("SELECT order_id FROM stock.reservations")
        .fetch_all(stock)
        .await
        .unwrap();
    assert_eq!(orders, vec!["order-new".to_string()]);
    assert_eq!(stock_available(&services).await, SEED - 1);

    services.stop_all().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn two_thousand_orders_over_fifty_aggregates_through_the_three_services_complete_in_aggregate_order()
 {
    const SAGAS: u64 = 2_000;
    const AGGREGATES: u64 = 50;
    let env = TestEnv::new(order_services_with(&[timeouts(60_000)])).await;
    let services = Services::running(&env).await;
    let app = env.start_app().await;
    // Order i belongs to customer i mod 50 (its aggregate), started in order i.
    let starts = (0..SAGAS)
        .map(|i| {
            let customer = format!("customer-{}", i % AGGREGATES);
            let payload = json!({"order_id": format!("order-{i}"), "sku": "SKU-2", "qty": 1,
                                 "account": "bob", "amount": 1});
            start("order_services", &customer, i / AGGREGATES, payload)
        })
        .collect();
    env.publish_starts(starts).await;
    env.wait_for_terminal(SAGAS as i64, Duration::from_secs(600))
        .await;

    assert_eq!(env.count_status("completed").await, SAGAS as i64);
    // One effect per step, in each service's own tables.
    let effects = [
        (Sample::Stock, "SELECT count(*) FROM stock.reservations"),
        (Sample::Payments, "SELECT count(*) FROM payments.payments"),
        (Sample::Shipping, "SELECT count(*) FROM shipping.shipments"),
    ];
    for (sample, sql) in effects {
        assert_eq!(
            scalar(services.pool(sample), sql).await,
            SAGAS as i64,
            "{sql}"
        );
    }
    assert_eq!(
        scalar(
            services.pool(Sample::Stock),
            "SELECT available::bigint FROM stock.items WHERE sku = 'SKU-2'"
        )
        .await,
        SEED - SAGAS as i64
    );
    // Per-aggregate order at every service: each customer's orders were handled in
    // the order they started, read from the service's processed rows.
    for sample in SAMPLES {
        let handled: Vec<(String, Uuid, String)> = sqlx::query_as(
            "SELECT aggregate_id, message_id, outcome FROM skald_participant.processed \
             ORDER BY processed_at",
        )
        .fetch_all(services.pool(sample))
        .await
        .unwrap();
        assert_eq!(handled.len() as u64, SAGAS, "{}", sample.name());
        let order_of: std::collections::HashMap<Uuid, i64> = sqlx::query_as::<_, (Uuid, String)>(
            "SELECT c.id, i.payload->>'order_id' FROM skald.commands c \
             JOIN skald.instances i ON i.id = c.instance_id",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap()
        .into_iter()
        .map(|(id, o)| (id, o.trim_start_matches("order-").parse().unwrap()))
        .collect();
        let mut last: std::collections::HashMap<String, i64> = Default::default();
        for (aggregate, message, outcome) in handled {
            assert_eq!(outcome, "succeeded", "{} {message}", sample.name());
            let n = order_of[&message];
            if let Some(prev) = last.insert(aggregate.clone(), n) {
                assert!(
                    n > prev,
                    "{}: {aggregate} order {n} handled after {prev}",
                    sample.name()
                );
            }
        }
    }

    stop(env, app, services).await;
}

#[actix_rt::test]
async fn bench_in_command_step_mode_reports_the_three_services_run_beside_the_sql_run() {
    let out = crate::helpers::skald_bench()
        .args(["--sagas", "30", "--aggregates", "5"])
        .args(["--steps", "command", "--json"])
        .output()
        .expect("run skald bench");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(report["completed"], 30, "the SQL-step run: {report}");
    let command = &report["command"];
    assert_eq!(command["completed"], 30, "{report}");
    let (p50, p99) = (
        command["p50_ms"].as_f64().unwrap(),
        command["p99_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < p50 && p50 <= p99, "{report}");
    let ratio =
        command["steps_per_s"].as_f64().unwrap() / report["baseline_msgs_per_s"].as_f64().unwrap();
    assert!(
        (command["ratio"].as_f64().unwrap() - ratio).abs() < 1e-9,
        "{report}"
    );
}

#[actix_rt::test]
async fn a_bench_run_that_cannot_finish_stops_at_its_timeout_and_says_what_finished() {
    // Given a command-step sample whose first service is one nobody runs: its sagas
    // wait for a reply that never comes.
    let sagas_dir = order_services_with(&[("service: stock", "service: nowhere".into())]);
    std::fs::copy(
        crate::helpers::sample_sagas().join("order_checkout.yaml"),
        sagas_dir.join("order_checkout.yaml"),
    )
    .unwrap();
    // When the bench runs both modes with a 30 s deadline.
    let timeout = Duration::from_secs(30);
    let began = std::time::Instant::now();
    let out = crate::helpers::skald_bench()
        .args(["--sagas", "20", "--aggregates", "5"])
        .args(["--steps", "command", "--json", "--timeout"])
        .arg(timeout.as_secs().to_string())
        .env("SKALD_SAGAS_DIR", &sagas_dir)
        .output()
        .expect("run skald bench");
    let took = began.elapsed();
    let _ = std::fs::remove_dir_all(&sagas_dir);
    // Then it stops at the deadline (plus its clean-up), exits 1, prints no report, and
    // says what finished and how far the command-step run got.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "no report: {stderr}");
    assert!(
        took < timeout + Duration::from_secs(20),
        "took {took:?}: {stderr}"
    );
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("an error line: {stderr}"));
    assert!(
        error.starts_with("error: bench timed out after 30 s (--timeout 30): finished: baseline "),
        "{error}"
    );
    assert!(
        error.contains("; SQL-step run: 20 of 20 sagas completed in "),
        "{error}"
    );
    assert!(
        error.ends_with("; unfinished: command-step run: 0 of 20 sagas terminal (0 completed)"),
        "{error}"
    );
}
