//! Given steps implemented as Rust handlers, then they run inside the step's
//! transaction (a failed attempt leaves nothing behind), their retryable and fatal
//! errors are honoured, and their output and idempotency key are what they promise.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::json;
use skald::envelope::instance_id_for;
use skald::handlers::{HandlerError, HandlerFuture, HandlerInput, Handlers};
use sqlx::PgConnection;
use uuid::Uuid;

use crate::helpers::{TestEnv, start};

static RESERVE_CALLS: AtomicU32 = AtomicU32::new(0);

async fn log(
    conn: &mut PgConnection,
    input: &HandlerInput,
    what: &str,
    detail: &str,
) -> Result<(), HandlerError> {
    sqlx::query("INSERT INTO hd.log (instance_id, what, detail) VALUES ($1, $2, $3)")
        .bind(input.instance_id)
        .bind(what)
        .bind(detail)
        .execute(conn)
        .await?;
    Ok(())
}

/// Writes its row, then fails (retryably) on its very first call.
fn reserve<'a>(conn: &'a mut PgConnection, input: HandlerInput) -> HandlerFuture<'a> {
    Box::pin(async move {
        log(conn, &input, "reserve", &input.idempotency_key).await?;
        if RESERVE_CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
            return Err(HandlerError::Retryable("warehouse busy".into()));
        }
        Ok(json!({ "reservation": format!("r-{}", input.params["key"].as_str().unwrap_or("")) }))
    })
}

fn release<'a>(conn: &'a mut PgConnection, input: HandlerInput) -> HandlerFuture<'a> {
    Box::pin(async move {
        log(conn, &input, "release", "").await?;
        Ok(serde_json::Value::Null)
    })
}

/// Refuses the key `refuse` with a (retryable-typed) `refused:` error, which the
/// saga declares fatal in `fatal_errors`.
fn confirm<'a>(conn: &'a mut PgConnection, input: HandlerInput) -> HandlerFuture<'a> {
    Box::pin(async move {
        if input.params["key"] == "refuse" {
            return Err(HandlerError::Retryable("refused: order refused".into()));
        }
        log(conn, &input, "confirm", "").await?;
        Ok(serde_json::Value::Null)
    })
}

#[actix_rt::test]
async fn handler_steps_run_in_the_step_transaction_and_honour_their_errors() {
    let env =
        TestEnv::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/handlers")).await;
    let mut handlers = Handlers::default();
    handlers
        .register("reserve", reserve)
        .register("release", release)
        .register("confirm", confirm);
    let app = env.start_app_with(handlers).await;
    let ids = env
        .publish_starts(vec![
            start("handled", "ok", 1, json!({"key": "ok"})),
            start("handled", "refuse", 1, json!({"key": "refuse"})),
        ])
        .await;
    env.wait_for_terminal(2, Duration::from_secs(30)).await;
    app.stop().await;

    let log_of = |id: Uuid| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_as::<_, (String, Option<String>)>(
                "SELECT what, detail FROM hd.log WHERE instance_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let (ok, refused) = (instance_id_for(ids[0]), instance_id_for(ids[1]));
    let status = |id: Uuid| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT status FROM skald.instances WHERE id = $1")
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(status(ok).await, "completed");
    assert_eq!(status(refused).await, "compensated");
    // The first (failed) reserve attempt wrote a row too, but it rolled back with it:
    // one reserve row per instance, with a stable idempotency key.
    let ok_log = log_of(ok).await;
    let what: Vec<&str> = ok_log.iter().map(|(w, _)| w.as_str()).collect();
    assert_eq!(what, ["reserve", "confirm"]);
    assert_eq!(
        ok_log[0].1.as_deref(),
        Some(format!("{ok}:reserve:forward").as_str())
    );
    let refused_log: Vec<String> = log_of(refused).await.into_iter().map(|(w, _)| w).collect();
    assert_eq!(refused_log, ["reserve", "release"]);
    let confirm_attempts: Vec<Option<String>> = sqlx::query_scalar(
        "SELECT error_kind FROM skald.inbox WHERE instance_id = $1 AND step_name = 'confirm'",
    )
    .bind(refused)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        confirm_attempts,
        [Some("fatal".to_string())],
        "declared fatal: no retry"
    );
    let outputs: serde_json::Value =
        sqlx::query_scalar("SELECT outputs FROM skald.instances WHERE id = $1")
            .bind(ok)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(outputs["reserve"]["reservation"], "r-ok");
    env.cleanup().await;
}
