//! Read queries of the operations API.

use chrono::{DateTime, Utc};
use entity::outbox_event::{self, OutboxStatus};
use entity::reconciliation::{self, ReconcileOutcome};
use entity::tracked_entity::{self, Correlation};
use entity::{audit_log, conversation, kci, state_transition};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, FromQueryResult, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect,
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::kci::EntityType;
use crate::store::StoreError;

/// The Tenant API's resource families, which the operations API's paths mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `/service-orders`: provide, cease, modify and unsolicited cease orders.
    ServiceOrders,
    /// `/ethernet/service-orders`.
    EthernetServiceOrders,
    /// `/service-tests`.
    ServiceTests,
    /// `/service-problems`.
    ServiceProblems,
}

impl Family {
    pub fn entity_types(self) -> &'static [EntityType] {
        match self {
            Family::ServiceOrders => &[
                EntityType::ProvideOrder,
                EntityType::CeaseOrder,
                EntityType::ModifyOrder,
                EntityType::UnsolicitedCeaseOrder,
            ],
            Family::EthernetServiceOrders => &[EntityType::ProvideEthernetOrder],
            Family::ServiceTests => &[EntityType::ServiceTest],
            Family::ServiceProblems => &[EntityType::ServiceProblem],
        }
    }

    /// The family a listed entity type belongs to.
    pub fn of(entity_type: EntityType) -> Family {
        match entity_type {
            EntityType::ProvideOrder
            | EntityType::CeaseOrder
            | EntityType::ModifyOrder
            | EntityType::UnsolicitedCeaseOrder => Family::ServiceOrders,
            EntityType::ProvideEthernetOrder => Family::EthernetServiceOrders,
            EntityType::ServiceTest => Family::ServiceTests,
            EntityType::ServiceProblem => Family::ServiceProblems,
        }
    }

    /// The Tenant API's (and the operations API's) path of the family, without the leading
    /// slash: `service-orders`, `ethernet/service-orders`, `service-tests`, `service-problems`.
    pub fn resource(self) -> &'static str {
        match self {
            Family::ServiceOrders => "service-orders",
            Family::EthernetServiceOrders => "ethernet/service-orders",
            Family::ServiceTests => "service-tests",
            Family::ServiceProblems => "service-problems",
        }
    }

    pub const ALL: [Family; 4] = [
        Family::ServiceOrders,
        Family::EthernetServiceOrders,
        Family::ServiceTests,
        Family::ServiceProblems,
    ];

    pub fn type_names(self) -> Vec<&'static str> {
        self.entity_types().iter().map(|t| t.as_str()).collect()
    }
}

/// A flag an entity can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    Illegal,
    Stale,
    Gap,
    Anomaly,
    UnknownValue,
    /// Any of them.
    Any,
}

impl Flag {
    pub fn parse(text: &str) -> Option<Flag> {
        Some(match text {
            "illegal" => Flag::Illegal,
            "stale" => Flag::Stale,
            "gap" => Flag::Gap,
            "anomaly" => Flag::Anomaly,
            "unknown_value" => Flag::UnknownValue,
            "any" => Flag::Any,
            _ => return None,
        })
    }

    fn condition(self) -> Condition {
        use tracked_entity::Column as C;
        let all = [
            C::FlagIllegal,
            C::FlagStale,
            C::FlagGap,
            C::FlagAnomaly,
            C::FlagUnknownValue,
        ];
        let columns: &[C] = match self {
            Flag::Illegal => &all[0..1],
            Flag::Stale => &all[1..2],
            Flag::Gap => &all[2..3],
            Flag::Anomaly => &all[3..4],
            Flag::UnknownValue => &all[4..5],
            Flag::Any => &all,
        };
        columns
            .iter()
            .fold(Condition::any(), |any, column| any.add(column.eq(true)))
    }
}

/// Filters of the entity lists; all optional, all combined.
#[derive(Debug, Default, Clone)]
pub struct EntityFilter {
    pub entity_types: Vec<String>,
    pub statuses: Vec<String>,
    pub supplier: Option<String>,
    pub correlation: Option<Correlation>,
    pub flagged: Option<Flag>,
    /// On `last_kci_at`: when the last KCI about the entity arrived.
    pub updated_after: Option<DateTime<Utc>>,
    pub updated_before: Option<DateTime<Utc>>,
    /// No KCI for longer than this, and not in a terminal state.
    pub stuck_for: Option<chrono::Duration>,
}

/// "Still in flight" as SQL text with literals, every listed entity type with its lifecycle's
/// final statuses: `(entity_type = 'PROVIDE_ORDER' AND status NOT IN ('FAILED_TO_SEND', ...))
/// OR ...`. Migration 12's partial index `ix_tracked_entity_in_flight` is defined by exactly this
/// text, so a query that says it can be answered from the entities in flight alone, however
/// many have finished (a unit test keeps the two equal: a lifecycle that changes needs a
/// migration that redefines the index).
pub fn in_flight_rows() -> &'static str {
    static IN_FLIGHT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        let quoted = |text: &str| {
            assert!(
                text.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{text}: entity types and statuses are SQL literals here"
            );
            format!("'{text}'")
        };
        let types: Vec<String> = EntityType::ALL
            .iter()
            .map(|entity_type| {
                let terminal: Vec<String> = entity_type
                    .lifecycle()
                    .terminal
                    .iter()
                    .map(|status| quoted(status))
                    .collect();
                format!(
                    "(entity_type = {} AND status NOT IN ({}))",
                    quoted(entity_type.as_str()),
                    terminal.join(", ")
                )
            })
            .collect();
        format!("({})", types.join(" OR "))
    });
    &IN_FLIGHT
}

/// [`in_flight_rows`] as a condition, for queries of `tracked_entity` alone (its columns are not
/// qualified by the table: in a join, where another table has an `entity_type` too, use
/// [`not_terminal`]).
pub(crate) fn in_flight() -> Condition {
    Condition::all().add(Expr::cust(in_flight_rows()))
}

/// `status NOT IN terminal` for each entity type, combined: "still in flight", with columns
/// qualified by their table (for joins; the same rows as [`in_flight`]).
pub(crate) fn not_terminal(types: &[EntityType]) -> Condition {
    types.iter().fold(Condition::any(), |any, entity_type| {
        any.add(
            Condition::all()
                .add(tracked_entity::Column::EntityType.eq(entity_type.as_str()))
                .add(
                    tracked_entity::Column::Status
                        .is_not_in(entity_type.lifecycle().terminal.iter().copied()),
                ),
        )
    })
}

impl EntityFilter {
    fn condition(&self, family: Option<Family>, now: DateTime<Utc>) -> Condition {
        use tracked_entity::Column as C;
        let mut condition = Condition::all();
        if let Some(family) = family {
            condition = condition.add(C::EntityType.is_in(family.type_names()));
        }
        if !self.entity_types.is_empty() {
            condition = condition.add(C::EntityType.is_in(self.entity_types.clone()));
        }
        if !self.statuses.is_empty() {
            condition = condition.add(C::Status.is_in(self.statuses.clone()));
        }
        if let Some(supplier) = &self.supplier {
            condition = condition.add(C::Supplier.eq(supplier.as_str()));
        }
        if let Some(correlation) = self.correlation {
            condition = condition.add(C::Correlation.eq(correlation));
        }
        if let Some(flag) = self.flagged {
            condition = condition.add(flag.condition());
        }
        if let Some(after) = self.updated_after {
            condition = condition.add(C::LastKciAt.gt(after));
        }
        if let Some(before) = self.updated_before {
            condition = condition.add(C::LastKciAt.lt(before));
        }
        if let Some(stuck_for) = self.stuck_for {
            // In flight of any type is in flight of the family's types, as the family's own
            // condition above already keeps to them.
            condition = condition
                .add(C::LastKciAt.lt(now - stuck_for))
                .add(in_flight());
        }
        condition
    }
}

/// One page of a list, newest first, and the cursor of the next page (none on the last page).
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Page<T: ToSchema> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// A cursor: the id of the last row of the page, as decimal digits. Callers pass it back as
/// they got it; any string of 1 to 18 digits is a valid cursor (it means "older than this row"),
/// so that the document's pattern and the handler agree.
pub fn encode_cursor(id: i64) -> String {
    id.to_string()
}

pub fn decode_cursor(cursor: &str) -> Option<i64> {
    if !(1..=18).contains(&cursor.len()) || !cursor.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    cursor.parse().ok()
}

/// Entities matching `filter`, newest first (by id: stable while new entities arrive).
pub async fn list_entities(
    db: &impl ConnectionTrait,
    family: Option<Family>,
    filter: &EntityFilter,
    before_id: Option<i64>,
    limit: u64,
) -> Result<Page<tracked_entity::Model>, StoreError> {
    let mut condition = filter.condition(family, Utc::now());
    if let Some(before_id) = before_id {
        condition = condition.add(tracked_entity::Column::Id.lt(before_id));
    }
    let mut items = if filter.stuck_for.is_some() {
        stuck_newest_first(db, condition, limit + 1).await?
    } else {
        tracked_entity::Entity::find()
            .filter(condition)
            .order_by_desc(tracked_entity::Column::Id)
            .limit(limit + 1)
            .all(db)
            .await?
    };
    let next_cursor = if items.len() as u64 > limit {
        items.truncate(limit as usize);
        items.last().map(|e| encode_cursor(e.id))
    } else {
        None
    };
    Ok(Page { items, next_cursor })
}

/// The `limit` newest entities matching `condition`, which says "stuck" (in flight, silent since
/// a cutoff), by a walk down `ix_tracked_entity_in_flight` (`(id, last_kci_at)` of the entities
/// in flight): newest first, each entity's silence read from the index, a row fetched only for
/// a match. The walk passes only the entities in flight that had a KCI since the cutoff, not
/// the finished ones: the work in progress, not the history. Without that index the walk went
/// down the primary key past every entity (95 ms at 200,000 entities of which 60 were stuck,
/// docs/benchmarks.md). PostgreSQL's planner picks the index on its own (a subset of the table
/// in the same order); SQLite's, without statistics, would rather read every entity of each
/// type, so on SQLite the statement names the index (`INDEXED BY`: an error, not a slow plan,
/// if the index could not answer it).
async fn stuck_newest_first(
    db: &impl ConnectionTrait,
    condition: Condition,
    limit: u64,
) -> Result<Vec<tracked_entity::Model>, StoreError> {
    use sea_orm::QueryTrait;
    let backend = db.get_database_backend();
    let mut statement = tracked_entity::Entity::find()
        .filter(condition)
        .order_by_desc(tracked_entity::Column::Id)
        .limit(limit)
        .build(backend);
    if backend == sea_orm::DbBackend::Sqlite {
        statement.sql = statement.sql.replacen(
            r#"FROM "tracked_entity""#,
            r#"FROM "tracked_entity" INDEXED BY "ix_tracked_entity_in_flight""#,
            1,
        );
    }
    Ok(tracked_entity::Model::find_by_statement(statement)
        .all(db)
        .await?)
}

/// Entities of `family` with this gateway id (several order types may share one).
pub async fn find_entities(
    db: &impl ConnectionTrait,
    family: Family,
    gateway_id: &str,
    entity_type: Option<&str>,
) -> Result<Vec<tracked_entity::Model>, StoreError> {
    let mut query = tracked_entity::Entity::find()
        .filter(tracked_entity::Column::EntityType.is_in(family.type_names()))
        .filter(tracked_entity::Column::GatewayId.eq(gateway_id))
        .order_by_asc(tracked_entity::Column::Id);
    if let Some(entity_type) = entity_type {
        query = query.filter(tracked_entity::Column::EntityType.eq(entity_type));
    }
    Ok(query.all(db).await?)
}

/// An entity with the original request it matched.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntityDetail {
    pub entity: tracked_entity::Model,
    pub original_request: Option<conversation::Model>,
    /// Whether the entity's lifecycle has ended.
    pub terminal: bool,
    /// Its latest reconciliations with the Tenant API (gap repair), newest first: each one's
    /// outcome, the KCIs it recovered, the gateway's error when it failed.
    pub reconciliations: Vec<reconciliation::Model>,
}

pub async fn entity_detail(
    db: &impl ConnectionTrait,
    entity: tracked_entity::Model,
) -> Result<EntityDetail, StoreError> {
    let original_request = match entity.conversation_ref {
        Some(id) => conversation::Entity::find_by_id(id).one(db).await?,
        None => None,
    };
    let terminal = EntityType::from_wire(&entity.entity_type)
        .is_some_and(|t| t.lifecycle().is_terminal(&entity.status));
    let reconciliations = crate::reconcile::store::of_entity(db, entity.id, 20).await?;
    Ok(EntityDetail {
        entity,
        original_request,
        terminal,
        reconciliations,
    })
}

/// One history entry with what the KCI behind it was.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    #[serde(flatten)]
    pub transition: state_transition::Model,
    /// `X-Request-ID` and `X-Conversation-ID` of the KCI's first accepted delivery.
    pub request_id: Option<String>,
    pub conversation_id: Option<String>,
}

/// Every transition of an entity, oldest first.
pub async fn history(
    db: &impl ConnectionTrait,
    entity_id: i64,
) -> Result<Vec<HistoryEntry>, StoreError> {
    let transitions = state_transition::Entity::find()
        .filter(state_transition::Column::TrackedEntityId.eq(entity_id))
        .order_by_asc(state_transition::Column::Id)
        .all(db)
        .await?;
    // Only the correlation of each KCI: its raw body (any size) is not needed here.
    #[derive(sea_orm::FromQueryResult)]
    struct Correlation {
        id: i64,
        request_id: String,
        conversation_id: String,
    }
    let kcis: std::collections::HashMap<i64, Correlation> = kci::Entity::find()
        .select_only()
        .column(kci::Column::Id)
        .column(kci::Column::RequestId)
        .column(kci::Column::ConversationId)
        .filter(kci::Column::TrackedEntityId.eq(entity_id))
        .into_model::<Correlation>()
        .all(db)
        .await?
        .into_iter()
        .map(|k| (k.id, k))
        .collect();
    Ok(transitions
        .into_iter()
        .map(|transition| {
            let first = kcis.get(&transition.kci_ref);
            HistoryEntry {
                request_id: first.map(|k| k.request_id.clone()),
                conversation_id: first.map(|k| k.conversation_id.clone()),
                transition,
            }
        })
        .collect())
}

/// A KCI without its raw text (which is big): for lists, read with [`KciSummary::select`].
#[derive(Debug, Clone, Serialize, ToSchema, FromQueryResult)]
#[serde(rename_all = "camelCase")]
pub struct KciSummary {
    pub kci_id: uuid::Uuid,
    pub request_id: String,
    pub entity_type: String,
    pub update_type: String,
    pub reason: String,
    pub sequence_number: i64,
    pub outcome: kci::KciOutcome,
    pub received_at: DateTime<Utc>,
}

impl KciSummary {
    /// The KCIs `query` finds, only the columns of a summary: a list of a conversation's KCIs
    /// (up to 1,000) then never reads their bodies.
    pub fn select(
        query: sea_orm::Select<kci::Entity>,
    ) -> sea_orm::Selector<sea_orm::SelectModel<KciSummary>> {
        use kci::Column as C;
        query
            .select_only()
            .columns([
                C::KciId,
                C::RequestId,
                C::EntityType,
                C::UpdateType,
                C::Reason,
                C::SequenceNumber,
                C::Outcome,
                C::ReceivedAt,
            ])
            .into_model::<KciSummary>()
    }
}

/// A conversation: the original request (if registered) and everything that followed.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConversationView {
    pub conversation_id: String,
    pub original_request: Option<conversation::Model>,
    pub entities: Vec<tracked_entity::Model>,
    pub kcis: Vec<KciSummary>,
}

pub async fn conversation_view(
    db: &impl ConnectionTrait,
    conversation_id: &str,
) -> Result<Option<ConversationView>, StoreError> {
    let original_request = conversation::Entity::find()
        .filter(conversation::Column::ConversationId.eq(conversation_id))
        .one(db)
        .await?;
    let mut linked =
        Condition::any().add(tracked_entity::Column::ConversationId.eq(conversation_id));
    if let Some(request) = &original_request {
        linked = linked.add(tracked_entity::Column::ConversationRef.eq(request.id));
    }
    let entities = tracked_entity::Entity::find()
        .filter(linked)
        .order_by_asc(tracked_entity::Column::Id)
        .all(db)
        .await?;
    let kcis: Vec<KciSummary> = KciSummary::select(
        kci::Entity::find()
            .filter(kci::Column::ConversationId.eq(conversation_id))
            .order_by_asc(kci::Column::Id)
            .limit(1000),
    )
    .all(db)
    .await?;
    if original_request.is_none() && entities.is_empty() && kcis.is_empty() {
        return Ok(None);
    }
    Ok(Some(ConversationView {
        conversation_id: conversation_id.to_owned(),
        original_request,
        entities,
        kcis,
    }))
}

/// A KCI as received and what processing did with it.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KciView {
    pub kci: kci::Model,
    /// The raw body, parsed (null if it is somehow not JSON).
    #[schema(value_type = Object)]
    pub body: serde_json::Value,
    pub entity: Option<tracked_entity::Model>,
    /// What it did to the entity's history (more than one after conflicting redeliveries).
    pub transitions: Vec<state_transition::Model>,
    pub outbox_event: Option<outbox_event::Model>,
    /// Every delivery of it, from the audit log.
    pub deliveries: Vec<audit_log::Model>,
}

pub async fn kci_view(
    db: &impl ConnectionTrait,
    kci_id: uuid::Uuid,
) -> Result<Option<KciView>, StoreError> {
    // Three statements, not five: the KCI, its entity and its outbox event in one (each read
    // through an index: `kci.kci_id` is unique, the entity by its key, the event through
    // `(tracked_entity_id, ...)`), then its history entries and its deliveries. Under many
    // readers a call's cost is mostly per statement (a round trip, its plan, its rows).
    let Some(row) = db
        .query_one_raw(kci_with_entity_and_event(db.get_database_backend(), kci_id))
        .await?
    else {
        return Ok(None);
    };
    let kci_row = kci::Model::from_query_result(&row, KCI_PREFIX)?;
    let entity = tracked_entity::Model::from_query_result_optional(&row, ENTITY_PREFIX)?;
    let outbox_event = outbox_event::Model::from_query_result_optional(&row, EVENT_PREFIX)?;
    // Through the entity: `(tracked_entity_id, id)` indexes both tables, and an entity has few
    // rows, so no index on `kci_ref` is needed (each index costs every intake transaction).
    let transitions = state_transition::Entity::find()
        .filter(state_transition::Column::TrackedEntityId.eq(kci_row.tracked_entity_id))
        .filter(state_transition::Column::KciRef.eq(kci_row.id))
        .order_by_asc(state_transition::Column::Id)
        .all(db)
        .await?;
    // `ix_audit_log_kci_id` (migration 9).
    let deliveries = audit_log::Entity::find()
        .filter(audit_log::Column::KciId.eq(kci_id))
        .order_by_asc(audit_log::Column::Id)
        .all(db)
        .await?;
    let body = serde_json::from_str(&kci_row.raw_body).unwrap_or(serde_json::Value::Null);
    Ok(Some(KciView {
        kci: kci_row,
        body,
        entity,
        transitions,
        outbox_event,
        deliveries,
    }))
}

/// Column prefixes of [`kci_with_entity_and_event`]'s row: each table's columns under its own.
const KCI_PREFIX: &str = "k_";
const ENTITY_PREFIX: &str = "e_";
const EVENT_PREFIX: &str = "o_";

/// `kci LEFT JOIN tracked_entity LEFT JOIN outbox_event` for one KCI id, every column of the
/// three under its table's prefix.
fn kci_with_entity_and_event(
    backend: sea_orm::DbBackend,
    kci_id: uuid::Uuid,
) -> sea_orm::Statement {
    use sea_orm::sea_query::{Alias, ExprTrait, Query};
    use sea_orm::{IdenStatic, Iterable};
    fn columns<E: EntityTrait>(query: &mut sea_orm::sea_query::SelectStatement, prefix: &str)
    where
        E::Column: Iterable,
    {
        for column in E::Column::iter() {
            query.expr_as(
                Expr::col((E::default(), column)),
                Alias::new(format!("{prefix}{}", column.as_str())),
            );
        }
    }
    let mut query = Query::select();
    columns::<kci::Entity>(&mut query, KCI_PREFIX);
    columns::<tracked_entity::Entity>(&mut query, ENTITY_PREFIX);
    columns::<outbox_event::Entity>(&mut query, EVENT_PREFIX);
    query
        .from(kci::Entity)
        .left_join(
            tracked_entity::Entity,
            Expr::col((tracked_entity::Entity, tracked_entity::Column::Id))
                .equals((kci::Entity, kci::Column::TrackedEntityId)),
        )
        .left_join(
            outbox_event::Entity,
            Condition::all()
                .add(
                    Expr::col((outbox_event::Entity, outbox_event::Column::TrackedEntityId))
                        .equals((kci::Entity, kci::Column::TrackedEntityId)),
                )
                .add(
                    Expr::col((outbox_event::Entity, outbox_event::Column::KciRef))
                        .equals((kci::Entity, kci::Column::Id)),
                ),
        )
        .and_where(Expr::col((kci::Entity, kci::Column::KciId)).eq(kci_id))
        .limit(1);
    backend.build(&query)
}

/// Audit records of one `X-Request-ID` (normally one), oldest first.
pub async fn audit_records(
    db: &impl ConnectionTrait,
    request_id: &str,
) -> Result<Vec<audit_log::Model>, StoreError> {
    Ok(audit_log::Entity::find()
        .filter(audit_log::Column::RequestId.eq(request_id))
        .order_by_asc(audit_log::Column::Id)
        .limit(100)
        .all(db)
        .await?)
}

/// A list with its total, for the attention view.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Counted<T: ToSchema> {
    pub total: u64,
    pub items: Vec<T>,
}

/// Everything that needs a person, in one answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Attention {
    /// Waiting on the CP: the newest KCI asked for an action (INFORMATION_REQUIRED, REAPPOINT,
    /// RESUBMIT, CONFIRM) and the entity is still in flight. Longest waiting first.
    pub action_required: Counted<tracked_entity::Model>,
    /// KCIs whose original request is not registered.
    pub unmatched: Counted<tracked_entity::Model>,
    /// In flight, and no KCI for longer than `stuckFor`.
    pub stuck: Counted<tracked_entity::Model>,
    /// Outbox events the broker kept refusing. Each holds its entity: the entity's later events
    /// wait until it is retried or skipped.
    pub dead_events: Counted<outbox_event::Model>,
    /// Entities whose events wait behind a dead event.
    pub held_entities: Counted<tracked_entity::Model>,
    /// Entities of an `entityType` the docs do not list (accepted, generic lifecycle): confirm
    /// the value with the gateway, then map it with `kci.entity_type_aliases`.
    pub unlisted_types: Counted<tracked_entity::Model>,
    /// Conflicting redeliveries and illegal transitions since `since`.
    pub recent_anomalies: Counted<state_transition::Model>,
    /// Creating calls the gateway answered through the egress proxy whose original request is
    /// not recorded yet (the database was unavailable); retried in the background, in this
    /// instance's memory.
    pub unrecorded_original_requests: Vec<crate::egress::unrecorded::UnrecordedRequest>,
    /// Entities with KCIs missing (a gap in their sequence numbers), oldest gap first. With
    /// egress configured, reconciliation recovers them after `reconcile.gap_grace_seconds`.
    pub open_gaps: Counted<tracked_entity::Model>,
    /// Reconciliations since `since` that recovered KCIs, found a difference, or failed (those
    /// that found everything in sync are left out), newest first.
    pub reconciliations: Counted<reconciliation::Model>,
}

/// The predicates of migration 10's partial indexes, as the queries must say them.
const ACTION_REQUIRED_ROWS: &str = "last_update_type = 'ACTION_REQUIRED'";
const UNMATCHED_ROWS: &str = "correlation = 'UNMATCHED'";
const ANOMALY_ROWS: &str = "(flag_anomaly = true OR flag_illegal = true)";

/// The entity types that have entities, by walking the `(entity_type, gateway_id)` index from
/// one type to the next (a handful of index lookups, whatever the number of entities).
pub async fn entity_types_present(db: &impl ConnectionTrait) -> Result<Vec<String>, StoreError> {
    #[derive(FromQueryResult)]
    struct Present {
        entity_type: Option<String>,
    }
    let rows = Present::find_by_statement(sea_orm::Statement::from_string(
        db.get_database_backend(),
        "WITH RECURSIVE present(entity_type) AS ( \
           SELECT MIN(entity_type) FROM tracked_entity \
           UNION ALL \
           SELECT (SELECT MIN(t.entity_type) FROM tracked_entity t WHERE t.entity_type > present.entity_type) \
           FROM present WHERE present.entity_type IS NOT NULL) \
         SELECT entity_type FROM present WHERE entity_type IS NOT NULL",
    ))
    .all(db)
    .await?;
    Ok(rows.into_iter().filter_map(|row| row.entity_type).collect())
}

pub async fn attention(
    db: &impl ConnectionTrait,
    stuck_for: chrono::Duration,
    since: DateTime<Utc>,
    limit: u64,
) -> Result<Attention, StoreError> {
    use tracked_entity::Column as C;
    let entities = |condition: Condition, oldest_first: bool| {
        let query = tracked_entity::Entity::find().filter(condition);
        if oldest_first {
            query.order_by_asc(C::LastKciAt)
        } else {
            query.order_by_desc(C::Id)
        }
    };
    let counted = |query: sea_orm::Select<tracked_entity::Entity>| async move {
        let total = query.clone().count(db).await?;
        let items = query.limit(limit).all(db).await?;
        Ok::<_, StoreError>(Counted { total, items })
    };
    // The conditions a partial index of migration 10 or 12 is defined by are written as SQL text with
    // literals, exactly as the index says them: the planner (PostgreSQL's, also for a generic
    // plan, and SQLite's) can then prove the index applies.
    let action_required = counted(entities(
        Condition::all()
            .add(Expr::cust(ACTION_REQUIRED_ROWS))
            .add(in_flight()),
        true,
    ))
    .await?;
    let unmatched = counted(entities(
        Condition::all().add(Expr::cust(UNMATCHED_ROWS)),
        false,
    ))
    .await?;
    let stuck = counted(entities(
        Condition::all()
            .add(C::LastKciAt.lt(Utc::now() - stuck_for))
            .add(in_flight()),
        true,
    ))
    .await?;

    let dead =
        outbox_event::Entity::find().filter(outbox_event::Column::Status.eq(OutboxStatus::Dead));
    let dead_events = Counted {
        total: dead.clone().count(db).await?,
        items: dead
            .order_by_asc(outbox_event::Column::Id)
            .limit(limit)
            .all(db)
            .await?,
    };
    let held_entities = counted(entities(
        Condition::all().add(
            C::Id.in_subquery(
                sea_orm::sea_query::Query::select()
                    .column(outbox_event::Column::TrackedEntityId)
                    .from(outbox_event::Entity)
                    .and_where(outbox_event::Column::Status.eq(OutboxStatus::Dead))
                    .to_owned(),
            ),
        ),
        false,
    ))
    .await?;
    // Unlisted types: the types present (a walk down the `(entity_type, gateway_id)` index, not
    // a scan), then those entities through the same index.
    let unlisted: Vec<String> = entity_types_present(db)
        .await?
        .into_iter()
        .filter(|present| EntityType::from_wire(present).is_none())
        .collect();
    let unlisted_types = if unlisted.is_empty() {
        Counted {
            total: 0,
            items: Vec::new(),
        }
    } else {
        counted(entities(
            Condition::all().add(C::EntityType.is_in(unlisted)),
            false,
        ))
        .await?
    };
    let anomalies = state_transition::Entity::find()
        .filter(Expr::cust(ANOMALY_ROWS))
        .filter(state_transition::Column::RecordedAt.gt(since));
    let recent_anomalies = Counted {
        total: anomalies.clone().count(db).await?,
        items: anomalies
            .order_by_desc(state_transition::Column::Id)
            .limit(limit)
            .all(db)
            .await?,
    };
    let open_gaps = counted(
        tracked_entity::Entity::find()
            .filter(C::GapOpenSince.is_not_null())
            .order_by_asc(C::GapOpenSince),
    )
    .await?;
    let notable = reconciliation::Entity::find()
        .filter(reconciliation::Column::StartedAt.gt(since))
        .filter(reconciliation::Column::Outcome.is_in([
            ReconcileOutcome::Recovered,
            ReconcileOutcome::Differs,
            ReconcileOutcome::NotFound,
            ReconcileOutcome::Failed,
        ]));
    let reconciliations = Counted {
        total: notable.clone().count(db).await?,
        items: notable
            .order_by_desc(reconciliation::Column::Id)
            .limit(limit)
            .all(db)
            .await?,
    };
    Ok(Attention {
        open_gaps,
        reconciliations,
        action_required,
        unmatched,
        stuck,
        dead_events,
        held_entities,
        unlisted_types,
        recent_anomalies,
        unrecorded_original_requests: Vec::new(),
    })
}

/// What an id typed into the dashboard's search box can be.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SearchResult {
    /// By gateway id, supplier reference or conversation id.
    pub entities: Vec<tracked_entity::Model>,
    pub conversations: Vec<conversation::Model>,
    /// By X-Request-ID, or by the UUID of an error we answered (the `uuid` of its body).
    pub audit: Vec<audit_log::Model>,
    /// By KCI id.
    pub kcis: Vec<KciSummary>,
}

pub async fn search(db: &impl ConnectionTrait, query: &str) -> Result<SearchResult, StoreError> {
    use tracked_entity::Column as C;
    let query = query.trim();
    if query.is_empty() {
        return Ok(SearchResult {
            entities: Vec::new(),
            conversations: Vec::new(),
            audit: Vec::new(),
            kcis: Vec::new(),
        });
    }
    // Three lookups, each on an index (a gateway id through `(entity_type, gateway_id)` for
    // every type present; a supplier reference through its partial index; a conversation id
    // through its own), rather than one OR that would scan every entity.
    let types = entity_types_present(db).await?;
    let mut entities: Vec<tracked_entity::Model> = Vec::new();
    for condition in [
        Condition::all()
            .add(C::EntityType.is_in(types))
            .add(C::GatewayId.eq(query)),
        Condition::all().add(C::SupplierReference.eq(query)),
        Condition::all().add(C::ConversationId.eq(query)),
    ] {
        entities.extend(
            tracked_entity::Entity::find()
                .filter(condition)
                .order_by_desc(C::Id)
                .limit(50)
                .all(db)
                .await?,
        );
    }
    entities.sort_by_key(|entity| std::cmp::Reverse(entity.id));
    entities.dedup_by_key(|entity| entity.id);
    entities.truncate(50);
    let conversations = conversation::Entity::find()
        .filter(conversation::Column::ConversationId.eq(query))
        .all(db)
        .await?;
    let mut audit = audit_records(db, query).await?;
    let kcis = match uuid::Uuid::parse_str(query) {
        Ok(id) => {
            // The UUID of an error we answered (what the gateway's operator quotes back):
            // the refused request, through the partial index of migration 11.
            audit.extend(
                audit_log::Entity::find()
                    .filter(audit_log::Column::ErrorUuid.eq(id))
                    .order_by_asc(audit_log::Column::Id)
                    .limit(100)
                    .all(db)
                    .await?,
            );
            KciSummary::select(kci::Entity::find().filter(kci::Column::KciId.eq(id)))
                .all(db)
                .await?
        }
        Err(_) => Vec::new(),
    };
    audit.sort_by_key(|record| record.id);
    audit.dedup_by_key(|record| record.id);
    Ok(SearchResult {
        entities,
        conversations,
        audit,
        kcis,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_of_entities_in_flight_is_defined_by_the_text_the_queries_say() {
        assert_eq!(
            in_flight_rows(),
            migration::IN_FLIGHT_ROWS,
            "a lifecycle's final statuses changed: add a migration that redefines \
             ix_tracked_entity_in_flight with in_flight_rows(), and point IN_FLIGHT_ROWS at it"
        );
    }

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        assert_eq!(decode_cursor(&encode_cursor(42)), Some(42));
        for garbage in ["not a cursor", "", "-1", "+1", "1234567890123456789", "١٢"] {
            assert_eq!(decode_cursor(garbage), None, "{garbage}");
        }
    }
}
