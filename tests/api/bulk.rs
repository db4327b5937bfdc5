//! `store::bulk`: the fixed-text statements intake and the relay use store exactly what sea-orm's
//! own statements store (every column type intake writes, NULLs, JSON, awkward text,
//! microseconds; on SQLite the same bytes), hand back ids in row order, keep one text whatever
//! the row count, and find rows through indexes.

use chrono::{TimeZone, Utc};
use entity::{audit_log, tracked_entity};
use kci_receiver::store::bulk::{self, Elements};
use sea_orm::{
    ActiveModelTrait, ActiveValue::NotSet, ConnectionTrait, Database, DbBackend, EntityTrait,
    QueryFilter, QueryOrder, QueryTrait, Set,
};
use serde_json::json;

use crate::helpers::{Backend, spawn_app};

fn awkward_row(n: usize) -> audit_log::ActiveModel {
    let at = Utc
        .timestamp_opt(1_764_000_000 + n as i64, 123_456_789)
        .unwrap();
    audit_log::ActiveModel {
        id: NotSet,
        request_id: Set(Some(format!("req-{n} \"quoted\" \\ back'slash"))),
        conversation_id: Set(if n.is_multiple_of(2) {
            None
        } else {
            Some(format!("conv-{n}"))
        }),
        method: Set("POST".to_owned()),
        path: Set("/kcis".to_owned()),
        remote_addr: Set(None),
        principal: Set(Some("fibrecafe".to_owned())),
        request_headers: Set(
            json!({"x-request-id": format!("req-{n}"), "emoji": "\u{1F680}", "nested": {"a": [1, null, true]}}),
        ),
        request_body: Set(Some(format!(
            "{{\"id\": {n}, \"text\": \"line\\nbreak \u{00e9}\u{4e2d}\"}}\ttab"
        ))),
        request_body_size: Set(i64::MAX - n as i64),
        response_status: Set(204),
        response_body: Set(None),
        error_uuid: Set(if n.is_multiple_of(3) {
            Some(uuid::Uuid::new_v4())
        } else {
            None
        }),
        error_code: Set(None),
        outcome: Set("ACCEPTED".to_owned()),
        kci_id: Set(Some(uuid::Uuid::new_v4())),
        received_at: Set(at),
        duration_ms: Set(-1),
        attempts: Set(1),
    }
}

/// Every column but the id, as read back.
fn without_id(mut row: audit_log::Model) -> audit_log::Model {
    row.id = 0;
    row
}

async fn stores_what_sea_orm_stores(backend: Backend) {
    let app = spawn_app(backend).await;
    let db = Database::connect(app.database_url()).await.unwrap();
    let rows: Vec<audit_log::ActiveModel> = (0..7).map(awkward_row).collect();

    // The reference: sea-orm's own multi-row insert.
    audit_log::Entity::insert_many(rows.clone())
        .exec_without_returning(&db)
        .await
        .unwrap();
    let reference: Vec<audit_log::Model> = audit_log::Entity::find()
        .order_by_asc(audit_log::Column::Id)
        .all(&db)
        .await
        .unwrap();
    assert_eq!(reference.len(), 7);

    let reference_bytes = stored_bytes(&db, "audit_log").await;
    let ids = bulk::insert(&db, rows, true).await.unwrap();
    assert_eq!(ids.len(), 7);
    if backend == Backend::Sqlite {
        let bytes = stored_bytes(&db, "audit_log").await;
        assert_eq!(
            bytes[7..],
            reference_bytes[..],
            "SQLite: the same types and bytes as sea-orm's own insert"
        );
    }
    assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
    let written: Vec<audit_log::Model> = audit_log::Entity::find()
        .filter(bulk::one_of(
            db.get_database_backend(),
            audit_log::Column::Id,
            Elements::BigInt,
            ids.clone(),
        ))
        .order_by_asc(audit_log::Column::Id)
        .all(&db)
        .await
        .unwrap();
    assert_eq!(
        written.iter().map(|row| row.id).collect::<Vec<_>>(),
        ids,
        "the ids come back in the order of the rows"
    );
    assert_eq!(
        written.into_iter().map(without_id).collect::<Vec<_>>(),
        reference.into_iter().map(without_id).collect::<Vec<_>>(),
        "the same values as sea-orm's own insert, row by row"
    );

    // Replacing rows by id, NULLs included.
    let mut changed: Vec<audit_log::Model> = audit_log::Entity::find()
        .filter(bulk::one_of(
            db.get_database_backend(),
            audit_log::Column::Id,
            Elements::BigInt,
            ids[..3].to_vec(),
        ))
        .all(&db)
        .await
        .unwrap();
    for row in &mut changed {
        row.request_body = None;
        row.response_body = Some("\u{2028}\u{0007}".to_owned());
        row.request_headers = json!(["now", "an", "array"]);
    }
    bulk::update_by_id(
        &db,
        changed
            .iter()
            .cloned()
            .map(audit_log::ActiveModel::from)
            .collect(),
    )
    .await
    .unwrap();
    for row in &changed {
        let read = audit_log::Entity::find_by_id(row.id)
            .one(&db)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&read, row);
    }

    // None, one and several values.
    for wanted in [vec![], vec![ids[0]], ids.clone()] {
        let found = audit_log::Entity::find()
            .filter(bulk::one_of(
                db.get_database_backend(),
                audit_log::Column::Id,
                Elements::BigInt,
                wanted.clone(),
            ))
            .all(&db)
            .await
            .unwrap();
        assert_eq!(found.len(), wanted.len());
    }

    // Their complement (none_of), for each kind of value: every other row, whatever the list.
    let every: Vec<audit_log::Model> = audit_log::Entity::find()
        .order_by_asc(audit_log::Column::Id)
        .all(&db)
        .await
        .unwrap();
    let ids_of = |rows: &[audit_log::Model], skip: &dyn Fn(&audit_log::Model) -> bool| {
        rows.iter()
            .filter(|row| !skip(row))
            .map(|row| row.id)
            .collect::<Vec<_>>()
    };
    for unwanted in [vec![], vec![ids[0]], ids.clone(), vec![i64::MAX]] {
        let found = |condition| {
            let db = &db;
            async move {
                audit_log::Entity::find()
                    .filter(condition)
                    .order_by_asc(audit_log::Column::Id)
                    .all(db)
                    .await
                    .unwrap()
            }
        };
        let by_id = found(bulk::none_of(
            db.get_database_backend(),
            audit_log::Column::Id,
            Elements::BigInt,
            unwanted.clone(),
        ))
        .await;
        assert_eq!(
            ids_of(&by_id, &|_| false),
            ids_of(&every, &|row| unwanted.contains(&row.id)),
            "every row but {unwanted:?}"
        );
        // The KCI ids of those rows (the reference rows share them with the bulk rows).
        let kci_ids: Vec<uuid::Uuid> = every
            .iter()
            .filter(|row| unwanted.contains(&row.id))
            .map(|row| row.kci_id.unwrap())
            .collect();
        let by_kci_id = found(bulk::none_of(
            db.get_database_backend(),
            audit_log::Column::KciId,
            Elements::Uuid,
            kci_ids.clone(),
        ))
        .await;
        assert_eq!(
            ids_of(&by_kci_id, &|_| false),
            ids_of(&every, &|row| kci_ids.contains(&row.kci_id.unwrap())),
            "every row but those of KCIs {kci_ids:?}"
        );
    }
    let first_request = every[0].request_id.clone().unwrap();
    let others: Vec<audit_log::Model> = audit_log::Entity::find()
        .filter(bulk::none_of(
            db.get_database_backend(),
            audit_log::Column::RequestId,
            Elements::Text,
            [first_request.clone(), "no such request".to_owned()],
        ))
        .order_by_asc(audit_log::Column::Id)
        .all(&db)
        .await
        .unwrap();
    assert_eq!(
        ids_of(&others, &|_| false),
        ids_of(&every, &|row| row.request_id.as_ref()
            == Some(&first_request)),
        "text values, quotes and backslashes included"
    );
    if backend == Backend::Postgres {
        // Looked up in a hash of the values, not compared with each value in turn (the relay's
        // window passes over thousands of busy entities this way).
        let plan = plan_of(
            &db,
            audit_log::Entity::find().filter(bulk::none_of(
                DbBackend::Postgres,
                audit_log::Column::Id,
                Elements::BigInt,
                ids.clone(),
            )),
        )
        .await;
        assert!(
            plan.iter().any(|step| step.contains("hashed SubPlan")),
            "{plan:#?}"
        );
    }
}

/// The database's plan for `select`, a line per step: `EXPLAIN QUERY PLAN`'s details on SQLite,
/// `EXPLAIN`'s lines on PostgreSQL.
async fn plan_of<E: EntityTrait>(
    db: &sea_orm::DatabaseConnection,
    select: sea_orm::Select<E>,
) -> Vec<String> {
    let backend = db.get_database_backend();
    let statement = select.build(backend);
    let (explain, column) = match backend {
        DbBackend::Sqlite => ("EXPLAIN QUERY PLAN", "detail"),
        _ => ("EXPLAIN", "QUERY PLAN"),
    };
    db.query_all_raw(sea_orm::Statement::from_sql_and_values(
        backend,
        format!("{explain} {}", statement.sql),
        statement.values.map(|values| values.0).unwrap_or_default(),
    ))
    .await
    .unwrap()
    .iter()
    .map(|row| row.try_get::<String>("", column).unwrap())
    .collect()
}

/// SQLite: every row of `table` (in id order), each column but `id` as SQLite's `quote` shows it:
/// its type and its bytes (a timestamp written in another text format, or a UUID as text rather
/// than a blob, would read back as the same value and still differ here).
async fn stored_bytes(db: &sea_orm::DatabaseConnection, table: &str) -> Vec<String> {
    if db.get_database_backend() != DbBackend::Sqlite {
        return Vec::new();
    }
    let columns: Vec<String> = db
        .query_all_raw(sea_orm::Statement::from_string(
            DbBackend::Sqlite,
            format!("SELECT name FROM pragma_table_info('{table}') WHERE name <> 'id'"),
        ))
        .await
        .unwrap()
        .iter()
        .map(|row| row.try_get::<String>("", "name").unwrap())
        .collect();
    let quoted: Vec<String> = columns
        .iter()
        .map(|c| format!("'{c}=' || typeof(\"{c}\") || ':' || quote(\"{c}\")"))
        .collect();
    db.query_all_raw(sea_orm::Statement::from_string(
        DbBackend::Sqlite,
        format!(
            "SELECT {} AS row_ FROM \"{table}\" ORDER BY id",
            quoted.join(" || ' ' || ")
        ),
    ))
    .await
    .unwrap()
    .iter()
    .map(|row| row.try_get::<String>("", "row_").unwrap())
    .collect()
}

/// An entity with every kind of column an entity has: booleans, a UUID that is never NULL, an
/// enum, JSON.
fn entity_row(n: usize) -> tracked_entity::ActiveModel {
    let at = Utc
        .timestamp_opt(1_764_000_000 + n as i64, 987_654_321)
        .unwrap();
    tracked_entity::ActiveModel {
        id: NotSet,
        entity_type: Set("SERVICE_PROBLEM".to_owned()),
        gateway_id: Set(format!("gw-{n}")),
        supplier: Set("OPENSERVE".to_owned()),
        supplier_reference: Set(n.is_multiple_of(2).then(|| format!("ref '{n}'"))),
        status: Set("IN_PROGRESS".to_owned()),
        snapshot: Set(json!({"id": n, "note": "caf\u{e9} \"x\"", "list": [1.5, -2, null]})),
        last_sequence_number: Set(n as i64),
        last_kci_id: Set(uuid::Uuid::new_v4()),
        last_update_type: Set("ACTION_REQUIRED".to_owned()),
        last_reason: Set("CONFIRM".to_owned()),
        conversation_id: Set(format!("conversation-{n}")),
        correlation: Set(tracked_entity::Correlation::Matched),
        conversation_ref: Set(None),
        flag_illegal: Set(n.is_multiple_of(2)),
        flag_stale: Set(n.is_multiple_of(3)),
        flag_gap: Set(true),
        flag_anomaly: Set(false),
        flag_unknown_value: Set(n % 2 == 1),
        kci_count: Set(3),
        missing_sequences: Set(Some("3-4,7".to_owned())),
        gap_open_since: Set(Some(at)),
        reconcile_status: Set(None),
        reconciled_at: Set(None),
        reconcile_attempts: Set(0),
        reconcile_next_at: Set(None),
        first_seen_at: Set(at),
        last_kci_at: Set(at),
        updated_at: Set(at),
    }
}

/// Entities: stored by the bulk insert as sea-orm stores them, and replaced by id likewise.
async fn entities_store_what_sea_orm_stores(backend: Backend) {
    let app = spawn_app(backend).await;
    let db = Database::connect(app.database_url()).await.unwrap();
    let rows: Vec<tracked_entity::ActiveModel> = (0..5).map(entity_row).collect();
    tracked_entity::Entity::insert_many(rows.clone())
        .exec_without_returning(&db)
        .await
        .unwrap();
    let reference = tracked_entity::Entity::find()
        .order_by_asc(tracked_entity::Column::Id)
        .all(&db)
        .await
        .unwrap();
    let reference_bytes = stored_bytes(&db, "tracked_entity").await;
    tracked_entity::Entity::delete_many()
        .exec(&db)
        .await
        .unwrap();

    let ids = bulk::insert(&db, rows, true).await.unwrap();
    let written = tracked_entity::Entity::find()
        .order_by_asc(tracked_entity::Column::Id)
        .all(&db)
        .await
        .unwrap();
    assert_eq!(written.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    let without_id = |mut e: tracked_entity::Model| {
        e.id = 0;
        e
    };
    assert_eq!(
        written.iter().cloned().map(without_id).collect::<Vec<_>>(),
        reference.into_iter().map(without_id).collect::<Vec<_>>()
    );
    assert_eq!(stored_bytes(&db, "tracked_entity").await, reference_bytes);

    // Replaced by id: as sea-orm's own update of each row stores it.
    let mut changed = written.clone();
    for entity in &mut changed {
        entity.flag_illegal = !entity.flag_illegal;
        entity.snapshot = json!({"replaced": entity.id});
        entity.last_kci_id = uuid::Uuid::new_v4();
        entity.supplier_reference = None;
    }
    bulk::update_by_id(
        &db,
        changed
            .iter()
            .cloned()
            .map(tracked_entity::ActiveModel::from)
            .collect(),
    )
    .await
    .unwrap();
    let replaced_bytes = stored_bytes(&db, "tracked_entity").await;
    for entity in &changed {
        let row = tracked_entity::ActiveModel::from(entity.clone()).reset_all();
        tracked_entity::Entity::update(row).exec(&db).await.unwrap();
    }
    assert_eq!(
        tracked_entity::Entity::find()
            .order_by_asc(tracked_entity::Column::Id)
            .all(&db)
            .await
            .unwrap(),
        changed
    );
    assert_eq!(stored_bytes(&db, "tracked_entity").await, replaced_bytes);
}

#[tokio::test]
async fn entities_are_stored_as_sea_orm_stores_them_on_sqlite() {
    entities_store_what_sea_orm_stores(Backend::Sqlite).await;
}

#[tokio::test]
async fn entities_are_stored_as_sea_orm_stores_them_on_postgres() {
    entities_store_what_sea_orm_stores(Backend::Postgres).await;
}

/// SQLite's plan for each kind of value list: a search through the column's index, never a
/// scan of the table.
#[tokio::test]
async fn on_sqlite_value_lists_are_answered_through_indexes() {
    let app = spawn_app(Backend::Sqlite).await;
    let db = Database::connect(app.database_url()).await.unwrap();
    let rows: Vec<audit_log::ActiveModel> = (0..500).map(awkward_row).collect();
    let kci_ids: Vec<uuid::Uuid> = rows
        .iter()
        .map(|row| row.kci_id.clone().unwrap().unwrap())
        .collect();
    let ids = bulk::insert(&db, rows, true).await.unwrap();
    db.execute_unprepared("ANALYZE").await.unwrap();
    let lists = [
        (
            bulk::one_of(
                DbBackend::Sqlite,
                audit_log::Column::Id,
                Elements::BigInt,
                vec![ids[3], ids[499]],
            ),
            2,
        ),
        (
            bulk::one_of(
                DbBackend::Sqlite,
                audit_log::Column::RequestId,
                Elements::Text,
                vec![
                    "req-7 \"quoted\" \\ back'slash".to_owned(),
                    "none".to_owned(),
                ],
            ),
            1,
        ),
        (
            bulk::one_of(
                DbBackend::Sqlite,
                audit_log::Column::KciId,
                Elements::Uuid,
                vec![kci_ids[0], kci_ids[250], uuid::Uuid::nil()],
            ),
            2,
        ),
    ];
    for (condition, expected) in lists {
        let select = audit_log::Entity::find().filter(condition);
        assert_eq!(select.clone().all(&db).await.unwrap().len(), expected);
        let plan = plan_of(&db, select).await;
        assert!(
            plan.iter().any(|step| step.starts_with("SEARCH audit_log")),
            "{plan:?}"
        );
        assert!(
            !plan.iter().any(|step| step.starts_with("SCAN audit_log")),
            "audit_log read whole: {plan:?}"
        );
    }
}

#[tokio::test]
async fn bulk_statements_store_what_sea_orm_stores_on_postgres() {
    stores_what_sea_orm_stores(Backend::Postgres).await;
}

/// However the plan is cached, a few rows of a large table are found by their keys, never by
/// reading the table (a join with a set-returning function alone was planned as a hash join
/// over a sequential scan, 100 rows assumed for the function).
#[tokio::test]
async fn on_postgres_bulk_statements_read_a_large_table_by_its_index() {
    let app = spawn_app(Backend::Postgres).await;
    let db = Database::connect(app.database_url()).await.unwrap();
    let ids = bulk::insert(&db, (0..3000).map(awkward_row).collect(), true)
        .await
        .unwrap();
    db.execute_unprepared("ANALYZE audit_log").await.unwrap();
    let wanted = vec![ids[10], ids[1500], ids[2999]];
    // More than five times: PostgreSQL may switch a prepared statement to a generic plan.
    for _ in 0..8 {
        let txn = sea_orm::TransactionTrait::begin(&db).await.unwrap();
        let rows = audit_log::Entity::find()
            .filter(bulk::one_of(
                DbBackend::Postgres,
                audit_log::Column::Id,
                Elements::BigInt,
                wanted.clone(),
            ))
            .all(&txn)
            .await
            .unwrap();
        assert_eq!(rows.len(), 3);
        bulk::update_by_id(
            &txn,
            rows.into_iter().map(audit_log::ActiveModel::from).collect(),
        )
        .await
        .unwrap();
        let scans = txn
            .query_one_raw(sea_orm::Statement::from_string(
                DbBackend::Postgres,
                "SELECT seq_scan FROM pg_stat_xact_user_tables WHERE relname = 'audit_log'",
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<i64>("", "seq_scan")
            .unwrap();
        assert_eq!(scans, 0, "audit_log was read whole");
        txn.commit().await.unwrap();
    }
}

#[tokio::test]
async fn bulk_statements_store_what_sea_orm_stores_on_sqlite() {
    stores_what_sea_orm_stores(Backend::Sqlite).await;
}

#[test]
fn the_statement_text_does_not_depend_on_the_number_of_values() {
    for backend in [DbBackend::Postgres, DbBackend::Sqlite] {
        let text = |n: i64| {
            audit_log::Entity::find()
                .filter(bulk::one_of(
                    backend,
                    audit_log::Column::Id,
                    Elements::BigInt,
                    (0..n).collect::<Vec<_>>(),
                ))
                .build(backend)
                .sql
        };
        assert_eq!(text(0), text(50), "{backend:?}");
        assert_eq!(text(1), text(2), "{backend:?}");
    }
}
