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
