//! The audit log: every inbound request, accepted or rejected (design.md, flow step 5).
//!
//! An accepted KCI's record is written in the KCI's own transaction. Everything else (rejections,
//! egress calls) goes through the [`AuditSink`]: a bounded queue written in batches by one
//! background task, so that answering a request never waits for the database (which may be
//! slow or hung) and a flood of bad requests costs one multi-row insert per batch, not one
//! insert each.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use chrono::{DateTime, Utc};
use entity::audit_log;
use sea_orm::{ActiveModelTrait, ConnectionTrait, DatabaseConnection, EntityTrait, Set};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::StoreError;
use super::text::{AUDIT_ID_MAX, bounded, storable, storable_json};

/// What became of a request, as the audit log's `outcome` column says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    /// `POST /kcis`: a new KCI recorded (applied, stale or with an applied sequence number).
    Accepted,
    /// `POST /kcis`: the same KCI again, counted.
    Redelivered,
    /// `POST /kcis`: the same KCI id with different content, recorded as an anomaly.
    Anomaly,
    /// Refused for what was sent (a 4xx).
    Rejected,
    /// Not carried out: the database unavailable (503).
    Unavailable,
    /// A fault of ours (500).
    Failed,
    /// Failed authentication (401, 403), one record per source, method and path and window,
    /// with the number of attempts.
    AuthFailed,
    /// A change an operator made through `/api/v1` (who: `principal`).
    OperatorAction,
    /// Egress: forwarded, and the Tenant API answered (any status but a 5xx).
    Proxied,
    /// Egress: forwarded, and the Tenant API answered with a 5xx (passed on unchanged).
    ProxiedUpstreamError,
    /// Egress: a creating call the Tenant API answered whose original request is not recorded
    /// yet (recorded in the background, `egress::unrecorded`).
    ProxiedNotRecordedYet,
    /// Egress: not forwarded, or no answer (refused path, unreachable, timeout): 4xx/502/504.
    ProxyFailed,
}

impl AuditOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Accepted => "ACCEPTED",
            AuditOutcome::Redelivered => "REDELIVERED",
            AuditOutcome::Anomaly => "ANOMALY",
            AuditOutcome::Rejected => "REJECTED",
            AuditOutcome::Unavailable => "UNAVAILABLE",
            AuditOutcome::Failed => "FAILED",
            AuditOutcome::AuthFailed => "AUTH_FAILED",
            AuditOutcome::OperatorAction => "OPERATOR_ACTION",
            AuditOutcome::Proxied => "PROXIED",
            AuditOutcome::ProxiedUpstreamError => "PROXIED_UPSTREAM_ERROR",
            AuditOutcome::ProxiedNotRecordedYet => "PROXIED_NOT_RECORDED_YET",
            AuditOutcome::ProxyFailed => "PROXY_FAILED",
        }
    }
}

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
    pub outcome: AuditOutcome,
    pub kci_id: Option<Uuid>,
    pub received_at: DateTime<Utc>,
}

impl AuditRecord {
    /// Inserts the record on `db` (a connection or an open transaction); returns its id.
    pub async fn insert(&self, db: &impl ConnectionTrait) -> Result<i64, StoreError> {
        Ok(self.to_active_model().insert(db).await?.id)
    }

    /// The row to insert; its duration runs until now. Whatever came from the request is made
    /// storable: the correlation headers (indexed) bounded, NUL replaced (`store::text`).
    pub fn to_active_model(&self) -> audit_log::ActiveModel {
        let duration_ms = (Utc::now() - self.received_at).num_milliseconds().max(0);
        let id = |value: &Option<String>| {
            value
                .as_deref()
                .map(|v| bounded(v, AUDIT_ID_MAX).into_owned())
        };
        let text = |value: &Option<String>| value.as_deref().map(|v| storable(v).into_owned());
        audit_log::ActiveModel {
            request_id: Set(id(&self.request_id)),
            conversation_id: Set(id(&self.conversation_id)),
            method: Set(self.method.clone()),
            path: Set(storable(&self.path).into_owned()),
            remote_addr: Set(self.remote_addr.clone()),
            principal: Set(text(&self.principal)),
            request_headers: Set(storable_json(&self.headers).into_owned()),
            request_body: Set(text(&self.body)),
            request_body_size: Set(self.body_size),
            response_status: Set(i32::from(self.response_status)),
            response_body: Set(text(&self.response_body)),
            error_uuid: Set(self.error_uuid),
            error_code: Set(self.error_code.clone()),
            outcome: Set(self.outcome.as_str().to_owned()),
            kci_id: Set(self.kci_id),
            received_at: Set(self.received_at),
            duration_ms: Set(duration_ms),
            attempts: Set(1),
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
    "x-api-key",
    "x-auth-token",
];

/// Request headers (name, raw value) as a JSON object, credentials removed.
pub fn sanitized_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Value {
    let mut object = serde_json::Map::new();
    for (name, value) in headers {
        if SECRET_HEADERS.contains(&name) {
            continue;
        }
        let value = String::from_utf8_lossy(value).into_owned();
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

/// Most records waiting to be written; beyond it a record is dropped (logged and counted), so
/// that an outage of the database cannot grow memory without bound.
const SINK_CAPACITY: usize = 10_000;
/// Most records in one insert.
const SINK_BATCH: usize = 500;

/// A record waiting to be written, and how many requests it stands for.
struct Queued {
    record: AuditRecord,
    attempts: i32,
}

impl Queued {
    fn to_active_model(&self) -> audit_log::ActiveModel {
        let mut row = self.record.to_active_model();
        row.attempts = Set(self.attempts);
        row
    }
}

/// Writes audit records in the background, in batches, without ever making a request wait.
#[derive(Clone)]
pub struct AuditSink {
    queue: mpsc::Sender<Queued>,
    dropped: Arc<AtomicU64>,
}

impl AuditSink {
    /// Starts the writer on the current runtime; it writes what is queued and stops after
    /// `shutdown` (writing what it has first, if the database lets it).
    pub fn start(db: DatabaseConnection, shutdown: CancellationToken) -> AuditSink {
        let (queue, records) = mpsc::channel(SINK_CAPACITY);
        tokio::spawn(write_batches(db, records, shutdown));
        AuditSink {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Queues a record; never waits. A full queue drops it (the log keeps a summary).
    pub fn record(&self, record: AuditRecord) {
        self.send(Queued {
            record,
            attempts: 1,
        });
    }

    /// Queues a record that stands for `attempts` requests alike (aggregated failed
    /// authentication).
    pub fn record_aggregated(&self, record: AuditRecord, attempts: u32) {
        self.send(Queued {
            record,
            attempts: i32::try_from(attempts).unwrap_or(i32::MAX),
        });
    }

    fn send(&self, queued: Queued) {
        if let Err(error) = self.queue.try_send(queued) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            let record = match &error {
                mpsc::error::TrySendError::Full(queued)
                | mpsc::error::TrySendError::Closed(queued) => &queued.record,
            };
            tracing::warn!(
                request_id = ?record.request_id,
                status = record.response_status,
                error_uuid = ?record.error_uuid,
                "audit queue full: record kept in this log line only"
            );
        }
    }

    /// Records dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn write_batches(
    db: DatabaseConnection,
    mut records: mpsc::Receiver<Queued>,
    shutdown: CancellationToken,
) {
    let mut batch: Vec<Queued> = Vec::with_capacity(SINK_BATCH);
    let mut backoff = Duration::from_millis(200);
    loop {
        if batch.is_empty() {
            tokio::select! {
                received = records.recv_many(&mut batch, SINK_BATCH) => {
                    if received == 0 {
                        return;
                    }
                }
                _ = shutdown.cancelled() => {
                    records.close();
                    if records.recv_many(&mut batch, SINK_BATCH).await == 0 {
                        return;
                    }
                }
            }
        }
        let rows = batch.iter().map(Queued::to_active_model);
        let written = tokio::time::timeout(
            Duration::from_secs(10),
            audit_log::Entity::insert_many(rows).exec_without_returning(&db),
        )
        .await;
        let unavailable = match written {
            Ok(Ok(_)) => {
                batch.clear();
                backoff = Duration::from_millis(200);
                continue;
            }
            Ok(Err(error)) => {
                let error = StoreError::from(error);
                if error.is_unavailable() {
                    error.to_string()
                } else {
                    // Something in the batch is refused: write one at a time, keep what can be.
                    for queued in batch.drain(..) {
                        if let Err(error) = queued.to_active_model().insert(&db).await {
                            tracing::error!(error = %error, request_id = ?queued.record.request_id, status = queued.record.response_status, "audit record refused by the database; dropped");
                        }
                    }
                    continue;
                }
            }
            Err(_) => "timed out".to_owned(),
        };
        tracing::warn!(records = batch.len(), error = unavailable, retry_in = ?backoff, "could not write audit records; retrying");
        if shutdown.is_cancelled() {
            tracing::warn!(
                records = batch.len(),
                "shutting down: audit records not written"
            );
            return;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.cancelled() => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}
