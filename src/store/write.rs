//! Writing: [`Database`], the handle every writer goes through, its write transactions, and
//! [`retry_on_race`] for work that lost a race with a concurrent transaction.

use std::sync::Arc;
use std::time::Instant;

use sea_orm::{
    DatabaseConnection, DatabaseTransaction, SqliteTransactionMode, TransactionOptions,
    TransactionTrait,
};

use super::StoreError;

/// The connection pool, with the queue of this process's SQLite writers. SQLite has one writer at
/// a time and its busy handler is not fair: group commit's back-to-back transactions kept the
/// relay from recording what it had published (publish lag p99 3.8 s in the benchmark). Writers
/// that share a handle (every clone of it) take their turns in order of arrival. PostgreSQL needs
/// no queue; readers use [`Database::connection`] (or the handle itself, through `Deref`).
#[derive(Clone, Debug)]
pub struct Database {
    connection: DatabaseConnection,
    writer_turn: Arc<tokio::sync::Mutex<()>>,
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
        Database {
            connection,
            writer_turn: Arc::new(tokio::sync::Mutex::new(())),
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
            sea_orm::DbBackend::Sqlite => Some(self.writer_turn.clone().lock_owned().await),
            _ => None,
        };
        let txn = self
            .connection
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
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
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
