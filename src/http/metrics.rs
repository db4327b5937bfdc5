//! `GET /metrics`, in Prometheus' text format.
//!
//! Counted as things happen: KCIs received (by entity type, update type, outcome) and request
//! latency. Read from the database by one background task every
//! [`REFRESH_INTERVAL`]: entities by status, the outbox backlog and its oldest age, dead events.
//! A scrape (or a readiness probe) never queries the database: anyone who can reach the port can
//! scrape, and several replicas scraped every 15 s must not multiply grouped queries. Read from
//! memory at scrape time: the relay's publishes, refusals and restarts, and the database pool.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{HttpResponse, web};
use chrono::Utc;
use entity::outbox_event::{self, OutboxStatus};
use entity::tracked_entity;
use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use sea_orm::{
    ColumnTrait, DbBackend, EntityTrait, FromQueryResult, PaginatorTrait, QueryFilter, QuerySelect,
};

use super::AppState;
use crate::outbox::relay::RelayHealth;
use crate::outbox::store as outbox_store;

/// The outbox backlog as last read.
#[derive(Debug, Clone, Copy)]
pub struct Backlog {
    pub pending: u64,
    pub oldest: Option<chrono::DateTime<Utc>>,
    pub dead: u64,
    pub read_at: chrono::DateTime<Utc>,
}

#[derive(Clone)]
pub struct Metrics {
    backlog: Arc<Mutex<Option<Backlog>>>,
    relay_restarts: IntCounter,
    unrecorded: IntGauge,
    registry: Registry,
    kcis_received: IntCounterVec,
    request_duration: HistogramVec,
    entities: IntGaugeVec,
    outbox_pending: IntGauge,
    outbox_oldest_age: Gauge,
    outbox_dead: IntGauge,
    published: IntCounter,
    refused: IntCounter,
    pool: IntGaugeVec,
    reconciliations: IntCounterVec,
    recovered_kcis: IntCounter,
    recovery_delay: prometheus::Histogram,
    pruned: IntCounterVec,
    pool_max: IntGauge,
    /// The process collector (CPU, resident memory, file descriptors, start time).
    process: Registry,
    /// The dashboard's overview, fed by the same refresh task.
    overview: crate::operations::overview::Overview,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry =
            Registry::new_custom(Some("kci_receiver".to_owned()), None).expect("a valid prefix");
        let kcis_received = IntCounterVec::new(
            Opts::new(
                "kcis_received_total",
                "POST /kcis requests by KCI entity type, update type and outcome",
            ),
            &["entity_type", "update_type", "outcome"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency").buckets(
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            &["route", "method", "status"],
        )
        .expect("valid metric");
        let entities = IntGaugeVec::new(
            Opts::new(
                "tracked_entities",
                "Orders, tests and problems by entity type and current status",
            ),
            &["entity_type", "status"],
        )
        .expect("valid metric");
        let outbox_pending = IntGauge::new(
            "outbox_pending_events",
            "Outbox events waiting to be published",
        )
        .expect("valid metric");
        let outbox_oldest_age = Gauge::new(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest outbox event waiting to be published (0 when none waits)",
        )
        .expect("valid metric");
        let outbox_dead = IntGauge::new(
            "outbox_dead_events",
            "Outbox events the broker kept refusing",
        )
        .expect("valid metric");
        let published = IntCounter::new(
            "outbox_published_total",
            "Outbox events this process's relay published (broker confirmed)",
        )
        .expect("valid metric");
        let refused = IntCounter::new(
            "outbox_publish_failures_total",
            "Broker refusals (nack, return, channel error) this process's relay met",
        )
        .expect("valid metric");
        let pool = IntGaugeVec::new(
            Opts::new("database_pool_connections", "Database pool connections"),
            &["state"],
        )
        .expect("valid metric");
        let unrecorded = IntGauge::new(
            "egress_unrecorded_requests",
            "Creating calls the gateway answered through the egress proxy whose original request waits to be recorded",
        )
        .expect("valid metric");
        let relay_restarts = IntCounter::new(
            "relay_restarts_total",
            "Times this process's relay failed (a panic or an unexpected error) and was restarted",
        )
        .expect("valid metric");
        let reconciliations = IntCounterVec::new(
            Opts::new(
                "reconciliations_total",
                "Reconciliations with the Tenant API by outcome (RECOVERED, IN_SYNC, DIFFERS, NOT_FOUND, FAILED)",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let recovered_kcis = IntCounter::new(
            "recovered_kcis_total",
            "KCIs the gateway never delivered, recovered from the Tenant API's updates[]",
        )
        .expect("valid metric");
        let recovery_delay = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "recovery_delay_seconds",
                "From a gap opening to its KCIs recovered by reconciliation",
            )
            .buckets(vec![
                1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0,
            ]),
        )
        .expect("valid metric");
        let pruned = IntCounterVec::new(
            Opts::new(
                "pruned_total",
                "Rows retention removed, by kind (audit_records, published_events, raw_bodies)",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "build_info",
                "Always 1; the labels say which kci-receiver this is",
            ),
            &["version", "schema_version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                &crate::outbox::envelope::SCHEMA_VERSION.to_string(),
            ])
            .set(1);
        let pool_max = IntGauge::new(
            "database_pool_max_connections",
            "The database pool's maximum (database.max_connections)",
        )
        .expect("valid metric");
        // `process_*` under their standard names, without our prefix.
        let process = Registry::new();
        #[cfg(target_os = "linux")]
        process
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("metric names are unique");
        for collector in [
            Box::new(build_info) as Box<dyn prometheus::core::Collector>,
            Box::new(pool_max.clone()),
            Box::new(pruned.clone()),
            Box::new(reconciliations.clone()),
            Box::new(recovered_kcis.clone()),
            Box::new(recovery_delay.clone()),
            Box::new(kcis_received.clone()),
            Box::new(request_duration.clone()),
            Box::new(entities.clone()),
            Box::new(outbox_pending.clone()),
            Box::new(outbox_oldest_age.clone()),
            Box::new(outbox_dead.clone()),
            Box::new(published.clone()),
            Box::new(refused.clone()),
            Box::new(pool.clone()),
            Box::new(relay_restarts.clone()),
            Box::new(unrecorded.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Metrics {
            backlog: Arc::new(Mutex::new(None)),
            relay_restarts,
            unrecorded,
            registry,
            kcis_received,
            request_duration,
            entities,
            outbox_pending,
            outbox_oldest_age,
            outbox_dead,
            published,
            refused,
            pool,
            reconciliations,
            recovered_kcis,
            recovery_delay,
            pruned,
            pool_max,
            process,
            overview: Default::default(),
        }
    }

    /// Adds collectors that live elsewhere (the relay's and intake's histograms) to `/metrics`;
    /// once per collector.
    pub fn register(&self, collectors: Vec<Box<dyn prometheus::core::Collector>>) {
        for collector in collectors {
            if let Err(error) = self.registry.register(collector) {
                tracing::error!(%error, "metrics: a collector could not be registered");
            }
        }
    }

    /// What one retention run removed.
    pub fn count_pruned(&self, pruned: &crate::store::retention::Pruned) {
        for (kind, rows) in [
            ("audit_records", pruned.audit_records),
            ("published_events", pruned.published_events),
            ("raw_bodies", pruned.raw_bodies),
        ] {
            self.pruned.with_label_values(&[kind]).inc_by(rows);
        }
    }

    /// One reconciliation ended: its outcome, the KCIs it recovered, and how long after the gap
    /// opened (when it recovered any).
    pub fn count_reconciliation(&self, outcome: &str, recovered: u64, delay_seconds: Option<f64>) {
        self.reconciliations.with_label_values(&[outcome]).inc();
        self.recovered_kcis.inc_by(recovered);
        if let Some(delay) = delay_seconds {
            self.recovery_delay.observe(delay);
        }
    }

    pub fn kci_received(&self, entity_type: &str, update_type: &str, outcome: &str) {
        self.kcis_received
            .with_label_values(&[entity_type, update_type, outcome])
            .inc();
    }

    pub fn observe_request(&self, route: &str, method: &str, status: u16, started: Instant) {
        self.request_duration
            .with_label_values(&[route, method, &status.to_string()])
            .observe(started.elapsed().as_secs_f64());
    }

    /// The dashboard's overview as the refresh task last read it.
    pub fn overview(&self) -> &crate::operations::overview::Overview {
        &self.overview
    }

    /// The outbox backlog as last read by the background task (none before its first read).
    pub fn backlog(&self) -> Option<Backlog> {
        self.backlog.lock().ok().and_then(|backlog| *backlog)
    }

    /// Reads the database gauges now and every `every` until `shutdown`; a read that fails or
    /// takes longer than the interval leaves the last values.
    pub fn start_refreshing(
        &self,
        db: sea_orm::DatabaseConnection,
        every: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => {}
                    _ = shutdown.cancelled() => return,
                }
                match tokio::time::timeout(
                    every.max(Duration::from_secs(1)),
                    refresh(&metrics, &db),
                )
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(error)) => {
                        tracing::warn!(error = %error, "metrics: could not read the database")
                    }
                    Err(_) => tracing::warn!("metrics: reading the database timed out"),
                }
            }
        });
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[derive(FromQueryResult)]
struct StatusCount {
    entity_type: String,
    status: String,
    n: i64,
}

/// Reads the gauges that need the database; a database error leaves them as they were.
async fn refresh(
    metrics: &Metrics,
    db: &sea_orm::DatabaseConnection,
) -> Result<(), crate::store::StoreError> {
    let counts = tracked_entity::Entity::find()
        .select_only()
        .column(tracked_entity::Column::EntityType)
        .column(tracked_entity::Column::Status)
        .column_as(tracked_entity::Column::Id.count(), "n")
        .group_by(tracked_entity::Column::EntityType)
        .group_by(tracked_entity::Column::Status)
        .into_model::<StatusCount>()
        .all(db)
        .await?;
    // Labels come from what the gateway sent: only listed types and the statuses their
    // lifecycles know are labels of their own, the rest are counted as UNLISTED / OTHER, so
    // that the gateway cannot grow the series without bound.
    let mut labelled: std::collections::BTreeMap<(&str, &str), i64> = Default::default();
    for count in &counts {
        let (entity_type, status) = match crate::kci::EntityType::from_wire(&count.entity_type) {
            Some(listed) => (
                listed.as_str(),
                listed
                    .lifecycle()
                    .statuses
                    .iter()
                    .find(|known| **known == count.status)
                    .copied()
                    .unwrap_or("OTHER"),
            ),
            None => ("UNLISTED", "OTHER"),
        };
        *labelled.entry((entity_type, status)).or_default() += count.n;
    }
    metrics.entities.reset();
    for ((entity_type, status), n) in labelled {
        metrics
            .entities
            .with_label_values(&[entity_type, status])
            .set(n);
    }
    let (pending, oldest) = outbox_store::backlog(db).await?;
    metrics.outbox_pending.set(pending as i64);
    metrics.outbox_oldest_age.set(oldest.map_or(0.0, |created| {
        (Utc::now() - created).num_milliseconds().max(0) as f64 / 1000.0
    }));
    let dead = outbox_event::Entity::find()
        .filter(outbox_event::Column::Status.eq(OutboxStatus::Dead))
        .count(db)
        .await?;
    metrics.outbox_dead.set(dead as i64);
    let read_at = Utc::now();
    if let Ok(mut backlog) = metrics.backlog.lock() {
        *backlog = Some(Backlog {
            pending,
            oldest,
            dead,
            read_at,
        });
    }
    let sample = crate::operations::overview::BacklogSample {
        at: read_at,
        pending,
        dead,
        oldest_pending_seconds: oldest.map_or(0.0, |created| {
            (read_at - created).num_milliseconds().max(0) as f64 / 1000.0
        }),
    };
    let counts = counts
        .into_iter()
        .map(|count| (count.entity_type, count.status, count.n))
        .collect();
    metrics.overview.refresh(db, counts, sample).await
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    render(
        &state.metrics,
        &state.relay_health,
        &state.db,
        state.settings.database.max_connections,
        state.unrecorded.len(),
    )
}

/// `/metrics` of whichever process asks: `serve` or `relay` (which has no egress: nothing
/// unrecorded).
pub fn render(
    metrics: &Metrics,
    relay_health: &RelayHealth,
    db: &sea_orm::DatabaseConnection,
    max_connections: u32,
    unrecorded: usize,
) -> HttpResponse {
    metrics.unrecorded.set(unrecorded as i64);
    let restarts = relay_health.restarts();
    metrics
        .relay_restarts
        .inc_by(restarts.saturating_sub(metrics.relay_restarts.get()));
    // The relay counts in memory; the counters follow it.
    let published = relay_health.published();
    metrics
        .published
        .inc_by(published.saturating_sub(metrics.published.get()));
    let refused = relay_health.refused();
    metrics
        .refused
        .inc_by(refused.saturating_sub(metrics.refused.get()));
    let (size, idle) = match db.get_database_backend() {
        DbBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (pool.size(), pool.num_idle() as u32)
        }
        DbBackend::Sqlite => {
            let pool = db.get_sqlite_connection_pool();
            (pool.size(), pool.num_idle() as u32)
        }
        _ => (0, 0),
    };
    metrics
        .pool
        .with_label_values(&["idle"])
        .set(i64::from(idle));
    metrics
        .pool
        .with_label_values(&["in_use"])
        .set(i64::from(size.saturating_sub(idle)));
    metrics.pool_max.set(i64::from(max_connections));

    let mut buffer = Vec::new();
    let mut families = metrics.registry.gather();
    families.extend(metrics.process.gather());
    if let Err(error) = TextEncoder::new().encode(&families, &mut buffer) {
        tracing::error!(error = %error, "metrics: could not encode");
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(buffer)
}
