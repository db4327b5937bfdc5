//! Writing: [`Database`], the handle every writer goes through, its write transactions, and
//! [`retry_on_race`] for work that lost a race with a concurrent transaction.

use std::sync::Arc;
use std::time::Instant;

use sea_orm::{
    DatabaseConnection, DatabaseTransaction, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
};

use super::StoreError;

/// The connection pool, with the queue of this process's SQLite writers ([`WriterTurns`]).
/// PostgreSQL needs no queue; readers use [`Database::connection`] (or the handle itself, through
/// `Deref`).
#[derive(Clone, Debug)]
pub struct Database {
    connection: DatabaseConnection,
    /// SQLite: the one connection every write transaction of [`Database::begin_write`] runs on
    /// (a pool of one, opened on first use with the pool's own options). SQLite empties a
    /// connection's whole page cache when it finds that another connection wrote since its last
    /// transaction, so writes taking turns over the pool's connections each began cold: every
    /// B-tree page of every index they touched read again through `pread`, every statement
    /// prepared again in that connection's cache. On one connection, what a write touched last
    /// time is still in its cache (docs/benchmarks.md, "Eleventh round").
    sqlite_writer: Option<DatabaseConnection>,
    writer_turns: Arc<WriterTurns>,
    writes: WriteStats,
}

/// Who takes a write transaction: the `writer` label of
/// `kci_receiver_write_transaction_seconds`. On SQLite it says who holds the one writer's turn
/// while intake waits for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// Group commit's batches of KCIs.
    Intake,
    /// Original requests registered (the registrar's batches and the direct path).
    Registrations,
    /// The outbox relay recording a round's outcomes.
    Relay,
    /// Retention's pruning batches.
    Retention,
    /// Gap repair claiming and finishing a reconciliation.
    Reconcile,
}

impl Writer {
    fn label(self) -> &'static str {
        match self {
            Writer::Intake => "intake",
            Writer::Registrations => "registrations",
            Writer::Relay => "relay",
            Writer::Retention => "retention",
            Writer::Reconcile => "reconcile",
        }
    }
}

/// Each write transaction's wait to begin (on SQLite: this process's writer queue, then
/// `BEGIN IMMEDIATE`; on PostgreSQL: a pooled connection and `BEGIN`) and how long it was held
/// (begin to commit or rollback), by writer.
#[derive(Clone, Debug)]
struct WriteStats(prometheus::HistogramVec);

impl WriteStats {
    fn new() -> WriteStats {
        WriteStats(
            prometheus::HistogramVec::new(
                prometheus::HistogramOpts::new(
                    "write_transaction_seconds",
                    "Write transactions by writer: the wait to begin one (phase=wait: on SQLite the turn of its one writer) and how long it was held (phase=held, begin to commit or rollback)",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
                &["writer", "phase"],
            )
            .expect("valid metric"),
        )
    }

    fn observe(&self, writer: Writer, phase: &str, seconds: f64) {
        self.0
            .with_label_values(&[writer.label(), phase])
            .observe(seconds);
    }
}

impl Database {
    pub fn new(connection: DatabaseConnection) -> Database {
        let sqlite_writer =
            (connection.get_database_backend() == sea_orm::DbBackend::Sqlite).then(|| {
                let pool = connection.get_sqlite_connection_pool();
                let writer = pool
                    .options()
                    .clone()
                    .max_connections(1)
                    .min_connections(0)
                    .connect_lazy_with(
                        (*pool.connect_options())
                            .clone()
                            // Every statement of every writer runs here, each one text whatever
                            // the number of rows (`store::bulk`): room for all of them.
                            .statement_cache_capacity(64)
                            // Its checkpoints are left to `store::checkpoints`.
                            .pragma(
                                "wal_autocheckpoint",
                                super::checkpoints::WRITER_AUTOCHECKPOINT_PAGES.to_string(),
                            ),
                    );
                sea_orm::SqlxSqliteConnector::from_sqlx_sqlite_pool(writer)
            });
        Database {
            connection,
            sqlite_writer,
            writer_turns: Arc::new(WriterTurns::default()),
            writes: WriteStats::new(),
        }
    }

    /// The write transactions' histogram, for `/metrics`.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![Box::new(self.writes.0.clone())]
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.connection
    }

    /// Starts a write transaction: `BEGIN IMMEDIATE` on SQLite so that the write lock is taken
    /// up front (a deferred transaction that upgrades later fails with BUSY instead of waiting),
    /// after waiting for this handle's turn to write. `writer` labels its timings.
    pub async fn begin_write(&self, writer: Writer) -> Result<WriteTransaction, StoreError> {
        let asked = Instant::now();
        let turn = match self.connection.get_database_backend() {
            sea_orm::DbBackend::Sqlite => Some(self.writer_turns.take(writer).await),
            _ => None,
        };
        let txn = self
            .sqlite_writer
            .as_ref()
            .unwrap_or(&self.connection)
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        let began = Instant::now();
        self.writes
            .observe(writer, "wait", (began - asked).as_secs_f64());
        Ok(WriteTransaction {
            txn,
            _held: HeldTimer {
                stats: self.writes.clone(),
                writer,
                began,
            },
            _turn: turn,
        })
    }
}

impl From<DatabaseConnection> for Database {
    fn from(connection: DatabaseConnection) -> Database {
        Database::new(connection)
    }
}

impl std::ops::Deref for Database {
    type Target = DatabaseConnection;

    fn deref(&self) -> &DatabaseConnection {
        &self.connection
    }
}

/// Reads go straight to the pool: `.all(&db)` works on the handle as on the connection. (Written
/// out as `async_trait` expands it: the crate is not a dependency of ours.)
impl sea_orm::ConnectionTrait for Database {
    fn get_database_backend(&self) -> sea_orm::DbBackend {
        self.connection.get_database_backend()
    }

    fn execute_raw<'life0, 'async_trait>(
        &'life0 self,
        statement: sea_orm::Statement,
    ) -> BoxFuture<'async_trait, Result<sea_orm::ExecResult, sea_orm::DbErr>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.connection.execute_raw(statement)
    }

    fn execute_unprepared<'life0, 'life1, 'async_trait>(
        &'life0 self,
        sql: &'life1 str,
    ) -> BoxFuture<'async_trait, Result<sea_orm::ExecResult, sea_orm::DbErr>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.connection.execute_unprepared(sql)
    }

    fn query_one_raw<'life0, 'async_trait>(
        &'life0 self,
        statement: sea_orm::Statement,
    ) -> BoxFuture<'async_trait, Result<Option<sea_orm::QueryResult>, sea_orm::DbErr>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.connection.query_one_raw(statement)
    }

    fn query_all_raw<'life0, 'async_trait>(
        &'life0 self,
        statement: sea_orm::Statement,
    ) -> BoxFuture<'async_trait, Result<Vec<sea_orm::QueryResult>, sea_orm::DbErr>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.connection.query_all_raw(statement)
    }
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// A write transaction; on SQLite it also holds its handle's turn to write until it ends.
/// (Fields drop in order: the time held is taken before the turn passes on.)
pub struct WriteTransaction {
    txn: DatabaseTransaction,
    _held: HeldTimer,
    _turn: Option<WriterTurn>,
}

/// Observes how long a write transaction was held when it ends: committed, rolled back, or
/// dropped by a task that was cancelled or panicked.
struct HeldTimer {
    stats: WriteStats,
    writer: Writer,
    began: Instant,
}

impl Drop for HeldTimer {
    fn drop(&mut self) {
        self.stats
            .observe(self.writer, "held", self.began.elapsed().as_secs_f64());
    }
}

impl std::ops::Deref for WriteTransaction {
    type Target = DatabaseTransaction;

    fn deref(&self) -> &DatabaseTransaction {
        &self.txn
    }
}

impl WriteTransaction {
    pub async fn commit(self) -> Result<(), sea_orm::DbErr> {
        self.txn.commit().await
    }
}

/// How long a writer other than intake may wait for SQLite's writer while intake keeps asking for
/// it, before it goes first. It bounds the relay's and the registrations' delay behind a busy
/// intake (the publish lag's share of it) without ever starving them.
pub const OTHERS_MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// The turns of this process's writers at SQLite's one writer. SQLite's busy handler is not fair:
/// group commit's back-to-back transactions once kept the relay from recording what it had
/// published (publish lag p99 3.8 s in the benchmark), so writers queue here instead, and the
/// turn passes on when a transaction ends:
///
/// - to intake first, since a `POST /kcis` waits for its batch's commit, while the relay's
///   records and registrations are work nobody is waiting on the wire for;
/// - to the writer other than intake that has waited longest, when it has waited
///   [`OTHERS_MAX_WAIT`] or more, or when intake is not waiting;
/// - in order of arrival among intake's waiters, and among the others.
///
/// A waiter that gives up (its task cancelled) never keeps the turn: one handed to it as it went
/// passes on.
#[derive(Debug, Default)]
struct WriterTurns {
    queue: std::sync::Mutex<TurnQueue>,
}

#[derive(Debug, Default)]
struct TurnQueue {
    held: bool,
    intake: std::collections::VecDeque<tokio::sync::oneshot::Sender<()>>,
    others: std::collections::VecDeque<(tokio::time::Instant, tokio::sync::oneshot::Sender<()>)>,
}

impl TurnQueue {
    fn next_waiter(&mut self) -> Option<tokio::sync::oneshot::Sender<()>> {
        let other_overdue = self
            .others
            .front()
            .is_some_and(|(since, _)| since.elapsed() >= OTHERS_MAX_WAIT);
        if other_overdue || self.intake.is_empty() {
            self.others.pop_front().map(|(_, waiter)| waiter)
        } else {
            self.intake.pop_front()
        }
    }
}

/// The turn at SQLite's writer, held until dropped.
#[derive(Debug)]
struct WriterTurn(Arc<WriterTurns>);

impl Drop for WriterTurn {
    fn drop(&mut self) {
        self.0.pass_on();
    }
}

impl WriterTurns {
    /// Waits for `writer`'s turn.
    async fn take(self: &Arc<Self>, writer: Writer) -> WriterTurn {
        let handed = {
            let mut queue = self.queue.lock().expect("writer turns never poisoned");
            if !queue.held {
                queue.held = true;
                return WriterTurn(self.clone());
            }
            let (hand, handed) = tokio::sync::oneshot::channel();
            if writer == Writer::Intake {
                queue.intake.push_back(hand);
            } else {
                queue.others.push_back((tokio::time::Instant::now(), hand));
            }
            handed
        };
        let mut waiting = Waiting {
            turns: self.clone(),
            handed: Some(handed),
        };
        let handed = waiting.handed.as_mut().expect("set above");
        // The sender is only dropped unsent when the queue itself is, which `self` prevents.
        let _ = handed.await;
        waiting.handed = None;
        WriterTurn(self.clone())
    }

    /// Hands the turn to the next waiter still waiting, or frees it. (The lock is held only to
    /// move a sender out of a queue: never across an await, and nothing in it can panic.)
    fn pass_on(&self) {
        let mut queue = self.queue.lock().expect("writer turns never poisoned");
        loop {
            match queue.next_waiter() {
                None => {
                    queue.held = false;
                    return;
                }
                Some(waiter) => {
                    if waiter.send(()).is_ok() {
                        return;
                    }
                    // It gave up waiting: the next one.
                }
            }
        }
    }
}

/// A waiter for a turn; if dropped before it returned (a cancelled task), a turn handed to it
/// meanwhile passes on.
struct Waiting {
    turns: Arc<WriterTurns>,
    handed: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if let Some(mut handed) = self.handed.take() {
            handed.close();
            if handed.try_recv().is_ok() {
                self.turns.pass_on();
            }
        }
    }
}

/// An error that may mean the work lost a race with a concurrent transaction (the same new row
/// inserted at once, a deadlock, a serialization failure): run again, the winner's rows are then
/// visible.
pub trait LostRace {
    fn lost_race(&self) -> bool;
}

impl LostRace for StoreError {
    fn lost_race(&self) -> bool {
        self.is_retryable()
    }
}

/// How many times work that keeps losing races is run in all before its error is returned.
pub const RACE_ATTEMPTS: usize = 5;

/// Runs `work` until it does not lose a race, at most [`RACE_ATTEMPTS`] times.
pub async fn retry_on_race<T, E, Work, Fut>(what: &str, mut work: Work) -> Result<T, E>
where
    E: LostRace + std::fmt::Display,
    Work: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match work().await {
            Err(error) if error.lost_race() && attempt < RACE_ATTEMPTS => {
                tracing::debug!(attempt, %error, "{what} lost a race; running it again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Holds the turn while `waiters` queue behind it (each followed by `then` of virtual time),
    /// lets go, and returns the order in which they had their turns.
    async fn turns_taken(
        waiters: &[(Writer, &'static str, std::time::Duration)],
    ) -> Vec<&'static str> {
        let turns = Arc::new(WriterTurns::default());
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let held = turns.take(Writer::Intake).await;
        let mut tasks = Vec::new();
        for &(writer, name, then) in waiters {
            let (turns, order) = (turns.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _turn = turns.take(writer).await;
                order.lock().unwrap().push(name);
            }));
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            tokio::time::advance(then).await;
        }
        drop(held);
        for task in tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(order).unwrap().into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn intake_goes_before_other_writers_that_have_not_waited_long() {
        let order = turns_taken(&[
            (Writer::Relay, "relay", Duration::ZERO),
            (Writer::Intake, "intake", Duration::ZERO),
            (Writer::Registrations, "registrations", Duration::ZERO),
            (Writer::Intake, "intake again", OTHERS_MAX_WAIT / 2),
        ])
        .await;
        assert_eq!(order, ["intake", "intake again", "relay", "registrations"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_waited_the_bound_goes_before_intake() {
        let order = turns_taken(&[
            (Writer::Relay, "relay", OTHERS_MAX_WAIT),
            (Writer::Intake, "intake", Duration::ZERO),
        ])
        .await;
        assert_eq!(order, ["relay", "intake"]);
    }

    /// Polls `waiting` once, so that it is queued.
    fn queued(waiting: &mut std::pin::Pin<Box<impl std::future::Future<Output = WriterTurn>>>) {
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(waiting.as_mut().poll(&mut context).is_pending());
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_never_keeps_the_turn() {
        let turns = Arc::new(WriterTurns::default());
        let held = turns.take(Writer::Intake).await;
        // Gives up before the turn comes.
        let mut gave_up_early = Box::pin(turns.take(Writer::Intake));
        queued(&mut gave_up_early);
        // Handed the turn, then gone before it ran (its task cancelled between the two).
        let mut gone_when_handed = Box::pin(turns.take(Writer::Relay));
        queued(&mut gone_when_handed);
        let mut last = Box::pin(turns.take(Writer::Registrations));
        queued(&mut last);
        drop(gave_up_early);
        drop(held);
        drop(gone_when_handed);
        let last = tokio::time::timeout(Duration::from_secs(1), last)
            .await
            .expect("the turn reached the last waiter");
        drop(last);
        drop(
            tokio::time::timeout(Duration::from_secs(1), turns.take(Writer::Relay))
                .await
                .expect("the turn is free again"),
        );
    }
}
