//! SQLite: the write-ahead log checkpointed beside the writer, not in its turn.
//!
//! In WAL mode a commit appends pages to the log; a checkpoint copies them back into the
//! database file so that the log can start over. SQLite's own automatic checkpoint runs inside
//! the commit that takes the log past 1,000 pages, on whichever connection made it: here
//! intake's, in its turn at the one writer, while the other writers and every `POST /kcis` of
//! the next batch wait. At saturation that was about 5% of the service's CPU, all of it held by
//! the writer (docs/benchmarks.md, "Eleventh round").
//!
//! So every `database.sqlite_checkpoint_interval_ms` a task runs a passive checkpoint on a pooled
//! connection of its own. A passive checkpoint takes no lock a writer waits for: the writer keeps
//! appending while the log is copied. The writer starts the log over at its first transaction
//! that begins with everything copied: after any pause of the writes; under writes without pause,
//! at [`WRITER_AUTOCHECKPOINT_PAGES`], where its own automatic checkpoint (kept as the backstop)
//! finds little left to copy. Durability is the same either way: a commit is on disk once its log
//! pages are (`synchronous=FULL`); a checkpoint only moves them.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

use super::Database;

/// The writer connection's automatic checkpoint (`PRAGMA wal_autocheckpoint`, in pages of
/// 4 KiB): only reached when the checkpoint task is off or falls behind (a log of 40 MB).
pub const WRITER_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// What one passive checkpoint found: frames in the log, and how many of them are now in the
/// database file (all of them unless a reader still needs older ones, or a writer appended
/// meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    pub log_frames: i64,
    pub checkpointed_frames: i64,
}

/// Runs one passive checkpoint (SQLite; `None` on PostgreSQL).
pub async fn checkpoint_once(db: &Database) -> Result<Option<Checkpoint>, DbErr> {
    if db.get_database_backend() != DbBackend::Sqlite {
        return Ok(None);
    }
    let row = db
        .connection()
        .query_one_raw(Statement::from_string(
            DbBackend::Sqlite,
            "PRAGMA wal_checkpoint(PASSIVE)",
        ))
        .await?
        .ok_or_else(|| DbErr::Custom("wal_checkpoint answered nothing".to_owned()))?;
    // Columns: busy, log, checkpointed (-1 and -1 when the database is not in WAL mode).
    Ok(Some(Checkpoint {
        log_frames: row.try_get_by_index(1)?,
        checkpointed_frames: row.try_get_by_index(2)?,
    }))
}

/// Starts the checkpoints every `interval` on SQLite, until `shutdown` (nothing on PostgreSQL, or
/// with a zero interval: the writer then checkpoints in its own commits, at
/// [`WRITER_AUTOCHECKPOINT_PAGES`]).
pub fn start(db: Database, interval: Duration, shutdown: tokio_util::sync::CancellationToken) {
    if interval.is_zero() || db.get_database_backend() != DbBackend::Sqlite {
        return;
    }
    tokio::spawn(async move {
        let mut warned = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            match checkpoint_once(&db).await {
                Ok(_) => warned = false,
                // A failed checkpoint loses nothing: the log keeps growing until one succeeds,
                // and the writer's own backstop checkpoints at WRITER_AUTOCHECKPOINT_PAGES.
                Err(error) if !warned => {
                    warned = true;
                    tracing::warn!(%error, "SQLite checkpoint failed; the write-ahead log grows until one succeeds");
                }
                Err(error) => tracing::debug!(%error, "SQLite checkpoint failed again"),
            }
        }
    });
}
