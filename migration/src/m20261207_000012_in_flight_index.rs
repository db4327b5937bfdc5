//! Stuck entities found among those in flight only (issue 17, item 5). "Stuck" is "in flight
//! and silent since a cutoff"; migration 10 indexed the entities not COMPLETED by their last
//! KCI's time, but `GET /api/v1/entities?stuckFor=` lists newest first (by id), so it walked the
//! primary key down from the newest entity, past every entity that had a KCI since the cutoff
//! and every finished one, before it had a page: 16-23 ms on the benchmark's history of 200,000
//! entities, 95 ms on the same history with 60 stuck, growing with the history
//! (docs/benchmarks.md, "Twelfth round").
//!
//! `ix_tracked_entity_in_flight` is `(id, last_kci_at)` of exactly the entities in flight: the
//! list walks it down by id and reads each entity's silence from the index, so it passes only
//! the entities in flight (the work in progress, not the history), 0.8 ms in both cases.
//! [`IN_FLIGHT_ROWS`] is the text `kci_receiver::operations::queries::in_flight_rows()` builds
//! from the lifecycles, which the queries say literally so that the planner can prove the index
//! applies; a unit test of kci-receiver keeps the two equal, so a lifecycle that gains a final
//! status needs a new migration redefining the index. It replaces
//! `ix_tracked_entity_open_last_kci_at` (attention's stuck list uses the new one): one index for
//! intake to maintain, as before, and a smaller one.
//!
//! On a large PostgreSQL database the new index can be built first by hand with
//! `CREATE INDEX CONCURRENTLY ix_tracked_entity_in_flight ON tracked_entity (id, last_kci_at) WHERE ...`
//! (the predicate below); this migration then only drops the old one.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// "In flight": each listed entity type and the statuses final in its lifecycle, as of this
/// migration.
pub const IN_FLIGHT_ROWS: &str = concat!(
    "(",
    "(entity_type = 'PROVIDE_ORDER' AND status NOT IN ('FAILED_TO_SEND', 'REJECTED', 'CANCELLED', 'COMPLETED', 'PARTIAL', 'FAILED')) OR ",
    "(entity_type = 'CEASE_ORDER' AND status NOT IN ('FAILED_TO_SEND', 'REJECTED', 'CANCELLED', 'COMPLETED', 'PARTIAL', 'FAILED')) OR ",
    "(entity_type = 'MODIFY_ORDER' AND status NOT IN ('FAILED_TO_SEND', 'REJECTED', 'CANCELLED', 'COMPLETED', 'PARTIAL', 'FAILED')) OR ",
    "(entity_type = 'UNSOLICITED_CEASE_ORDER' AND status NOT IN ('CANCELLED', 'COMPLETED')) OR ",
    "(entity_type = 'PROVIDE_ETHERNET_ORDER' AND status NOT IN ('FAILED_TO_SEND', 'REJECTED', 'CANCELLED', 'COMPLETED', 'PARTIAL', 'FAILED')) OR ",
    "(entity_type = 'SERVICE_TEST' AND status NOT IN ('FAILED_TO_SEND', 'REJECTED', 'FAILED', 'COMPLETED')) OR ",
    "(entity_type = 'SERVICE_PROBLEM' AND status NOT IN ('FAILED_TO_SEND', 'REJECTED', 'CANCELLED', 'COMPLETED'))",
    ")"
);

const OLD: &str = "ix_tracked_entity_open_last_kci_at";
const OLD_DEFINITION: &str = "tracked_entity (last_kci_at) WHERE status <> 'COMPLETED'";
const NEW: &str = "ix_tracked_entity_in_flight";

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(&format!(
            "CREATE INDEX IF NOT EXISTS {NEW} ON tracked_entity (id, last_kci_at) WHERE {IN_FLIGHT_ROWS}"
        ))
        .await?;
        db.execute_unprepared(&format!("DROP INDEX IF EXISTS {OLD}"))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        let db = manager.get_connection();
        db.execute_unprepared(&format!(
            "CREATE INDEX IF NOT EXISTS {OLD} ON {OLD_DEFINITION}"
        ))
        .await?;
        db.execute_unprepared(&format!("DROP INDEX IF EXISTS {NEW}"))
            .await?;
        Ok(())
    }
}
