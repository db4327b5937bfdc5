//! `/api/v1/outbox`: dead events, retrying them, replaying what was published.

use actix_web::{HttpRequest, HttpResponse, web};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::AppState;
use super::operator::{Admin, Operator, Read};
use crate::error::ApiError;
use crate::outbox::store::{self, Selection};

const DEFAULT_PAGE: u64 = 100;
const MAX_PAGE: u64 = 1000;

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeadQuery {
    /// Cursor: the `nextCursor` of the previous page.
    after: Option<i64>,
    /// Page size (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u64>,
}

/// One page of dead events, oldest first.
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "describes the answer for OpenAPI only")]
pub struct DeadPage {
    items: Vec<entity::outbox_event::Model>,
    /// Pass as `after` for the next page; null on the last page.
    #[schema(rename = "nextCursor")]
    next_cursor: Option<i64>,
}

/// `GET /api/v1/outbox/dead`: events the broker kept refusing, oldest first.
#[utoipa::path(get, path = "/api/v1/outbox/dead", tag = "operations", params(DeadQuery),
    responses((status = 200, description = "Dead events, oldest first", body = DeadPage)),
    security(("operations_basic" = [])))]
pub async fn list_dead(
    _operator: Operator<Read>,
    query: web::Query<DeadQuery>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let limit = match query.limit {
        None => DEFAULT_PAGE,
        Some(limit) if (1..=MAX_PAGE).contains(&limit) => limit,
        Some(limit) => {
            return Err(ApiError::Malformed(vec![format!(
                "limit: {limit} is not between 1 and {MAX_PAGE}"
            )]));
        }
    };
    let items = store::dead_events(&state.db, query.after, limit).await?;
    let next_cursor = (items.len() as u64 == limit)
        .then(|| items.last().map(|e| e.id))
        .flatten();
    Ok(HttpResponse::Ok().json(json!({"items": items, "nextCursor": next_cursor})))
}

/// `POST /api/v1/outbox/dead/{eventId}/retry`
#[utoipa::path(post, path = "/api/v1/outbox/dead/{eventId}/retry", tag = "operations",
    params(("eventId" = uuid::Uuid, Path, description = "The event id (AMQP message_id)")),
    responses((status = 200, description = "Requeued", body = Requeued), (status = 404, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn retry_one(
    _operator: Operator<Admin>,
    path: web::Path<Uuid>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
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
    /// Kept on the event with who skipped it and when.
    #[schema(max_length = 500)]
    reason: Option<String>,
}

/// How many events were requeued.
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "describes the answer for OpenAPI only")]
pub struct Requeued {
    requeued: u64,
}

/// How many events were skipped (always 1).
#[derive(utoipa::ToSchema)]
#[allow(dead_code, reason = "describes the answer for OpenAPI only")]
pub struct Skipped {
    skipped: u64,
}

/// `POST /api/v1/outbox/dead/{eventId}/skip`: the event is not published; its entity's later
/// events, which waited behind it, go on. Recorded on the event (who, when, why).
#[utoipa::path(post, path = "/api/v1/outbox/dead/{eventId}/skip", tag = "operations",
    params(("eventId" = uuid::Uuid, Path, description = "The event id (AMQP message_id)")),
    request_body(content = Option<SkipRequest>, content_type = "application/json"),
    responses((status = 200, description = "Skipped", body = Skipped), (status = 404, body = crate::error::ErrorBody),
              (status = 422, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn skip_one(
    operator: Operator<Admin>,
    request: HttpRequest,
    path: web::Path<Uuid>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let skip: SkipRequest = match super::read_json_body(&request, payload, false).await? {
        None | Some(serde_json::Value::Null) => SkipRequest::default(),
        Some(body) => serde_json::from_value(body)
            .map_err(|e| ApiError::Invalid(vec![format!("body: {e}")]))?,
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
    if !store::skip_dead(&state.db, event_id, &operator.name, skip.reason.as_deref()).await? {
        return Err(ApiError::NotFound("No dead event with this id".to_owned()));
    }
    state.outbox_signal.notify();
    tracing::warn!(event.id = %event_id, operator = operator.name, reason = ?skip.reason, "dead outbox event skipped; its entity's later events go on");
    Ok(HttpResponse::Ok().json(json!({"skipped": 1})))
}

/// `POST /api/v1/outbox/dead/retry`: every dead event.
#[utoipa::path(post, path = "/api/v1/outbox/dead/retry", tag = "operations",
    responses((status = 200, description = "How many events were requeued", body = Requeued), (status = 403, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn retry_all(
    _operator: Operator<Admin>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let requeued = requeue(&state, Selection::AllDead).await?;
    Ok(HttpResponse::Ok().json(json!({"requeued": requeued})))
}

/// What to replay: exactly one of an entity (`entityType` with `gatewayId`), a conversation
/// (`conversationId`), or a time range (`from` with `to`; an empty or reversed range replays
/// nothing). No other field, and no nulls.
#[derive(Debug, utoipa::ToSchema)]
#[allow(
    dead_code,
    reason = "describes the body for OpenAPI only; read by `selection`"
)]
pub enum ReplayRequest {
    /// Every event of one entity.
    #[schema(title = "Entity")]
    Entity {
        #[schema(rename = "entityType")]
        entity_type: String,
        #[schema(rename = "gatewayId")]
        gateway_id: String,
    },
    /// Every event of the KCIs that came with this `X-Conversation-ID`.
    #[schema(title = "Conversation")]
    Conversation {
        #[schema(rename = "conversationId")]
        conversation_id: String,
    },
    /// Every event created in [from, to).
    #[schema(title = "TimeRange")]
    TimeRange {
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
}

/// Reads a replay body: exactly the fields of one kind of [`ReplayRequest`].
fn replay_selection(body: &serde_json::Value) -> Result<Selection, ApiError> {
    let invalid = |message: String| ApiError::Invalid(vec![message]);
    let Some(object) = body.as_object() else {
        return Err(invalid("body: must be a JSON object".to_owned()));
    };
    if let Some(unknown) = object.keys().find(|k| {
        !["entityType", "gatewayId", "conversationId", "from", "to"].contains(&k.as_str())
    }) {
        return Err(invalid(format!("{unknown}: not a field of a replay")));
    }
    // Present fields must have a value: a null is refused, not read as absent.
    let text = |field: &str| match object.get(field) {
        None => Ok(None),
        Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(invalid(format!("{field}: must be a string"))),
    };
    let time = |field: &str| match object.get(field) {
        None => Ok(None),
        Some(serde_json::Value::String(text)) => DateTime::parse_from_rfc3339(text)
            .map(|t| Some(t.with_timezone(&Utc)))
            .map_err(|_| invalid(format!("{field}: must be an RFC 3339 date-time"))),
        Some(_) => Err(invalid(format!("{field}: must be an RFC 3339 date-time"))),
    };
    Selection::replay(
        text("entityType")?,
        text("gatewayId")?,
        text("conversationId")?,
        time("from")?,
        time("to")?,
    )
    .map_err(invalid)
}

/// `POST /api/v1/outbox/replay`: publish again (same message ids) what was already published.
#[utoipa::path(post, path = "/api/v1/outbox/replay", tag = "operations", request_body = ReplayRequest,
    responses((status = 200, description = "How many events were requeued", body = Requeued),
              (status = 422, body = crate::error::ErrorBody), (status = 403, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn replay(
    _operator: Operator<Admin>,
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let body = super::read_json_body(&request, payload, true)
        .await?
        .unwrap_or_default();
    let requeued = requeue(&state, replay_selection(&body)?).await?;
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
