//! Liveness and readiness.

use std::time::Duration;

use actix_web::{HttpResponse, web};
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use sea_orm::DatabaseConnection;

use super::AppState;
use super::metrics::Metrics;
use crate::outbox::relay::{BrokerState, RelayHealth, RelayState};

/// Alive: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, description = "Alive")))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

/// How long readiness waits for the database: a probe with a 1 s timeout must see our 503, not
/// its own timeout.
const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_millis(800);

/// Ready: the database answers a query within 800 ms. The broker's and the relay's states are
/// reported but do not make the instance unready: KCIs are still accepted while the broker is
/// down or the relay restarts (they wait in the outbox), and taking every instance out of the
/// load balancer would stop intake altogether. The outbox backlog is the one the metrics task
/// last read: a probe costs one `SELECT 1`, nothing more.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, description = "The database answers; broker, relay and outbox reported"), (status = 503, description = "The database does not answer within 800 ms")))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    readiness(
        &state.db,
        &state.relay_health,
        &state.metrics,
        state.settings.server.retry_after_seconds,
    )
    .await
}

/// `/readyz` of whichever process asks: `serve` (with or without its relay) or `relay`.
pub async fn readiness(
    db: &DatabaseConnection,
    relay_health: &RelayHealth,
    metrics: &Metrics,
    retry_after_seconds: u32,
) -> HttpResponse {
    let broker = match relay_health.state() {
        BrokerState::NotRunning => json!({"status": "not_running_here"}),
        BrokerState::Connecting { last_error } => {
            json!({"status": "down", "lastError": last_error})
        }
        BrokerState::Connected { since } => json!({"status": "up", "since": since}),
        BrokerState::Blocked { since } => json!({"status": "blocked", "since": since}),
    };
    let restarts = relay_health.restarts();
    let relay = match relay_health.relay_state() {
        RelayState::NotRunning => json!({"status": "not_running_here", "restarts": restarts}),
        RelayState::Running { since } => {
            json!({"status": "running", "since": since, "restarts": restarts})
        }
        RelayState::Restarting { since, error } => json!({
            "status": "restarting", "since": since, "lastError": error, "restarts": restarts
        }),
    };
    let database =
        tokio::time::timeout(DATABASE_CHECK_TIMEOUT, db.execute_unprepared("SELECT 1")).await;
    if !matches!(database, Ok(Ok(_))) {
        let error = match database {
            Ok(Err(error)) => error.to_string(),
            _ => format!("no answer within {DATABASE_CHECK_TIMEOUT:?}"),
        };
        tracing::warn!(error, "readiness check: database unreachable");
        return HttpResponse::ServiceUnavailable()
            .insert_header(("Retry-After", retry_after_seconds.to_string()))
            .json(json!({
                "status": "not_ready",
                "version": env!("CARGO_PKG_VERSION"),
                "database": {"status": "down"},
                "broker": broker,
                "relay": relay,
            }));
    }
    let outbox = match metrics.backlog() {
        Some(backlog) => json!({
            "pending": backlog.pending,
            "oldestPendingCreatedAt": backlog.oldest,
            "dead": backlog.dead,
            "readAt": backlog.read_at,
        }),
        None => Value::Null,
    };
    HttpResponse::Ok().json(json!({
        "status": "ready",
        "version": env!("CARGO_PKG_VERSION"),
        "database": {"status": "up"},
        "broker": broker,
        "relay": relay,
        "outbox": outbox,
    }))
}
