//! Several processes, failover, and memory that does not grow with the number of
//! aggregates ever seen.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use skald::config::TransportKind;

use crate::helpers::{TestEnv, on_every_transport, ordered_starts, start, test_sagas, wait_child};

on_every_transport!(three_processes_one_killed_mid_run_complete_everything_in_order);
async fn three_processes_one_killed_mid_run_complete_everything_in_order(transport: TransportKind) {
    const SAGAS: u64 = 5_000;
    const AGGREGATES: u64 = 100;
    let env = TestEnv::on(transport, test_sagas()).await;
    env.publish_starts(ordered_starts(SAGAS, AGGREGATES)).await;

    let mut processes: Vec<_> = (0..3).map(|_| env.spawn_process(&[])).collect();
    // Kill one when about a fifth of the work is done.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let effects: i64 = sqlx::query_scalar("SELECT count(*) FROM it.effects")
            .fetch_one(&env.pool)
            .await
            .unwrap_or(0);
        if effects as u64 >= SAGAS * 3 / 5 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {effects} effects");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut victim = processes.remove(0);
    victim.kill().unwrap(); // SIGKILL
    wait_child(&mut victim, Duration::from_secs(10));

    env.wait_for_terminal(SAGAS as i64, Duration::from_secs(300))
        .await;
    for mut p in processes {
        std::process::Command::new("kill")
            .args(["-TERM", &p.id().to_string()])
            .status()
            .unwrap();
        assert!(wait_child(&mut p, Duration::from_secs(30)).success());
    }

    assert_eq!(env.count_status("completed").await, SAGAS as i64);
    env.assert_ordered_effects(SAGAS * 3).await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn idle_actors_stop_so_memory_follows_active_aggregates_not_all_ever_seen() {
    const AGGREGATES: u64 = 3_000;
    let mut env = TestEnv::new(test_sagas()).await;
    env.config.actor_idle = Duration::from_millis(200);
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
    let app = env.start_app().await;
    env.wait_for_terminal(AGGREGATES as i64, Duration::from_secs(120))
        .await;
    let peak_seen = app.engine.stats().live_actors.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while app.engine.stats().live_actors.load(Ordering::Relaxed) > 0 {
        assert!(Instant::now() < deadline, "idle actors never stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
    assert!(
        peak_seen < AGGREGATES,
        "actors came and went: {peak_seen} alive at the end of the run"
    );
    env.cleanup().await;
}
