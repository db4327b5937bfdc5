//! What reconciliation reads and writes: the lease that keeps two instances off one entity, the
//! log of reconciliations, the entity's reconciliation state, and the scheduler's candidates.
//!
//! Every write goes through [`Database::begin_write`] (SQLite: one writer at a time) and changes
//! an entity only under its row lock, so that intake, which rewrites whole entity rows from what
//! it read under the same lock, never loses a change of ours or we one of its.

use chrono::{DateTime, Utc};
use entity::reconciliation::{self, ReconcileOutcome, ReconcileTrigger};
use entity::{conversation, tracked_entity};
use sea_orm::sea_query::{Expr, OnConflict, Query};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, EntityTrait, ExprTrait, QueryFilter, QueryOrder,
    QuerySelect, Set,
};

use crate::intake::missing::Missing;
use crate::kci::EntityType;
use crate::operations::queries::{Family, in_flight};
use crate::reconcile::Target;
use crate::store::text::{NOTE_MAX, bounded};
use crate::store::{Database, StoreError, Writer};

/// Takes the lease on `(resource, gateway_id)`: `None` when another instance holds it. A lease
/// whose holder died (past `lease_until`) is closed as abandoned and taken over.
pub async fn claim(
    db: &Database,
    started: reconciliation::ActiveModel,
    resource: &str,
    gateway_id: &str,
    now: DateTime<Utc>,
) -> Result<Option<reconciliation::Model>, StoreError> {
    let txn = db.begin_write(Writer::Reconcile).await?;
    reconciliation::Entity::update_many()
        .set(reconciliation::ActiveModel {
            outcome: Set(ReconcileOutcome::Failed),
            detail: Set(Some(
                "abandoned: the instance running it stopped before it finished".to_owned(),
            )),
            finished_at: Set(Some(now)),
            lease_until: Set(None),
            ..Default::default()
        })
        .filter(reconciliation::Column::Resource.eq(resource))
        .filter(reconciliation::Column::GatewayId.eq(gateway_id))
        .filter(reconciliation::Column::Outcome.eq(ReconcileOutcome::Running))
        .filter(reconciliation::Column::LeaseUntil.lt(now))
        .exec(&*txn)
        .await?;
    // The partial unique index on running rows decides: a second claim inserts nothing.
    let inserted = reconciliation::Entity::insert(started)
        .on_conflict(OnConflict::new().do_nothing().to_owned())
        .exec_without_returning(&*txn)
        .await?;
    let claimed = match inserted {
        0 => None,
        _ => {
            reconciliation::Entity::find()
                .filter(reconciliation::Column::Resource.eq(resource))
                .filter(reconciliation::Column::GatewayId.eq(gateway_id))
                .filter(reconciliation::Column::Outcome.eq(ReconcileOutcome::Running))
                .one(&*txn)
                .await?
        }
    };
    txn.commit().await?;
    Ok(claimed)
}

/// How a reconciliation ended, for its row and its entities.
pub struct Finished {
    pub outcome: ReconcileOutcome,
    pub recovered: i32,
    pub unusable: Vec<crate::reconcile::answer::UnusableUpdate>,
    pub gateway_status: Option<u16>,
    pub detail: Option<String>,
    /// The highest sequence number the gateway listed, per entity type: what it has, so the
    /// numbers up to it that it does not list will never come.
    pub gateway_has_up_to: Vec<(String, i64)>,
    /// No automatic reconciliation of the entity before this (after a failure).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// After an answer that leaves numbers missing (the gateway's `updates[]` does not even list
    /// what we hold): not again before this, so that an inconsistent answer is not asked for
    /// on every round.
    pub unresolved_retry_at: DateTime<Utc>,
}

/// Closes the reconciliation and records its outcome on the entities (of `family`, with
/// `gateway_id`) under their row locks: the numbers the gateway does not have leave the
/// missing set, the gap closes when nothing is left, a failure counts towards the back-off.
/// Returns the row as stored.
pub async fn finish(
    db: &Database,
    running: &reconciliation::Model,
    family: Family,
    finished: &Finished,
    now: DateTime<Utc>,
) -> Result<reconciliation::Model, StoreError> {
    let txn = db.begin_write(Writer::Reconcile).await?;
    let entities = tracked_entity::Entity::find()
        .filter(tracked_entity::Column::EntityType.is_in(family.type_names()))
        .filter(tracked_entity::Column::GatewayId.eq(running.gateway_id.as_str()))
        .order_by_asc(tracked_entity::Column::Id)
        .lock_exclusive()
        .all(&*txn)
        .await?;
    let answered = !matches!(finished.outcome, ReconcileOutcome::Failed);
    let mut notes: Vec<String> = finished.detail.iter().cloned().collect();
    for entity in &entities {
        let mut row: tracked_entity::ActiveModel = entity.clone().into();
        row.reconcile_status = Set(Some(finished.outcome.as_str().to_owned()));
        row.reconciled_at = Set(Some(now));
        if let Some(&(_, up_to)) = finished
            .gateway_has_up_to
            .iter()
            .find(|(entity_type, _)| *entity_type == entity.entity_type)
        {
            let missing = Missing::parse(entity.missing_sequences.as_deref());
            let remaining = missing.without_up_to(up_to);
            if remaining != missing {
                let gone = missing.count() - remaining.count();
                notes.push(format!(
                    "{} {}: the gateway lists no KCI for {gone} missing sequence number(s) up to {up_to} (of {missing})",
                    entity.entity_type, entity.gateway_id
                ));
            }
            row.missing_sequences = Set(remaining.to_text());
            if remaining.is_empty() {
                row.gap_open_since = Set(None);
            }
        }
        let still_open = match &row.gap_open_since {
            sea_orm::ActiveValue::Set(since) | sea_orm::ActiveValue::Unchanged(since) => {
                since.is_some()
            }
            sea_orm::ActiveValue::NotSet => false,
        };
        if answered {
            row.reconcile_attempts = Set(0);
        } else {
            row.reconcile_attempts = Set(entity.reconcile_attempts.saturating_add(1));
        }
        row.reconcile_next_at = Set(match finished.next_attempt_at {
            None if answered && still_open => Some(finished.unresolved_retry_at),
            next => next,
        });
        if !finished.unusable.is_empty() {
            row.flag_anomaly = Set(true);
        }
        row.update(&*txn).await?;
    }
    let unusable_updates = (!finished.unusable.is_empty())
        .then(|| serde_json::to_string(&finished.unusable).unwrap_or_default());
    let detail = (!notes.is_empty()).then(|| bounded(&notes.join("; "), NOTE_MAX).into_owned());
    let mut row: reconciliation::ActiveModel = running.clone().into();
    row.outcome = Set(finished.outcome);
    row.recovered = Set(finished.recovered);
    row.unusable = Set(i32::try_from(finished.unusable.len()).unwrap_or(i32::MAX));
    row.gateway_status = Set(finished.gateway_status.map(i32::from));
    row.detail = Set(detail);
    row.unusable_updates = Set(unusable_updates);
    row.finished_at = Set(Some(now));
    row.lease_until = Set(None);
    if running.tracked_entity_id.is_none()
        && let Some(entity) = entities.first()
    {
        // The entity did not exist here: the recovered KCIs created it.
        row.tracked_entity_id = Set(Some(entity.id));
        row.entity_type = Set(Some(entity.entity_type.clone()));
    }
    let stored = row.update(&*txn).await?;
    txn.commit().await?;
    Ok(stored)
}

/// An entity due for reconciliation, and why.
pub struct Candidate {
    pub trigger: ReconcileTrigger,
    pub target: Target,
}

/// How far back the scheduler looks for original requests whose entity never sent a KCI, in
/// periods of `stuck_after`: each such request is asked about a few times, then left to people
/// (`kci-receiver reconcile`).
const SILENT_REQUEST_PERIODS: i32 = 4;

/// Entities due, oldest need first, at most `limit`: gaps open longer than `gap_grace`, then
/// entities in flight with no KCI for `stuck_after` and not reconciled for as long, then
/// entities known only by their original request (created through the egress proxy or
/// registered with a gateway id) that have not sent a single KCI in `stuck_after`: the gateway
/// may have lost every one. None in back-off, none of a type the Tenant API has no `GET` for.
pub async fn candidates(
    db: &Database,
    now: DateTime<Utc>,
    gap_grace: chrono::Duration,
    stuck_after: chrono::Duration,
    limit: u64,
) -> Result<Vec<Candidate>, StoreError> {
    use tracked_entity::Column as C;
    let listed: Vec<&str> = EntityType::ALL.iter().map(|t| t.as_str()).collect();
    let not_backing_off = Condition::any()
        .add(C::ReconcileNextAt.is_null())
        .add(C::ReconcileNextAt.lte(now));
    let gaps = tracked_entity::Entity::find()
        .filter(C::GapOpenSince.lt(now - gap_grace))
        .filter(C::EntityType.is_in(listed.clone()))
        .filter(not_backing_off.clone())
        .order_by_asc(C::GapOpenSince)
        .limit(limit)
        .all(db)
        .await?;
    let mut due: Vec<Candidate> = gaps
        .iter()
        .filter_map(|entity| {
            Some(Candidate {
                trigger: ReconcileTrigger::Gap,
                target: Target::of(entity)?,
            })
        })
        .collect();
    let room = limit.saturating_sub(due.len() as u64);
    if room > 0 {
        let quiet_since = now - stuck_after;
        // In flight, said as the index of the entities in flight says it (migration 12): each
        // round reads the work in progress, not the history.
        let stuck = tracked_entity::Entity::find()
            .filter(C::LastKciAt.lt(quiet_since))
            .filter(in_flight())
            .filter(C::GapOpenSince.is_null())
            .filter(
                Condition::any()
                    .add(C::ReconciledAt.is_null())
                    .add(C::ReconciledAt.lt(quiet_since)),
            )
            .filter(not_backing_off)
            .order_by_asc(C::LastKciAt)
            .limit(room)
            .all(db)
            .await?;
        due.extend(stuck.iter().filter_map(|entity| {
            Some(Candidate {
                trigger: ReconcileTrigger::Stuck,
                target: Target::of(entity)?,
            })
        }));
    }
    let room = limit.saturating_sub(due.len() as u64);
    if room > 0 {
        due.extend(silent_requests(db, now, stuck_after, room).await?);
    }
    Ok(due)
}

/// Original requests registered between `stuck_after` and [`SILENT_REQUEST_PERIODS`] times
/// that long ago, with the gateway id of what they created, whose entity has no KCI here and
/// which were not reconciled within `stuck_after`.
async fn silent_requests(
    db: &Database,
    now: DateTime<Utc>,
    stuck_after: chrono::Duration,
    limit: u64,
) -> Result<Vec<Candidate>, StoreError> {
    use conversation::Column as R;
    let listed: Vec<&str> = EntityType::ALL.iter().map(|t| t.as_str()).collect();
    let quiet_since = now - stuck_after;
    let has_entity = Query::select()
        .expr(Expr::val(1))
        .from(tracked_entity::Entity)
        .and_where(
            Expr::col((tracked_entity::Entity, tracked_entity::Column::GatewayId))
                .equals((conversation::Entity, R::GatewayId)),
        )
        .and_where(
            Expr::col((tracked_entity::Entity, tracked_entity::Column::EntityType))
                .equals((conversation::Entity, R::EntityType)),
        )
        .to_owned();
    let reconciled_lately = Query::select()
        .expr(Expr::val(1))
        .from(reconciliation::Entity)
        .and_where(
            Expr::col((reconciliation::Entity, reconciliation::Column::GatewayId))
                .equals((conversation::Entity, R::GatewayId)),
        )
        .and_where(
            Expr::col((reconciliation::Entity, reconciliation::Column::StartedAt)).gte(quiet_since),
        )
        .to_owned();
    let requests = conversation::Entity::find()
        .filter(R::RegisteredAt.lt(quiet_since))
        .filter(R::RegisteredAt.gte(now - stuck_after * SILENT_REQUEST_PERIODS))
        .filter(R::GatewayId.is_not_null())
        .filter(R::EntityType.is_in(listed))
        .filter(Expr::exists(has_entity).not())
        .filter(Expr::exists(reconciled_lately).not())
        .order_by_asc(R::RegisteredAt)
        .limit(limit)
        .all(db)
        .await?;
    Ok(requests
        .into_iter()
        .filter_map(|request| {
            let listed = EntityType::from_wire(request.entity_type.as_deref()?)?;
            Some(Candidate {
                trigger: ReconcileTrigger::Stuck,
                target: Target {
                    family: Family::of(listed),
                    gateway_id: request.gateway_id?,
                },
            })
        })
        .collect())
}

/// Entities with an open gap, whatever its age (`kci-receiver reconcile --all-gaps`).
pub async fn open_gaps(
    db: &Database,
    limit: u64,
) -> Result<Vec<tracked_entity::Model>, StoreError> {
    let listed: Vec<&str> = EntityType::ALL.iter().map(|t| t.as_str()).collect();
    Ok(tracked_entity::Entity::find()
        .filter(tracked_entity::Column::GapOpenSince.is_not_null())
        .filter(tracked_entity::Column::EntityType.is_in(listed))
        .order_by_asc(tracked_entity::Column::GapOpenSince)
        .limit(limit)
        .all(db)
        .await?)
}

/// The latest reconciliations of an entity, newest first.
pub async fn of_entity(
    db: &impl sea_orm::ConnectionTrait,
    tracked_entity_id: i64,
    limit: u64,
) -> Result<Vec<reconciliation::Model>, StoreError> {
    Ok(reconciliation::Entity::find()
        .filter(reconciliation::Column::TrackedEntityId.eq(tracked_entity_id))
        .order_by_desc(reconciliation::Column::Id)
        .limit(limit)
        .all(db)
        .await?)
}
