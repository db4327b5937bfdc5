//! The durable-commit ceiling of a database: how many transactions per second a simple client
//! commits when each writes what intake writes for one KCI (upsert the entity, insert the KCI,
//! its audit record, its transition and its outbox event), at the same concurrency. The
//! benchmark shows kci-receiver's throughput as a ratio of it: into kci-receiver's own tables
//! (the same rows, indexes and constraints), and, for scale, into minimal tables.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use hdrhistogram::Histogram;
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DbBackend, Statement, TransactionTrait, Value,
};
use serde_json::json;

const POSTGRES_TABLES: &str = "
CREATE TABLE bench_entity (id BIGSERIAL PRIMARY KEY, key TEXT UNIQUE NOT NULL, status TEXT NOT NULL, seq BIGINT NOT NULL, snapshot JSONB NOT NULL, updated_at TIMESTAMPTZ NOT NULL);
CREATE TABLE bench_kci (id BIGSERIAL PRIMARY KEY, kci_id UUID UNIQUE NOT NULL, entity_id BIGINT NOT NULL, raw_body TEXT NOT NULL, received_at TIMESTAMPTZ NOT NULL);
CREATE TABLE bench_audit (id BIGSERIAL PRIMARY KEY, request_id TEXT NOT NULL, body TEXT NOT NULL, status INT NOT NULL, received_at TIMESTAMPTZ NOT NULL);
CREATE TABLE bench_transition (id BIGSERIAL PRIMARY KEY, entity_id BIGINT NOT NULL, kci_ref BIGINT NOT NULL, to_status TEXT NOT NULL, recorded_at TIMESTAMPTZ NOT NULL);
CREATE TABLE bench_outbox (id BIGSERIAL PRIMARY KEY, event_id UUID UNIQUE NOT NULL, entity_id BIGINT NOT NULL, payload JSONB NOT NULL, status TEXT NOT NULL);";

const SQLITE_TABLES: &str = "
CREATE TABLE bench_entity (id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT UNIQUE NOT NULL, status TEXT NOT NULL, seq INTEGER NOT NULL, snapshot TEXT NOT NULL, updated_at TEXT NOT NULL);
CREATE TABLE bench_kci (id INTEGER PRIMARY KEY AUTOINCREMENT, kci_id BLOB UNIQUE NOT NULL, entity_id INTEGER NOT NULL, raw_body TEXT NOT NULL, received_at TEXT NOT NULL);
CREATE TABLE bench_audit (id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL, body TEXT NOT NULL, status INTEGER NOT NULL, received_at TEXT NOT NULL);
CREATE TABLE bench_transition (id INTEGER PRIMARY KEY AUTOINCREMENT, entity_id INTEGER NOT NULL, kci_ref INTEGER NOT NULL, to_status TEXT NOT NULL, recorded_at TEXT NOT NULL);
CREATE TABLE bench_outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, event_id BLOB UNIQUE NOT NULL, entity_id INTEGER NOT NULL, payload TEXT NOT NULL, status TEXT NOT NULL);";

/// `$1, $2` placeholders become `?1, ?2` for SQLite (numbered, so one may appear twice).
fn statement(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    let sql = match backend {
        DbBackend::Sqlite => {
            let mut out = String::with_capacity(sql.len());
            let mut chars = sql.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                    out.push('?');
                } else {
                    out.push(c);
                }
            }
            out
        }
        _ => sql.to_owned(),
    };
    Statement::from_sql_and_values(backend, sql, values)
}

/// Which rows the ceiling writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// kci-receiver's own tables (migrated), with their indexes and constraints: the same rows.
    Schema,
    /// Five minimal tables, a primary key and one unique key each: what a database does for the
    /// same volume with the least indexing.
    Minimal,
}

/// Transactions per second committed by `concurrency` plain-SQL clients for `duration`, each
/// transaction writing one KCI's rows. The rows are removed afterwards.
pub async fn durable_commits_per_second(
    database_url: &str,
    rows: Rows,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
    let db = open(database_url, rows, concurrency).await?;
    let committed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let body = Arc::new("x".repeat(800));
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (db, committed, body) = (db.clone(), committed.clone(), body.clone());
            tokio::spawn(async move {
                let mut n: u64 = worker as u64;
                while Instant::now() < deadline {
                    let one = write_one(&db, rows, next_gateway_id(&mut n), &body);
                    if let Ok(Ok(())) = tokio::time::timeout(TRANSACTION_LIMIT, one).await {
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    clean_up(db, rows).await?;
    Ok(committed.load(Ordering::Relaxed) as f64 / elapsed)
}

/// The same transactions offered at a fixed `rate` for `duration` (open loop, like the
/// benchmark's fixed-rate phases), through a pool of `concurrency` connections. Each
/// transaction's latency runs from when it was due to its commit, so a wait for a connection
/// counts, as a KCI's wait for a committer does. This is the floor of the service's tail at
/// that rate: the same rows by plain SQL, without HTTP, parsing, batching or the relay.
/// Microseconds, after a [`WARM_UP`]; failed transactions are counted apart.
pub async fn latency_at_rate(
    database_url: &str,
    rows: Rows,
    concurrency: usize,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let db = open(database_url, rows, concurrency).await?;
    // Every connection opened first: the pool opens them as they are needed, one after another,
    // and the first transactions would otherwise wait for that (hundreds of ms in all).
    if db.get_database_backend() == DbBackend::Postgres {
        let opened = (0..concurrency).map(|_| db.execute_unprepared("SELECT pg_sleep(0.05)"));
        for outcome in futures_util::future::join_all(opened).await {
            outcome?;
        }
    }
    let body = Arc::new("x".repeat(800));
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let count = (duration.as_secs_f64() * rate.max(1.0)) as u32;
    let started = tokio::time::Instant::now();
    let warm_up = WARM_UP.min(duration / 2);
    let mut transactions = Vec::with_capacity(count as usize);
    let mut n: u64 = 0;
    for i in 0..count {
        let due = started + interval * i;
        tokio::time::sleep_until(due).await;
        let (db, body, gateway_id) = (db.clone(), body.clone(), next_gateway_id(&mut n));
        let measured = due >= started + warm_up;
        transactions.push(tokio::spawn(async move {
            // A database that hangs fails the transaction rather than the benchmark.
            match tokio::time::timeout(TRANSACTION_LIMIT, write_one(&db, rows, gateway_id, &body))
                .await
            {
                Ok(Ok(())) => Ok(measured.then(|| due.elapsed())),
                Ok(Err(_)) | Err(_) => Err(()),
            }
        }));
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut failed = 0;
    for transaction in transactions {
        match transaction.await? {
            Ok(Some(took)) => latency.saturating_record(took.as_micros() as u64),
            Ok(None) => {}
            Err(_) => failed += 1,
        }
    }
    clean_up(db, rows).await?;
    Ok((latency, failed))
}

/// The first second of [`latency_at_rate`] (of a phase shorter than 2 s, its first half) is not
/// measured: each connection prepares its statements on first use, and the service's fixed-rate
/// phase runs on warm connections too.
const WARM_UP: Duration = Duration::from_secs(1);

/// How long one of the ceilings' transactions may take before it counts as failed: a database
/// that hangs ends the measurement with a figure, not never.
const TRANSACTION_LIMIT: Duration = Duration::from_secs(30);

/// A pool of `concurrency` connections, with the tables `rows` writes into.
async fn open(
    database_url: &str,
    rows: Rows,
    concurrency: usize,
) -> anyhow::Result<sea_orm::DatabaseConnection> {
    let mut options = ConnectOptions::new(database_url.to_owned());
    options
        .max_connections(concurrency as u32)
        .sqlx_logging(false);
    options.map_sqlx_sqlite_opts(|sqlite| {
        use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
        sqlite
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(30))
    });
    let db = Database::connect(options).await?;
    match rows {
        Rows::Minimal => {
            let tables = if db.get_database_backend() == DbBackend::Postgres {
                POSTGRES_TABLES
            } else {
                SQLITE_TABLES
            };
            for create in tables.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                db.execute_unprepared(create).await?;
            }
        }
        Rows::Schema => {
            kci_receiver::store::migrate(&db).await?;
        }
    }
    Ok(db)
}

/// The next entity of a client's pseudo-random sequence, one of 10,000.
fn next_gateway_id(n: &mut u64) -> u64 {
    *n = n
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*n >> 33) % 10_000
}

/// One KCI's rows in one durable transaction.
async fn write_one(
    db: &sea_orm::DatabaseConnection,
    rows: Rows,
    gateway_id: u64,
    body: &str,
) -> Result<(), sea_orm::DbErr> {
    let txn = if db.get_database_backend() == DbBackend::Sqlite {
        db.begin_with_options(sea_orm::TransactionOptions {
            sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await?
    } else {
        db.begin().await?
    };
    match rows {
        Rows::Minimal => write_minimal(&txn, gateway_id, body).await?,
        Rows::Schema => write_schema(&txn, gateway_id, body).await?,
    }
    txn.commit().await
}

/// Removes what the ceiling wrote: its minimal tables, or every row of kci-receiver's tables
/// (migrations stay applied: the service starts on them next).
async fn clean_up(db: sea_orm::DatabaseConnection, rows: Rows) -> anyhow::Result<()> {
    match rows {
        Rows::Minimal => {
            for table in [
                "bench_outbox",
                "bench_transition",
                "bench_audit",
                "bench_kci",
                "bench_entity",
            ] {
                let _ = db.execute_unprepared(&format!("DROP TABLE {table}")).await;
            }
        }
        Rows::Schema => {
            let tables = "outbox_event, state_transition, audit_log, kci, tracked_entity";
            if db.get_database_backend() == DbBackend::Postgres {
                db.execute_unprepared(&format!("TRUNCATE {tables} RESTART IDENTITY CASCADE"))
                    .await?;
            } else {
                for table in tables.split(", ") {
                    db.execute_unprepared(&format!("DELETE FROM {table}"))
                        .await?;
                }
            }
        }
    }
    db.close().await?;
    Ok(())
}

fn one_row_id(row: Option<sea_orm::QueryResult>) -> Result<i64, sea_orm::DbErr> {
    row.ok_or_else(|| sea_orm::DbErr::Custom("no id returned".to_owned()))?
        .try_get::<i64>("", "id")
}

/// One KCI into the minimal tables.
async fn write_minimal(
    txn: &sea_orm::DatabaseTransaction,
    gateway_id: u64,
    body: &str,
) -> Result<(), sea_orm::DbErr> {
    let backend = txn.get_database_backend();
    let key = format!("PROVIDE_ORDER:{gateway_id}");
    let now = Utc::now();
    let snapshot = json!({"id": key, "status": "IN_PROGRESS", "padding": body[..200]});
    let payload =
        json!({"kci": body, "entity": snapshot, "correlation": {"matched": true}, "padding": body});
    let entity = one_row_id(txn
        .query_one_raw(statement(backend,
            "INSERT INTO bench_entity (key, status, seq, snapshot, updated_at) VALUES ($1, 'IN_PROGRESS', 1, $2, $3) \
             ON CONFLICT (key) DO UPDATE SET seq = bench_entity.seq + 1, status = excluded.status, snapshot = excluded.snapshot, updated_at = excluded.updated_at RETURNING id",
            vec![key.into(), snapshot.into(), now.into()]))
        .await?)?;
    let kci = one_row_id(txn
        .query_one_raw(statement(backend,
            "INSERT INTO bench_kci (kci_id, entity_id, raw_body, received_at) VALUES ($1, $2, $3, $4) RETURNING id",
            vec![uuid::Uuid::new_v4().into(), entity.into(), body.to_owned().into(), now.into()]))
        .await?)?;
    txn.execute_raw(statement(
        backend,
        "INSERT INTO bench_audit (request_id, body, status, received_at) VALUES ($1, $2, 204, $3)",
        vec![
            uuid::Uuid::new_v4().to_string().into(),
            body.to_owned().into(),
            now.into(),
        ],
    ))
    .await?;
    txn.execute_raw(statement(backend,
        "INSERT INTO bench_transition (entity_id, kci_ref, to_status, recorded_at) VALUES ($1, $2, 'IN_PROGRESS', $3)",
        vec![entity.into(), kci.into(), now.into()])).await?;
    txn.execute_raw(statement(backend,
        "INSERT INTO bench_outbox (event_id, entity_id, payload, status) VALUES ($1, $2, $3, 'PENDING')",
        vec![uuid::Uuid::new_v4().into(), entity.into(), payload.into()])).await?;
    Ok(())
}

/// One KCI into kci-receiver's own tables: the entity upserted, the KCI, its audit record, its
/// history entry and its outbox event, every column intake fills, with plain SQL.
async fn write_schema(
    txn: &sea_orm::DatabaseTransaction,
    gateway_id: u64,
    body: &str,
) -> Result<(), sea_orm::DbErr> {
    let backend = txn.get_database_backend();
    let now = Utc::now();
    let kci_id = uuid::Uuid::new_v4();
    let request_id = uuid::Uuid::new_v4().to_string();
    let conversation_id = uuid::Uuid::new_v4().to_string();
    let snapshot = json!({"id": gateway_id, "status": "IN_PROGRESS", "padding": body[..200]});
    let headers = json!({"content-type": "application/json", "x-request-id": request_id, "x-conversation-id": conversation_id});
    let payload =
        json!({"kci": body, "entity": snapshot, "correlation": {"matched": true}, "padding": body});
    let entity = one_row_id(txn
        .query_one_raw(statement(backend,
            "INSERT INTO tracked_entity (entity_type, gateway_id, supplier, supplier_reference, status, snapshot, \
             last_sequence_number, last_kci_id, last_update_type, last_reason, conversation_id, correlation, \
             conversation_ref, flag_illegal, flag_stale, flag_gap, flag_anomaly, flag_unknown_value, kci_count, \
             first_seen_at, last_kci_at, updated_at) \
             VALUES ('PROVIDE_ORDER', $1, 'FIBRECO', NULL, 'IN_PROGRESS', $2, 1, $3, 'INFORMATIONAL', 'ORDER_ACCEPTED', \
             $4, 'UNMATCHED', NULL, false, false, false, false, false, 1, $5, $5, $5) \
             ON CONFLICT (entity_type, gateway_id) DO UPDATE SET status = excluded.status, snapshot = excluded.snapshot, \
             last_sequence_number = tracked_entity.last_sequence_number + 1, last_kci_id = excluded.last_kci_id, \
             kci_count = tracked_entity.kci_count + 1, last_kci_at = excluded.last_kci_at, updated_at = excluded.updated_at \
             RETURNING id",
            vec![gateway_id.to_string().into(), snapshot.into(), kci_id.into(), conversation_id.clone().into(), now.into()]))
        .await?)?;
    let kci = one_row_id(txn
        .query_one_raw(statement(backend,
            "INSERT INTO kci (kci_id, tracked_entity_id, request_id, conversation_id, entity_type, update_type, reason, \
             sequence_number, issued_on, received_on, delivered_on, raw_body, headers, outcome, redelivery_count, \
             last_redelivered_at, anomaly_count, received_at) \
             VALUES ($1, $2, $3, $4, 'PROVIDE_ORDER', 'INFORMATIONAL', 'ORDER_ACCEPTED', 1, $5, $5, $5, $6, $7, 'APPLIED', 0, NULL, 0, $5) \
             RETURNING id",
            vec![kci_id.into(), entity.into(), request_id.clone().into(), conversation_id.clone().into(), now.into(), body.to_owned().into(), headers.clone().into()]))
        .await?)?;
    let audit = one_row_id(txn
        .query_one_raw(statement(backend,
            "INSERT INTO audit_log (request_id, conversation_id, method, path, remote_addr, principal, request_headers, \
             request_body, request_body_size, response_status, response_body, error_uuid, error_code, outcome, kci_id, \
             received_at, duration_ms) \
             VALUES ($1, $2, 'POST', '/kcis', '127.0.0.1', 'fibrecafe', $3, $4, 800, 204, NULL, NULL, NULL, 'ACCEPTED', $5, $6, 1) \
             RETURNING id",
            vec![request_id.into(), conversation_id.into(), headers.clone().into(), body.to_owned().into(), kci_id.into(), now.into()]))
        .await?)?;
    txn.execute_raw(statement(backend,
        "INSERT INTO state_transition (tracked_entity_id, kci_ref, kci_id, audit_log_id, sequence_number, \
         previous_sequence_number, from_status, to_status, applied, update_type, reason, flag_stale, flag_gap, \
         flag_illegal, flag_duplicate, flag_anomaly, flag_unknown_value, note, issued_on, received_on, delivered_on, recorded_at) \
         VALUES ($1, $2, $3, $4, 1, NULL, NULL, 'IN_PROGRESS', true, 'INFORMATIONAL', 'ORDER_ACCEPTED', \
         false, false, false, false, false, false, NULL, $5, $5, $5, $5)",
        vec![entity.into(), kci.into(), kci_id.into(), audit.into(), now.into()])).await?;
    txn.execute_raw(statement(backend,
        "INSERT INTO outbox_event (event_id, tracked_entity_id, kci_ref, routing_key, message_type, headers, payload, \
         status, attempts, next_attempt_at, last_error, created_at, published_at, publish_count) \
         VALUES ($1, $2, $3, 'kci.provide_order.informational.order_accepted', 'PROVIDE_ORDER', $4, $5, 'PENDING', 0, $6, NULL, $6, NULL, 0)",
        vec![uuid::Uuid::new_v4().into(), entity.into(), kci.into(), headers.into(), payload.into(), now.into()])).await?;
    Ok(())
}
