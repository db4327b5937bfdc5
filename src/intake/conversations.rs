//! Original requests: the Tenant API calls whose `X-Conversation-ID` later KCIs carry.
//!
//! Registering one matches, at once, every entity that arrived earlier with that conversation id
//! and is still unmatched (design.md, "Correlation").

use chrono::Utc;
use entity::conversation::{self, ConversationSource};
use entity::tracked_entity::{self, Correlation};
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect, Set,
};
use serde::Deserialize;
use serde_json::Value;

use crate::kci::EntityType;
use crate::store::{Database, StoreError, Writer, retry_on_race};

/// An original request to register. What each field accepts is what the OpenAPI document says
/// (checked by the test suite with schemathesis).
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewConversation {
    /// The `X-Conversation-ID` the request carried: 1 to 255 characters, not blank (spaces
    /// around it are dropped).
    #[schema(min_length = 1, max_length = 255, pattern = r"[^ \t\n\r]")]
    pub conversation_id: String,
    /// Its `X-Request-ID`.
    pub request_id: Option<String>,
    /// `METHOD /path` of the Tenant API call, e.g. `POST /service-orders`.
    #[schema(pattern = r"^(GET|POST|PUT|PATCH|DELETE) /[^ \t\n\r\x0B\x0C]*$")]
    pub operation: String,
    /// The request body as sent to the Tenant API.
    #[schema(value_type = Option<Object>)]
    pub request_body: Option<Value>,
    /// `id` from the Tenant API's response, when known: a positive whole number or a string
    /// that is not blank (its exact schema is set in `crate::http::openapi`).
    #[schema(value_type = Option<String>)]
    pub gateway_id: Option<Value>,
    /// The Tenant API's response status, when known (0 to 65535).
    #[schema(value_type = Option<u16>)]
    pub response_status: Option<Value>,
}

/// A JSON number that is a whole number (`42` or `42.0`, as JSON Schema's `integer` allows),
/// within u64.
fn whole_number(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 18_446_744_073_709_551_616.0)
            .map(|f| f as u64)
    })
}

/// Text without the ASCII blanks around it (what "blank" means everywhere in the APIs, see
/// [`crate::kci::parse::is_blank`]).
fn trimmed(text: &str) -> &str {
    text.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'))
}

impl NewConversation {
    /// Lists what is wrong with the request, each with its field.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let id = trimmed(&self.conversation_id);
        if id.is_empty() || self.conversation_id.chars().count() > 255 {
            problems.push("conversationId: must be 1 to 255 characters, not blank".to_owned());
        }
        let valid_operation = self
            .operation
            .split_once(' ')
            .is_some_and(|(method, path)| {
                ["GET", "POST", "PUT", "PATCH", "DELETE"].contains(&method)
                    && path.starts_with('/')
                    && !path.contains([' ', '\t', '\n', '\r', '\u{b}', '\u{c}'])
            });
        if !valid_operation {
            problems.push(
                "operation: must be \"METHOD /path\", e.g. \"POST /service-orders\"".to_owned(),
            );
        }
        if self.gateway_id().is_err() {
            problems.push("gatewayId: must be a positive number or a non-empty string".to_owned());
        }
        if self.response_status().is_err() {
            problems.push("responseStatus: must be a whole number from 0 to 65535".to_owned());
        }
        problems
    }

    fn gateway_id(&self) -> Result<Option<String>, ()> {
        match &self.gateway_id {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match whole_number(n) {
                Some(id) if id >= 1 => Ok(Some(id.to_string())),
                _ => Err(()),
            },
            Some(Value::String(s)) if !trimmed(s).is_empty() => Ok(Some(s.clone())),
            Some(_) => Err(()),
        }
    }

    /// The response status, 0 to 65535.
    fn response_status(&self) -> Result<Option<u16>, ()> {
        match &self.response_status {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => whole_number(n)
                .and_then(|status| u16::try_from(status).ok())
                .map(Some)
                .ok_or(()),
            Some(_) => Err(()),
        }
    }

    /// The KCI `entityType` that the operation creates, when it creates one (Tenant API 1.17,
    /// spec section 4). `POST /service-orders` is provide, cease or modify by its `orderType`.
    pub fn created_entity_type(&self) -> Option<EntityType> {
        let path = self
            .operation
            .split_once(' ')
            .map(|(_, path)| path.trim_end_matches('/'))?;
        let path = path.split('?').next().unwrap_or(path);
        let ends_with = |suffix: &str| path == suffix || path.ends_with(&format!("/v1{suffix}"));
        if ends_with("/service-orders") {
            let order_type = self
                .request_body
                .as_ref()
                .and_then(|body| body.get("orderType"))
                .and_then(Value::as_str);
            Some(match order_type {
                Some("CEASE") => EntityType::CeaseOrder,
                Some("MODIFY") => EntityType::ModifyOrder,
                _ => EntityType::ProvideOrder,
            })
        } else if ends_with("/ethernet/service-orders") {
            Some(EntityType::ProvideEthernetOrder)
        } else if ends_with("/service-tests") {
            Some(EntityType::ServiceTest)
        } else if ends_with("/service-problems") {
            Some(EntityType::ServiceProblem)
        } else {
            None
        }
    }
}

#[derive(Debug, Clone)]
pub struct Registration {
    pub conversation: conversation::Model,
    /// False when the conversation was already registered (registering is idempotent).
    pub created: bool,
    /// Entities that were unmatched and are matched now.
    pub matched_entities: u64,
}

/// Registers an original request (idempotent on the conversation id) and matches the entities
/// waiting for it, in a transaction of its own. Under load, [`Registrar`] records many per
/// transaction.
pub async fn register(
    db: &Database,
    new: &NewConversation,
    source: ConversationSource,
) -> Result<Registration, StoreError> {
    let alone = [(new, source)];
    register_together(db, &alone)
        .await
        .map(|mut registrations| registrations.remove(0))
}

/// Group commit for registrations, as intake has for KCIs: registrations that arrive while one
/// transaction is being written are recorded together in the next, with one durable commit.
/// Each registration was a transaction of its own, and on SQLite (one writer, every commit an
/// fsync) the simulator's registrations, about one per four KCIs, kept intake's committer
/// waiting for its turn to write for 17 ms per batch, 45% of its time (docs/benchmarks.md,
/// "Third round"). Nobody waits for company; a batch that fails is recorded again one by one;
/// if the registrar is gone, a registration is recorded directly. A batch that outlives the
/// deadline (a database that hangs rather than refuses) is abandoned and its registrations are
/// answered "unavailable", so that nothing queued behind it waits for good.
#[derive(Clone)]
pub struct Registrar {
    db: Database,
    queue: tokio::sync::mpsc::Sender<Queued>,
}

/// Registers several original requests in one transaction, in their order; the same outcome as
/// [`register`] for each in turn. [`Registrar`] does this for registrations that arrive together.
pub async fn register_together(
    db: &Database,
    registrations: &[(&NewConversation, ConversationSource)],
) -> Result<Vec<Registration>, StoreError> {
    retry_on_race("registration", || register_batch(db, registrations)).await
}

struct Queued {
    new: NewConversation,
    source: ConversationSource,
    answer: tokio::sync::oneshot::Sender<Result<Registration, StoreError>>,
}

/// Registrations per transaction, at most.
const REGISTRATIONS_PER_BATCH: usize = 64;

impl Registrar {
    /// Starts the registrar's task on the current Tokio runtime; it stops once every clone is
    /// dropped.
    pub fn start(db: Database, deadline: std::time::Duration) -> Registrar {
        let (queue, mut queued) = tokio::sync::mpsc::channel::<Queued>(REGISTRATIONS_PER_BATCH * 4);
        let task_db = db.clone();
        tokio::spawn(async move {
            while let Some(first) = queued.recv().await {
                let mut batch = vec![first];
                while batch.len() < REGISTRATIONS_PER_BATCH {
                    match queued.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                record_queued(&task_db, batch, deadline).await;
            }
        });
        Registrar { db, queue }
    }

    /// Registers an original request (see [`register`]); `Ok` means committed.
    pub async fn register(
        &self,
        new: NewConversation,
        source: ConversationSource,
    ) -> Result<Registration, StoreError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        let queued = Queued {
            new,
            source,
            answer,
        };
        match self.queue.send(queued).await {
            Ok(()) => match answered.await {
                Ok(result) => result,
                // The registrar's task is gone (shutting down): the registration may or may not
                // have been written; writing it again is harmless (idempotent).
                Err(_) => Err(StoreError {
                    kind: crate::store::StoreErrorKind::Unavailable,
                    source: sea_orm::DbErr::Custom("the registrar stopped".to_owned()),
                }),
            },
            Err(returned) => register(&self.db, &returned.0.new, returned.0.source).await,
        }
    }
}

/// `work`'s result, or "unavailable" once `deadline` has passed (`work` is then dropped: its
/// transaction, if any, rolls back).
async fn within<T>(
    deadline: std::time::Duration,
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(deadline, work)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError {
                kind: crate::store::StoreErrorKind::Unavailable,
                source: sea_orm::DbErr::Custom(format!(
                    "the database did not answer within {deadline:?}"
                )),
            })
        })
}

async fn record_queued(db: &Database, batch: Vec<Queued>, deadline: std::time::Duration) {
    let pairs: Vec<(&NewConversation, ConversationSource)> =
        batch.iter().map(|q| (&q.new, q.source)).collect();
    let together = if batch.len() > 1 {
        Some(within(deadline, register_batch(db, &pairs)).await)
    } else {
        None
    };
    match together {
        Some(Ok(registrations)) => {
            for (queued, registration) in batch.into_iter().zip(registrations) {
                let _ = queued.answer.send(Ok(registration));
            }
        }
        // The database cannot be reached: so it is for every one of them, and trying each in
        // turn would make the last wait for all the others' timeouts.
        Some(Err(error)) if error.is_unavailable() => {
            for queued in batch {
                let _ = queued.answer.send(Err(StoreError {
                    kind: error.kind,
                    source: sea_orm::DbErr::Custom(error.source.to_string()),
                }));
            }
        }
        // Alone, or the batch failed for what may be one registration's fault (or a lost
        // race): each on its own, so that one cannot fail the others.
        Some(Err(_)) | None => {
            for queued in batch {
                let result = within(deadline, register(db, &queued.new, queued.source)).await;
                let _ = queued.answer.send(result);
            }
        }
    }
}

/// Advisory lock namespace for "a conversation is being registered or used to create entities"
/// (PostgreSQL).
const CONVERSATION_LOCK_NAMESPACE: i32 = 0x4b43_4932; // "KCI2"

/// PostgreSQL: takes transaction-scoped advisory locks on these conversation ids, shared (intake)
/// or exclusive (registration). Without them, a registration and an intake batch that creates an
/// entity of the same conversation could each miss the other's uncommitted row under READ
/// COMMITTED, leaving the entity UNMATCHED for good: intake reads no original request, and the
/// registration's update does not see the new entity. With them, one waits for the other's
/// commit and then sees it. SQLite has one writer at a time: nothing to do.
pub async fn lock_conversations<'a>(
    txn: &sea_orm::DatabaseTransaction,
    conversation_ids: impl Iterator<Item = &'a str>,
    exclusive: bool,
) -> Result<(), StoreError> {
    use sea_orm::{ConnectionTrait, DbBackend, Statement, Value as SqlValue};
    if txn.get_database_backend() != DbBackend::Postgres {
        return Ok(());
    }
    // Locks are taken in the order of the ids, sorted: the same order in every transaction
    // (`jsonb_array_elements_text` yields them in the array's order). One statement text
    // whatever their number (`store::bulk`).
    let ids: Vec<&str> = conversation_ids
        .collect::<std::collections::BTreeSet<&str>>()
        .into_iter()
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let sql = locks_sql(exclusive);
    txn.execute_raw(Statement::from_sql_and_values(
        DbBackend::Postgres,
        sql,
        [SqlValue::from(serde_json::json!(ids))],
    ))
    .await?;
    Ok(())
}

/// The statement that takes the locks on `$1`'s conversation ids (a JSON array, sorted), one
/// after the other in the array's order, and answers how many it took. Intake runs its shared
/// ones as the first part of another statement (`batch::known_kcis_under_conversation_locks`).
pub(super) fn locks_sql(exclusive: bool) -> String {
    let function = if exclusive {
        "pg_advisory_xact_lock"
    } else {
        "pg_advisory_xact_lock_shared"
    };
    format!(
        "SELECT count({function}({CONVERSATION_LOCK_NAMESPACE}, hashtext(c))) AS taken FROM jsonb_array_elements_text($1) AS c"
    )
}

/// Records registrations in one transaction, their conversation locks taken first, in the order
/// of their ids (as intake takes its shared ones), so that no cycle of waits can form.
async fn register_batch(
    db: &Database,
    registrations: &[(&NewConversation, ConversationSource)],
) -> Result<Vec<Registration>, StoreError> {
    let write = db.begin_write(Writer::Registrations).await?;
    let txn: &sea_orm::DatabaseTransaction = &write;
    lock_conversations(
        txn,
        registrations
            .iter()
            .map(|(new, _)| trimmed(&new.conversation_id)),
        true,
    )
    .await?;
    let ids: std::collections::HashSet<&str> = registrations
        .iter()
        .map(|(new, _)| trimmed(&new.conversation_id))
        .collect();
    let recorded = if ids.len() == registrations.len() {
        register_all_in(txn, registrations).await?
    } else {
        // The same conversation twice: each registration sees what the one before it did.
        let mut recorded = Vec::with_capacity(registrations.len());
        for (new, source) in registrations {
            recorded.push(register_in(txn, new, *source).await?);
        }
        recorded
    };
    write.commit().await?;
    for registration in &recorded {
        if registration.matched_entities > 0 {
            tracing::info!(
                conversation_id = registration.conversation.conversation_id,
                matched = registration.matched_entities,
                "registered conversation matched waiting entities"
            );
        }
    }
    Ok(recorded)
}

/// Registrations of distinct conversations inside `txn`, whose conversation locks are held, with
/// a fixed number of statements whatever their number: the conversations already recorded read
/// at once, the new ones inserted at once, the waiting entities of all of them found and locked
/// at once (round trips, not rows, are what a distant database charges for: docs/benchmarks.md,
/// sixth round). The same outcome as [`register_in`] one after the other: an entity waiting for
/// two of them is matched to the first.
async fn register_all_in(
    txn: &sea_orm::DatabaseTransaction,
    registrations: &[(&NewConversation, ConversationSource)],
) -> Result<Vec<Registration>, StoreError> {
    use crate::store::bulk::{self, Elements};
    let backend = txn.get_database_backend();
    let mut recorded: std::collections::HashMap<String, conversation::Model> =
        conversation::Entity::find()
            .filter(bulk::one_of(
                backend,
                conversation::Column::ConversationId,
                Elements::Text,
                registrations
                    .iter()
                    .map(|(new, _)| trimmed(&new.conversation_id).to_owned()),
            ))
            .all(txn)
            .await?
            .into_iter()
            .map(|c| (c.conversation_id.clone(), c))
            .collect();
    let mut conversations: Vec<Option<conversation::Model>> = Vec::new();
    let mut new_rows = Vec::new();
    for (new, source) in registrations {
        match recorded.remove(trimmed(&new.conversation_id)) {
            Some(existing) => conversations.push(Some(fill_in(txn, existing, new).await?)),
            None => {
                new_rows.push(new_row(new, *source));
                conversations.push(None);
            }
        }
    }
    let mut inserted = bulk::insert_returning(txn, new_rows, |c: &conversation::Model| c.id)
        .await?
        .into_iter();
    let mut registered = Vec::with_capacity(conversations.len());
    for conversation in conversations {
        let (conversation, created) = match conversation {
            Some(existing) => (existing, false),
            None => (
                inserted.next().ok_or_else(|| StoreError {
                    kind: crate::store::StoreErrorKind::Fault,
                    source: sea_orm::DbErr::Custom(
                        "fewer conversations inserted than registered".to_owned(),
                    ),
                })?,
                true,
            ),
        };
        registered.push(Registration {
            conversation,
            created,
            matched_entities: 0,
        });
    }

    // The entities waiting for any of them, locked; each goes to the first that it waits for.
    let keys: Vec<crate::intake::plan::EntityKey> = registered
        .iter()
        .filter_map(|r| {
            Some((
                r.conversation.entity_type.clone()?,
                r.conversation.gateway_id.clone()?,
            ))
        })
        .collect();
    let waiting = tracked_entity::Entity::find()
        .filter(tracked_entity::Column::Correlation.eq(Correlation::Unmatched))
        .filter(
            Condition::any()
                .add(bulk::one_of(
                    backend,
                    tracked_entity::Column::ConversationId,
                    Elements::Text,
                    registered
                        .iter()
                        .map(|r| r.conversation.conversation_id.clone()),
                ))
                .add(super::batch::entities_by_key_or_id(backend, &keys, &[])),
        )
        .order_by_asc(tracked_entity::Column::Id)
        .lock_exclusive()
        .all(txn)
        .await?;
    let mut matched: Vec<Vec<i64>> = vec![Vec::new(); registered.len()];
    for entity in &waiting {
        let first = registered.iter().position(|r| {
            let c = &r.conversation;
            entity.conversation_id == c.conversation_id
                || (c.entity_type.as_deref() == Some(entity.entity_type.as_str())
                    && c.gateway_id.as_deref() == Some(entity.gateway_id.as_str()))
        });
        if let Some(first) = first {
            matched[first].push(entity.id);
        }
    }
    for (registration, entities) in registered.iter_mut().zip(matched) {
        if entities.is_empty() {
            continue;
        }
        let these = Condition::all().add(bulk::one_of(
            backend,
            tracked_entity::Column::Id,
            Elements::BigInt,
            entities,
        ));
        registration.matched_entities =
            match_entities(txn, registration.conversation.id, these).await?;
    }
    Ok(registered)
}

/// Matches the entities of `which` that are still unmatched to the conversation `conversation_ref`;
/// how many it matched.
async fn match_entities(
    txn: &sea_orm::DatabaseTransaction,
    conversation_ref: i64,
    which: Condition,
) -> Result<u64, StoreError> {
    Ok(tracked_entity::Entity::update_many()
        .col_expr(
            tracked_entity::Column::Correlation,
            Expr::value(Correlation::Matched),
        )
        .col_expr(
            tracked_entity::Column::ConversationRef,
            Expr::value(conversation_ref),
        )
        .filter(tracked_entity::Column::Correlation.eq(Correlation::Unmatched))
        .filter(which)
        .exec(txn)
        .await?
        .rows_affected)
}

/// A conversation recorded before, with what a repeat registration adds that the first did not
/// know yet (the gateway id once the Tenant API answered); never overwriting what is recorded.
async fn fill_in(
    txn: &sea_orm::DatabaseTransaction,
    existing: conversation::Model,
    new: &NewConversation,
) -> Result<conversation::Model, StoreError> {
    let gateway_id = new.gateway_id().ok().flatten();
    let response_status = new.response_status().ok().flatten().map(i32::from);
    let mut update: conversation::ActiveModel = existing.clone().into();
    let mut changed = false;
    if existing.gateway_id.is_none() && gateway_id.is_some() {
        update.gateway_id = Set(gateway_id);
        changed = true;
    }
    if existing.response_status.is_none() && response_status.is_some() {
        update.response_status = Set(response_status);
        changed = true;
    }
    Ok(if changed {
        update.update(txn).await?
    } else {
        existing
    })
}

/// The row of a conversation registered for the first time.
fn new_row(new: &NewConversation, source: ConversationSource) -> conversation::ActiveModel {
    conversation::ActiveModel {
        conversation_id: Set(trimmed(&new.conversation_id).to_owned()),
        request_id: Set(new.request_id.clone()),
        operation: Set(new.operation.clone()),
        entity_type: Set(new.created_entity_type().map(|t| t.as_str().to_owned())),
        gateway_id: Set(new.gateway_id().ok().flatten()),
        request_body: Set(new.request_body.clone()),
        response_status: Set(new.response_status().ok().flatten().map(i32::from)),
        source: Set(source),
        registered_at: Set(Utc::now()),
        ..Default::default()
    }
}

/// One registration inside `txn`, whose conversation lock is held.
async fn register_in(
    txn: &sea_orm::DatabaseTransaction,
    new: &NewConversation,
    source: ConversationSource,
) -> Result<Registration, StoreError> {
    let conversation_id = trimmed(&new.conversation_id);
    let existing = conversation::Entity::find()
        .filter(conversation::Column::ConversationId.eq(conversation_id))
        .one(txn)
        .await?;
    let (conversation, created) = match existing {
        Some(existing) => (fill_in(txn, existing, new).await?, false),
        None => (new_row(new, source).insert(txn).await?, true),
    };

    // Unmatched entities that carried this conversation id, or (when the response told us the
    // gateway id) the very entity this request created.
    let mut waiting =
        Condition::any().add(tracked_entity::Column::ConversationId.eq(conversation_id));
    if let (Some(entity_type), Some(gateway_id)) = (
        conversation.entity_type.as_deref(),
        conversation.gateway_id.as_deref(),
    ) {
        waiting = waiting.add(
            Condition::all()
                .add(tracked_entity::Column::EntityType.eq(entity_type))
                .add(tracked_entity::Column::GatewayId.eq(gateway_id)),
        );
    }
    let matched = match_entities(txn, conversation.id, waiting).await?;
    Ok(Registration {
        conversation,
        created,
        matched_entities: matched,
    })
}
