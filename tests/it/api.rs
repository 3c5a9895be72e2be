//! The dashboard API, in-process with actix-web's test tools, against a running skald
//! on the real services. Every endpoint and its error paths.

use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::{App, test};
use serde_json::{Value, json};
use skald::api::{ApiState, configure};
use uuid::Uuid;

use crate::helpers::{TestEnv, sample_sagas};

/// The API as a test service (the same `configure` that `skald run` serves).
pub(crate) async fn service(
    state: ApiState,
) -> impl Service<
    actix_http::Request,
    Response = ServiceResponse<impl MessageBody>,
    Error = actix_web::Error,
> {
    test::init_service(App::new().configure(configure(state))).await
}

pub(crate) async fn call<S, B>(svc: &S, req: test::TestRequest) -> (StatusCode, Value)
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let resp = svc.call(req.to_request()).await.unwrap();
    let status = resp.status();
    let body = test::read_body(resp).await;
    let json = serde_json::from_slice(&body)
        .unwrap_or(Value::String(String::from_utf8_lossy(&body).to_string()));
    (status, json)
}

pub(crate) async fn get<S, B>(svc: &S, uri: &str) -> (StatusCode, Value)
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    call(svc, test::TestRequest::get().uri(uri)).await
}

pub(crate) async fn post<S, B>(svc: &S, uri: &str, body: Value) -> (StatusCode, Value)
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    call(svc, test::TestRequest::post().uri(uri).set_json(body)).await
}

pub(crate) fn assert_error(resp: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(resp.0, status, "{:?}", resp.1);
    assert_eq!(resp.1["error"]["code"], code, "{:?}", resp.1);
    assert!(resp.1["error"]["message"].is_string());
}

/// `state` with the API token `token` set.
pub(crate) fn with_token(state: &ApiState, token: &str) -> ApiState {
    ApiState {
        token: Some(token.into()),
        ..state.clone()
    }
}

pub(crate) fn order(id: &str, amount: f64) -> Value {
    json!({"order_id": id, "sku": "SKU-1", "qty": 1, "account": "alice", "amount": amount})
}

#[actix_rt::test]
async fn the_api_starts_lists_shows_and_reports_instances() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;

    assert_eq!(get(&svc, "/api/v1/health").await.0, StatusCode::OK);
    // Ready once consuming (503 with the failing check until then).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ready = get(&svc, "/api/v1/ready").await;
        if ready.0 == StatusCode::OK {
            assert_eq!(ready.1["consuming"], true);
            break;
        }
        assert_error(&ready, StatusCode::SERVICE_UNAVAILABLE, "not_ready");
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {:?}",
            ready.1
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_error(
        &get(&svc, "/api/v1/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // Definitions, with the step graph.
    let sagas = get(&svc, "/api/v1/sagas").await;
    assert_eq!(sagas.1["items"][0]["name"], "order_checkout");
    let saga = get(&svc, "/api/v1/sagas/order_checkout").await;
    assert_eq!(saga.1["graph"]["nodes"].as_array().unwrap().len(), 3);
    let edges = saga.1["graph"]["edges"].as_array().unwrap();
    assert!(
        edges.contains(
            &json!({"from": "charge_account", "to": "reserve_stock", "kind": "compensate"})
        )
    );
    assert_error(
        &get(&svc, "/api/v1/sagas/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // Start over HTTP: the same message id means the same instance.
    let message_id = Uuid::new_v4();
    let body =
        json!({"saga": "order_checkout", "message_id": message_id, "payload": order("api-1", 5.0)});
    let first = post(&svc, "/api/v1/instances", body.clone()).await;
    assert_eq!(first.0, StatusCode::ACCEPTED, "{:?}", first.1);
    let again = post(&svc, "/api/v1/instances", body).await;
    assert_eq!(first.1["instance_id"], again.1["instance_id"]);
    for i in 2..=3 {
        let b = json!({"saga": "order_checkout", "payload": order(&format!("api-{i}"), 1.0)});
        assert_eq!(
            post(&svc, "/api/v1/instances", b).await.0,
            StatusCode::ACCEPTED
        );
    }
    // A failing one: bob cannot pay.
    let b = json!({"saga": "order_checkout", "payload": {"order_id": "api-4", "sku": "SKU-1", "qty": 1, "account": "bob", "amount": 2e9}});
    assert_eq!(
        post(&svc, "/api/v1/instances", b).await.0,
        StatusCode::ACCEPTED
    );
    env.wait_for_terminal(4, Duration::from_secs(30)).await;

    // Bad starts are 4xx with a JSON body.
    let bad_json = call(
        &svc,
        test::TestRequest::post()
            .uri("/api/v1/instances")
            .insert_header(("content-type", "application/json"))
            .set_payload("{not json"),
    )
    .await;
    assert_error(&bad_json, StatusCode::BAD_REQUEST, "bad_request");
    assert_error(
        &post(
            &svc,
            "/api/v1/instances",
            json!({"saga": "nope", "payload": {}}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &post(
            &svc,
            "/api/v1/instances",
            json!({"saga": "order_checkout", "payload": [1]}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &post(
            &svc,
            "/api/v1/instances",
            json!({"saga": "order_checkout", "payload": {}, "extra": 1}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    let huge = json!({"saga": "order_checkout", "payload": {"x": "y".repeat(300 * 1024)}});
    assert_error(
        &post(&svc, "/api/v1/instances", huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    // Lists, filters and pages.
    let all = get(&svc, "/api/v1/instances").await;
    assert_eq!(all.1["items"].as_array().unwrap().len(), 4);
    let completed = get(
        &svc,
        "/api/v1/instances?status=completed&saga=order_checkout",
    )
    .await;
    assert_eq!(completed.1["items"].as_array().unwrap().len(), 3);
    let by_aggregate = get(&svc, "/api/v1/instances?aggregate_id=api-4").await;
    assert_eq!(by_aggregate.1["items"][0]["status"], "compensated");
    let page1 = get(&svc, "/api/v1/instances?limit=3").await;
    assert_eq!(page1.1["items"].as_array().unwrap().len(), 3);
    let cursor = page1.1["next_cursor"].as_str().unwrap().to_string();
    let page2 = get(&svc, &format!("/api/v1/instances?limit=3&cursor={cursor}")).await;
    assert_eq!(page2.1["items"].as_array().unwrap().len(), 1);
    assert_eq!(page2.1["next_cursor"], Value::Null);
    let future = get(&svc, "/api/v1/instances?since=2999-01-01T00:00:00Z").await;
    assert_eq!(future.1["items"].as_array().unwrap().len(), 0);
    assert_error(
        &get(&svc, "/api/v1/instances?status=sleeping").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &get(&svc, "/api/v1/instances?cursor=xyz").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &get(&svc, "/api/v1/instances?limit=0").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &get(&svc, "/api/v1/instances?since=yesterday").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &get(&svc, "/api/v1/instances?colour=red").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // One instance and its timeline.
    let id = by_aggregate.1["items"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let detail = get(&svc, &format!("/api/v1/instances/{id}")).await;
    let steps: Vec<String> = detail.1["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{} {} {}", e["step_name"], e["phase"], e["outcome"]).replace('"', ""))
        .collect();
    assert_eq!(
        steps,
        [
            "reserve_stock forward succeeded",
            "charge_account forward failed",
            "reserve_stock compensate succeeded"
        ]
    );
    assert!(
        detail.1["timeline"][1]["error"]
            .as_str()
            .unwrap()
            .contains("expected 1 row")
    );
    assert_error(
        &get(&svc, &format!("/api/v1/instances/{}", Uuid::new_v4())).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &get(&svc, "/api/v1/instances/not-a-uuid").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    // Stats and metrics.
    let stats = get(&svc, "/api/v1/stats").await;
    assert_eq!(stats.0, StatusCode::OK);
    assert!(stats.1["engine"]["applied"].as_u64().unwrap() >= 10);
    assert_eq!(stats.1["engine"]["compensations"], 1);
    let queues = stats.1["queues"].as_array().unwrap();
    assert!(
        queues
            .iter()
            .any(|q| q["queue"].as_str().unwrap().ends_with(".dead")),
        "{queues:?}"
    );
    let metrics = call(&svc, test::TestRequest::get().uri("/metrics")).await;
    let text = metrics.1.as_str().unwrap();
    assert!(text.contains("skald_steps_applied_total"), "{text}");
    assert!(text.contains("skald_compensations_total 1"), "{text}");
    assert!(
        text.contains("skald_instances{saga=\"order_checkout\",status=\"completed\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("skald_step_seconds_bucket{le=\"+Inf\"}"),
        "{text}"
    );

    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn dead_letters_are_listed_shown_replayed_and_discarded_over_the_api() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    env.publish_raw(&[b"not json".to_vec(), br#"{"also": "bad"}"#.to_vec()])
        .await;
    let svc = service(app.api.clone()).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let letters = loop {
        let list = get(&svc, "/api/v1/dead-letters?kind=malformed").await;
        if list.1["items"].as_array().unwrap().len() == 2 {
            break list.1["items"].as_array().unwrap().clone();
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let id = letters[0]["id"].as_str().unwrap().to_string();
    let shown = get(&svc, &format!("/api/v1/dead-letters/{id}")).await;
    assert_eq!(shown.1["kind"], "malformed");
    assert!(shown.1["reason"].is_string());

    let discarded = post(
        &svc,
        &format!("/api/v1/dead-letters/{id}/discard"),
        json!({"note": "junk", "by": "ops"}),
    )
    .await;
    assert_eq!(discarded.1["status"], "discarded");
    let again = post(
        &svc,
        &format!("/api/v1/dead-letters/{id}/discard"),
        json!({}),
    )
    .await;
    assert_eq!(again.1["status"], "discarded", "idempotent");
    assert_error(
        &post(
            &svc,
            &format!("/api/v1/dead-letters/{id}/replay"),
            json!({}),
        )
        .await,
        StatusCode::CONFLICT,
        "conflict",
    );
    let other = letters[1]["id"].as_str().unwrap();
    let replayed = post(
        &svc,
        &format!("/api/v1/dead-letters/{other}/replay"),
        json!({}),
    )
    .await;
    assert_eq!(replayed.0, StatusCode::OK, "{:?}", replayed.1);
    assert_eq!(replayed.1["already_replayed"], false);
    assert_error(
        &get(&svc, "/api/v1/dead-letters?kind=weird").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // Bulk replay of a filtered set, oldest first, rate-limited. (The replayed
    // letter above came back as a new malformed letter: three are pending now.)
    env.publish_raw(&[b"third".to_vec(), b"fourth".to_vec()])
        .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while get(&svc, "/api/v1/dead-letters?status=pending").await.1["items"]
        .as_array()
        .unwrap()
        .len()
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "new dead letters never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bulk = post(
        &svc,
        "/api/v1/dead-letters/replay",
        json!({"kind": "malformed", "per_second": 100}),
    )
    .await;
    assert_eq!(bulk.0, StatusCode::OK, "{:?}", bulk.1);
    assert_eq!(bulk.1["replayed"].as_array().unwrap().len(), 3);
    let replayed = get(&svc, "/api/v1/dead-letters?status=replayed").await;
    assert_eq!(replayed.1["items"].as_array().unwrap().len(), 4);
    assert_error(
        &post(
            &svc,
            "/api/v1/dead-letters/replay",
            json!({"per_second": 0}),
        )
        .await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &get(&svc, &format!("/api/v1/dead-letters/{}", Uuid::new_v4())).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &post(
            &svc,
            &format!("/api/v1/dead-letters/{}/replay", Uuid::new_v4()),
            json!({}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_token_guards_every_call_and_without_one_only_loopback_may_mutate() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;

    let guarded = service(with_token(&app.api, "s3cret")).await;
    assert_error(
        &get(&guarded, "/api/v1/sagas").await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let wrong = call(
        &guarded,
        test::TestRequest::get()
            .uri("/api/v1/sagas")
            .insert_header(("authorization", "Bearer nope")),
    )
    .await;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "unauthorized");
    let right = call(
        &guarded,
        test::TestRequest::get()
            .uri("/api/v1/sagas")
            .insert_header(("authorization", "Bearer s3cret")),
    )
    .await;
    assert_eq!(right.0, StatusCode::OK);

    let exposed = service(ApiState {
        token: None,
        loopback: false,
        ..app.api.clone()
    })
    .await;
    assert_eq!(get(&exposed, "/api/v1/sagas").await.0, StatusCode::OK);
    assert_error(
        &post(
            &exposed,
            "/api/v1/instances",
            json!({"saga": "order_checkout", "payload": order("x", 1.0)}),
        )
        .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    app.stop().await;

    // And skald refuses to start exposed without a token.
    let mut config = env.config.clone();
    config.http_addr = "0.0.0.0:0".parse().unwrap();
    let refused = skald::app::App::build(config, Default::default(), Default::default()).await;
    assert!(matches!(refused, Err(skald::app::AppError::Api(_))));
    env.cleanup().await;
}

#[actix_rt::test]
async fn the_openapi_document_lists_exactly_the_served_routes() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;
    let doc = get(&svc, "/api/v1/openapi.json").await;
    assert_eq!(doc.0, StatusCode::OK);
    assert_eq!(doc.1["openapi"], "3.1.0");
    let paths = doc.1["paths"].as_object().unwrap();
    let mut operations = 0;
    for (path, methods) in paths {
        for method in methods.as_object().unwrap().keys() {
            operations += 1;
            let uri = path
                .replace("{name}", "order_checkout")
                .replace("{id}", &Uuid::new_v4().to_string());
            let req = match method.as_str() {
                "get" => test::TestRequest::get(),
                "post" => test::TestRequest::post().set_json(json!({})),
                other => panic!("unexpected method {other}"),
            };
            let (status, body) = call(&svc, req.uri(&uri)).await;
            // Served: whatever it answers, it is not the unknown-endpoint fallback.
            assert!(
                !(status == StatusCode::NOT_FOUND
                    && body["error"]["message"] == "no such endpoint"),
                "{method} {uri} is documented but not served"
            );
            assert!(status.as_u16() < 500, "{method} {uri}: {status} {body:?}");
        }
    }
    assert_eq!(operations, skald::api::ROUTES.len());
    app.stop().await;
    env.cleanup().await;
}

pub(crate) fn failing_sagas() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/failing")
}

pub(crate) async fn wait_status(env: &TestEnv, id: Uuid, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status: Option<String> =
            sqlx::query_scalar("SELECT status FROM skald.instances WHERE id = $1")
                .bind(id)
                .fetch_optional(&env.pool)
                .await
                .unwrap();
        if status.as_deref() == Some(want) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "instance is {status:?}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) async fn wait_failed_attempt(env: &TestEnv, id: Uuid) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM skald.inbox WHERE instance_id = $1 AND outcome = 'failed'",
        )
        .bind(id)
        .fetch_one(&env.pool)
        .await
        .unwrap();
        if n > 0 {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "no failed attempt");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_gated(svc_start: &(StatusCode, Value)) -> Uuid {
    assert_eq!(svc_start.0, StatusCode::ACCEPTED, "{:?}", svc_start.1);
    svc_start.1["instance_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[actix_rt::test]
async fn operators_retry_now_cancel_and_resume_instances_idempotently() {
    let env = TestEnv::new(failing_sagas()).await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;

    // Cancel while a retry waits: compensated, and a second cancel changes nothing.
    let id = start_gated(
        &post(
            &svc,
            "/api/v1/instances",
            json!({"saga": "gated", "payload": {"key": "a"}}),
        )
        .await,
    )
    .await;
    wait_failed_attempt(&env, id).await;
    let cancelled = post(
        &svc,
        &format!("/api/v1/instances/{id}/cancel"),
        json!({"by": "ops"}),
    )
    .await;
    assert_eq!(cancelled.1["outcome"], "done", "{:?}", cancelled.1);
    wait_status(&env, id, "compensated").await;
    let again = post(&svc, &format!("/api/v1/instances/{id}/cancel"), json!({})).await;
    assert_eq!(again.1["outcome"], "already_done");
    let actor: String = sqlx::query_scalar(
        "SELECT actor FROM skald.operator_actions WHERE instance_id = $1 AND action = 'cancel'",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(actor, "ops");

    // Retry now: the fixed cause is retried at once, not after the 2 s backoff.
    let id = start_gated(
        &post(
            &svc,
            "/api/v1/instances",
            json!({"saga": "gated", "payload": {"key": "b"}}),
        )
        .await,
    )
    .await;
    wait_failed_attempt(&env, id).await;
    sqlx::query("UPDATE ft.gate SET open = true")
        .execute(&env.pool)
        .await
        .unwrap();
    let retried = post(&svc, &format!("/api/v1/instances/{id}/retry"), json!({})).await;
    assert_eq!(retried.0, StatusCode::OK, "{:?}", retried.1);
    wait_status(&env, id, "completed").await;
    let gap: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM max(finished_at) - min(finished_at))::float8 FROM skald.inbox \
         WHERE instance_id = $1 AND step_name = 'two'",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(gap < 1.5, "retried after {gap} s, not at once");
    assert_error(
        &post(&svc, &format!("/api/v1/instances/{id}/retry"), json!({})).await,
        StatusCode::CONFLICT,
        "conflict",
    );
    assert_error(
        &post(&svc, &format!("/api/v1/instances/{id}/cancel"), json!({})).await,
        StatusCode::CONFLICT,
        "conflict",
    );

    // Resume a parked instance once its cause is fixed (the gate is open now).
    sqlx::query("UPDATE ft.gate SET open = false")
        .execute(&env.pool)
        .await
        .unwrap();
    let id = start_gated(
        &post(
            &svc,
            "/api/v1/instances",
            json!({"saga": "bad_compensation", "payload": {"key": "c"}}),
        )
        .await,
    )
    .await;
    wait_status(&env, id, "failed").await;
    sqlx::query("UPDATE ft.gate SET open = true")
        .execute(&env.pool)
        .await
        .unwrap();
    let resumed = post(&svc, &format!("/api/v1/instances/{id}/resume"), json!({})).await;
    assert_eq!(resumed.1["outcome"], "done", "{:?}", resumed.1);
    wait_status(&env, id, "compensated").await;
    let again = post(&svc, &format!("/api/v1/instances/{id}/resume"), json!({})).await;
    assert_eq!(again.1["outcome"], "already_done");
    assert_error(
        &post(
            &svc,
            &format!("/api/v1/instances/{}/cancel", Uuid::new_v4()),
            json!({}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    app.stop().await;
    env.cleanup().await;
}
