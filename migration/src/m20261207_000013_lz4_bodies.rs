//! PostgreSQL: the columns that hold bodies are compressed with LZ4 instead of pglz.
//!
//! PostgreSQL compresses a value when its row would pass about 2 KB. An outbox event (the
//! envelope, 1.6 KB in the benchmark, beside its headers) always does, so every KCI's event was
//! compressed by pglz at intake and decompressed by every relay round that read it: `pglz_compress`
//! and `pglz_decompress` were PostgreSQL's busiest functions of its own in a drain. On the
//! benchmark's events, inserting 12,595 of them took 355-449 ms with pglz and 175-195 ms with LZ4
//! (`EXPLAIN ANALYZE`), reading them back 75-87 against 57-65 ms, for 3% more space
//! (docs/benchmarks.md, "Thirteenth round"). KCI bodies, audit records and snapshots pass the
//! threshold only when large, and then gain the same.
//!
//! Only the method for new values changes (values stored before stay pglz, and both read back
//! alike); no table is rewritten. A server without LZ4 (built without it, or before PostgreSQL
//! 14) keeps pglz: the migration then changes nothing. SQLite does not compress.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (table, column): every column that holds a body, a snapshot or headers.
pub const BODY_COLUMNS: &[(&str, &str)] = &[
    ("outbox_event", "payload"),
    ("outbox_event", "headers"),
    ("kci", "raw_body"),
    ("kci", "headers"),
    ("audit_log", "request_body"),
    ("audit_log", "response_body"),
    ("audit_log", "request_headers"),
    ("conversation", "request_body"),
    ("tracked_entity", "snapshot"),
];

/// Sets `method` on every body column, if the server offers LZ4 (PostgreSQL only).
async fn set_compression(manager: &SchemaManager<'_>, method: &str) -> Result<(), DbErr> {
    if manager.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(());
    }
    let alters: String = BODY_COLUMNS
        .iter()
        .map(|(table, column)| {
            format!("ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method};\n")
        })
        .collect();
    manager
        .get_connection()
        .execute_unprepared(&format!(
            "DO $$ BEGIN
               IF EXISTS (SELECT 1 FROM pg_settings
                          WHERE name = 'default_toast_compression' AND 'lz4' = ANY(enumvals)) THEN
                 {alters}
               END IF;
             END $$"
        ))
        .await?;
    Ok(())
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        set_compression(manager, "lz4").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        set_compression(manager, "DEFAULT").await
    }
}
