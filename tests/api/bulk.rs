//! `store::bulk`: the fixed-text statements intake and the relay use on PostgreSQL store exactly
//! what sea-orm's own statements store (every column type intake writes, NULLs, JSON, awkward
//! text, microseconds), hand back ids in row order, and keep one text whatever the row count.

use chrono::{TimeZone, Utc};
use entity::audit_log;
use kci_receiver::store::bulk::{self, Elements};
use sea_orm::{
    ActiveValue::NotSet, ConnectionTrait, Database, DbBackend, EntityTrait, QueryFilter,
    QueryOrder, QueryTrait, Set,
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

    let ids = bulk::insert(&db, rows, true).await.unwrap();
    assert_eq!(ids.len(), 7);
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
fn on_postgres_the_statement_text_does_not_depend_on_the_number_of_values() {
    let text = |n: i64| {
        audit_log::Entity::find()
            .filter(bulk::one_of(
                DbBackend::Postgres,
                audit_log::Column::Id,
                Elements::BigInt,
                (0..n).collect::<Vec<_>>(),
            ))
            .build(DbBackend::Postgres)
            .sql
    };
    assert_eq!(text(1), text(50));
    assert_ne!(
        audit_log::Entity::find()
            .filter(bulk::one_of(
                DbBackend::Sqlite,
                audit_log::Column::Id,
                Elements::BigInt,
                vec![1, 2]
            ))
            .build(DbBackend::Sqlite)
            .sql,
        text(2),
        "SQLite keeps sea-orm's IN list"
    );
}
