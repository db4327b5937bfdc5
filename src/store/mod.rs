//! The database: connecting (SQLite or PostgreSQL, chosen by the URL), migrating, classifying
//! database errors in one place, and the write path ([`write`]: the handle writers share, write
//! transactions, running again work that lost a race).

pub mod audit;
pub mod bulk;
pub mod checkpoints;
pub mod retention;
pub mod statistics;
pub mod text;
pub mod write;

pub use write::{Database, WriteTransaction, Writer, retry_on_race};

use std::time::Duration;

use migration::MigratorTrait;
use sea_orm::{ConnectOptions, DatabaseConnection, DbErr, SqlErr};
use secrecy::ExposeSecret;

use crate::config::{DatabaseSettings, redact_url};

/// A database error, classified once: unavailable (the caller should retry later), retryable at
/// once (a lost race), or a fault.
#[derive(Debug, thiserror::Error)]
#[error("{kind}: {source}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    #[source]
    pub source: DbErr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The database cannot be reached, is shutting down, or is too busy.
    Unavailable,
    /// A unique constraint lost a race with a concurrent transaction: run the work again.
    Conflict,
    /// Deadlock or serialization failure: run the work again.
    Retryable,
    /// Anything else: a bug or a schema problem.
    Fault,
}

impl std::fmt::Display for StoreErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StoreErrorKind::Unavailable => "database unavailable",
            StoreErrorKind::Conflict => "conflict with a concurrent transaction",
            StoreErrorKind::Retryable => "transaction must be retried",
            StoreErrorKind::Fault => "database fault",
        })
    }
}

impl StoreError {
    pub fn is_unavailable(&self) -> bool {
        self.kind == StoreErrorKind::Unavailable
    }

    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            StoreErrorKind::Conflict | StoreErrorKind::Retryable
        )
    }
}

impl From<DbErr> for StoreError {
    fn from(source: DbErr) -> Self {
        StoreError {
            kind: classify(&source),
            source,
        }
    }
}

/// Sorts a database error into [`StoreErrorKind`], every variant named: what a lost race, an
/// unreachable database and a bug each look like is decided here, once.
pub fn classify(error: &DbErr) -> StoreErrorKind {
    use sea_orm::RuntimeErr;

    if let Some(SqlErr::UniqueConstraintViolation(_)) = error.sql_err() {
        return StoreErrorKind::Conflict;
    }
    match error {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => StoreErrorKind::Unavailable,
        DbErr::Exec(runtime) | DbErr::Query(runtime) => match runtime {
            RuntimeErr::SqlxError(error) => classify_sqlx(error),
            // Raised by sea-orm itself, not by the database.
            RuntimeErr::Internal(_) => StoreErrorKind::Fault,
        },
        // The code, the schema and the data disagree: a bug, which running again cannot fix.
        DbErr::TryIntoErr { .. }
        | DbErr::ConvertFromU64(_)
        | DbErr::UnpackInsertId
        | DbErr::UpdateGetPrimaryKey
        | DbErr::RecordNotFound(_)
        | DbErr::AttrNotSet(_)
        | DbErr::Custom(_)
        | DbErr::Type(_)
        | DbErr::Json(_)
        | DbErr::Migration(_)
        | DbErr::RecordNotInserted
        | DbErr::RecordNotUpdated
        | DbErr::BackendNotSupported { .. }
        | DbErr::KeyArityMismatch { .. }
        | DbErr::PrimaryKeyNotSet { .. }
        | DbErr::RbacError(_)
        | DbErr::AccessDenied { .. }
        | DbErr::MutexPoisonError => StoreErrorKind::Fault,
        // `DbErr` is non-exhaustive: a variant of a newer sea-orm is a fault until named above.
        _ => StoreErrorKind::Fault,
    }
}

/// [`classify`] for what the driver reported.
fn classify_sqlx(error: &sea_orm::sqlx::Error) -> StoreErrorKind {
    use sea_orm::sqlx::Error as Sqlx;
    match error {
        Sqlx::Io(_)
        | Sqlx::Tls(_)
        | Sqlx::Protocol(_)
        | Sqlx::PoolTimedOut
        | Sqlx::PoolClosed
        | Sqlx::WorkerCrashed
        // The connection's state after BEGIN was not what it should be: a broken connection.
        | Sqlx::BeginFailed => StoreErrorKind::Unavailable,
        Sqlx::Database(database_error) => classify_database_code(
            database_error.code().as_deref().unwrap_or_default(),
        ),
        Sqlx::Configuration(_)
        | Sqlx::InvalidArgument(_)
        | Sqlx::RowNotFound
        | Sqlx::TypeNotFound { .. }
        | Sqlx::ColumnIndexOutOfBounds { .. }
        | Sqlx::ColumnNotFound(_)
        | Sqlx::ColumnDecode { .. }
        | Sqlx::Encode(_)
        | Sqlx::Decode(_)
        | Sqlx::AnyDriverError(_)
        | Sqlx::InvalidSavePointStatement => StoreErrorKind::Fault,
        // Non-exhaustive too (and `Migrate`, `ConfigFile` exist only with features we do not
        // use): a fault until named above.
        _ => StoreErrorKind::Fault,
    }
}

/// [`classify`] for an error the database server itself returned, by its SQLSTATE (PostgreSQL)
/// or result code (SQLite).
fn classify_database_code(code: &str) -> StoreErrorKind {
    match code {
        // PostgreSQL: serialization failure, deadlock.
        "40001" | "40P01" => StoreErrorKind::Retryable,
        // PostgreSQL: admin/crash shutdown, cannot connect now, too many connections, disk
        // full, out of memory; statement timeout (57014: the database is too slow right now).
        "57P01" | "57P02" | "57P03" | "53300" | "53100" | "53200" | "57014" => {
            StoreErrorKind::Unavailable
        }
        // PostgreSQL connection exceptions (class 08).
        code if code.starts_with("08") => StoreErrorKind::Unavailable,
        // SQLite: BUSY and LOCKED (with their extended codes), IOERR, FULL, CANTOPEN.
        "5" | "6" | "261" | "262" | "517" | "10" | "13" | "14" => StoreErrorKind::Unavailable,
        code if code.parse::<u32>().is_ok_and(|c| c & 0xff == 10) => StoreErrorKind::Unavailable,
        _ => StoreErrorKind::Fault,
    }
}

/// What a connection pool is for: serving (every statement bounded in time) or maintenance
/// (migrations, which may rewrite a large table and must not be cancelled halfway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Serving,
    Maintenance,
}

/// Opens the connection pool. SQLite files are created when missing, in WAL mode with
/// `synchronous=FULL` so that a commit is on disk before we answer 204.
pub async fn connect(settings: &DatabaseSettings) -> Result<DatabaseConnection, DbErr> {
    connect_for(settings, Purpose::Serving).await
}

/// [`connect`], for a purpose. On PostgreSQL a serving pool's sessions carry the server-side
/// bounds of design.md's "Bounded time": `statement_timeout`,
/// `idle_in_transaction_session_timeout`, and TCP keepalives from the server, so that a session
/// whose client vanished (a frozen host, a dropped route) is ended and its locks released. Our
/// side of a hung connection is bounded by the timeouts around every database call (intake's
/// deadline, the relay's rounds, readiness), since the PostgreSQL driver cannot set keepalives
/// on its own sockets.
pub async fn connect_for(
    settings: &DatabaseSettings,
    purpose: Purpose,
) -> Result<DatabaseConnection, DbErr> {
    let url = settings.url.expose_secret();
    if let Some(path) = sqlite_file(url)
        && let Some(parent) = std::path::Path::new(path).parent()
        && !parent.as_os_str().is_empty()
    {
        // Connecting fails: the database file cannot exist without its folder.
        std::fs::create_dir_all(parent).map_err(|e| {
            DbErr::Conn(sea_orm::RuntimeErr::Internal(format!(
                "cannot create {}: {e}",
                parent.display()
            )))
        })?;
    }
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .max_connections(settings.max_connections)
        .min_connections(settings.min_connections.min(settings.max_connections))
        .acquire_timeout(Duration::from_millis(settings.acquire_timeout_ms))
        .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        // A connection that sat idle is pinged before use (its server may have gone away). Busy
        // connections are not: a ping on every acquire is one more round trip per KCI, and a
        // connection that broke under load fails its request with 503 and leaves the pool.
        .test_before_acquire_if_idle_for(Duration::from_secs(5))
        .sqlx_logging(false);
    let mut server_settings: Vec<(&str, String)> = vec![
        ("application_name", "kci-receiver".to_owned()),
        ("tcp_keepalives_idle", "30".to_owned()),
        ("tcp_keepalives_interval", "10".to_owned()),
        ("tcp_keepalives_count", "3".to_owned()),
    ];
    if purpose == Purpose::Serving {
        server_settings.push((
            "statement_timeout",
            settings.statement_timeout_ms.to_string(),
        ));
        server_settings.push((
            "idle_in_transaction_session_timeout",
            settings.idle_in_transaction_timeout_ms.to_string(),
        ));
    }
    options.map_sqlx_postgres_opts(move |postgres| postgres.options(server_settings.clone()));
    let busy_timeout = Duration::from_millis(settings.sqlite_busy_timeout_ms);
    // Negative: a size in KiB, not in pages.
    let cache_size = format!("-{}", settings.sqlite_cache_kib.max(64));
    options.map_sqlx_sqlite_opts(move |sqlite| {
        use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
        sqlite
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(busy_timeout)
            .foreign_keys(true)
            .pragma("cache_size", cache_size.clone())
            // Group commit writes batches of any size, each size its own statement; a compiled
            // multi-row insert is large, and each connection caches its own (100 by default:
            // 226 MB peak RSS in the benchmark). Preparing again is cheap in-process.
            .statement_cache_capacity(16)
    });
    tracing::info!(database = %redact_url(url), "connecting to the database");
    sea_orm::Database::connect(options).await
}

/// The path of a `sqlite:` URL, if it is one.
fn sqlite_file(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && path != ":memory:").then_some(path)
}

/// The PostgreSQL advisory lock migrations run under ("KCIM").
const MIGRATION_LOCK: i64 = 0x4b43_494d;

/// Applies every pending migration. On PostgreSQL under a session advisory lock: any number of
/// instances and migration jobs starting at once on an empty database wait for one another
/// instead of racing to create the same tables (the lock goes with the session if the process
/// dies). SQLite has one writer at a time, and one process per file.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return migration::Migrator::up(db, None).await;
    }
    let sqlx_error =
        |error| DbErr::Conn(sea_orm::RuntimeErr::SqlxError(std::sync::Arc::new(error)));
    let mut session = db
        .get_postgres_connection_pool()
        .acquire()
        .await
        .map_err(sqlx_error)?;
    sea_orm::sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *session)
        .await
        .map_err(sqlx_error)?;
    let migrated = migration::Migrator::up(db, None).await;
    if let Err(error) = sea_orm::sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *session)
        .await
    {
        // Closing the session releases it anyway.
        tracing::warn!(%error, "could not release the migration lock; closing its session");
        session.close_on_drop();
    }
    migrated
}

/// Whether pending migrations exist (used by `serve` when it does not migrate itself).
pub async fn pending_migrations(db: &DatabaseConnection) -> Result<usize, DbErr> {
    Ok(migration::Migrator::get_pending_migrations(db).await?.len())
}
