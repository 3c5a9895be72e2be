//! Given two sagas started back to back on one aggregate, then their steps
//! interleave by default, and run one saga after the other with
//! `isolation: exclusive`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use skald::envelope::instance_id_for;
use uuid::Uuid;

use crate::helpers::{TestEnv, start};

fn isolation_sagas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/isolation")
}

/// Starts `saga` three times on one account; returns the order in which effects
/// were applied, as (instance index, step).
async fn run_three(saga: &str) -> Vec<(usize, String)> {
    let env = TestEnv::new(isolation_sagas()).await;
    let ids = env
        .publish_starts(
            (1..=3)
                .map(|seq| start(saga, "acct-1", seq, json!({"account": "acct-1"})))
                .collect(),
        )
        .await;
    let instances: Vec<Uuid> = ids.into_iter().map(instance_id_for).collect();
    let app = env.start_app().await;
    env.wait_for_terminal(3, Duration::from_secs(30)).await;
    app.stop().await;
    let completed = env.count_status("completed").await;
    assert_eq!(completed, 3);
    let effects: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT instance_id, step FROM iso.effects WHERE saga = $1 ORDER BY id")
            .bind(saga)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    env.cleanup().await;
    effects
        .into_iter()
        .map(|(id, step)| (instances.iter().position(|i| *i == id).unwrap(), step))
        .collect()
}

fn steps_of(effects: &[(usize, String)]) -> Vec<usize> {
    effects.iter().map(|(i, _)| *i).collect()
}

#[actix_rt::test]
async fn by_default_sagas_on_one_aggregate_interleave_their_steps() {
    let effects = run_three("transfer").await;
    assert_eq!(effects.len(), 9);
    assert_ne!(
        steps_of(&effects),
        [0, 0, 0, 1, 1, 1, 2, 2, 2],
        "steps interleave: {effects:?}"
    );
}

#[actix_rt::test]
async fn exclusive_sagas_on_one_aggregate_run_one_after_another_in_start_order() {
    let effects = run_three("locked_transfer").await;
    assert_eq!(
        steps_of(&effects),
        [0, 0, 0, 1, 1, 1, 2, 2, 2],
        "one saga at a time, in start order: {effects:?}"
    );
}

#[actix_rt::test]
async fn cancelling_the_lock_holder_passes_the_lock_on_and_cancelling_a_waiter_does_not() {
    let env =
        TestEnv::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/failing")).await;
    let app = env.start_app().await;
    let ids: Vec<Uuid> = env
        .publish_starts(
            (1..=3)
                .map(|seq| start("locked_gated", "k", seq, json!({"key": "k"})))
                .collect(),
        )
        .await
        .into_iter()
        .map(instance_id_for)
        .collect();
    let status = |id: Uuid| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM skald.instances WHERE id = $1")
                .bind(id)
                .fetch_optional(&pool)
                .await
                .unwrap()
                .unwrap_or_default()
        }
    };
    // The first holds the lock (its step one keeps failing); the others wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while status(ids[2]).await != "waiting" || status(ids[1]).await != "waiting" {
        assert!(std::time::Instant::now() < deadline, "starts never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let api = &app.api;
    let cancel = |id: Uuid| {
        skald::operator::cancel(
            &api.store,
            api.engine.catalog(),
            api.transport.as_ref(),
            id,
            "test",
        )
    };
    // Cancelling a waiter: it ends, and nobody else is let in while the holder runs.
    cancel(ids[1]).await.unwrap();
    assert_eq!(status(ids[1]).await, "compensated");
    assert_eq!(status(ids[2]).await, "waiting");
    // Cancelling the holder (nothing done yet): the lock passes to the next waiter.
    sqlx::query("UPDATE ft.gate SET open = true")
        .execute(&env.pool)
        .await
        .unwrap();
    cancel(ids[0]).await.unwrap();
    env.wait_for_terminal(3, Duration::from_secs(30)).await;
    app.stop().await;
    assert_eq!(status(ids[0]).await, "compensated");
    assert_eq!(status(ids[2]).await, "completed");
    let ran: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT instance_id FROM ft.effects")
        .fetch_all(&env.pool)
        .await
        .unwrap();
    assert_eq!(ran, [ids[2]], "only the promoted instance ran its steps");
    env.cleanup().await;
}
