//! The outbox event carries its AMQP `correlation_id` (the `X-Conversation-ID`) as a column of
//! its own, so that the relay reads it instead of parsing the stored headers. Existing rows get it
//! from their `x-conversation-id` header.

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum OutboxEvent {
    Table,
    CorrelationId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(OutboxEvent::Table)
                    .add_column(string_null(OutboxEvent::CorrelationId))
                    .to_owned(),
            )
            .await?;
        let backfill = match manager.get_database_backend() {
            sea_orm::DatabaseBackend::Postgres => {
                "UPDATE outbox_event SET correlation_id = headers->>'x-conversation-id' \
                 WHERE correlation_id IS NULL"
            }
            _ => {
                "UPDATE outbox_event SET correlation_id = \
                 json_extract(headers, '$.\"x-conversation-id\"') WHERE correlation_id IS NULL"
            }
        };
        manager
            .get_connection()
            .execute_unprepared(backfill)
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(OutboxEvent::Table)
                    .drop_column(OutboxEvent::CorrelationId)
                    .to_owned(),
            )
            .await
    }
}
