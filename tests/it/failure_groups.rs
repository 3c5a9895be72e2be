//! Failure groups: failed attempts across instances grouped by step and error, and a
//! whole group retried, paced, oldest first.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use uuid::Uuid;

use crate::api::{get, post, service};
use crate::helpers::{TestEnv, start};

fn group_sagas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/groups")
}

fn the_group<'g>(groups: &'g Value, code: &str) -> &'g Value {
    groups["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["code"] == code)
        .unwrap_or_else(|| panic!("no group {code} in {groups}"))
}

#[actix_rt::test]
async fn fifty_and_five_failures_make_two_groups_and_one_is_retried_alone_oldest_first_paced() {
    // Given 50 instances failing at `reserve` out of stock and 5 with a declined card,
    // interleaved…
    let env = TestEnv::new(group_sagas()).await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;
    let starts = (0..55)
        .map(|i| {
            let kind = if i % 11 == 5 { "card" } else { "stock" };
            start(
                "grouped",
                &format!("k-{i}"),
                0,
                json!({"key": format!("k-{i}"), "kind": kind, "n": 1000 + i}),
            )
        })
        .collect();
    env.publish_starts(starts).await;
    env.wait_failing(55).await;

    // …there are two groups, with exact counts, over the API and the CLI alike.
    let (status, groups) = get(&svc, "/api/v1/failure-groups").await;
    assert_eq!(status, 200, "{groups}");
    assert_eq!(groups["items"].as_array().unwrap().len(), 2, "{groups}");
    let stock = the_group(&groups, "55000");
    assert_eq!(stock["message"], "out of stock: item <n> for order <uuid>");
    assert_eq!(stock["saga"], "grouped");
    assert_eq!(stock["step"], "reserve");
    assert_eq!(
        (stock["instances"].as_i64(), stock["attempts"].as_i64()),
        (Some(50), Some(50))
    );
    let card = the_group(&groups, "23514");
    assert_eq!(card["message"], "card <str> declined");
    assert_eq!(
        (card["instances"].as_i64(), card["attempts"].as_i64()),
        (Some(5), Some(5))
    );
    assert_eq!(groups["items"][0]["id"], stock["id"], "most attempts first");
    let listed: Value =
        serde_json::from_str(&env.skald_ok(&["failures", "list", "--json"])).unwrap();
    assert_eq!(listed, groups, "the CLI lists what the API does");

    // When the cause is fixed and the stock group is retried at 20 a second…
    sqlx::query("UPDATE fg.gate SET open = true")
        .execute(&env.pool)
        .await
        .unwrap();
    let id = stock["id"].as_str().unwrap();
    let began = Instant::now();
    let (status, done) = post(
        &svc,
        &format!("/api/v1/failure-groups/{id}/retry"),
        json!({"per_second": 20, "by": "ops"}),
    )
    .await;
    let took = began.elapsed();
    assert_eq!(status, 200, "{done}");

    // …exactly its members were retried, oldest failure first, no faster than asked.
    let oldest_first: Vec<Uuid> = sqlx::query_scalar(
        "SELECT b.instance_id FROM skald.inbox b WHERE b.outcome = 'failed' \
           AND b.error LIKE 'SQLSTATE 55000:%' \
         GROUP BY b.instance_id ORDER BY min(b.finished_at), b.instance_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let retried: Vec<Uuid> = serde_json::from_value(done["done"].clone()).unwrap();
    assert_eq!(retried, oldest_first);
    assert_eq!(done["skipped"], json!([]));
    let recorded: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT instance_id, actor FROM skald.operator_actions WHERE action = 'retry' ORDER BY id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        recorded.iter().map(|r| r.0).collect::<Vec<_>>(),
        oldest_first
    );
    assert!(recorded.iter().all(|r| r.1 == "ops"));
    let spread: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(at) - min(at))::float8 FROM skald.operator_actions \
         WHERE action = 'retry'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(
        spread >= 49.0 / 20.0 - 0.05,
        "50 retries at 20/s took {spread} s"
    );
    assert!(took >= Duration::from_millis(2400), "{took:?}");
    let group_actions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM skald.operator_actions WHERE action = 'retry_group' \
           AND instance_id IS NULL AND detail->>'group' = $1",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(group_actions, 1);

    // The stock instances complete; the declined cards still wait for their retry.
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.count_status("completed").await < 50 {
        assert!(
            Instant::now() < deadline,
            "the retried instances did not complete"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.count_status("completed").await, 50);
    assert_eq!(env.count_status("running").await, 5);

    // An unknown group is 404 over the API and exit 3 from the CLI.
    let unknown = Uuid::new_v4().to_string();
    let (status, _) = post(
        &svc,
        &format!("/api/v1/failure-groups/{unknown}/discard"),
        json!({}),
    )
    .await;
    assert_eq!(status, 404);
    let out = env
        .skald(&["failures", "retry", &unknown])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    app.stop().await;
    env.cleanup().await;
}
