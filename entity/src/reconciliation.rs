//! One reconciliation of an entity with the Tenant API's `GET` of it (gap repair): what started
//! it, what the gateway answered, what was recovered. A row `RUNNING` is also the lease that keeps
//! other instances off the same entity.

use sea_orm::entity::prelude::*;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, ToSchema)]
#[sea_orm(table_name = "reconciliation")]
#[serde(rename_all = "camelCase")]
#[schema(as = Reconciliation)]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The Tenant API resource asked: `service-orders`, `ethernet/service-orders`,
    /// `service-tests` or `service-problems`.
    pub resource: String,
    pub gateway_id: String,
    /// The entity type, when the entity was known here.
    pub entity_type: Option<String>,
    pub tracked_entity_id: Option<i64>,
    pub trigger: ReconcileTrigger,
    pub outcome: ReconcileOutcome,
    /// KCIs recorded from `updates[]` that had never been delivered.
    pub recovered: i32,
    /// Items of `updates[]` that do not carry what a KCI needs (kept in `unusableUpdates`).
    pub unusable: i32,
    /// The sequence numbers missing when it started (`3-4,7`).
    #[sea_orm(column_type = "Text", nullable)]
    pub missing_before: Option<String>,
    /// `X-Request-ID` of the `GET` sent to the Tenant API (and of the recovered KCIs).
    pub request_id: Option<String>,
    /// The Tenant API's HTTP status, when it answered.
    pub gateway_status: Option<i32>,
    /// In words: what differs, what failed (with the gateway's error body), what the gateway
    /// does not have.
    #[sea_orm(column_type = "Text", nullable)]
    pub detail: Option<String>,
    /// The unusable items of `updates[]`, as JSON text: `[{"index", "problem", "raw"}]`.
    #[sea_orm(column_type = "Text", nullable)]
    pub unusable_updates: Option<String>,
    /// Who asked for it (an operator, `cli`), for on-demand reconciliations.
    pub requested_by: Option<String>,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
    /// While `RUNNING`: the lease's end; past it, another instance may take over.
    pub lease_until: Option<chrono::DateTime<chrono::Utc>>,
}

/// What started a reconciliation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum, Serialize, ToSchema)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReconcileTrigger {
    /// A gap open for longer than `reconcile.gap_grace_seconds`.
    #[sea_orm(string_value = "GAP")]
    Gap,
    /// In flight and no KCI for longer than `reconcile.stuck_after_seconds`.
    #[sea_orm(string_value = "STUCK")]
    Stuck,
    /// `POST /api/v1/{path}/{id}/reconcile` or `kci-receiver reconcile`.
    #[sea_orm(string_value = "ON_DEMAND")]
    OnDemand,
}

/// How a reconciliation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum, Serialize, ToSchema)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ReconcileOutcome {
    /// Under way (the lease).
    #[sea_orm(string_value = "RUNNING")]
    Running,
    /// Missing KCIs were recorded from `updates[]`.
    #[sea_orm(string_value = "RECOVERED")]
    Recovered,
    /// Everything the gateway has was recorded already, and the states agree.
    #[sea_orm(string_value = "IN_SYNC")]
    InSync,
    /// No KCI is missing, but the gateway's entity says otherwise than ours (flagged, not
    /// overwritten), or some updates could not be used.
    #[sea_orm(string_value = "DIFFERS")]
    Differs,
    /// The gateway does not know the entity (404).
    #[sea_orm(string_value = "NOT_FOUND")]
    NotFound,
    /// No usable answer: unreachable, timeout, refused, 429/5xx, malformed. Retried with back-off.
    #[sea_orm(string_value = "FAILED")]
    Failed,
}

impl ReconcileOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            ReconcileOutcome::Running => "RUNNING",
            ReconcileOutcome::Recovered => "RECOVERED",
            ReconcileOutcome::InSync => "IN_SYNC",
            ReconcileOutcome::Differs => "DIFFERS",
            ReconcileOutcome::NotFound => "NOT_FOUND",
            ReconcileOutcome::Failed => "FAILED",
        }
    }
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
