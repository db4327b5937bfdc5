//! Recording one KCI: design.md's "flow of one KCI", step 2, in one database transaction.
//!
//! Record the KCI (raw body kept), find or create the tracked entity and lock it, match it to its
//! original request by `X-Conversation-ID`, apply the state if the KCI is newer than what we hold,
//! append the transition to the history, write the outbox event and the audit record. Commit, and
//! only then may the caller answer 204.
//!
//! Concurrency: on PostgreSQL the entity row is locked (`SELECT ... FOR UPDATE`) so that KCIs
//! about one entity are applied one at a time; on SQLite every write transaction starts
//! `IMMEDIATE`, which serialises writers. A lost race on a unique key (the same new entity or the
//! same KCI id arriving twice at once) rolls back and runs the whole transaction again, when the
//! winner's rows are visible.

pub mod conversations;

use chrono::{DateTime, Utc};
use entity::conversation;
use entity::kci::{self as kci_row, KciOutcome};
use entity::outbox_event::{self, OutboxStatus};
use entity::state_transition;
use entity::tracked_entity::{self, Correlation};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    EntityTrait, ExprTrait, QueryFilter, QuerySelect, Set, SqliteTransactionMode,
    TransactionOptions, TransactionTrait,
};
use serde_json::Value;
use uuid::Uuid;

use crate::kci::Kci;
use crate::lifecycle::Verdict;
use crate::outbox::envelope::{self, EnvelopeFacts};
use crate::store::StoreError;
use crate::store::audit::AuditRecord;

/// How many times a transaction that lost a race is run again before giving up.
const ATTEMPTS: usize = 5;

/// One delivery of a KCI by the gateway.
pub struct Delivery {
    pub kci: Kci,
    /// The body exactly as received.
    pub raw_body: String,
    pub request_id: String,
    pub conversation_id: String,
    /// The audit record of this request; its outcome is completed here.
    pub audit: AuditRecord,
    /// PostgreSQL: also wake relays in other processes (`relay.notify_other_processes`).
    pub notify_other_processes: bool,
}

/// What recording did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new KCI, newer than what we held: the current state moved.
    Applied,
    /// A new KCI older than the one applied: recorded, state unchanged.
    Stale,
    /// A new KCI with the sequence number already applied: recorded, state unchanged.
    DuplicateSequence,
    /// The same KCI again: nothing changed but its redelivery counter.
    Redelivered,
    /// The same KCI id with different content: recorded as an anomaly, not applied.
    Anomaly,
}

impl Outcome {
    /// The audit log's word for it.
    pub fn audit_outcome(self) -> &'static str {
        match self {
            Outcome::Applied | Outcome::Stale | Outcome::DuplicateSequence => "ACCEPTED",
            Outcome::Redelivered => "REDELIVERED",
            Outcome::Anomaly => "ANOMALY",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub outcome: Outcome,
    pub tracked_entity_id: i64,
    /// The outbox event written, when one was (new KCIs only).
    pub event_id: Option<Uuid>,
}

/// Records a delivery durably. `Ok` means committed.
pub async fn record(db: &DatabaseConnection, delivery: &Delivery) -> Result<Recorded, StoreError> {
    let mut attempt = 1;
    loop {
        match record_once(db, delivery).await {
            Err(error) if error.is_retryable() && attempt < ATTEMPTS => {
                tracing::debug!(attempt, error = %error, "intake transaction lost a race; running it again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// Starts a write transaction: `BEGIN IMMEDIATE` on SQLite so that the write lock is taken up
/// front (a deferred transaction that upgrades later fails with BUSY instead of waiting).
pub async fn begin_write(db: &DatabaseConnection) -> Result<DatabaseTransaction, StoreError> {
    Ok(db
        .begin_with_options(TransactionOptions {
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await?)
}

async fn record_once(db: &DatabaseConnection, delivery: &Delivery) -> Result<Recorded, StoreError> {
    let txn = begin_write(db).await?;
    let existing = kci_row::Entity::find()
        .filter(kci_row::Column::KciId.eq(delivery.kci.id))
        .one(&txn)
        .await?;
    let recorded = match existing {
        Some(first) => record_redelivery(&txn, delivery, first).await?,
        None => record_new(&txn, delivery).await?,
    };
    txn.commit().await?;
    Ok(recorded)
}

/// The same KCI id again: identical content is counted, different content is an anomaly.
async fn record_redelivery(
    txn: &DatabaseTransaction,
    delivery: &Delivery,
    first: kci_row::Model,
) -> Result<Recorded, StoreError> {
    let now = Utc::now();
    let kci = &delivery.kci;
    let first_body: Value = serde_json::from_str(&first.raw_body).unwrap_or(Value::Null);
    let outcome = if kci.same_content_as(&first_body) {
        Outcome::Redelivered
    } else {
        Outcome::Anomaly
    };
    let counter = match outcome {
        Outcome::Redelivered => kci_row::Column::RedeliveryCount,
        _ => kci_row::Column::AnomalyCount,
    };
    kci_row::Entity::update_many()
        .col_expr(counter, Expr::col(counter).add(1))
        .col_expr(kci_row::Column::LastRedeliveredAt, Expr::value(now))
        .filter(kci_row::Column::Id.eq(first.id))
        .exec(txn)
        .await?;
    let audit_id = audited(txn, delivery, outcome).await?;

    if outcome == Outcome::Anomaly {
        let entity = tracked_entity::Entity::find_by_id(first.tracked_entity_id)
            .lock_exclusive()
            .one(txn)
            .await?;
        let differing = kci.differing_fields(&first_body).join(", ");
        state_transition::ActiveModel {
            previous_sequence_number: Set(entity.as_ref().map(|e| e.last_sequence_number)),
            from_status: Set(entity.as_ref().map(|e| e.status.clone())),
            applied: Set(false),
            flag_anomaly: Set(true),
            note: Set(Some(format!(
                "KCI {} delivered again with different content (X-Request-ID {}); differing fields: {differing}; not applied",
                kci.id, delivery.request_id
            ))),
            ..history_entry(kci, first.tracked_entity_id, first.id, audit_id, now)
        }
        .insert(txn)
        .await?;
        tracked_entity::Entity::update_many()
            .col_expr(tracked_entity::Column::FlagAnomaly, Expr::value(true))
            .filter(tracked_entity::Column::Id.eq(first.tracked_entity_id))
            .exec(txn)
            .await?;
        tracing::warn!(kci.id = %kci.id, fields = differing, "conflicting redelivery recorded as an anomaly");
    }
    Ok(Recorded {
        outcome,
        tracked_entity_id: first.tracked_entity_id,
        event_id: None,
    })
}

async fn audited(
    txn: &DatabaseTransaction,
    delivery: &Delivery,
    outcome: Outcome,
) -> Result<i64, StoreError> {
    let mut audit = delivery.audit.clone();
    audit.outcome = outcome.audit_outcome().to_owned();
    audit.kci_id = Some(delivery.kci.id);
    audit.insert(txn).await
}

/// A history entry with what the KCI itself says, no flags raised: callers set how it relates to
/// the entity (previous state, applied or not, flags, note).
fn history_entry(
    kci: &Kci,
    tracked_entity_id: i64,
    kci_ref: i64,
    audit_log_id: i64,
    now: DateTime<Utc>,
) -> state_transition::ActiveModel {
    state_transition::ActiveModel {
        tracked_entity_id: Set(tracked_entity_id),
        kci_ref: Set(kci_ref),
        kci_id: Set(kci.id),
        audit_log_id: Set(Some(audit_log_id)),
        sequence_number: Set(kci.sequence_number),
        to_status: Set(kci.entity.status.clone()),
        update_type: Set(kci.update.update_type().as_str().to_owned()),
        reason: Set(kci.update.reason().to_owned()),
        flag_stale: Set(false),
        flag_gap: Set(false),
        flag_illegal: Set(false),
        flag_duplicate: Set(false),
        flag_anomaly: Set(false),
        flag_unknown_value: Set(false),
        issued_on: Set(kci.issued_on),
        received_on: Set(kci.received_on),
        delivered_on: Set(kci.delivered_on),
        recorded_at: Set(now),
        ..Default::default()
    }
}

/// How a new KCI relates to the entity's last applied sequence number (design.md, "Monotonic
/// state"): only a newer KCI moves the state.
struct SequenceFacts {
    previous: Option<i64>,
    applied: bool,
    stale: bool,
    duplicate: bool,
    gap: bool,
}

fn sequence_facts(previous: Option<i64>, sequence_number: i64) -> SequenceFacts {
    match previous {
        // The first KCI we see: anything but 1 means earlier KCIs are missing.
        None => SequenceFacts {
            previous,
            applied: true,
            stale: false,
            duplicate: false,
            gap: sequence_number > 1,
        },
        Some(last) => SequenceFacts {
            previous,
            applied: sequence_number > last,
            stale: sequence_number < last,
            duplicate: sequence_number == last,
            gap: sequence_number > last.saturating_add(1),
        },
    }
}

async fn record_new(
    txn: &DatabaseTransaction,
    delivery: &Delivery,
) -> Result<Recorded, StoreError> {
    let now = Utc::now();
    let kci = &delivery.kci;
    let lifecycle = kci.entity_type.lifecycle();
    let original_request = conversation::Entity::find()
        .filter(conversation::Column::ConversationId.eq(delivery.conversation_id.as_str()))
        .one(txn)
        .await?;

    // Find and lock the entity, or create it from this KCI.
    let locked = tracked_entity::Entity::find()
        .filter(tracked_entity::Column::EntityType.eq(kci.entity_type.as_str()))
        .filter(tracked_entity::Column::GatewayId.eq(kci.entity.gateway_id.as_str()))
        .lock_exclusive()
        .one(txn)
        .await?;
    let (entity, is_new) = match locked {
        Some(entity) => (entity, false),
        None => (
            create_entity(txn, delivery, original_request.as_ref(), now).await?,
            true,
        ),
    };
    let previous_status = (!is_new).then(|| entity.status.clone());
    let facts = sequence_facts(
        (!is_new).then_some(entity.last_sequence_number),
        kci.sequence_number,
    );
    let verdict = match &previous_status {
        Some(from) if facts.applied => lifecycle.judge(from, &kci.entity.status, facts.gap),
        _ => Verdict::Unchanged,
    };
    let illegal = verdict == Verdict::Illegal;
    let unknown = !kci.unknown_values.is_empty();
    let kci_outcome = if facts.applied {
        KciOutcome::Applied
    } else if facts.stale {
        KciOutcome::Stale
    } else {
        KciOutcome::DuplicateSequence
    };
    let outcome = match kci_outcome {
        KciOutcome::Applied => Outcome::Applied,
        KciOutcome::Stale => Outcome::Stale,
        KciOutcome::DuplicateSequence => Outcome::DuplicateSequence,
    };

    let kci_model = kci_row::ActiveModel {
        kci_id: Set(kci.id),
        tracked_entity_id: Set(entity.id),
        request_id: Set(delivery.request_id.clone()),
        conversation_id: Set(delivery.conversation_id.clone()),
        entity_type: Set(kci.entity_type.as_str().to_owned()),
        update_type: Set(kci.update.update_type().as_str().to_owned()),
        reason: Set(kci.update.reason().to_owned()),
        sequence_number: Set(kci.sequence_number),
        issued_on: Set(kci.issued_on),
        received_on: Set(kci.received_on),
        delivered_on: Set(kci.delivered_on),
        raw_body: Set(delivery.raw_body.clone()),
        headers: Set(delivery.audit.headers.clone()),
        outcome: Set(kci_outcome),
        redelivery_count: Set(0),
        anomaly_count: Set(0),
        received_at: Set(now),
        ..Default::default()
    }
    .insert(txn)
    .await?;
    let audit_id = audited(txn, delivery, outcome).await?;

    let mut notes = Vec::new();
    if facts.gap {
        let expected = facts.previous.map_or(1, |last| last + 1);
        notes.push(format!(
            "sequence gap: expected {expected}, got {}",
            kci.sequence_number
        ));
    }
    if facts.stale {
        notes.push(format!(
            "stale: sequence {} is older than the applied {}",
            kci.sequence_number,
            facts.previous.unwrap_or_default()
        ));
    }
    if facts.duplicate {
        notes.push(format!(
            "sequence {} was already applied by another KCI",
            kci.sequence_number
        ));
    }
    if illegal {
        notes.push(format!(
            "{} lifecycle does not allow {} -> {}",
            lifecycle.name,
            previous_status.as_deref().unwrap_or("?"),
            kci.entity.status
        ));
    }
    if unknown {
        let values: Vec<String> = kci.unknown_values.iter().map(ToString::to_string).collect();
        notes.push(format!("undocumented values: {}", values.join(", ")));
    }
    state_transition::ActiveModel {
        previous_sequence_number: Set(facts.previous),
        from_status: Set(previous_status.clone()),
        applied: Set(facts.applied),
        flag_stale: Set(facts.stale),
        flag_gap: Set(facts.gap),
        flag_illegal: Set(illegal),
        flag_duplicate: Set(facts.duplicate),
        flag_unknown_value: Set(unknown),
        note: Set((!notes.is_empty()).then(|| notes.join("; "))),
        ..history_entry(kci, entity.id, kci_model.id, audit_id, now)
    }
    .insert(txn)
    .await?;

    // Matching: an entity keeps the link it has; an unmatched one is matched as soon as its
    // conversation is known.
    let (correlation, conversation_ref) = match (entity.correlation, &original_request) {
        (Correlation::Unmatched, Some(request)) => (Correlation::Matched, Some(request.id)),
        (correlation, _) => (correlation, entity.conversation_ref),
    };
    let linked_request = match conversation_ref {
        Some(id) if original_request.as_ref().is_some_and(|r| r.id == id) => {
            original_request.clone()
        }
        Some(id) => conversation::Entity::find_by_id(id).one(txn).await?,
        None => None,
    };
    let new_status = if facts.applied {
        kci.entity.status.clone()
    } else {
        entity.status.clone()
    };

    let mut update: tracked_entity::ActiveModel = entity.clone().into();
    if facts.applied && !is_new {
        update.status = Set(kci.entity.status.clone());
        update.snapshot = Set(kci.entity.body.clone());
        update.supplier = Set(kci.supplier.clone());
        if kci.entity.supplier_reference.is_some() {
            update.supplier_reference = Set(kci.entity.supplier_reference.clone());
        }
        update.last_sequence_number = Set(kci.sequence_number);
        update.last_kci_id = Set(kci.id);
        update.last_update_type = Set(kci.update.update_type().as_str().to_owned());
        update.last_reason = Set(kci.update.reason().to_owned());
        update.updated_at = Set(now);
    }
    update.correlation = Set(correlation);
    update.conversation_ref = Set(conversation_ref);
    update.flag_illegal = Set(entity.flag_illegal || illegal);
    update.flag_stale = Set(entity.flag_stale || facts.stale);
    update.flag_gap = Set(entity.flag_gap || facts.gap);
    update.flag_unknown_value = Set(entity.flag_unknown_value || unknown);
    update.kci_count = Set(entity.kci_count + 1);
    update.last_kci_at = Set(now);
    update.update(txn).await?;

    let event_id = Uuid::now_v7();
    let message = envelope::build(&EnvelopeFacts {
        event_id,
        kci,
        request_id: &delivery.request_id,
        conversation_id: &delivery.conversation_id,
        previous_status: previous_status.as_deref(),
        new_status: &new_status,
        applied: facts.applied,
        correlation,
        original_request: linked_request.as_ref(),
        previous_sequence_number: facts.previous,
        stale: facts.stale,
        gap: facts.gap,
        duplicate: facts.duplicate,
        illegal,
        accepted_at: now,
    });
    outbox_event::ActiveModel {
        event_id: Set(event_id),
        tracked_entity_id: Set(entity.id),
        kci_ref: Set(kci_model.id),
        routing_key: Set(message.routing_key),
        message_type: Set(message.message_type),
        headers: Set(message.headers),
        payload: Set(message.payload),
        status: Set(OutboxStatus::Pending),
        attempts: Set(0),
        next_attempt_at: Set(now),
        created_at: Set(now),
        ..Default::default()
    }
    .insert(txn)
    .await?;
    // Relays in other processes LISTEN for this; it is delivered only if the transaction commits.
    if delivery.notify_other_processes && txn.get_database_backend() == sea_orm::DbBackend::Postgres
    {
        txn.execute_unprepared(&format!("NOTIFY {}", crate::outbox::signal::NOTIFY_CHANNEL))
            .await?;
    }

    Ok(Recorded {
        outcome,
        tracked_entity_id: entity.id,
        event_id: Some(event_id),
    })
}

/// Creates the entity from its first KCI. A concurrent creation of the same entity makes the
/// insert fail on the unique key; the caller runs the transaction again and finds it.
async fn create_entity(
    txn: &DatabaseTransaction,
    delivery: &Delivery,
    original_request: Option<&conversation::Model>,
    now: DateTime<Utc>,
) -> Result<tracked_entity::Model, StoreError> {
    let kci = &delivery.kci;
    let correlation = match original_request {
        Some(_) => Correlation::Matched,
        None if kci.entity_type.is_unsolicited() => Correlation::Unsolicited,
        None => Correlation::Unmatched,
    };
    let model = tracked_entity::ActiveModel {
        entity_type: Set(kci.entity_type.as_str().to_owned()),
        gateway_id: Set(kci.entity.gateway_id.clone()),
        supplier: Set(kci.supplier.clone()),
        supplier_reference: Set(kci.entity.supplier_reference.clone()),
        status: Set(kci.entity.status.clone()),
        snapshot: Set(kci.entity.body.clone()),
        last_sequence_number: Set(kci.sequence_number),
        last_kci_id: Set(kci.id),
        last_update_type: Set(kci.update.update_type().as_str().to_owned()),
        last_reason: Set(kci.update.reason().to_owned()),
        conversation_id: Set(delivery.conversation_id.clone()),
        correlation: Set(correlation),
        conversation_ref: Set(original_request.map(|r| r.id)),
        flag_illegal: Set(false),
        flag_stale: Set(false),
        flag_gap: Set(false),
        flag_anomaly: Set(false),
        flag_unknown_value: Set(false),
        kci_count: Set(0),
        first_seen_at: Set(now),
        last_kci_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    };
    Ok(model.insert(txn).await?)
}
