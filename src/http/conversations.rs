//! `POST /api/v1/conversations`: register an original request made outside the egress proxy.

use actix_web::{HttpRequest, HttpResponse, web};
use entity::conversation::ConversationSource;
use serde_json::json;

use super::AppState;
use super::operator::{Admin, Operator};
use crate::error::ApiError;
use crate::intake::conversations::NewConversation;

#[utoipa::path(post, path = "/api/v1/conversations", tag = "operations",
    request_body = NewConversation,
    responses((status = 201, description = "Registered; `matchedEntities` were waiting for it"),
              (status = 200, description = "Already registered (idempotent); only missing facts were filled in"),
              (status = 422, body = crate::error::ErrorBody), (status = 401, body = crate::error::ErrorBody),
              (status = 403, body = crate::error::ErrorBody)),
    security(("operations_basic" = [])))]
pub async fn register(
    _operator: Operator<Admin>,
    request: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let body = super::read_json_body(&request, payload, true)
        .await?
        .unwrap_or_default();
    let new: NewConversation =
        serde_json::from_value(body).map_err(|e| ApiError::Invalid(vec![format!("body: {e}")]))?;
    let problems = new.problems();
    if !problems.is_empty() {
        return Err(ApiError::Invalid(problems));
    }
    let registration = state.intake.register(new, ConversationSource::Api).await?;
    let body = json!({
        "conversation": registration.conversation,
        "created": registration.created,
        "matchedEntities": registration.matched_entities,
    });
    Ok(if registration.created {
        HttpResponse::Created().json(body)
    } else {
        HttpResponse::Ok().json(body)
    })
}
