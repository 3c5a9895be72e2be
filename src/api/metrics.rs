//! `GET /metrics`: OpenMetrics text (which Prometheus scrapes), encoded by the
//! `prometheus-client` crate, guarded by the API token when one is set.
//!
//! Two registries make one page: the engine's labelled metrics
//! ([`crate::metrics::Metrics`], kept as it works) and one built for each scrape from
//! the engine's plain counters and gauges and from PostgreSQL (instances and dead
//! letters by state). The names of the page before this crate are kept.

use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::{HttpResponse, web};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::{ApiError, ApiState};

/// The content type of OpenMetrics text 1.0.0.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    saga: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeadLetterLabels {
    kind: String,
    status: String,
}

/// `GET /metrics`: this process's counters and histograms, and instance and
/// dead-letter gauges from PostgreSQL.
pub async fn metrics(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let s = state.engine.stats();
    let mut scrape = Registry::default();
    let counters: [(&str, &str, &AtomicU64); 10] = [
        (
            "skald_steps_applied",
            "Step and compensation attempts committed.",
            &s.applied,
        ),
        (
            "skald_step_failures",
            "Attempts that failed (each retried or compensated).",
            &s.failed_attempts,
        ),
        (
            "skald_retries",
            "Retries scheduled after a failed attempt.",
            &s.retries,
        ),
        (
            "skald_compensations",
            "Compensations committed.",
            &s.compensations,
        ),
        (
            "skald_duplicates",
            "Copies of handled messages dropped by the inbox.",
            &s.duplicates,
        ),
        (
            "skald_stale_discards",
            "Starts older than their aggregate's watermark.",
            &s.stale,
        ),
        (
            "skald_skipped",
            "Messages out of date for their instance.",
            &s.skipped,
        ),
        (
            "skald_malformed",
            "Unreadable messages sent to the dead-letter queue.",
            &s.malformed,
        ),
        (
            "skald_infra_retries",
            "Waits after a database or broker failure.",
            &s.infra_retries,
        ),
        (
            "skald_data_errors",
            "Messages whose data PostgreSQL refused (dead-lettered, code data_error).",
            &s.data_errors,
        ),
    ];
    // Counters get their `_total` suffix from the encoder.
    for (name, help, value) in counters {
        scrape.register(name, help, ConstCounter::new(value.load(Ordering::Relaxed)));
    }
    let gauge = |v: &AtomicU64| ConstGauge::new(v.load(Ordering::Relaxed) as i64);
    scrape.register(
        "skald_live_actors",
        "Aggregate actors alive.",
        gauge(&s.live_actors),
    );
    scrape.register(
        "skald_stuck_messages",
        "Messages held by infrastructure failures for longer than SKALD_STUCK_AFTER_MS.",
        gauge(&s.stuck),
    );
    scrape.register(
        "skald_step_seconds",
        "Time to handle one message, taken to acked.",
        s.step_latency.exposed(),
    );
    let instances = Family::<InstanceLabels, Gauge>::default();
    for c in state.store.status_counts().await? {
        instances
            .get_or_create(&InstanceLabels {
                saga: c.saga,
                status: c.status.as_str().into(),
            })
            .set(c.count);
    }
    scrape.register(
        "skald_instances",
        "Saga instances by saga and status.",
        instances,
    );
    let letters = Family::<DeadLetterLabels, Gauge>::default();
    for (kind, status, n) in state.store.dead_letter_counts().await? {
        letters
            .get_or_create(&DeadLetterLabels { kind, status })
            .set(n);
    }
    scrape.register(
        "skald_dead_letters",
        "Dead letters by kind and status.",
        letters,
    );
    let mut out = String::new();
    encode_registry(&mut out, s.metrics.registry())
        .and_then(|()| encode_registry(&mut out, &scrape))
        .and_then(|()| encode_eof(&mut out))
        .expect("writing to a String cannot fail");
    Ok(HttpResponse::Ok().content_type(CONTENT_TYPE).body(out))
}
