//! Intake's index diet (issue 17): every KCI inserts an audit record and rewrites its entity's
//! row, and every index of those tables gets an entry each time, whether or not anyone ever asks
//! about the row. Two indexes were kept whole for questions about a few rows only:
//!
//! - `audit_log (error_uuid)`: only refused requests have an error UUID (what the gateway's
//!   operator quotes back from our error body; search finds the request by it); every accepted
//!   KCI added a NULL entry.
//! - `tracked_entity (gap_open_since)`: only entities with an open gap have one (the gap repair
//!   scheduler and attention ask for them, oldest first); every entity update added a NULL entry.
//!
//! Both become partial (`IS NOT NULL`), which the queries' own conditions (`= uuid`, `<`,
//! `IS NOT NULL`) let the planner use. Which index serves which question, and the figures:
//! docs/benchmarks.md, "Third round".
//!
//! On a large PostgreSQL database the new indexes can be built first by hand with
//! `CREATE INDEX CONCURRENTLY ix_audit_log_error_uuid_present ON audit_log (error_uuid) WHERE error_uuid IS NOT NULL`
//! (and likewise `ix_tracked_entity_gap_open` below); this migration then only drops the old ones.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (old whole index, new partial index, the new one's definition, the old one's definition).
const REPLACED: &[(&str, &str, &str, &str)] = &[
    (
        "ix_audit_log_error_uuid",
        "ix_audit_log_error_uuid_present",
        "audit_log (error_uuid) WHERE error_uuid IS NOT NULL",
        "audit_log (error_uuid)",
    ),
    (
        "ix_tracked_entity_gap_open_since",
        "ix_tracked_entity_gap_open",
        "tracked_entity (gap_open_since) WHERE gap_open_since IS NOT NULL",
        "tracked_entity (gap_open_since)",
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for (old, new, definition, _) in REPLACED {
            db.execute_unprepared(&format!("CREATE INDEX IF NOT EXISTS {new} ON {definition}"))
                .await?;
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {old}"))
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        for (old, new, _, old_definition) in REPLACED {
            db.execute_unprepared(&format!(
                "CREATE INDEX IF NOT EXISTS {old} ON {old_definition}"
            ))
            .await?;
            db.execute_unprepared(&format!("DROP INDEX IF EXISTS {new}"))
                .await?;
        }
        Ok(())
    }
}
