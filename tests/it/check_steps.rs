//! A read-only `check` step needs no compensation: a rollback passes over it.

use std::time::Duration;

use serde_json::json;
use skald::envelope::instance_id_for;

use crate::helpers::{TestEnv, start, test_sagas};

/// `(step_name, phase, outcome)` of every applied attempt of `instance`, in order.
async fn attempts(env: &TestEnv, instance: uuid::Uuid) -> Vec<(String, String, String)> {
    env.attempts(instance, "step_name, phase, outcome").await
}

fn row(step: &str, phase: &str, outcome: &str) -> (String, String, String) {
    (step.into(), phase.into(), outcome.into())
}

#[actix_rt::test]
async fn a_rollback_passes_over_a_check_step_without_a_message_or_a_transaction() {
    let env = TestEnv::new(test_sagas()).await;
    let app = env.start_app().await;
    let payload = |ship: bool| json!({"order_id": "o-1", "customer": "alice", "ship": ship});
    let failing = start("checked_order", "o-1", 1, payload(false));
    let passing = start(
        "checked_order",
        "o-2",
        1,
        json!({"order_id": "o-2", "customer": "alice", "ship": true}),
    );
    let ids = env.publish_starts(vec![failing, passing]).await;
    env.wait_for_terminal(2, Duration::from_secs(30)).await;
    app.stop().await;

    let failed = instance_id_for(ids[0]);
    let status: String = sqlx::query_scalar("SELECT status FROM skald.instances WHERE id = $1")
        .bind(failed)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(status, "compensated");
    assert_eq!(
        attempts(&env, failed).await,
        [
            row("record_order", "forward", "succeeded"),
            row("customer_exists", "forward", "succeeded"),
            row("ship", "forward", "failed"),
            row("record_order", "compensate", "succeeded"),
        ],
        "the check was not compensated"
    );
    let check_compensations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM skald.inbox \
         WHERE step_name = 'customer_exists' AND phase = 'compensate'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        check_compensations, 0,
        "no message ever asked to undo the check"
    );
    let dead_letters: i64 = sqlx::query_scalar("SELECT count(*) FROM skald.dead_letters")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(dead_letters, 0);
    let cancelled: bool =
        sqlx::query_scalar("SELECT cancelled FROM it.checked_orders WHERE order_id = 'o-1'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(cancelled, "the step before the check was undone");
    assert_eq!(
        env.count_status("completed").await,
        1,
        "a passing check lets the saga complete"
    );
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_check_that_fails_compensates_the_steps_before_it() {
    let env = TestEnv::new(test_sagas()).await;
    let app = env.start_app().await;
    let ids = env
        .publish_starts(vec![start(
            "checked_order",
            "o-3",
            1,
            json!({"order_id": "o-3", "customer": "nobody", "ship": true}),
        )])
        .await;
    env.wait_for_terminal(1, Duration::from_secs(30)).await;
    app.stop().await;

    assert_eq!(env.count_status("compensated").await, 1);
    assert_eq!(
        attempts(&env, instance_id_for(ids[0])).await,
        [
            row("record_order", "forward", "succeeded"),
            row("customer_exists", "forward", "failed"),
            row("record_order", "compensate", "succeeded"),
        ]
    );
    env.cleanup().await;
}

#[actix_rt::test]
async fn the_dashboard_graph_compensates_past_a_check_step() {
    let env = TestEnv::new(test_sagas()).await;
    let app = env.start_app().await;
    let svc = crate::api::service(app.api.clone()).await;
    let (_, saga) = crate::api::get(&svc, "/api/v1/sagas/checked_order").await;
    let compensate: Vec<(String, String)> = saga["graph"]["edges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "compensate")
        .map(|e| {
            (
                e["from"].as_str().unwrap().to_string(),
                e["to"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // The pivot failing undoes record_order: the check between them has nothing to undo.
    assert_eq!(
        compensate,
        [
            ("customer_exists".to_string(), "record_order".to_string()),
            ("ship".to_string(), "record_order".to_string())
        ]
    );
    app.stop().await;
    env.cleanup().await;
}
