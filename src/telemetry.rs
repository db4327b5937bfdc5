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
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&settings.filter));
    // stderr: stdout is for what commands print (`outbox dead` lines, `check-config`).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr);
    let result = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
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
