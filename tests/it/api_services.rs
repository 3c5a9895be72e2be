//! The participant services' side in skald's API: given skald told where a service's
//! database is (`SKALD_SERVICE_DATABASES`), then the service's dead letters are listed
//! with their history, replayed and discarded through skald, and an instance's
//! commands show what the service recorded of them.

use std::time::Duration;

use actix_web::http::StatusCode;
use serde_json::{Value, json};
use skald::config::ServiceDatabase;
use skald::envelope::Envelope;
use skald::participant::sample::Sample;
use skald::transport::Endpoint;
use uuid::Uuid;

use crate::api::{assert_error, get, post, service};
use crate::helpers::{SAMPLES, Services, TestEnv, order_services_with, until};

/// Makes the stock service's reservations refuse every insert with a lock error (a
/// retryable failure at the service).
async fn stock_locked(services: &Services, locked: bool) {
    let sql = if locked {
        "CREATE FUNCTION stock.locked() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN RAISE EXCEPTION 'reservation locked' USING ERRCODE = '55P03'; END $$; \
         CREATE TRIGGER locked BEFORE INSERT ON stock.reservations \
         FOR EACH ROW EXECUTE FUNCTION stock.locked();"
    } else {
        "DROP TRIGGER locked ON stock.reservations"
    };
    sqlx::raw_sql(sql)
        .execute(services.pool(Sample::Stock))
        .await
        .expect("the stock service's lock");
}

#[actix_rt::test]
async fn a_service_dead_letter_is_listed_with_its_history_replayed_and_discarded_through_skald() {
    // Given the stock service in its own database, known to skald, and its
    // reservations locked (every try fails, retryably).
    let mut env = TestEnv::new(order_services_with(&[(
        "timeout_ms: 5000",
        "timeout_ms: 60000".into(),
    )]))
    .await;
    let mut services = Services::new(&env).await;
    env.config.service_databases = vec![ServiceDatabase {
        service: "stock".into(),
        url: services.url(Sample::Stock).into(),
    }];
    stock_locked(&services, true).await;
    for sample in SAMPLES {
        services.start(&env, sample);
    }
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;

    // When an order's reservation is exhausted at the service.
    env.publish_starts(vec![Envelope::start(
        "order_services",
        None,
        json!({"order_id": "order-1", "sku": "SKU-1", "qty": 2, "account": "alice", "amount": 25.5}),
    )])
    .await;
    env.wait_for_terminal(1, Duration::from_secs(90)).await;

    // Then skald lists the configured service, and its dead letter with every try.
    let (status, list) = get(&svc, "/api/v1/services").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list, json!({"items": [{"name": "stock"}]}));
    let (status, letters) = get(&svc, "/api/v1/services/stock/dead-letters").await;
    assert_eq!(status, StatusCode::OK, "{letters}");
    assert_eq!(letters["service"], "stock");
    let items = letters["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{letters}");
    let letter = &items[0];
    assert_eq!(letter["reason_code"], "exhausted");
    assert_eq!(letter["status"], "pending");
    assert_eq!(letter["type"], "reserve_stock");
    let errors = letter["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 5, "the default policy's 5 tries: {letter}");
    assert!(
        errors.iter().all(|e| e["message"]
            .as_str()
            .unwrap()
            .contains("reservation locked")),
        "{letter}"
    );
    let letter_id = letter["id"].as_str().unwrap().to_string();

    // And the instance's command shows the service's side of it.
    let instance: Uuid = sqlx::query_scalar("SELECT id FROM skald.instances")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let (status, doc) = get(&svc, &format!("/api/v1/instances/{instance}")).await;
    assert_eq!(status, StatusCode::OK);
    let reserve = doc["commands"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "reserve_stock")
        .expect("the reservation command")
        .clone();
    let side = &reserve["service_side"];
    assert_eq!(side["processed"]["outcome"], "exhausted", "{reserve}");
    assert_eq!(side["processed"]["attempts"], 5, "{reserve}");
    assert_eq!(side["failures"].as_array().unwrap().len(), 5, "{reserve}");
    assert_eq!(side["failures"][0]["attempt"], 1);
    assert_eq!(side["failures"][0]["retryable"], true);
    assert_eq!(side["dead_letters"][0]["id"], json!(letter_id));
    assert_eq!(
        doc["commands"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["service"] != "stock")
            .filter(|c| !c["service_side"].is_null())
            .count(),
        0,
        "services skald was not told about have no service side"
    );

    // When the lock is lifted and the letter replayed through skald: the service runs
    // the command again, once, and the letter is recorded as replayed.
    stock_locked(&services, false).await;
    let replay = format!("/api/v1/services/stock/dead-letters/{letter_id}/replay");
    let (status, replayed) = post(&svc, &replay, json!({"by": "ops"})).await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    assert_eq!(replayed["status"], "replayed");
    assert_eq!(replayed["resolved_by"], "ops");
    let message_id = Uuid::parse_str(letter["message_id"].as_str().unwrap()).unwrap();
    until(Duration::from_secs(30), || async {
        outcome(&services, message_id).await == "succeeded"
    })
    .await;
    assert_eq!(outcome(&services, message_id).await, "succeeded");
    // A second replay is refused: it is no longer pending.
    let again = post(&svc, &replay, json!({})).await;
    assert_error(&again, StatusCode::CONFLICT, "conflict");
    assert!(
        again.1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is replayed, not pending"),
        "{again:?}"
    );

    // When garbage reaches the service, its letter is discarded through skald, and
    // then only listed among the discarded ones.
    let exchange = Endpoint::Service("stock".into()).prefix(&env.config.namespace);
    env.publish_raw_to(&exchange, "order-g", &[b"{not json".to_vec()])
        .await;
    let mut garbage = Value::Null;
    until(Duration::from_secs(30), || {
        let svc = &svc;
        async move {
            let (_, list) = get(svc, "/api/v1/services/stock/dead-letters?status=pending").await;
            list["items"].as_array().is_some_and(|i| i.len() == 1)
        }
    })
    .await;
    let (_, pending) = get(&svc, "/api/v1/services/stock/dead-letters?status=pending").await;
    garbage.clone_from(&pending["items"][0]);
    assert_eq!(garbage["reason_code"], "malformed", "{pending}");
    let discard = format!(
        "/api/v1/services/stock/dead-letters/{}/discard",
        garbage["id"].as_str().unwrap()
    );
    let (status, discarded) = post(&svc, &discard, json!({"note": "garbage", "by": "ops"})).await;
    assert_eq!(status, StatusCode::OK, "{discarded}");
    assert_eq!(discarded["status"], "discarded");
    assert_eq!(discarded["note"], "garbage");
    let (_, pending) = get(&svc, "/api/v1/services/stock/dead-letters?status=pending").await;
    assert_eq!(pending["items"], json!([]), "{pending}");
    let (_, gone) = get(&svc, "/api/v1/services/stock/dead-letters?status=discarded").await;
    assert_eq!(gone["items"][0]["id"], garbage["id"], "{gone}");

    // And what skald does not know is a 404 naming the setting; bad input a 400.
    let unknown = get(&svc, "/api/v1/services/billing/dead-letters").await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        unknown.1["error"]["message"],
        "no service \"billing\": it is not in SKALD_SERVICE_DATABASES"
    );
    let unknown = post(
        &svc,
        &format!("/api/v1/services/billing/dead-letters/{letter_id}/discard"),
        json!({}),
    )
    .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "not_found");
    let no_letter = post(
        &svc,
        &format!(
            "/api/v1/services/stock/dead-letters/{}/replay",
            Uuid::new_v4()
        ),
        json!({}),
    )
    .await;
    assert_error(&no_letter, StatusCode::NOT_FOUND, "not_found");
    let bad = get(&svc, "/api/v1/services/stock/dead-letters?status=lost").await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "bad_request");
    let bad = get(&svc, "/api/v1/services/stock/dead-letters?limit=0").await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "bad_request");

    app.stop().await;
    services.stop_all().await;
    env.cleanup().await;
}

/// The stock service's recorded outcome of `message_id` (empty before it has one).
async fn outcome(services: &Services, message_id: Uuid) -> String {
    sqlx::query_scalar("SELECT outcome FROM skald_participant.processed WHERE message_id = $1")
        .bind(message_id)
        .fetch_optional(services.pool(Sample::Stock))
        .await
        .unwrap()
        .unwrap_or_default()
}
