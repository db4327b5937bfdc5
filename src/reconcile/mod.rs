//! Gap repair (design.md, "Nothing lost, even by the gateway"): an entity whose KCIs stopped short
//! is fetched from the Tenant API (`GET /{resource}/{id}`, through the egress client: its OAuth2
//! token, renewed once on a 401, and correlation headers), its `updates[]` compared with the KCIs
//! recorded here, and every KCI the gateway never delivered recorded exactly as if it had been:
//! through intake's own [`crate::intake::record_batch`] (same rules, history, outbox event and
//! audit record), marked `RECONCILIATION` in the history and recovered in the AMQP envelope and
//! headers.
//!
//! - [`answer`]: reading the gateway's answer (what is assumed about its shape is said there).
//! - [`store`]: the lease (one instance per entity at a time, on either database), the log of
//!   reconciliations, the entity's reconciliation state, the scheduler's candidates.
//! - [`scheduler`]: reconciles open gaps after `reconcile.gap_grace_seconds` and silent entities
//!   after `reconcile.stuck_after_seconds`, at most `reconcile.max_per_minute`.
//!
//! Reconciling is idempotent: KCIs recorded already (by id) are left alone, so a second run
//! records nothing. A failure (unreachable, timeout, 401 after one renewal, 429/5xx, malformed
//! answer) is recorded with the gateway's answer and retried later with back-off (longer when
//! the gateway says `Retry-After`); none of it holds a database connection while the gateway is
//! asked, so intake and the relay never wait on it.

pub mod answer;
pub mod scheduler;
pub mod store;

pub use store::Finished;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix_web::http::Method;
use chrono::{DateTime, Utc};
use entity::reconciliation::{self, ReconcileOutcome, ReconcileTrigger};
use entity::state_transition::KciSource;
use entity::{conversation, kci as kci_row, tracked_entity};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect, Set};
use serde_json::json;

use crate::config::ReconcileSettings;
use crate::egress::{EgressClient, EgressError, Outbound};
use crate::http::metrics::Metrics;
use crate::intake::{Delivery, IntakeError, record_batch};
use crate::kci::EntityType;
use crate::operations::queries::{Family, find_entities};
use crate::outbox::signal::OutboxSignal;
use crate::store::audit::{AuditOutcome, AuditRecord};
use crate::store::text::{NOTE_MAX, bounded};
use crate::store::{Database, StoreError};

/// Most recovered KCIs recorded in one transaction.
const RECOVERY_BATCH: usize = 200;

/// The principal of recovered KCIs' audit records.
pub const PRINCIPAL: &str = "reconciliation";

/// What to reconcile: an entity as the Tenant API addresses it.
#[derive(Debug, Clone)]
pub struct Target {
    pub family: Family,
    pub gateway_id: String,
}

impl Target {
    /// The target of a tracked entity; none for an entity type the docs do not list (the
    /// Tenant API has no `GET` we know of for it).
    pub fn of(entity: &tracked_entity::Model) -> Option<Target> {
        let listed = EntityType::from_wire(&entity.entity_type)?;
        Some(Target {
            family: Family::of(listed),
            gateway_id: entity.gateway_id.clone(),
        })
    }
}

/// Why a reconciliation did not run (its outcome, when it ran, is in the returned row).
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// Another instance (or an earlier request) is reconciling this entity right now.
    #[error("this entity is being reconciled already")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Intake(#[from] IntakeError),
}

/// Reconciles entities with the Tenant API. Cheap to clone.
#[derive(Clone)]
pub struct Reconciler {
    db: Database,
    egress: Arc<EgressClient>,
    settings: ReconcileSettings,
    aliases: Arc<HashMap<String, EntityType>>,
    outbox_signal: Option<OutboxSignal>,
    metrics: Option<Metrics>,
    notify_other_processes: bool,
}

impl Reconciler {
    pub fn new(
        db: Database,
        egress: Arc<EgressClient>,
        settings: ReconcileSettings,
        aliases: HashMap<String, EntityType>,
    ) -> Reconciler {
        Reconciler {
            db,
            egress,
            settings,
            aliases: Arc::new(aliases),
            outbox_signal: None,
            metrics: None,
            notify_other_processes: true,
        }
    }

    /// Wakes this process's relay when KCIs are recovered.
    pub fn with_outbox_signal(mut self, signal: OutboxSignal) -> Reconciler {
        self.outbox_signal = Some(signal);
        self
    }

    /// Counts reconciliations by outcome and recovered KCIs.
    pub fn with_metrics(mut self, metrics: Metrics) -> Reconciler {
        self.metrics = Some(metrics);
        self
    }

    /// PostgreSQL: `NOTIFY` relays in other processes when KCIs are recovered.
    pub fn notifying_other_processes(mut self, notify: bool) -> Reconciler {
        self.notify_other_processes = notify;
        self
    }

    pub fn settings(&self) -> &ReconcileSettings {
        &self.settings
    }

    /// Reconciles one entity now: asks the gateway, records what was never delivered, and
    /// returns the reconciliation as stored (its outcome, what was recovered, the gateway's
    /// error). `Err` only when it could not run: another reconciliation of the entity is under
    /// way, or the database failed.
    pub async fn reconcile(
        &self,
        target: &Target,
        trigger: ReconcileTrigger,
        requested_by: Option<&str>,
    ) -> Result<reconciliation::Model, ReconcileError> {
        let started_at = Utc::now();
        let known = find_entities(&self.db, target.family, &target.gateway_id, None).await?;
        let resource = target.family.resource();
        let started = reconciliation::ActiveModel {
            resource: Set(resource.to_owned()),
            gateway_id: Set(target.gateway_id.clone()),
            entity_type: Set((known.len() == 1).then(|| known[0].entity_type.clone())),
            tracked_entity_id: Set((known.len() == 1).then(|| known[0].id)),
            trigger: Set(trigger),
            outcome: Set(ReconcileOutcome::Running),
            recovered: Set(0),
            unusable: Set(0),
            missing_before: Set(missing_text(&known)),
            requested_by: Set(requested_by.map(str::to_owned)),
            started_at: Set(started_at),
            lease_until: Set(Some(
                started_at + chrono::Duration::seconds(self.settings.lease_seconds as i64),
            )),
            ..Default::default()
        };
        let Some(running) =
            store::claim(&self.db, started, resource, &target.gateway_id, started_at).await?
        else {
            return Err(ReconcileError::Busy);
        };
        let conversation_id = self.conversation_of(target, &known).await?;
        let fetched = self.fetch(target, conversation_id.as_deref()).await;
        let now = Utc::now();
        let finished = match fetched {
            Fetched::Answered {
                status: 200,
                body,
                request_id,
                conversation_id,
                ..
            } => {
                let request = Request {
                    resource,
                    gateway_id: &target.gateway_id,
                    request_id: &request_id,
                    conversation_id: &conversation_id,
                    fetched_at: now,
                };
                self.recover(target, &known, &body, &request).await?
            }
            Fetched::Answered {
                status: 404, body, ..
            } => Finished::failed(
                ReconcileOutcome::NotFound,
                Some(404),
                format!(
                    "the gateway does not know {resource}/{}: {}",
                    target.gateway_id,
                    bounded(&body, NOTE_MAX)
                ),
                now + self.backoff(u32::MAX, None),
            ),
            Fetched::Answered {
                status,
                body,
                retry_after,
                ..
            } => Finished::failed(
                ReconcileOutcome::Failed,
                Some(status),
                format!(
                    "the gateway answered {status}: {}",
                    bounded(&body, NOTE_MAX)
                ),
                now + self.backoff(attempts(&known), retry_after),
            ),
            Fetched::NoAnswer(error) => Finished::failed(
                ReconcileOutcome::Failed,
                None,
                error.to_string(),
                now + self.backoff(attempts(&known), None),
            ),
        };
        let stored = store::finish(&self.db, &running, target.family, &finished, now).await?;
        self.report(&stored, &known, now);
        Ok(stored)
    }

    /// The `X-Conversation-ID` to ask with (and to record recovered KCIs under): the entity's
    /// own, or that of the original request that created it, when known.
    async fn conversation_of(
        &self,
        target: &Target,
        known: &[tracked_entity::Model],
    ) -> Result<Option<String>, StoreError> {
        if let Some(entity) = known.first() {
            return Ok(Some(entity.conversation_id.clone()));
        }
        let request = conversation::Entity::find()
            .filter(conversation::Column::GatewayId.eq(target.gateway_id.as_str()))
            .order_by_desc(conversation::Column::Id)
            .one(&self.db)
            .await?;
        Ok(request.map(|r| r.conversation_id))
    }

    async fn fetch(&self, target: &Target, conversation_id: Option<&str>) -> Fetched {
        let mut headers = Vec::new();
        if let Some(conversation_id) = conversation_id {
            headers.push((
                "x-conversation-id".to_owned(),
                conversation_id.as_bytes().to_vec(),
            ));
        }
        let outbound = Outbound {
            method: Method::GET,
            path_and_query: format!(
                "/{}/{}",
                target.family.resource(),
                path_segment(&target.gateway_id)
            ),
            headers,
            body: Default::default(),
        };
        let upstream = match self.egress.send(&outbound).await {
            Ok(upstream) => upstream,
            Err(error) => return Fetched::NoAnswer(error),
        };
        let status = upstream.response.status().as_u16();
        let retry_after = retry_after(upstream.response.headers());
        let mut response = upstream.response;
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > self.settings.max_answer_bytes {
                        return Fetched::NoAnswer(EgressError::Refused(format!(
                            "the gateway's answer is larger than reconcile.max_answer_bytes ({})",
                            self.settings.max_answer_bytes
                        )));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(error) if error.is_timeout() => {
                    return Fetched::NoAnswer(EgressError::Timeout(Duration::from_millis(
                        self.egress.settings().timeout_ms,
                    )));
                }
                Err(error) => {
                    return Fetched::NoAnswer(EgressError::Unreachable(error.to_string()));
                }
            }
        }
        Fetched::Answered {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
            retry_after,
            request_id: upstream.request_id,
            conversation_id: upstream.conversation_id,
        }
    }

    /// Records the KCIs of a 200 answer that are not recorded here, in sequence order, and says
    /// how the entity now compares with the gateway's.
    async fn recover(
        &self,
        target: &Target,
        known: &[tracked_entity::Model],
        body: &str,
        request: &Request<'_>,
    ) -> Result<Finished, ReconcileError> {
        let gateway = match answer::read(
            body,
            target.family,
            &target.gateway_id,
            &self.aliases,
            request.fetched_at,
        ) {
            Ok(gateway) => gateway,
            Err(problem) => {
                return Ok(Finished::failed(
                    ReconcileOutcome::Failed,
                    Some(200),
                    format!("malformed answer ({problem}): {}", bounded(body, NOTE_MAX)),
                    request.fetched_at + self.backoff(attempts(known), None),
                ));
            }
        };
        let ids: Vec<uuid::Uuid> = gateway.usable.iter().map(|u| u.kci.id).collect();
        let mut recorded: HashSet<uuid::Uuid> = HashSet::new();
        for chunk in ids.chunks(RECOVERY_BATCH) {
            recorded.extend(
                kci_row::Entity::find()
                    .select_only()
                    .column(kci_row::Column::KciId)
                    .filter(kci_row::Column::KciId.is_in(chunk.iter().copied()))
                    .into_tuple::<uuid::Uuid>()
                    .all(&self.db)
                    .await
                    .map_err(StoreError::from)?,
            );
        }
        let mut gateway_has_up_to: HashMap<String, i64> = HashMap::new();
        for update in &gateway.usable {
            let entity_type = update.kci.entity_type.as_str().to_owned();
            let up_to = gateway_has_up_to.entry(entity_type).or_insert(0);
            *up_to = (*up_to).max(update.kci.sequence_number);
        }
        let deliveries: Vec<Delivery> = gateway
            .usable
            .into_iter()
            .filter(|update| !recorded.contains(&update.kci.id))
            .map(|update| recovered_delivery(update, request))
            .collect();
        let mut recovered = 0;
        for chunk in deliveries.chunks(RECOVERY_BATCH) {
            let batch: Vec<&Delivery> = chunk.iter().collect();
            let outcomes = record_batch(&self.db, &batch, self.notify_other_processes).await?;
            recovered += outcomes.iter().filter(|r| r.event_id.is_some()).count();
        }
        if recovered > 0
            && let Some(signal) = &self.outbox_signal
        {
            signal.notify();
        }

        // How the entity compares now: the gateway's status against ours.
        let ours = find_entities(&self.db, target.family, &target.gateway_id, None).await?;
        let mut notes = Vec::new();
        let mut differs = false;
        if let Some(theirs) = &gateway.status
            && let Some(entity) = ours.iter().max_by_key(|e| e.last_kci_at)
            && theirs != &entity.status
        {
            differs = true;
            notes.push(format!(
                "the gateway says status {theirs}, we hold {} (after sequence {}): flagged, not overwritten",
                entity.status, entity.last_sequence_number
            ));
        }
        if !gateway.unusable.is_empty() {
            notes.push(format!(
                "{} update(s) of the answer are not KCIs about this entity (kept in unusableUpdates)",
                gateway.unusable.len()
            ));
        }
        if recovered > 0 {
            notes.insert(
                0,
                format!("recovered {recovered} KCI(s) the gateway never delivered"),
            );
        }
        let outcome = if differs || !gateway.unusable.is_empty() {
            ReconcileOutcome::Differs
        } else if recovered > 0 {
            ReconcileOutcome::Recovered
        } else {
            ReconcileOutcome::InSync
        };
        Ok(Finished {
            outcome,
            recovered: i32::try_from(recovered).unwrap_or(i32::MAX),
            unusable: gateway.unusable,
            gateway_status: Some(200),
            detail: (!notes.is_empty()).then(|| notes.join("; ")),
            gateway_has_up_to: gateway_has_up_to.into_iter().collect(),
            next_attempt_at: None,
            unresolved_retry_at: request.fetched_at + self.backoff(attempts(known), None),
        })
    }

    /// Back-off after a failure: `initial * 2^attempts`, at most `max_backoff`, at least what
    /// the gateway's `Retry-After` asked.
    fn backoff(&self, attempts: u32, retry_after: Option<Duration>) -> chrono::Duration {
        let max = self.settings.max_backoff_seconds;
        let exponential = self
            .settings
            .initial_backoff_seconds
            .saturating_mul(1u64.checked_shl(attempts.min(32)).unwrap_or(u64::MAX))
            .min(max);
        let wanted = retry_after.map_or(0, |d| d.as_secs()).max(exponential);
        chrono::Duration::seconds(i64::try_from(wanted).unwrap_or(i64::MAX / 1000))
    }

    fn report(
        &self,
        stored: &reconciliation::Model,
        known: &[tracked_entity::Model],
        now: DateTime<Utc>,
    ) {
        let outcome = stored.outcome.as_str();
        let delay = known
            .iter()
            .filter_map(|e| e.gap_open_since)
            .min()
            .map(|since| (now - since).num_milliseconds().max(0) as f64 / 1000.0);
        if let Some(metrics) = &self.metrics {
            metrics.count_reconciliation(
                outcome,
                u64::try_from(stored.recovered).unwrap_or(0),
                delay.filter(|_| stored.recovered > 0),
            );
        }
        let level_warn = matches!(
            stored.outcome,
            ReconcileOutcome::Failed | ReconcileOutcome::NotFound | ReconcileOutcome::Differs
        );
        let (resource, id) = (&stored.resource, &stored.gateway_id);
        if level_warn {
            tracing::warn!(
                resource,
                gateway.id = id,
                outcome,
                detail = stored.detail,
                "reconciliation"
            );
        } else {
            tracing::info!(
                resource,
                gateway.id = id,
                outcome,
                recovered = stored.recovered,
                "reconciliation"
            );
        }
    }
}

/// The details of the `GET` that fetched the entity, which recovered KCIs are recorded under.
struct Request<'a> {
    resource: &'a str,
    gateway_id: &'a str,
    request_id: &'a str,
    conversation_id: &'a str,
    fetched_at: DateTime<Utc>,
}

enum Fetched {
    Answered {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
        request_id: String,
        conversation_id: String,
    },
    NoAnswer(EgressError),
}

impl Finished {
    fn failed(
        outcome: ReconcileOutcome,
        status: Option<u16>,
        detail: String,
        next_attempt_at: DateTime<Utc>,
    ) -> Finished {
        Finished {
            outcome,
            recovered: 0,
            unusable: Vec::new(),
            gateway_status: status,
            detail: Some(detail),
            gateway_has_up_to: Vec::new(),
            next_attempt_at: Some(next_attempt_at),
            unresolved_retry_at: next_attempt_at,
        }
    }
}

/// A recovered KCI as a delivery: the `GET`'s ids, its own raw text, an audit record that says
/// where it came from.
fn recovered_delivery(update: answer::UsableUpdate, request: &Request<'_>) -> Delivery {
    let audit = AuditRecord {
        request_id: Some(request.request_id.to_owned()),
        conversation_id: Some(request.conversation_id.to_owned()),
        method: "GET".to_owned(),
        path: format!("/{}/{}", request.resource, request.gateway_id),
        remote_addr: None,
        principal: Some(PRINCIPAL.to_owned()),
        headers: json!({"x-kci-source": KciSource::Reconciliation.as_str()}),
        body: Some(update.raw.clone()),
        body_size: update.raw.len() as i64,
        response_status: 200,
        response_body: None,
        error_uuid: None,
        error_code: None,
        outcome: AuditOutcome::Accepted,
        kci_id: Some(update.kci.id),
        received_at: request.fetched_at,
    };
    Delivery {
        kci: update.kci,
        raw_body: update.raw,
        request_id: request.request_id.to_owned(),
        conversation_id: request.conversation_id.to_owned(),
        audit,
        source: KciSource::Reconciliation,
        // A trace of its own: no request of the gateway's started it.
        trace: crate::trace_context::TraceContext::child_of(None),
    }
}

fn missing_text(known: &[tracked_entity::Model]) -> Option<String> {
    let parts: Vec<String> = known
        .iter()
        .filter_map(|e| {
            e.missing_sequences
                .as_ref()
                .map(|m| format!("{}: {m}", e.entity_type))
        })
        .collect();
    (!parts.is_empty()).then(|| bounded(&parts.join("; "), NOTE_MAX).into_owned())
}

/// Failures in a row so far (the most of the entities known under the id).
fn attempts(known: &[tracked_entity::Model]) -> u32 {
    known
        .iter()
        .map(|e| u32::try_from(e.reconcile_attempts).unwrap_or(0))
        .max()
        .unwrap_or(0)
}

/// A gateway id as one path segment: unreserved characters as they are, the rest
/// percent-encoded (the egress client still refuses what could leave the resource).
fn path_segment(id: &str) -> String {
    let mut segment = String::with_capacity(id.len());
    for byte in id.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~' | b'.') {
            segment.push(byte as char);
        } else {
            segment.push_str(&format!("%{byte:02X}"));
        }
    }
    segment
}

/// `Retry-After`: seconds, or an HTTP date.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&Utc) - Utc::now()).to_std().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_become_one_plain_segment() {
        assert_eq!(path_segment("12345"), "12345");
        assert_eq!(path_segment("a/b c"), "a%2Fb%20c");
        assert_eq!(path_segment("é"), "%C3%A9");
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "120".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(120)));
        let later = (Utc::now() + chrono::Duration::seconds(600))
            .format("%a, %d %b %Y %H:%M:%S GMT")
            .to_string();
        headers.insert("retry-after", later.parse().unwrap());
        let parsed = retry_after(&headers).unwrap().as_secs();
        assert!((590..=600).contains(&parsed), "{parsed}");
        headers.insert("retry-after", "soon".parse().unwrap());
        assert_eq!(retry_after(&headers), None);
    }
}
