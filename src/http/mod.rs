//! The HTTP surface: routes and the state handlers share.
//!
//! - `POST /kcis` ([`kcis`]): the Tenant Updates API, called by the gateway;
//! - `/api/v1/...` ([`operations`], [`conversations`], [`outbox`]): the operations API;
//! - `/dashboard`, `/metrics`, `/openapi.json`, `/healthz`, `/readyz`.

pub mod access;
pub mod conversations;
pub mod dashboard;
pub mod egress;
pub mod health;
pub mod kcis;
pub mod metrics;
pub mod openapi;
pub mod operations;
pub mod operator;
pub mod outbox;
pub mod reconcile;

use std::sync::Arc;
use std::time::Instant;

use actix_web::dev::Service;
use actix_web::{HttpResponse, web};

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::error::ApiError;
use crate::outbox::relay::RelayHealth;
use crate::outbox::signal::OutboxSignal;

/// What every handler can reach.
pub struct AppState {
    pub db: crate::store::Database,
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
    pub egress: Option<Arc<crate::egress::EgressClient>>,
    /// Gap repair with the Tenant API, when egress is configured.
    pub reconciler: Option<crate::reconcile::Reconciler>,
    /// Writes the audit records of rejected requests and egress calls in the background.
    pub audit: crate::store::audit::AuditSink,
    /// `kci.entity_type_aliases`, resolved.
    pub entity_type_aliases: std::collections::HashMap<String, crate::kci::EntityType>,
    /// Failed authentication: lockouts and the aggregated audit (see [`access`]).
    pub auth_failures: std::sync::Arc<access::AuthFailures>,
    /// Creating calls answered by the gateway whose recording waits for the database.
    pub unrecorded: crate::egress::unrecorded::UnrecordedRequests,
    /// The port `/metrics` is served on when `metrics.port` is set (known once bound).
    pub metrics_port: std::sync::Arc<std::sync::OnceLock<u16>>,
    /// `/openapi.json` for this configuration, serialized once.
    pub openapi: web::Bytes,
    /// `GET /api/v1/attention` answers, by (stuckFor, anomaliesWithin, limit), shared for
    /// `metrics.refresh_interval_ms` and computed one at a time.
    pub attention_answers: crate::operations::shared::SharedAnswers<
        (i64, i64, u64),
        crate::operations::queries::Attention,
    >,
}

/// One path and its one method; any other method is answered 405 with `Allow`.
macro_rules! resource {
    ($path:expr, $method:ident => $handler:expr) => {
        web::resource($path)
            .route(web::$method().to($handler))
            .default_service(web::to(|| {
                method_not_allowed(const { method_name(stringify!($method)) })
            }))
    };
}

/// The HTTP method a route function of actix stands for.
const fn method_name(route: &str) -> &'static str {
    match route.as_bytes() {
        b"get" => "GET",
        b"post" => "POST",
        _ => "GET, POST",
    }
}

/// Every route. `egress_prefix`: where the egress proxy is mounted, when enabled.
pub fn routes(cfg: &mut web::ServiceConfig, egress_prefix: Option<&str>) {
    use operations as ops;
    if let Some(prefix) = egress_prefix {
        cfg.service(
            web::scope(prefix)
                .guard(egress::proxied_method())
                .wrap_fn(access::refuse_cross_site)
                .default_service(web::to(egress::proxy)),
        )
        .service(
            web::scope(prefix)
                .default_service(web::to(|| method_not_allowed(egress::PROXIED_METHODS))),
        );
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
    .service(resource!("/kcis", post => kcis::post_kci))
    .service(resource!("/healthz", get => health::healthz))
    .service(resource!("/readyz", get => health::readyz))
    .service(resource!("/metrics", get => metrics_doc))
    .service(resource!("/openapi.json", get => openapi_doc))
    .service(resource!("/dashboard", get => dashboard::dashboard))
    .service(
        web::scope("/api/v1")
            .wrap_fn(access::refuse_cross_site)
            .wrap_fn(operator::require_operator)
            .service(resource!("/service-orders", get => ops::list_service_orders))
            .service(resource!("/service-orders/{id}", get => ops::get_service_order))
            .service(resource!("/service-orders/{id}/history", get => ops::service_order_history))
            .service(resource!("/service-orders/{id}/reconcile", post => reconcile::reconcile_service_order))
            .service(resource!("/ethernet/service-orders", get => ops::list_ethernet_service_orders))
            .service(resource!("/ethernet/service-orders/{id}", get => ops::get_ethernet_service_order))
            .service(resource!("/ethernet/service-orders/{id}/history", get => ops::ethernet_service_order_history))
            .service(resource!("/ethernet/service-orders/{id}/reconcile", post => reconcile::reconcile_ethernet_service_order))
            .service(resource!("/service-tests", get => ops::list_service_tests))
            .service(resource!("/service-tests/{id}", get => ops::get_service_test))
            .service(resource!("/service-tests/{id}/history", get => ops::service_test_history))
            .service(resource!("/service-tests/{id}/reconcile", post => reconcile::reconcile_service_test))
            .service(resource!("/service-problems", get => ops::list_service_problems))
            .service(resource!("/service-problems/{id}", get => ops::get_service_problem))
            .service(resource!("/service-problems/{id}/history", get => ops::service_problem_history))
            .service(resource!("/service-problems/{id}/reconcile", post => reconcile::reconcile_service_problem))
            .service(resource!("/entities", get => ops::list_all_entities))
            .service(resource!("/conversations", post => conversations::register))
            .service(resource!("/conversations/{conversation_id}", get => ops::get_conversation))
            .service(resource!("/kcis/{kci_id}", get => ops::get_kci))
            .service(resource!("/audit/{request_id}", get => ops::get_audit))
            .service(resource!("/attention", get => ops::get_attention))
            .service(resource!("/overview", get => ops::get_overview))
            .service(resource!("/search", get => ops::search))
            .service(resource!("/outbox/dead", get => outbox::list_dead))
            .service(resource!("/outbox/dead/retry", post => outbox::retry_all))
            .service(resource!("/outbox/dead/{event_id}/retry", post => outbox::retry_one))
            .service(resource!("/outbox/dead/{event_id}/skip", post => outbox::skip_one))
            .service(resource!("/outbox/replay", post => outbox::replay)),
    )
    .default_service(web::to(not_found));
}

/// What a middleware that lets a request through or refuses it at once returns.
pub(crate) type PassOrRefuse<F, B> = futures_util::future::Either<
    F,
    std::future::Ready<Result<actix_web::dev::ServiceResponse<B>, actix_web::Error>>,
>;

/// [`PassOrRefuse`]: through, to the route's answer.
pub(crate) fn pass<F, B>(route: F) -> PassOrRefuse<F, B> {
    futures_util::future::Either::Left(route)
}

/// [`PassOrRefuse`]: refused, answered in the gateway's format.
pub(crate) fn refuse<F, B>(error: ApiError) -> PassOrRefuse<F, B> {
    futures_util::future::Either::Right(std::future::ready(Err(error.into())))
}

/// Refuses, before any handler runs, a request whose path or query string carries an encoded NUL
/// (`%00`): no id, filter or path of ours contains one, and PostgreSQL cannot even compare with
/// it (every such request was a 500). 400 in the gateway's format.
pub fn refuse_nul<S, B>(
    request: actix_web::dev::ServiceRequest,
    service: &S,
) -> PassOrRefuse<S::Future, B>
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
        return refuse(error);
    }
    pass(service.call(request))
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
    description = "Prometheus text format, from memory. Needs the operations credentials when metrics.access = \"operations\"; served on metrics.port instead when that is set.",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
async fn metrics_doc(
    request: actix_web::HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if state.settings.metrics.access == crate::config::MetricsAccess::Operations {
        state
            .auth
            .operations(request.headers(), crate::auth::OpsRole::Read)?;
    }
    Ok(metrics::metrics(state).await)
}

/// With `metrics.port`, the two listeners serve different things: the metrics port only
/// `/metrics`, `/healthz` and `/readyz`, the main port everything but `/metrics`. Anything else
/// is 404 there, as if it did not exist.
pub fn split_listeners<S, B>(
    request: actix_web::dev::ServiceRequest,
    service: &S,
) -> PassOrRefuse<S::Future, B>
where
    S: Service<
            actix_web::dev::ServiceRequest,
            Response = actix_web::dev::ServiceResponse<B>,
            Error = actix_web::Error,
        >,
{
    let metrics_port = request
        .app_data::<web::Data<AppState>>()
        .and_then(|state| state.metrics_port.get().copied());
    let Some(metrics_port) = metrics_port else {
        return pass(service.call(request));
    };
    let on_metrics_port = request.request().app_config().local_addr().port() == metrics_port;
    let path = request.path();
    let served = if on_metrics_port {
        matches!(path, "/metrics" | "/healthz" | "/readyz")
    } else {
        path != "/metrics"
    };
    if served {
        pass(service.call(request))
    } else {
        let error = ApiError::NotFound(format!("No resource at {path} on this port"));
        refuse(error)
    }
}

#[utoipa::path(get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json")))]
async fn openapi_doc(state: web::Data<AppState>) -> HttpResponse {
    openapi::openapi_json(&state.openapi).await
}

/// The audit record of a request as it arrives; handlers fill in the rest as they go.
pub(crate) fn audit_record(request: &actix_web::HttpRequest) -> crate::store::audit::AuditRecord {
    audit_record_of(request.head(), request.peer_addr())
}

/// [`audit_record`], from the request's head (what a middleware can keep of a request while its
/// handler runs).
pub(crate) fn audit_record_of(
    head: &actix_web::dev::RequestHead,
    peer: Option<std::net::SocketAddr>,
) -> crate::store::audit::AuditRecord {
    // A header as trimmed text; none when absent, empty or not text.
    let text = |name: &str| {
        head.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    crate::store::audit::AuditRecord {
        request_id: text("x-request-id"),
        conversation_id: text("x-conversation-id"),
        method: head.method.to_string(),
        path: head.uri.to_string(),
        remote_addr: peer.map(|a| a.ip().to_string()),
        principal: None,
        headers: crate::store::audit::sanitized_headers(
            head.headers()
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_bytes())),
        ),
        body: None,
        body_size: 0,
        response_status: 0,
        response_body: None,
        error_uuid: None,
        error_code: None,
        outcome: crate::store::audit::AuditOutcome::Rejected,
        kci_id: None,
        received_at: chrono::Utc::now(),
    }
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

/// Whether the request declares a JSON body (`application/json`, parameters allowed).
pub(crate) fn is_json(request: &actix_web::HttpRequest) -> bool {
    request
        .headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Largest body the operations API reads.
pub(crate) const OPERATIONS_BODY_LIMIT: usize = 1024 * 1024;

/// Reads the JSON body of an operations request; call it only once the caller is authenticated
/// (nothing is read for someone who may not send it). `None` when there is no body and it is
/// optional. 415 unless `application/json`, 413 over [`OPERATIONS_BODY_LIMIT`], 400 when it is
/// not JSON.
pub(crate) async fn read_json_body(
    request: &actix_web::HttpRequest,
    payload: web::Payload,
    required: bool,
) -> Result<Option<serde_json::Value>, ApiError> {
    let body = read_limited(payload, OPERATIONS_BODY_LIMIT)
        .await
        .map_err(|(error, _)| error)?;
    if body.iter().all(u8::is_ascii_whitespace) && !required {
        return Ok(None);
    }
    if !is_json(request) {
        return Err(ApiError::UnsupportedMediaType(
            "The body must be application/json".to_owned(),
        ));
    }
    serde_json::from_slice(&body)
        .map(Some)
        .map_err(|e| ApiError::Malformed(vec![format!("The body is not valid JSON: {e}")]))
}

async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("No such resource".to_owned()))
}

/// 405 with `Allow`, in the gateway's error format.
async fn method_not_allowed(allow: &'static str) -> HttpResponse {
    let body = crate::error::ErrorBody {
        uuid: uuid::Uuid::new_v4(),
        code: crate::error::ErrorCode::NotImplemented,
        messages: vec![format!("Only {allow} is supported here")],
    };
    HttpResponse::MethodNotAllowed()
        .insert_header(("Allow", allow))
        .json(body)
}
