//! Installing the process's tracing subscriber: logs to stderr (text or JSON) and, when
//! the standard OpenTelemetry variables name an endpoint, traces exported over
//! OTLP/HTTP (protobuf). Without an endpoint no exporter is built at all.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Why telemetry could not be set up; the process exits with status 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryError {
    /// `SKALD_LOG_FORMAT` is neither `text` nor `json`.
    #[error("SKALD_LOG_FORMAT={0:?} is invalid: expected text or json")]
    LogFormat(String),
    /// An OTLP protocol other than `http/protobuf`.
    #[error("{var}={value:?} is not supported: skald exports traces with http/protobuf")]
    Protocol {
        /// The variable that named it.
        var: &'static str,
        /// What it said.
        value: String,
    },
    /// `OTEL_TRACES_EXPORTER` names an exporter other than `otlp` or `none`.
    #[error("OTEL_TRACES_EXPORTER={0:?} is not supported: expected otlp or none")]
    Exporter(String),
    /// An `https` endpoint: this build has no TLS.
    #[error(
        "{var}={value:?}: https is not supported (no TLS in this build); use an http:// collector endpoint"
    )]
    Tls {
        /// The variable that named it.
        var: &'static str,
        /// The endpoint.
        value: String,
    },
    /// The exporter could not be built (an endpoint that is not a URL...).
    #[error("OpenTelemetry exporter: {0}")]
    Build(String),
}

/// What the environment asks of trace export, decided without I/O.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportPlan {
    /// Nothing is exported: no exporter, no OpenTelemetry layer.
    Off,
    /// Spans go to this OTLP/HTTP endpoint (the variable's value as given).
    Otlp {
        /// The endpoint.
        endpoint: String,
    },
}

/// The subset of `OTEL_*` variables skald reads itself (the SDK reads the rest:
/// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, headers, timeout, sampler, batch
/// settings).
pub fn export_plan(var: impl Fn(&str) -> Option<String>) -> Result<ExportPlan, TelemetryError> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Ok(ExportPlan::Off);
    }
    match set("OTEL_TRACES_EXPORTER").map(|v| v.trim().to_ascii_lowercase()) {
        None => {}
        Some(v) if v == "otlp" => {}
        Some(v) if v == "none" => return Ok(ExportPlan::Off),
        Some(v) => return Err(TelemetryError::Exporter(v)),
    }
    let endpoint = [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find_map(|name| set(name).map(|value| (name, value)));
    let Some((endpoint_var, endpoint)) = endpoint else {
        return Ok(ExportPlan::Off);
    };
    for name in [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ] {
        if let Some(value) = set(name) {
            if value.trim() != "http/protobuf" {
                return Err(TelemetryError::Protocol { var: name, value });
            }
            // The signal's own variable wins over the general one.
            break;
        }
    }
    if endpoint.trim().to_ascii_lowercase().starts_with("https:") {
        return Err(TelemetryError::Tls {
            var: endpoint_var,
            value: endpoint,
        });
    }
    Ok(ExportPlan::Otlp { endpoint })
}

/// Keeps the exporter alive; dropping it flushes the spans not yet exported (waiting
/// at most the exporter's timeout).
#[must_use = "dropping it at once would stop trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("warning: OpenTelemetry exporter shutdown: {e}");
        }
    }
}

/// Installs the global subscriber: stderr logs filtered by `SKALD_LOG`, as text or
/// (`SKALD_LOG_FORMAT=json`) one JSON object per line with the fields of the span it
/// happened in; and, when [`export_plan`] says so, span export to OTLP/HTTP under the
/// service name `OTEL_SERVICE_NAME` (else `default_service`).
pub fn init(default_service: &str) -> Result<Telemetry, TelemetryError> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SKALD_LOG")
        // lapin logs every broker error itself, besides the error skald reports with
        // what it was doing: off by default, so that each problem is said once.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,lapin=off"));
    let format = std::env::var("SKALD_LOG_FORMAT").unwrap_or_default();
    if !matches!(format.as_str(), "" | "text" | "json") {
        return Err(TelemetryError::LogFormat(format));
    }
    let provider = match export_plan(|name| std::env::var(name).ok())? {
        ExportPlan::Off => None,
        ExportPlan::Otlp { .. } => Some(provider(default_service)?),
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("skald"))
            // Thread names and code locations are noise in a saga's trace.
            .with_threads(false)
            .with_location(false)
            // The SDK's own log lines (an export that failed) go to the log only: as
            // span events they would be telemetry about telemetry, and could loop.
            .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                !meta.target().starts_with("opentelemetry")
            }))
    });
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let stderr = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if format == "json" {
        registry
            .with(stderr.json().with_current_span(true).with_span_list(false))
            .init();
    } else {
        // Colours only on a terminal: logs piped to files stay plain text.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        registry.with(stderr.with_ansi(ansi)).init();
    }
    Ok(Telemetry { provider })
}

/// The tracer provider: a batch of spans exported over OTLP/HTTP in protobuf, from
/// the SDK's own thread (the environment gives the endpoint, headers, timeout and
/// batch settings).
fn provider(default_service: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
        .map_err(|e| TelemetryError::Build(e.to_string()))?;
    let detected = Resource::builder().build();
    let named = detected
        .get(&opentelemetry::Key::new("service.name"))
        .is_some_and(|name| !name.as_str().starts_with("unknown_service"));
    let resource = if named {
        detected
    } else {
        Resource::builder()
            .with_service_name(default_service.to_string())
            .build()
    };
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(vars: &[(&str, &str)]) -> Result<ExportPlan, TelemetryError> {
        export_plan(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn no_endpoint_means_no_exporter() {
        assert_eq!(plan(&[]), Ok(ExportPlan::Off));
        assert_eq!(
            plan(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]),
            Ok(ExportPlan::Off)
        );
        assert_eq!(
            plan(&[
                ("OTEL_SERVICE_NAME", "skald"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            ]),
            Ok(ExportPlan::Off),
            "a protocol without an endpoint exports nothing, so it is not an error"
        );
    }

    #[test]
    fn an_endpoint_exports_over_http_protobuf() {
        let on = |e: &str| Ok(ExportPlan::Otlp { endpoint: e.into() });
        assert_eq!(
            plan(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")]),
            on("http://c:4318")
        );
        assert_eq!(
            plan(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "http://t:4318/v1/traces"
                ),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ]),
            on("http://t:4318/v1/traces")
        );
        assert_eq!(
            plan(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ]),
            on("http://c:4318"),
            "the traces variable wins"
        );
        assert_eq!(
            plan(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_TRACES_EXPORTER", "otlp")
            ]),
            on("http://c:4318")
        );
    }

    #[test]
    fn export_can_be_switched_off() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        assert_eq!(
            plan(&[endpoint, ("OTEL_SDK_DISABLED", "true")]),
            Ok(ExportPlan::Off)
        );
        assert_eq!(
            plan(&[endpoint, ("OTEL_TRACES_EXPORTER", "none")]),
            Ok(ExportPlan::Off)
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318");
        for protocol in ["grpc", "http/json"] {
            assert_eq!(
                plan(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)]),
                Err(TelemetryError::Protocol {
                    var: "OTEL_EXPORTER_OTLP_PROTOCOL",
                    value: protocol.into()
                })
            );
        }
        assert_eq!(
            plan(&[endpoint, ("OTEL_TRACES_EXPORTER", "zipkin")]),
            Err(TelemetryError::Exporter("zipkin".into()))
        );
        assert!(matches!(
            plan(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "HTTPS://c:4318")]),
            Err(TelemetryError::Tls {
                var: "OTEL_EXPORTER_OTLP_ENDPOINT",
                ..
            })
        ));
        assert_eq!(
            TelemetryError::LogFormat("xml".into()).to_string(),
            r#"SKALD_LOG_FORMAT="xml" is invalid: expected text or json"#
        );
    }
}
