//! Database schema of kci-receiver, as sea-orm migrations.
//!
//! Migrations are written against sea-query only (not the `entity` crate) so that an old migration
//! keeps compiling after the entities move on. They run on SQLite (the embedded default) and on
//! PostgreSQL (production); `kci-receiver migrate` applies them, and `serve` applies them only when
//! `database.migrate_on_start` is true.

pub use sea_orm_migration::prelude::*;

mod m20261122_000001_intake_tables;
mod m20261122_000002_outbox_relay;
mod m20261122_000003_outbox_window_scan;
mod m20261124_000004_payload_as_text;
mod m20261124_000005_audit_attempts;
mod m20261124_000006_outbox_correlation_id;
mod m20261124_000007_reconciliation;
mod m20261124_000008_retention;
mod m20261124_000009_kci_deliveries_index;
mod m20261124_000010_attention_indexes;
mod m20261125_000011_index_diet;
mod m20261207_000012_in_flight_index;
mod m20261207_000013_lz4_bodies;

/// What migration 12's index of the entities in flight is defined by (the queries must say the
/// same).
pub use m20261207_000012_in_flight_index::IN_FLIGHT_ROWS;

/// The columns migration 13 compresses with LZ4 on PostgreSQL: (table, column).
pub use m20261207_000013_lz4_bodies::BODY_COLUMNS;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261122_000001_intake_tables::Migration),
            Box::new(m20261122_000002_outbox_relay::Migration),
            Box::new(m20261122_000003_outbox_window_scan::Migration),
            Box::new(m20261124_000004_payload_as_text::Migration),
            Box::new(m20261124_000005_audit_attempts::Migration),
            Box::new(m20261124_000006_outbox_correlation_id::Migration),
            Box::new(m20261124_000007_reconciliation::Migration),
            Box::new(m20261124_000008_retention::Migration),
            Box::new(m20261124_000009_kci_deliveries_index::Migration),
            Box::new(m20261124_000010_attention_indexes::Migration),
            Box::new(m20261125_000011_index_diet::Migration),
            Box::new(m20261207_000012_in_flight_index::Migration),
            Box::new(m20261207_000013_lz4_bodies::Migration),
        ]
    }
}
