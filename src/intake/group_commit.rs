//! Group commit: deliveries that arrive while a transaction is being written wait in a queue and
//! are recorded together by the next free committer, in one transaction with one durable commit.
//! Each caller is answered with its own outcome only after that commit, so a 204 still means "on
//! disk". Nobody waits for company: a committer takes what has queued up and goes; under light
//! load every batch holds one KCI.
//!
//! If a batch fails for a reason that may be one delivery's (a database fault rather than the
//! database being unreachable), its deliveries are recorded again one by one, so one bad KCI
//! cannot fail its neighbours.
//!
//! Time is bounded: a full queue is refused at once ([`IntakeError::Overloaded`]), a caller
//! waits at most until its deadline, a committer skips deliveries whose caller has given up, and
//! abandons a transaction that outlives every deadline in its batch (a hung database must not
//! hold the committers forever).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;

use super::{Delivery, IntakeError, Recorded, record, record_batch};
use crate::config::IntakeSettings;

struct Job {
    delivery: Delivery,
    deadline: Instant,
    answer: oneshot::Sender<Result<Recorded, IntakeError>>,
}

/// The queue in front of the committers; cheap to clone. The committers stop once every clone
/// is dropped and the queue is empty.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Job>,
}

/// What every committer shares.
struct Committers {
    db: crate::store::Database,
    jobs: Mutex<mpsc::Receiver<Job>>,
    max_batch: usize,
    notify_other_processes: bool,
}

impl GroupCommit {
    /// Starts `settings.committers` committers on the current Tokio runtime; one on SQLite,
    /// which has one writer at a time (more would only queue on its lock, and time out there).
    /// `notify_other_processes`: PostgreSQL `NOTIFY` at each commit, for relays in other
    /// processes (`relay.notify_other_processes`).
    pub fn start(
        db: crate::store::Database,
        settings: &IntakeSettings,
        notify_other_processes: bool,
    ) -> GroupCommit {
        let max_batch = settings.max_batch.max(1);
        let committers = match db.get_database_backend() {
            sea_orm::DbBackend::Sqlite => 1,
            _ => settings.committers.max(1),
        };
        let (queue, jobs) = mpsc::channel(max_batch * committers * 2);
        let shared = Arc::new(Committers {
            db,
            jobs: Mutex::new(jobs),
            max_batch,
            notify_other_processes,
        });
        for _ in 0..committers {
            tokio::spawn(committer(shared.clone()));
        }
        GroupCommit { queue }
    }

    /// Records one delivery by `deadline`; `Ok` means committed.
    pub async fn record(
        &self,
        delivery: Delivery,
        deadline: Instant,
    ) -> Result<Recorded, IntakeError> {
        let (answer, answered) = oneshot::channel();
        let job = Job {
            delivery,
            deadline,
            answer,
        };
        self.queue.try_send(job).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => IntakeError::Overloaded {
                waiting: self.queue.max_capacity(),
            },
            mpsc::error::TrySendError::Closed(_) => IntakeError::ShuttingDown,
        })?;
        match tokio::time::timeout_at(deadline, answered).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(IntakeError::ShuttingDown),
            Err(_) => Err(IntakeError::DeadlineExceeded(
                deadline.saturating_duration_since(Instant::now()),
            )),
        }
    }
}

async fn committer(shared: Arc<Committers>) {
    loop {
        // One committer at a time waits for work; it takes everything queued, up to max_batch.
        let batch = {
            let mut jobs = shared.jobs.lock().await;
            let Some(first) = jobs.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < shared.max_batch {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        // A caller that gave up (its deadline passed while it waited in the queue) is answered
        // 503 already: recording its KCI now would only be work for nobody.
        let batch: Vec<Job> = batch
            .into_iter()
            .filter(|job| !job.answer.is_closed())
            .collect();
        if !batch.is_empty() {
            commit(&shared, batch).await;
        }
    }
}

/// The latest deadline of a batch: past it, nobody waits for the outcome.
fn last_deadline(batch: &[Job]) -> Instant {
    batch
        .iter()
        .map(|job| job.deadline)
        .max()
        .unwrap_or_else(Instant::now)
}

async fn commit(shared: &Committers, batch: Vec<Job>) {
    let deliveries: Vec<&Delivery> = batch.iter().map(|job| &job.delivery).collect();
    let deadline = last_deadline(&batch);
    let result = match tokio::time::timeout_at(
        deadline,
        record_batch(&shared.db, &deliveries, shared.notify_other_processes),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(IntakeError::DeadlineExceeded(Duration::ZERO)),
    };
    drop(deliveries);
    match result {
        Ok(recorded) => {
            for (job, recorded) in batch.into_iter().zip(recorded) {
                let _ = job.answer.send(Ok(recorded));
            }
        }
        Err(IntakeError::Store(error)) if batch.len() > 1 && !error.is_unavailable() => {
            tracing::warn!(error = %error, kcis = batch.len(), "a batch failed; recording its KCIs one by one");
            for job in batch {
                let result = match tokio::time::timeout_at(
                    job.deadline,
                    record(&shared.db, &job.delivery, shared.notify_other_processes),
                )
                .await
                {
                    Ok(result) => result,
                    Err(_) => Err(IntakeError::DeadlineExceeded(Duration::ZERO)),
                };
                let _ = job.answer.send(result);
            }
        }
        Err(error) => {
            // Every caller of the batch gets the same answer, with the same cause chain.
            tracing::warn!(error = %error, kcis = batch.len(), "a batch was not recorded");
            for job in batch {
                let _ = job.answer.send(Err(error.clone()));
            }
        }
    }
}
