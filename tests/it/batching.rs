//! Steps of several aggregates share one transaction (a batch): given many aggregates
//! ready at once, when a step of the batch fails, or the process dies in the middle of
//! a batch, then nothing is lost, nothing is doubled, and only the failing step is
//! undone.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use skald::config::TransportKind;

use crate::helpers::{TestEnv, on_every_transport, start, test_sagas, wait_child};

/// Aggregates started at once in each scenario: several batches' worth of steps.
const AGGREGATES: u64 = 24;

fn batch_sagas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/batch_sagas")
}

/// Effects per (aggregate, step) that appear other than exactly once.
async fn effects_not_once(env: &TestEnv) -> Vec<(String, String, i64)> {
    sqlx::query_as(
        "SELECT aggregate_id, step, count(*) FROM it.effects \
         GROUP BY aggregate_id, step HAVING count(*) <> 1 ORDER BY 1, 2",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

async fn effects_of(env: &TestEnv, step: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM it.effects WHERE step = $1")
        .bind(step)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// The `mixed` saga's effects on `aggregate`, in the order they were applied.
async fn mixed_effects(env: &TestEnv, aggregate: &str) -> Vec<String> {
    sqlx::query_scalar("SELECT step FROM it.mixed_effects WHERE aggregate_id = $1 ORDER BY id")
        .bind(aggregate)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

async fn status_of(env: &TestEnv, aggregate: &str) -> String {
    sqlx::query_scalar("SELECT status FROM skald.instances WHERE aggregate_id = $1")
        .bind(aggregate)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// One `ordered` saga on each of [`AGGREGATES`] aggregates, queued before skald runs.
async fn queue_many_aggregates(env: &TestEnv) {
    let starts = (0..AGGREGATES)
        .map(|i| {
            let account = format!("acct-{i}");
            start(
                "ordered",
                &account,
                1,
                json!({"account": account, "seq": 1}),
            )
        })
        .collect();
    env.publish_starts(starts).await;
}

/// Runs `skald run` with `SKALD_CRASH_AT=<crash_at>` over many aggregates' sagas, lets
/// it abort in the middle of a batch, restarts skald, and checks that every saga
/// completes with exactly one effect per step.
/// `committed_before_recovery` checks the effects of `second` left by the crash.
async fn crash_in_a_batch_then_recover(
    transport: TransportKind,
    crash_at: &str,
    committed_before_recovery: impl Fn(i64) -> bool,
) -> TestEnv {
    let env = TestEnv::on(transport, test_sagas()).await;
    queue_many_aggregates(&env).await;

    let mut child = env.spawn_process(&[("SKALD_CRASH_AT", crash_at)]);
    let status = wait_child(&mut child, Duration::from_secs(60));
    assert!(
        !status.success(),
        "the process must have crashed: {status:?}"
    );
    assert_eq!(
        effects_not_once(&env)
            .await
            .iter()
            .filter(|e| e.2 > 1)
            .count(),
        0,
        "no effect twice, even before recovery"
    );
    let second = effects_of(&env, "second").await;
    assert!(
        committed_before_recovery(second),
        "{second} `second` effects committed before the crash"
    );

    let app = env.start_app().await;
    env.wait_for_terminal(AGGREGATES as i64, Duration::from_secs(60))
        .await;
    app.stop().await;

    let statuses = env.statuses().await;
    assert_eq!(statuses.len(), AGGREGATES as usize);
    assert!(
        statuses.iter().all(|(_, s)| s == "completed"),
        "every saga completes: {statuses:?}"
    );
    assert_eq!(
        effects_not_once(&env).await,
        vec![],
        "exactly one effect per step of every aggregate"
    );
    assert_eq!(effects_of(&env, "third").await, AGGREGATES as i64);
    assert_eq!(env.intake_depth().await, 0);
    env
}

on_every_transport!(a_crash_before_a_batch_commits_loses_its_batch_mates_work_and_recovers_it);
async fn a_crash_before_a_batch_commits_loses_its_batch_mates_work_and_recovers_it(
    transport: TransportKind,
) {
    // The first `second` step to reach its commit kills the process: whatever its
    // batch-mates did is rolled back with it, and redelivered.
    let env = crash_in_a_batch_then_recover(transport, "before_commit:second", |n| n == 0).await;
    env.cleanup().await;
}

on_every_transport!(a_crash_after_a_batch_commits_before_its_publishes_is_recovered);
async fn a_crash_after_a_batch_commits_before_its_publishes_is_recovered(transport: TransportKind) {
    // The whole batch committed; the messages for `third` of its steps were not all
    // published: the redelivered `second` messages send them again, running nothing.
    let env = crash_in_a_batch_then_recover(transport, "after_commit:second", |n| n >= 1).await;
    env.cleanup().await;
}

on_every_transport!(a_crash_after_a_batchs_publishes_before_its_acks_is_recovered);
async fn a_crash_after_a_batchs_publishes_before_its_acks_is_recovered(transport: TransportKind) {
    let env = crash_in_a_batch_then_recover(transport, "after_publish:second", |n| n >= 1).await;
    env.cleanup().await;
}

on_every_transport!(one_failing_step_in_a_batch_rolls_back_alone_while_its_batch_mates_commit);
async fn one_failing_step_in_a_batch_rolls_back_alone_while_its_batch_mates_commit(
    transport: TransportKind,
) {
    // Given many aggregates ready at once: one whose `charge` fails fatally, one whose
    // `charge` hits a serialization failure once, the others fine.
    let env = TestEnv::on(transport, batch_sagas()).await;
    let mode = |i: u64| match i {
        3 => "fatal",
        7 => "serial",
        _ => "ok",
    };
    let starts = (0..AGGREGATES)
        .map(|i| {
            let account = format!("acct-{i}");
            start(
                "mixed",
                &account,
                1,
                json!({"account": account, "mode": mode(i)}),
            )
        })
        .collect();
    env.publish_starts(starts).await;

    // When skald runs them.
    let app = env.start_app().await;
    env.wait_for_terminal(AGGREGATES as i64, Duration::from_secs(60))
        .await;
    let stats = app.engine.stats();
    let (batches, steps, largest) = (
        stats.batches.load(Ordering::Relaxed),
        stats.batched_steps.load(Ordering::Relaxed),
        stats.largest_batch.load(Ordering::Relaxed),
    );
    app.stop().await;

    // Then the steps did share transactions...
    assert!(
        largest >= 2 && batches < steps,
        "steps were batched: {batches} batches of {steps} steps, largest {largest}"
    );
    // ...the failing aggregate compensated, its failed charge leaving no effect...
    assert_eq!(
        mixed_effects(&env, "acct-3").await,
        ["reserve", "unreserve"]
    );
    assert_eq!(status_of(&env, "acct-3").await, "compensated");
    // ...the one that met a serialization failure was retried and completed, its
    // undone try leaving nothing...
    assert_eq!(
        mixed_effects(&env, "acct-7").await,
        ["reserve", "charge", "ship"]
    );
    assert_eq!(status_of(&env, "acct-7").await, "completed");
    let charge_attempts: Vec<(String, String)> = sqlx::query_as(
        "SELECT i.outcome, coalesce(i.error_kind, '') FROM skald.inbox i \
           JOIN skald.instances s ON s.id = i.instance_id \
          WHERE s.aggregate_id = 'acct-7' AND i.step_name = 'charge' ORDER BY i.finished_at",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        charge_attempts,
        [
            ("failed".to_string(), "retryable".to_string()),
            ("succeeded".to_string(), String::new())
        ]
    );
    // ...and every other aggregate committed each step once, in order.
    for i in (0..AGGREGATES).filter(|i| mode(*i) == "ok") {
        let account = format!("acct-{i}");
        assert_eq!(
            mixed_effects(&env, &account).await,
            ["reserve", "charge", "ship"],
            "{account}"
        );
        assert_eq!(status_of(&env, &account).await, "completed", "{account}");
    }
    env.cleanup().await;
}
