//! Creating calls the gateway answered but we could not record yet (the database down or slow).
//!
//! Once the gateway has answered, its answer goes back to the caller unchanged: answering "not
//! recorded, please retry" would make the caller place the order a second time. The original
//! request is recorded in the background instead, again and again with backoff until it is;
//! meanwhile it is listed in `/api/v1/attention` and counted in
//! `kci_receiver_egress_unrecorded_requests`. Kept in memory: a restart before the database comes
//! back loses the record (not the order), and the log line written at the time names it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Outbound, record_original_request};

/// At most this many wait; a further one is logged at ERROR and not kept.
const CAPACITY: usize = 10_000;
/// How long one recording attempt may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

struct Unrecorded {
    outbound: Outbound,
    request_id: String,
    conversation_id: String,
    status: u16,
    response_body: actix_web::web::Bytes,
    since: DateTime<Utc>,
    attempts: u32,
    last_error: String,
    next_attempt: Instant,
}

/// One waiting recording, as the attention view shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnrecordedRequest {
    pub conversation_id: String,
    pub request_id: String,
    /// `METHOD /path`.
    pub operation: String,
    /// The gateway's answer status.
    pub status: u16,
    pub since: DateTime<Utc>,
    pub attempts: u32,
    pub last_error: String,
}

/// The waiting recordings, and the task that retries them; cheap to clone.
#[derive(Clone, Default)]
pub struct UnrecordedRequests(Arc<Mutex<Vec<Unrecorded>>>);

impl UnrecordedRequests {
    /// Retries the waiting recordings until `shutdown`.
    pub fn start(&self, db: crate::store::Database, shutdown: CancellationToken) {
        let waiting = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
                waiting.retry_due(&db).await;
            }
        });
    }

    /// Records it later.
    pub fn add(
        &self,
        outbound: &Outbound,
        request_id: &str,
        conversation_id: &str,
        status: u16,
        response_body: &actix_web::web::Bytes,
        error: String,
    ) {
        let Ok(mut waiting) = self.0.lock() else {
            return;
        };
        if waiting.len() >= CAPACITY {
            tracing::error!(
                conversation_id,
                request_id,
                "too many original requests wait to be recorded; this one is only in this log line"
            );
            return;
        }
        waiting.push(Unrecorded {
            outbound: outbound.clone(),
            request_id: request_id.to_owned(),
            conversation_id: conversation_id.to_owned(),
            status,
            response_body: response_body.clone(),
            since: Utc::now(),
            attempts: 1,
            last_error: error,
            next_attempt: Instant::now() + Duration::from_secs(1),
        });
    }

    pub fn len(&self) -> usize {
        self.0.lock().map_or(0, |waiting| waiting.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn list(&self) -> Vec<UnrecordedRequest> {
        self.0
            .lock()
            .map(|waiting| {
                waiting
                    .iter()
                    .map(|u| UnrecordedRequest {
                        conversation_id: u.conversation_id.clone(),
                        request_id: u.request_id.clone(),
                        operation: format!("{} {}", u.outbound.method, u.outbound.path()),
                        status: u.status,
                        since: u.since,
                        attempts: u.attempts,
                        last_error: u.last_error.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn retry_due(&self, db: &crate::store::Database) {
        let due: Vec<Unrecorded> = {
            let Ok(mut waiting) = self.0.lock() else {
                return;
            };
            let now = Instant::now();
            let (due, later) = std::mem::take(&mut *waiting)
                .into_iter()
                .partition(|u| u.next_attempt <= now);
            *waiting = later;
            due
        };
        for mut unrecorded in due {
            let recorded = tokio::time::timeout(
                ATTEMPT_TIMEOUT,
                record_original_request(
                    db,
                    &unrecorded.outbound,
                    &unrecorded.request_id,
                    &unrecorded.conversation_id,
                    unrecorded.status,
                    &unrecorded.response_body,
                ),
            )
            .await;
            match recorded {
                Ok(Ok(registration)) => tracing::info!(
                    conversation_id = unrecorded.conversation_id,
                    attempts = unrecorded.attempts + 1,
                    matched = registration.matched_entities,
                    "original request recorded after all"
                ),
                failure => {
                    unrecorded.last_error = match failure {
                        Ok(Err(error)) => error.to_string(),
                        _ => format!("no answer within {ATTEMPT_TIMEOUT:?}"),
                    };
                    unrecorded.attempts += 1;
                    let backoff =
                        Duration::from_secs(2u64.saturating_pow(unrecorded.attempts.min(6)));
                    unrecorded.next_attempt = Instant::now() + backoff;
                    if let Ok(mut waiting) = self.0.lock() {
                        waiting.push(unrecorded);
                    }
                }
            }
        }
    }
}
