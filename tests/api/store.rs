//! How kci-receiver's connections to the embedded store are set up: durability first (WAL,
//! `synchronous=FULL`: a commit is on disk before the 204), and the page cache each connection
//! holds (`database.sqlite_cache_kib`); and TCP connections with Nagle's algorithm off, to
//! PostgreSQL and from the gateway.

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

/// sqlx 0.9.0 left Nagle's algorithm on (vendor/README.md): a statement written in more than one
/// piece (TLS records) waited 40 ms for PostgreSQL's delayed ACK, and intake's batches spent
/// most of their time in those waits. Every pooled connection must have `TCP_NODELAY`.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn every_postgres_connection_has_nagle_off() {
    use sea_orm::TransactionTrait;

    let database = TestDatabase::create(Backend::Postgres).await;
    let mut settings = test_settings(&database.url);
    settings.database.max_connections = 3;
    let db = kci_receiver::store::connect(&settings.database)
        .await
        .unwrap();
    let server_port = database.postgres_addr().port();
    // Three transactions open at once hold three different connections.
    let transactions = futures_util::future::join_all((0..3).map(|_| db.begin()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect::<Vec<_>>();
    let mut ports = std::collections::BTreeSet::new();
    for txn in &transactions {
        let row = txn
            .query_one_raw(Statement::from_string(
                txn.get_database_backend(),
                "SELECT inet_client_port() AS port",
            ))
            .await
            .unwrap()
            .expect("a TCP connection has a client port");
        let port = u16::try_from(row.try_get::<i32>("", "port").unwrap()).unwrap();
        ports.insert(port);
        assert_eq!(
            crate::helpers::nodelay_of(port, server_port),
            Some(true),
            "the connection from local port {port} has TCP_NODELAY"
        );
    }
    assert_eq!(ports.len(), 3, "three connections were checked");
}

/// The service's own listener: actix leaves Nagle's algorithm on unless told, and a response
/// written in more than one piece (headers and body, TLS records) must not wait for the client's
/// delayed ACK either.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn accepted_connections_have_nagle_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let app = crate::helpers::spawn_app(Backend::Sqlite).await;
    let port: u16 = app.address.rsplit(':').next().unwrap().parse().unwrap();
    let mut client = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let client_port = client.local_addr().unwrap().port();
    client
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: kci-receiver\r\n\r\n")
        .await
        .unwrap();
    // Once it answers, the service has accepted and set up the connection.
    let mut status_line = [0u8; 12];
    client.read_exact(&mut status_line).await.unwrap();
    assert_eq!(&status_line, b"HTTP/1.1 200");
    assert_eq!(
        crate::helpers::nodelay_of(port, client_port),
        Some(true),
        "the service's end of the connection has TCP_NODELAY"
    );
}

/// With autovacuum off for the lookup tables, the service analyzes them itself once they have
/// grown by autovacuum's threshold, so that the plans cached for intake's lookups follow them
/// (`database.analyze_interval_seconds`); a table that has not grown is left alone.
#[tokio::test]
async fn lookup_tables_that_grew_are_analyzed_where_autovacuum_is_off() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let settings = test_settings(&database.url);
    let connection = kci_receiver::store::connect(&settings.database)
        .await
        .unwrap();
    kci_receiver::store::migrate(&connection).await.unwrap();
    let db: kci_receiver::store::Database = connection.into();
    for table in ["conversation", "tracked_entity"] {
        db.execute_unprepared(&format!(
            "ALTER TABLE {table} SET (autovacuum_enabled = false)"
        ))
        .await
        .unwrap();
    }
    let last_analyzed = |table: &'static str| {
        let db = db.clone();
        async move {
            db.query_one_raw(Statement::from_string(
                db.get_database_backend(),
                format!(
                    "SELECT (last_analyze IS NOT NULL) AS analyzed FROM pg_stat_user_tables WHERE relname = '{table}'"
                ),
            ))
            .await
            .unwrap()
            .unwrap()
            .try_get::<bool>("", "analyzed")
            .unwrap()
        }
    };
    let mut statistics = kci_receiver::store::statistics::LookupStatistics::default();
    // 120 new conversations: over 50 rows and 10% since the (empty) table was last analyzed.
    let analyzed = add_conversations_then_analyze(&db, &mut statistics, "grown", 120).await;
    assert_eq!(analyzed, ["conversation"]);
    assert!(last_analyzed("conversation").await);
    assert!(
        !last_analyzed("tracked_entity").await,
        "not grown: left alone"
    );
    // Analyzed now: nothing more to do until it grows again by the threshold.
    assert!(
        statistics
            .analyze_grown_tables(&db)
            .await
            .unwrap()
            .is_empty()
    );
    let analyzed_again =
        add_conversations_then_analyze(&db, &mut statistics, "grown-again", 80).await;
    assert_eq!(
        analyzed_again,
        ["conversation"],
        "grown again by 80 of 200 rows"
    );
}

/// Inserts `count` conversations, then runs the statistics check until it analyzes something
/// (PostgreSQL publishes a session's table counters within a second or so of its commit), at most
/// ten seconds; returns what it analyzed.
async fn add_conversations_then_analyze(
    db: &kci_receiver::store::Database,
    statistics: &mut kci_receiver::store::statistics::LookupStatistics,
    prefix: &str,
    count: u32,
) -> Vec<&'static str> {
    db.execute_unprepared(&format!(
        "INSERT INTO conversation (conversation_id, operation, source, registered_at) \
         SELECT '{prefix}-' || n, 'ProvideEthernetOrder', 'API', now() FROM generate_series(1, {count}) n"
    ))
    .await
    .unwrap();
    for _ in 0..50 {
        let analyzed = statistics.analyze_grown_tables(db).await.unwrap();
        if !analyzed.is_empty() {
            return analyzed;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    Vec::new()
}

/// The size of the SQLite database's write-ahead log file, in pages of 4 KiB. SQLite reuses the
/// file from its start once a checkpoint copied all of it, so the file only grows while nobody
/// checkpoints.
fn wal_pages(database: &TestDatabase) -> u64 {
    let path = database
        .url
        .trim_start_matches("sqlite://")
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    std::fs::metadata(format!("{path}-wal"))
        .map(|m| m.len() / 4096)
        .unwrap_or(0)
}

/// Twenty write transactions of about 100 pages each, through the writer.
async fn write_pages(db: &kci_receiver::store::Database) {
    for _ in 0..20 {
        let txn = db
            .begin_write(kci_receiver::store::Writer::Retention)
            .await
            .unwrap();
        txn.execute_unprepared(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) \
             INSERT INTO scratch (b) SELECT randomblob(3900) FROM n",
        )
        .await
        .unwrap();
        txn.commit().await.unwrap();
    }
}

/// SQLite's automatic checkpoint ran inside the commits of intake's writer, in its turn at the
/// one writer (`store::checkpoints`): the writer now leaves them to a task of their own, beside
/// it, and only checkpoints itself as a backstop once the log holds 10,000 pages.
#[tokio::test]
async fn on_sqlite_the_log_is_checkpointed_beside_the_writer_not_in_its_commits() {
    use kci_receiver::store::checkpoints;

    let database = TestDatabase::create(Backend::Sqlite).await;
    let settings = test_settings(&database.url);
    let db = kci_receiver::store::Database::new(
        kci_receiver::store::connect(&settings.database)
            .await
            .unwrap(),
    );
    db.execute_unprepared("CREATE TABLE scratch (b BLOB)")
        .await
        .unwrap();
    // SQLite's default would checkpoint at 1,000 pages and start the log over there.
    write_pages(&db).await;
    let grown = wal_pages(&database);
    assert!(
        grown > 1_800,
        "the writer checkpointed in its commits: {grown} pages"
    );
    let checkpoint = checkpoints::checkpoint_once(&db).await.unwrap().unwrap();
    assert!(checkpoint.log_frames > 1_800, "{checkpoint:?}");
    assert_eq!(checkpoint.checkpointed_frames, checkpoint.log_frames);

    // With the task running, the log is copied as it is written; the writer starts it over at
    // its first transaction after everything was copied (here after a pause of the writes), so
    // the file stops growing. Without the task it would grow by the same again.
    let shutdown = tokio_util::sync::CancellationToken::new();
    checkpoints::start(
        db.clone(),
        std::time::Duration::from_millis(10),
        shutdown.clone(),
    );
    write_pages(&db).await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    write_pages(&db).await;
    shutdown.cancel();
    let after = wal_pages(&database);
    assert!(
        after < grown + 200,
        "the log kept growing: {grown} pages, then {after}"
    );
}

/// Migration 13: on PostgreSQL every body column compresses new values with LZ4 (pglz's
/// compression of each outbox event was the busiest of PostgreSQL's own work in intake and in a
/// drain); an event written now is stored LZ4-compressed and reads back byte for byte; down
/// gives the columns back to the server's default.
#[tokio::test]
async fn on_postgres_bodies_are_compressed_with_lz4() {
    use migration::MigratorTrait;

    let app = crate::helpers::spawn_app(Backend::Postgres).await;
    let methods = |rows: Vec<serde_json::Value>| -> Vec<(String, String)> {
        rows.iter()
            .map(|row| {
                (
                    format!(
                        "{}.{}",
                        row["table"].as_str().unwrap(),
                        row["column"].as_str().unwrap()
                    ),
                    row["method"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let columns_sql = migration::BODY_COLUMNS
        .iter()
        .map(|(table, column)| {
            format!(
                "SELECT '{table}' AS \"table\", '{column}' AS \"column\", attcompression::text AS method \
                 FROM pg_attribute WHERE attrelid = '{table}'::regclass AND attname = '{column}'"
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let lz4_offered = !app
        .rows("SELECT 1 AS yes FROM pg_settings WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)")
        .await
        .is_empty();
    assert!(
        lz4_offered,
        "this PostgreSQL has no LZ4: the test cannot tell the migration's work from its fallback"
    );
    let applied = methods(app.rows(&columns_sql).await);
    assert_eq!(applied.len(), migration::BODY_COLUMNS.len());
    for (column, method) in &applied {
        assert_eq!(method, "l", "{column} compresses new values with LZ4");
    }

    // A KCI's outbox event (its envelope passes the 2 KB at which PostgreSQL compresses).
    let body = crate::helpers::fixture("ProvideServiceOrderUpdate-1");
    assert_eq!(app.post_kci(&body, "conv-lz4").await.status().as_u16(), 204);
    let stored = app
        .rows(
            "SELECT pg_column_compression(payload) AS method, payload FROM outbox_event \
             ORDER BY id DESC LIMIT 1",
        )
        .await;
    assert_eq!(stored[0]["method"], "lz4", "{stored:?}");
    let envelope: serde_json::Value =
        serde_json::from_str(stored[0]["payload"].as_str().unwrap()).unwrap();
    assert_eq!(envelope["kci"], body, "read back as written");

    migration::Migrator::down(app.db.connection(), Some(1))
        .await
        .unwrap();
    for (column, method) in methods(app.rows(&columns_sql).await) {
        assert_eq!(method, "", "{column}: the server's default again");
    }
    migration::Migrator::up(app.db.connection(), None)
        .await
        .unwrap();
}
