//! One inbound request, accepted or rejected, with what we answered.

use sea_orm::entity::prelude::*;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, ToSchema)]
#[sea_orm(table_name = "audit_log")]
#[serde(rename_all = "camelCase")]
#[schema(as = AuditLog)]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub request_id: Option<String>,
    pub conversation_id: Option<String>,
    pub method: String,
    pub path: String,
    pub remote_addr: Option<String>,
    /// Who authenticated (user name or token subject); none when authentication failed.
    pub principal: Option<String>,
    /// Request headers with credentials removed.
    #[sea_orm(column_type = "JsonBinary")]
    #[schema(value_type = Object)]
    pub request_headers: Json,
    /// The body as received (lossy UTF-8); none when it was too large to keep.
    #[sea_orm(column_type = "Text", nullable)]
    pub request_body: Option<String>,
    pub request_body_size: i64,
    pub response_status: i32,
    #[sea_orm(column_type = "Text", nullable)]
    pub response_body: Option<String>,
    pub error_uuid: Option<Uuid>,
    pub error_code: Option<String>,
    pub outcome: String,
    pub kci_id: Option<Uuid>,
    pub received_at: chrono::DateTime<chrono::Utc>,
    pub duration_ms: i64,
    /// How many requests this record stands for: 1, or, for failed authentication (audited
    /// aggregated per source and window), the attempts of that source in the window, of which
    /// this record is the first (`received_at`) and the rest alike.
    pub attempts: i32,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
