//! Promise 1: losing PostgreSQL or RabbitMQ connections mid-run changes how long the
//! sagas take, never their outcome: all complete, one effect per step, in order.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::helpers::{TestEnv, ordered_starts, test_sagas};

const SAGAS: u64 = 600;
const AGGREGATES: u64 = 30;

async fn publish(env: &TestEnv, sagas: u64) {
    env.publish_starts(ordered_starts(sagas, AGGREGATES)).await;
}

async fn effects(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM it.effects")
        .fetch_one(&env.pool)
        .await
        .unwrap_or(0)
}

#[actix_rt::test]
async fn killing_postgres_connections_mid_run_changes_nothing_but_time() {
    let env = TestEnv::new(test_sagas()).await;
    publish(&env, SAGAS).await;
    let app = env.start_app().await;
    // Five times, once some work is done, cut every connection to the test database
    // (skald's included, mid-transaction) but the one doing the cutting.
    for _ in 0..5 {
        while effects(&env).await == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .execute(&env.pool)
        .await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    env.wait_for_terminal(SAGAS as i64, Duration::from_secs(120))
        .await;
    assert!(
        app.engine.stats().infra_retries.load(Ordering::Relaxed) > 0,
        "the connections were cut while skald worked"
    );
    app.stop().await;
    assert_eq!(env.count_status("completed").await, SAGAS as i64);
    env.assert_ordered_effects(SAGAS * 3).await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn losing_the_broker_connection_mid_run_changes_nothing_but_time() {
    // More sagas: closing takes `rabbitmqctl` a second or two, and work must remain.
    const MANY: u64 = 3 * SAGAS;
    let env = TestEnv::new(test_sagas()).await;
    publish(&env, MANY).await;
    let app = env.start_app().await;
    while effects(&env).await < 100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let connections = env.transport_connections().await;
    assert!(
        !connections.is_empty(),
        "skald's transport connection is found"
    );
    env.kill_transport_connections(&connections).await;
    assert!(
        effects(&env).await < (MANY * 3) as i64,
        "the connection must close while work remains"
    );
    env.wait_for_terminal(MANY as i64, Duration::from_secs(180))
        .await;
    app.stop().await;
    assert_eq!(env.count_status("completed").await, MANY as i64);
    env.assert_ordered_effects(MANY * 3).await;
    env.cleanup().await;
}
