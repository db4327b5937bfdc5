//! Indexes for the questions "what needs attention" and "search" ask, measured with
//! `kci-tools bench-reads` on a history of 1,000,000 KCIs (docs/benchmarks.md): without them,
//! `GET /api/v1/attention` scanned `tracked_entity` and `state_transition` whole, several times
//! per call (6.3 s at p50 under 16 readers), and a search by supplier reference scanned
//! `tracked_entity`.
//!
//! All partial: each holds only the rows its question is about, which are few in a healthy
//! estate (waiting on the CP, unmatched, in flight, anomalies, with a supplier reference), so
//! intake pays for an entry only when a row is one of them.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (name, table, definition). The `WHERE` clauses are written exactly as the queries in
/// `src/operations/queries.rs` say them, so that the planner can prove they apply.
const INDEXES: &[(&str, &str)] = &[
    // Waiting on us, longest first.
    (
        "ix_tracked_entity_action_required",
        "tracked_entity (last_kci_at) WHERE last_update_type = 'ACTION_REQUIRED'",
    ),
    // Unmatched, newest first.
    (
        "ix_tracked_entity_unmatched",
        "tracked_entity (id) WHERE correlation = 'UNMATCHED'",
    ),
    // Stuck: in flight (COMPLETED is final in every lifecycle), oldest KCI first.
    (
        "ix_tracked_entity_open_last_kci_at",
        "tracked_entity (last_kci_at) WHERE status <> 'COMPLETED'",
    ),
    // Search by supplier reference.
    (
        "ix_tracked_entity_supplier_reference",
        "tracked_entity (supplier_reference) WHERE supplier_reference IS NOT NULL",
    ),
    // Recent anomalies and illegal transitions, newest first.
    (
        "ix_state_transition_anomalies",
        "state_transition (id) WHERE flag_anomaly = true OR flag_illegal = true",
    ),
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, definition) in INDEXES {
            manager
                .get_connection()
                .execute_unprepared(&format!(
                    "CREATE INDEX IF NOT EXISTS {name} ON {definition}"
                ))
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for (name, _) in INDEXES {
            manager
                .get_connection()
                .execute_unprepared(&format!("DROP INDEX IF EXISTS {name}"))
                .await?;
        }
        Ok(())
    }
}
