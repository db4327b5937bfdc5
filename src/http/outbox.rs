//! `/api/v1/outbox`: dead events, retrying them, replaying what was published.

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use crate::auth::OpsRole;
use crate::error::ApiError;
use crate::outbox::store::{self, Selection};

const DEFAULT_PAGE: u64 = 100;
const MAX_PAGE: u64 = 1000;

#[derive(Debug, Deserialize)]
pub struct DeadQuery {
    /// Cursor: the `nextCursor` of the previous page.
    after: Option<i64>,
    limit: Option<u64>,
}

/// `GET /api/v1/outbox/dead`: events the broker kept refusing, oldest first.
#[utoipa::path(get, path = "/api/v1/outbox/dead", tag = "operations",
    params(("after" = Option<i64>, Query, description = "Cursor: the previous page's nextCursor"), ("limit" = Option<u64>, Query, description = "1 to 1000, default 100")),
    responses((status = 200, description = "Dead events, oldest first: {items, nextCursor}"), (status = 401, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn list_dead(
    request: HttpRequest,
    query: web::Query<DeadQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.operations(request.headers(), OpsRole::Read)?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let items = store::dead_events(&state.db, query.after, limit).await?;
    let next_cursor = (items.len() as u64 == limit)
        .then(|| items.last().map(|e| e.id))
        .flatten();
    Ok(HttpResponse::Ok().json(json!({"items": items, "nextCursor": next_cursor})))
}

/// `POST /api/v1/outbox/dead/{eventId}/retry`
#[utoipa::path(post, path = "/api/v1/outbox/dead/{eventId}/retry", tag = "operations",
    params(("eventId" = uuid::Uuid, Path, description = "The event id (AMQP message_id)")),
    responses((status = 200, description = "{requeued: 1}"), (status = 404, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn retry_one(
    request: HttpRequest,
    path: web::Path<Uuid>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.operations(request.headers(), OpsRole::Admin)?;
    let requeued = requeue(&state, Selection::DeadEvent(path.into_inner())).await?;
    if requeued == 0 {
        return Err(ApiError::NotFound("No dead event with this id".to_owned()));
    }
    Ok(HttpResponse::Ok().json(json!({"requeued": requeued})))
}

/// Why an operator skips a dead event.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SkipRequest {
    /// Kept on the event with who skipped it and when (at most 500 characters).
    reason: Option<String>,
}

/// `POST /api/v1/outbox/dead/{eventId}/skip`: the event is not published; its entity's later
/// events, which waited behind it, go on. Recorded on the event (who, when, why).
#[utoipa::path(post, path = "/api/v1/outbox/dead/{eventId}/skip", tag = "operations",
    params(("eventId" = uuid::Uuid, Path, description = "The event id (AMQP message_id)")),
    request_body(content = Option<SkipRequest>, content_type = "application/json"),
    responses((status = 200, description = "{skipped: 1}"), (status = 404, body = crate::error::ErrorBody),
              (status = 422, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn skip_one(
    request: HttpRequest,
    path: web::Path<Uuid>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let operator = state.auth.operations(request.headers(), OpsRole::Admin)?;
    let skip: SkipRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SkipRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::Invalid(vec![format!("body: {e}")]))?
    };
    if skip
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 500)
    {
        return Err(ApiError::Invalid(vec![
            "reason: at most 500 characters".to_owned(),
        ]));
    }
    let event_id = path.into_inner();
    if !store::skip_dead(&state.db, event_id, &operator, skip.reason.as_deref()).await? {
        return Err(ApiError::NotFound("No dead event with this id".to_owned()));
    }
    state.outbox_signal.notify();
    tracing::warn!(event.id = %event_id, operator, reason = ?skip.reason, "dead outbox event skipped; its entity's later events go on");
    Ok(HttpResponse::Ok().json(json!({"skipped": 1})))
}

/// `POST /api/v1/outbox/dead/retry`: every dead event.
#[utoipa::path(post, path = "/api/v1/outbox/dead/retry", tag = "operations",
    responses((status = 200, description = "{requeued: n}"), (status = 403, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn retry_all(
    request: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.operations(request.headers(), OpsRole::Admin)?;
    let requeued = requeue(&state, Selection::AllDead).await?;
    Ok(HttpResponse::Ok().json(json!({"requeued": requeued})))
}

/// What to replay: exactly one of an entity, a conversation, or a time range.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplayRequest {
    entity_type: Option<String>,
    gateway_id: Option<String>,
    conversation_id: Option<String>,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
}

impl ReplayRequest {
    pub fn selection(self) -> Result<Selection, ApiError> {
        Selection::replay(
            self.entity_type,
            self.gateway_id,
            self.conversation_id,
            self.from,
            self.to,
        )
        .map_err(|problem| ApiError::Invalid(vec![problem]))
    }
}

/// `POST /api/v1/outbox/replay`: publish again (same message ids) what was already published.
#[utoipa::path(post, path = "/api/v1/outbox/replay", tag = "operations", request_body = ReplayRequest,
    responses((status = 200, description = "{requeued: n}"), (status = 422, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn replay(
    request: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    state.auth.operations(request.headers(), OpsRole::Admin)?;
    let replay: ReplayRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::Invalid(vec![format!("body: {e}")]))?;
    let requeued = requeue(&state, replay.selection()?).await?;
    Ok(HttpResponse::Ok().json(json!({"requeued": requeued})))
}

async fn requeue(state: &AppState, selection: Selection) -> Result<u64, ApiError> {
    let requeued = store::requeue_and_notify(&state.db, &selection).await?;
    if requeued > 0 {
        state.outbox_signal.notify();
        tracing::info!(?selection, requeued, "outbox events requeued");
    }
    Ok(requeued)
}
