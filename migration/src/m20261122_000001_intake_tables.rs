//! The tables of KCI intake (design.md, "The flow of one KCI", steps 1-3 and 5): original requests,
//! tracked entities, KCIs, their state history, the outbox and the audit log.

#![allow(
    clippy::enum_variant_names,
    reason = "identifier enums name the columns: conversation.conversation_id, kci.kci_id"
)]

use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Conversation {
    Table,
    Id,
    ConversationId,
    RequestId,
    Operation,
    EntityType,
    GatewayId,
    RequestBody,
    ResponseStatus,
    Source,
    RegisteredAt,
}

#[derive(DeriveIden)]
enum TrackedEntity {
    Table,
    Id,
    EntityType,
    GatewayId,
    Supplier,
    SupplierReference,
    Status,
    Snapshot,
    LastSequenceNumber,
    LastKciId,
    LastUpdateType,
    LastReason,
    ConversationId,
    Correlation,
    ConversationRef,
    FlagIllegal,
    FlagStale,
    FlagGap,
    FlagAnomaly,
    FlagUnknownValue,
    KciCount,
    FirstSeenAt,
    LastKciAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Kci {
    Table,
    Id,
    KciId,
    TrackedEntityId,
    RequestId,
    ConversationId,
    EntityType,
    UpdateType,
    Reason,
    SequenceNumber,
    IssuedOn,
    ReceivedOn,
    DeliveredOn,
    RawBody,
    Headers,
    Outcome,
    RedeliveryCount,
    LastRedeliveredAt,
    AnomalyCount,
    ReceivedAt,
}

#[derive(DeriveIden)]
enum StateTransition {
    Table,
    Id,
    TrackedEntityId,
    KciRef,
    KciId,
    AuditLogId,
    SequenceNumber,
    PreviousSequenceNumber,
    FromStatus,
    ToStatus,
    Applied,
    UpdateType,
    Reason,
    FlagStale,
    FlagGap,
    FlagIllegal,
    FlagDuplicate,
    FlagAnomaly,
    FlagUnknownValue,
    Note,
    IssuedOn,
    ReceivedOn,
    DeliveredOn,
    RecordedAt,
}

#[derive(DeriveIden)]
enum OutboxEvent {
    Table,
    Id,
    EventId,
    TrackedEntityId,
    KciRef,
    RoutingKey,
    MessageType,
    Headers,
    Payload,
    Status,
    Attempts,
    NextAttemptAt,
    LastError,
    CreatedAt,
    PublishedAt,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    RequestId,
    ConversationId,
    Method,
    Path,
    RemoteAddr,
    Principal,
    RequestHeaders,
    RequestBody,
    RequestBodySize,
    ResponseStatus,
    ResponseBody,
    ErrorUuid,
    ErrorCode,
    Outcome,
    KciId,
    ReceivedAt,
    DurationMs,
}

fn index(name: &str, table: impl IntoIden, columns: &[&'static str]) -> IndexCreateStatement {
    let mut statement = Index::create();
    statement.name(name).table(table);
    for column in columns {
        statement.col(Alias::new(*column));
    }
    statement.to_owned()
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Conversation::Table)
                    .col(big_pk_auto(Conversation::Id))
                    .col(string_uniq(Conversation::ConversationId))
                    .col(string_null(Conversation::RequestId))
                    .col(string(Conversation::Operation))
                    .col(string_null(Conversation::EntityType))
                    .col(string_null(Conversation::GatewayId))
                    .col(json_binary_null(Conversation::RequestBody))
                    .col(integer_null(Conversation::ResponseStatus))
                    .col(string(Conversation::Source))
                    .col(timestamp_with_time_zone(Conversation::RegisteredAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(TrackedEntity::Table)
                    .col(big_pk_auto(TrackedEntity::Id))
                    .col(string(TrackedEntity::EntityType))
                    .col(string(TrackedEntity::GatewayId))
                    .col(string(TrackedEntity::Supplier))
                    .col(string_null(TrackedEntity::SupplierReference))
                    .col(string(TrackedEntity::Status))
                    .col(json_binary(TrackedEntity::Snapshot))
                    .col(big_integer(TrackedEntity::LastSequenceNumber))
                    .col(uuid(TrackedEntity::LastKciId))
                    .col(string(TrackedEntity::LastUpdateType))
                    .col(string(TrackedEntity::LastReason))
                    .col(string(TrackedEntity::ConversationId))
                    .col(string(TrackedEntity::Correlation))
                    .col(big_integer_null(TrackedEntity::ConversationRef))
                    .col(boolean(TrackedEntity::FlagIllegal).default(false))
                    .col(boolean(TrackedEntity::FlagStale).default(false))
                    .col(boolean(TrackedEntity::FlagGap).default(false))
                    .col(boolean(TrackedEntity::FlagAnomaly).default(false))
                    .col(boolean(TrackedEntity::FlagUnknownValue).default(false))
                    .col(big_integer(TrackedEntity::KciCount).default(0))
                    .col(timestamp_with_time_zone(TrackedEntity::FirstSeenAt))
                    .col(timestamp_with_time_zone(TrackedEntity::LastKciAt))
                    .col(timestamp_with_time_zone(TrackedEntity::UpdatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_tracked_entity_conversation")
                            .from(TrackedEntity::Table, TrackedEntity::ConversationRef)
                            .to(Conversation::Table, Conversation::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                index(
                    "ux_tracked_entity_key",
                    TrackedEntity::Table,
                    &["entity_type", "gateway_id"],
                )
                .unique()
                .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_tracked_entity_conversation",
                TrackedEntity::Table,
                &["conversation_id"],
            ))
            .await?;
        manager
            .create_index(index(
                "ix_tracked_entity_status",
                TrackedEntity::Table,
                &["status"],
            ))
            .await?;
        manager
            .create_index(index(
                "ix_tracked_entity_last_kci_at",
                TrackedEntity::Table,
                &["last_kci_at"],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Kci::Table)
                    .col(big_pk_auto(Kci::Id))
                    .col(uuid_uniq(Kci::KciId))
                    .col(big_integer(Kci::TrackedEntityId))
                    .col(string(Kci::RequestId))
                    .col(string(Kci::ConversationId))
                    .col(string(Kci::EntityType))
                    .col(string(Kci::UpdateType))
                    .col(string(Kci::Reason))
                    .col(big_integer(Kci::SequenceNumber))
                    .col(timestamp_with_time_zone_null(Kci::IssuedOn))
                    .col(timestamp_with_time_zone_null(Kci::ReceivedOn))
                    .col(timestamp_with_time_zone(Kci::DeliveredOn))
                    .col(text(Kci::RawBody))
                    .col(json_binary(Kci::Headers))
                    .col(string(Kci::Outcome))
                    .col(integer(Kci::RedeliveryCount).default(0))
                    .col(timestamp_with_time_zone_null(Kci::LastRedeliveredAt))
                    .col(integer(Kci::AnomalyCount).default(0))
                    .col(timestamp_with_time_zone(Kci::ReceivedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_kci_tracked_entity")
                            .from(Kci::Table, Kci::TrackedEntityId)
                            .to(TrackedEntity::Table, TrackedEntity::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_kci_entity",
                Kci::Table,
                &["tracked_entity_id", "id"],
            ))
            .await?;
        manager
            .create_index(index(
                "ix_kci_conversation",
                Kci::Table,
                &["conversation_id"],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(StateTransition::Table)
                    .col(big_pk_auto(StateTransition::Id))
                    .col(big_integer(StateTransition::TrackedEntityId))
                    .col(big_integer(StateTransition::KciRef))
                    .col(uuid(StateTransition::KciId))
                    .col(big_integer_null(StateTransition::AuditLogId))
                    .col(big_integer(StateTransition::SequenceNumber))
                    .col(big_integer_null(StateTransition::PreviousSequenceNumber))
                    .col(string_null(StateTransition::FromStatus))
                    .col(string(StateTransition::ToStatus))
                    .col(boolean(StateTransition::Applied))
                    .col(string(StateTransition::UpdateType))
                    .col(string(StateTransition::Reason))
                    .col(boolean(StateTransition::FlagStale).default(false))
                    .col(boolean(StateTransition::FlagGap).default(false))
                    .col(boolean(StateTransition::FlagIllegal).default(false))
                    .col(boolean(StateTransition::FlagDuplicate).default(false))
                    .col(boolean(StateTransition::FlagAnomaly).default(false))
                    .col(boolean(StateTransition::FlagUnknownValue).default(false))
                    .col(text_null(StateTransition::Note))
                    .col(timestamp_with_time_zone_null(StateTransition::IssuedOn))
                    .col(timestamp_with_time_zone_null(StateTransition::ReceivedOn))
                    .col(timestamp_with_time_zone(StateTransition::DeliveredOn))
                    .col(timestamp_with_time_zone(StateTransition::RecordedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_state_transition_entity")
                            .from(StateTransition::Table, StateTransition::TrackedEntityId)
                            .to(TrackedEntity::Table, TrackedEntity::Id),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_state_transition_kci")
                            .from(StateTransition::Table, StateTransition::KciRef)
                            .to(Kci::Table, Kci::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_state_transition_entity",
                StateTransition::Table,
                &["tracked_entity_id", "id"],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(OutboxEvent::Table)
                    .col(big_pk_auto(OutboxEvent::Id))
                    .col(uuid_uniq(OutboxEvent::EventId))
                    .col(big_integer(OutboxEvent::TrackedEntityId))
                    .col(big_integer(OutboxEvent::KciRef))
                    .col(string(OutboxEvent::RoutingKey))
                    .col(string(OutboxEvent::MessageType))
                    .col(json_binary(OutboxEvent::Headers))
                    .col(json_binary(OutboxEvent::Payload))
                    .col(string(OutboxEvent::Status))
                    .col(integer(OutboxEvent::Attempts).default(0))
                    .col(timestamp_with_time_zone(OutboxEvent::NextAttemptAt))
                    .col(text_null(OutboxEvent::LastError))
                    .col(timestamp_with_time_zone(OutboxEvent::CreatedAt))
                    .col(timestamp_with_time_zone_null(OutboxEvent::PublishedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_outbox_event_entity")
                            .from(OutboxEvent::Table, OutboxEvent::TrackedEntityId)
                            .to(TrackedEntity::Table, TrackedEntity::Id),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .name("fk_outbox_event_kci")
                            .from(OutboxEvent::Table, OutboxEvent::KciRef)
                            .to(Kci::Table, Kci::Id),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_outbox_event_status",
                OutboxEvent::Table,
                &["status", "id"],
            ))
            .await?;
        manager
            .create_index(index(
                "ix_outbox_event_entity",
                OutboxEvent::Table,
                &["tracked_entity_id", "id"],
            ))
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(AuditLog::Table)
                    .col(big_pk_auto(AuditLog::Id))
                    .col(string_null(AuditLog::RequestId))
                    .col(string_null(AuditLog::ConversationId))
                    .col(string(AuditLog::Method))
                    .col(string(AuditLog::Path))
                    .col(string_null(AuditLog::RemoteAddr))
                    .col(string_null(AuditLog::Principal))
                    .col(json_binary(AuditLog::RequestHeaders))
                    .col(text_null(AuditLog::RequestBody))
                    .col(big_integer(AuditLog::RequestBodySize))
                    .col(integer(AuditLog::ResponseStatus))
                    .col(text_null(AuditLog::ResponseBody))
                    .col(uuid_null(AuditLog::ErrorUuid))
                    .col(string_null(AuditLog::ErrorCode))
                    .col(string(AuditLog::Outcome))
                    .col(uuid_null(AuditLog::KciId))
                    .col(timestamp_with_time_zone(AuditLog::ReceivedAt))
                    .col(big_integer(AuditLog::DurationMs))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(index(
                "ix_audit_log_request_id",
                AuditLog::Table,
                &["request_id"],
            ))
            .await?;
        manager
            .create_index(index(
                "ix_audit_log_error_uuid",
                AuditLog::Table,
                &["error_uuid"],
            ))
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            AuditLog::Table.into_iden(),
            OutboxEvent::Table.into_iden(),
            StateTransition::Table.into_iden(),
            Kci::Table.into_iden(),
            TrackedEntity::Table.into_iden(),
            Conversation::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}
