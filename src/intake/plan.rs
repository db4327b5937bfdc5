//! Deciding what a batch of deliveries does, in memory, from what the database holds.
//!
//! [`plan`] takes the rows [`super::batch`] loaded under lock (the KCIs already known, the
//! entities the batch touches, the original requests) and walks the deliveries in the order they
//! arrived, as if each were recorded alone: a later delivery in the batch sees what the earlier
//! ones did to its entity. It returns the rows to write; nothing here touches the database, so the
//! rules of design.md (idempotency, monotonic state, lifecycles, matching) live in one pure
//! function.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};
use entity::conversation;
use entity::kci as kci_row;
use entity::outbox_event::{self, OutboxStatus};
use entity::state_transition::{self, KciSource};
use entity::tracked_entity;
use sea_orm::{ActiveValue, Set};
use serde_json::Value;
use uuid::Uuid;

use super::missing::Missing;
use super::rules::{self, EntityBefore};
use super::{Delivery, Outcome, Recorded};
use crate::kci::Kci;
use crate::outbox::envelope::{self, EnvelopeFacts};
use crate::store::text::{COLUMN_TEXT_MAX, NOTE_MAX, bounded, storable_json};

/// An entity's natural key: entity type and gateway id.
pub type EntityKey = (String, String);

/// A KCI's values as the database keeps them: statuses and reasons bounded (they are indexed or
/// compared, `store::text`), the snapshot without NUL. The raw body keeps the originals.
struct Stored {
    status: String,
    reason: String,
    update_type: &'static str,
    supplier_reference: Option<String>,
}

impl Stored {
    fn of(kci: &Kci) -> Stored {
        Stored {
            status: bounded(&kci.entity.status, COLUMN_TEXT_MAX).into_owned(),
            reason: bounded(kci.update.reason(), COLUMN_TEXT_MAX).into_owned(),
            update_type: kci.update.update_type().as_str(),
            supplier_reference: kci
                .entity
                .supplier_reference
                .as_deref()
                .map(|reference| bounded(reference, COLUMN_TEXT_MAX).into_owned()),
        }
    }
}

pub fn entity_key(kci: &Kci) -> EntityKey {
    (
        kci.entity_type.as_str().to_owned(),
        kci.entity.gateway_id.clone(),
    )
}

/// A KCI recorded before this batch, with its body parsed (once, by the loader); none when
/// retention pruned it.
pub struct KnownKci {
    pub id: i64,
    pub tracked_entity_id: i64,
    pub body: Option<Value>,
}

/// What the database holds that the batch needs; entities are locked for the transaction.
#[derive(Default)]
pub struct Loaded {
    /// KCIs recorded before this batch, by KCI id.
    pub kcis: HashMap<Uuid, KnownKci>,
    /// Every entity a delivery of the batch touches (new ones as rows inserted by this batch
    /// with `kci_count` 0: no KCI recorded yet).
    pub entities: HashMap<i64, tracked_entity::Model>,
    pub entity_ids: HashMap<EntityKey, i64>,
    /// Original requests by `X-Conversation-ID`, and by row id (entities' links).
    pub conversations: HashMap<String, conversation::Model>,
    pub conversations_by_id: HashMap<i64, conversation::Model>,
}

/// A KCI row: recorded before this batch, or the n-th new one of the batch (its id is known only
/// once inserted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KciRef {
    Existing(i64),
    New(usize),
}

/// The rows a batch writes, in the order they are written.
pub struct Plan {
    /// New KCIs, redeliveries within the batch already counted.
    pub kcis: Vec<kci_row::ActiveModel>,
    /// Redeliveries of KCIs recorded before this batch: (row id, redeliveries, anomalies).
    pub counters: Vec<(i64, i32, i32)>,
    /// History entries: the KCI they record, the delivery whose audit record they cite, the row
    /// without those two references.
    pub transitions: Vec<(KciRef, usize, state_transition::ActiveModel)>,
    /// Final state of every entity the batch changed.
    pub entities: Vec<tracked_entity::Model>,
    /// Outbox events with the (new) KCI they publish.
    pub events: Vec<(usize, outbox_event::ActiveModel)>,
    /// What each delivery did, in delivery order (its audit record says the same).
    pub recorded: Vec<Recorded>,
}

/// The entity row a first KCI creates: everything from the KCI, matched to its original request
/// if that is known.
pub fn new_entity(
    delivery: &Delivery,
    original_request: Option<&conversation::Model>,
    now: DateTime<Utc>,
) -> tracked_entity::Model {
    let kci = &delivery.kci;
    let stored = Stored::of(kci);
    let correlation = rules::first_correlation(kci, original_request.map(|r| r.id));
    tracked_entity::Model {
        id: 0,
        entity_type: kci.entity_type.as_str().to_owned(),
        gateway_id: kci.entity.gateway_id.clone(),
        supplier: kci.supplier.clone(),
        supplier_reference: stored.supplier_reference,
        status: stored.status,
        snapshot: storable_json(&kci.entity.body).into_owned(),
        last_sequence_number: kci.sequence_number,
        last_kci_id: kci.id,
        last_update_type: stored.update_type.to_owned(),
        last_reason: stored.reason,
        conversation_id: delivery.conversation_id.clone(),
        correlation,
        conversation_ref: original_request.map(|r| r.id),
        flag_illegal: false,
        flag_stale: false,
        flag_gap: false,
        flag_anomaly: false,
        flag_unknown_value: false,
        kci_count: 0,
        missing_sequences: None,
        gap_open_since: None,
        reconcile_status: None,
        reconciled_at: None,
        reconcile_attempts: 0,
        reconcile_next_at: None,
        first_seen_at: now,
        last_kci_at: now,
        updated_at: now,
    }
}

/// The first time a KCI id was seen: before this batch or earlier in it.
struct FirstSeen<'a> {
    kci: KciRef,
    tracked_entity_id: i64,
    body: FirstBody<'a>,
}

/// The body a redelivery is compared with. A KCI first seen in this batch is parsed only if a
/// redelivery of it follows (rare), not for every new KCI.
enum FirstBody<'a> {
    Parsed(Value),
    Raw(&'a str),
    /// Pruned by retention: a redelivery cannot be compared and is counted as one.
    Pruned,
}

impl FirstBody<'_> {
    fn value(&self) -> Cow<'_, Value> {
        match self {
            FirstBody::Parsed(value) => Cow::Borrowed(value),
            FirstBody::Pruned => Cow::Owned(Value::Null),
            // It parsed when it arrived, moments ago; a failure here would be a bug, logged.
            FirstBody::Raw(raw) => Cow::Owned(serde_json::from_str(raw).unwrap_or_else(|error| {
                tracing::error!(%error, "a KCI body of this batch does not parse again");
                Value::Null
            })),
        }
    }
}

/// Decides what every delivery does; `Err` names a row the loader should have provided.
pub fn plan<'a>(deliveries: &[&'a Delivery], mut loaded: Loaded) -> Result<Plan, String> {
    let mut plan = Plan {
        kcis: Vec::new(),
        counters: Vec::new(),
        transitions: Vec::with_capacity(deliveries.len()),
        entities: Vec::new(),
        events: Vec::with_capacity(deliveries.len()),
        recorded: Vec::with_capacity(deliveries.len()),
    };
    let mut seen: HashMap<Uuid, FirstSeen<'a>> = HashMap::new();
    let mut counters: HashMap<i64, (i32, i32)> = HashMap::new();
    let mut touched: BTreeSet<i64> = BTreeSet::new();

    for (index, delivery) in deliveries.iter().enumerate() {
        let now = Utc::now();
        let kci_id = delivery.kci.id;
        if !seen.contains_key(&kci_id)
            && let Some(first) = loaded.kcis.remove(&kci_id)
        {
            seen.insert(
                kci_id,
                FirstSeen {
                    kci: KciRef::Existing(first.id),
                    tracked_entity_id: first.tracked_entity_id,
                    body: first.body.map_or(FirstBody::Pruned, FirstBody::Parsed),
                },
            );
        }
        let recorded = match seen.get(&kci_id) {
            // Recovered by reconciliation, but delivered meanwhile: the gateway's updates[]
            // carries its bookkeeping fields, so it is neither a redelivery nor an anomaly.
            Some(first) if delivery.source == KciSource::Reconciliation => Recorded {
                outcome: Outcome::Redelivered,
                tracked_entity_id: first.tracked_entity_id,
                event_id: None,
            },
            Some(first) => {
                let recorded = redelivery(delivery, index, first, &mut loaded, &mut plan, now)?;
                match first.kci {
                    KciRef::Existing(id) => {
                        let (redeliveries, anomalies) = counters.entry(id).or_default();
                        match recorded.outcome {
                            Outcome::Redelivered => *redeliveries += 1,
                            _ => *anomalies += 1,
                        }
                    }
                    KciRef::New(n) => count_in_batch(&mut plan.kcis[n], recorded.outcome, now),
                }
                recorded
            }
            None => {
                let recorded = new_kci(delivery, index, &mut loaded, &mut plan, now)?;
                let new_row = plan.kcis.len() - 1;
                seen.insert(
                    kci_id,
                    FirstSeen {
                        kci: KciRef::New(new_row),
                        tracked_entity_id: recorded.tracked_entity_id,
                        body: FirstBody::Raw(&delivery.raw_body),
                    },
                );
                recorded
            }
        };
        if recorded.outcome != Outcome::Redelivered {
            touched.insert(recorded.tracked_entity_id);
        }
        plan.recorded.push(recorded);
    }
    plan.counters = counters
        .into_iter()
        .map(|(id, (redeliveries, anomalies))| (id, redeliveries, anomalies))
        .collect();
    plan.counters.sort_unstable();
    plan.entities = touched
        .into_iter()
        .filter_map(|id| loaded.entities.remove(&id))
        .collect();
    Ok(plan)
}

/// A redelivery of a KCI first seen earlier in this batch: counted on its row before it is
/// inserted.
fn count_in_batch(row: &mut kci_row::ActiveModel, outcome: Outcome, now: DateTime<Utc>) {
    let counter = match outcome {
        Outcome::Redelivered => &mut row.redelivery_count,
        _ => &mut row.anomaly_count,
    };
    if let ActiveValue::Set(count) = counter {
        *count += 1;
    }
    row.last_redelivered_at = Set(Some(now));
}

/// The same KCI id again: identical content is counted, different content is an anomaly,
/// recorded in the entity's history and flagged, not applied.
fn redelivery(
    delivery: &Delivery,
    index: usize,
    first: &FirstSeen<'_>,
    loaded: &mut Loaded,
    plan: &mut Plan,
    now: DateTime<Utc>,
) -> Result<Recorded, String> {
    let kci = &delivery.kci;
    let first_body = first.body.value();
    let outcome = match first.body {
        FirstBody::Pruned => Outcome::Redelivered,
        _ => rules::redelivery(kci, &first_body),
    };
    if outcome == Outcome::Anomaly {
        let entity = loaded
            .entities
            .get_mut(&first.tracked_entity_id)
            .ok_or_else(|| format!("entity {} was not loaded", first.tracked_entity_id))?;
        let differing = kci.differing_fields(&first_body).join(", ");
        let transition = state_transition::ActiveModel {
            previous_sequence_number: Set(Some(entity.last_sequence_number)),
            from_status: Set(Some(entity.status.clone())),
            applied: Set(false),
            flag_anomaly: Set(true),
            note: Set(Some(bounded(&format!(
                "KCI {} delivered again with different content (X-Request-ID {}); differing fields: {differing}; not applied",
                kci.id, delivery.request_id
            ), NOTE_MAX).into_owned())),
            ..history_entry(delivery, &Stored::of(kci), entity.id, now)
        };
        plan.transitions.push((first.kci, index, transition));
        entity.flag_anomaly = true;
        tracing::warn!(kci.id = %kci.id, fields = differing, "conflicting redelivery recorded as an anomaly");
    }
    Ok(Recorded {
        outcome,
        tracked_entity_id: first.tracked_entity_id,
        event_id: None,
    })
}

/// A KCI seen for the first time: recorded, applied if newer than what the entity holds,
/// added to the history and to the outbox.
fn new_kci(
    delivery: &Delivery,
    index: usize,
    loaded: &mut Loaded,
    plan: &mut Plan,
    now: DateTime<Utc>,
) -> Result<Recorded, String> {
    let kci = &delivery.kci;
    let stored = Stored::of(kci);
    let original_request = loaded.conversations.get(&delivery.conversation_id);
    let key = entity_key(kci);
    let entity_id = *loaded
        .entity_ids
        .get(&key)
        .ok_or_else(|| format!("entity {key:?} was not loaded"))?;
    let entity = loaded
        .entities
        .get_mut(&entity_id)
        .ok_or_else(|| format!("entity {entity_id} was not loaded"))?;
    // No KCI recorded yet: this one creates the entity.
    let is_new = entity.kci_count == 0;
    let last_applied = (!is_new).then_some(entity.last_sequence_number);
    let before = (!is_new).then(|| EntityBefore {
        status: &entity.status,
        last_sequence_number: entity.last_sequence_number,
        correlation: entity.correlation,
        conversation_ref: entity.conversation_ref,
    });
    let decision = rules::decide(before, kci, &stored.status, original_request.map(|r| r.id));
    if is_new {
        *entity = tracked_entity::Model {
            id: entity_id,
            first_seen_at: entity.first_seen_at,
            ..new_entity(delivery, original_request, now)
        };
    }
    let previous_status = (!is_new).then(|| entity.status.clone());
    let missing_before = Missing::parse(entity.missing_sequences.as_deref());
    let missing = missing_before.after_kci(last_applied, kci.sequence_number);
    let facts = decision.sequence;
    let illegal = decision.illegal;
    let unknown = decision.unknown_values;
    let (kci_outcome, outcome) = (decision.kci_outcome, decision.outcome);

    plan.kcis.push(kci_row::ActiveModel {
        kci_id: Set(kci.id),
        tracked_entity_id: Set(entity_id),
        request_id: Set(delivery.request_id.clone()),
        conversation_id: Set(delivery.conversation_id.clone()),
        entity_type: Set(kci.entity_type.as_str().to_owned()),
        update_type: Set(stored.update_type.to_owned()),
        reason: Set(stored.reason.clone()),
        sequence_number: Set(kci.sequence_number),
        issued_on: Set(kci.issued_on),
        received_on: Set(kci.received_on),
        delivered_on: Set(kci.delivered_on),
        raw_body: Set(delivery.raw_body.clone()),
        headers: Set(delivery.audit.headers.clone()),
        outcome: Set(kci_outcome),
        redelivery_count: Set(0),
        last_redelivered_at: Set(None),
        anomaly_count: Set(0),
        received_at: Set(now),
        raw_body_pruned_at: Set(None),
        ..Default::default()
    });
    let kci_row = plan.kcis.len() - 1;

    let notes = &decision.notes;
    let transition = state_transition::ActiveModel {
        previous_sequence_number: Set(facts.previous),
        from_status: Set(previous_status.clone()),
        applied: Set(facts.applied),
        flag_stale: Set(facts.stale),
        flag_gap: Set(facts.gap),
        flag_illegal: Set(illegal),
        flag_duplicate: Set(facts.duplicate),
        flag_unknown_value: Set(unknown),
        note: Set((!notes.is_empty()).then(|| bounded(&notes.join("; "), NOTE_MAX).into_owned())),
        ..history_entry(delivery, &stored, entity_id, now)
    };
    plan.transitions
        .push((KciRef::New(kci_row), index, transition));

    let (correlation, conversation_ref) = (decision.correlation, decision.conversation_ref);
    let linked_request = match conversation_ref {
        Some(id) if original_request.is_some_and(|r| r.id == id) => original_request,
        Some(id) => loaded.conversations_by_id.get(&id),
        None => None,
    };
    if facts.applied && !is_new {
        entity.status = stored.status.clone();
        entity.snapshot = storable_json(&kci.entity.body).into_owned();
        entity.supplier = kci.supplier.clone();
        if stored.supplier_reference.is_some() {
            entity.supplier_reference = stored.supplier_reference.clone();
        }
        entity.last_sequence_number = kci.sequence_number;
        entity.last_kci_id = kci.id;
        entity.last_update_type = stored.update_type.to_owned();
        entity.last_reason = stored.reason.clone();
        entity.updated_at = now;
    }
    entity.correlation = correlation;
    entity.conversation_ref = conversation_ref;
    entity.flag_illegal |= illegal;
    entity.flag_stale |= facts.stale;
    entity.flag_gap |= facts.gap;
    entity.flag_unknown_value |= unknown;
    entity.kci_count += 1;
    entity.last_kci_at = now;
    if missing.is_empty() {
        entity.gap_open_since = None;
    } else if missing_before.is_empty() || entity.gap_open_since.is_none() {
        entity.gap_open_since = Some(now);
    }
    entity.missing_sequences = missing.to_text();

    let event_id = Uuid::now_v7();
    let traceparent = delivery.trace.to_string();
    let message = envelope::build(&EnvelopeFacts {
        event_id,
        kci,
        raw_body: &delivery.raw_body,
        request_id: &delivery.request_id,
        conversation_id: &delivery.conversation_id,
        previous_status: previous_status.as_deref(),
        new_status: &entity.status,
        applied: facts.applied,
        correlation,
        original_request: linked_request,
        previous_sequence_number: facts.previous,
        stale: facts.stale,
        gap: facts.gap,
        duplicate: facts.duplicate,
        illegal,
        source: delivery.source,
        traceparent: &traceparent,
        accepted_at: now,
    });
    plan.events.push((
        kci_row,
        outbox_event::ActiveModel {
            event_id: Set(event_id),
            tracked_entity_id: Set(entity_id),
            routing_key: Set(message.routing_key),
            message_type: Set(message.message_type),
            correlation_id: Set(Some(message.correlation_id)),
            headers: Set(message.headers),
            payload: Set(message.payload),
            status: Set(OutboxStatus::Pending),
            attempts: Set(0),
            next_attempt_at: Set(now),
            created_at: Set(now),
            ..Default::default()
        },
    ));
    Ok(Recorded {
        outcome,
        tracked_entity_id: entity_id,
        event_id: Some(event_id),
    })
}

/// A history entry with what the KCI itself says, no flags raised: callers set how it relates to
/// the entity (previous state, applied or not, flags, note). The KCI row and audit record it
/// cites are filled in once their ids are known.
fn history_entry(
    delivery: &Delivery,
    stored: &Stored,
    tracked_entity_id: i64,
    now: DateTime<Utc>,
) -> state_transition::ActiveModel {
    let kci = &delivery.kci;
    state_transition::ActiveModel {
        source: Set(delivery.source),
        tracked_entity_id: Set(tracked_entity_id),
        kci_id: Set(kci.id),
        sequence_number: Set(kci.sequence_number),
        to_status: Set(stored.status.clone()),
        update_type: Set(stored.update_type.to_owned()),
        reason: Set(stored.reason.clone()),
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
