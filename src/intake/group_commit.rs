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

use super::{Delivery, IntakeError, Recorded, StageTimes, record, record_batch_timed};
use crate::config::IntakeSettings;

struct Job {
    delivery: Delivery,
    deadline: Instant,
    /// When it was queued: its wait for a committer is the first stage of its time.
    queued_at: std::time::Instant,
    answer: oneshot::Sender<Result<Recorded, IntakeError>>,
}

/// The queue in front of the committers; cheap to clone. The committers stop once every clone
/// is dropped and the queue is empty.
#[derive(Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Job>,
    stats: IntakeStats,
    /// Original requests, likewise several per transaction.
    registrar: super::conversations::Registrar,
}

/// What group commit measures, for `/metrics`.
#[derive(Clone)]
struct IntakeStats {
    /// KCIs per transaction.
    batch_size: prometheus::Histogram,
    /// One batch's transaction, begin to commit.
    commit_duration: prometheus::Histogram,
    /// Where the time of a `POST /kcis` goes: `queue_wait` (each KCI's wait for a committer),
    /// then per batch `begin`, `load`, `write`, `commit` (see [`StageTimes`]).
    stages: prometheus::HistogramVec,
}

/// What every committer shares.
struct Committers {
    db: crate::store::Database,
    jobs: Mutex<mpsc::Receiver<Job>>,
    max_batch: usize,
    notify_other_processes: bool,
    stats: IntakeStats,
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
        use crate::outbox::relay::histogram;
        let stats = IntakeStats {
            batch_size: histogram(
                "intake_batch_size",
                "KCIs recorded per transaction (group commit)",
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            ),
            commit_duration: histogram(
                "intake_commit_duration_seconds",
                "One intake transaction, begin to commit, whatever its outcome",
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            ),
            stages: prometheus::HistogramVec::new(
                prometheus::HistogramOpts::new(
                    "intake_stage_duration_seconds",
                    "Where intake's time goes: each KCI's wait for a committer (queue_wait), and per batch getting a connection and BEGIN (begin), locks and reads (load), inserts and updates (write), COMMIT (commit)",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["stage"],
            )
            .expect("valid metric"),
        };
        let registrar = super::conversations::Registrar::start(
            db.clone(),
            Duration::from_millis(settings.deadline_ms.max(1)),
        );
        let shared = Arc::new(Committers {
            db,
            jobs: Mutex::new(jobs),
            max_batch,
            notify_other_processes,
            stats: stats.clone(),
        });
        for _ in 0..committers {
            tokio::spawn(committer(shared.clone()));
        }
        GroupCommit {
            queue,
            stats,
            registrar,
        }
    }

    /// Intake's histograms, for `/metrics`.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.stats.batch_size.clone()),
            Box::new(self.stats.commit_duration.clone()),
            Box::new(self.stats.stages.clone()),
        ]
    }

    /// Registers an original request, with others that arrive meanwhile in one transaction
    /// ([`super::conversations::Registrar`]); `Ok` means committed.
    pub async fn register(
        &self,
        new: super::conversations::NewConversation,
        source: entity::conversation::ConversationSource,
    ) -> Result<super::conversations::Registration, crate::store::StoreError> {
        self.registrar.register(new, source).await
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
            queued_at: std::time::Instant::now(),
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

/// Which deliveries a failed batch is about, for its log line: the `X-Request-ID`s and
/// `X-Conversation-ID`s of its first KCIs (a committer runs outside their requests' spans).
fn correlation_ids(batch: &[Job]) -> (String, String) {
    let first = &batch[..batch.len().min(8)];
    let requests: Vec<&str> = first
        .iter()
        .map(|j| j.delivery.request_id.as_str())
        .collect();
    let conversations: Vec<&str> = first
        .iter()
        .map(|j| j.delivery.conversation_id.as_str())
        .collect();
    (requests.join(","), conversations.join(","))
}

async fn commit(shared: &Committers, batch: Vec<Job>) {
    let deliveries: Vec<&Delivery> = batch.iter().map(|job| &job.delivery).collect();
    let deadline = last_deadline(&batch);
    shared.stats.batch_size.observe(batch.len() as f64);
    let started = std::time::Instant::now();
    let queue_wait = shared.stats.stages.with_label_values(&["queue_wait"]);
    let mut longest_wait = Duration::ZERO;
    for job in &batch {
        let waited = started.duration_since(job.queued_at);
        longest_wait = longest_wait.max(waited);
        queue_wait.observe(waited.as_secs_f64());
    }
    let times = std::sync::Mutex::new(StageTimes::default());
    let result = match tokio::time::timeout_at(
        deadline,
        record_batch_timed(
            &shared.db,
            &deliveries,
            shared.notify_other_processes,
            &times,
        ),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => Err(IntakeError::DeadlineExceeded(Duration::ZERO)),
    };
    let took = started.elapsed();
    shared.stats.commit_duration.observe(took.as_secs_f64());
    let times = times.into_inner().unwrap_or_default();
    for (stage, spent) in [
        ("begin", times.begin),
        ("load", times.load),
        ("write", times.write),
        ("commit", times.commit),
    ] {
        shared
            .stats
            .stages
            .with_label_values(&[stage])
            .observe(spent.as_secs_f64());
    }
    tracing::debug!(
        kcis = batch.len(),
        longest_queue_wait_ms = longest_wait.as_secs_f64() * 1e3,
        begin_ms = times.begin.as_secs_f64() * 1e3,
        load_ms = times.load.as_secs_f64() * 1e3,
        write_ms = times.write.as_secs_f64() * 1e3,
        commit_ms = times.commit.as_secs_f64() * 1e3,
        total_ms = took.as_secs_f64() * 1e3,
        "intake batch"
    );
    drop(deliveries);
    match result {
        Ok(recorded) => {
            for (job, recorded) in batch.into_iter().zip(recorded) {
                let _ = job.answer.send(Ok(recorded));
            }
        }
        Err(IntakeError::Store(error)) if batch.len() > 1 && !error.is_unavailable() => {
            let (ids, conversations) = correlation_ids(&batch);
            tracing::warn!(error = %error, kcis = batch.len(), x_request_id = ids, x_conversation_id = conversations, "a batch failed; recording its KCIs one by one");
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
            let (ids, conversations) = correlation_ids(&batch);
            tracing::warn!(error = %error, kcis = batch.len(), x_request_id = ids, x_conversation_id = conversations, "a batch was not recorded");
            for job in batch {
                let _ = job.answer.send(Err(error.clone()));
            }
        }
    }
}
