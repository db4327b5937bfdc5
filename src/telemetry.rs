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

/// Installs the global subscriber, writing to stderr. `RUST_LOG` overrides the configured filter.
pub fn init(settings: &LogSettings) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

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
        .with(amqp_client_errors);
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
        tracing_actix_web::root_span!(
            request,
            x_request_id,
            x_conversation_id,
            trace_id = tracing::field::Empty
        )
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
