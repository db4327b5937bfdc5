//! Gap repair (issue 14): what reconciliation needs on the tracked entity, the source of each
//! history entry, and the log of reconciliations.
//!
//! - `tracked_entity.missing_sequences`: the sequence numbers not recorded yet, as ranges
//!   (`3-4,7`), kept by intake; `gap_open_since`: since when that set has been non-empty (the
//!   scheduler waits `reconcile.gap_grace_seconds` after it). The `reconcile_*` columns: the last
//!   outcome and the back-off after a failure.
//! - `state_transition.source`: `DELIVERY` (the gateway POSTed it) or `RECONCILIATION` (recovered
//!   from the Tenant API's `updates[]`).
//! - `reconciliation`: one row per attempt. A row `RUNNING` is a lease: the partial unique index
//!   lets one instance at a time reconcile an entity; a lease whose `lease_until` passed (its
//!   instance died) is taken over.
//!
//! Indexes for the scheduler's questions: open gaps by age, whether a gateway id was reconciled
//! lately, original requests by age (an order whose every KCI was lost is known only by its
//! request).
//!
//! Entities that carried a gap before this migration get `gap_open_since` (their missing set is
//! unknown: reconciliation finds out).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// (name, table, columns), each for a question the scheduler or the attention list asks.
const INDEXES: &[(&str, &str, &[&str])] = &[
    // Open gaps, oldest first.
    (
        "ix_tracked_entity_gap_open_since",
        "tracked_entity",
        &["gap_open_since"],
    ),
    // An entity's reconciliations, newest first.
    (
        "ix_reconciliation_entity",
        "reconciliation",
        &["tracked_entity_id", "id"],
    ),
    // Recent reconciliations (attention).
    (
        "ix_reconciliation_started_at",
        "reconciliation",
        &["started_at"],
    ),
    // Was this gateway id reconciled lately?
    (
        "ix_reconciliation_gateway_id",
        "reconciliation",
        &["gateway_id", "started_at"],
    ),
    // Original requests of the last few periods whose entity never sent a KCI.
    (
        "ix_conversation_registered_at",
        "conversation",
        &["registered_at"],
    ),
];

#[derive(DeriveIden)]
enum TrackedEntity {
    Table,
    MissingSequences,
    GapOpenSince,
    ReconcileStatus,
    ReconciledAt,
    ReconcileAttempts,
    ReconcileNextAt,
}

#[derive(DeriveIden)]
enum StateTransition {
    Table,
    Source,
}

#[derive(DeriveIden)]
enum Reconciliation {
    Table,
    Id,
    Resource,
    GatewayId,
    EntityType,
    TrackedEntityId,
    Trigger,
    Outcome,
    Recovered,
    Unusable,
    MissingBefore,
    RequestId,
    GatewayStatus,
    Detail,
    UnusableUpdates,
    RequestedBy,
    StartedAt,
    FinishedAt,
    LeaseUntil,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // SQLite adds one column per ALTER TABLE.
        for column in [
            text_null(TrackedEntity::MissingSequences),
            timestamp_with_time_zone_null(TrackedEntity::GapOpenSince),
            string_null(TrackedEntity::ReconcileStatus),
            timestamp_with_time_zone_null(TrackedEntity::ReconciledAt),
            integer(TrackedEntity::ReconcileAttempts)
                .default(0)
                .to_owned(),
            timestamp_with_time_zone_null(TrackedEntity::ReconcileNextAt),
        ] {
            let mut column = column;
            manager
                .alter_table(
                    Table::alter()
                        .table(TrackedEntity::Table)
                        .add_column(&mut column)
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(StateTransition::Table)
                    .add_column(string(StateTransition::Source).default("DELIVERY"))
                    .to_owned(),
            )
            .await?;
        manager
            .get_connection()
            .execute_unprepared(
                "UPDATE tracked_entity SET gap_open_since = last_kci_at WHERE flag_gap = true",
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Reconciliation::Table)
                    .col(big_pk_auto(Reconciliation::Id))
                    .col(string(Reconciliation::Resource))
                    .col(string(Reconciliation::GatewayId))
                    .col(string_null(Reconciliation::EntityType))
                    .col(big_integer_null(Reconciliation::TrackedEntityId))
                    .col(string(Reconciliation::Trigger))
                    .col(string(Reconciliation::Outcome))
                    .col(integer(Reconciliation::Recovered).default(0))
                    .col(integer(Reconciliation::Unusable).default(0))
                    .col(text_null(Reconciliation::MissingBefore))
                    .col(string_null(Reconciliation::RequestId))
                    .col(integer_null(Reconciliation::GatewayStatus))
                    .col(text_null(Reconciliation::Detail))
                    .col(text_null(Reconciliation::UnusableUpdates))
                    .col(string_null(Reconciliation::RequestedBy))
                    .col(timestamp_with_time_zone(Reconciliation::StartedAt))
                    .col(timestamp_with_time_zone_null(Reconciliation::FinishedAt))
                    .col(timestamp_with_time_zone_null(Reconciliation::LeaseUntil))
                    .to_owned(),
            )
            .await?;
        for (name, table, columns) in INDEXES {
            let mut index = Index::create();
            index.name(*name).table(Alias::new(*table));
            for column in *columns {
                index.col(Alias::new(*column));
            }
            manager.create_index(index.to_owned()).await?;
        }
        // One running reconciliation per entity (both databases know partial indexes).
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE UNIQUE INDEX ux_reconciliation_running ON reconciliation \
                 (resource, gateway_id) WHERE outcome = 'RUNNING'",
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Reconciliation::Table).to_owned())
            .await?;
        // The reconciliation table's own indexes went with it.
        for (name, table, _) in INDEXES.iter().filter(|(_, t, _)| *t != "reconciliation") {
            manager
                .drop_index(
                    Index::drop()
                        .name(*name)
                        .table(Alias::new(*table))
                        .to_owned(),
                )
                .await?;
        }
        manager
            .alter_table(
                Table::alter()
                    .table(StateTransition::Table)
                    .drop_column(StateTransition::Source)
                    .to_owned(),
            )
            .await?;
        for column in [
            TrackedEntity::MissingSequences,
            TrackedEntity::GapOpenSince,
            TrackedEntity::ReconcileStatus,
            TrackedEntity::ReconciledAt,
            TrackedEntity::ReconcileAttempts,
            TrackedEntity::ReconcileNextAt,
        ] {
            manager
                .alter_table(
                    Table::alter()
                        .table(TrackedEntity::Table)
                        .drop_column(column)
                        .to_owned(),
                )
                .await?;
        }
        Ok(())
    }
}
