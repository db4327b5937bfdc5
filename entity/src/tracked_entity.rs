//! An order, service test or service problem, keyed by (entity type, gateway id), with its current
//! state. Its history is in `state_transition`.

use sea_orm::entity::prelude::*;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, ToSchema)]
#[sea_orm(table_name = "tracked_entity")]
#[serde(rename_all = "camelCase")]
#[schema(as = TrackedEntity)]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The KCI `entityType`, e.g. `PROVIDE_ORDER`.
    pub entity_type: String,
    /// `entity.id` as the gateway numbers it, kept as text.
    pub gateway_id: String,
    pub supplier: String,
    /// The supplier's own reference (`supplierOrderNumber`, `supplierIdentifier` or
    /// `supplierReference`, by entity type), once the supplier gave one.
    pub supplier_reference: Option<String>,
    /// `entity.status` of the newest applied KCI.
    pub status: String,
    /// `entity` of the newest applied KCI: every KCI carries the full latest snapshot.
    #[sea_orm(column_type = "JsonBinary")]
    #[schema(value_type = Object)]
    pub snapshot: Json,
    pub last_sequence_number: i64,
    pub last_kci_id: Uuid,
    pub last_update_type: String,
    pub last_reason: String,
    /// The `X-Conversation-ID` of the first KCI about this entity.
    pub conversation_id: String,
    pub correlation: Correlation,
    /// The original request this entity was matched to.
    pub conversation_ref: Option<i64>,
    pub flag_illegal: bool,
    pub flag_stale: bool,
    pub flag_gap: bool,
    pub flag_anomaly: bool,
    pub flag_unknown_value: bool,
    /// KCIs recorded for this entity (redeliveries are counted on the KCI, not here).
    pub kci_count: i64,
    /// Sequence numbers below the last applied one that no KCI has brought yet, as ranges
    /// (`3-4,7`); none when the history is complete (or, for entities older than gap repair,
    /// unknown while `gap_open_since` is set).
    #[sea_orm(column_type = "Text", nullable)]
    pub missing_sequences: Option<String>,
    /// Since when KCIs have been missing: reconciliation waits `reconcile.gap_grace_seconds`
    /// after it (the missing KCI is often just late).
    pub gap_open_since: Option<chrono::DateTime<chrono::Utc>>,
    /// The last reconciliation's outcome (`RECOVERED`, `IN_SYNC`, `DIFFERS`, `NOT_FOUND`,
    /// `FAILED`).
    pub reconcile_status: Option<String>,
    pub reconciled_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Reconciliations that failed in a row (reset by one that got an answer).
    pub reconcile_attempts: i32,
    /// No automatic reconciliation before this (back-off after a failure, `Retry-After`).
    pub reconcile_next_at: Option<chrono::DateTime<chrono::Utc>>,
    pub first_seen_at: chrono::DateTime<chrono::Utc>,
    /// When the newest KCI about this entity arrived, applied or not ("stuck" is measured from it).
    pub last_kci_at: chrono::DateTime<chrono::Utc>,
    /// When the current state was last applied.
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Whether the entity is linked to the original request that started it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum, Serialize, ToSchema)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Correlation {
    /// Linked to a registered original request.
    #[sea_orm(string_value = "MATCHED")]
    Matched,
    /// Its conversation is not (yet) known: registering the request later matches it.
    #[sea_orm(string_value = "UNMATCHED")]
    Unmatched,
    /// An unsolicited cease: the gateway created it, no request of ours started it.
    #[sea_orm(string_value = "UNSOLICITED")]
    Unsolicited,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
