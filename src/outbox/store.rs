//! The outbox table as the relay and operators use it: which events are due, recording what the
//! broker said, dead events, retries and replays.
//!
//! Per-entity order: an entity's events are published from its oldest pending event (its
//! "head") on, one after the other, each only once the broker confirmed the previous one, so
//! events about one entity go out in the order their KCIs were accepted, retries included. A dead event holds its entity: the entity's later events wait behind it
//! (design.md, "Per-entity order"), until an operator retries it (it then goes first, and order
//! is kept) or skips it (recorded; the later events then go, and the skipped one never does
//! unless the entity is replayed). Held entities are listed in the attention view.

use chrono::{DateTime, Utc};
use entity::outbox_event::{self, OutboxStatus};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, ExprTrait, FromQueryResult, QueryFilter,
    QueryOrder, QuerySelect,
};

use crate::store::StoreError;
use crate::store::bulk::{self, Elements};

/// Advisory lock namespace for "this relay is publishing this entity" (PostgreSQL).
const ENTITY_LOCK_NAMESPACE: i32 = 0x4b43_4931; // "KCI1"

/// How many pending events a round looks at per head it may publish, at least.
const WINDOW_PER_HEAD: u32 = 4;

/// An event a round may publish, and its entity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DueEvent {
    pub id: i64,
    pub entity: i64,
}

/// The events to publish in a round: of up to `limit` entities whose head is due, the head and
/// up to `per_entity - 1` of the entity's next pending events, oldest first, whose payloads
/// together stay within `max_bytes` (the first head always goes). Entities in `busy` (those of
/// this relay's rounds still in flight) are passed over, with all their events.
///
/// Pending events are read in id order from the oldest (the `(status, id)` index), ids only, at
/// most `limit * max(per_entity, 4)` of them: an entity's pending events in that window are its
/// oldest ones (its head first), since everything older is published, dead or skipped. (A window
/// of `limit * 4` left the later events of a backlog's long lifecycles to a round of their own
/// after this one was recorded: a quarter of a 5,471-event drain.) The cost of a round is
/// bounded by the window, not by the backlog (a `GROUP BY` over every pending event cost 15 ms a
/// round at 1,000 KCIs/s and 77 ms in a 11,000-event drain). An entity whose head is waiting for
/// a retry is skipped with its later events, and so is an entity with a dead event (held, see the
/// module documentation); a window full of such entities delays the others until those retries
/// (at most `relay.retry_max_ms`). The relay publishes an entity's events in id order, each after
/// the previous one is confirmed.
pub async fn due_events(
    db: &impl ConnectionTrait,
    now: DateTime<Utc>,
    limit: u32,
    per_entity: u32,
    max_bytes: u64,
    busy: &std::collections::HashSet<i64>,
) -> Result<Vec<DueEvent>, StoreError> {
    #[derive(FromQueryResult)]
    struct Pending {
        id: i64,
        tracked_entity_id: i64,
        next_attempt_at: DateTime<Utc>,
        size: i64,
        /// Its entity has a dead event (see [`HELD`]).
        held: bool,
    }
    let backend = db.get_database_backend();
    // The size of a payload, read from its header (PostgreSQL does not detoast to know it).
    let size = match backend {
        DbBackend::Postgres => "octet_length(payload)::bigint",
        _ => "length(payload)",
    };
    let mut window = outbox_event::Entity::find()
        .select_only()
        .column(outbox_event::Column::Id)
        .column(outbox_event::Column::TrackedEntityId)
        .column(outbox_event::Column::NextAttemptAt)
        .column_as(Expr::cust(size), "size")
        .column_as(Expr::cust(HELD), "held")
        .filter(outbox_event::Column::Status.eq(OutboxStatus::Pending));
    if !busy.is_empty() {
        // In SQL, not after: the busy entities' events are the oldest pending ones, and would
        // otherwise fill the window.
        window = window.filter(bulk::none_of(
            backend,
            outbox_event::Column::TrackedEntityId,
            Elements::BigInt,
            busy.iter().copied(),
        ));
    }
    let window = window
        .order_by_asc(outbox_event::Column::Id)
        .limit(u64::from(
            limit.saturating_mul(Ord::max(per_entity, WINDOW_PER_HEAD)),
        ))
        .into_model::<Pending>()
        .all(db)
        .await?;
    // Per entity: how many of its events were taken (0: its head was not due, or it is held,
    // or the round was full when its head came).
    let mut taken: std::collections::HashMap<i64, u32> = std::collections::HashMap::new();
    let mut entities = 0usize;
    let mut due = Vec::new();
    let mut bytes = 0u64;
    for event in window {
        let wanted = match taken.get(&event.tracked_entity_id) {
            // Its head: due, not held, and room for one more entity.
            None => event.next_attempt_at <= now && !event.held && entities < limit as usize,
            // A follower: only behind a head that goes, within the entity's share.
            Some(count) => *count > 0 && *count < Ord::max(per_entity, 1),
        };
        let count = taken.entry(event.tracked_entity_id).or_insert(0);
        if !wanted {
            continue;
        }
        let size = u64::try_from(event.size).unwrap_or(0);
        if !due.is_empty() && bytes.saturating_add(size) > max_bytes {
            break;
        }
        bytes = bytes.saturating_add(size);
        if *count == 0 {
            entities += 1;
        }
        *count += 1;
        due.push(DueEvent {
            id: event.id,
            entity: event.tracked_entity_id,
        });
    }
    Ok(due)
}

/// Whether the window's event's entity has a dead event: its later events wait behind it. Read by
/// the window's own statement, in its snapshot. Read apart, an operator's retry of the dead
/// event committed between the two reads made its entity look free while the retried event was
/// not in the window: the event behind it went first (per-entity order broken, seen once in CI).
const HELD: &str = r#"EXISTS (SELECT 1 FROM "outbox_event" AS "dead"
    WHERE "dead"."tracked_entity_id" = "outbox_event"."tracked_entity_id" AND "dead"."status" = 'DEAD')"#;

/// The entities among `$1` that no other relay holds, each then held by us. An entity id maps to
/// a lock key modulo 2^31-1: two entities that share a key are both claimed by the relay that
/// holds it (advisory locks count per session, so each is released once: see [`UNLOCK`]).
static LOCK_ENTITIES: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT k FROM unnest($1::bigint[]) AS k \
         WHERE pg_try_advisory_lock({ENTITY_LOCK_NAMESPACE}, (k % 2147483647)::int)"
    )
});

/// Releases the entities in `$1`, once each.
static UNLOCK: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT count(*) FILTER (WHERE pg_advisory_unlock({ENTITY_LOCK_NAMESPACE}, (k % 2147483647)::int)) \
         FROM unnest($1::bigint[]) AS k"
    )
});

/// The events with these ids that are still pending, in id order, each once.
pub async fn pending_by_id(
    db: &impl ConnectionTrait,
    ids: &[i64],
) -> Result<Vec<outbox_event::Model>, StoreError> {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut events = Vec::with_capacity(ids.len());
    // In chunks: the driver holds a whole result's rows (SQLite: a copy of every value) until
    // they become models, so a round of thousands of events read at once held its payloads
    // twice. Chunk by chunk, only one chunk's rows are held beside the models.
    for chunk in ids.chunks(PENDING_READ_CHUNK) {
        events.extend(
            outbox_event::Entity::find()
                .filter(outbox_event::Column::Id.is_in(chunk.iter().copied()))
                .filter(outbox_event::Column::Status.eq(OutboxStatus::Pending))
                .order_by_asc(outbox_event::Column::Id)
                .all(db)
                .await?,
        );
    }
    Ok(events)
}

/// Events read per statement by [`pending_by_id`].
const PENDING_READ_CHUNK: usize = 256;

/// PostgreSQL: the relays' claim on entities they are publishing. A session-level advisory lock
/// per entity, held on a connection of the relay's own outside any transaction, so that waiting
/// for the broker never holds a transaction open (design.md, "Bounded time"). A round's locks are
/// released after its outcomes are committed, and by the server if the relay's connection goes
/// away (even after `kill -9`, and when the relay is dropped, see [`Drop`]): another relay then
/// publishes the unconfirmed events again (at least once).
pub struct EntityLocks {
    connection: Option<sea_orm::sqlx::pool::PoolConnection<sea_orm::sqlx::Postgres>>,
    pool: sea_orm::sqlx::PgPool,
}

/// How long a lock statement may take before the relay gives up on its lock connection.
const LOCK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl EntityLocks {
    pub fn new(db: &sea_orm::DatabaseConnection) -> EntityLocks {
        EntityLocks {
            connection: None,
            pool: db.get_postgres_connection_pool().clone(),
        }
    }

    async fn run<T>(
        &mut self,
        work: impl AsyncFnOnce(&mut sea_orm::sqlx::PgConnection) -> Result<T, sea_orm::sqlx::Error>,
    ) -> Result<T, StoreError> {
        use sea_orm::{ConnAcquireErr, DbErr, RuntimeErr};
        let connection = match self.connection.take() {
            Some(connection) => connection,
            None => tokio::time::timeout(LOCK_TIMEOUT, self.pool.acquire())
                .await
                .map_err(|_| StoreError::from(DbErr::ConnectionAcquire(ConnAcquireErr::Timeout)))?
                .map_err(|error| {
                    StoreError::from(DbErr::Conn(RuntimeErr::SqlxError(std::sync::Arc::new(
                        error,
                    ))))
                })?,
        };
        let connection = self.connection.insert(connection);
        match tokio::time::timeout(LOCK_TIMEOUT, work(&mut *connection)).await {
            Ok(Ok(value)) => Ok(value),
            failure => {
                // A connection in an unknown state (or hung) is closed, not pooled: the server
                // then releases whatever it held.
                if let Some(mut connection) = self.connection.take() {
                    connection.close_on_drop();
                }
                let error = match failure {
                    Ok(Err(error)) => error,
                    _ => sea_orm::sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer to a lock statement within {LOCK_TIMEOUT:?}"),
                    )),
                };
                // Whatever went wrong, the connection is gone: the relay treats it as the
                // database being unavailable and runs the round again.
                Err(StoreError {
                    kind: crate::store::StoreErrorKind::Unavailable,
                    source: DbErr::Exec(RuntimeErr::SqlxError(std::sync::Arc::new(error))),
                })
            }
        }
    }

    /// Locks each of these entities that no other relay holds; returns those.
    pub async fn lock(&mut self, entities: &[i64]) -> Result<Vec<i64>, StoreError> {
        if entities.is_empty() {
            return Ok(Vec::new());
        }
        // One text whatever the number of entities (an array parameter): prepared once.
        let entities = entities.to_vec();
        self.run(async move |connection| {
            sea_orm::sqlx::query_scalar::<_, i64>(LOCK_ENTITIES.as_str())
                .bind(entities.clone())
                .fetch_all(connection)
                .await
        })
        .await
    }

    /// Releases these entities (locked by [`EntityLocks::lock`]), each once.
    pub async fn unlock(&mut self, entities: &[i64]) -> Result<(), StoreError> {
        if entities.is_empty() || self.connection.is_none() {
            return Ok(());
        }
        let entities = entities.to_vec();
        self.run(async move |connection| {
            sea_orm::sqlx::query_scalar::<_, i64>(UNLOCK.as_str())
                .bind(entities.clone())
                .fetch_one(connection)
                .await
                .map(|_| ())
        })
        .await
    }

    /// Releases every entity this relay holds.
    pub async fn unlock_all(&mut self) -> Result<(), StoreError> {
        if self.connection.is_none() {
            return Ok(());
        }
        self.run(async |connection| {
            sea_orm::sqlx::query("SELECT pg_advisory_unlock_all()")
                .execute(connection)
                .await
                .map(|_| ())
        })
        .await
    }
}

impl Drop for EntityLocks {
    /// A relay that is dropped (a supervised restart after a panic, a shutdown) closes its lock
    /// connection instead of returning it to the pool with its entities still locked: the server
    /// then releases them, and no entity waits for that pooled connection to be closed.
    fn drop(&mut self) {
        if let Some(connection) = self.connection.as_mut() {
            connection.close_on_drop();
        }
    }
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
        .filter(bulk::one_of(
            db.get_database_backend(),
            outbox_event::Column::Id,
            Elements::BigInt,
            ids.iter().copied(),
        ))
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

/// Skips a dead event (design.md, "Per-entity order"): it will not be published, and its
/// entity's later events go on. Recorded on the event: who, when, why. Returns false when no
/// dead event has this id.
pub async fn skip_dead(
    db: &impl ConnectionTrait,
    event_id: uuid::Uuid,
    by: &str,
    reason: Option<&str>,
) -> Result<bool, StoreError> {
    let now = Utc::now();
    let note = format!(
        "skipped by {by} at {}{}",
        now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        reason.map(|r| format!(": {r}")).unwrap_or_default()
    );
    let note = crate::store::text::bounded(&note, crate::store::text::NOTE_MAX).into_owned();
    let skipped = outbox_event::Entity::update_many()
        .col_expr(
            outbox_event::Column::Status,
            Expr::value(OutboxStatus::Skipped),
        )
        .col_expr(outbox_event::Column::LastError, Expr::value(note))
        .filter(outbox_event::Column::EventId.eq(event_id))
        .filter(outbox_event::Column::Status.eq(OutboxStatus::Dead))
        .exec(db)
        .await?
        .rows_affected;
    Ok(skipped > 0)
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
    /// (an empty or reversed range selects nothing). The operations API and the command line both
    /// choose with this.
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
            (None, None, None, Some(from), Some(to)) => Ok(Selection::TimeRange { from, to }),
            _ => Err(
                "give exactly one of: entityType + gatewayId, conversationId, or from + to"
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
