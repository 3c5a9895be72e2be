//! Given a saga and some messages, then this state: the core promises of one
//! process — effects happen once, order holds per aggregate, failures compensate.

use std::time::Duration;

use serde_json::json;
use skald::envelope::instance_id_for;

use skald::config::TransportKind;

use crate::helpers::{
    TestEnv, on_every_transport, ordered_starts, sample_sagas, start, test_sagas,
};

fn order(order_id: &str, sku: &str, qty: i64, account: &str, amount: f64) -> serde_json::Value {
    json!({"order_id": order_id, "sku": sku, "qty": qty, "account": account, "amount": amount})
}

on_every_transport!(a_checkout_completes_with_its_effects_and_drains_the_queue);
async fn a_checkout_completes_with_its_effects_and_drains_the_queue(transport: TransportKind) {
    let env = TestEnv::on(transport, sample_sagas()).await;
    let app = env.start_app().await;
    env.publish_starts(vec![start(
        "order_checkout",
        "order-1",
        1,
        order("order-1", "SKU-1", 3, "alice", 25.5),
    )])
    .await;
    env.wait_for_terminal(1, Duration::from_secs(30)).await;
    app.stop().await;

    let statuses = env.statuses().await;
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].1, "completed");
    let (stock, balance): (i32, f64) = sqlx::query_as(
        "SELECT (SELECT available FROM shop.stock WHERE sku = 'SKU-1'), \
                (SELECT balance::float8 FROM shop.accounts WHERE account_id = 'alice')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(stock, 1_000_000_000 - 3);
    assert_eq!(balance, 1_000_000_000.0 - 25.5);
    let rows: (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM shop.reservations WHERE order_id = 'order-1'), \
                (SELECT count(*) FROM shop.payments WHERE order_id = 'order-1'), \
                (SELECT count(*) FROM shop.shipments WHERE order_id = 'order-1')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(rows, (1, 1, 1));
    let attempts: Vec<(String, String)> =
        sqlx::query_as("SELECT step_name, outcome FROM skald.inbox WHERE disposition = 'applied' ORDER BY finished_at")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let expected: Vec<(String, String)> = ["reserve_stock", "charge_account", "create_shipment"]
        .iter()
        .map(|s| (s.to_string(), "succeeded".to_string()))
        .collect();
    assert_eq!(attempts, expected);
    assert_eq!(env.intake_depth().await, 0);
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_failed_payment_compensates_the_reservation() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    // bob cannot pay 2e9: charge_account affects 0 rows, a fatal business failure.
    env.publish_starts(vec![start(
        "order_checkout",
        "order-2",
        1,
        order("order-2", "SKU-2", 5, "bob", 2e9),
    )])
    .await;
    env.wait_for_terminal(1, Duration::from_secs(30)).await;
    app.stop().await;

    assert_eq!(env.statuses().await[0].1, "compensated");
    let (stock, released): (i32, bool) = sqlx::query_as(
        "SELECT (SELECT available FROM shop.stock WHERE sku = 'SKU-2'), \
                (SELECT released FROM shop.reservations WHERE order_id = 'order-2')",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(stock, 1_000_000_000, "the reserved stock is given back");
    assert!(released);
    let history: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
        "SELECT step_name, phase, outcome, error_kind FROM skald.inbox WHERE disposition = 'applied' ORDER BY finished_at",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let h = |s: &str, p: &str, o: &str, k: Option<&str>| {
        (
            s.to_string(),
            p.to_string(),
            o.to_string(),
            k.map(str::to_string),
        )
    };
    assert_eq!(
        history,
        vec![
            h("reserve_stock", "forward", "succeeded", None),
            h("charge_account", "forward", "failed", Some("fatal")),
            h("reserve_stock", "compensate", "succeeded", None),
        ]
    );
    env.cleanup().await;
}

#[actix_rt::test]
async fn the_same_start_message_twice_makes_one_instance_with_one_effect_per_step() {
    let env = TestEnv::new(test_sagas()).await;
    let msg = start(
        "ordered",
        "acct-1",
        1,
        json!({"account": "acct-1", "seq": 1}),
    );
    // Published twice before skald consumes: both copies are in the queue.
    env.publish_starts(vec![msg.clone(), msg.clone()]).await;
    let app = env.start_app().await;
    env.wait_for_terminal(1, Duration::from_secs(30)).await;
    // The second copy must be disposed of, not left in the queue.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app
        .engine
        .stats()
        .duplicates
        .load(std::sync::atomic::Ordering::Relaxed)
        < 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "duplicate never recognised"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;

    let statuses = env.statuses().await;
    assert_eq!(statuses.len(), 1, "one instance");
    assert_eq!(
        statuses[0],
        (instance_id_for(msg.message_id), "completed".to_string())
    );
    let per_step: Vec<(String, i64)> =
        sqlx::query_as("SELECT step, count(*) FROM it.effects GROUP BY step ORDER BY step")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        per_step,
        vec![
            ("first".into(), 1),
            ("second".into(), 1),
            ("third".into(), 1)
        ]
    );
    assert_eq!(env.intake_depth().await, 0);
    env.cleanup().await;
}

on_every_transport!(
    two_thousand_sagas_over_fifty_aggregates_complete_in_publish_order_per_aggregate
);
async fn two_thousand_sagas_over_fifty_aggregates_complete_in_publish_order_per_aggregate(
    transport: TransportKind,
) {
    const SAGAS: u64 = 2_000;
    const AGGREGATES: u64 = 50;
    let env = TestEnv::on(transport, test_sagas()).await;
    env.publish_starts(ordered_starts(SAGAS, AGGREGATES)).await;
    let app = env.start_app().await;
    env.wait_for_terminal(SAGAS as i64, Duration::from_secs(240))
        .await;
    app.stop().await;

    assert_eq!(env.count_status("completed").await, SAGAS as i64);
    env.assert_ordered_effects(SAGAS * 3).await;
    env.cleanup().await;
}
