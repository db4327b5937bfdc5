//! The simulated gateway's Tenant API: what kci-receiver's egress proxy talks to when the
//! simulator sends its creating calls through it (`kci-tools simulate --serve-tenant-api`).
//!
//! - `POST /token`: OAuth2 client credentials; any client gets a bearer token.
//! - `POST /v1/<creating path>` (service orders, ethernet orders, tests, problems, amendments,
//!   cancellations) with a valid token: `201 {"id": ..., "status": "RECEIVED_BY_GATEWAY"}`. The
//!   id is the one the simulator planned, sent as `simulatorGatewayId` in the request body, so a
//!   seed still replays the same run; without it, ids are handed out from a counter.
//! - Anything else: an error in the gateway's format (401 without a valid token, 404 otherwise).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

#[derive(Default)]
struct Counters {
    tokens: AtomicU64,
    created: AtomicU64,
}

/// A running simulated Tenant API; it stops when the process does.
pub struct SimulatedTenantApi {
    /// `http://host:port`: set `egress.upstream_base_url` to this plus `/v1`, and
    /// `egress.token_url` to this plus `/token`.
    pub base_url: String,
    counters: Arc<Counters>,
}

impl SimulatedTenantApi {
    /// Binds `address` (`127.0.0.1:0` picks a free port) and serves in the background.
    pub fn start(address: &str) -> std::io::Result<SimulatedTenantApi> {
        let counters = Arc::new(Counters::default());
        let shared = web::Data::from(counters.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .route("/token", web::post().to(token))
                .default_service(web::to(tenant_api))
        })
        .workers(1)
        .bind(address)?;
        let bound = server.addrs()[0];
        tokio::spawn(server.run());
        Ok(SimulatedTenantApi {
            base_url: format!("http://{bound}"),
            counters,
        })
    }

    /// Creating calls answered 201 so far.
    pub fn created(&self) -> u64 {
        self.counters.created.load(Ordering::Relaxed)
    }

    /// Tokens issued so far.
    pub fn tokens_issued(&self) -> u64 {
        self.counters.tokens.load(Ordering::Relaxed)
    }
}

fn gateway_error(code: &str, message: &str) -> Value {
    json!({"uuid": uuid::Uuid::new_v4(), "code": code, "messages": [message]})
}

async fn token(counters: web::Data<Counters>) -> HttpResponse {
    let n = counters.tokens.fetch_add(1, Ordering::Relaxed) + 1;
    HttpResponse::Ok().json(json!({
        "access_token": format!("simulated-{n}"),
        "token_type": "Bearer",
        "expires_in": 3600
    }))
}

const CREATING_PATHS: [&str; 8] = [
    "/v1/service-orders",
    "/v1/ethernet/service-orders",
    "/v1/service-order-amendments",
    "/v1/service-order-cancellations",
    "/v1/service-tests",
    "/v1/service-problems",
    "/v1/service-problem-amendments",
    "/v1/service-problem-cancellations",
];

async fn tenant_api(
    request: HttpRequest,
    body: web::Bytes,
    counters: web::Data<Counters>,
) -> HttpResponse {
    let authorised = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer simulated-"));
    if !authorised {
        return HttpResponse::Unauthorized().json(gateway_error(
            "NOT_AUTHORISED",
            "Access token missing or expired",
        ));
    }
    let path = request.path().trim_end_matches('/');
    if request.method() != actix_web::http::Method::POST || !CREATING_PATHS.contains(&path) {
        return HttpResponse::NotFound().json(gateway_error(
            "NOT_FOUND",
            "The simulated Tenant API only answers creating calls",
        ));
    }
    let n = counters.created.fetch_add(1, Ordering::Relaxed) + 1;
    let planned = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|b| b.get("simulatorGatewayId").cloned());
    let id = planned.unwrap_or_else(|| json!(900_000_000 + n));
    HttpResponse::Created().json(json!({"id": id, "status": "RECEIVED_BY_GATEWAY"}))
}
