//! Group commit: deliveries that arrive while a transaction is being written wait in a queue and
//! are recorded together by the next free committer, in one transaction with one durable commit.
//! Each caller is answered with its own outcome only after that commit, so a 204 still means "on
//! disk". Nobody waits for company: a committer takes what has queued up and goes; under light
//! load every batch holds one KCI.
//!
//! If a batch fails for a reason that may be one delivery's (a database fault rather than the
//! database being unreachable), its deliveries are recorded again one by one, so one bad KCI
//! cannot fail its neighbours.

use std::sync::Arc;

use sea_orm::{DatabaseConnection, DbErr};
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Delivery, Recorded, record, record_batch};
use crate::config::IntakeSettings;
use crate::store::{StoreError, StoreErrorKind};

struct Job {
    delivery: Delivery,
    answer: oneshot::Sender<Result<Recorded, StoreError>>,
}

/// The queue in front of the committers; cheap to clone. The committers stop once every clone
/// is dropped and the queue is empty.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Job>,
}

impl GroupCommit {
    /// Starts `settings.committers` committers on the current Tokio runtime; one on SQLite,
    /// which has one writer at a time (more would only queue on its lock, and time out there).
    pub fn start(db: DatabaseConnection, settings: &IntakeSettings) -> GroupCommit {
        let max_batch = settings.max_batch.max(1);
        let committers = match db.get_database_backend() {
            sea_orm::DbBackend::Sqlite => 1,
            _ => settings.committers.max(1),
        };
        let (queue, jobs) = mpsc::channel(max_batch * committers * 2);
        let jobs = Arc::new(Mutex::new(jobs));
        for _ in 0..committers {
            tokio::spawn(committer(db.clone(), jobs.clone(), max_batch));
        }
        GroupCommit { queue }
    }

    /// Records one delivery; `Ok` means committed.
    pub async fn record(&self, delivery: Delivery) -> Result<Recorded, StoreError> {
        let (answer, answered) = oneshot::channel();
        self.queue
            .send(Job { delivery, answer })
            .await
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

fn stopped() -> StoreError {
    StoreError {
        kind: StoreErrorKind::Unavailable,
        source: DbErr::Custom("intake is shutting down".to_owned()),
    }
}

async fn committer(
    db: DatabaseConnection,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    max_batch: usize,
) {
    loop {
        // One committer at a time waits for work; it takes everything queued, up to max_batch.
        let batch = {
            let mut jobs = jobs.lock().await;
            let Some(first) = jobs.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            batch
        };
        commit(&db, batch).await;
    }
}

async fn commit(db: &DatabaseConnection, batch: Vec<Job>) {
    let deliveries: Vec<&Delivery> = batch.iter().map(|job| &job.delivery).collect();
    let result = record_batch(db, &deliveries).await;
    drop(deliveries);
    match result {
        Ok(recorded) => {
            for (job, recorded) in batch.into_iter().zip(recorded) {
                let _ = job.answer.send(Ok(recorded));
            }
        }
        Err(error) if batch.len() > 1 && error.kind == StoreErrorKind::Fault => {
            tracing::warn!(error = %error, kcis = batch.len(), "a batch failed; recording its KCIs one by one");
            for job in batch {
                let result = record(db, &job.delivery).await;
                let _ = job.answer.send(result);
            }
        }
        Err(error) => {
            let mut jobs = batch.into_iter();
            let first = jobs.next();
            for job in jobs {
                let _ = job.answer.send(Err(StoreError {
                    kind: error.kind,
                    source: DbErr::Custom(error.to_string()),
                }));
            }
            if let Some(job) = first {
                let _ = job.answer.send(Err(error));
            }
        }
    }
}
