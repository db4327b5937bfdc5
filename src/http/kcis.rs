//! `POST /kcis`: the Tenant Updates API 1.14 endpoint the gateway calls (spec section 1,
//! design.md "HTTP contract").
//!
//! Order of checks: credentials, then the two required headers, then content type and size,
//! then JSON, then the schema. Only a committed KCI gets 204. Every response echoes
//! `X-Request-ID` and `X-Conversation-ID`, and every request is in the audit log.

use actix_web::http::StatusCode;
use actix_web::http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::Value;

use super::{AppState, audit_record, read_limited};
use crate::auth::gateway_challenge;
use crate::error::ApiError;
use crate::intake::{self, Delivery};
use crate::kci::parse_owned_kci;
use crate::store::audit::{AuditOutcome, AuditRecord};
use crate::trace_context::TraceContext;

const X_REQUEST_ID: &str = "x-request-id";
const X_CONVERSATION_ID: &str = "x-conversation-id";
/// Longest correlation header we store; the docs give no limit (spec 1.1).
const MAX_ID_HEADER_LEN: usize = 255;

#[utoipa::path(post, path = "/kcis", tag = "tenant updates",
    request_body(content = Object, content_type = "application/json",
        description = "A KCI; its schema is `KciBody` (see `crate::http::openapi`)"),
    params(("X-Request-ID" = String, Header, description = "Unique per request"),
           ("X-Conversation-ID" = String, Header, description = "Matches the header of the request that created the order, test or problem")),
    responses(
        (status = 204, description = "Update was received and will be processed (committed before this answer)"),
        (status = 400, description = "Malformed: missing header, not JSON, wrong content type", body = crate::error::ErrorBody),
        (status = 401, description = "Unauthorised", body = crate::error::ErrorBody),
        (status = 403, description = "Not permitted", body = crate::error::ErrorBody),
        (status = 413, description = "Body too large", body = crate::error::ErrorBody),
        (status = 422, description = "Failed validation; every problem named by its field path", body = crate::error::ErrorBody),
        (status = 500, description = "Unexpected system error", body = crate::error::ErrorBody),
        (status = 503, description = "Temporarily unavailable: retry after Retry-After seconds", body = crate::error::ErrorBody),
    ),
    security(("gateway_basic" = []), ("gateway_bearer" = [])))]
pub async fn post_kci(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    // The deadline runs from arrival: reading the body counts too.
    let deadline = tokio::time::Instant::now()
        + std::time::Duration::from_millis(state.settings.intake.deadline_ms);
    let mut audit = AuditRecord {
        outcome: AuditOutcome::Rejected,
        response_status: StatusCode::NO_CONTENT.as_u16(),
        ..audit_record(&request)
    };

    // Labels of the KCI counter, known once the body is understood.
    let mut kind = ("unknown", "unknown");
    let mut response =
        match accept(&request, payload, &state, &mut audit, &mut kind, deadline).await {
            Ok(recorded) => {
                let outcome = match recorded.outcome {
                    intake::Outcome::Applied => "applied",
                    intake::Outcome::Stale => "stale",
                    intake::Outcome::DuplicateSequence => "duplicate_sequence",
                    intake::Outcome::Redelivered => "redelivered",
                    intake::Outcome::Anomaly => "anomaly",
                };
                state.metrics.kci_received(kind.0, kind.1, outcome);
                if recorded.event_id.is_some() {
                    state.outbox_signal.notify();
                }
                tracing::info!(
                    kci.outcome = ?recorded.outcome,
                    entity = recorded.tracked_entity_id,
                    event = ?recorded.event_id,
                    "KCI recorded"
                );
                HttpResponse::NoContent().finish()
            }
            Err(error) => {
                let outcome = format!("rejected_{}", error.status().as_u16());
                state.metrics.kci_received(kind.0, kind.1, &outcome);
                reject(&error, &state, audit)
            }
        };
    echo_correlation_headers(&request, &mut response);
    response
}

/// Everything up to the commit. On `Ok` the KCI, its effects and its audit record are committed.
async fn accept(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    audit: &mut AuditRecord,
    kind: &mut (&'static str, &'static str),
    deadline: tokio::time::Instant,
) -> Result<intake::Recorded, ApiError> {
    audit.principal = Some(state.auth.gateway(request).await?);

    let request_id = required_id_header(request, X_REQUEST_ID)?;
    let conversation_id = required_id_header(request, X_CONVERSATION_ID)?;
    require_json_content_type(request)?;

    let server = &state.settings.server;
    let body = read_body(
        request,
        payload,
        server.max_body_bytes,
        server.audit_body_limit_bytes,
        audit,
    )
    .await?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::Malformed(vec![format!("The body is not valid JSON: {e}")]))?;
    let kci = parse_owned_kci(value, &state.entity_type_aliases).map_err(|problems| {
        ApiError::Invalid(problems.iter().map(ToString::to_string).collect())
    })?;
    audit.kci_id = Some(kci.id);
    *kind = (
        kci.entity_type.metric_label(),
        kci.update.update_type().as_str(),
    );
    let raw_body = String::from_utf8(body.to_vec())
        .map_err(|_| ApiError::Malformed(vec!["The body is not UTF-8".to_owned()]))?;

    let delivery = Delivery {
        kci,
        raw_body,
        request_id,
        conversation_id,
        audit: audit.clone(),
        source: entity::state_transition::KciSource::Delivery,
        trace: trace_of(request),
    };
    Ok(state.intake.record(delivery, deadline).await?)
}

/// Intake's span in the gateway's trace (its `traceparent`, when valid; else a new trace), with
/// the trace id on the request's log lines.
fn trace_of(request: &HttpRequest) -> TraceContext {
    let parent = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
        .and_then(TraceContext::parse);
    // Exported over OTLP: the request's own span (already the gateway's child); else a span id
    // of intake's own in the gateway's trace.
    let trace = crate::telemetry::current_span_context()
        .unwrap_or_else(|| TraceContext::child_of(parent.as_ref()));
    tracing::Span::current().record("trace_id", trace.trace_id_hex());
    trace
}

/// Answers an error in the gateway's format, and audits it (except when the database is what
/// failed: then the log is the only record). Never waits for the database.
fn reject(error: &ApiError, state: &AppState, mut audit: AuditRecord) -> HttpResponse {
    let body = error.to_body();
    let mut response = error.response(&body, state.settings.server.retry_after_seconds);
    if error.status() == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            actix_web::http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(gateway_challenge(state.settings.gateway_auth.method)),
        );
    }
    audit.response_status = error.status().as_u16();
    audit.response_body = serde_json::to_string(&body).ok();
    audit.error_uuid = Some(body.uuid);
    audit.error_code = Some(body.code.as_str().to_owned());
    audit.outcome = match error {
        ApiError::Unavailable(_) => AuditOutcome::Unavailable,
        ApiError::Internal(_) => AuditOutcome::Failed,
        _ => AuditOutcome::Rejected,
    };
    match error {
        ApiError::Unavailable(_) => {
            tracing::warn!(audit = ?audit_summary(&audit), "not audited in the database: it is unavailable");
        }
        // Audited aggregated per source by `access::guard`: never a write per attempt.
        ApiError::Unauthenticated(_) | ApiError::Forbidden(_) => {}
        _ => state.audit.record(audit),
    }
    response
}

fn audit_summary(audit: &AuditRecord) -> (Option<&str>, Option<&str>, u16, Option<uuid::Uuid>) {
    (
        audit.request_id.as_deref(),
        audit.conversation_id.as_deref(),
        audit.response_status,
        audit.error_uuid,
    )
}

fn required_id_header(request: &HttpRequest, name: &'static str) -> Result<String, ApiError> {
    let display = if name == X_REQUEST_ID {
        "X-Request-ID"
    } else {
        "X-Conversation-ID"
    };
    let Some(raw) = request.headers().get(name) else {
        return Err(ApiError::Malformed(vec![format!(
            "The {display} header is required"
        )]));
    };
    let value = raw
        .to_str()
        .map_err(|_| {
            ApiError::Malformed(vec![format!(
                "The {display} header must be printable ASCII"
            )])
        })?
        .trim();
    if value.is_empty() || value.len() > MAX_ID_HEADER_LEN {
        return Err(ApiError::Malformed(vec![format!(
            "The {display} header must be 1 to {MAX_ID_HEADER_LEN} characters"
        )]));
    }
    Ok(value.to_owned())
}

fn require_json_content_type(request: &HttpRequest) -> Result<(), ApiError> {
    let content_type = request
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media_type = content_type.split(';').next().unwrap_or("").trim();
    if media_type.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(ApiError::Malformed(vec![format!(
            "Content-Type must be application/json, found {:?}",
            content_type
        )]))
    }
}

/// Reads the body, refusing (413) as soon as it is known to exceed the limit.
async fn read_body(
    request: &HttpRequest,
    payload: web::Payload,
    limit: usize,
    audit_limit: usize,
    audit: &mut AuditRecord,
) -> Result<web::Bytes, ApiError> {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(declared) = declared {
        audit.body_size = declared as i64;
        if declared > limit {
            return Err(ApiError::PayloadTooLarge { limit });
        }
    }
    let body = read_limited(payload, limit)
        .await
        .map_err(|(error, received)| {
            audit.body_size = received as i64;
            error
        })?;
    audit.body_size = body.len() as i64;
    if body.len() <= audit_limit {
        audit.body = Some(String::from_utf8_lossy(&body).into_owned());
    }
    Ok(body)
}

fn echo_correlation_headers(request: &HttpRequest, response: &mut HttpResponse) {
    for name in [X_REQUEST_ID, X_CONVERSATION_ID] {
        if let Some(value) = request.headers().get(name) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value.clone());
        }
    }
}
