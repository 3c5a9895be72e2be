//! Given a saga and a crash between a step's commit and its ack, then the
//! redelivered message causes no second effect and the saga still completes.

use std::time::Duration;

use serde_json::json;

use skald::config::TransportKind;

use crate::helpers::{TestEnv, on_every_transport, start, test_sagas, wait_child};

async fn effects_per_step(env: &TestEnv) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT step, count(*) FROM it.effects GROUP BY step ORDER BY step")
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

/// Runs `skald run` with `SKALD_CRASH_AT=<crash_at>`, lets it abort, then restarts
/// skald and checks that the saga completes with one effect per step.
async fn crash_then_recover(transport: TransportKind, crash_at: &str) {
    let env = TestEnv::on(transport, test_sagas()).await;
    env.publish_starts(vec![start(
        "ordered",
        "acct-1",
        1,
        json!({"account": "acct-1", "seq": 1}),
    )])
    .await;

    let mut child = env.spawn_process(&[("SKALD_CRASH_AT", crash_at)]);
    let status = wait_child(&mut child, Duration::from_secs(60));
    assert!(
        !status.success(),
        "the process must have crashed: {status:?}"
    );

    // `second` committed before the crash; `third` never ran.
    assert_eq!(
        effects_per_step(&env).await,
        vec![("first".into(), 1), ("second".into(), 1)]
    );
    let (state, step): (String, i32) = sqlx::query_as("SELECT status, step FROM skald.instances")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!((state.as_str(), step), ("running", 2));

    let app = env.start_app().await;
    env.wait_for_terminal(1, Duration::from_secs(30)).await;
    app.stop().await;

    assert_eq!(env.statuses().await[0].1, "completed");
    assert_eq!(
        effects_per_step(&env).await,
        vec![
            ("first".into(), 1),
            ("second".into(), 1),
            ("third".into(), 1)
        ],
        "exactly one effect per step"
    );
    assert_eq!(env.intake_depth().await, 0);
    env.cleanup().await;
}

on_every_transport!(a_crash_after_commit_before_publish_is_recovered_by_redelivery);
async fn a_crash_after_commit_before_publish_is_recovered_by_redelivery(transport: TransportKind) {
    // The message for `third` was never published: only the redelivered `second`
    // message (recognised by the inbox) can send it again.
    crash_then_recover(transport, "after_commit:second").await;
}

on_every_transport!(a_crash_after_publish_before_ack_is_recovered_without_a_second_effect);
async fn a_crash_after_publish_before_ack_is_recovered_without_a_second_effect(
    transport: TransportKind,
) {
    crash_then_recover(transport, "after_publish:second").await;
}

#[actix_rt::test]
async fn sigterm_drains_in_flight_work_exits_zero_and_loses_nothing() {
    const SAGAS: u64 = 300;
    let env = TestEnv::new(test_sagas()).await;
    let starts = (0..SAGAS)
        .map(|i| {
            let account = format!("acct-{}", i % 20);
            start(
                "ordered",
                &account,
                i,
                json!({"account": account, "seq": i}),
            )
        })
        .collect();
    env.publish_starts(starts).await;
    let mut child = env.spawn_process(&[]);
    // Let it get going, then ask it to stop mid-run.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM it.effects")
            .fetch_one(&env.pool)
            .await
            .unwrap_or(0);
        if done > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "skald never started working"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let term = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let status = wait_child(&mut child, Duration::from_secs(30));
    assert!(status.success(), "graceful shutdown exits 0: {status:?}");

    let app = env.start_app().await;
    env.wait_for_terminal(SAGAS as i64, Duration::from_secs(120))
        .await;
    app.stop().await;
    let per_step = effects_per_step(&env).await;
    assert_eq!(
        per_step,
        vec![
            ("first".into(), SAGAS as i64),
            ("second".into(), SAGAS as i64),
            ("third".into(), SAGAS as i64)
        ]
    );
    env.cleanup().await;
}
