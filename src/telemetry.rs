//! Logs: `tracing`, as text or JSON, with a root span per request that carries the gateway's
//! `X-Request-ID` and `X-Conversation-ID` (tracing-actix-web's own request id ignores them).

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Writes JSON log lines with `"service"` and `"version"` first: the JSON formatter writes each
/// event with one `write`, so the fields go in after its opening brace.
struct ServiceStamped<W>(W);

const SERVICE_FIELDS: &str = concat!(
    r#"{"service":"kci-receiver","version":""#,
    env!("CARGO_PKG_VERSION"),
    r#"","#
);

impl<W: std::io::Write> std::io::Write for ServiceStamped<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match buf.strip_prefix(b"{") {
            Some(rest) => {
                let mut line = Vec::with_capacity(SERVICE_FIELDS.len() + rest.len());
                line.extend_from_slice(SERVICE_FIELDS.as_bytes());
                line.extend_from_slice(rest);
                self.0.write_all(&line)?;
                Ok(buf.len())
            }
            None => self.0.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Exports spans while it lives: dropping it flushes what is buffered (at the end of `main`).
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // The exporter's HTTP client blocks: not on a runtime thread.
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

/// Whether the standard OpenTelemetry variables ask for OTLP trace export: an endpoint is set
/// (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`), the SDK is not
/// disabled (`OTEL_SDK_DISABLED`) and `OTEL_TRACES_EXPORTER` is not `none`.
fn otlp_wanted() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let is = |name: &str, value: &str| {
        std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
    };
    (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !is("OTEL_SDK_DISABLED", "true")
        && !is("OTEL_TRACES_EXPORTER", "none")
}

/// The OTLP/HTTP (protobuf) trace pipeline, configured by the standard `OTEL_*` variables
/// (endpoint, headers, timeout, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_BSP_*`).
fn otlp_provider() -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig as _;
    // The exporter's blocking HTTP client must not be built on a runtime thread.
    let exporter = std::thread::spawn(|| {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .build()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("building the OTLP exporter panicked"))??;
    let mut resource = opentelemetry_sdk::Resource::builder().with_attribute(
        opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    );
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("kci-receiver");
    }
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build())
}

/// Installs the global subscriber, writing to stderr (`RUST_LOG` overrides the configured
/// filter), and, when the `OTEL_*` variables ask for it, exports spans over OTLP: each request's
/// span, a child of the gateway's `traceparent` when it sent one. Keep the returned value alive.
pub fn init(settings: &LogSettings) -> Telemetry {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let provider = match otlp_wanted().then(otlp_provider).transpose() {
        Ok(provider) => provider,
        Err(error) => {
            eprintln!("OpenTelemetry export is off: {error}");
            None
        }
    };
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer().with_tracer(provider.tracer("kci-receiver"))
    });

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    // The AMQP client logs a lost connection at ERROR from its I/O loop. A broker outage is
    // handled (KCIs wait in the outbox, the relay reconnects and says so at WARN): those events
    // are dropped, so that ERROR keeps meaning "a person must look". The client's warnings and
    // everything else still pass.
    let amqp_client_errors = tracing_subscriber::filter::filter_fn(|metadata| {
        !(metadata.target().starts_with("lapin") && *metadata.level() == tracing::Level::ERROR)
    });
    // stderr: stdout is for what commands print (`outbox dead` lines, `check-config`).
    // Colours only on a terminal: a log file or `podman logs` gets plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(amqp_client_errors)
        .with(otel);
    let result = match settings.format {
        // One object per line: the event's fields flat, the innermost span (the request's ids)
        // once, not again in a list of spans, and which service and version wrote it.
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(|| ServiceStamped(std::io::stderr())),
            )
            .try_init(),
        LogFormat::Text => registry.with(fmt).try_init(),
    };
    if result.is_err() {
        tracing::debug!("a tracing subscriber was already installed");
    }
    if provider.is_some() {
        tracing::info!("exporting traces over OTLP (OTEL_EXPORTER_OTLP_* variables)");
    }
    Telemetry { provider }
}

/// The `traceparent` (and `tracestate`) of a request, for OpenTelemetry's propagator.
struct RequestHeaders<'a>(&'a actix_web::http::header::HeaderMap);

impl opentelemetry::propagation::Extractor for RequestHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// The W3C trace context of the current span when OpenTelemetry export is on (none otherwise):
/// the id the exported span has, so that what intake publishes names it as the parent.
pub fn current_span_context() -> Option<crate::trace_context::TraceContext> {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let context = tracing::Span::current().context();
    let span = context.span();
    let span = span.span_context();
    span.is_valid().then(|| crate::trace_context::TraceContext {
        trace_id: span.trace_id().to_bytes(),
        span_id: span.span_id().to_bytes(),
        flags: span.trace_flags().to_u8(),
    })
}

/// Root span of every HTTP request.
pub struct KciRootSpan;

fn header<'a>(request: &'a ServiceRequest, name: &str) -> &'a str {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

impl RootSpanBuilder for KciRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let x_request_id = header(request, "x-request-id");
        let x_conversation_id = header(request, "x-conversation-id");
        let span = tracing_actix_web::root_span!(
            request,
            x_request_id,
            x_conversation_id,
            trace_id = tracing::field::Empty
        );
        // With OpenTelemetry export, the request's span is a child of the caller's trace
        // (`traceparent`, W3C); without, this does nothing.
        use opentelemetry::propagation::TextMapPropagator as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new()
            .extract(&RequestHeaders(request.headers()));
        let _ = span.set_parent(parent);
        span
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    #[test]
    fn json_lines_say_which_service_and_version_wrote_them() {
        let mut out = super::ServiceStamped(Vec::new());
        out.write_all(br#"{"level":"INFO","message":"hi"}"#)
            .unwrap();
        out.write_all(b"not json").unwrap();
        let text = String::from_utf8(out.0).unwrap();
        let (line, rest) = text.split_at(text.find('}').unwrap() + 1);
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(value["service"], "kci-receiver");
        assert_eq!(value["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(value["message"], "hi");
        assert_eq!(rest, "not json");
    }
}
