//! The simulated gateway's Tenant API: what kci-receiver's egress proxy talks to when the
//! simulator sends its creating calls through it (`kci-tools simulate --serve-tenant-api`).
//!
//! - `POST /token`: OAuth2 client credentials; any client gets a bearer token.
//! - `POST /v1/<creating path>` (service orders, ethernet orders, tests, problems, amendments,
//!   cancellations) with a valid token: `201 {"id": ..., "status": "RECEIVED_BY_GATEWAY"}`. The
//!   id is the one the simulator planned, sent as `simulatorGatewayId` in the request body, so a
//!   seed still replays the same run; without it, ids are handed out from a counter.
//! - `GET /v1/service-orders/{id}`, `/v1/ethernet/service-orders/{id}`, `/v1/service-tests/{id}`,
//!   `/v1/service-problems/{id}` with a valid token: the entity's latest snapshot plus `updates[]`,
//!   every KCI the simulated gateway produced for it, in sequence order (spec section 4), posted
//!   or not: a run with `--drop-rate` "loses" some deliveries, which only this answer still has.
//!   Unknown ids: 404 in the gateway's format.
//! - Anything else: an error in the gateway's format (401 without a valid token, 404 otherwise).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use serde_json::{Value, json};

#[derive(Default)]
struct Counters {
    tokens: AtomicU64,
    created: AtomicU64,
    entity_gets: AtomicU64,
}

/// Every KCI the simulated gateway produced, by the Tenant API path of its entity and the
/// entity's gateway id: what `GET /v1/<path>/{id}` answers as `updates[]`. Shared by the
/// simulator (which records each KCI as the gateway produces it, delivered or dropped) and the
/// simulated Tenant API.
#[derive(Clone, Debug, Default)]
pub struct GatewayRecord(Arc<Mutex<HashMap<EntityKey, Vec<Value>>>>);

/// An entity as the Tenant API addresses it: the path of its GET and its gateway id.
type EntityKey = (&'static str, String);

impl GatewayRecord {
    /// Keeps a KCI body (unless the same KCI id is kept already).
    pub fn record(&self, kci: &Value) {
        let Some(path) = kci["entityType"].as_str().and_then(entity_path) else {
            return;
        };
        let id = match &kci["entity"]["id"] {
            Value::String(id) => id.clone(),
            other => other.to_string(),
        };
        let Ok(mut entities) = self.0.lock() else {
            return;
        };
        let updates = entities.entry((path, id)).or_default();
        if !updates.iter().any(|known| known["id"] == kci["id"]) {
            // As in the gateway's GET samples (spec 2.2): its delivery bookkeeping rides along.
            let mut stored = kci.clone();
            stored["deliveryStatus"] = Value::String("PENDING".to_owned());
            updates.push(stored);
            updates.sort_by_key(|update| update["sequenceNumber"].as_i64().unwrap_or(0));
        }
    }

    /// The entity as `GET` answers it: its latest snapshot plus `updates[]`.
    pub fn entity(&self, path: &str, id: &str) -> Option<Value> {
        let entities = self.0.lock().ok()?;
        let (_, updates) = entities
            .iter()
            .find(|((known_path, known_id), _)| *known_path == path && known_id == id)?;
        let mut entity = updates.last()?["entity"].clone();
        entity["updates"] = Value::Array(updates.clone());
        Some(entity)
    }
}

/// The Tenant API path (under `/v1/`) of an entity type's GET.
fn entity_path(entity_type: &str) -> Option<&'static str> {
    Some(match entity_type {
        "PROVIDE_ORDER" | "CEASE_ORDER" | "MODIFY_ORDER" | "UNSOLICITED_CEASE_ORDER" => {
            "service-orders"
        }
        "PROVIDE_ETHERNET_ORDER" => "ethernet/service-orders",
        "SERVICE_TEST" => "service-tests",
        "SERVICE_PROBLEM" => "service-problems",
        _ => return None,
    })
}

/// A running simulated Tenant API; it stops when the process does.
pub struct SimulatedTenantApi {
    /// `http://host:port`: set `egress.upstream_base_url` to this plus `/v1`, and
    /// `egress.token_url` to this plus `/token`.
    pub base_url: String,
    counters: Arc<Counters>,
    /// What the gateway produced: give it to the simulator (`Options::gateway_record`).
    pub record: GatewayRecord,
}

impl SimulatedTenantApi {
    /// Binds `address` (`127.0.0.1:0` picks a free port) and serves in the background.
    pub fn start(address: &str) -> std::io::Result<SimulatedTenantApi> {
        let counters = Arc::new(Counters::default());
        let shared = web::Data::from(counters.clone());
        let record = GatewayRecord::default();
        let served = web::Data::new(record.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(shared.clone())
                .app_data(served.clone())
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
            record,
        })
    }

    /// Creating calls answered 201 so far.
    pub fn created(&self) -> u64 {
        self.counters.created.load(Ordering::Relaxed)
    }

    /// `GET /v1/<entity path>/{id}` calls answered so far (found or not).
    pub fn entity_gets(&self) -> u64 {
        self.counters.entity_gets.load(Ordering::Relaxed)
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
    record: web::Data<GatewayRecord>,
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
    if request.method() == actix_web::http::Method::GET
        && let Some((entity_path, id)) = path
            .strip_prefix("/v1/")
            .and_then(|rest| rest.rsplit_once('/'))
    {
        counters.entity_gets.fetch_add(1, Ordering::Relaxed);
        return match record.entity(entity_path, id) {
            Some(entity) => HttpResponse::Ok().json(entity),
            None => HttpResponse::NotFound().json(gateway_error(
                "NOT_FOUND",
                &format!("No {entity_path} with id {id}"),
            )),
        };
    }
    if request.method() != actix_web::http::Method::POST || !CREATING_PATHS.contains(&path) {
        return HttpResponse::NotFound().json(gateway_error(
            "NOT_FOUND",
            "The simulated Tenant API answers creating calls and entity GETs only",
        ));
    }
    let n = counters.created.fetch_add(1, Ordering::Relaxed) + 1;
    let planned = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|b| b.get("simulatorGatewayId").cloned());
    let id = planned.unwrap_or_else(|| json!(900_000_000 + n));
    HttpResponse::Created().json(json!({"id": id, "status": "RECEIVED_BY_GATEWAY"}))
}
