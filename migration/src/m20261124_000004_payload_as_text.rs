//! The outbox payload becomes text: the envelope is stored exactly as it is published, so the KCI
//! inside it stays byte for byte what the gateway sent. PostgreSQL's `jsonb` refused a KCI with
//! `\u0000` in any string (the whole KCI failed with it) and does not keep the text as sent.
//! SQLite already stores JSON as text: nothing changes there.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE outbox_event ALTER COLUMN payload TYPE text USING payload::text",
                )
                .await?;
        }
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() == DbBackend::Postgres {
            manager
                .get_connection()
                .execute_unprepared(
                    "ALTER TABLE outbox_event ALTER COLUMN payload TYPE jsonb USING payload::jsonb",
                )
                .await?;
        }
        Ok(())
    }
}
