//! Building and running the application: connect, migrate (if configured), bind, serve, and
//! publish the outbox (if configured).

use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing_actix_web::TracingLogger;

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::http::metrics::Metrics;
use crate::http::{AppState, routes};
use crate::outbox::relay::{Relay, RelayHealth};
use crate::outbox::signal::OutboxSignal;
use crate::store;
use crate::telemetry::KciRootSpan;

/// A bound, ready-to-run kci-receiver.
pub struct Application {
    port: u16,
    tls_port: Option<u16>,
    metrics_port: Option<u16>,
    server: Server,
    relay: Option<JoinHandle<()>>,
    shutdown: CancellationToken,
    shutdown_timeout: Duration,
}

/// Connects to the database and checks (or applies) its migrations.
pub async fn open_database(settings: &Settings) -> anyhow::Result<store::Database> {
    if settings.database.migrate_on_start {
        // Migrations may rewrite a large table: on a connection without the serving
        // statement timeout.
        let maintenance =
            store::connect_for(&settings.database, store::Purpose::Maintenance).await?;
        store::migrate(&maintenance).await?;
        maintenance.close().await?;
    }
    let db = store::connect(&settings.database).await?;
    if !settings.database.migrate_on_start {
        let pending = store::pending_migrations(&db).await?;
        if pending > 0 {
            anyhow::bail!(
                "{pending} database migration(s) pending: run `kci-receiver migrate` first"
            );
        }
    }
    Ok(store::Database::new(db))
}

impl Application {
    /// Connects to the database, applies migrations when `database.migrate_on_start` is set
    /// (refuses to start on an out-of-date schema otherwise), binds the listener and, with
    /// `relay.enabled`, starts the outbox relay. Port 0 picks a free port; [`Application::port`]
    /// tells which.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let db = open_database(&settings).await?;
        let auth = Authenticator::new(&settings.gateway_auth, &settings.operations_auth)?;
        auth.start().await;

        let shutdown = CancellationToken::new();
        let outbox_signal = OutboxSignal::default();
        let relay_health = RelayHealth::default();
        let relay = settings.relay.enabled.then(|| {
            let relay = Relay::new(
                db.clone(),
                settings.amqp.clone(),
                settings.relay.clone(),
                outbox_signal.clone(),
                relay_health.clone(),
            );
            tokio::spawn(relay.run(shutdown.child_token()))
        });

        let egress = match settings.egress.enabled {
            true => Some(Arc::new(crate::egress::EgressClient::new(
                &settings.egress,
            )?)),
            false => None,
        };
        let egress_prefix = settings
            .egress
            .enabled
            .then(|| settings.egress.path_prefix.clone());
        let workers = settings.server.workers;
        let shutdown_timeout = Duration::from_secs(settings.server.shutdown_timeout_seconds);
        let (host, requested_port) = (settings.server.host.clone(), settings.server.port);
        let intake = crate::intake::group_commit::GroupCommit::start(
            db.clone(),
            &settings.intake,
            settings.relay.notify_other_processes,
        );
        let metrics = crate::http::metrics::Metrics::new();
        metrics.register(relay_health.collectors());
        metrics.register(intake.collectors());
        metrics.register(db.collectors());
        metrics.start_refreshing(
            db.connection().clone(),
            Duration::from_millis(settings.metrics.refresh_interval_ms),
            shutdown.child_token(),
        );
        // Gap repair needs the Tenant API client: off unless egress is configured.
        let reconciler = egress.as_ref().map(|client| {
            crate::reconcile::Reconciler::new(
                db.clone(),
                client.clone(),
                settings.reconcile.clone(),
                settings.kci.aliases(),
            )
            .with_outbox_signal(outbox_signal.clone())
            .with_metrics(metrics.clone())
            .notifying_other_processes(settings.relay.notify_other_processes)
        });
        if let Some(reconciler) = reconciler.as_ref().filter(|_| settings.reconcile.enabled) {
            reconciler.clone().start(shutdown.child_token());
        }
        crate::store::statistics::start(
            db.clone(),
            Duration::from_secs(settings.database.analyze_interval_seconds),
            shutdown.child_token(),
        );
        crate::store::checkpoints::start(
            db.clone(),
            Duration::from_millis(settings.database.sqlite_checkpoint_interval_ms),
            shutdown.child_token(),
        );
        crate::store::retention::start(
            db.clone(),
            settings.retention.clone(),
            metrics.clone(),
            shutdown.child_token(),
        );
        let unrecorded = crate::egress::unrecorded::UnrecordedRequests::default();
        unrecorded.start(db.clone(), shutdown.child_token());
        let audit =
            crate::store::audit::AuditSink::start(db.connection().clone(), shutdown.child_token());
        let auth_failures = crate::http::access::AuthFailures::new(
            settings.server.auth_failures_per_minute,
            &settings.server.trusted_proxies,
            Duration::from_secs(settings.server.auth_failure_audit_seconds),
        );
        auth_failures.start(audit.clone(), shutdown.child_token());
        let metrics_port = Arc::new(std::sync::OnceLock::new());
        let state = web::Data::new(AppState {
            metrics_port: metrics_port.clone(),
            auth_failures,
            unrecorded,
            db: db.clone(),
            intake,
            auth,
            audit,
            entity_type_aliases: settings.kci.aliases(),
            openapi: serde_json::to_vec(&crate::http::openapi::document(&settings))?.into(),
            attention_answers: crate::operations::shared::SharedAnswers::new(
                Duration::from_millis(settings.metrics.refresh_interval_ms),
            ),
            settings: Arc::new(settings),
            outbox_signal,
            relay_health,
            metrics,
            egress,
            reconciler,
        });
        let tls = match state.settings.tls.enabled {
            true => Some(crate::tls::Tls::load(&state.settings.tls)?),
            false => None,
        };
        let tls_address = (state.settings.tls.host.clone(), state.settings.tls.port);
        let state_metrics_port = state.settings.metrics.port;
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap(crate::http::access::security_headers())
                .wrap_fn(crate::http::split_listeners)
                .wrap_fn(crate::http::access::guard)
                .wrap_fn(crate::http::refuse_nul)
                .wrap_fn(crate::http::timing)
                .wrap(TracingLogger::<KciRootSpan>::new())
                .app_data(state.clone())
                .configure(|cfg| routes(cfg, egress_prefix.as_deref()))
        })
        // A response written in more than one piece (headers and body, TLS records) must not
        // wait for the client's delayed ACK: actix leaves Nagle's algorithm on unless told.
        .tcp_nodelay(true)
        // actix binds with SO_REUSEADDR: a restarted instance gets its port back at once, also
        // after a kill -9 that left connections in TIME_WAIT.
        .on_connect(crate::tls::on_connect)
        .bind((host.as_str(), requested_port))?
        .shutdown_timeout(shutdown_timeout.as_secs());
        let port = server
            .addrs()
            .first()
            .map(|address| address.port())
            .unwrap_or(requested_port);
        let mut bound_metrics_port = None;
        if let Some(wanted) = state_metrics_port {
            let before = server.addrs().len();
            server = server.bind((host.as_str(), wanted))?;
            bound_metrics_port = server.addrs().get(before).map(|address| address.port());
            if let Some(bound) = bound_metrics_port {
                let _ = metrics_port.set(bound);
                tracing::info!(
                    port = bound,
                    "metrics, healthz and readyz on a port of their own"
                );
            }
        }
        let mut tls_port = None;
        if let Some(tls) = tls {
            let plain = server.addrs().len();
            server =
                server.bind_rustls_0_23((tls_address.0.as_str(), tls_address.1), tls.config)?;
            tls_port = server.addrs().get(plain).map(|address| address.port());
            tls.reloader.watch(shutdown.child_token());
            tracing::info!(port = tls_port, "kci-receiver listening for HTTPS");
        }
        if workers > 0 {
            server = server.workers(workers);
        }
        tracing::info!(port, "kci-receiver listening");
        Ok(Application {
            port,
            tls_port,
            metrics_port: bound_metrics_port,
            server: server.run(),
            relay,
            shutdown,
            shutdown_timeout,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The HTTPS listener's port, with `tls.enabled`.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// The metrics listener's port, with `metrics.port`.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics_port
    }

    /// Serves until SIGTERM/SIGINT: in-flight requests finish, then the relay finishes its
    /// round (confirms awaited and recorded) and stops; all within `server.shutdown_timeout`
    /// (whatever is still running then is abandoned: unconfirmed events stay pending).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let started = tokio::time::Instant::now();
        let served = self.server.await;
        self.shutdown.cancel();
        if let Some(relay) = self.relay {
            let left = self.shutdown_timeout.saturating_sub(started.elapsed());
            if tokio::time::timeout(left.max(Duration::from_secs(1)), relay)
                .await
                .is_err()
            {
                tracing::warn!(
                    "the relay did not stop within server.shutdown_timeout_seconds; leaving it"
                );
            }
        }
        served
    }
}

/// Runs the relay alone (`kci-receiver relay`) until SIGTERM/SIGINT. With `metrics.port` it
/// serves `/healthz`, `/readyz` and `/metrics` there (on `server.host`), so that it can be probed
/// and scraped like `serve`.
pub async fn run_relay(settings: Settings) -> anyhow::Result<()> {
    let db = open_database(&settings).await?;
    let shutdown = CancellationToken::new();
    crate::store::checkpoints::start(
        db.clone(),
        Duration::from_millis(settings.database.sqlite_checkpoint_interval_ms),
        shutdown.child_token(),
    );
    let health = RelayHealth::default();
    let relay = Relay::new(
        db.clone(),
        settings.amqp.clone(),
        settings.relay.clone(),
        OutboxSignal::default(),
        health.clone(),
    );
    let running = tokio::spawn(relay.run(shutdown.child_token()));
    let probes = match settings.metrics.port {
        Some(port) => {
            let metrics = Metrics::new();
            metrics.register(health.collectors());
            metrics.register(db.collectors());
            metrics.start_refreshing(
                db.connection().clone(),
                Duration::from_millis(settings.metrics.refresh_interval_ms),
                shutdown.child_token(),
            );
            let state = web::Data::new(RelayProbes {
                db: db.connection().clone(),
                health: health.clone(),
                metrics,
                settings: settings.clone(),
            });
            let server = HttpServer::new(move || {
                App::new()
                    .wrap(crate::http::access::security_headers())
                    .app_data(state.clone())
                    .route("/healthz", web::get().to(crate::http::health::healthz))
                    .route("/readyz", web::get().to(relay_readyz))
                    .route("/metrics", web::get().to(relay_metrics))
            })
            .workers(1)
            .tcp_nodelay(true)
            .bind((settings.server.host.as_str(), port))?
            .disable_signals()
            .shutdown_timeout(1);
            tracing::info!(port, "relay: healthz, readyz and metrics listening");
            let server = server.run();
            let handle = server.handle();
            tokio::spawn(server);
            Some(handle)
        }
        None => None,
    };
    shutdown_signal().await;
    tracing::info!("stopping the relay");
    shutdown.cancel();
    let timeout = Duration::from_secs(settings.server.shutdown_timeout_seconds);
    if tokio::time::timeout(timeout, running).await.is_err() {
        tracing::warn!("the relay did not stop within server.shutdown_timeout_seconds; leaving it");
    }
    if let Some(probes) = probes {
        probes.stop(true).await;
    }
    Ok(())
}

/// What the relay process's probes read.
struct RelayProbes {
    db: sea_orm::DatabaseConnection,
    health: RelayHealth,
    metrics: Metrics,
    settings: Settings,
}

async fn relay_readyz(state: web::Data<RelayProbes>) -> actix_web::HttpResponse {
    crate::http::health::readiness(
        &state.db,
        &state.health,
        &state.metrics,
        state.settings.server.retry_after_seconds,
    )
    .await
}

async fn relay_metrics(state: web::Data<RelayProbes>) -> actix_web::HttpResponse {
    crate::http::metrics::render(
        &state.metrics,
        &state.health,
        &state.db,
        state.settings.database.max_connections,
        0,
    )
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
