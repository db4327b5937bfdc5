//! Recording a batch of deliveries in one transaction: load what they need under lock, decide in
//! memory ([`super::plan`]), write every table with one multi-row statement, commit once.
//!
//! A batch of n KCIs costs a handful of statements (on PostgreSQL five to seven, `BEGIN` and
//! `COMMIT` included) and one durable commit, whatever n is; one KCI alone costs the same. That
//! is what makes group commit pay: the database's work per KCI shrinks as load grows, instead of
//! each KCI paying its own round trips and commit. On PostgreSQL each of those statements also
//! has one text whatever n is ([`crate::store::bulk`]), so it is parsed and planned once per
//! connection rather than once per batch size.
//!
//! Locking (PostgreSQL): the batch's entities are locked with one `SELECT ... ORDER BY id FOR
//! UPDATE`, so concurrent batches take shared entities in the same order and queue behind each
//! other rather than deadlock. Entities seen for the first time are inserted (`ON CONFLICT DO
//! NOTHING`, in key order) with `kci_count` 0 and locked the same way, in the same statement; a
//! concurrent batch inserting the same entity waits for ours, then runs again and finds it. The
//! batch's shared conversation locks are taken by the statement that reads its known KCIs. On
//! SQLite the transaction starts `IMMEDIATE`: one writer at a time.

use std::collections::{HashMap, HashSet};

use chrono::Utc;
use entity::conversation;
use entity::kci as kci_row;
use entity::tracked_entity;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, DatabaseTransaction, DbBackend, DbErr, EntityName,
    EntityTrait, ExprTrait, FromQueryResult, QueryFilter, QueryOrder, QuerySelect, Set,
};
use serde_json::Value;
use uuid::Uuid;

use super::plan::{self, EntityKey, KciRef, KnownKci, Loaded, entity_key};
use super::{Delivery, IntakeError, Recorded};
use crate::store::StoreError;
use crate::store::bulk::{self, Elements};

/// Records `deliveries` in `txn` (not committed here); one [`Recorded`] per delivery, in order.
pub async fn record(
    txn: &DatabaseTransaction,
    deliveries: &[&Delivery],
    add_time: &impl Fn(fn(&mut super::StageTimes) -> &mut std::time::Duration, std::time::Instant),
) -> Result<Vec<Recorded>, IntakeError> {
    let loading = std::time::Instant::now();
    let loaded = load(txn, deliveries).await?;
    let plan = plan::plan(deliveries, loaded).map_err(IntakeError::Inconsistent)?;
    add_time(|t| &mut t.load, loading);
    let writing = std::time::Instant::now();
    let recorded = write(txn, deliveries, plan).await?;
    add_time(|t| &mut t.write, writing);
    Ok(recorded)
}

async fn load(txn: &DatabaseTransaction, deliveries: &[&Delivery]) -> Result<Loaded, StoreError> {
    let mut loaded = Loaded::default();
    // First of all, before any entity is locked (so that no cycle of waits can form): the
    // batch's conversations, shared, against a registration of one of them (exclusive).
    let conversation_ids: std::collections::BTreeSet<&str> = deliveries
        .iter()
        .map(|d| d.conversation_id.as_str())
        .collect();
    let kci_ids: HashSet<Uuid> = deliveries.iter().map(|d| d.kci.id).collect();
    for known in known_kcis_under_conversation_locks(txn, &conversation_ids, kci_ids).await? {
        let known_kci = KnownKci {
            id: known.id,
            tracked_entity_id: known.tracked_entity_id,
            // Pruned by retention (its entity finished long ago): nothing to compare with.
            body: if known.raw_body_pruned_at.is_some() {
                None
            } else {
                Some(serde_json::from_str(&known.raw_body).unwrap_or_else(|error| {
                // Only bodies that parsed are stored: this is a damaged row. A redelivery of it
                // is then an anomaly (compared with nothing), recorded, never lost.
                    tracing::error!(kci.id = %known.kci_id, %error, "a stored KCI body does not parse");
                    Value::Null
                }))
            },
        };
        loaded.kcis.insert(known.kci_id, known_kci);
    }

    // The entities: those of KCIs seen for the first time, and those of redeliveries that
    // differ (their anomaly goes into the entity's history).
    let mut keys: Vec<EntityKey> = Vec::new();
    let mut anomaly_entities: Vec<i64> = Vec::new();
    let mut first_deliveries: HashMap<EntityKey, &Delivery> = HashMap::new();
    let mut seen_in_batch = HashSet::new();
    for delivery in deliveries {
        let kci = &delivery.kci;
        if let Some(known) = loaded.kcis.get(&kci.id) {
            if known
                .body
                .as_ref()
                .is_some_and(|body| !kci.same_content_as(body))
            {
                anomaly_entities.push(known.tracked_entity_id);
            }
        } else if seen_in_batch.insert(kci.id) {
            let key = entity_key(kci);
            if !first_deliveries.contains_key(&key) {
                first_deliveries.insert(key.clone(), delivery);
                keys.push(key);
            }
        }
        // A redelivery of a KCI first seen in this batch touches an entity already in `keys`.
    }
    keys.sort();
    lock_entities(txn, &keys, &anomaly_entities, &mut loaded).await?;
    let backend = txn.get_database_backend();

    // Conversations of the new KCIs: needed now to create entities matched.
    for request in conversation::Entity::find()
        .filter(bulk::one_of(
            backend,
            conversation::Column::ConversationId,
            Elements::Text,
            conversation_ids.iter().map(|id| id.to_string()),
        ))
        .all(txn)
        .await?
    {
        loaded
            .conversations_by_id
            .insert(request.id, request.clone());
        loaded
            .conversations
            .insert(request.conversation_id.clone(), request);
    }

    let missing: Vec<EntityKey> = keys
        .into_iter()
        .filter(|key| !loaded.entity_ids.contains_key(key))
        .collect();
    if !missing.is_empty() {
        let now = Utc::now();
        let new_rows = missing.iter().map(|key| {
            let delivery = first_deliveries[key];
            let original = loaded.conversations.get(&delivery.conversation_id);
            let mut row: tracked_entity::ActiveModel =
                plan::new_entity(delivery, original, now).into();
            row.id = sea_orm::ActiveValue::NotSet;
            row
        });
        insert_and_lock_entities(txn, new_rows.collect(), &missing, &mut loaded).await?;
        if let Some(key) = missing.iter().find(|k| !loaded.entity_ids.contains_key(*k)) {
            // Inserted by a batch that committed after our statement began (PostgreSQL), or
            // deleted between our insert and lock (not something intake does): run it again.
            return Err(StoreError {
                kind: crate::store::StoreErrorKind::Retryable,
                source: DbErr::RecordNotFound(format!(
                    "entity {key:?}, inserted by this transaction or a concurrent one"
                )),
            });
        }
    }

    // Original requests the entities are linked to, when not the ones just loaded.
    let linked: HashSet<i64> = loaded
        .entities
        .values()
        .filter_map(|e| e.conversation_ref)
        .filter(|id| !loaded.conversations_by_id.contains_key(id))
        .collect();
    if !linked.is_empty() {
        for request in conversation::Entity::find()
            .filter(bulk::one_of(
                backend,
                conversation::Column::Id,
                Elements::BigInt,
                linked,
            ))
            .all(txn)
            .await?
        {
            loaded.conversations_by_id.insert(request.id, request);
        }
    }
    Ok(loaded)
}

/// A KCI recorded before, as a redelivery is compared with it.
struct StoredKci {
    id: i64,
    kci_id: Uuid,
    tracked_entity_id: i64,
    raw_body: String,
    raw_body_pruned_at: Option<chrono::DateTime<Utc>>,
}

/// The KCIs among `kci_ids` recorded before, after taking the batch's shared conversation locks
/// ([`super::conversations::lock_conversations`]). On PostgreSQL both in one statement, one round
/// trip fewer per batch: the locks in a materialized `WITH` that the query reads first, so they
/// are taken whether or not any KCI is known. The KCIs are then read in a snapshot that may
/// predate the wait for a lock (only a registration holds one exclusively): a KCI committed
/// meanwhile by another batch is not seen, and inserting it again fails on the unique key, which
/// rolls the transaction back to run again ([`crate::store::retry_on_race`]). The conversations
/// themselves are read later, by a statement of their own, after the locks.
async fn known_kcis_under_conversation_locks(
    txn: &DatabaseTransaction,
    conversation_ids: &std::collections::BTreeSet<&str>,
    kci_ids: HashSet<Uuid>,
) -> Result<Vec<StoredKci>, StoreError> {
    let backend = txn.get_database_backend();
    if backend != DbBackend::Postgres {
        // SQLite: one writer at a time, no conversation locks to take.
        return Ok(kci_row::Entity::find()
            .filter(bulk::one_of(
                backend,
                kci_row::Column::KciId,
                Elements::Uuid,
                kci_ids,
            ))
            .all(txn)
            .await?
            .into_iter()
            .map(|known| StoredKci {
                id: known.id,
                kci_id: known.kci_id,
                tracked_entity_id: known.tracked_entity_id,
                raw_body: known.raw_body,
                raw_body_pruned_at: known.raw_body_pruned_at,
            })
            .collect());
    }
    /// Its columns as they may come back from the outer join: all NULL when no KCI is known.
    #[derive(FromQueryResult)]
    struct MaybeStored {
        id: Option<i64>,
        kci_id: Option<Uuid>,
        tracked_entity_id: Option<i64>,
        raw_body: Option<String>,
        raw_body_pruned_at: Option<chrono::DateTime<Utc>>,
    }
    static KNOWN_KCIS_UNDER_LOCKS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            r#"WITH conversation_locks AS MATERIALIZED ({locks})
            SELECT k."id", k."kci_id", k."tracked_entity_id", k."raw_body", k."raw_body_pruned_at"
            FROM conversation_locks LEFT JOIN "kci" AS k
              ON k."kci_id" = ANY(ARRAY(SELECT jsonb_array_elements_text($2)::uuid))"#,
            locks = super::conversations::locks_sql(false),
        )
    });
    let rows = MaybeStored::find_by_statement(sea_orm::Statement::from_sql_and_values(
        backend,
        KNOWN_KCIS_UNDER_LOCKS.as_str(),
        [
            sea_orm::Value::from(serde_json::json!(conversation_ids)),
            sea_orm::Value::from(serde_json::json!(
                kci_ids.iter().map(Uuid::to_string).collect::<Vec<_>>()
            )),
        ],
    ))
    .all(txn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            Some(StoredKci {
                id: row.id?,
                kci_id: row.kci_id?,
                tracked_entity_id: row.tracked_entity_id?,
                raw_body: row.raw_body?,
                raw_body_pruned_at: row.raw_body_pruned_at,
            })
        })
        .collect())
}

/// Entities whose key (entity type, gateway id) is one of `keys` or whose id is one of `ids`.
pub(super) fn entities_by_key_or_id(
    backend: DbBackend,
    keys: &[EntityKey],
    ids: &[i64],
) -> Condition {
    let sql = if backend == DbBackend::Postgres {
        keys_or_ids_sql("$1", "$2")
    } else {
        // SQLite: the same question, one text as well (`store::bulk`); each key found through
        // the unique index of (entity_type, gateway_id).
        r#""tracked_entity"."id" IN (
            SELECT e."id" FROM json_each(?) AS k JOIN "tracked_entity" AS e
              ON e."entity_type" = k.value ->> 0 AND e."gateway_id" = k.value ->> 1
            UNION ALL SELECT value FROM json_each(?))"#
            .to_owned()
    };
    Condition::all().add(Expr::cust_with_values(sql, keys_or_ids_values(keys, ids)))
}

/// PostgreSQL: the condition of [`entities_by_key_or_id`], its keys and ids in the parameters
/// named. One text whatever the numbers of keys and ids (`store::bulk`): the ids of the keys'
/// entities and the ids asked for, computed first. Each key is looked up by its own subquery on
/// the unique index: a join of the keys with the table would be planned as a scan of every
/// entity (see `store::bulk`).
fn keys_or_ids_sql(keys_parameter: &str, ids_parameter: &str) -> String {
    format!(
        r#""tracked_entity"."id" = ANY(ARRAY(
            SELECT (SELECT e."id" FROM "tracked_entity" AS e
                    WHERE e."entity_type" = k->>0 AND e."gateway_id" = k->>1)
            FROM jsonb_array_elements({keys_parameter}) AS k
            UNION ALL SELECT jsonb_array_elements_text({ids_parameter})::bigint))"#
    )
}

/// PostgreSQL: the entities of [`keys_or_ids_sql`]'s keys and ids, locked in id order (so that
/// concurrent batches queue rather than deadlock).
fn locked_entities_sql(keys_parameter: &str, ids_parameter: &str) -> String {
    format!(
        r#"SELECT * FROM "tracked_entity" WHERE {} ORDER BY "id" FOR UPDATE"#,
        keys_or_ids_sql(keys_parameter, ids_parameter)
    )
}

/// The values of [`keys_or_ids_sql`]'s two parameters.
fn keys_or_ids_values(keys: &[EntityKey], ids: &[i64]) -> [sea_orm::Value; 2] {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(entity_type, gateway_id)| serde_json::json!([entity_type, gateway_id]))
        .collect();
    [
        sea_orm::Value::from(Value::Array(keys)),
        sea_orm::Value::from(serde_json::json!(ids)),
    ]
}

/// Inserts the entities seen for the first time (`ON CONFLICT DO NOTHING`: a concurrent batch
/// may have inserted one first) and locks and loads them. On PostgreSQL in one statement: the
/// rows inserted come back from the insert (they are this transaction's own, locked until it
/// ends); those another transaction inserted are locked by a `FOR UPDATE` part in id order.
/// That part reads the statement's snapshot, so a row another batch committed after it began
/// is not found: the caller then runs the transaction again ([`crate::store::retry_on_race`]),
/// when it is.
async fn insert_and_lock_entities(
    txn: &DatabaseTransaction,
    rows: Vec<tracked_entity::ActiveModel>,
    keys: &[EntityKey],
    loaded: &mut Loaded,
) -> Result<(), StoreError> {
    let key_columns = [
        tracked_entity::Column::EntityType,
        tracked_entity::Column::GatewayId,
    ];
    if txn.get_database_backend() != DbBackend::Postgres {
        bulk::insert_unless_present(txn, rows, &key_columns).await?;
        return lock_entities(txn, keys, &[], loaded).await;
    }
    let (insert, rows_value) =
        bulk::insert_unless_present_sql(DbBackend::Postgres, rows, &key_columns, 1)?;
    let sql = format!(
        r#"WITH inserted AS ({insert} RETURNING *),
        locked AS ({locked})
        SELECT * FROM inserted UNION ALL SELECT * FROM locked"#,
        locked = locked_entities_sql("$2", "$3"),
    );
    let [keys_value, ids_value] = keys_or_ids_values(keys, &[]);
    for entity in tracked_entity::Model::find_by_statement(sea_orm::Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [rows_value, keys_value, ids_value],
    ))
    .all(txn)
    .await?
    {
        remember_entity(loaded, entity);
    }
    Ok(())
}

fn remember_entity(loaded: &mut Loaded, entity: tracked_entity::Model) {
    loaded.entity_ids.insert(
        (entity.entity_type.clone(), entity.gateway_id.clone()),
        entity.id,
    );
    loaded.entities.insert(entity.id, entity);
}

/// Locks (PostgreSQL `FOR UPDATE`, in id order) and loads entities by key and by id.
async fn lock_entities(
    txn: &DatabaseTransaction,
    keys: &[EntityKey],
    ids: &[i64],
    loaded: &mut Loaded,
) -> Result<(), StoreError> {
    if keys.is_empty() && ids.is_empty() {
        return Ok(());
    }
    if txn.get_database_backend() == DbBackend::Postgres {
        // One text, built once: sea-orm would build this select anew for every batch, a hundred
        // small allocations or so each time.
        static LOCK_ENTITIES: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| locked_entities_sql("$1", "$2"));
        for entity in
            tracked_entity::Model::find_by_statement(sea_orm::Statement::from_sql_and_values(
                DbBackend::Postgres,
                LOCK_ENTITIES.as_str(),
                keys_or_ids_values(keys, ids),
            ))
            .all(txn)
            .await?
        {
            remember_entity(loaded, entity);
        }
        return Ok(());
    }
    for entity in tracked_entity::Entity::find()
        .filter(entities_by_key_or_id(txn.get_database_backend(), keys, ids))
        .order_by_asc(tracked_entity::Column::Id)
        .lock_exclusive()
        .all(txn)
        .await?
    {
        remember_entity(loaded, entity);
    }
    Ok(())
}

async fn write(
    txn: &DatabaseTransaction,
    deliveries: &[&Delivery],
    plan: plan::Plan,
) -> Result<Vec<Recorded>, StoreError> {
    if txn.get_database_backend() == DbBackend::Postgres {
        write_in_one_statement(txn, deliveries, plan).await
    } else {
        write_statement_by_statement(txn, deliveries, plan).await
    }
}

/// Each delivery's audit record, with what recording it did.
fn audit_rows<'a>(
    deliveries: &'a [&Delivery],
    recorded: &'a [Recorded],
) -> impl Iterator<Item = entity::audit_log::ActiveModel> + 'a {
    deliveries.iter().zip(recorded).map(|(d, recorded)| {
        let mut row = d.audit.to_active_model();
        row.outcome = Set(recorded.outcome.audit_outcome().as_str().to_owned());
        row.kci_id = Set(Some(d.kci.id));
        row
    })
}

/// PostgreSQL: every table in one statement, one round trip ([`bulk::Combined`]); the
/// history and the outbox refer to the batch's new KCIs and audit records by their position.
async fn write_in_one_statement(
    txn: &DatabaseTransaction,
    deliveries: &[&Delivery],
    plan: plan::Plan,
) -> Result<Vec<Recorded>, StoreError> {
    use entity::{audit_log, outbox_event, state_transition};
    let new_row = bulk::Combined::new_row;
    let mut statement = bulk::Combined::default();
    statement.insert(plan.kcis, &[])?;
    statement.insert(audit_rows(deliveries, &plan.recorded).collect(), &[])?;
    if !plan.counters.is_empty() {
        statement.statement(
            vec![redelivery_counters(&plan.counters), Utc::now().into()],
            |p| count_redeliveries_sql(&p[0], &p[1]),
        );
    }
    statement.insert(
        history_rows(plan.transitions, new_row, new_row),
        &[
            (
                state_transition::Column::KciRef,
                kci_row::Entity.table_name(),
            ),
            (
                state_transition::Column::AuditLogId,
                audit_log::Entity.table_name(),
            ),
        ],
    )?;
    statement.update_by_id(
        plan.entities
            .into_iter()
            .map(tracked_entity::ActiveModel::from)
            .collect(),
    )?;
    statement.insert(
        outbox_rows(plan.events, new_row),
        &[(outbox_event::Column::KciRef, kci_row::Entity.table_name())],
    )?;
    statement.execute(txn).await?;
    Ok(plan.recorded)
}

/// SQLite: one statement per table, each new row's id read back for the rows that refer to it.
/// All of them sent as one text of several statements was measured no faster, with a larger
/// peak RSS (docs/benchmarks.md, "Eleventh round"): in-process, a statement's call is cheap.
async fn write_statement_by_statement(
    txn: &DatabaseTransaction,
    deliveries: &[&Delivery],
    plan: plan::Plan,
) -> Result<Vec<Recorded>, StoreError> {
    let kci_ids = bulk::insert(txn, plan.kcis, true).await?;
    let audit_ids =
        bulk::insert(txn, audit_rows(deliveries, &plan.recorded).collect(), true).await?;
    count_redeliveries(txn, &plan.counters).await?;
    bulk::insert(
        txn,
        history_rows(plan.transitions, |n| kci_ids[n], |d| audit_ids[d]),
        false,
    )
    .await?;
    bulk::update_by_id(
        txn,
        plan.entities
            .into_iter()
            .map(tracked_entity::ActiveModel::from)
            .collect(),
    )
    .await?;
    bulk::insert(txn, outbox_rows(plan.events, |n| kci_ids[n]), false).await?;
    Ok(plan.recorded)
}

/// The history rows with their two references: the KCI each records (`new_kci`: the id of the
/// batch's nth new KCI) and the audit record of the delivery it cites (`audit`).
fn history_rows(
    transitions: Vec<(KciRef, usize, entity::state_transition::ActiveModel)>,
    new_kci: impl Fn(usize) -> i64,
    audit: impl Fn(usize) -> i64,
) -> Vec<entity::state_transition::ActiveModel> {
    transitions
        .into_iter()
        .map(|(reference, delivery, mut row)| {
            row.kci_ref = Set(match reference {
                KciRef::Existing(id) => id,
                KciRef::New(n) => new_kci(n),
            });
            row.audit_log_id = Set(Some(audit(delivery)));
            row
        })
        .collect()
}

/// The outbox events with the (new) KCI each publishes (`new_kci`, as for [`history_rows`]).
fn outbox_rows(
    events: Vec<(usize, entity::outbox_event::ActiveModel)>,
    new_kci: impl Fn(usize) -> i64,
) -> Vec<entity::outbox_event::ActiveModel> {
    events
        .into_iter()
        .map(|(kci, mut row)| {
            row.kci_ref = Set(new_kci(kci));
            row
        })
        .collect()
}

/// Redeliveries of KCIs recorded before the batch, on PostgreSQL: `[row id, redeliveries,
/// anomalies]` each, one JSON array, for [`count_redeliveries_sql`].
fn redelivery_counters(counters: &[(i64, i32, i32)]) -> sea_orm::Value {
    let rows: Vec<Value> = counters
        .iter()
        .map(|(id, redeliveries, anomalies)| serde_json::json!([id, redeliveries, anomalies]))
        .collect();
    sea_orm::Value::from(Value::Array(rows))
}

/// Adds the counters of `counters` (JSON, [`redelivery_counters`]) to their KCIs and sets the
/// time of the last redelivery to `now`: one text whatever their number (`store::bulk`).
fn count_redeliveries_sql(counters: &str, now: &str) -> String {
    format!(
        r#"UPDATE "kci" SET "redelivery_count" = "kci"."redelivery_count" + (c->>1)::integer,
            "anomaly_count" = "kci"."anomaly_count" + (c->>2)::integer, "last_redelivered_at" = {now}
           FROM jsonb_array_elements({counters}) AS c WHERE "kci"."id" = (c->>0)::bigint
           AND "kci"."id" = ANY(ARRAY(SELECT (c->>0)::bigint FROM jsonb_array_elements({counters}) AS c))"#
    )
}

/// Redeliveries of KCIs recorded before the batch: their counters and the time of the last one.
/// SQLite, where statements cost next to nothing to prepare: one per KCI (redeliveries are
/// rare). PostgreSQL counts them in the batch's one statement ([`count_redeliveries_sql`]).
async fn count_redeliveries(
    txn: &DatabaseTransaction,
    counters: &[(i64, i32, i32)],
) -> Result<(), StoreError> {
    let now = Utc::now();
    for (id, redeliveries, anomalies) in counters {
        kci_row::Entity::update_many()
            .col_expr(
                kci_row::Column::RedeliveryCount,
                Expr::col(kci_row::Column::RedeliveryCount).add(*redeliveries),
            )
            .col_expr(
                kci_row::Column::AnomalyCount,
                Expr::col(kci_row::Column::AnomalyCount).add(*anomalies),
            )
            .col_expr(kci_row::Column::LastRedeliveredAt, Expr::value(now))
            .filter(kci_row::Column::Id.eq(*id))
            .exec(txn)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use migration::MigratorTrait;
    use sea_orm::{QueryTrait, Statement};

    fn entity_row(n: usize) -> tracked_entity::ActiveModel {
        let now = Utc::now();
        tracked_entity::ActiveModel {
            id: sea_orm::ActiveValue::NotSet,
            entity_type: Set(["PROVIDE_ORDER", "SERVICE_TEST"][n % 2].to_owned()),
            gateway_id: Set(format!("{}", 1000 + n / 2)),
            supplier: Set("OPENSERVE".to_owned()),
            supplier_reference: Set(None),
            status: Set("ACKNOWLEDGED".to_owned()),
            snapshot: Set(serde_json::json!({"n": n})),
            last_sequence_number: Set(1),
            last_kci_id: Set(Uuid::new_v4()),
            last_update_type: Set("INFORMATION".to_owned()),
            last_reason: Set("ACKNOWLEDGED".to_owned()),
            conversation_id: Set(format!("conversation-{n}")),
            correlation: Set(tracked_entity::Correlation::Unmatched),
            conversation_ref: Set(None),
            flag_illegal: Set(false),
            flag_stale: Set(false),
            flag_gap: Set(false),
            flag_anomaly: Set(false),
            flag_unknown_value: Set(false),
            kci_count: Set(1),
            missing_sequences: Set(None),
            gap_open_since: Set(None),
            reconcile_status: Set(None),
            reconciled_at: Set(None),
            reconcile_attempts: Set(0),
            reconcile_next_at: Set(None),
            first_seen_at: Set(now),
            last_kci_at: Set(now),
            updated_at: Set(now),
        }
    }

    /// SQLite's plan of `select`, one line per step.
    async fn plan_of(db: &sea_orm::DatabaseConnection, select: Statement) -> Vec<String> {
        let explain = Statement::from_sql_and_values(
            DbBackend::Sqlite,
            format!("EXPLAIN QUERY PLAN {}", select.sql),
            select.values.map(|values| values.0).unwrap_or_default(),
        );
        db.query_all_raw(explain)
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get::<String>("", "detail").unwrap())
            .collect()
    }

    /// The entity lookup's one SQLite text (whatever the number of keys) finds the entities by
    /// key and by id through indexes: a batch's lookup must not read the whole table.
    #[tokio::test]
    async fn on_sqlite_entities_are_found_by_key_and_id_through_indexes() {
        let db = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
        migration::Migrator::up(&db, None).await.unwrap();
        let ids = bulk::insert(&db, (0..400).map(entity_row).collect(), true)
            .await
            .unwrap();
        db.execute_unprepared("ANALYZE").await.unwrap();
        let keys: Vec<EntityKey> = vec![
            ("PROVIDE_ORDER".to_owned(), "1000".to_owned()),
            ("SERVICE_TEST".to_owned(), "1199".to_owned()),
            ("SERVICE_TEST".to_owned(), "no such entity".to_owned()),
        ];
        let select = |keys: &[EntityKey], ids: &[i64]| {
            tracked_entity::Entity::find()
                .filter(entities_by_key_or_id(DbBackend::Sqlite, keys, ids))
                .order_by_asc(tracked_entity::Column::Id)
        };
        let found: Vec<i64> = select(&keys, &ids[100..102])
            .all(&db)
            .await
            .unwrap()
            .into_iter()
            .map(|entity| entity.id)
            .collect();
        assert_eq!(found, [ids[0], ids[100], ids[101], ids[399]]);
        assert_eq!(
            select(&keys[..1], &[]).build(DbBackend::Sqlite).sql,
            select(&keys, &ids).build(DbBackend::Sqlite).sql,
            "one text whatever the numbers of keys and ids"
        );
        let plan = plan_of(&db, select(&keys, &ids[100..102]).build(DbBackend::Sqlite)).await;
        assert!(
            plan.iter()
                .any(|step| step.starts_with("SEARCH e")
                    && step.contains("INDEX ux_tracked_entity_key")),
            "{plan:?}"
        );
        assert!(
            !plan
                .iter()
                .any(|step| step.starts_with("SCAN tracked_entity") || step.starts_with("SCAN e")),
            "the table is read whole: {plan:?}"
        );
    }
}
