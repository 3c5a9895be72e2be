//! The dashboard API against a hostile client: invalid bodies run no action,
//! cross-site requests change nothing, client errors are 4xx naming the parameter,
//! `/metrics` needs the token, and HTTP itself is answered correctly (405 with
//! `Allow`, long heads as JSON, the `Bearer` scheme in any case).

use std::io::{Read, Write};
use std::time::Duration;

use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::test;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::api::{assert_error, call, get, post, service, with_token};
use crate::helpers::{TestEnv, sample_sagas};

/// A response's headers, by lower-case name.
type Headers = std::collections::BTreeMap<String, String>;

/// A request's status, headers and body (JSON, or the text).
async fn send<S, B>(svc: &S, req: test::TestRequest) -> (StatusCode, Headers, Value)
where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: actix_web::body::MessageBody,
{
    let resp = svc.call(req.to_request()).await.unwrap();
    let status = resp.status();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    let body = test::read_body(resp).await;
    let json = serde_json::from_slice(&body)
        .unwrap_or(Value::String(String::from_utf8_lossy(&body).to_string()));
    (status, headers, json)
}

/// A POST with this content type and raw body.
fn raw_post(uri: &str, content_type: &str, body: impl Into<Vec<u8>>) -> test::TestRequest {
    test::TestRequest::post()
        .uri(uri)
        .insert_header(("content-type", content_type))
        .set_payload(body.into())
}

/// Every dead letter (id, status) and every operator action, as text.
async fn tables(env: &TestEnv) -> String {
    let letters: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, status FROM skald.dead_letters ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let actions: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, action FROM skald.operator_actions ORDER BY id")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    format!("{letters:?} {actions:?}")
}

/// Publishes `n` unreadable messages and waits until they are pending dead letters;
/// the ids of the pending letters, in id order.
pub(crate) async fn pending_letters(env: &TestEnv, n: usize) -> Vec<Uuid> {
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| format!("junk {i}").into_bytes()).collect();
    env.publish_raw(&bodies).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let ids: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM skald.dead_letters WHERE status = 'pending' ORDER BY id",
        )
        .fetch_all(&env.pool)
        .await
        .unwrap();
        if ids.len() >= n {
            return ids;
        }
        assert!(std::time::Instant::now() < deadline, "no dead letters");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn an_invalid_body_runs_no_action_and_changes_nothing() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;
    let letters = pending_letters(&env, 2).await;
    let before = tables(&env).await;

    let bulk = "/api/v1/dead-letters/replay";
    let one = format!("/api/v1/dead-letters/{}/replay", letters[0]);
    let discard = format!("/api/v1/dead-letters/{}/discard", letters[0]);
    let json = "application/json";
    let refused = [
        (
            raw_post(bulk, json, r#"{"per_second": -1}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(bulk, json, r#"{"per_second": 0}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(bulk, json, r#"{"limit": "ten"}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(bulk, json, r#"{"kind": "weird"}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(bulk, json, r#"{"typo": 1}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(bulk, json, "[null, null]"),
            StatusCode::BAD_REQUEST,
        ),
        (raw_post(bulk, json, "null"), StatusCode::BAD_REQUEST),
        (raw_post(bulk, json, "{not json"), StatusCode::BAD_REQUEST),
        (
            raw_post(bulk, json, r#"{"limit": 1} {}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(bulk, json, r#"{"limit": 1, "limit": 2}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(
                bulk,
                json,
                format!(r#"{{"saga": "{}"}}"#, "x".repeat(300 * 1024)),
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            raw_post(bulk, "text/plain", "{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            raw_post(bulk, "application/x-www-form-urlencoded", "limit=1"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            raw_post(bulk, "text/plain", ""),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        (
            test::TestRequest::post().uri(bulk).set_payload("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
        // The edit must not be dropped silently, nor a field that is not the replay's.
        (
            raw_post(&one, json, r#"{"data": {"order_id": "x"}, "typo": 1}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(&one, json, r#"{"data": [1]}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(&one, json, r#"{"note": "why"}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(&discard, json, r#"{"note": 5}"#),
            StatusCode::BAD_REQUEST,
        ),
        (
            raw_post(&discard, json, r#"{"data": {}}"#),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (req, status) in refused {
        let (got, _, body) = send(&svc, req).await;
        assert_eq!(got, status, "{body}");
        assert!(body["error"]["code"].is_string(), "JSON error: {body}");
    }
    // Instance actions read their body before looking the instance up.
    for action in ["retry", "cancel", "resume"] {
        let uri = format!("/api/v1/instances/{}/{action}", Uuid::new_v4());
        assert_error(
            &call(&svc, raw_post(&uri, json, r#"{"by": 1}"#)).await,
            StatusCode::BAD_REQUEST,
            "bad_request",
        );
    }
    assert_eq!(
        tables(&env).await,
        before,
        "a refused request changed something"
    );

    // An empty body, where the body is optional, means the defaults.
    let (status, _, body) = send(&svc, test::TestRequest::post().uri(&discard)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "discarded");
    let (status, _, body) = send(&svc, raw_post(bulk, json, "")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["replayed"], json!([letters[1]]));
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn cross_site_requests_change_nothing_and_the_page_cannot_be_framed() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;
    pending_letters(&env, 1).await;
    let before = tables(&env).await;
    let bulk = "/api/v1/dead-letters/replay";

    // Another site's page posting to the API in the operator's browser.
    for origin in ["http://evil.example", "null", "http://127.0.0.1:9999"] {
        let req = raw_post(bulk, "application/json", "{}")
            .insert_header(("host", "127.0.0.1:8080"))
            .insert_header(("origin", origin));
        assert_error(&call(&svc, req).await, StatusCode::FORBIDDEN, "forbidden");
    }
    // A form or text/plain body (sent without a preflight) is not JSON.
    let form = raw_post(bulk, "text/plain", "{}")
        .insert_header(("host", "127.0.0.1:8080"))
        .insert_header(("origin", "http://127.0.0.1:8080"));
    assert_error(
        &call(&svc, form).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );
    // DNS rebinding: another name that resolves to 127.0.0.1 reads nothing either.
    let rebound = test::TestRequest::get()
        .uri("/api/v1/instances")
        .insert_header(("host", "evil.example:8080"));
    assert_error(
        &call(&svc, rebound).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_eq!(
        tables(&env).await,
        before,
        "a cross-site request changed something"
    );

    // The page itself, same origin, works; it cannot be framed or sniffed.
    let same = raw_post(bulk, "application/json", "{}")
        .insert_header(("host", "localhost:8080"))
        .insert_header(("origin", "http://localhost:8080"));
    assert_eq!(call(&svc, same).await.0, StatusCode::OK);
    let page = test::TestRequest::get()
        .uri("/")
        .insert_header(("host", "127.0.0.1:8080"));
    let (status, headers, html) = send(&svc, page).await;
    assert_eq!(status, StatusCode::OK);
    let csp = &headers["content-security-policy"];
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    let html = html.as_str().unwrap();
    assert!(html.contains(r#"<script src="/dashboard.js">"#) && !html.contains("<script>"));
    let (status, headers, _) = send(&svc, test::TestRequest::get().uri("/dashboard.js")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"].starts_with("text/javascript"));
    let (_, headers, _) = send(&svc, test::TestRequest::get().uri("/api/v1/sagas")).await;
    assert_eq!(headers["x-content-type-options"], "nosniff");
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn client_errors_are_400s_naming_the_parameter_never_internals() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;
    let letter = pending_letters(&env, 1).await[0];

    let named = |resp: (StatusCode, Value), name: &str| {
        assert_error(&resp, StatusCode::BAD_REQUEST, "bad_request");
        let message = resp.1["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(name), "{message:?} does not name {name}");
        for internal in [
            "struct",
            "Request",
            "u32",
            "i64",
            "UTF8",
            "line 1798",
            "database",
        ] {
            assert!(!message.contains(internal), "{message:?} shows {internal}");
        }
    };
    for (query, name) in [
        ("saga=a%00b", "saga"),
        ("aggregate_id=%00", "aggregate_id"),
        ("since=-5000-01-01T00:00:00Z", "since"),
        ("until=%2B10000-01-01T00:00:00Z", "until"),
        ("since=yesterday", "since"),
        ("limit=many", "limit"),
        ("limit=0", "limit"),
        (
            "cursor=-999999999999999999_00000000-0000-0000-0000-000000000000",
            "cursor",
        ),
        ("colour=red", "colour"),
    ] {
        named(get(&svc, &format!("/api/v1/instances?{query}")).await, name);
    }
    named(get(&svc, "/api/v1/dead-letters?limit=-5").await, "limit");
    let replay = format!("/api/v1/dead-letters/{letter}/replay");
    named(post(&svc, &replay, json!({"by": "a\u{0}b"})).await, "by");
    named(
        post(&svc, &replay, json!({"data": {"k": "v\u{0}"}})).await,
        "data.k",
    );
    named(
        post(
            &svc,
            "/api/v1/dead-letters/replay",
            json!({"per_second": -1}),
        )
        .await,
        "per_second",
    );
    named(
        post(&svc, "/api/v1/instances", json!({"saga": 5})).await,
        "saga",
    );
    named(post(&svc, "/api/v1/instances", json!([])).await, "object");
    let too_far = json!({"saga": "order_checkout", "payload": {}, "sequence": 1u64 << 63});
    named(post(&svc, "/api/v1/instances", too_far).await, "sequence");
    named(
        post(
            &svc,
            "/api/v1/instances",
            json!({"saga": "nope", "payload": {}}),
        )
        .await,
        "unknown saga \"nope\"",
    );

    let not_an_id = get(&svc, "/api/v1/instances/not-a-uuid").await;
    assert_error(&not_an_id, StatusCode::NOT_FOUND, "not_found");
    assert!(
        !not_an_id.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Path")
    );
    let unknown = get(&svc, "/api/v1/sagas/unknown").await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(unknown.1["error"]["message"], "no saga \"unknown\"");
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn metrics_need_the_token_when_one_is_set() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let guarded = service(with_token(&app.api, "s3cret")).await;
    let (status, headers, _) = send(&guarded, test::TestRequest::get().uri("/metrics")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    let wrong = test::TestRequest::get()
        .uri("/metrics")
        .insert_header(("authorization", "Bearer nope"));
    assert_eq!(call(&guarded, wrong).await.0, StatusCode::UNAUTHORIZED);
    let right = test::TestRequest::get()
        .uri("/metrics")
        .insert_header(("authorization", "Bearer s3cret"));
    let (status, _, text) = send(&guarded, right).await;
    assert_eq!(status, StatusCode::OK);
    assert!(text.as_str().unwrap().contains("skald_steps_applied_total"));
    // Without a token (loopback), Prometheus scrapes as before.
    let open = service(app.api.clone()).await;
    assert_eq!(
        call(&open, test::TestRequest::get().uri("/metrics"))
            .await
            .0,
        StatusCode::OK
    );
    app.stop().await;
    env.cleanup().await;
}

/// Sends raw bytes to the real HTTP server and returns what it answered.
fn raw_http(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).to_string()
}

#[actix_rt::test]
async fn wrong_methods_long_heads_unknown_resumes_and_bearer_case_follow_http() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;

    for (method, uri, allow) in [
        ("PUT", "/api/v1/health", "GET"),
        ("DELETE", "/api/v1/instances", "GET, POST"),
        ("GET", "/api/v1/dead-letters/replay", "POST"),
        (
            "PATCH",
            "/api/v1/dead-letters/00000000-0000-0000-0000-000000000000",
            "GET",
        ),
        ("POST", "/metrics", "GET"),
        ("DELETE", "/", "GET"),
    ] {
        let req = test::TestRequest::default()
            .method(method.parse().unwrap())
            .uri(uri);
        let (status, headers, body) = send(&svc, req).await;
        assert_eq!(
            status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}: {body}"
        );
        assert_eq!(headers["allow"], allow, "{method} {uri}");
        assert_eq!(body["error"]["code"], "method_not_allowed");
    }
    assert_error(
        &get(&svc, "/api/v1/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &get(&svc, "/nope").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    let long_query = format!("/api/v1/instances?saga={}", "x".repeat(9 * 1024));
    assert_error(
        &get(&svc, &long_query).await,
        StatusCode::URI_TOO_LONG,
        "uri_too_long",
    );
    let long_header = test::TestRequest::get()
        .uri("/api/v1/health")
        .insert_header(("x-pad", "y".repeat(17 * 1024)));
    assert_error(
        &call(&svc, long_header).await,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
    );
    // The same on the wire: a JSON answer, not a reset or an empty body.
    let addr = app.http_addr;
    let answer = tokio::task::spawn_blocking(move || {
        raw_http(
            addr,
            format!(
                "GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
                "y".repeat(40 * 1024)
            )
            .as_bytes(),
        )
    })
    .await
    .unwrap();
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:.200}");
    assert!(
        answer.contains(r#""code":"headers_too_large""#),
        "{answer:.400}"
    );

    assert_error(
        &post(
            &svc,
            &format!("/api/v1/instances/{}/resume", Uuid::new_v4()),
            json!({}),
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    );

    let guarded = service(with_token(&app.api, "s3cret")).await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let req = test::TestRequest::get()
            .uri("/api/v1/sagas")
            .insert_header(("authorization", format!("{scheme} s3cret")));
        assert_eq!(call(&guarded, req).await.0, StatusCode::OK, "{scheme}");
    }
    app.stop().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn the_openapi_document_describes_every_parameter_body_and_status() {
    let env = TestEnv::new(sample_sagas()).await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;
    let doc = get(&svc, "/api/v1/openapi.json").await.1;
    let paths = doc["paths"].as_object().unwrap();

    let start = &paths["/api/v1/instances"]["post"];
    assert!(start["responses"]["202"].is_object(), "{start}");
    assert!(start["responses"]["200"].is_null(), "{start}");
    let schema = &start["requestBody"]["content"]["application/json"]["schema"]["$ref"];
    let name = schema.as_str().unwrap().rsplit('/').next().unwrap();
    let body = &doc["components"]["schemas"][name];
    assert_eq!(body["required"], json!(["saga", "payload"]), "{body}");

    for (path, methods) in paths {
        for (method, op) in methods.as_object().unwrap() {
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            // Every {placeholder} is a documented path parameter.
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                let name = segment.trim_matches(['{', '}']);
                assert!(
                    params
                        .iter()
                        .any(|p| p["name"] == name && p["in"] == "path"),
                    "{method} {path}: {name} undocumented"
                );
            }
            // Every mutation documents its JSON body and the body errors.
            if method == "post" {
                assert!(
                    op["requestBody"]["content"]["application/json"]["schema"].is_object(),
                    "{method} {path}: no body schema"
                );
                for status in ["400", "413", "415"] {
                    assert!(
                        op["responses"][status].is_object(),
                        "{method} {path}: {status}"
                    );
                }
            }
            // Every documented query parameter is one the handler reads.
            for p in params.iter().filter(|p| p["in"] == "query") {
                let name = p["name"].as_str().unwrap();
                let value = p["schema"]["enum"][0]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| match p["schema"]["type"].as_str() {
                        Some("integer") => "1".into(),
                        _ if p["schema"]["format"] == "date-time" => "2026-01-01T00:00:00Z".into(),
                        _ => "x".into(),
                    });
                let (status, body) = get(&svc, &format!("{path}?{name}={value}")).await;
                let message = body["error"]["message"].as_str().unwrap_or("");
                assert!(
                    !message.contains("unknown field"),
                    "{path}: documented {name} is not read: {status} {message}"
                );
            }
        }
    }
    let list = &paths["/api/v1/instances"]["get"]["parameters"];
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "saga",
            "status",
            "aggregate_id",
            "since",
            "until",
            "cursor",
            "limit"
        ]
    );
    app.stop().await;
    env.cleanup().await;
}
