//! Given inputs that used to write wrong data or hold an aggregate for good, then skald
//! writes each value exactly as sent or refuses it clearly, without retrying a refusal
//! (DESIGN.md promise 7; issue #8).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use skald::envelope::instance_id_for;
use uuid::Uuid;

use skald::handlers::{HandlerFuture, HandlerInput, Handlers};
use sqlx::PgConnection;

use crate::helpers::{RunningApp, TestEnv, start};

fn integrity_sagas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/integrity")
}

/// Echoes its key; for the key `poison`, with a NUL character PostgreSQL cannot store.
fn emit<'a>(_conn: &'a mut PgConnection, input: HandlerInput) -> HandlerFuture<'a> {
    Box::pin(async move {
        let key = input.params["key"].as_str().unwrap_or_default().to_string();
        let echo = if key == "poison" {
            format!("{key}\0")
        } else {
            key
        };
        Ok(json!({ "echo": echo }))
    })
}

/// skald on the integrity sagas, with their handler registered.
async fn start_app(env: &TestEnv) -> RunningApp {
    let mut handlers = Handlers::default();
    handlers.register("emit", emit);
    env.start_app_with(handlers).await
}

/// Publishes one start and waits until its instance is terminal; returns the instance
/// and its status.
async fn finish(env: &TestEnv, saga: &str, aggregate: &str, payload: Value) -> (Uuid, String) {
    let ids = env
        .publish_starts(vec![start(saga, aggregate, 0, payload)])
        .await;
    let instance = instance_id_for(ids[0]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM skald.instances WHERE id = $1")
                .bind(instance)
                .fetch_optional(&env.pool)
                .await
                .unwrap();
        if let Some(s) =
            status.filter(|s| ["completed", "compensated", "failed"].contains(&s.as_str()))
        {
            return (instance, s);
        }
        assert!(
            Instant::now() < deadline,
            "instance {instance} not terminal"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every attempt of `instance`: (outcome, error kind, error).
async fn attempts(env: &TestEnv, instance: Uuid) -> Vec<(String, Option<String>, Option<String>)> {
    env.attempts(instance, "outcome, error_kind, error").await
}

#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Typed {
    cents: Option<i64>,
    ratio: Option<f64>,
    amount: Option<String>,
    qty: Option<i32>,
    label: Option<String>,
}

async fn typed_row(env: &TestEnv, id: &str) -> Typed {
    sqlx::query_as(
        "SELECT cents, ratio, amount::text AS amount, qty, label FROM typed.rows WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

#[actix_rt::test]
async fn values_bind_as_the_statement_declares_whatever_json_type_came_first() {
    let mut env = TestEnv::new(integrity_sagas()).await;
    // One connection: every start reuses the statement prepared by the first.
    env.config.db_pool = 1;
    let app = start_app(&env).await;

    // Integers first, then floats, then integers again, then null, then strings where
    // the column is numeric: each value as written.
    let rows = [
        (
            "a",
            json!({"cents": 2500, "ratio": 20, "amount": 20, "qty": 2, "label": "x"}),
        ),
        (
            "b",
            json!({"cents": 2500.0, "ratio": 19.9, "amount": 19.9, "qty": 3.0, "label": "y"}),
        ),
        (
            "c",
            json!({"cents": 7, "ratio": 1, "amount": "19.90", "qty": 4, "label": "z"}),
        ),
        (
            "d",
            json!({"cents": null, "ratio": null, "amount": null, "qty": null, "label": null}),
        ),
        (
            "e",
            json!({"cents": 9, "ratio": 0.5, "amount": 12345678901234567890u64, "qty": -1, "label": ""}),
        ),
    ];
    for (id, values) in &rows {
        let mut payload = values.clone();
        payload["id"] = json!(id);
        let (_, status) = finish(&env, "typed", id, payload).await;
        assert_eq!(status, "completed", "row {id}");
    }
    let expect = |cents: Option<i64>,
                  ratio: Option<f64>,
                  amount: Option<&str>,
                  qty: Option<i32>,
                  label: Option<&str>| Typed {
        cents,
        ratio,
        amount: amount.map(str::to_string),
        qty,
        label: label.map(str::to_string),
    };
    assert_eq!(
        typed_row(&env, "a").await,
        expect(Some(2500), Some(20.0), Some("20"), Some(2), Some("x"))
    );
    assert_eq!(
        typed_row(&env, "b").await,
        expect(Some(2500), Some(19.9), Some("19.9"), Some(3), Some("y"))
    );
    assert_eq!(
        typed_row(&env, "c").await,
        expect(Some(7), Some(1.0), Some("19.90"), Some(4), Some("z"))
    );
    assert_eq!(
        typed_row(&env, "d").await,
        expect(None, None, None, None, None)
    );
    assert_eq!(
        typed_row(&env, "e").await,
        expect(
            Some(9),
            Some(0.5),
            Some("12345678901234567890"),
            Some(-1),
            Some("")
        )
    );
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_value_that_does_not_fit_its_parameter_fails_fatally_once_naming_it() {
    let mut env = TestEnv::new(integrity_sagas()).await;
    env.config.db_pool = 1;
    let app = start_app(&env).await;
    let good = json!({"cents": 1, "ratio": 1.5, "amount": 1, "qty": 1, "label": "ok"});
    let cases = [
        (
            "qty",
            json!("two"),
            "parameter qty: expected integer, got string \"two\"",
        ),
        (
            "qty",
            json!(2.5),
            "parameter qty: expected integer, got number 2.5",
        ),
        (
            "cents",
            json!("2500"),
            "parameter cents: expected integer, got string \"2500\"",
        ),
        (
            "label",
            json!(42),
            "parameter label: expected string, got number 42",
        ),
        (
            "amount",
            json!("12 apples"),
            "parameter amount: expected number or decimal string",
        ),
    ];
    for (i, (field, bad, error)) in cases.iter().enumerate() {
        let id = format!("bad-{i}");
        let mut payload = good.clone();
        payload["id"] = json!(id);
        payload[*field] = bad.clone();
        let (instance, status) = finish(&env, "typed", &id, payload).await;
        assert_eq!(status, "compensated", "{field}={bad}");
        let tried = attempts(&env, instance).await;
        assert_eq!(tried.len(), 1, "a refusal is never retried: {tried:?}");
        let (outcome, kind, message) = &tried[0];
        assert_eq!(
            (outcome.as_str(), kind.as_deref()),
            ("failed", Some("fatal"))
        );
        assert!(
            message.as_deref().unwrap_or("").starts_with(error),
            "{field}={bad}: {message:?}"
        );
    }
    // Nothing was written by the refused starts, and the statement still works.
    let (_, status) = finish(&env, "typed", "after", {
        let mut p = good.clone();
        p["id"] = json!("after");
        p
    })
    .await;
    assert_eq!(status, "completed");
    let written: i64 = sqlx::query_scalar("SELECT count(*) FROM typed.rows")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(written, 1);
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn data_postgresql_refuses_to_record_is_dead_lettered_at_once_and_the_aggregate_goes_on() {
    let env = TestEnv::new(integrity_sagas()).await;
    let app = start_app(&env).await;
    let started = Instant::now();
    env.publish_starts(vec![start("emits", "k", 0, json!({"key": "poison"}))])
        .await;
    // The next start of the same aggregate is not held behind the refused one.
    let (_, status) = finish(&env, "emits", "k", json!({"key": "fine"})).await;
    assert_eq!(status, "completed");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "held for {:?}",
        started.elapsed()
    );
    let letters: Vec<(String, String, String)> =
        sqlx::query_as("SELECT kind, reason_code, reason FROM skald.dead_letters")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    let (kind, code, reason) = &letters[0];
    assert_eq!(
        (kind.as_str(), code.as_str()),
        ("unprocessable", "data_error")
    );
    assert!(reason.contains("22P05"), "{reason}");
    let stats = app.engine.stats();
    assert_eq!(
        stats.data_errors.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(env.dead_letter_depth().await, 1);
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn copies_of_a_handled_start_run_nothing_and_are_not_failures() {
    let env = TestEnv::new(integrity_sagas()).await;
    let app = start_app(&env).await;
    let original = start("counted", "other", 0, json!({"key": "k"}));
    let (_, status) = finish(&env, "counted", "k", json!({"key": "warm-up"})).await;
    assert_eq!(status, "completed");
    env.publish_starts(vec![original.clone(); 20]).await;
    let stats = app.engine.stats();
    let deadline = Instant::now() + Duration::from_secs(30);
    // 19 copies of the start, and with them the copies of the step-two message that
    // each re-sent.
    while stats.duplicates.load(std::sync::atomic::Ordering::Relaxed) < 19 {
        assert!(Instant::now() < deadline, "copies not all handled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    env.wait_for_terminal(2, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let runs: i64 = sqlx::query_scalar("SELECT last_value FROM counted.runs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        runs, 4,
        "two steps for each of the two instances ran, nothing else"
    );
    assert_eq!(
        stats
            .failed_attempts
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "a copy is not a failed attempt"
    );
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn bulk_replay_takes_the_oldest_matching_letters_in_order_at_the_rate_asked() {
    use skald::dlq::{BulkReplay, bulk_replay};
    use skald::store::dead_letters::{DeadLetterKind, NewDeadLetter, insert};

    let env = TestEnv::new(integrity_sagas()).await;
    let store = skald::store::Store::connect(&env.config.database_url, 2)
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let transport = env.transport().await;
    // Oldest first: a1 b1 a2 b2 a3 b3.
    let mut ids = std::collections::HashMap::new();
    for (i, saga) in ["a", "b", "a", "b", "a", "b"].iter().enumerate() {
        let id = Uuid::new_v4();
        let body = format!(r#"{{"letter":{i}}}"#).into_bytes();
        insert(
            store.pool(),
            &NewDeadLetter {
                id,
                kind: DeadLetterKind::Unprocessable,
                reason_code: "no_instance",
                reason: "test",
                body: &body,
                message_id: None,
                instance_id: None,
                saga: Some(saga),
            },
        )
        .await
        .unwrap();
        ids.insert(format!("{saga}{}", i / 2 + 1), id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let only_a = BulkReplay {
        kind: None,
        saga: Some("a".into()),
        limit: 2,
        per_second: 5,
    };
    let replayed = bulk_replay(&store, transport.as_ref(), &only_a, "test")
        .await
        .unwrap();
    assert_eq!(replayed, [ids["a1"], ids["a2"]], "the two oldest of saga a");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "5 a second at most"
    );
    let resolved: Vec<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
        "SELECT resolved_at FROM skald.dead_letters WHERE status = 'replayed' ORDER BY resolved_at",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(resolved.len(), 2);
    assert!(resolved[1] - resolved[0] >= chrono::Duration::milliseconds(190));

    let any = BulkReplay {
        saga: None,
        ..only_a
    };
    let replayed = bulk_replay(&store, transport.as_ref(), &any, "test")
        .await
        .unwrap();
    assert_eq!(
        replayed,
        [ids["b1"], ids["b2"]],
        "the two oldest still pending"
    );
    skald::transport::Transport::close(transport.as_ref()).await;
    store.close().await;
    env.cleanup().await;
}

/// `method path` (with a JSON body, if any) to skald's HTTP server; the status and
/// the JSON answer.
async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response[9..12].parse().unwrap();
    let json = response
        .split_once("\r\n\r\n")
        .and_then(|(_, b)| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

#[actix_rt::test]
async fn starts_with_an_empty_aggregate_or_a_nul_are_refused_by_the_api_and_the_cli() {
    let env = TestEnv::new(integrity_sagas()).await;
    let app = start_app(&env).await;
    let good = json!({"id": "x", "cents": 1, "ratio": 1, "amount": 1, "qty": 1, "label": "l"});
    let mut nul = good.clone();
    nul["label"] = json!("a\u{0}b");
    let mut empty_in_payload = good.clone();
    empty_in_payload["id"] = json!("");
    let cases = [
        (
            json!({"saga": "typed", "aggregate_id": "", "payload": good}),
            "aggregate id",
        ),
        (
            json!({"saga": "typed", "aggregate_id": "k\u{0}", "payload": good}),
            "NUL",
        ),
        (
            json!({"saga": "typed", "payload": empty_in_payload}),
            "aggregate id",
        ),
        (json!({"saga": "typed", "payload": nul}), "NUL"),
    ];
    for (body, says) in &cases {
        let (status, answer) = http(app.http_addr, "POST", "/api/v1/instances", Some(body)).await;
        assert_eq!(status, 400, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{body}: {message}");
    }
    let refused = |args: &[&str]| {
        let out = env.skald(args).output().unwrap();
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let data = good.to_string();
    assert!(
        refused(&["start", "typed", "--aggregate", "", "--data", &data]).contains("aggregate id")
    );
    let nul_data = r#"{"id":"x","label":"a\u0000b"}"#;
    assert!(refused(&["start", "typed", "--data", nul_data]).contains("NUL"));
    app.stop().await;
    // Nothing was published, nothing started.
    assert_eq!(env.intake_depth().await, 0);
    let instances: i64 = sqlx::query_scalar("SELECT count(*) FROM skald.instances")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(instances, 0);
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_check_that_finds_nothing_says_what_its_query_returned() {
    let env = TestEnv::new(integrity_sagas()).await;
    let app = start_app(&env).await;
    let (instance, status) = finish(&env, "checked", "nobody", json!({"key": "nobody"})).await;
    assert_eq!(status, "compensated");
    let tried = attempts(&env, instance).await;
    assert_eq!(
        tried[0].2.as_deref(),
        Some("expected 1 row(s), statement returned 0")
    );
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_message_held_by_an_outage_longer_than_the_bound_is_reported_stuck() {
    let mut env = TestEnv::new(integrity_sagas()).await;
    env.config.stuck_after = Duration::from_millis(300);
    let app = start_app(&env).await;
    // An outage only skald's bookkeeping meets: every inbox write fails with
    // "insufficient resources" (class 53), which is not about the message's data.
    sqlx::raw_sql(
        "CREATE FUNCTION skald.outage() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN RAISE EXCEPTION 'disk full (test)' USING ERRCODE = '53100'; END $$; \
         CREATE TRIGGER outage BEFORE INSERT ON skald.inbox \
           FOR EACH ROW EXECUTE FUNCTION skald.outage();",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let ids = env
        .publish_starts(vec![start("emits", "k", 0, json!({"key": "k"}))])
        .await;
    let stats = app.engine.stats();
    let deadline = Instant::now() + Duration::from_secs(15);
    while stats.stuck.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "never reported stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, ready) = http(app.http_addr, "GET", "/api/v1/ready", None).await;
    let checks = if ready["checks"].is_object() {
        &ready["checks"]
    } else {
        &ready
    };
    assert_eq!(checks["stuck_messages"], 1, "{ready}");
    assert!(
        stats.data_errors.load(std::sync::atomic::Ordering::Relaxed) == 0,
        "an outage is not bad data"
    );

    // The outage ends: the message goes through and is no longer stuck.
    sqlx::raw_sql("DROP TRIGGER outage ON skald.inbox")
        .execute(&env.pool)
        .await
        .unwrap();
    env.wait_for_terminal(1, Duration::from_secs(20)).await;
    let status: String = sqlx::query_scalar("SELECT status FROM skald.instances WHERE id = $1")
        .bind(instance_id_for(ids[0]))
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(status, "completed");
    let deadline = Instant::now() + Duration::from_secs(5);
    while stats.stuck.load(std::sync::atomic::Ordering::Relaxed) != 0 {
        assert!(Instant::now() < deadline, "still reported stuck");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_replay_whose_edited_payload_holds_nul_is_refused_and_changes_nothing() {
    use skald::store::dead_letters::{DeadLetterKind, NewDeadLetter, insert};

    let env = TestEnv::new(integrity_sagas()).await;
    let migrated = env.skald(&["migrate"]).output().unwrap();
    assert!(migrated.status.success());
    let id = Uuid::new_v4();
    insert(
        &env.pool,
        &NewDeadLetter {
            id,
            kind: DeadLetterKind::Malformed,
            reason_code: "invalid",
            reason: "test",
            body: br#"{"payload":{}}"#,
            message_id: None,
            instance_id: None,
            saga: None,
        },
    )
    .await
    .unwrap();
    let out = env
        .skald(&[
            "dlq",
            "replay",
            &id.to_string(),
            "--data",
            r#"{"note":"a\u0000b"}"#,
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("NUL"), "{stderr}");
    let status: String = sqlx::query_scalar("SELECT status FROM skald.dead_letters WHERE id = $1")
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(status, "pending");
    env.cleanup().await;
}
