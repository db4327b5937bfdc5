//! The HTTP surface: routes and the state handlers share.

pub mod conversations;
pub mod health;
pub mod kcis;

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use sea_orm::DatabaseConnection;

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::error::ApiError;

/// What every handler can reach.
pub struct AppState {
    pub db: DatabaseConnection,
    pub auth: Authenticator,
    pub settings: Arc<Settings>,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/kcis")
            .route(web::post().to(kcis::post_kci))
            .default_service(web::to(method_not_allowed)),
    )
    .route("/healthz", web::get().to(health::healthz))
    .route("/readyz", web::get().to(health::readyz))
    .service(web::scope("/api/v1").route("/conversations", web::post().to(conversations::register)))
    .default_service(web::to(not_found));
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
