//! The audit log: every inbound request, accepted or rejected (design.md, flow step 5).

use chrono::{DateTime, Utc};
use entity::audit_log;
use sea_orm::{ActiveModelTrait, ConnectionTrait, Set};
use serde_json::Value;
use uuid::Uuid;

use super::StoreError;

/// What the audit log records of one request; filled in as the request is processed.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub request_id: Option<String>,
    pub conversation_id: Option<String>,
    pub method: String,
    pub path: String,
    pub remote_addr: Option<String>,
    pub principal: Option<String>,
    /// Request headers with credentials removed.
    pub headers: Value,
    pub body: Option<String>,
    pub body_size: i64,
    pub response_status: u16,
    pub response_body: Option<String>,
    pub error_uuid: Option<Uuid>,
    pub error_code: Option<String>,
    /// ACCEPTED, REDELIVERED, ANOMALY, REJECTED, UNAVAILABLE or FAILED.
    pub outcome: String,
    pub kci_id: Option<Uuid>,
    pub received_at: DateTime<Utc>,
}

impl AuditRecord {
    /// Inserts the record on `db` (a connection or an open transaction); returns its id.
    pub async fn insert(&self, db: &impl ConnectionTrait) -> Result<i64, StoreError> {
        Ok(self.to_active_model().insert(db).await?.id)
    }

    /// The row to insert; its duration runs until now.
    pub fn to_active_model(&self) -> audit_log::ActiveModel {
        let duration_ms = (Utc::now() - self.received_at).num_milliseconds().max(0);
        audit_log::ActiveModel {
            request_id: Set(self.request_id.clone()),
            conversation_id: Set(self.conversation_id.clone()),
            method: Set(self.method.clone()),
            path: Set(self.path.clone()),
            remote_addr: Set(self.remote_addr.clone()),
            principal: Set(self.principal.clone()),
            request_headers: Set(self.headers.clone()),
            request_body: Set(self.body.clone()),
            request_body_size: Set(self.body_size),
            response_status: Set(i32::from(self.response_status)),
            response_body: Set(self.response_body.clone()),
            error_uuid: Set(self.error_uuid),
            error_code: Set(self.error_code.clone()),
            outcome: Set(self.outcome.clone()),
            kci_id: Set(self.kci_id),
            received_at: Set(self.received_at),
            duration_ms: Set(duration_ms),
            ..Default::default()
        }
    }
}

/// Headers that carry credentials: never stored.
const SECRET_HEADERS: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// The request headers as a JSON object, credentials removed.
pub fn sanitized_headers(headers: &actix_web::http::header::HeaderMap) -> Value {
    let mut object = serde_json::Map::new();
    for (name, value) in headers {
        let name = name.as_str();
        if SECRET_HEADERS.contains(&name) {
            continue;
        }
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match object.get_mut(name) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(&value);
            }
            _ => {
                object.insert(name.to_owned(), Value::String(value));
            }
        }
    }
    Value::Object(object)
}
