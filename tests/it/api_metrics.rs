//! `/metrics` as Prometheus reads it: given an order run through the three sample
//! services (command steps), then the page parses with a Prometheus text parser and
//! shows per-saga, per-step and per-command series with conventional names, and no
//! label that names an instance or an aggregate.

use std::collections::BTreeSet;
use std::time::Duration;

use actix_web::test;
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::json;
use skald::envelope::Envelope;

use crate::api::service;
use crate::helpers::{Services, TestEnv, order_services_with};

/// The labels any series may carry: each bounded by the loaded definitions or by a
/// fixed set of values.
const BOUNDED_LABELS: [&str; 10] = [
    "saga",
    "step",
    "phase",
    "outcome",
    "service",
    "type",
    "status",
    "disposition",
    "kind",
    "le",
];

fn value(sample: &Sample) -> f64 {
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{} is not a single value: {other:?}", sample.metric),
    }
}

/// The one sample of `metric` whose labels include `labels`.
fn find<'a>(scrape: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> &'a Sample {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{metric}{labels:?}: {found:?} among {:#?}",
        scrape
            .samples
            .iter()
            .map(|s| &s.metric)
            .collect::<BTreeSet<_>>()
    );
    found[0]
}

#[actix_rt::test]
async fn metrics_parse_as_prometheus_text_with_bounded_per_saga_step_and_command_series() {
    // Given an order that went through stock, payments and shipping.
    let env = TestEnv::new(order_services_with(&[])).await;
    let services = Services::running(&env).await;
    let app = env.start_app().await;
    env.publish_starts(vec![Envelope::start(
        "order_services",
        None,
        json!({"order_id": "order-m", "sku": "SKU-1", "qty": 1, "account": "alice", "amount": 5}),
    )])
    .await;
    env.wait_for_terminal(1, Duration::from_secs(60)).await;
    assert_eq!(env.count_status("completed").await, 1);

    // When Prometheus scrapes the page.
    let svc = service(app.api.clone()).await;
    let resp =
        test::call_service(&svc, test::TestRequest::get().uri("/metrics").to_request()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").unwrap(),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = String::from_utf8(test::read_body(resp).await.to_vec()).unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("parses");

    // Then each step's attempt is counted under its saga, step, phase and outcome.
    for step in ["reserve_stock", "charge_card", "create_shipment"] {
        let attempts = find(
            &scrape,
            "skald_step_attempts_total",
            &[
                ("saga", "order_services"),
                ("step", step),
                ("phase", "forward"),
                ("outcome", "succeeded"),
            ],
        );
        assert_eq!(value(attempts), 1.0, "{step}");
    }
    // Each command sent once, answered, and its reply latency observed.
    for (step, service, kind) in [
        ("reserve_stock", "stock", "reserve_stock"),
        ("charge_card", "payments", "charge_card"),
        ("create_shipment", "shipping", "create_shipment"),
    ] {
        let command = [
            ("saga", "order_services"),
            ("step", step),
            ("service", service),
            ("type", kind),
        ];
        assert_eq!(
            value(find(&scrape, "skald_commands_sent_total", &command)),
            1.0
        );
        let mut finished = command.to_vec();
        finished.push(("status", "succeeded"));
        assert_eq!(
            value(find(&scrape, "skald_commands_finished_total", &finished)),
            1.0
        );
        let Value::Histogram(buckets) = &find(&scrape, "skald_reply_seconds", &command).value
        else {
            panic!("skald_reply_seconds is a histogram")
        };
        let inf = buckets.iter().find(|b| b.less_than.is_infinite()).unwrap();
        assert_eq!(inf.count, 1.0, "{step}: {buckets:?}");
        assert_eq!(
            value(find(&scrape, "skald_reply_seconds_count", &command)),
            1.0
        );
    }
    assert_eq!(
        value(find(
            &scrape,
            "skald_replies_total",
            &[("disposition", "applied")]
        )),
        3.0
    );
    // The page's earlier names are kept.
    assert!(value(find(&scrape, "skald_steps_applied_total", &[])) >= 3.0);
    assert_eq!(value(find(&scrape, "skald_step_failures_total", &[])), 0.0);
    assert_eq!(
        value(find(
            &scrape,
            "skald_instances",
            &[("saga", "order_services"), ("status", "completed")]
        )),
        1.0
    );
    assert!(matches!(
        find(&scrape, "skald_step_seconds", &[]).value,
        Value::Histogram(_)
    ));
    for name in ["skald_live_actors", "skald_stuck_messages"] {
        find(&scrape, name, &[]);
    }
    // And no series carries a label outside the bounded set.
    let labels: BTreeSet<&str> = scrape
        .samples
        .iter()
        .flat_map(|s| s.labels.keys().map(String::as_str))
        .collect();
    assert!(
        labels.iter().all(|l| BOUNDED_LABELS.contains(l)),
        "unbounded labels: {labels:?}"
    );

    app.stop().await;
    services.stop_all().await;
    env.cleanup().await;
}
