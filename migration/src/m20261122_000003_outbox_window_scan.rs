//! The relay now finds each entity's head by scanning pending events in id order (the
//! `(status, id)` index) instead of grouping every pending event by entity: the
//! `(status, tracked_entity_id, id)` index that grouping used is dropped. Each index costs every
//! intake insert and every publish update.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum OutboxEvent {
    Table,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("ix_outbox_event_head")
                    .table(OutboxEvent::Table)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
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
}
