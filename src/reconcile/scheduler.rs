//! Reconciling on its own: every `reconcile.poll_interval_seconds`, the entities due (gaps open
//! longer than `gap_grace_seconds`, silent entities in flight after `stuck_after_seconds`, none
//! in back-off) are reconciled one after the other, at most `max_per_minute` per instance, so
//! the gateway is never flooded. Runs only when egress is configured.

use std::num::NonZeroU32;
use std::time::Duration;

use chrono::Utc;
use governor::{Quota, RateLimiter};
use tokio_util::sync::CancellationToken;

use super::{ReconcileError, Reconciler, store};

impl Reconciler {
    /// Starts the scheduler in the background until `shutdown`.
    pub fn start(self, shutdown: CancellationToken) {
        tokio::spawn(self.run(shutdown));
    }

    async fn run(self, shutdown: CancellationToken) {
        let settings = self.settings().clone();
        let per_minute = NonZeroU32::new(settings.max_per_minute).unwrap_or(NonZeroU32::MIN);
        let limiter =
            RateLimiter::direct(Quota::per_minute(per_minute).allow_burst(NonZeroU32::MIN));
        let poll = Duration::from_secs(settings.poll_interval_seconds);
        let grace = chrono::Duration::seconds(settings.gap_grace_seconds as i64);
        let stuck_after = chrono::Duration::seconds(settings.stuck_after_seconds as i64);
        tracing::info!(
            gap_grace_seconds = settings.gap_grace_seconds,
            stuck_after_seconds = settings.stuck_after_seconds,
            max_per_minute = settings.max_per_minute,
            "gap repair: reconciling with the Tenant API"
        );
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(poll) => {}
            }
            let due = match store::candidates(
                &self.db,
                Utc::now(),
                grace,
                stuck_after,
                u64::from(settings.max_per_minute),
            )
            .await
            {
                Ok(due) => due,
                Err(error) => {
                    tracing::warn!(%error, "gap repair: could not read the entities due; trying again later");
                    continue;
                }
            };
            for candidate in due {
                let target = candidate.target;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = limiter.until_ready() => {}
                }
                match self.reconcile(&target, candidate.trigger, None).await {
                    Ok(_) | Err(ReconcileError::Busy) => {}
                    Err(error) => {
                        tracing::warn!(%error, gateway.id = target.gateway_id, "gap repair: reconciliation did not run; trying again later");
                    }
                }
            }
        }
    }
}
