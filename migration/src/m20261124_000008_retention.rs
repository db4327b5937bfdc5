//! Retention: a KCI's raw body can be pruned once its entity is finished (the row, its history
//! and its outbox facts stay); `raw_body_pruned_at` says when, so that nobody mistakes the empty
//! body for what the gateway sent.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Kci {
    Table,
    RawBodyPrunedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Kci::Table)
                    .add_column(timestamp_with_time_zone_null(Kci::RawBodyPrunedAt))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(Kci::Table)
                    .drop_column(Kci::RawBodyPrunedAt)
                    .to_owned(),
            )
            .await
    }
}
