//! Retention (design.md, "Observability and data lifecycle"): what may be deleted after a while,
//! each period off (0) by default. History and current state are always kept.
//!
//! - the audit log: records older than `retention.audit_log_days`, except those of KCIs whose
//!   entity is still in flight (its deliveries may still be needed to raise a support request);
//! - published outbox events older than `retention.published_events_days` (never a pending or
//!   dead one; `outbox replay` then covers the retention window only);
//! - raw KCI bodies of entities in a final state, received more than
//!   `retention.finished_raw_bodies_days` ago: the body is emptied and `raw_body_pruned_at` set
//!   (a later redelivery of such a KCI is counted as a redelivery: its content can no longer be
//!   compared).
//!
//! Pruning runs in batches of `retention.batch_size` rows, each its own short transaction (never
//! a long lock); on PostgreSQL each batch first takes a transaction advisory lock, so that two
//! instances never prune at once (the one that does not get it stops its run).

use chrono::{DateTime, Utc};
use entity::outbox_event::{self, OutboxStatus};
use entity::{audit_log, kci, tracked_entity};
use sea_orm::sea_query::{Expr, Query};
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DbBackend, EntityTrait, ExprTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect,
};
use serde::Serialize;

use super::{Database, StoreError, Writer};
use crate::config::RetentionSettings;
use crate::kci::EntityType;
use crate::operations::queries::not_terminal;

/// Prunes every `retention.interval_seconds` until `shutdown` (only when a period is set); logs
/// and counts what went.
pub fn start(
    db: Database,
    settings: RetentionSettings,
    metrics: crate::http::metrics::Metrics,
    shutdown: tokio_util::sync::CancellationToken,
) {
    if !settings.any() {
        return;
    }
    tokio::spawn(async move {
        let every = std::time::Duration::from_secs(settings.interval_seconds);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            match prune(&db, &settings, Utc::now()).await {
                Ok(pruned) => {
                    metrics.count_pruned(&pruned);
                    tracing::info!(
                        audit_records = pruned.audit_records,
                        published_events = pruned.published_events,
                        raw_bodies = pruned.raw_bodies,
                        yielded = pruned.yielded,
                        "retention: pruned"
                    );
                }
                Err(error) => {
                    tracing::warn!(%error, "retention: pruning failed; trying again next time")
                }
            }
        }
    });
}

/// The advisory lock key of pruning (PostgreSQL).
const PRUNE_LOCK: i64 = 0x6b63_695f_7072_756e; // "kci_prun"

/// What a prune removed (or, dry, would remove).
#[derive(Debug, Default, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Pruned {
    pub audit_records: u64,
    pub published_events: u64,
    pub raw_bodies: u64,
    /// Another instance was pruning: this run stopped early.
    pub yielded: bool,
}

/// The cut-off times of each kind; none when its period is 0 (kept forever).
struct Cutoffs {
    audit: Option<DateTime<Utc>>,
    events: Option<DateTime<Utc>>,
    bodies: Option<DateTime<Utc>>,
}

impl Cutoffs {
    fn of(settings: &RetentionSettings, now: DateTime<Utc>) -> Cutoffs {
        let cut = |days: u32| (days > 0).then(|| now - chrono::Duration::days(i64::from(days)));
        Cutoffs {
            audit: cut(settings.audit_log_days),
            events: cut(settings.published_events_days),
            bodies: cut(settings.finished_raw_bodies_days),
        }
    }
}

/// KCI ids of entities still in flight (their deliveries' audit records are kept).
fn kcis_of_open_entities() -> sea_orm::sea_query::SelectStatement {
    Query::select()
        .column((kci::Entity, kci::Column::KciId))
        .from(kci::Entity)
        .inner_join(
            tracked_entity::Entity,
            Expr::col((tracked_entity::Entity, tracked_entity::Column::Id))
                .equals((kci::Entity, kci::Column::TrackedEntityId)),
        )
        .cond_where(
            // Unlisted types have no terminal state we know of: always open.
            Condition::any()
                .add(not_terminal(&EntityType::ALL))
                .add(tracked_entity::Column::EntityType.is_not_in(listed_types())),
        )
        .to_owned()
}

fn listed_types() -> Vec<&'static str> {
    EntityType::ALL.iter().map(|t| t.as_str()).collect()
}

/// Entities in a final state.
fn finished_entities() -> sea_orm::sea_query::SelectStatement {
    Query::select()
        .column(tracked_entity::Column::Id)
        .from(tracked_entity::Entity)
        .cond_where(
            Condition::all()
                .add(tracked_entity::Column::EntityType.is_in(listed_types()))
                .add(not_terminal(&EntityType::ALL).not()),
        )
        .to_owned()
}

fn audit_condition(cutoff: DateTime<Utc>) -> Condition {
    Condition::all()
        .add(audit_log::Column::ReceivedAt.lt(cutoff))
        .add(
            Condition::any()
                .add(audit_log::Column::KciId.is_null())
                .add(audit_log::Column::KciId.not_in_subquery(kcis_of_open_entities())),
        )
}

fn events_condition(cutoff: DateTime<Utc>) -> Condition {
    Condition::all()
        .add(outbox_event::Column::Status.eq(OutboxStatus::Published))
        .add(outbox_event::Column::PublishedAt.lt(cutoff))
}

fn bodies_condition(cutoff: DateTime<Utc>) -> Condition {
    Condition::all()
        .add(kci::Column::ReceivedAt.lt(cutoff))
        .add(kci::Column::RawBodyPrunedAt.is_null())
        .add(kci::Column::TrackedEntityId.in_subquery(finished_entities()))
}

/// Counts what a prune would remove now, removing nothing.
pub async fn dry_run(
    db: &Database,
    settings: &RetentionSettings,
    now: DateTime<Utc>,
) -> Result<Pruned, StoreError> {
    let cutoffs = Cutoffs::of(settings, now);
    let mut pruned = Pruned::default();
    if let Some(cutoff) = cutoffs.audit {
        pruned.audit_records = audit_log::Entity::find()
            .filter(audit_condition(cutoff))
            .count(db)
            .await?;
    }
    if let Some(cutoff) = cutoffs.events {
        pruned.published_events = outbox_event::Entity::find()
            .filter(events_condition(cutoff))
            .count(db)
            .await?;
    }
    if let Some(cutoff) = cutoffs.bodies {
        pruned.raw_bodies = kci::Entity::find()
            .filter(bodies_condition(cutoff))
            .count(db)
            .await?;
    }
    Ok(pruned)
}

/// Prunes what is older than the configured periods, batch after batch, until nothing is left
/// (or another instance holds the prune lock).
pub async fn prune(
    db: &Database,
    settings: &RetentionSettings,
    now: DateTime<Utc>,
) -> Result<Pruned, StoreError> {
    let cutoffs = Cutoffs::of(settings, now);
    let batch = Ord::max(settings.batch_size, 1);
    let mut pruned = Pruned::default();
    for kind in [Kind::Audit, Kind::Events, Kind::Bodies] {
        let Some(cutoff) = (match kind {
            Kind::Audit => cutoffs.audit,
            Kind::Events => cutoffs.events,
            Kind::Bodies => cutoffs.bodies,
        }) else {
            continue;
        };
        loop {
            let Some(removed) = prune_batch(db, kind, cutoff, batch, now).await? else {
                pruned.yielded = true;
                return Ok(pruned);
            };
            match kind {
                Kind::Audit => pruned.audit_records += removed,
                Kind::Events => pruned.published_events += removed,
                Kind::Bodies => pruned.raw_bodies += removed,
            }
            if removed < batch {
                break;
            }
        }
    }
    Ok(pruned)
}

#[derive(Clone, Copy)]
enum Kind {
    Audit,
    Events,
    Bodies,
}

/// One batch in its own transaction; `None` when another instance is pruning.
async fn prune_batch(
    db: &Database,
    kind: Kind,
    cutoff: DateTime<Utc>,
    batch: u64,
    now: DateTime<Utc>,
) -> Result<Option<u64>, StoreError> {
    let txn = db.begin_write(Writer::Retention).await?;
    if txn.get_database_backend() == DbBackend::Postgres {
        let locked = txn
            .query_one_raw(sea_orm::Statement::from_string(
                DbBackend::Postgres,
                format!("SELECT pg_try_advisory_xact_lock({PRUNE_LOCK}) AS locked"),
            ))
            .await?
            .map(|row| row.try_get::<bool>("", "locked"))
            .transpose()?
            .unwrap_or(false);
        if !locked {
            return Ok(None);
        }
    }
    // The ids of one batch first, oldest first, then the change by id: short, index-driven.
    let removed = match kind {
        Kind::Audit => {
            let ids = oldest_ids::<audit_log::Entity>(
                &*txn,
                audit_condition(cutoff),
                audit_log::Column::Id,
                batch,
            )
            .await?;
            audit_log::Entity::delete_many()
                .filter(audit_log::Column::Id.is_in(ids))
                .exec(&*txn)
                .await?
                .rows_affected
        }
        Kind::Events => {
            let ids = oldest_ids::<outbox_event::Entity>(
                &*txn,
                events_condition(cutoff),
                outbox_event::Column::Id,
                batch,
            )
            .await?;
            outbox_event::Entity::delete_many()
                .filter(outbox_event::Column::Id.is_in(ids))
                // Never one the relay could still need, whatever changed since the read.
                .filter(outbox_event::Column::Status.eq(OutboxStatus::Published))
                .exec(&*txn)
                .await?
                .rows_affected
        }
        Kind::Bodies => {
            let ids =
                oldest_ids::<kci::Entity>(&*txn, bodies_condition(cutoff), kci::Column::Id, batch)
                    .await?;
            kci::Entity::update_many()
                .col_expr(kci::Column::RawBody, Expr::value(""))
                .col_expr(kci::Column::RawBodyPrunedAt, Expr::value(now))
                .filter(kci::Column::Id.is_in(ids))
                .exec(&*txn)
                .await?
                .rows_affected
        }
    };
    txn.commit().await?;
    Ok(Some(removed))
}

/// The ids of the oldest `batch` rows of `E` that match `condition`.
async fn oldest_ids<E: EntityTrait>(
    txn: &impl ConnectionTrait,
    condition: Condition,
    id: E::Column,
    batch: u64,
) -> Result<Vec<i64>, StoreError> {
    Ok(E::find()
        .select_only()
        .column(id)
        .filter(condition)
        .order_by_asc(id)
        .limit(batch)
        .into_tuple()
        .all(txn)
        .await?)
}
