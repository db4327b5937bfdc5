//! One KCI as first accepted, keyed by its `id` (the permanent idempotency key).

use sea_orm::entity::prelude::*;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, ToSchema)]
#[sea_orm(table_name = "kci")]
#[serde(rename_all = "camelCase")]
#[schema(as = Kci)]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub kci_id: Uuid,
    pub tracked_entity_id: i64,
    /// `X-Request-ID` of the delivery that was accepted first.
    pub request_id: String,
    pub conversation_id: String,
    pub entity_type: String,
    pub update_type: String,
    /// `information.type`, `action.type` or `error.code`, by update type.
    pub reason: String,
    pub sequence_number: i64,
    pub issued_on: Option<chrono::DateTime<chrono::Utc>>,
    pub received_on: Option<chrono::DateTime<chrono::Utc>>,
    pub delivered_on: chrono::DateTime<chrono::Utc>,
    /// The body exactly as received.
    #[sea_orm(column_type = "Text")]
    pub raw_body: String,
    /// The request headers, credentials removed.
    #[sea_orm(column_type = "JsonBinary")]
    #[schema(value_type = Object)]
    pub headers: Json,
    pub outcome: KciOutcome,
    /// Identical redeliveries answered 204 without any change.
    pub redelivery_count: i32,
    pub last_redelivered_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Redeliveries of this `id` whose content differed: recorded as anomalies, not applied.
    pub anomaly_count: i32,
    pub received_at: chrono::DateTime<chrono::Utc>,
    /// When retention emptied `raw_body` (its entity had finished long before); none while the
    /// body is kept.
    pub raw_body_pruned_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What processing did with a KCI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum, Serialize, ToSchema)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KciOutcome {
    /// Newer than what we held: it moved the current state.
    #[sea_orm(string_value = "APPLIED")]
    Applied,
    /// Older than the KCI already applied: recorded in history, state unchanged.
    #[sea_orm(string_value = "STALE")]
    Stale,
    /// Same sequence number as the KCI already applied, but another KCI id: recorded, not applied.
    #[sea_orm(string_value = "DUPLICATE_SEQUENCE")]
    DuplicateSequence,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
