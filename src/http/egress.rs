//! The egress proxy's HTTP side: `<egress.path_prefix>/...` goes to the Tenant API (see
//! [`crate::egress`]). Answers come back unchanged (status, headers, body streamed), with
//! `X-Request-ID` and `X-Conversation-ID` added; failures to reach the gateway answer in the
//! gateway's error format. Every call is in the audit log.

use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::Value;

use super::{AppState, audit_record, read_limited};
use crate::auth::OpsRole;
use crate::egress::{EgressError, Outbound, creates_something, is_returned, original_request};
use crate::error::ApiError;
use crate::store::audit::{AuditOutcome, AuditRecord};

/// The methods the proxy forwards (the Tenant API's); others are answered 405.
pub const PROXIED_METHODS: &str = "GET, POST, PUT, PATCH, DELETE";

/// A guard that lets the proxied methods through.
pub fn proxied_method() -> impl actix_web::guard::Guard {
    actix_web::guard::Any(actix_web::guard::Get())
        .or(actix_web::guard::Post())
        .or(actix_web::guard::Put())
        .or(actix_web::guard::Patch())
        .or(actix_web::guard::Delete())
}

/// Bodies of upstream answers kept in the audit log (larger ones by size only).
const AUDIT_RESPONSE_LIMIT: usize = 64 * 1024;

#[utoipa::path(method(get, post, put, patch, delete), path = "/fibre-cafe/v1/{path}", tag = "egress",
    description = "Forwards any Tenant API call to egress.upstream_base_url (mounted at egress.path_prefix, \
default shown) with an OAuth2 token; X-Request-ID and X-Conversation-ID are generated when absent and returned. \
Creating calls are recorded as original requests. Only when egress.enabled.",
    params(("path" = String, Path, description = "The Tenant API path, e.g. service-orders")),
    responses((status = 200, description = "The Tenant API's answer, unchanged"),
              (status = 502, description = "The gateway could not be reached or gave no error body", body = crate::error::ErrorBody),
              (status = 504, description = "The gateway did not answer in time", body = crate::error::ErrorBody),
              (status = 401, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn proxy(
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> HttpResponse {
    let mut audit = AuditRecord {
        outcome: AuditOutcome::Proxied,
        ..audit_record(&request)
    };
    let (mut response, ids) = match forward(&request, payload, &state, &mut audit).await {
        Ok(answer) => answer,
        Err(error) => {
            let body = error.to_body();
            audit.response_status = error.status().as_u16();
            audit.response_body = serde_json::to_string(&body).ok();
            audit.error_uuid = Some(body.uuid);
            audit.error_code = Some(body.code.as_str().to_owned());
            audit.outcome = AuditOutcome::ProxyFailed;
            let ids = (audit.request_id.clone(), audit.conversation_id.clone());
            (
                error.response(&body, state.settings.server.retry_after_seconds),
                ids,
            )
        }
    };
    for (name, value) in [("x-request-id", ids.0), ("x-conversation-id", ids.1)] {
        if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
            response
                .headers_mut()
                .insert(HeaderName::from_static(name), value);
        }
    }
    state.audit.record(audit);
    response
}

type Ids = (Option<String>, Option<String>);

async fn forward(
    request: &HttpRequest,
    payload: web::Payload,
    state: &AppState,
    audit: &mut AuditRecord,
) -> Result<(HttpResponse, Ids), ApiError> {
    audit.principal = Some(state.auth.operations(request.headers(), OpsRole::Egress)?);
    let Some(client) = &state.egress else {
        return Err(ApiError::NotFound(
            "The egress proxy is not enabled".to_owned(),
        ));
    };
    let limit = client.settings().max_body_bytes;
    let body = read_limited(payload, limit)
        .await
        .map_err(|(error, received)| {
            audit.body_size = received as i64;
            error
        })?;
    audit.body_size = body.len() as i64;
    if body.len() <= state.settings.server.audit_body_limit_bytes {
        audit.body = Some(String::from_utf8_lossy(&body).into_owned());
    }

    let prefix = &client.settings().path_prefix;
    let path = request.path().strip_prefix(prefix.as_str()).unwrap_or("");
    let path = if path.is_empty() { "/" } else { path };
    let path_and_query = match request.query_string() {
        "" => path.to_owned(),
        query => format!("{path}?{query}"),
    };
    let outbound = Outbound {
        method: request.method().clone(),
        path_and_query,
        headers: request
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
            .collect(),
        body,
    };

    let upstream = client.send(&outbound).await.map_err(|error| {
        let status = match &error {
            EgressError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            EgressError::Unreachable(_) | EgressError::Token(_) => StatusCode::BAD_GATEWAY,
            EgressError::Refused(message) => return ApiError::Refused(vec![message.clone()]),
        };
        ApiError::Upstream {
            status,
            message: error.to_string(),
        }
    })?;
    audit.request_id = Some(upstream.request_id.clone());
    audit.conversation_id = Some(upstream.conversation_id.clone());
    let ids = (
        Some(upstream.request_id.clone()),
        Some(upstream.conversation_id.clone()),
    );
    let status = StatusCode::from_u16(upstream.response.status().as_u16())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    audit.response_status = status.as_u16();

    let mut answer = HttpResponse::build(status);
    for (name, value) in upstream.response.headers() {
        if is_returned(name.as_str()) {
            answer.append_header((name.as_str(), value.as_bytes()));
        }
    }
    let creating = creates_something(&outbound.method, outbound.path()) && status.is_success();
    if !creating && !status.is_server_error() {
        // Streamed back as it comes.
        let stream = upstream.response.bytes_stream();
        return Ok((answer.streaming(stream), ids));
    }

    let bytes = upstream
        .response
        .bytes()
        .await
        .map_err(|e| ApiError::Upstream {
            status: StatusCode::BAD_GATEWAY,
            message: format!("The Fibre Cafe gateway's answer could not be read: {e}"),
        })?;
    if bytes.len() <= AUDIT_RESPONSE_LIMIT {
        audit.response_body = Some(String::from_utf8_lossy(&bytes).into_owned());
    }
    if status.is_server_error() {
        // The gateway's own error body is passed on; anything else (a load balancer's page) is
        // answered in the gateway's format.
        let is_gateway_error = serde_json::from_slice::<Value>(&bytes)
            .ok()
            .is_some_and(|v| {
                v.get("uuid").is_some() && v.get("code").is_some() && v.get("messages").is_some()
            });
        if !is_gateway_error {
            return Err(ApiError::Upstream {
                status: StatusCode::BAD_GATEWAY,
                message: format!(
                    "The Fibre Cafe gateway answered {} without an error body",
                    status.as_u16()
                ),
            });
        }
        audit.outcome = AuditOutcome::ProxiedUpstreamError;
        return Ok((answer.body(bytes), ids));
    }
    // The gateway has answered: whatever happens to the recording, its answer goes back
    // unchanged (a "please retry" would place the order twice). A recording that fails now is
    // retried in the background.
    let recorded = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        state.intake.register(
            original_request(
                &outbound,
                &upstream.request_id,
                &upstream.conversation_id,
                status.as_u16(),
                &bytes,
            ),
            entity::conversation::ConversationSource::Egress,
        ),
    )
    .await;
    match recorded {
        Ok(Ok(registration)) => tracing::info!(
            conversation_id = %upstream.conversation_id,
            operation = %registration.conversation.operation,
            gateway_id = ?registration.conversation.gateway_id,
            matched = registration.matched_entities,
            "original request recorded by the egress proxy"
        ),
        failure => {
            let error = match failure {
                Ok(Err(error)) => error.to_string(),
                _ => "no answer from the database within 5 s".to_owned(),
            };
            tracing::warn!(
                conversation_id = %upstream.conversation_id,
                request_id = %upstream.request_id,
                error,
                "the gateway answered, but the original request could not be recorded yet; retrying in the background"
            );
            audit.outcome = AuditOutcome::ProxiedNotRecordedYet;
            state.unrecorded.add(
                &outbound,
                &upstream.request_id,
                &upstream.conversation_id,
                status.as_u16(),
                &bytes,
                error,
            );
        }
    }
    Ok((answer.body(bytes), ids))
}
