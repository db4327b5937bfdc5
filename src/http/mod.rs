//! The HTTP surface: routes and the state handlers share.

pub mod conversations;
pub mod health;
pub mod kcis;
pub mod outbox;

use std::sync::Arc;

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
    pub auth: Authenticator,
    pub settings: Arc<Settings>,
    /// Wakes this process's relay when new outbox events are committed.
    pub outbox_signal: OutboxSignal,
    /// The broker as this process's relay sees it.
    pub relay_health: RelayHealth,
}

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/kcis")
            .route(web::post().to(kcis::post_kci))
            .default_service(web::to(method_not_allowed)),
    )
    .route("/healthz", web::get().to(health::healthz))
    .route("/readyz", web::get().to(health::readyz))
    .service(
        web::scope("/api/v1")
            .route("/conversations", web::post().to(conversations::register))
            .route("/outbox/dead", web::get().to(outbox::list_dead))
            .route("/outbox/dead/retry", web::post().to(outbox::retry_all))
            .route(
                "/outbox/dead/{event_id}/retry",
                web::post().to(outbox::retry_one),
            )
            .route("/outbox/replay", web::post().to(outbox::replay)),
    )
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
