//! The operations API's read endpoints (design.md, "Operations API"): lists, details and
//! histories of orders, tests and problems under paths that mirror the Tenant API's, plus
//! conversations, KCIs, audit records, search and "what needs attention".

use actix_web::{HttpResponse, web};
use chrono::{DateTime, Utc};
use entity::tracked_entity::{self, Correlation};
use serde::Deserialize;
use utoipa::IntoParams;

use super::AppState;
use super::operator::{Operator, Read};
use crate::error::{ApiError, ErrorBody};
use crate::operations::duration::parse_iso8601;
use crate::operations::queries::{
    self, Attention, ConversationView, EntityDetail, EntityFilter, Family, Flag, HistoryEntry,
    KciView, Page, SearchResult, decode_cursor,
};
use crate::operations::support::support_text;

const DEFAULT_LIMIT: u64 = 50;
const MAX_LIMIT: u64 = 500;

/// `correlation=` values (documented as an enum; parsed by hand for a clear message).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code, reason = "describes the parameter for OpenAPI only")]
enum CorrelationFilter {
    Matched,
    Unmatched,
    Unsolicited,
}

/// `flagged=` values (documented as an enum; parsed by hand for a clear message).
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "describes the parameter for OpenAPI only")]
enum FlagFilter {
    #[schema(rename = "illegal")]
    Illegal,
    #[schema(rename = "stale")]
    Stale,
    #[schema(rename = "gap")]
    Gap,
    #[schema(rename = "anomaly")]
    Anomaly,
    #[schema(rename = "unknown_value")]
    UnknownValue,
    #[schema(rename = "any")]
    Any,
}

/// Filters and paging of the entity lists. What each parameter accepts is exactly what the
/// OpenAPI document says; anything else is a 400 naming the parameter.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Statuses, comma separated (e.g. `PENDING,HELD`); empty: any.
    status: Option<String>,
    supplier: Option<String>,
    /// KCI entity types, comma separated (e.g. `CEASE_ORDER`); empty: any.
    entity_type: Option<String>,
    #[param(value_type = Option<CorrelationFilter>, inline)]
    correlation: Option<String>,
    /// Entities carrying this flag (`any`: any flag).
    #[param(value_type = Option<FlagFilter>, inline)]
    flagged: Option<String>,
    /// Last KCI after this time (RFC 3339).
    updated_after: Option<DateTime<Utc>>,
    /// Last KCI before this time (RFC 3339).
    updated_before: Option<DateTime<Utc>>,
    /// Not terminal and no KCI for longer than this ISO-8601 duration (e.g. `PT4H`, `P2D`;
    /// weeks, days, hours, minutes, seconds).
    #[param(
        pattern = "^P([0-9]{1,3}W)?([0-9]{1,4}D)?(T([0-9]{1,5}H)?([0-9]{1,6}M)?([0-9]{1,8}S)?)?$"
    )]
    stuck_for: Option<String>,
    /// The `nextCursor` of the previous page.
    #[param(pattern = "^[0-9]{1,18}$")]
    cursor: Option<String>,
    /// Page size (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

/// `limit`, checked against its documented range.
fn page_size(limit: Option<u64>, max: u64) -> Result<u64, ApiError> {
    match limit {
        None => Ok(DEFAULT_LIMIT.min(max)),
        Some(limit) if (1..=max).contains(&limit) => Ok(limit),
        Some(limit) => Err(ApiError::Malformed(vec![format!(
            "limit: {limit} is not between 1 and {max}"
        )])),
    }
}

fn comma_list(value: &Option<String>) -> Vec<String> {
    value
        .as_deref()
        .map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

impl ListQuery {
    fn filter(&self) -> Result<EntityFilter, ApiError> {
        let mut problems = Vec::new();
        let correlation = match self.correlation.as_deref() {
            None => None,
            Some("matched") => Some(Correlation::Matched),
            Some("unmatched") => Some(Correlation::Unmatched),
            Some("unsolicited") => Some(Correlation::Unsolicited),
            Some(other) => {
                problems.push(format!(
                    "correlation: {other:?} - accepted values are matched, unmatched, unsolicited"
                ));
                None
            }
        };
        let flagged = match self.flagged.as_deref() {
            None => None,
            Some(text) => Flag::parse(text).or_else(|| {
                problems.push(format!(
                    "flagged: {text:?} - accepted values are illegal, stale, gap, anomaly, unknown_value, any"
                ));
                None
            }),
        };
        let stuck_for = match self.stuck_for.as_deref() {
            None => None,
            Some(text) => parse_iso8601(text)
                .map_err(|e| problems.push(format!("stuckFor: {e}")))
                .ok(),
        };
        if problems.is_empty() {
            Ok(EntityFilter {
                entity_types: comma_list(&self.entity_type),
                statuses: comma_list(&self.status),
                supplier: self.supplier.clone(),
                correlation,
                flagged,
                updated_after: self.updated_after,
                updated_before: self.updated_before,
                stuck_for,
            })
        } else {
            Err(ApiError::Malformed(problems))
        }
    }

    fn page(&self) -> Result<(Option<i64>, u64), ApiError> {
        let before_id = match &self.cursor {
            None => None,
            Some(cursor) => Some(decode_cursor(cursor).ok_or_else(|| {
                ApiError::Malformed(vec!["cursor: not a cursor this API gave out".to_owned()])
            })?),
        };
        Ok((before_id, page_size(self.limit, MAX_LIMIT)?))
    }
}

async fn list(
    state: &AppState,
    family: Option<Family>,
    query: &ListQuery,
) -> Result<HttpResponse, ApiError> {
    let filter = query.filter()?;
    let (before_id, limit) = query.page()?;
    let page = queries::list_entities(&state.db, family, &filter, before_id, limit).await?;
    Ok(HttpResponse::Ok().json(page))
}

/// `?entityType=` to choose when several order types share a gateway id.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EntityQuery {
    /// The KCI entity type, when several share the gateway id (e.g. `MODIFY_ORDER`).
    entity_type: Option<String>,
}

async fn one_entity(
    state: &AppState,
    family: Family,
    gateway_id: &str,
    query: &EntityQuery,
) -> Result<tracked_entity::Model, ApiError> {
    let mut found =
        queries::find_entities(&state.db, family, gateway_id, query.entity_type.as_deref()).await?;
    match found.len() {
        0 => Err(ApiError::NotFound(format!(
            "Nothing with gateway id {gateway_id} here"
        ))),
        1 => Ok(found.remove(0)),
        _ => {
            let types: Vec<String> = found.iter().map(|e| e.entity_type.clone()).collect();
            Err(ApiError::Invalid(vec![format!(
                "Several entities have gateway id {gateway_id} ({}): add ?entityType=",
                types.join(", ")
            )]))
        }
    }
}

async fn detail(
    state: &AppState,
    family: Family,
    gateway_id: &str,
    query: &EntityQuery,
) -> Result<HttpResponse, ApiError> {
    let entity = one_entity(state, family, gateway_id, query).await?;
    Ok(HttpResponse::Ok().json(queries::entity_detail(&state.db, entity).await?))
}

async fn history(
    state: &AppState,
    family: Family,
    gateway_id: &str,
    query: &EntityQuery,
) -> Result<HttpResponse, ApiError> {
    let entity = one_entity(state, family, gateway_id, query).await?;
    Ok(HttpResponse::Ok().json(queries::history(&state.db, entity.id).await?))
}

/// The three endpoints of one resource family, each with its OpenAPI description.
macro_rules! family_endpoints {
    ($family:expr, $path:literal, $tag:literal, $list:ident, $detail:ident, $history:ident) => {
        #[utoipa::path(get, path = concat!("/api/v1", $path), tag = $tag, params(ListQuery),
            responses((status = 200, description = "One page, newest first", body = Page<tracked_entity::Model>),
                      (status = 400, description = "Invalid filter or cursor", body = ErrorBody),
                      (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
            security(("operations_basic" = [])))]
        pub async fn $list(_operator: Operator<Read>, query: web::Query<ListQuery>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
            list(&state, Some($family), &query).await
        }

        #[utoipa::path(get, path = concat!("/api/v1", $path, "/{id}"), tag = $tag,
            params(("id" = String, Path, description = "The gateway id (`entity.id`)"), EntityQuery),
            responses((status = 200, description = "Latest snapshot, current state, original request", body = EntityDetail),
                      (status = 404, body = ErrorBody), (status = 422, description = "Ambiguous id", body = ErrorBody),
                      (status = 401, body = ErrorBody)),
            security(("operations_basic" = [])))]
        pub async fn $detail(_operator: Operator<Read>, path: web::Path<String>, query: web::Query<EntityQuery>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
            detail(&state, $family, &path, &query).await
        }

        #[utoipa::path(get, path = concat!("/api/v1", $path, "/{id}/history"), tag = $tag,
            params(("id" = String, Path, description = "The gateway id (`entity.id`)"), EntityQuery),
            responses((status = 200, description = "Every transition, oldest first", body = Vec<HistoryEntry>),
                      (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
            security(("operations_basic" = [])))]
        pub async fn $history(_operator: Operator<Read>, path: web::Path<String>, query: web::Query<EntityQuery>, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
            history(&state, $family, &path, &query).await
        }
    };
}

family_endpoints!(
    Family::ServiceOrders,
    "/service-orders",
    "service orders",
    list_service_orders,
    get_service_order,
    service_order_history
);
family_endpoints!(
    Family::EthernetServiceOrders,
    "/ethernet/service-orders",
    "ethernet service orders",
    list_ethernet_service_orders,
    get_ethernet_service_order,
    ethernet_service_order_history
);
family_endpoints!(
    Family::ServiceTests,
    "/service-tests",
    "service tests",
    list_service_tests,
    get_service_test,
    service_test_history
);
family_endpoints!(
    Family::ServiceProblems,
    "/service-problems",
    "service problems",
    list_service_problems,
    get_service_problem,
    service_problem_history
);

/// Every entity, whatever its family.
#[utoipa::path(get, path = "/api/v1/entities", tag = "operations", params(ListQuery),
    responses((status = 200, body = Page<tracked_entity::Model>), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn list_all_entities(
    _operator: Operator<Read>,
    query: web::Query<ListQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    list(&state, None, &query).await
}

#[utoipa::path(get, path = "/api/v1/conversations/{conversationId}", tag = "operations",
    params(("conversationId" = String, Path, description = "X-Conversation-ID")),
    responses((status = 200, description = "The original request and everything that followed", body = ConversationView),
              (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn get_conversation(
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    match queries::conversation_view(&state.db, &path).await? {
        Some(view) => Ok(HttpResponse::Ok().json(view)),
        None => Err(ApiError::NotFound("No such conversation".to_owned())),
    }
}

#[utoipa::path(get, path = "/api/v1/kcis/{kciId}", tag = "operations",
    params(("kciId" = uuid::Uuid, Path, description = "The KCI `id`")),
    responses((status = 200, description = "The raw KCI and what processing did with it", body = KciView),
              (status = 404, body = ErrorBody), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn get_kci(
    _operator: Operator<Read>,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let kci_id = uuid::Uuid::parse_str(&path)
        .map_err(|_| ApiError::Malformed(vec!["kciId: not a UUID".to_owned()]))?;
    match queries::kci_view(&state.db, kci_id).await? {
        Some(view) => Ok(HttpResponse::Ok().json(view)),
        None => Err(ApiError::NotFound("No such KCI".to_owned())),
    }
}

/// `format=` values of the audit view.
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code, reason = "describes the parameter for OpenAPI only")]
enum AuditFormat {
    Json,
    Support,
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// `support`: the text of a support request to the gateway's desk, as `text/plain`.
    #[param(value_type = Option<AuditFormat>, inline)]
    format: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/audit/{xRequestId}", tag = "operations",
    params(("xRequestId" = String, Path, description = "X-Request-ID of the request"), AuditQuery),
    responses((status = 200, description = "The audit records (JSON), or the support text (`?format=support`)",
                content((Vec<entity::audit_log::Model> = "application/json"), (String = "text/plain"))),
              (status = 404, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn get_audit(
    _operator: Operator<Read>,
    path: web::Path<String>,
    query: web::Query<AuditQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let records = queries::audit_records(&state.db, &path).await?;
    if records.is_empty() {
        return Err(ApiError::NotFound(
            "No request with this X-Request-ID".to_owned(),
        ));
    }
    match query.format.as_deref() {
        None | Some("json") => Ok(HttpResponse::Ok().json(records)),
        Some("support") => {
            let mut text = String::new();
            for record in &records {
                let entities = match record.kci_id {
                    Some(kci_id) => queries::kci_view(&state.db, kci_id)
                        .await?
                        .and_then(|v| v.entity)
                        .into_iter()
                        .collect(),
                    None => Vec::new(),
                };
                text.push_str(&support_text(
                    &state.settings.environment,
                    &state.settings.tenant,
                    record,
                    &entities,
                ));
            }
            Ok(HttpResponse::Ok()
                .content_type("text/plain; charset=utf-8")
                .body(text))
        }
        Some(other) => Err(ApiError::Malformed(vec![format!(
            "format: {other:?} - accepted values are json, support"
        )])),
    }
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AttentionQuery {
    /// "Stuck": in flight with no KCI for longer than this ISO-8601 duration (default `P1D`).
    #[param(
        pattern = "^P([0-9]{1,3}W)?([0-9]{1,4}D)?(T([0-9]{1,5}H)?([0-9]{1,6}M)?([0-9]{1,8}S)?)?$"
    )]
    stuck_for: Option<String>,
    /// Anomalies recorded within this ISO-8601 duration (default `P1D`).
    #[param(
        pattern = "^P([0-9]{1,3}W)?([0-9]{1,4}D)?(T([0-9]{1,5}H)?([0-9]{1,6}M)?([0-9]{1,8}S)?)?$"
    )]
    anomalies_within: Option<String>,
    /// Items per list (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u64>,
}

#[utoipa::path(get, path = "/api/v1/attention", tag = "operations", params(AttentionQuery),
    responses((status = 200, description = "What needs a person, in one answer", body = Attention),
              (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn get_attention(
    _operator: Operator<Read>,
    query: web::Query<AttentionQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let duration = |name: &str, value: &Option<String>| {
        parse_iso8601(value.as_deref().unwrap_or("P1D"))
            .map_err(|e| ApiError::Malformed(vec![format!("{name}: {e}")]))
    };
    let stuck_for = duration("stuckFor", &query.stuck_for)?;
    let within = duration("anomaliesWithin", &query.anomalies_within)?;
    let limit = page_size(query.limit, MAX_LIMIT)?;
    // Shared by concurrent callers for `metrics.refresh_interval_ms` (as fresh as the
    // overview); once there is an answer, a stale one is given at once while one caller's
    // background task computes the next, so no caller waits for the counts.
    let key = (stuck_for.num_seconds(), within.num_seconds(), limit);
    let compute = move |state: web::Data<AppState>| async move {
        queries::attention(&state.db, stuck_for, Utc::now() - within, limit).await
    };
    let mut attention = match state.attention_answers.recent(&key) {
        Some((attention, refresh)) => {
            if refresh {
                let state = state.clone();
                tokio::spawn(async move {
                    let answers = &state.attention_answers;
                    let computed = answers.get_or_compute(key, || compute(state.clone())).await;
                    if let Err(error) = computed {
                        tracing::warn!(error = %error, "attention: could not refresh the counts");
                    }
                    answers.refreshed(&key);
                });
            }
            attention
        }
        None => {
            state
                .attention_answers
                .get_or_compute(key, || compute(state.clone()))
                .await?
        }
    };
    attention.unrecorded_original_requests = state.unrecorded.list();
    Ok(HttpResponse::Ok().json(attention))
}

/// The dashboard's landing view in one answer, from memory: what one background task read from
/// the database at its last round (`metrics.refresh_interval_ms`), so a page load costs no query.
#[utoipa::path(get, path = "/api/v1/overview", tag = "operations",
    responses((status = 200, description = "Entities by type and status (a funnel per lifecycle), KCIs per minute by update type, the outbox backlog and publish lag over the last hours", body = crate::operations::overview::OverviewView),
              (status = 401, body = ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn get_overview(_operator: Operator<Read>, state: web::Data<AppState>) -> HttpResponse {
    let refresh_seconds = state.settings.metrics.refresh_interval_ms as f64 / 1000.0;
    HttpResponse::Ok().json(
        state
            .metrics
            .overview()
            .view(refresh_seconds, state.relay_health.publish_lag_per_minute()),
    )
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// Any id: gateway id, supplier reference, conversation id, X-Request-ID or KCI id (blank:
    /// nothing found).
    q: String,
}

#[utoipa::path(get, path = "/api/v1/search", tag = "operations", params(SearchQuery),
    responses((status = 200, body = SearchResult), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn search(
    _operator: Operator<Read>,
    query: web::Query<SearchQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(queries::search(&state.db, &query.q).await?))
}
