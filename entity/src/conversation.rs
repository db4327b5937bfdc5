//! An original request: the Tenant API call whose `X-Conversation-ID` later KCIs carry.

use sea_orm::entity::prelude::*;
use serde::Serialize;
use utoipa::ToSchema;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize, ToSchema)]
#[sea_orm(table_name = "conversation")]
#[serde(rename_all = "camelCase")]
#[schema(as = Conversation)]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub conversation_id: String,
    pub request_id: Option<String>,
    /// `METHOD /path` of the Tenant API call, e.g. `POST /service-orders`.
    pub operation: String,
    /// The KCI `entityType` this operation creates, when the operation is a known creating call.
    pub entity_type: Option<String>,
    /// The gateway id from the call's response (`id`), when known.
    pub gateway_id: Option<String>,
    #[sea_orm(column_type = "JsonBinary", nullable)]
    #[schema(value_type = Option<Object>)]
    pub request_body: Option<Json>,
    pub response_status: Option<i32>,
    pub source: ConversationSource,
    pub registered_at: chrono::DateTime<chrono::Utc>,
}

/// How the original request became known to us.
#[derive(Clone, Copy, Debug, PartialEq, Eq, EnumIter, DeriveActiveEnum, Serialize, ToSchema)]
#[sea_orm(rs_type = "String", db_type = "String(StringLen::None)")]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConversationSource {
    /// Registered through `POST /api/v1/conversations`.
    #[sea_orm(string_value = "API")]
    Api,
    /// Recorded by the egress proxy on its way to the Tenant API.
    #[sea_orm(string_value = "EGRESS")]
    Egress,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
