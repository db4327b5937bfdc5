//! The durable-commit ceiling of a database: how many transactions per second a simple client
//! commits when each writes what intake writes for one KCI (upsert the entity, insert the KCI,
//! its audit record, its transition and its outbox event), at the same concurrency. The
//! benchmark shows kci-receiver's throughput as a ratio of it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
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

/// `$1, $2` placeholders become `?` for SQLite (same order).
fn statement(backend: DbBackend, sql: &str, values: Vec<Value>) -> Statement {
    let sql = match backend {
        DbBackend::Sqlite => {
            let mut out = String::with_capacity(sql.len());
            let mut chars = sql.chars().peekable();
            while let Some(c) = chars.next() {
                if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                    while chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                        chars.next();
                    }
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

pub async fn durable_commits_per_second(
    database_url: &str,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<f64> {
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
    let backend = db.get_database_backend();
    let tables = if backend == DbBackend::Postgres {
        POSTGRES_TABLES
    } else {
        SQLITE_TABLES
    };
    for create in tables.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        db.execute_unprepared(create).await?;
    }

    let committed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + duration;
    let body = "x".repeat(800);
    let workers: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (db, committed, body) = (db.clone(), committed.clone(), body.clone());
            tokio::spawn(async move {
                let mut n: u64 = worker as u64;
                while Instant::now() < deadline {
                    n = n.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let key = format!("PROVIDE_ORDER:{}", (n >> 33) % 10_000);
                    let now = Utc::now();
                    let snapshot = json!({"id": key, "status": "IN_PROGRESS", "padding": body[..200]});
                    let payload = json!({"kci": body, "entity": snapshot, "correlation": {"matched": true}, "padding": body});
                    let outcome = async {
                        let txn = if backend == DbBackend::Sqlite {
                            db.begin_with_options(sea_orm::TransactionOptions {
                                sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                                ..Default::default()
                            })
                            .await?
                        } else {
                            db.begin().await?
                        };
                        let entity = txn
                            .query_one_raw(statement(backend,
                                "INSERT INTO bench_entity (key, status, seq, snapshot, updated_at) VALUES ($1, 'IN_PROGRESS', 1, $2, $3) \
                                 ON CONFLICT (key) DO UPDATE SET seq = bench_entity.seq + 1, status = excluded.status, snapshot = excluded.snapshot, updated_at = excluded.updated_at RETURNING id",
                                vec![key.clone().into(), snapshot.into(), now.into()]))
                            .await?
                            .ok_or_else(|| sea_orm::DbErr::Custom("no entity id".to_owned()))?
                            .try_get::<i64>("", "id")?;
                        let kci = txn
                            .query_one_raw(statement(backend,
                                "INSERT INTO bench_kci (kci_id, entity_id, raw_body, received_at) VALUES ($1, $2, $3, $4) RETURNING id",
                                vec![uuid::Uuid::new_v4().into(), entity.into(), body.clone().into(), now.into()]))
                            .await?
                            .ok_or_else(|| sea_orm::DbErr::Custom("no kci id".to_owned()))?
                            .try_get::<i64>("", "id")?;
                        txn.execute_raw(statement(backend,
                            "INSERT INTO bench_audit (request_id, body, status, received_at) VALUES ($1, $2, 204, $3)",
                            vec![uuid::Uuid::new_v4().to_string().into(), body.clone().into(), now.into()])).await?;
                        txn.execute_raw(statement(backend,
                            "INSERT INTO bench_transition (entity_id, kci_ref, to_status, recorded_at) VALUES ($1, $2, 'IN_PROGRESS', $3)",
                            vec![entity.into(), kci.into(), now.into()])).await?;
                        txn.execute_raw(statement(backend,
                            "INSERT INTO bench_outbox (event_id, entity_id, payload, status) VALUES ($1, $2, $3, 'PENDING')",
                            vec![uuid::Uuid::new_v4().into(), entity.into(), payload.into()])).await?;
                        txn.commit().await?;
                        Ok::<_, sea_orm::DbErr>(())
                    }
                    .await;
                    if outcome.is_ok() {
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
    for table in [
        "bench_outbox",
        "bench_transition",
        "bench_audit",
        "bench_kci",
        "bench_entity",
    ] {
        let _ = db.execute_unprepared(&format!("DROP TABLE {table}")).await;
    }
    db.close().await?;
    Ok(committed.load(Ordering::Relaxed) as f64 / elapsed)
}
