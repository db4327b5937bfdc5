//! The HTTP surface: routes and the state handlers share.
//!
//! - `POST /kcis` ([`kcis`]): the Tenant Updates API, called by the gateway;
//! - `/api/v1/...` ([`operations`], [`conversations`], [`outbox`]): the operations API;
//! - `/dashboard`, `/metrics`, `/openapi.json`, `/healthz`, `/readyz`.

pub mod conversations;
pub mod dashboard;
pub mod egress;
pub mod health;
pub mod kcis;
pub mod metrics;
pub mod openapi;
pub mod operations;
pub mod outbox;

use std::sync::Arc;
use std::time::Instant;

use actix_web::dev::Service;
use actix_web::{HttpResponse, web};
use sea_orm::DatabaseConnection;

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::error::ApiError;
use crate::outbox::relay::RelayHealth;
use crate::outbox::signal::OutboxSignal;

/// What every handler can reach.
pub struct AppState {
    pub db: DatabaseConnection,
    /// Records KCIs, several per transaction under load (group commit).
    pub intake: crate::intake::group_commit::GroupCommit,
    pub auth: Authenticator,
    pub settings: Arc<Settings>,
    /// Wakes this process's relay when new outbox events are committed.
    pub outbox_signal: OutboxSignal,
    /// The broker as this process's relay sees it.
    pub relay_health: RelayHealth,
    pub metrics: metrics::Metrics,
    /// The egress proxy's client, when `egress.enabled`.
    pub egress: Option<crate::egress::EgressClient>,
    /// Writes the audit records of rejected requests and egress calls in the background.
    pub audit: crate::store::audit::AuditSink,
    /// `kci.entity_type_aliases`, resolved.
    pub entity_type_aliases: std::collections::HashMap<String, crate::kci::EntityType>,
}

/// Every route. `egress_prefix`: where the egress proxy is mounted, when enabled.
pub fn routes(cfg: &mut web::ServiceConfig, egress_prefix: Option<&str>) {
    use operations as ops;
    if let Some(prefix) = egress_prefix {
        cfg.service(web::scope(prefix).default_service(web::to(egress::proxy)));
    }
    // Malformed query strings and paths answer in the gateway's error format too.
    cfg.app_data(
        web::QueryConfig::default()
            .error_handler(|error, _| ApiError::Malformed(vec![format!("query: {error}")]).into()),
    )
    .app_data(
        web::PathConfig::default()
            .error_handler(|error, _| ApiError::Malformed(vec![format!("path: {error}")]).into()),
    )
    .service(
        web::resource("/kcis")
            .route(web::post().to(kcis::post_kci))
            .default_service(web::to(method_not_allowed)),
    )
    .route("/healthz", web::get().to(health::healthz))
    .route("/readyz", web::get().to(health::readyz))
    .route("/metrics", web::get().to(metrics_doc))
    .route("/openapi.json", web::get().to(openapi_doc))
    .route("/dashboard", web::get().to(dashboard::dashboard))
    .service(
        web::scope("/api/v1")
            .route("/service-orders", web::get().to(ops::list_service_orders))
            .route(
                "/service-orders/{id}",
                web::get().to(ops::get_service_order),
            )
            .route(
                "/service-orders/{id}/history",
                web::get().to(ops::service_order_history),
            )
            .route(
                "/ethernet/service-orders",
                web::get().to(ops::list_ethernet_service_orders),
            )
            .route(
                "/ethernet/service-orders/{id}",
                web::get().to(ops::get_ethernet_service_order),
            )
            .route(
                "/ethernet/service-orders/{id}/history",
                web::get().to(ops::ethernet_service_order_history),
            )
            .route("/service-tests", web::get().to(ops::list_service_tests))
            .route("/service-tests/{id}", web::get().to(ops::get_service_test))
            .route(
                "/service-tests/{id}/history",
                web::get().to(ops::service_test_history),
            )
            .route(
                "/service-problems",
                web::get().to(ops::list_service_problems),
            )
            .route(
                "/service-problems/{id}",
                web::get().to(ops::get_service_problem),
            )
            .route(
                "/service-problems/{id}/history",
                web::get().to(ops::service_problem_history),
            )
            .route("/entities", web::get().to(ops::list_all_entities))
            .route("/conversations", web::post().to(conversations::register))
            .route(
                "/conversations/{conversation_id}",
                web::get().to(ops::get_conversation),
            )
            .route("/kcis/{kci_id}", web::get().to(ops::get_kci))
            .route("/audit/{request_id}", web::get().to(ops::get_audit))
            .route("/attention", web::get().to(ops::get_attention))
            .route("/search", web::get().to(ops::search))
            .route("/outbox/dead", web::get().to(outbox::list_dead))
            .route("/outbox/dead/retry", web::post().to(outbox::retry_all))
            .route(
                "/outbox/dead/{event_id}/retry",
                web::post().to(outbox::retry_one),
            )
            .route(
                "/outbox/dead/{event_id}/skip",
                web::post().to(outbox::skip_one),
            )
            .route("/outbox/replay", web::post().to(outbox::replay)),
    )
    .default_service(web::to(not_found));
}

/// Refuses, before any handler runs, a request whose path or query string carries an encoded NUL
/// (`%00`): no id, filter or path of ours contains one, and PostgreSQL cannot even compare with
/// it (every such request was a 500). 400 in the gateway's format.
pub fn refuse_nul<S, B>(
    request: actix_web::dev::ServiceRequest,
    service: &S,
) -> futures_util::future::Either<
    S::Future,
    std::future::Ready<Result<actix_web::dev::ServiceResponse<B>, actix_web::Error>>,
>
where
    S: Service<
            actix_web::dev::ServiceRequest,
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
        >,
{
    let uri = request.uri();
    let encoded_nul = |text: &str| text.to_ascii_lowercase().contains("%00");
    if encoded_nul(uri.path()) || uri.query().is_some_and(encoded_nul) {
        let error = ApiError::Malformed(vec![
            "The path or query string contains an encoded NUL (%00)".to_owned(),
        ]);
        return futures_util::future::Either::Right(std::future::ready(Err(error.into())));
    }
    futures_util::future::Either::Left(service.call(request))
}

/// Times every request into the latency histogram, labelled by route pattern (not raw path, to
/// keep the label set small).
pub fn timing<S, B>(
    request: actix_web::dev::ServiceRequest,
    service: &S,
) -> impl std::future::Future<Output = Result<actix_web::dev::ServiceResponse<B>, actix_web::Error>>
+ use<S, B>
where
    S: Service<
            actix_web::dev::ServiceRequest,
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
        >,
{
    let started = Instant::now();
    let route = request
        .match_pattern()
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().to_string();
    let state = request.app_data::<web::Data<AppState>>().cloned();
    let response = service.call(request);
    async move {
        let response = response.await?;
        if let Some(state) = state {
            state
                .metrics
                .observe_request(&route, &method, response.status().as_u16(), started);
        }
        Ok(response)
    }
}

#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics_doc(state: web::Data<AppState>) -> HttpResponse {
    metrics::metrics(state).await
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json")))]
async fn openapi_doc() -> HttpResponse {
    openapi::openapi_json().await
}

/// The audit record of a request as it arrives; handlers fill in the rest as they go.
pub(crate) fn audit_record(request: &actix_web::HttpRequest) -> crate::store::audit::AuditRecord {
    crate::store::audit::AuditRecord {
        request_id: header_text(request, "x-request-id"),
        conversation_id: header_text(request, "x-conversation-id"),
        method: request.method().to_string(),
        path: request.uri().to_string(),
        remote_addr: request.peer_addr().map(|a| a.ip().to_string()),
        principal: None,
        headers: crate::store::audit::sanitized_headers(
            request
                .headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
        ),
        body: None,
        body_size: 0,
        response_status: 0,
        response_body: None,
        error_uuid: None,
        error_code: None,
        outcome: String::new(),
        kci_id: None,
        received_at: chrono::Utc::now(),
    }
}

/// A request header as trimmed text; none when absent, empty or not text.
pub(crate) fn header_text(request: &actix_web::HttpRequest, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// Reads a request body, refusing (413) as soon as it exceeds `limit`; returns how many bytes
/// had arrived when it was refused, for the audit log.
pub(crate) async fn read_limited(
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::Bytes, (ApiError, usize)> {
    use futures_util::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            (
                ApiError::Malformed(vec![format!("The body could not be read: {e}")]),
                body.len(),
            )
        })?;
        if body.len() + chunk.len() > limit {
            return Err((
                ApiError::PayloadTooLarge { limit },
                body.len() + chunk.len(),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("No such resource".to_owned()))
}

async fn method_not_allowed() -> HttpResponse {
    let body = crate::error::ErrorBody {
        uuid: uuid::Uuid::new_v4(),
        code: crate::error::ErrorCode::NotImplemented,
        messages: vec!["Only POST is supported on /kcis".to_owned()],
    };
    HttpResponse::MethodNotAllowed()
        .insert_header(("Allow", "POST"))
        .json(body)
}
