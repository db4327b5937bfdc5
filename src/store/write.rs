//! Writing: [`Database`], the handle every writer goes through, its write transactions, and
//! [`retry_on_race`] for work that lost a race with a concurrent transaction.

use std::sync::Arc;

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
}

impl Database {
    pub fn new(connection: DatabaseConnection) -> Database {
        Database {
            connection,
            writer_turn: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    pub fn connection(&self) -> &DatabaseConnection {
        &self.connection
    }

    /// Starts a write transaction: `BEGIN IMMEDIATE` on SQLite so that the write lock is taken
    /// up front (a deferred transaction that upgrades later fails with BUSY instead of waiting),
    /// after waiting for this handle's turn to write.
    pub async fn begin_write(&self) -> Result<WriteTransaction, StoreError> {
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
        Ok(WriteTransaction { txn, _turn: turn })
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
pub struct WriteTransaction {
    txn: DatabaseTransaction,
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
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
