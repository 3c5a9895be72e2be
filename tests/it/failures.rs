//! Given a saga whose steps fail in a particular way, then retries, compensation,
//! parking and the dead-letter queue behave as promised (DESIGN.md promises 1 and 5).

use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use skald::envelope::{Outgoing, instance_id_for};
use uuid::Uuid;

use crate::helpers::{TestEnv, start, wait_child};

fn failing_sagas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/failing")
}

/// One attempt as recorded in the inbox.
#[derive(Debug, sqlx::FromRow)]
struct Attempt {
    step_name: String,
    phase: String,
    outcome: String,
    error_kind: Option<String>,
    started_at: DateTime<Utc>,
    finished_at: DateTime<Utc>,
    outgoing: sqlx::types::Json<Vec<Outgoing>>,
}

async fn attempts(env: &TestEnv, instance: Uuid) -> Vec<Attempt> {
    env.attempts(
        instance,
        "step_name, phase, outcome, error_kind, started_at, finished_at, outgoing",
    )
    .await
}

fn summary(attempts: &[Attempt]) -> Vec<String> {
    attempts
        .iter()
        .map(|a| {
            format!(
                "{} {} {}{}",
                a.step_name,
                a.phase,
                a.outcome,
                a.error_kind
                    .as_deref()
                    .map(|k| format!(" {k}"))
                    .unwrap_or_default()
            )
        })
        .collect()
}

async fn status_of(env: &TestEnv, instance: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM skald.instances WHERE id = $1")
        .bind(instance)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn start_one(env: &TestEnv, saga: &str) -> Uuid {
    let ids = env
        .publish_starts(vec![start(saga, "k-1", 1, json!({"key": "k-1"}))])
        .await;
    instance_id_for(ids[0])
}

/// Runs one instance of `saga` in a fresh skald until it is terminal.
async fn run_to_end(env: &TestEnv, saga: &str) -> Uuid {
    let app = env.start_app().await;
    let instance = start_one(env, saga).await;
    env.wait_for_terminal(1, Duration::from_secs(30)).await;
    app.stop().await;
    instance
}

#[actix_rt::test]
async fn a_step_failing_twice_then_succeeding_completes_after_delayed_retries() {
    let env = TestEnv::new(failing_sagas()).await;
    let instance = run_to_end(&env, "flaky").await;

    assert_eq!(status_of(&env, instance).await, "completed");
    let attempts = attempts(&env, instance).await;
    assert_eq!(
        summary(&attempts),
        [
            "one forward succeeded",
            "two forward failed retryable",
            "two forward failed retryable",
            "two forward succeeded"
        ]
    );
    // The policy says 300 ms between attempts (fixed, no jitter): never sooner.
    for pair in attempts[1..].windows(2) {
        let waited = pair[1].started_at - pair[0].finished_at;
        assert!(
            waited >= chrono::Duration::milliseconds(300),
            "retry after {waited:?}"
        );
    }
    // The retry message carries the whole error history, in order.
    let retry = &attempts[2].outgoing.0[0];
    let history: Vec<(String, u32)> = retry
        .envelope
        .errors
        .iter()
        .map(|e| (e.step.clone(), e.attempt))
        .collect();
    assert_eq!(history, [("two".to_string(), 1), ("two".to_string(), 2)]);
    assert_eq!(retry.delay_ms, 300);
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_fatal_failure_in_step_three_compensates_two_then_one_without_retrying() {
    let env = TestEnv::new(failing_sagas()).await;
    let instance = run_to_end(&env, "fatal_third").await;

    assert_eq!(status_of(&env, instance).await, "compensated");
    assert_eq!(
        summary(&attempts(&env, instance).await),
        [
            "one forward succeeded",
            "two forward succeeded",
            "three forward failed fatal",
            "two compensate succeeded",
            "one compensate succeeded"
        ]
    );
    let undone: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT step, undo_seq FROM ft.effects ORDER BY undo_seq")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let order: Vec<&str> = undone.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(order, ["two", "one"], "compensated in reverse order");
    assert!(
        undone.iter().all(|(_, seq)| seq.is_some()),
        "every effect undone"
    );
    env.cleanup().await;
}

async fn dead_letters(env: &TestEnv) -> Vec<(Uuid, String, String, Value)> {
    sqlx::query_as("SELECT id, kind, status, history FROM skald.dead_letters ORDER BY created_at")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

async fn open_gate(env: &TestEnv) {
    sqlx::query("UPDATE ft.gate SET open = true")
        .execute(&env.pool)
        .await
        .unwrap();
}

#[actix_rt::test]
async fn a_compensation_failing_for_good_parks_the_saga_and_a_replay_finishes_it_once() {
    let env = TestEnv::new(failing_sagas()).await;
    let app = env.start_app().await;
    let instance = start_one(&env, "bad_compensation").await;
    env.wait_for_terminal(1, Duration::from_secs(30)).await;

    assert_eq!(status_of(&env, instance).await, "failed");
    let letters = dead_letters(&env).await;
    assert_eq!(letters.len(), 1);
    let (letter, kind, status, history) = &letters[0];
    assert_eq!(
        (kind.as_str(), status.as_str()),
        ("compensation_failed", "pending")
    );
    let history: Vec<String> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| format!("{} {} {}", h["step"], h["phase"], h["attempt"]).replace('"', ""))
        .collect();
    assert_eq!(
        history,
        ["two forward 1", "one compensate 1", "one compensate 2"],
        "the whole error history"
    );
    assert_eq!(env.dead_letter_depth().await, 1);

    // Fix the cause, then replay through the CLI, twice.
    open_gate(&env).await;
    let replay = || env.skald_ok(&["dlq", "replay", &letter.to_string(), "--by", "test"]);
    assert!(replay().starts_with("replayed"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while status_of(&env, instance).await != "compensated" {
        assert!(
            std::time::Instant::now() < deadline,
            "replay did not finish the saga"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(replay().contains("already replayed"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.stop().await;

    let compensations: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM skald.inbox WHERE instance_id = $1 \
         AND phase = 'compensate' AND outcome = 'succeeded'",
    )
    .bind(instance)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(compensations, 1, "the second replay ran nothing");
    assert_eq!(status_of(&env, instance).await, "compensated");
    let (status, by): (String, String) =
        sqlx::query_as("SELECT status, resolved_by FROM skald.dead_letters WHERE id = $1")
            .bind(letter)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((status.as_str(), by.as_str()), ("replayed", "test"));
    env.cleanup().await;
}

#[actix_rt::test]
async fn kill_9_while_a_retry_waits_loses_nothing() {
    let env = TestEnv::new(failing_sagas()).await;
    let instance = start_one(&env, "gated").await;
    let mut child = env.spawn_process(&[]);
    // Wait until step two has failed once: its retry now waits in a delay queue.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let failed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM skald.inbox WHERE instance_id = $1 AND outcome = 'failed'",
        )
        .bind(instance)
        .fetch_one(&env.pool)
        .await
        .unwrap_or(0);
        if failed > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "step two never failed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    child.kill().unwrap(); // SIGKILL
    let status = wait_child(&mut child, Duration::from_secs(10));
    assert!(!status.success());

    open_gate(&env).await;
    let app = env.start_app().await;
    env.wait_for_terminal(1, Duration::from_secs(60)).await;
    app.stop().await;
    assert_eq!(status_of(&env, instance).await, "completed");
    let effects: Vec<(String, i64)> =
        sqlx::query_as("SELECT step, count(*) FROM ft.effects GROUP BY step ORDER BY step")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(effects, [("one".to_string(), 1), ("two".to_string(), 1)]);
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_step_over_its_timeout_is_cancelled_and_retried_then_compensated() {
    let env = TestEnv::new(failing_sagas()).await;
    let instance = run_to_end(&env, "slow_step").await;

    assert_eq!(status_of(&env, instance).await, "compensated");
    let attempts = attempts(&env, instance).await;
    assert_eq!(
        summary(&attempts),
        [
            "one forward succeeded",
            "two forward failed retryable",
            "two forward failed retryable",
            "one compensate succeeded"
        ]
    );
    for a in &attempts[1..3] {
        let took = a.finished_at - a.started_at;
        assert!(
            took < chrono::Duration::milliseconds(1500),
            "cancelled early: {took:?}"
        );
    }
    let error: String = sqlx::query_scalar(
        "SELECT error FROM skald.inbox WHERE instance_id = $1 AND outcome = 'failed' LIMIT 1",
    )
    .bind(instance)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(error.contains("statement timeout"), "{error}");
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_saga_past_its_deadline_stops_going_forward_and_compensates() {
    let env = TestEnv::new(failing_sagas()).await;
    let instance = run_to_end(&env, "saga_timeout").await;

    assert_eq!(status_of(&env, instance).await, "compensated");
    let attempts = attempts(&env, instance).await;
    let summary = summary(&attempts);
    assert_eq!(
        summary.first().map(String::as_str),
        Some("one forward succeeded")
    );
    assert_eq!(
        summary.last().map(String::as_str),
        Some("one compensate succeeded")
    );
    assert_eq!(
        summary[summary.len() - 2],
        "two forward failed fatal",
        "the attempt after the deadline is fatal: {summary:?}"
    );
    let last_error: String = sqlx::query_scalar(
        "SELECT error FROM skald.inbox WHERE instance_id = $1 AND error_kind = 'fatal'",
    )
    .bind(instance)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(last_error.contains("timed out"), "{last_error}");
    env.cleanup().await;
}

#[actix_rt::test]
async fn an_operator_retry_after_the_deadline_keeps_the_deadline_and_compensates() {
    let env = TestEnv::new(failing_sagas()).await;
    let app = env.start_app().await;
    let instance = start_one(&env, "deadline_retry").await;
    // Step two fails once; its next try would come 20 s later.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while attempts(&env, instance).await.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "step two never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    open_gate(&env).await;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    // The operator runs it now, past the saga's deadline: the message the action sends
    // must carry the deadline, so the step does not go forward.
    skald::operator::retry_now(&app.api.store, app.api.transport.as_ref(), instance, "test")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !["compensated", "completed", "failed"]
        .contains(&status_of(&env, instance).await.as_str())
    {
        assert!(std::time::Instant::now() < deadline, "retry did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status_of(&env, instance).await, "compensated");
    let summary = summary(&attempts(&env, instance).await);
    assert_eq!(
        summary,
        [
            "one forward succeeded",
            "two forward failed retryable",
            "two forward failed fatal",
            "one compensate succeeded"
        ]
    );
    app.stop().await;
    env.cleanup().await;
}
