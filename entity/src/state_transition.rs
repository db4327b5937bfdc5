//! One entry of an entity's history: what one KCI (or one conflicting redelivery) did to it.

use sea_orm::entity::prelude::*;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, ToSchema)]
#[sea_orm(table_name = "state_transition")]
#[serde(rename_all = "camelCase")]
#[schema(as = StateTransition)]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub tracked_entity_id: i64,
    /// The `kci` row this entry is about.
    pub kci_ref: i64,
    pub kci_id: Uuid,
    /// The audit record of the delivery that produced this entry.
    pub audit_log_id: Option<i64>,
    pub sequence_number: i64,
    /// The entity's last applied sequence number before this KCI (none for its first KCI).
    pub previous_sequence_number: Option<i64>,
    /// The status before (none for the entity's first KCI).
    pub from_status: Option<String>,
    /// The status the KCI carried.
    pub to_status: String,
    /// Whether the current state moved to `to_status`.
    pub applied: bool,
    pub update_type: String,
    pub reason: String,
    pub flag_stale: bool,
    pub flag_gap: bool,
    pub flag_illegal: bool,
    pub flag_duplicate: bool,
    pub flag_anomaly: bool,
    pub flag_unknown_value: bool,
    /// Human-readable detail of the flags (which values are unknown, which fields differ, ...).
    #[sea_orm(column_type = "Text", nullable)]
    pub note: Option<String>,
    pub issued_on: Option<chrono::DateTime<chrono::Utc>>,
    pub received_on: Option<chrono::DateTime<chrono::Utc>>,
    pub delivered_on: chrono::DateTime<chrono::Utc>,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    /// How the KCI reached us: delivered by the gateway, or recovered by reconciliation.
    pub source: KciSource,
}

/// How a KCI reached kci-receiver.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, EnumIter, DeriveActiveEnum, Serialize, ToSchema,
)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum KciSource {
    /// `POST /kcis` by the gateway.
    #[default]
    #[sea_orm(string_value = "DELIVERY")]
    Delivery,
    /// Recovered from the Tenant API's `updates[]`: the gateway never delivered it.
    #[sea_orm(string_value = "RECONCILIATION")]
    Reconciliation,
}

impl KciSource {
    pub fn as_str(self) -> &'static str {
        match self {
            KciSource::Delivery => "DELIVERY",
            KciSource::Reconciliation => "RECONCILIATION",
        }
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
