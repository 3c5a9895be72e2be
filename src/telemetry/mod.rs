//! Traces and logs for operators: one trace per saga instance across processes.
//!
//! - `setup.rs`: the process's subscriber — stderr logs (text or JSON) and, when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` (or `…_TRACES_ENDPOINT`) is set, span export over
//!   OTLP/HTTP; with no endpoint no exporter is built.
//! - `spans.rs`: the `message` span (one per step attempt) and the participant's
//!   `command` span, joined to the `traceparent` their message carries, and the
//!   stamping of the current context on the messages they send.
//! - `traceparent.rs`: the W3C `traceparent` value, read and written (pure).

mod setup;
mod spans;
mod traceparent;

pub use setup::{ExportPlan, Telemetry, TelemetryError, export_plan, init};
pub use spans::{
    command_span, message_span, outgoing_traceparent, propagate, record_attempt, record_sent,
    reply_body,
};
pub use traceparent::{MAX_TRACEPARENT_BYTES, TraceParent, TraceParentError};

/// A message's `traceparent` field as read: kept when valid; otherwise dropped, with a
/// warning naming the message and why (a bad trace context never makes a message
/// malformed, and is never passed on).
pub fn checked_traceparent(value: Option<String>, message_id: uuid::Uuid) -> Option<String> {
    let value = value?;
    match TraceParent::parse(&value) {
        Ok(_) => Some(value),
        Err(why) => {
            let shown: String = value.chars().take(64).collect();
            tracing::warn!(%message_id, traceparent = %shown.escape_debug(), reason = %why,
                "ignoring the message's malformed traceparent");
            None
        }
    }
}
