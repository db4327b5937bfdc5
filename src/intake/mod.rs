//! Recording KCIs: design.md's "flow of one KCI", step 2, in one database transaction.
//!
//! Record the KCI (raw body kept), find or create the tracked entity and lock it, match it to its
//! original request by `X-Conversation-ID`, apply the state if the KCI is newer than what we hold,
//! append the transition to the history, write the outbox event and the audit record. Commit, and
//! only then may the caller answer 204.
//!
//! - [`group_commit`]: concurrent deliveries are gathered and recorded together, one transaction
//!   and one durable commit for all of them; each caller gets its own outcome.
//! - [`batch`]: one transaction for a batch: load under lock, decide, write every table with one
//!   multi-row statement.
//! - [`plan`]: the decisions (idempotency, monotonic state, lifecycles, matching), in memory.
//! - [`conversations`]: registering original requests.
//!
//! A transaction that loses a race (the same new entity or KCI id inserted at once by another
//! batch, a deadlock) rolls back and runs again, when the winner's rows are visible
//! (`store::retry_on_race`).
//!
//! Time is bounded (design.md, "Bounded time"): a KCI is recorded within `intake.deadline_ms` of
//! its arrival or the gateway is answered 503 with `Retry-After` (a KCI that commits after its
//! deadline is simply a redelivery later); a full queue is answered 503 at once.

pub mod batch;
pub mod conversations;
pub mod group_commit;
pub mod missing;
pub mod plan;
pub mod rules;

use std::time::Duration;

use entity::state_transition::KciSource;
use sea_orm::ConnectionTrait;
use uuid::Uuid;

use crate::kci::Kci;
use crate::store::audit::{AuditOutcome, AuditRecord};
use crate::store::{Database, StoreError, Writer, retry_on_race};

/// Why a KCI was not recorded. The gateway is answered 503 for all but a fault of ours. Cheap
/// to clone: every KCI of a failed batch gets the batch's error, with its whole cause chain.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IntakeError {
    /// The database failed (classified: unavailable, lost race, or fault).
    #[error(transparent)]
    Store(std::sync::Arc<StoreError>),
    /// The queue in front of the committers is full: more KCIs arrive than the database takes.
    #[error("intake is overloaded: {waiting} KCIs already wait to be recorded")]
    Overloaded { waiting: usize },
    /// Not recorded within `intake.deadline_ms`; it may still commit, and is then a redelivery.
    #[error("not recorded within the {0:?} deadline")]
    DeadlineExceeded(Duration),
    /// The process is stopping.
    #[error("intake is shutting down")]
    ShuttingDown,
    /// What the loader read does not fit what the planner needs: a bug, not a database fault.
    #[error("intake inconsistency: {0}")]
    Inconsistent(String),
}

impl From<StoreError> for IntakeError {
    fn from(error: StoreError) -> Self {
        IntakeError::Store(std::sync::Arc::new(error))
    }
}

impl crate::store::write::LostRace for IntakeError {
    fn lost_race(&self) -> bool {
        matches!(self, IntakeError::Store(error) if error.is_retryable())
    }
}

/// One delivery of a KCI by the gateway.
pub struct Delivery {
    pub kci: Kci,
    /// The body exactly as received.
    pub raw_body: String,
    pub request_id: String,
    pub conversation_id: String,
    /// The audit record of this request; its outcome is completed here.
    pub audit: AuditRecord,
    /// Delivered by the gateway, or recovered by reconciliation (`crate::reconcile`): the same
    /// rules either way, the source recorded in history and published in the envelope.
    pub source: KciSource,
    /// Intake's span in the W3C trace (the gateway's `traceparent` continued, or a new trace):
    /// published as the AMQP `traceparent` header.
    pub trace: crate::trace_context::TraceContext,
}

/// What recording did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new KCI, newer than what we held: the current state moved.
    Applied,
    /// A new KCI older than the one applied: recorded, state unchanged.
    Stale,
    /// A new KCI with the sequence number already applied: recorded, state unchanged.
    DuplicateSequence,
    /// The same KCI again: nothing changed but its redelivery counter.
    Redelivered,
    /// The same KCI id with different content: recorded as an anomaly, not applied.
    Anomaly,
}

impl Outcome {
    /// The audit log's word for it.
    pub fn audit_outcome(self) -> AuditOutcome {
        match self {
            Outcome::Applied | Outcome::Stale | Outcome::DuplicateSequence => {
                AuditOutcome::Accepted
            }
            Outcome::Redelivered => AuditOutcome::Redelivered,
            Outcome::Anomaly => AuditOutcome::Anomaly,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub outcome: Outcome,
    pub tracked_entity_id: i64,
    /// The outbox event written, when one was (new KCIs only).
    pub event_id: Option<Uuid>,
}

/// Records one delivery durably, alone. `Ok` means committed.
pub async fn record(
    db: &Database,
    delivery: &Delivery,
    notify_other_processes: bool,
) -> Result<Recorded, IntakeError> {
    let mut recorded = record_batch(db, &[delivery], notify_other_processes).await?;
    recorded
        .pop()
        .ok_or_else(|| IntakeError::Inconsistent("a delivery recorded nothing".to_owned()))
}

/// Records deliveries in one transaction, in the order given; one [`Recorded`] each. `Ok` means
/// committed. `notify_other_processes`: PostgreSQL `NOTIFY` for relays in other processes.
pub async fn record_batch(
    db: &Database,
    deliveries: &[&Delivery],
    notify_other_processes: bool,
) -> Result<Vec<Recorded>, IntakeError> {
    record_batch_timed(db, deliveries, notify_other_processes, &Default::default()).await
}

/// Where one batch's time went (all attempts of it together), for the stage histogram and the
/// debug log: what the tail of `POST /kcis` is made of.
#[derive(Debug, Default, Clone, Copy)]
pub struct StageTimes {
    /// Getting a connection (or SQLite's write turn) and `BEGIN`.
    pub begin: std::time::Duration,
    /// Locks and reads: conversations, known KCIs, the entities (`FOR UPDATE`), the rules.
    pub load: std::time::Duration,
    /// The batch's inserts and updates.
    pub write: std::time::Duration,
    /// `COMMIT` (the durable flush).
    pub commit: std::time::Duration,
}

/// [`record_batch`], adding each stage's time to `times`.
pub async fn record_batch_timed(
    db: &Database,
    deliveries: &[&Delivery],
    notify_other_processes: bool,
    times: &std::sync::Mutex<StageTimes>,
) -> Result<Vec<Recorded>, IntakeError> {
    retry_on_race("intake transaction", || {
        record_batch_once(db, deliveries, notify_other_processes, times)
    })
    .await
}

async fn record_batch_once(
    db: &Database,
    deliveries: &[&Delivery],
    notify_other_processes: bool,
    times: &std::sync::Mutex<StageTimes>,
) -> Result<Vec<Recorded>, IntakeError> {
    let add = |stage: fn(&mut StageTimes) -> &mut std::time::Duration,
               since: std::time::Instant| {
        if let Ok(mut times) = times.lock() {
            *stage(&mut times) += since.elapsed();
        }
    };
    let started = std::time::Instant::now();
    let txn = db.begin_write(Writer::Intake).await?;
    add(|t| &mut t.begin, started);
    let recorded = batch::record(&txn, deliveries, &add).await?;
    let committing = std::time::Instant::now();
    // Relays in other processes LISTEN for this; it is delivered only if the transaction commits.
    if notify_other_processes && txn.get_database_backend() == sea_orm::DbBackend::Postgres {
        txn.execute_unprepared(&format!("NOTIFY {}", crate::outbox::signal::NOTIFY_CHANNEL))
            .await
            .map_err(StoreError::from)?;
    }
    txn.commit().await.map_err(StoreError::from)?;
    add(|t| &mut t.commit, committing);
    Ok(recorded)
}
