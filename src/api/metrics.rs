//! `GET /metrics`: Prometheus text format, guarded by the API token when one is set.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use actix_web::{HttpResponse, web};

use super::{ApiError, ApiState};

/// Upper bounds (seconds) of the step-latency histogram buckets in `/metrics`.
const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// `GET /metrics`: Prometheus text format (this process's counters, and instance
/// and dead-letter gauges from PostgreSQL).
pub async fn metrics(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    let s = state.engine.stats();
    let mut out = String::new();
    let counters: [(&str, &str, &std::sync::atomic::AtomicU64); 10] = [
        (
            "skald_steps_applied_total",
            "Step and compensation attempts committed.",
            &s.applied,
        ),
        (
            "skald_step_failures_total",
            "Attempts that failed (each retried or compensated).",
            &s.failed_attempts,
        ),
        (
            "skald_retries_total",
            "Retries scheduled after a failed attempt.",
            &s.retries,
        ),
        (
            "skald_compensations_total",
            "Compensations committed.",
            &s.compensations,
        ),
        (
            "skald_duplicates_total",
            "Copies of handled messages dropped by the inbox.",
            &s.duplicates,
        ),
        (
            "skald_stale_discards_total",
            "Starts older than their aggregate's watermark.",
            &s.stale,
        ),
        (
            "skald_skipped_total",
            "Messages out of date for their instance.",
            &s.skipped,
        ),
        (
            "skald_malformed_total",
            "Unreadable messages sent to the dead-letter queue.",
            &s.malformed,
        ),
        (
            "skald_infra_retries_total",
            "Waits after a database or broker failure.",
            &s.infra_retries,
        ),
        (
            "skald_data_errors_total",
            "Messages whose data PostgreSQL refused (dead-lettered, code data_error).",
            &s.data_errors,
        ),
    ];
    for (name, help, value) in counters {
        let value = value.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP skald_live_actors Aggregate actors alive.\n# TYPE skald_live_actors gauge\nskald_live_actors {}",
        s.live_actors.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        out,
        "# HELP skald_stuck_messages Messages held by infrastructure failures for longer than SKALD_STUCK_AFTER_MS.\n# TYPE skald_stuck_messages gauge\nskald_stuck_messages {}",
        s.stuck.load(Ordering::Relaxed)
    );
    let h = &s.step_latency;
    let _ = writeln!(
        out,
        "# HELP skald_step_seconds Time to handle one message, taken to acked.\n# TYPE skald_step_seconds histogram"
    );
    for (bound, count) in LATENCY_BOUNDS.iter().zip(h.cumulative(LATENCY_BOUNDS)) {
        let _ = writeln!(out, "skald_step_seconds_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(
        out,
        "skald_step_seconds_bucket{{le=\"+Inf\"}} {}",
        h.count()
    );
    let _ = writeln!(
        out,
        "skald_step_seconds_sum {}\nskald_step_seconds_count {}",
        h.sum_seconds(),
        h.count()
    );
    let _ = writeln!(
        out,
        "# HELP skald_instances Saga instances by saga and status.\n# TYPE skald_instances gauge"
    );
    for c in state.store.status_counts().await? {
        let _ = writeln!(
            out,
            "skald_instances{{saga=\"{}\",status=\"{}\"}} {}",
            c.saga,
            c.status.as_str(),
            c.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP skald_dead_letters Dead letters by kind and status.\n# TYPE skald_dead_letters gauge"
    );
    for (kind, status, n) in state.store.dead_letter_counts().await? {
        let _ = writeln!(
            out,
            "skald_dead_letters{{kind=\"{kind}\",status=\"{status}\"}} {n}"
        );
    }
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(out))
}
