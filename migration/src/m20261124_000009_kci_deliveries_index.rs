//! `GET /api/v1/kcis/{kciId}` lists every delivery of the KCI from the audit log by `kci_id`,
//! which had no index: a sequential scan of the whole audit log per call (16 ms at 24k KCIs,
//! growing with what is stored). Partial: audit records without a KCI (failed authentication,
//! other routes) are not indexed. The KCI's history entries and outbox event are found through
//! the entity's existing `(tracked_entity_id, id)` indexes instead of new ones.
//!
//! On a large PostgreSQL database this takes a lock that holds audit inserts (each POST /kcis)
//! while the index builds; to avoid that, create it first by hand with
//! `CREATE INDEX CONCURRENTLY IF NOT EXISTS ix_audit_log_kci_id ON audit_log (kci_id) WHERE kci_id IS NOT NULL`
//! (this migration then finds it and does nothing).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX IF NOT EXISTS ix_audit_log_kci_id ON audit_log (kci_id) \
                 WHERE kci_id IS NOT NULL",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .get_connection()
            .execute_unprepared("DROP INDEX IF EXISTS ix_audit_log_kci_id")
            .await?;
        Ok(())
    }
}
