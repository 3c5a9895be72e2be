//! Command steps against real PostgreSQL and RabbitMQ, with the participant services
//! played by hand: raw JSON read from a service's queue and hand-written replies
//! published to skald's intake, following only README's contract (the foreign
//! participant). The saga is the sample `sagas/order_services.yaml` with short reply
//! timeouts.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use serde_json::{Value, json};
use skald::envelope::Envelope;
use skald::transport::rabbitmq::RabbitTransport;
use skald::transport::{Delivery, Endpoint, Transport};
use uuid::Uuid;

use crate::helpers::{TestEnv, order_services_with, until, wait_child};

/// A directory holding the sample `order_services` saga with every reply timeout set
/// to `timeout_ms`.
fn fast_sagas(timeout_ms: u64) -> PathBuf {
    order_services_with(&[("timeout_ms: 5000", format!("timeout_ms: {timeout_ms}"))])
}

fn order(id: &str) -> Envelope {
    Envelope::start(
        "order_services",
        None,
        json!({"order_id": id, "sku": "SKU-1", "qty": 2, "account": "alice", "amount": 25.5}),
    )
}

/// A participant service played with raw messages: its queue read as JSON, replies
/// written by hand.
struct RawService {
    name: &'static str,
    transport: Arc<RabbitTransport>,
    deliveries: BoxStream<'static, Delivery>,
}

impl RawService {
    async fn open(env: &TestEnv, name: &'static str) -> RawService {
        let transport = RabbitTransport::connect_as(&env.config, env.service(name))
            .await
            .expect("connect as the service");
        let deliveries = transport.consume().await.expect("consume");
        RawService {
            name,
            transport,
            deliveries,
        }
    }

    /// The next command on the service's queue (acked), as JSON.
    async fn next(&mut self) -> Value {
        let delivery = tokio::time::timeout(Duration::from_secs(20), self.deliveries.next())
            .await
            .unwrap_or_else(|_| panic!("no command reached {} in 20 s", self.name))
            .expect("the stream is open");
        let command: Value = serde_json::from_slice(&delivery.body).expect("a JSON command");
        delivery.ack().await.expect("ack");
        command
    }

    /// Nothing reaches the service for `wait`.
    async fn quiet_for(&mut self, wait: Duration) {
        if let Ok(Some(d)) = tokio::time::timeout(wait, self.deliveries.next()).await {
            panic!(
                "{} received an unexpected message: {}",
                self.name,
                String::from_utf8_lossy(&d.body)
            );
        }
    }

    /// Everything that reaches the service within `wait` (acked).
    async fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let mut got = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout(wait, self.deliveries.next()).await {
            got.push(serde_json::from_slice(&d.body).expect("a JSON command"));
            d.ack().await.expect("ack");
        }
        got
    }

    /// Publishes `reply` to skald's intake under the command's aggregate.
    async fn publish(&self, reply: &Value) {
        let key = reply["aggregate_id"].as_str().unwrap();
        self.transport
            .send_to(
                &Endpoint::Orchestrator,
                key,
                &serde_json::to_vec(reply).unwrap(),
            )
            .await
            .expect("reply confirmed");
    }

    /// The reply to `command` with `outcome`, written from README's contract: its id is
    /// the UUID v5 of the name `reply` in the namespace of the command's id.
    fn reply(&self, command: &Value, outcome: Value) -> Value {
        let in_reply_to: Uuid = command["message_id"].as_str().unwrap().parse().unwrap();
        json!({
            "message_id": Uuid::new_v5(&in_reply_to, b"reply"),
            "in_reply_to": in_reply_to,
            "service": self.name,
            "aggregate_id": command["aggregate_id"],
            "reply_to": command["reply_to"],
            "outcome": outcome,
        })
    }

    /// Reads the next command, checks its type, and answers it `succeeded` with
    /// `outputs`; returns the command.
    async fn answer(&mut self, kind: &str, outputs: Value) -> Value {
        let command = self.next().await;
        assert_eq!(command["type"], kind, "{command}");
        let reply = self.reply(&command, json!({"status": "succeeded", "outputs": outputs}));
        self.publish(&reply).await;
        command
    }

    async fn close(self) {
        self.transport.close().await;
    }
}

fn succeeded(outputs: Value) -> Value {
    json!({"status": "succeeded", "outputs": outputs})
}

fn failed(error: &str) -> Value {
    json!({"status": "failed", "kind": "fatal", "error": error})
}

async fn instance_of(env: &TestEnv) -> (Uuid, String, Value) {
    sqlx::query_as::<_, (Uuid, String, sqlx::types::Json<Value>)>(
        "SELECT id, status, outputs FROM skald.instances",
    )
    .fetch_one(&env.pool)
    .await
    .map(|(id, status, outputs)| (id, status, outputs.0))
    .expect("one instance")
}

/// How many reply deliveries were recorded with each disposition.
async fn replies_by_disposition(env: &TestEnv) -> Vec<(String, i64)> {
    sqlx::query_as(
        "SELECT disposition, count(*) FROM skald.replies GROUP BY disposition ORDER BY 1",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap()
}

#[actix_rt::test]
async fn three_command_steps_complete_and_a_duplicated_reply_is_applied_once() {
    let env = TestEnv::new(fast_sagas(5_000)).await;
    let mut stock = RawService::open(&env, "stock").await;
    let mut payments = RawService::open(&env, "payments").await;
    let mut shipping = RawService::open(&env, "shipping").await;
    let app = env.start_app().await;
    env.publish_starts(vec![order("order-1")]).await;

    // Given the stock service answers, and the broker delivers its reply twice.
    let reserve = stock.next().await;
    assert_eq!(reserve["type"], "reserve_stock");
    assert_eq!(
        reserve["payload"],
        json!({"order_id": "order-1", "sku": "SKU-1", "qty": 2})
    );
    assert_eq!(reserve["aggregate_id"], "order-1");
    assert_eq!(reserve["reply_to"]["saga"], "order_services");
    let reply = stock.reply(&reserve, succeeded(json!({"reservation_id": "r-1"})));
    stock.publish(&reply).await;
    stock.publish(&reply).await;

    let charge = payments
        .answer("charge_card", json!({"payment_id": 7}))
        .await;
    assert_eq!(
        charge["payload"],
        json!({"order_id": "order-1", "account": "alice", "amount": 25.5})
    );
    shipping
        .answer("create_shipment", json!({"shipment_id": "s-9"}))
        .await;
    env.wait_for_terminal(1, Duration::from_secs(20)).await;

    // Then the saga completed once, with every reply's outputs, and the copy of the
    // stock reply was recorded as a duplicate.
    let (id, status, outputs) = instance_of(&env).await;
    assert_eq!(status, "completed");
    assert_eq!(
        outputs,
        json!({
            "reserve_stock": {"reservation_id": "r-1"},
            "charge_card": {"payment_id": 7},
            "create_shipment": {"shipment_id": "s-9"},
        })
    );
    // (A copy of a handled message re-sends what it sent: the payments service may
    // see the charge again, always under the same id, which it answers as a copy.)
    for copy in payments.drain(Duration::from_millis(500)).await {
        assert_eq!(copy["message_id"], charge["message_id"], "{copy}");
    }
    until(Duration::from_secs(10), || async {
        replies_by_disposition(&env).await.len() == 2
    })
    .await;
    assert_eq!(
        replies_by_disposition(&env).await,
        vec![("applied".into(), 3), ("duplicate".into(), 1)]
    );
    let attempts: Vec<(String, String)> = env.attempts(id, "step_name, outcome").await;
    let attempts: Vec<(&str, &str)> = attempts
        .iter()
        .map(|(s, o)| (s.as_str(), o.as_str()))
        .collect();
    assert_eq!(
        attempts,
        [
            ("reserve_stock", "sent"),
            ("reserve_stock", "succeeded"),
            ("charge_card", "sent"),
            ("charge_card", "succeeded"),
            ("create_shipment", "sent"),
            ("create_shipment", "succeeded"),
        ]
    );
    let commands: Vec<(String, String, String, i32)> =
        sqlx::query_as("SELECT service, type, status, sends FROM skald.commands ORDER BY sent_at")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(
        commands,
        vec![
            (
                "stock".into(),
                "reserve_stock".into(),
                "succeeded".into(),
                1
            ),
            (
                "payments".into(),
                "charge_card".into(),
                "succeeded".into(),
                1
            ),
            (
                "shipping".into(),
                "create_shipment".into(),
                "succeeded".into(),
                1
            ),
        ]
    );

    app.stop().await;
    for s in [stock, payments, shipping] {
        s.close().await;
    }
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_failed_reply_at_the_third_step_compensates_the_first_two_services_in_reverse() {
    let env = TestEnv::new(fast_sagas(5_000)).await;
    let mut stock = RawService::open(&env, "stock").await;
    let mut payments = RawService::open(&env, "payments").await;
    let mut shipping = RawService::open(&env, "shipping").await;
    let app = env.start_app().await;
    env.publish_starts(vec![order("order-2")]).await;

    stock
        .answer("reserve_stock", json!({"reservation_id": "r-2"}))
        .await;
    payments
        .answer("charge_card", json!({"payment_id": 42}))
        .await;
    // Given the shipping service refuses the order.
    let ship = shipping.next().await;
    shipping
        .publish(&shipping.reply(&ship, failed("no carrier for this address")))
        .await;

    // Then the refund reaches payments first, with the charge's output…
    let refund = payments.next().await;
    assert_eq!(refund["type"], "refund_card");
    assert_eq!(refund["payload"], json!({"payment_id": 42}));
    assert_eq!(refund["reply_to"]["cursor"]["phase"], "compensate");
    // …and the release reaches stock only once the refund is answered.
    stock.quiet_for(Duration::from_millis(300)).await;
    payments
        .publish(&payments.reply(&refund, succeeded(json!({}))))
        .await;
    let release = stock.next().await;
    assert_eq!(release["type"], "release_stock");
    assert_eq!(release["payload"], json!({"reservation_id": "r-2"}));
    stock
        .publish(&stock.reply(&release, succeeded(json!({}))))
        .await;

    env.wait_for_terminal(1, Duration::from_secs(20)).await;
    let (id, status, _) = instance_of(&env).await;
    assert_eq!(status, "compensated");
    let errors: Vec<(String, Option<String>)> = env
        .attempts(id, "step_name, error")
        .await
        .into_iter()
        .filter(|(_, e): &(String, Option<String>)| e.is_some())
        .collect();
    assert_eq!(
        errors,
        vec![(
            "create_shipment".into(),
            Some("service shipping replied fatal: no carrier for this address".into())
        )]
    );

    app.stop().await;
    for s in [stock, payments, shipping] {
        s.close().await;
    }
    env.cleanup().await;
}

#[actix_rt::test]
async fn without_a_reply_the_same_command_is_resent_then_compensated_and_late_replies_are_only_recorded()
 {
    let env = TestEnv::new(fast_sagas(400)).await;
    let mut stock = RawService::open(&env, "stock").await;
    let mut payments = RawService::open(&env, "payments").await;
    let app = env.start_app().await;
    env.publish_starts(vec![order("order-3")]).await;

    stock
        .answer("reserve_stock", json!({"reservation_id": "r-3"}))
        .await;
    // Given the payments service never answers: the policy's 3 sends of one command.
    let sends = [
        payments.next().await,
        payments.next().await,
        payments.next().await,
    ];
    for again in &sends[1..] {
        assert_eq!(again, &sends[0], "a re-send is the very same command");
    }
    // Then the step times out and the stock reservation is released.
    stock.answer("release_stock", json!({})).await;
    env.wait_for_terminal(1, Duration::from_secs(20)).await;
    let (id, status, outputs) = instance_of(&env).await;
    assert_eq!(status, "compensated");
    payments.quiet_for(Duration::from_millis(800)).await;

    // When the payments service answers late, and a reply names an unknown instance…
    payments
        .publish(&payments.reply(&sends[0], succeeded(json!({"payment_id": 1}))))
        .await;
    let mut stranger = sends[0].clone();
    let ghost = Uuid::new_v4();
    stranger["reply_to"]["instance_id"] = json!(ghost);
    stranger["message_id"] = json!(Uuid::new_v4());
    payments
        .publish(&payments.reply(&stranger, succeeded(json!({"payment_id": 2}))))
        .await;
    until(Duration::from_secs(10), || async {
        replies_by_disposition(&env).await.len() == 3
    })
    .await;
    // …then both are recorded, and neither changes the instance.
    assert_eq!(
        replies_by_disposition(&env).await,
        vec![
            ("applied".into(), 2),
            ("late".into(), 1),
            ("unknown".into(), 1)
        ]
    );
    let (_, status_after, outputs_after) = instance_of(&env).await;
    assert_eq!(
        (status_after.as_str(), &outputs_after),
        ("compensated", &outputs)
    );
    let (sends_count, command_status, error): (i32, String, Option<String>) = sqlx::query_as(
        "SELECT sends, status, error FROM skald.commands WHERE type = 'charge_card'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((sends_count, command_status.as_str()), (3, "timed_out"));
    assert!(
        error.unwrap().contains("no reply from service payments"),
        "the time-out is the step's error"
    );
    let charge_attempts: Vec<(String, Option<String>)> = env
        .attempts(id, "outcome, error")
        .await
        .into_iter()
        .skip(2)
        .take(4)
        .collect();
    assert_eq!(
        charge_attempts
            .iter()
            .map(|(o, _)| o.as_str())
            .collect::<Vec<_>>(),
        ["sent", "sent", "sent", "failed"],
        "one row per send, then the time-out"
    );

    app.stop().await;
    stock.close().await;
    payments.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_crash_between_the_command_steps_commit_and_its_publish_still_sends_it() {
    let env = TestEnv::new(fast_sagas(5_000)).await;
    let mut stock = RawService::open(&env, "stock").await;
    env.publish_starts(vec![order("order-4")]).await;

    // Given skald dies (as with kill -9) after committing "command sent", before
    // publishing it.
    let mut child = env.spawn_process(&[("SKALD_CRASH_AT", "after_commit:reserve_stock")]);
    let status = wait_child(&mut child, Duration::from_secs(60));
    assert!(!status.success(), "the process crashed: {status:?}");
    let (id, status, _) = instance_of(&env).await;
    assert_eq!(status, "running");
    stock.quiet_for(Duration::from_millis(300)).await;

    // Then the restarted skald sends the command, under its deterministic id.
    let app = env.start_app().await;
    let command = stock.next().await;
    let expected =
        skald::participant::wire::command_id(id, skald::saga::coordinator::Cursor::START);
    assert_eq!(command["message_id"], json!(expected));
    stock
        .publish(&stock.reply(&command, succeeded(json!({"reservation_id": "r-4"}))))
        .await;
    until(Duration::from_secs(10), || async {
        instance_of(&env).await.2.get("reserve_stock").is_some()
    })
    .await;
    let (_, _, outputs) = instance_of(&env).await;
    assert_eq!(outputs["reserve_stock"], json!({"reservation_id": "r-4"}));
    stock.quiet_for(Duration::from_millis(300)).await;

    app.stop().await;
    stock.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn operators_see_commands_retry_resends_the_awaited_command_and_cancel_compensates_by_command()
 {
    use crate::api::{get, post, service};
    let env = TestEnv::new(fast_sagas(30_000)).await;
    let mut stock = RawService::open(&env, "stock").await;
    let mut payments = RawService::open(&env, "payments").await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;
    env.publish_starts(vec![order("order-5")]).await;

    stock
        .answer("reserve_stock", json!({"reservation_id": "r-5"}))
        .await;
    // Given the instance waits for the payments service's reply.
    let charge = payments.next().await;
    let (id, status, _) = instance_of(&env).await;
    assert_eq!(status, "running");

    // The API shows the commands: service, type, sends, when sent and answered.
    let (code, detail) = get(&svc, &format!("/api/v1/instances/{id}")).await;
    assert_eq!(code, 200, "{detail}");
    let commands = detail["commands"].as_array().unwrap();
    assert_eq!(commands.len(), 2, "{detail}");
    assert_eq!(commands[0]["service"], "stock");
    assert_eq!(commands[0]["type"], "reserve_stock");
    assert_eq!(commands[0]["status"], "succeeded");
    assert_eq!(commands[0]["outputs"], json!({"reservation_id": "r-5"}));
    assert!(commands[0]["answered_at"].is_string());
    assert_eq!(commands[1]["service"], "payments");
    assert_eq!(commands[1]["status"], "waiting");
    assert_eq!(commands[1]["sends"], 1);
    assert_eq!(commands[1]["command_id"], charge["message_id"]);
    assert!(commands[1]["answered_at"].is_null());
    assert_eq!(detail["replies"][0]["disposition"], "applied");
    let (code, own) = get(&svc, &format!("/api/v1/instances/{id}/commands")).await;
    assert_eq!(code, 200);
    assert_eq!(own["commands"], detail["commands"]);

    // When an operator retries now: the very same command is sent again.
    let (code, retried) = post(&svc, &format!("/api/v1/instances/{id}/retry"), json!({})).await;
    assert_eq!(
        (code.as_u16(), &retried["outcome"]),
        (200, &json!("done")),
        "{retried}"
    );
    assert_eq!(payments.next().await, charge);

    // When an operator cancels: the reservation is released by command, and the charge's
    // reply, arriving afterwards, is recorded as late.
    let (code, cancelled) = post(&svc, &format!("/api/v1/instances/{id}/cancel"), json!({})).await;
    assert_eq!(code, 200, "{cancelled}");
    let release = stock.answer("release_stock", json!({})).await;
    assert_eq!(release["payload"], json!({"reservation_id": "r-5"}));
    env.wait_for_terminal(1, Duration::from_secs(20)).await;
    assert_eq!(instance_of(&env).await.1, "compensated");
    payments
        .publish(&payments.reply(&charge, succeeded(json!({"payment_id": 5}))))
        .await;
    until(Duration::from_secs(10), || async {
        let (_, replies) = get(&svc, "/api/v1/replies").await;
        replies["items"].as_array().is_some_and(|r| !r.is_empty())
    })
    .await;
    assert_eq!(instance_of(&env).await.1, "compensated");
    let (_, own) = get(&svc, &format!("/api/v1/instances/{id}/commands")).await;
    let statuses: Vec<&str> = own["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["succeeded", "cancelled", "succeeded"], "{own}");
    let (_, replies) = get(&svc, "/api/v1/replies").await;
    assert_eq!(replies["items"].as_array().unwrap().len(), 1, "{replies}");
    assert_eq!(replies["items"][0]["disposition"], "late", "{replies}");
    assert_eq!(replies["items"][0]["instance_id"], json!(id));

    app.stop().await;
    stock.close().await;
    payments.close().await;
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_compensation_command_failing_for_good_parks_and_a_resume_finishes_it() {
    use crate::api::{post, service};
    let env = TestEnv::new(fast_sagas(5_000)).await;
    let mut stock = RawService::open(&env, "stock").await;
    let mut payments = RawService::open(&env, "payments").await;
    let app = env.start_app().await;
    let svc = service(app.api.clone()).await;
    env.publish_starts(vec![order("order-6")]).await;

    stock
        .answer("reserve_stock", json!({"reservation_id": "r-6"}))
        .await;
    let charge = payments.next().await;
    payments
        .publish(&payments.reply(&charge, failed("card declined")))
        .await;
    // Given the stock service cannot release the reservation.
    let release = stock.next().await;
    assert_eq!(release["type"], "release_stock");
    stock
        .publish(&stock.reply(&release, failed("reservation locked")))
        .await;

    // Then the instance is parked with a compensation_failed dead letter holding the
    // whole history.
    env.wait_for_terminal(1, Duration::from_secs(20)).await;
    let (id, status, _) = instance_of(&env).await;
    assert_eq!(status, "failed");
    let (kind, history): (String, String) = sqlx::query_as(
        "SELECT kind, convert_from(body, 'UTF8') FROM skald.dead_letters WHERE instance_id = $1",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(kind, "compensation_failed");
    assert!(history.contains("card declined") && history.contains("reservation locked"));

    // When an operator resumes it: the release is sent again as a new attempt (a new
    // command id), and its success finishes the compensation.
    let (code, resumed) = post(&svc, &format!("/api/v1/instances/{id}/resume"), json!({})).await;
    assert_eq!(code, 200, "{resumed}");
    let again = stock.next().await;
    assert_eq!(again["type"], "release_stock");
    assert_eq!(again["reply_to"]["cursor"]["attempt"], 2);
    assert_ne!(again["message_id"], release["message_id"]);
    stock
        .publish(&stock.reply(&again, succeeded(json!({}))))
        .await;
    until(Duration::from_secs(10), || async {
        instance_of(&env).await.1 == "compensated"
    })
    .await;
    assert_eq!(instance_of(&env).await.1, "compensated");

    app.stop().await;
    stock.close().await;
    payments.close().await;
    env.cleanup().await;
}
