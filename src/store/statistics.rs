//! PostgreSQL: the planner statistics of the tables intake looks rows up in, kept fresh where
//! autovacuum does not.
//!
//! PostgreSQL plans a prepared statement once and reuses that plan (a generic plan, after five
//! executions) until the table is analyzed again. Intake's lookups are prepared on each pooled
//! connection while the tables are still small, where a sequential scan is the cheapest plan; as
//! the tables grow that plan stays, unless something runs `ANALYZE`. Autovacuum does, once a
//! table has changed by 50 rows and 10% of its size; but it may be off (a server set up for tests,
//! or a DBA who schedules maintenance), or slow to come round. Measured in the benchmark with
//! autovacuum off: the conversations read took 1.23 ms and 58 buffers per batch (a sequential
//! scan of every conversation), the registrations' entity lock 1.04 ms; with the tables analyzed
//! as they grew (ANALYZE every 5 s from outside), 0.23 and 0.04 ms (docs/benchmarks.md, eighth
//! round).
//!
//! So every `database.analyze_interval_seconds` the service checks `pg_stat_user_tables` and
//! analyzes, at autovacuum's default threshold, the columns these lookups filter on: an
//! `ANALYZE` of a few columns, which takes no lock that writers or readers wait for. Where
//! autovacuum keeps up, the threshold is never reached here and this costs one small query.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DbBackend, DbErr, Statement};

use super::Database;

/// The tables looked up by intake and registrations on every batch, and the columns they filter
/// or join on.
const LOOKUP_TABLES: &[(&str, &str)] = &[
    ("conversation", "id, conversation_id"),
    (
        "tracked_entity",
        "id, entity_type, gateway_id, conversation_id, correlation",
    ),
];

/// Autovacuum's defaults (`autovacuum_analyze_threshold`, `autovacuum_analyze_scale_factor`): a
/// table is analyzed once this many rows, plus this share of its rows, changed since the last
/// time.
const CHANGED_ROWS_THRESHOLD: i64 = 50;
const CHANGED_SHARE: f64 = 0.1;

/// Starts the check every `interval` on PostgreSQL (nothing on SQLite, or with a zero interval),
/// until `shutdown`.
pub fn start(db: Database, interval: Duration, shutdown: tokio_util::sync::CancellationToken) {
    if interval.is_zero() || db.get_database_backend() != DbBackend::Postgres {
        return;
    }
    tokio::spawn(async move {
        let mut statistics = LookupStatistics::default();
        let mut warned = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            match statistics.analyze_grown_tables(&db).await {
                Ok(analyzed) => {
                    warned = false;
                    if !analyzed.is_empty() {
                        tracing::debug!(?analyzed, "planner statistics refreshed");
                    }
                }
                // The database unavailable or slow (the statement timeout bounds a check): said
                // once until a check succeeds again; the service works the same meanwhile, with
                // the plans it has. (A role that does not own the tables gets PostgreSQL's own
                // warning, and the tables are skipped.)
                Err(error) if !warned => {
                    warned = true;
                    tracing::warn!(%error, "could not refresh the lookup tables' planner statistics (database.analyze_interval_seconds); run ANALYZE on them, or enable autovacuum");
                }
                Err(error) => tracing::debug!(%error, "planner statistics not refreshed"),
            }
        }
    });
}

/// What this process last analyzed. An `ANALYZE` of some columns does not reset PostgreSQL's
/// count of rows changed since the last analysis (`n_mod_since_analyze`; a whole-table one, as
/// autovacuum's, does), so growth is counted from the count seen at this process's last
/// `ANALYZE` of the table, or from zero after anyone's whole-table one.
#[derive(Debug, Default)]
pub struct LookupStatistics {
    changed_when_analyzed: std::collections::HashMap<&'static str, i64>,
}

impl LookupStatistics {
    /// Analyzes the lookup tables that changed by autovacuum's threshold since they were last
    /// analyzed; returns their names.
    pub async fn analyze_grown_tables(
        &mut self,
        db: &Database,
    ) -> Result<Vec<&'static str>, DbErr> {
        // The names are this module's constants: written into the text, not bound.
        let names: Vec<String> = LOOKUP_TABLES
            .iter()
            .map(|(table, _)| format!("'{table}'"))
            .collect();
        let rows = db
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                format!(
                    "SELECT relname::text AS table_name, n_mod_since_analyze, n_live_tup \
                     FROM pg_stat_user_tables \
                     WHERE schemaname = current_schema() AND relname IN ({})",
                    names.join(", ")
                ),
            ))
            .await?;
        let mut analyzed = Vec::new();
        for row in rows {
            let table: String = row.try_get("", "table_name")?;
            let changed_in_all: i64 = row.try_get("", "n_mod_since_analyze")?;
            let live: i64 = row.try_get("", "n_live_tup")?;
            let Some((table, columns)) = LOOKUP_TABLES.iter().find(|(name, _)| *name == table)
            else {
                continue;
            };
            let baseline = self
                .changed_when_analyzed
                .get(table)
                .copied()
                .filter(|&seen| seen <= changed_in_all)
                .unwrap_or(0);
            let changed = changed_in_all - baseline;
            if changed as f64 > CHANGED_ROWS_THRESHOLD as f64 + CHANGED_SHARE * live as f64 {
                db.execute_unprepared(&format!("ANALYZE {table} ({columns})"))
                    .await?;
                self.changed_when_analyzed.insert(table, changed_in_all);
                analyzed.push(*table);
            }
        }
        Ok(analyzed)
    }
}
