//! Liveness and readiness.

use actix_web::{HttpResponse, web};
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use super::AppState;
use crate::outbox::relay::BrokerState;
use crate::outbox::store as outbox_store;

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive")))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// Ready: the database answers a query. The broker's state is reported but does not make the
/// instance unready: KCIs are still accepted while the broker is down (they wait in the outbox),
/// and taking every instance out of the load balancer would stop intake altogether.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, description = "The database answers; broker and outbox reported"), (status = 503, description = "The database does not answer")))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    let broker = match state.relay_health.state() {
        BrokerState::NotRunning => json!({"status": "not_running_here"}),
        BrokerState::Connecting { last_error } => {
            json!({"status": "down", "lastError": last_error})
        }
        BrokerState::Connected { since } => json!({"status": "up", "since": since}),
    };
    if let Err(error) = state.db.execute_unprepared("SELECT 1").await {
        tracing::warn!(error = %error, "readiness check: database unreachable");
        return HttpResponse::ServiceUnavailable()
            .insert_header((
                "Retry-After",
                state.settings.server.retry_after_seconds.to_string(),
            ))
            .json(
                json!({"status": "not_ready", "database": {"status": "down"}, "broker": broker}),
            );
    }
    let outbox = match outbox_store::backlog(&state.db).await {
        Ok((pending, oldest)) => json!({"pending": pending, "oldestPendingCreatedAt": oldest}),
        Err(_) => Value::Null,
    };
    HttpResponse::Ok().json(json!({
        "status": "ready",
        "database": {"status": "up"},
        "broker": broker,
        "outbox": outbox,
    }))
}
