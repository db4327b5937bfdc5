//! Waking the relay as soon as an event is committed.
//!
//! In one process, intake notifies the relay directly after commit. Across processes on
//! PostgreSQL, intake's transaction sends `NOTIFY kci_outbox` (delivered at commit) and each relay
//! LISTENs. Either way the relay also polls slowly, as a safety net.

use std::sync::Arc;
use std::time::Duration;

use sea_orm::DatabaseConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The PostgreSQL channel intake notifies on commit.
pub const NOTIFY_CHANNEL: &str = "kci_outbox";

#[derive(Clone, Default)]
pub struct OutboxSignal(Arc<Notify>);

impl OutboxSignal {
    /// New events are committed.
    pub fn notify(&self) {
        self.0.notify_one();
    }

    /// Waits for [`OutboxSignal::notify`] (returns at once if one came since the last wait).
    pub async fn notified(&self) {
        self.0.notified().await;
    }
}

/// Forwards PostgreSQL notifications to `signal` until `shutdown`; reconnects when the listening
/// connection is lost.
pub async fn forward_postgres_notifications(
    db: DatabaseConnection,
    signal: OutboxSignal,
    shutdown: CancellationToken,
) {
    use sea_orm::sqlx::postgres::PgListener;
    let pool = db.get_postgres_connection_pool().clone();
    while !shutdown.is_cancelled() {
        let listener = async {
            let mut listener = PgListener::connect_with(&pool).await?;
            listener.listen(NOTIFY_CHANNEL).await?;
            loop {
                listener.recv().await?;
                signal.notify();
            }
            #[allow(unreachable_code)]
            Ok::<(), sea_orm::sqlx::Error>(())
        };
        tokio::select! {
            result = listener => {
                if let Err(error) = result {
                    tracing::debug!(error = %error, "outbox LISTEN connection lost; polling until it is back");
                }
                signal.notify();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            _ = shutdown.cancelled() => return,
        }
    }
}
