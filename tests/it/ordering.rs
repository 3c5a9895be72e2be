//! Given starts of one aggregate that arrive out of sequence order, then the saga's
//! ordering policy decides: `latest_wins` drops the stale one (recorded), `strict`
//! applies them in order, waiting a bounded time for a missing one.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::json;

use crate::helpers::{TestEnv, start};

fn ordering_sagas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ordering")
}

async fn publish_sequences(env: &TestEnv, saga: &str, seqs: &[u64]) {
    let starts = seqs
        .iter()
        .map(|&seq| {
            start(
                saga,
                "acct-1",
                seq,
                json!({"account": "acct-1", "seq": seq}),
            )
        })
        .collect();
    env.publish_starts(starts).await;
}

async fn applied(env: &TestEnv, saga: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT seq FROM ord.effects WHERE saga = $1 ORDER BY id")
        .bind(saga)
        .fetch_all(&env.pool)
        .await
        .unwrap()
}

async fn wait_for_inbox(env: &TestEnv, rows: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM skald.inbox")
            .fetch_one(&env.pool)
            .await
            .unwrap_or(0);
        if n >= rows {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "only {n} of {rows} messages handled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn latest_wins_discards_and_records_a_stale_start() {
    let env = TestEnv::new(ordering_sagas()).await;
    publish_sequences(&env, "latest", &[1, 3, 2]).await;
    let app = env.start_app().await;
    wait_for_inbox(&env, 3).await;
    assert_eq!(app.engine.stats().stale.load(Ordering::Relaxed), 1);
    app.stop().await;

    assert_eq!(applied(&env, "latest").await, [1, 3]);
    let stale: i64 =
        sqlx::query_scalar("SELECT count(*) FROM skald.inbox WHERE disposition = 'stale'")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(stale, 1, "the stale start is recorded");
    let watermark: i64 = sqlx::query_scalar("SELECT sequence FROM skald.watermarks")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(watermark, 3);
    env.cleanup().await;
}

#[actix_rt::test]
async fn strict_applies_out_of_order_starts_in_sequence_order() {
    let env = TestEnv::new(ordering_sagas()).await;
    publish_sequences(&env, "strict", &[1, 3, 2, 5, 4]).await;
    let app = env.start_app().await;
    env.wait_for_terminal(5, Duration::from_secs(30)).await;
    app.stop().await;
    assert_eq!(applied(&env, "strict").await, [1, 2, 3, 4, 5]);
    env.cleanup().await;
}

#[actix_rt::test]
async fn strict_skips_a_gap_after_the_bounded_wait_and_then_drops_the_late_start() {
    let env = TestEnv::new(ordering_sagas()).await;
    publish_sequences(&env, "strict", &[1, 3]).await;
    let app = env.start_app().await;
    let started = std::time::Instant::now();
    env.wait_for_terminal(2, Duration::from_secs(30)).await;
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "3 waited for 2 for ordering_max_wait_ms"
    );
    assert_eq!(applied(&env, "strict").await, [1, 3]);

    publish_sequences(&env, "strict", &[2]).await;
    wait_for_inbox(&env, 3).await;
    app.stop().await;
    assert_eq!(applied(&env, "strict").await, [1, 3], "the late 2 is stale");
    env.cleanup().await;
}

#[actix_rt::test]
async fn without_a_sequence_the_dispatch_time_orders_starts() {
    let env = TestEnv::new(ordering_sagas()).await;
    let at =
        |ms: i64| Some(chrono::DateTime::from_timestamp_millis(1_800_000_000_000 + ms).unwrap());
    let starts = [(1, 20), (2, 10)] // the second was dispatched earlier: stale
        .into_iter()
        .map(|(seq, ms)| {
            let mut s = start(
                "latest",
                "acct-1",
                seq,
                json!({"account": "acct-1", "seq": seq}),
            );
            s.sequence = None;
            s.dispatched_at = at(ms);
            s
        })
        .collect();
    env.publish_starts(starts).await;
    let app = env.start_app().await;
    wait_for_inbox(&env, 2).await;
    app.stop().await;
    assert_eq!(applied(&env, "latest").await, [1]);
    env.cleanup().await;
}
