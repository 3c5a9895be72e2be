//! Traces and JSON logs: a saga instance is one OpenTelemetry trace, joined to the
//! trace of the caller that published its start, across a retry and compensations;
//! JSON log lines carry the instance and the trace id; a malformed `traceparent` never
//! stops a saga.
//!
//! skald runs as a child process (the subscriber is process-wide) exporting over
//! OTLP/HTTP to a small receiver in the test, which decodes what it gets.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::{Value, json};
use skald::envelope::{Envelope, instance_id_for};

use crate::helpers::{SAMPLES, Services, TestEnv, order_services_with, wait_child};

const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

fn traced_sagas() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/traced")
}

fn caller_traceparent() -> String {
    format!("00-{CALLER_TRACE}-{CALLER_SPAN}-01")
}

/// One exported span, as the receiver decoded it.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    name: String,
    service: String,
    attributes: HashMap<String, String>,
}

impl Span {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

/// An OTLP/HTTP (protobuf) trace receiver on a free local port.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let sink = spans.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let sink = sink.clone();
                std::thread::spawn(move || serve(conn, &sink));
            }
        });
        Receiver { endpoint, spans }
    }

    /// Waits until `ready` holds of the spans received.
    fn wait_for(&self, timeout: Duration, ready: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let started = Instant::now();
        loop {
            let spans = self.spans.lock().unwrap().clone();
            if ready(&spans) {
                return spans;
            }
            assert!(
                started.elapsed() < timeout,
                "spans received so far: {spans:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Serves the requests of one keep-alive connection: `POST /v1/traces` bodies.
fn serve(conn: TcpStream, sink: &Mutex<Vec<Span>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut length = 0usize;
        let mut path = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let trimmed = line.trim_end();
            if trimmed.is_empty() {
                break;
            }
            if path.is_empty() {
                path = trimmed.to_string();
            }
            if let Some((name, value)) = trimmed.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        assert!(path.starts_with("POST /v1/traces "), "{path}");
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        sink.lock().unwrap().extend(spans_of(request));
        conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        )
        .unwrap();
    }
}

fn spans_of(request: ExportTraceServiceRequest) -> Vec<Span> {
    let text = |kv: &KeyValue| match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    };
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut out = Vec::new();
    for rs in request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .map(text)
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(Span {
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    name: s.name,
                    service: service.clone(),
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv)))
                        .collect(),
                });
            }
        }
    }
    out
}

/// `skald run` as a child whose stderr (its log) is collected line by line.
struct Skald {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Skald {
    fn spawn(env: &TestEnv, extra: &[(&str, &str)]) -> Skald {
        let mut child = env
            .skald(&["run"])
            .envs(extra.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn skald run");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap().push(line);
            }
        });
        Skald { child, log }
    }

    /// Stops it as an operator would (SIGTERM), and returns every log line.
    fn stop(&mut self) -> Vec<String> {
        let pid = self.child.id().to_string();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        wait_child(&mut self.child, Duration::from_secs(20));
        // The reader thread ends with the pipe; give it a moment to catch up.
        std::thread::sleep(Duration::from_millis(200));
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Skald {
    fn drop(&mut self) {
        // A failed test leaves no process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Child processes killed when dropped (a failed test leaves none behind).
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Every line parsed as JSON (the test fails on one that is not).
fn json_lines(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The JSON log lines logged inside the handling of `instance`.
fn lines_of<'a>(lines: &'a [Value], instance: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["span"]["instance"] == instance)
        .collect()
}

fn order(id: &str, ship: bool) -> Envelope {
    Envelope::start(
        "traced_order",
        Some(id.to_string()),
        json!({"order_id": id, "ship": ship}),
    )
}

#[actix_rt::test]
async fn a_saga_started_with_a_traceparent_is_one_trace_across_its_retry_and_compensations() {
    // Given skald exporting to an OTLP receiver, with JSON logs.
    let receiver = Receiver::start();
    let env = TestEnv::new(traced_sagas()).await;
    let mut skald = Skald::spawn(
        &env,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "skald-it"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("SKALD_LOG_FORMAT", "json"),
        ],
    );

    // When a caller in trace CALLER_TRACE starts an order that cannot ship: `charge`
    // fails once (retried), `ship` fails for good, `charge` and `reserve` compensate.
    let start = Envelope {
        traceparent: Some(caller_traceparent()),
        ..order("order-1", false)
    };
    let instance = instance_id_for(start.message_id).to_string();
    env.publish_starts(vec![start]).await;
    env.wait_for_terminal(1, Duration::from_secs(60)).await;
    let spans = receiver.wait_for(Duration::from_secs(20), |s| {
        s.iter()
            .filter(|s| s.attr("saga") == "traced_order")
            .count()
            >= 6
    });
    let lines = skald.stop();

    // Then the instance is one trace, the caller's: one span per attempt.
    let attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.attr("saga") == "traced_order")
        .collect();
    let summary: Vec<(String, &str, &str, &str)> = attempts
        .iter()
        .map(|s| {
            (
                s.name.clone(),
                s.attr("attempt"),
                s.attr("outcome"),
                s.attr("error"),
            )
        })
        .collect();
    assert_eq!(attempts.len(), 6, "{summary:#?}");
    for s in &attempts {
        assert_eq!(s.trace_id, CALLER_TRACE, "{s:#?}");
        assert_eq!(s.service, "skald-it");
        assert_eq!(s.attr("instance"), instance);
        assert_eq!(s.attr("aggregate"), "order-1");
    }
    let find = |name: &str, attempt: &str| -> &Span {
        attempts
            .iter()
            .find(|s| s.name == name && s.attr("attempt") == attempt)
            .unwrap_or_else(|| panic!("no span {name} attempt {attempt}: {summary:#?}"))
    };
    let reserve = find("traced_order/reserve/forward", "1");
    let charge_1 = find("traced_order/charge/forward", "1");
    let charge_2 = find("traced_order/charge/forward", "2");
    let ship = find("traced_order/ship/forward", "1");
    let undo_charge = find("traced_order/charge/compensate", "1");
    let undo_reserve = find("traced_order/reserve/compensate", "1");

    // Each attempt says what it was and how it ended.
    for (span, step, index, phase, outcome) in [
        (reserve, "reserve", "0", "forward", "succeeded"),
        (charge_1, "charge", "1", "forward", "failed_retryable"),
        (charge_2, "charge", "1", "forward", "succeeded"),
        (ship, "ship", "2", "forward", "failed_fatal"),
        (undo_charge, "charge", "1", "compensate", "succeeded"),
        (undo_reserve, "reserve", "0", "compensate", "succeeded"),
    ] {
        assert_eq!(span.attr("step_name"), step, "{span:#?}");
        assert_eq!(span.attr("step"), index, "{span:#?}");
        assert_eq!(span.attr("phase"), phase, "{span:#?}");
        assert_eq!(span.attr("outcome"), outcome, "{span:#?}");
    }
    assert!(
        charge_1.attr("error").contains("card network busy"),
        "{charge_1:#?}"
    );
    assert!(!ship.attr("error").is_empty(), "{ship:#?}");
    assert_eq!(reserve.attr("error"), "");

    // And each is the child of the one that sent its message: the caller's span first,
    // then through the retry and down the compensations.
    assert_eq!(reserve.parent_span_id, CALLER_SPAN);
    for (child, parent) in [
        (charge_1, reserve),
        (charge_2, charge_1),
        (ship, charge_2),
        (undo_charge, ship),
        (undo_reserve, undo_charge),
    ] {
        assert_eq!(
            child.parent_span_id, parent.span_id,
            "{} should be a child of {}",
            child.name, parent.name
        );
    }

    // And the JSON log lines of the instance carry its id and the trace id.
    let lines = json_lines(&lines);
    let ours = lines_of(&lines, &instance);
    assert!(!ours.is_empty(), "no log line of the instance: {lines:#?}");
    for line in ours {
        assert_eq!(line["span"]["trace_id"], CALLER_TRACE, "{line}");
        assert_eq!(line["span"]["saga"], "traced_order", "{line}");
    }
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_malformed_traceparent_is_ignored_and_the_saga_still_runs() {
    // Given skald without any OpenTelemetry endpoint (nothing exported), JSON logs.
    let env = TestEnv::new(traced_sagas()).await;
    let mut skald = Skald::spawn(&env, &[("SKALD_LOG_FORMAT", "json")]);

    // When three orders that cannot ship start (their failures are logged inside their
    // spans): one with a valid traceparent, one with a string that is not one, one with
    // a number where the string should be.
    let valid = Envelope {
        traceparent: Some(caller_traceparent()),
        ..order("order-valid", false)
    };
    let garbage = Envelope {
        traceparent: Some("00-not-a-trace".into()),
        ..order("order-garbage", false)
    };
    let mut number = serde_json::to_value(order("order-number", false)).unwrap();
    number["traceparent"] = json!(42);
    let number_id: uuid::Uuid = serde_json::from_value(number["message_id"].clone()).unwrap();
    let ids = [valid.message_id, garbage.message_id, number_id];
    env.publish_starts(vec![valid, garbage]).await;
    env.publish_raw(&[serde_json::to_vec(&number).unwrap()])
        .await;

    // Then all three run to their end (compensated): no message was malformed.
    env.wait_for_terminal(3, Duration::from_secs(60)).await;
    assert_eq!(env.count_status("compensated").await, 3);
    assert_eq!(env.dead_letter_depth().await, 0);
    let lines = json_lines(&skald.stop());

    // And each malformed value was logged with why it was ignored.
    let warnings: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "ignoring the message's malformed traceparent")
        .collect();
    let warned: Vec<String> = warnings
        .iter()
        .map(|l| {
            l["fields"]["message_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert!(warned.contains(&ids[1].to_string()), "{warnings:#?}");
    assert!(warned.contains(&ids[2].to_string()), "{warnings:#?}");
    assert!(!warned.contains(&ids[0].to_string()), "{warnings:#?}");
    assert!(
        warnings
            .iter()
            .all(|l| l["level"] == "WARN" && l["fields"]["reason"].is_string())
    );

    // And without an exporter the caller's trace id still labels the valid one's logs,
    // while the others have none.
    let valid_lines = lines_of(&lines, &instance_id_for(ids[0]).to_string());
    assert!(!valid_lines.is_empty());
    assert!(
        valid_lines
            .iter()
            .all(|l| l["span"]["trace_id"] == CALLER_TRACE)
    );
    for id in &ids[1..] {
        let other = lines_of(&lines, &instance_id_for(*id).to_string());
        assert!(
            other.iter().all(|l| l["span"].get("trace_id").is_none()),
            "{other:#?}"
        );
    }
    env.cleanup().await;
}

#[actix_rt::test]
async fn a_participant_services_handling_joins_the_sagas_trace() {
    // Given skald and the three sample services as processes, all exporting to one
    // receiver.
    let receiver = Receiver::start();
    let env = TestEnv::new(order_services_with(&[])).await;
    let services = Services::new(&env).await;
    // No OTEL_SERVICE_NAME: each process names itself (`skald`, or the sample's name).
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let children = Children(
        SAMPLES
            .iter()
            .map(|sample| {
                env.skald(&[
                    "participant",
                    "sample",
                    sample.name(),
                    "--database-url",
                    services.url(*sample),
                ])
                .envs(otel)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn the sample service")
            })
            .collect(),
    );
    let mut skald = Skald::spawn(&env, &otel);

    // When a caller starts an order in its trace.
    let start = Envelope {
        traceparent: Some(caller_traceparent()),
        ..Envelope::start(
            "order_services",
            None,
            json!({"order_id": "o-1", "sku": "SKU-1", "qty": 2, "account": "alice", "amount": 25.5}),
        )
    };
    env.publish_starts(vec![start]).await;
    env.wait_for_terminal(1, Duration::from_secs(60)).await;
    let named = |s: &Span, name: &str| s.name == name;
    let spans = receiver.wait_for(Duration::from_secs(20), |spans| {
        [
            "stock/reserve_stock",
            "payments/charge_card",
            "shipping/create_shipment",
        ]
        .iter()
        .all(|n| spans.iter().any(|s| named(s, n)))
            && spans
                .iter()
                .filter(|s| s.attr("outcome") == "succeeded")
                .count()
                >= 3
    });
    skald.stop();
    drop(children);

    // Then every span is in the caller's trace, and each service's handling is the
    // child of the attempt that sent its command, and the parent of skald's handling
    // of its reply.
    for s in &spans {
        assert_eq!(s.trace_id, CALLER_TRACE, "{s:#?}");
    }
    for (service, step) in [
        ("stock", "reserve_stock"),
        ("payments", "charge_card"),
        ("shipping", "create_shipment"),
    ] {
        let attempt = format!("order_services/{step}/forward");
        let find = |outcome: &str| {
            spans
                .iter()
                .find(|s| s.name == attempt && s.attr("outcome") == outcome)
                .unwrap_or_else(|| panic!("no {attempt} span with outcome {outcome}: {spans:#?}"))
        };
        let (sent, replied) = (find("sent"), find("succeeded"));
        let handled = spans
            .iter()
            .find(|s| s.name == format!("{service}/{step}"))
            .unwrap();
        assert_eq!(sent.service, "skald");
        assert_eq!(handled.service, service);
        assert_eq!(handled.attr("type"), step);
        assert_eq!(handled.attr("aggregate"), "o-1");
        assert_eq!(handled.parent_span_id, sent.span_id, "{handled:#?}");
        assert_eq!(replied.parent_span_id, handled.span_id, "{replied:#?}");
    }
    services.stop_all().await;
    env.cleanup().await;
}

/// Everything the instance's handled messages sent, as one text.
async fn sent_by(env: &TestEnv, instance: uuid::Uuid) -> String {
    sqlx::query_scalar(
        "SELECT coalesce(string_agg(outgoing::text, ' '), '') FROM skald.inbox \
         WHERE instance_id = $1",
    )
    .bind(instance)
    .fetch_one(&env.pool)
    .await
    .unwrap()
}

#[actix_rt::test]
async fn starts_through_the_api_header_and_the_cli_option_join_the_callers_trace() {
    use actix_web::test::TestRequest;
    // Given skald (no exporter: the caller's context is passed on as it came) and its API.
    let env = TestEnv::new(traced_sagas()).await;
    let app = env.start_app().await;
    let svc = crate::api::service(app.api.clone()).await;
    let start = |order: &str, traceparent: &str| {
        TestRequest::post()
            .uri("/api/v1/instances")
            .insert_header(("traceparent", traceparent))
            .set_json(json!({"saga": "traced_order", "payload": {"order_id": order, "ship": true}}))
    };

    // When one order starts through the API in the caller's trace, one with a header
    // that is no traceparent, and one through `skald start --traceparent`…
    let (status, traced) = crate::api::call(&svc, start("order-api", &caller_traceparent())).await;
    assert_eq!(status.as_u16(), 202, "{traced}");
    let (status, plain) = crate::api::call(&svc, start("order-plain", "00-garbage-01")).await;
    assert_eq!(
        status.as_u16(),
        202,
        "an invalid header is ignored: {plain}"
    );
    let cli: Value = serde_json::from_str(&env.skald_ok(&[
        "start",
        "traced_order",
        "--data",
        r#"{"order_id": "order-cli", "ship": true}"#,
        "--traceparent",
        &caller_traceparent(),
        "--json",
    ]))
    .unwrap();
    // …while an invalid `--traceparent` is refused before anything is published.
    let refused = env
        .skald(&["start", "traced_order", "--data", r#"{"order_id": "x"}"#])
        .args(["--traceparent", "00-garbage-01"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("not a W3C traceparent"), "{said}");

    // Then the three run to their end, and what the traced ones sent carries the
    // caller's trace id; the other's carries no trace of the garbage.
    env.wait_for_terminal(3, Duration::from_secs(60)).await;
    let id = |v: &Value| uuid::Uuid::parse_str(v["instance_id"].as_str().unwrap()).unwrap();
    assert!(sent_by(&env, id(&traced)).await.contains(CALLER_TRACE));
    assert!(sent_by(&env, id(&cli)).await.contains(CALLER_TRACE));
    let other = sent_by(&env, id(&plain)).await;
    assert!(!other.is_empty() && !other.contains("garbage"), "{other}");
    app.stop().await;
    env.cleanup().await;
}
