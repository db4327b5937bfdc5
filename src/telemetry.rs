//! Logs: `tracing`, as text or JSON, with a root span per request that carries the gateway's
//! `X-Request-ID` and `X-Conversation-ID` (tracing-actix-web's own request id ignores them).

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

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
        LogFormat::Json => registry
            .with(fmt.json().flatten_event(true).with_current_span(true))
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
        tracing_actix_web::root_span!(request, x_request_id, x_conversation_id)
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}
