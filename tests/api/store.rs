//! How kci-receiver's connections to the embedded store are set up: durability first (WAL,
//! `synchronous=FULL`: a commit is on disk before the 204), and the page cache each connection
//! holds (`database.sqlite_cache_kib`).

use sea_orm::{ConnectionTrait, Statement};

use crate::helpers::{Backend, TestDatabase, test_settings};

async fn pragma(db: &sea_orm::DatabaseConnection, name: &str) -> String {
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            format!("PRAGMA {name}"),
        ))
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("PRAGMA {name} answers"));
    row.try_get::<i64>("", name)
        .map(|n| n.to_string())
        .or_else(|_| row.try_get::<String>("", name))
        .unwrap()
}

#[tokio::test]
async fn every_sqlite_connection_is_durable_and_holds_the_configured_page_cache() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let mut settings = test_settings(&database.url);
    settings.database.sqlite_cache_kib = 300;
    settings.database.max_connections = 3;
    let db = kci_receiver::store::connect(&settings.database)
        .await
        .unwrap();
    // Several at once: the pool may open more than one connection, each set up alike.
    let answers = futures_util::future::join_all((0..3).map(|_| async {
        let connection = &db;
        (
            pragma(connection, "cache_size").await,
            pragma(connection, "synchronous").await,
            pragma(connection, "journal_mode").await,
        )
    }))
    .await;
    for (cache_size, synchronous, journal_mode) in answers {
        assert_eq!(cache_size, "-300", "300 KiB, given as a negative size");
        assert_eq!(synchronous, "2", "FULL");
        assert_eq!(journal_mode, "wal");
    }
}
