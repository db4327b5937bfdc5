//! Building and running the application: connect, migrate (if configured), bind, serve.

use std::net::TcpListener;
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::{App, HttpServer, web};
use sea_orm::DatabaseConnection;
use tracing_actix_web::TracingLogger;

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::http::{AppState, routes};
use crate::store;
use crate::telemetry::KciRootSpan;

/// A bound, ready-to-run kci-receiver.
pub struct Application {
    port: u16,
    server: Server,
    db: DatabaseConnection,
}

impl Application {
    /// Connects to the database, applies migrations when `database.migrate_on_start` is set
    /// (refuses to start on an out-of-date schema otherwise) and binds the listener. Port 0
    /// picks a free port; [`Application::port`] tells which.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let db = store::connect(&settings.database).await?;
        if settings.database.migrate_on_start {
            store::migrate(&db).await?;
        } else {
            let pending = store::pending_migrations(&db).await?;
            if pending > 0 {
                anyhow::bail!(
                    "{pending} database migration(s) pending: run `kci-receiver migrate` first"
                );
            }
        }
        let auth = Authenticator::new(&settings.gateway_auth, &settings.operations_auth)?;
        auth.start().await;

        let listener = TcpListener::bind((settings.server.host.as_str(), settings.server.port))?;
        let port = listener.local_addr()?.port();
        let workers = settings.server.workers;
        let state = web::Data::new(AppState {
            db: db.clone(),
            auth,
            settings: Arc::new(settings),
        });
        let mut server = HttpServer::new(move || {
            App::new()
                .wrap(TracingLogger::<KciRootSpan>::new())
                .app_data(state.clone())
                .configure(routes)
        })
        .listen(listener)?;
        if workers > 0 {
            server = server.workers(workers);
        }
        tracing::info!(port, "kci-receiver listening");
        Ok(Application {
            port,
            server: server.run(),
            db,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn db(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Serves until SIGTERM/SIGINT; in-flight requests finish first.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}
