//! What the outbox relay needs: finding each entity's oldest pending event fast, and counting how
//! often an event was published (replays and at-least-once re-publishes).

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum OutboxEvent {
    Table,
    PublishCount,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(OutboxEvent::Table)
                    .add_column(integer(OutboxEvent::PublishCount).default(0))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("ix_outbox_event_head")
                    .table(OutboxEvent::Table)
                    .col(Alias::new("status"))
                    .col(Alias::new("tracked_entity_id"))
                    .col(Alias::new("id"))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ix_outbox_event_head")
                    .table(OutboxEvent::Table)
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(OutboxEvent::Table)
                    .drop_column(OutboxEvent::PublishCount)
                    .to_owned(),
            )
            .await
    }
}
