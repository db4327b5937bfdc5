//! The outbox table as the relay and operators use it: which events are due, recording what the
//! broker said, dead events, retries and replays.
//!
//! Per-entity order: only an entity's oldest pending event (its "head") is ever published, so
//! events about one entity go out one after the other, in the order their KCIs were accepted,
//! retries included. Dead events do not block the events after them; retried or replayed, they
//! go out again (consumers see each event's sequence number in its envelope).

use chrono::{DateTime, Utc};
use entity::outbox_event::{self, OutboxStatus};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, ExprTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect, Statement,
};

use crate::store::StoreError;

/// Advisory lock namespace for "this relay is publishing this entity" (PostgreSQL).
const ENTITY_LOCK_NAMESPACE: i32 = 0x4b43_4931; // "KCI1"

/// How many pending events a round looks at per head it may publish.
const WINDOW_PER_HEAD: u32 = 4;

/// The ids of the heads of up to `limit` entities whose head is due, oldest first.
///
/// Pending events are read in id order from the oldest (the `(status, id)` index), ids only, at
/// most `limit * 4` of them: an entity's first pending event in that window is its head, since
/// everything older is published or dead. The cost of a round is bounded by the window, not by
/// the backlog (a `GROUP BY` over every pending event cost 15 ms a round at 1,000 KCIs/s and
/// 77 ms in a 11,000-event drain). An entity whose head is waiting for a retry is skipped with
/// its later events; a window full of such entities delays the others until those retries
/// (at most `relay.retry_max_ms`).
pub async fn due_head_ids(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    limit: u32,
) -> Result<Vec<i64>, StoreError> {
    #[derive(FromQueryResult)]
    struct Pending {
        id: i64,
        tracked_entity_id: i64,
        next_attempt_at: DateTime<Utc>,
    }
    let window = outbox_event::Entity::find()
        .select_only()
        .column(outbox_event::Column::Id)
        .column(outbox_event::Column::TrackedEntityId)
        .column(outbox_event::Column::NextAttemptAt)
        .filter(outbox_event::Column::Status.eq(OutboxStatus::Pending))
        .order_by_asc(outbox_event::Column::Id)
        .limit(u64::from(limit.saturating_mul(WINDOW_PER_HEAD)))
        .into_model::<Pending>()
        .all(db)
        .await?;
    let mut entities_seen = std::collections::HashSet::new();
    let mut heads = Vec::new();
    for event in window {
        if entities_seen.insert(event.tracked_entity_id) && event.next_attempt_at <= now {
            heads.push(event.id);
            if heads.len() >= limit as usize {
                break;
            }
        }
    }
    Ok(heads)
}

/// Integer ids as an SQL list (safe to inline).
fn id_list(ids: &[i64]) -> String {
    ids.iter()
        .map(|id| id.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The events with these ids that are still pending, in id order (SQLite, where one relay runs).
pub async fn pending_by_id(
    db: &impl ConnectionTrait,
    ids: &[i64],
) -> Result<Vec<outbox_event::Model>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(outbox_event::Entity::find()
        .filter(outbox_event::Column::Id.is_in(ids.iter().copied()))
        .filter(outbox_event::Column::Status.eq(OutboxStatus::Pending))
        .order_by_asc(outbox_event::Column::Id)
        .all(db)
        .await?)
}

/// PostgreSQL: takes the transaction-scoped entity lock of each head that no other relay holds,
/// then returns those heads that are still pending. The locks go with the transaction, also when
/// its relay dies.
///
/// The status is read in a second statement on purpose: a statement's snapshot is taken when it
/// starts, so a status read in the locking statement could predate the commit of the relay that
/// held the lock a moment before (and publish its event again).
pub async fn lock_heads(
    txn: &impl ConnectionTrait,
    head_ids: &[i64],
) -> Result<Vec<outbox_event::Model>, StoreError> {
    if head_ids.is_empty() {
        return Ok(Vec::new());
    }
    let lock = format!(
        "SELECT e.id FROM outbox_event e WHERE e.id IN ({}) \
         AND pg_try_advisory_xact_lock({ENTITY_LOCK_NAMESPACE}, (e.tracked_entity_id % 2147483647)::int)",
        id_list(head_ids)
    );
    let locked: Vec<i64> = txn
        .query_all_raw(Statement::from_string(DbBackend::Postgres, lock))
        .await?
        .iter()
        .map(|row| row.try_get::<i64>("", "id"))
        .collect::<Result<_, _>>()?;
    pending_by_id(txn, &locked).await
}

/// Marks events the broker confirmed.
pub async fn mark_published(
    db: &impl ConnectionTrait,
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    outbox_event::Entity::update_many()
        .col_expr(
            outbox_event::Column::Status,
            Expr::value(OutboxStatus::Published),
        )
        .col_expr(outbox_event::Column::PublishedAt, Expr::value(now))
        .col_expr(
            outbox_event::Column::PublishCount,
            Expr::col(outbox_event::Column::PublishCount).add(1),
        )
        .col_expr(
            outbox_event::Column::LastError,
            Expr::value(Option::<String>::None),
        )
        .filter(outbox_event::Column::Id.is_in(ids.iter().copied()))
        .exec(db)
        .await?;
    Ok(())
}

/// Records a refusal: another attempt later, or dead once `max_attempts` is reached.
pub async fn mark_refused(
    db: &impl ConnectionTrait,
    event: &outbox_event::Model,
    error: &str,
    next_attempt_at: DateTime<Utc>,
    max_attempts: i32,
) -> Result<bool, StoreError> {
    let attempts = event.attempts + 1;
    let dead = attempts >= max_attempts;
    let status = if dead {
        OutboxStatus::Dead
    } else {
        OutboxStatus::Pending
    };
    outbox_event::Entity::update_many()
        .col_expr(outbox_event::Column::Attempts, Expr::value(attempts))
        .col_expr(outbox_event::Column::Status, Expr::value(status))
        .col_expr(
            outbox_event::Column::NextAttemptAt,
            Expr::value(next_attempt_at),
        )
        .col_expr(
            outbox_event::Column::LastError,
            Expr::value(error.to_owned()),
        )
        .filter(outbox_event::Column::Id.eq(event.id))
        .exec(db)
        .await?;
    Ok(dead)
}

/// Dead events, oldest first, after `after_id` (a cursor).
pub async fn dead_events(
    db: &impl ConnectionTrait,
    after_id: Option<i64>,
    limit: u64,
) -> Result<Vec<outbox_event::Model>, StoreError> {
    let mut query = outbox_event::Entity::find()
        .filter(outbox_event::Column::Status.eq(OutboxStatus::Dead))
        .order_by_asc(outbox_event::Column::Id)
        .limit(limit);
    if let Some(after_id) = after_id {
        query = query.filter(outbox_event::Column::Id.gt(after_id));
    }
    Ok(query.all(db).await?)
}

/// What to publish again.
#[derive(Debug, Clone)]
pub enum Selection {
    /// One dead event, by its event id.
    DeadEvent(uuid::Uuid),
    /// Every dead event.
    AllDead,
    /// Every event (already published or dead) about one entity.
    Entity {
        entity_type: String,
        gateway_id: String,
    },
    /// Every event of the KCIs that arrived with this `X-Conversation-ID`.
    Conversation(String),
    /// Every event created in [from, to).
    TimeRange {
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    },
}

impl Selection {
    /// A replay: exactly one of an entity (type and gateway id), a conversation, or a time range
    /// (`from` before `to`). The operations API and the command line both choose with this.
    pub fn replay(
        entity_type: Option<String>,
        gateway_id: Option<String>,
        conversation_id: Option<String>,
        from: Option<DateTime<Utc>>,
        to: Option<DateTime<Utc>>,
    ) -> Result<Selection, String> {
        match (entity_type, gateway_id, conversation_id, from, to) {
            (Some(entity_type), Some(gateway_id), None, None, None) => Ok(Selection::Entity {
                entity_type,
                gateway_id,
            }),
            (None, None, Some(conversation_id), None, None) => {
                Ok(Selection::Conversation(conversation_id))
            }
            (None, None, None, Some(from), Some(to)) if from < to => {
                Ok(Selection::TimeRange { from, to })
            }
            _ => Err(
                "give exactly one of: entityType + gatewayId, conversationId, or from + to (from before to)"
                    .to_owned(),
            ),
        }
    }
}

/// Puts the selected events back in the queue (same event id, so the same `message_id`):
/// pending, no attempts, due now. Returns how many. Events still pending are left alone.
pub async fn requeue(db: &impl ConnectionTrait, selection: &Selection) -> Result<u64, StoreError> {
    use outbox_event::Column;
    let mut update = outbox_event::Entity::update_many()
        .col_expr(Column::Status, Expr::value(OutboxStatus::Pending))
        .col_expr(Column::Attempts, Expr::value(0))
        .col_expr(Column::NextAttemptAt, Expr::value(Utc::now()));
    update = match selection {
        Selection::DeadEvent(event_id) => update
            .filter(Column::EventId.eq(*event_id))
            .filter(Column::Status.eq(OutboxStatus::Dead)),
        Selection::AllDead => update.filter(Column::Status.eq(OutboxStatus::Dead)),
        Selection::Entity {
            entity_type,
            gateway_id,
        } => update
            .filter(Column::Status.ne(OutboxStatus::Pending))
            .filter(
                Column::TrackedEntityId.in_subquery(
                    sea_orm::sea_query::Query::select()
                        .column(entity::tracked_entity::Column::Id)
                        .from(entity::tracked_entity::Entity)
                        .and_where(
                            Expr::col(entity::tracked_entity::Column::EntityType)
                                .eq(entity_type.as_str()),
                        )
                        .and_where(
                            Expr::col(entity::tracked_entity::Column::GatewayId)
                                .eq(gateway_id.as_str()),
                        )
                        .to_owned(),
                ),
            ),
        Selection::Conversation(conversation_id) => update
            .filter(Column::Status.ne(OutboxStatus::Pending))
            .filter(
                Column::KciRef.in_subquery(
                    sea_orm::sea_query::Query::select()
                        .column(entity::kci::Column::Id)
                        .from(entity::kci::Entity)
                        .and_where(
                            Expr::col(entity::kci::Column::ConversationId)
                                .eq(conversation_id.as_str()),
                        )
                        .to_owned(),
                ),
            ),
        Selection::TimeRange { from, to } => update
            .filter(Column::Status.ne(OutboxStatus::Pending))
            .filter(Column::CreatedAt.gte(*from))
            .filter(Column::CreatedAt.lt(*to)),
    };
    Ok(update.exec(db).await?.rows_affected)
}

/// [`requeue`], then wakes relays in other processes (PostgreSQL `NOTIFY`).
pub async fn requeue_and_notify(
    db: &sea_orm::DatabaseConnection,
    selection: &Selection,
) -> Result<u64, StoreError> {
    let requeued = requeue(db, selection).await?;
    if requeued > 0 && db.get_database_backend() == DbBackend::Postgres {
        db.execute_unprepared(&format!("NOTIFY {}", super::signal::NOTIFY_CHANNEL))
            .await?;
    }
    Ok(requeued)
}

/// How many events wait, and since when (for readiness and, later, metrics).
pub async fn backlog(
    db: &impl ConnectionTrait,
) -> Result<(u64, Option<DateTime<Utc>>), StoreError> {
    use sea_orm::PaginatorTrait;
    let pending = outbox_event::Entity::find()
        .filter(outbox_event::Column::Status.eq(OutboxStatus::Pending))
        .count(db)
        .await?;
    let oldest = outbox_event::Entity::find()
        .filter(outbox_event::Column::Status.eq(OutboxStatus::Pending))
        .order_by_asc(outbox_event::Column::Id)
        .one(db)
        .await?
        .map(|event| event.created_at);
    Ok((pending, oldest))
}
