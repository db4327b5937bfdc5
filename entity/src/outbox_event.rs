//! One event waiting to be (or already) published to RabbitMQ: the transactional outbox.

use sea_orm::entity::prelude::*;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, ToSchema)]
#[sea_orm(table_name = "outbox_event")]
#[serde(rename_all = "camelCase")]
#[schema(as = OutboxEvent)]
pub struct Model {
    /// Insertion order: per entity, events are published in this order.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The AMQP `message_id`, stable across re-publishes so consumers can de-duplicate.
    #[sea_orm(unique)]
    pub event_id: Uuid,
    pub tracked_entity_id: i64,
    pub kci_ref: i64,
    /// `kci.<entity_type>.<update_type>.<reason>`, lower case.
    pub routing_key: String,
    /// The AMQP `type` property: the entity type.
    pub message_type: String,
    /// AMQP headers, as a JSON object of strings and numbers.
    #[sea_orm(column_type = "JsonBinary")]
    #[schema(value_type = Object)]
    pub headers: Json,
    /// The message body, the envelope of design.md's AMQP contract, as published: JSON text,
    /// kept as text so that the KCI inside it stays byte for byte what the gateway sent
    /// (PostgreSQL's `jsonb` would refuse `\u0000` and reorder keys). Shown as the JSON object
    /// it is.
    #[sea_orm(column_type = "Text")]
    #[serde(serialize_with = "crate::as_raw_json")]
    #[schema(value_type = Object)]
    pub payload: String,
    pub status: OutboxStatus,
    pub attempts: i32,
    pub next_attempt_at: chrono::DateTime<chrono::Utc>,
    #[sea_orm(column_type = "Text", nullable)]
    pub last_error: Option<String>,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub published_at: Option<chrono::DateTime<chrono::Utc>>,
    /// How many times the broker confirmed this event (more than 1 after a replay, or after a
    /// relay died between the broker's confirm and its own commit).
    pub publish_count: i32,
    /// The AMQP `correlation_id`: the KCI's `X-Conversation-ID` (bounded as its header is).
    /// Empty only for rows written before the column existed with no such header.
    pub correlation_id: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum, Serialize, ToSchema)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboxStatus {
    #[sea_orm(string_value = "PENDING")]
    Pending,
    #[sea_orm(string_value = "PUBLISHED")]
    Published,
    /// Given up after the configured number of attempts; retryable by an operator. Its
    /// entity's later events wait behind it.
    #[sea_orm(string_value = "DEAD")]
    Dead,
    /// A dead event an operator chose not to publish, so that its entity's later events go on
    /// (who and why is in `last_error`). Published again only by a replay.
    #[sea_orm(string_value = "SKIPPED")]
    Skipped,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
