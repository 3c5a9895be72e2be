//! The spans a saga's trace is made of, and how their context travels in messages.
//!
//! One `message` span per message skald handles (a step attempt, a compensation, a
//! command's reply or reply timer), one `command` span per message a participant
//! service handles. Each joins the trace of the `traceparent` its message carries and
//! stamps its own context on the messages it sends, so a saga instance is one trace
//! across processes. Without an exporter these spans are the log spans they always
//! were: the traceparent a message came with is passed on unchanged.

use opentelemetry::trace::{
    SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use super::TraceParent;
use crate::envelope::{Command, Outgoing};
use crate::participant::wire::{Reply, ServiceMessage};
use crate::saga::SagaDef;
use crate::saga::coordinator::{Cursor, FailureKind, Outcome};

/// The span skald handles one message in: fields `saga`, `instance`, `aggregate`,
/// `step` (its index), `step_name`, `phase`, `attempt`, `message_id`, `trace_id`; its
/// trace span is named `<saga>/<step_name>/<phase>` (field `otel.name`). It is a
/// child of the span `traceparent` names, else the root of a new trace.
pub fn message_span(
    saga: &SagaDef,
    aggregate: &str,
    instance: Uuid,
    cursor: Cursor,
    message_id: Uuid,
    traceparent: Option<&str>,
) -> Span {
    let step_name = saga
        .steps
        .get(cursor.step as usize)
        .map_or("", |s| s.name.as_str());
    let span = tracing::info_span!(
        target: "skald::engine",
        "message",
        saga = %saga.name,
        instance = %instance,
        aggregate = %aggregate,
        step = cursor.step,
        step_name = step_name,
        phase = cursor.phase.as_str(),
        attempt = cursor.attempt,
        message_id = %message_id,
        trace_id = Empty,
        otel.name = format!("{}/{}/{}", saga.name, step_name, cursor.phase.as_str()),
    );
    join(&span, traceparent);
    span
}

/// The span a participant service handles `msg` in: fields `service`, `type`,
/// `aggregate`, `message_id`, `trace_id`; its trace span is named `<service>/<type>`.
/// A child of the span the message's `traceparent` names (a saga step's attempt).
pub fn command_span(service: &str, msg: &ServiceMessage) -> Span {
    let span = tracing::info_span!(
        target: "skald::participant",
        "command",
        service = %service,
        r#type = %msg.kind,
        aggregate = %msg.aggregate_id,
        message_id = %msg.message_id,
        trace_id = Empty,
        otel.name = format!("{service}/{}", msg.kind),
    );
    join(&span, msg.traceparent.as_deref());
    span
}

/// Makes `span` a child of `traceparent` (or, without one, the root of a new trace)
/// and records its `trace_id`: the trace's, or without an exporter the traceparent's.
fn join(span: &Span, traceparent: Option<&str>) {
    // Values are checked when a message is read; one that is not valid here is not ours.
    let parent = traceparent.and_then(|t| TraceParent::parse(t).ok());
    let cx = parent.map_or_else(opentelemetry::Context::new, remote_context);
    // Fails only without the OpenTelemetry layer (no exporter): nothing to join then.
    let _ = span.set_parent(cx);
    let own = context_of(span);
    if let Some(trace) = own.or(parent) {
        span.record("trace_id", trace.trace_id_hex());
    }
}

/// The OpenTelemetry context whose (remote) span is `tp`'s parent.
fn remote_context(tp: TraceParent) -> opentelemetry::Context {
    let remote = SpanContext::new(
        TraceId::from_bytes(tp.trace_id.to_be_bytes()),
        SpanId::from_bytes(tp.parent_id.to_be_bytes()),
        TraceFlags::new(tp.flags),
        true,
        TraceState::default(),
    );
    opentelemetry::Context::new().with_remote_span_context(remote)
}

/// `span`'s own trace context, when an exporter records it.
fn context_of(span: &Span) -> Option<TraceParent> {
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    sc.is_valid().then(|| TraceParent {
        trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
        parent_id: u64::from_be_bytes(sc.span_id().to_bytes()),
        flags: sc.trace_flags().to_u8(),
    })
}

/// The `traceparent` that messages sent now carry: the current span's, else (no
/// exporter) `incoming`, the one the message being handled came with.
pub fn outgoing_traceparent(incoming: Option<&str>) -> Option<String> {
    context_of(&Span::current())
        .map(|tp| tp.to_string())
        .or_else(|| incoming.map(str::to_string))
}

/// Stamps the trace context on what handling a message of `instance` (which came with
/// `incoming`) sends: its instance's next messages and the commands to services. A
/// message for another instance (the next one an exclusive saga promotes) is left
/// alone: each instance is its own trace.
pub fn propagate(outgoing: &mut [Outgoing], instance: Uuid, incoming: Option<&str>) {
    let Some(tp) = outgoing_traceparent(incoming) else {
        return;
    };
    for out in outgoing {
        let ours = match out.envelope.command {
            Command::Run { instance_id, .. } | Command::Timer { instance_id, .. } => {
                instance_id == instance
            }
            Command::Start => false,
        };
        if !ours {
            continue;
        }
        out.envelope.traceparent = Some(tp.clone());
        if let Some(command) = &mut out.command {
            command.message.traceparent = Some(tp.clone());
        }
    }
}

/// The body of `reply` as sent now: carrying the current span's context (the service's
/// handling of the command), else the traceparent it already has.
pub fn reply_body(reply: &Reply) -> Vec<u8> {
    match outgoing_traceparent(reply.traceparent.as_deref()) {
        Some(tp) if reply.traceparent.as_deref() != Some(tp.as_str()) => Reply {
            traceparent: Some(tp),
            ..reply.clone()
        }
        .to_body(),
        _ => reply.to_body(),
    }
}

/// Records how the attempt handled in the current span ended: attribute `outcome`
/// (`succeeded`, `failed_retryable`, `failed_fatal`), `error` when it failed, and the
/// span's status (error when it failed).
pub fn record_attempt(outcome: Outcome, error: Option<&str>) {
    let span = Span::current();
    let name = match outcome {
        Outcome::Succeeded => "succeeded",
        Outcome::Failed(FailureKind::Retryable) => "failed_retryable",
        Outcome::Failed(FailureKind::Fatal) => "failed_fatal",
    };
    span.set_attribute("outcome", name);
    if let Some(error) = error {
        span.set_attribute("error", error.to_string());
        span.set_status(Status::error(error.to_string()));
    }
}

/// Records that the attempt in the current span sent its command and waits for the
/// reply: attribute `outcome` = `sent`.
pub fn record_sent() {
    Span::current().set_attribute("outcome", "sent");
}
