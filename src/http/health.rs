//! Liveness and readiness.

use actix_web::{HttpResponse, web};
use sea_orm::ConnectionTrait;
use serde_json::json;

use super::AppState;

/// Alive: the process answers.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready: the database answers a query.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.db.execute_unprepared("SELECT 1").await {
        Ok(_) => HttpResponse::Ok().json(json!({"status": "ready", "database": "up"})),
        Err(error) => {
            tracing::warn!(error = %error, "readiness check: database unreachable");
            HttpResponse::ServiceUnavailable()
                .insert_header((
                    "Retry-After",
                    state.settings.server.retry_after_seconds.to_string(),
                ))
                .json(json!({"status": "not ready", "database": "down"}))
        }
    }
}
