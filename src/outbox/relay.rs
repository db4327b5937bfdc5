//! The outbox relay: publishes committed outbox events to RabbitMQ with publisher confirms, and
//! marks an event published only after the broker confirmed it (design.md, flow step 4).
//!
//! One round: take the head event of up to `batch_size` entities (see [`super::store`]), publish
//! them all at once on a confirming channel (`mandatory`, persistent), wait for the confirms, and
//! record each outcome. A nack, a `basic.return` or a broker channel error is a refusal: the event
//! is retried with exponential backoff and is dead after `max_attempts`. A lost connection is not
//! the event's fault: it stays pending, unchanged, while the relay reconnects with backoff.
//!
//! On PostgreSQL a round runs in one transaction that holds an advisory lock per entity, so
//! several relays share the work without publishing the same entity at once; if a relay dies,
//! its locks go with its connection and its unconfirmed events are still pending. On SQLite a
//! single relay reads, publishes, then records the outcomes in a short write transaction (the
//! write lock is never held while waiting for the broker).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use entity::outbox_event;
use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::AMQPErrorKind;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use sea_orm::{DatabaseConnection, DbBackend, TransactionTrait};
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::signal::{OutboxSignal, forward_postgres_notifications};
use super::store;
use super::topology::Topology;
use crate::config::{AmqpSettings, RelaySettings, redact_url};
use crate::intake::begin_write;
use crate::store::StoreError;

/// What the relay knows of the broker, for `/readyz`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum BrokerState {
    /// No relay runs in this process.
    NotRunning,
    Connecting {
        last_error: Option<String>,
    },
    Connected {
        since: DateTime<Utc>,
    },
}

/// The relay's state and counters, shared with `/readyz` (and, later, metrics).
#[derive(Clone)]
pub struct RelayHealth(Arc<HealthInner>);

struct HealthInner {
    state: Mutex<BrokerState>,
    published: AtomicU64,
    refused: AtomicU64,
}

impl Default for RelayHealth {
    fn default() -> Self {
        RelayHealth(Arc::new(HealthInner {
            state: Mutex::new(BrokerState::NotRunning),
            published: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }))
    }
}

impl RelayHealth {
    pub fn state(&self) -> BrokerState {
        self.0
            .state
            .lock()
            .map(|s| s.clone())
            .unwrap_or(BrokerState::NotRunning)
    }

    fn set(&self, state: BrokerState) {
        if let Ok(mut current) = self.0.state.lock() {
            *current = state;
        }
    }

    /// Events this relay published (broker confirmed) since it started.
    pub fn published(&self) -> u64 {
        self.0.published.load(Ordering::Relaxed)
    }

    /// Broker refusals (nack, return, channel error) since it started.
    pub fn refused(&self) -> u64 {
        self.0.refused.load(Ordering::Relaxed)
    }
}

/// What the broker said of one event.
#[derive(Debug)]
enum Outcome {
    Confirmed,
    /// The broker refused it: counts as an attempt.
    Refused(String),
    /// Not known to have reached the broker (connection trouble): no attempt counted.
    NotSent,
}

/// Why a round ended early.
#[derive(Debug, thiserror::Error)]
enum RoundError {
    #[error("broker connection lost: {0}")]
    Broker(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sea_orm::DbErr> for RoundError {
    fn from(error: sea_orm::DbErr) -> Self {
        RoundError::Store(error.into())
    }
}

pub struct Relay {
    db: DatabaseConnection,
    amqp: AmqpSettings,
    settings: RelaySettings,
    signal: OutboxSignal,
    health: RelayHealth,
    topology: Topology,
}

impl Relay {
    pub fn new(
        db: DatabaseConnection,
        amqp: AmqpSettings,
        settings: RelaySettings,
        signal: OutboxSignal,
        health: RelayHealth,
    ) -> Relay {
        let topology = Topology::from_settings(&amqp);
        Relay {
            db,
            amqp,
            settings,
            signal,
            health,
            topology,
        }
    }

    /// Publishes until `shutdown`: then it stops taking new rounds, lets the round in flight
    /// finish (its confirms are awaited and recorded) and returns.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.db.get_database_backend() == DbBackend::Postgres {
            tokio::spawn(forward_postgres_notifications(
                self.db.clone(),
                self.signal.clone(),
                shutdown.child_token(),
            ));
        }
        let mut reconnect_delay = Duration::from_millis(self.settings.reconnect_initial_ms);
        let url = self.amqp.url.expose_secret().to_owned();
        self.health
            .set(BrokerState::Connecting { last_error: None });
        while !shutdown.is_cancelled() {
            let (connection, channel) = match self.connect(&url).await {
                Ok(connected) => connected,
                Err(error) => {
                    tracing::warn!(broker = %redact_url(&url), error = %error, retry_in = ?reconnect_delay, "broker unreachable");
                    self.health.set(BrokerState::Connecting {
                        last_error: Some(error.to_string()),
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(reconnect_delay) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    reconnect_delay = (reconnect_delay * 2)
                        .min(Duration::from_millis(self.settings.reconnect_max_ms));
                    continue;
                }
            };
            reconnect_delay = Duration::from_millis(self.settings.reconnect_initial_ms);
            self.health
                .set(BrokerState::Connected { since: Utc::now() });
            tracing::info!(broker = %redact_url(&url), exchange = %self.amqp.exchange, "relay connected");

            let lost = self.publish_until_lost(&channel, &shutdown).await;
            let _ = connection.close(200, "relay stopping".into()).await;
            if let Some(error) = lost {
                tracing::warn!(error = %error, "relay lost the broker; reconnecting");
                self.health.set(BrokerState::Connecting {
                    last_error: Some(error),
                });
            }
        }
        self.health.set(BrokerState::NotRunning);
        tracing::info!("relay stopped");
    }

    async fn connect(&self, url: &str) -> Result<(Connection, Channel), lapin::Error> {
        let connection = Connection::connect(url, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        if self.amqp.declare_topology {
            self.topology.declare(&channel).await?;
        }
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok((connection, channel))
    }

    /// Runs rounds while the channel works; returns why it stopped (none: shutdown).
    async fn publish_until_lost(
        &self,
        channel: &Channel,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let linger = Duration::from_millis(self.settings.linger_ms);
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            match self.round(channel).await {
                Ok(handled) if handled >= self.settings.batch_size as usize => continue,
                Ok(handled) if handled > 0 => {
                    // A round that was not full: let events gather for a moment, so that a
                    // steady trickle is published in rounds of many rather than many rounds
                    // of one (each round costs the database several statements).
                    tokio::select! {
                        _ = tokio::time::sleep(linger) => continue,
                        _ = shutdown.cancelled() => return None,
                    }
                }
                Ok(_) => {}
                Err(RoundError::Broker(error)) => return Some(error),
                Err(RoundError::Store(error)) => {
                    tracing::warn!(error = %error, "relay could not reach the database; retrying");
                }
            }
            tokio::select! {
                _ = self.signal.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                _ = shutdown.cancelled() => return None,
            }
        }
    }

    /// One round; returns how many events were handled.
    async fn round(&self, channel: &Channel) -> Result<usize, RoundError> {
        let now = Utc::now();
        if self.db.get_database_backend() == DbBackend::Postgres {
            let txn = self.db.begin().await?;
            let head_ids = store::due_head_ids(&txn, now, self.settings.batch_size).await?;
            let heads = store::lock_heads(&txn, &head_ids).await?;
            let outcomes = self.publish(channel, &heads).await;
            let handled = self.record(&txn, &heads, &outcomes).await?;
            txn.commit().await?;
            broken_channel(channel, &outcomes)?;
            Ok(handled)
        } else {
            let head_ids = store::due_head_ids(&self.db, now, self.settings.batch_size).await?;
            let heads = store::pending_by_id(&self.db, &head_ids).await?;
            let outcomes = self.publish(channel, &heads).await;
            let txn = begin_write(&self.db).await?;
            let handled = self.record(&*txn, &heads, &outcomes).await?;
            txn.commit().await?;
            broken_channel(channel, &outcomes)?;
            Ok(handled)
        }
    }

    /// Publishes every event, then waits for all confirms (bounded by `confirm_timeout_ms`).
    async fn publish(&self, channel: &Channel, events: &[outbox_event::Model]) -> Vec<Outcome> {
        let mut outcomes: Vec<Outcome> = events.iter().map(|_| Outcome::NotSent).collect();
        let mut confirms = Vec::with_capacity(events.len());
        // A round holds at most one event per entity, so the order among them does not matter:
        // they are handed to the channel all at once rather than one send at a time.
        let sends = events.iter().map(|event| async move {
            let payload = serde_json::to_vec(&event.payload).unwrap_or_default();
            channel
                .basic_publish(
                    self.amqp.exchange.as_str().into(),
                    event.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &payload,
                    properties(event),
                )
                .await
        });
        for (index, published) in join_all(sends).await.into_iter().enumerate() {
            match published {
                Ok(confirm) => confirms.push((index, confirm)),
                // The channel is gone: this one (and maybe others) did not reach the broker.
                Err(error) => outcomes[index] = classify(&error),
            }
        }
        let waiting = join_all(
            confirms
                .into_iter()
                .map(|(index, confirm)| async move { (index, confirm.await) }),
        );
        let timeout = Duration::from_millis(self.settings.confirm_timeout_ms);
        match tokio::time::timeout(timeout, waiting).await {
            Ok(results) => {
                for (index, result) in results {
                    outcomes[index] = match result {
                        Ok(Confirmation::Ack(None)) => Outcome::Confirmed,
                        Ok(
                            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)),
                        ) => Outcome::Refused(format!(
                            "returned by the broker: {} {}",
                            returned.reply_code, returned.reply_text
                        )),
                        Ok(Confirmation::Nack(None)) => {
                            Outcome::Refused("nacked by the broker".to_owned())
                        }
                        Ok(Confirmation::NotRequested) => {
                            Outcome::Refused("publisher confirms are not enabled".to_owned())
                        }
                        Err(error) => classify(&error),
                    };
                }
            }
            Err(_) => tracing::warn!(
                ?timeout,
                "no confirms within the timeout; the events stay pending"
            ),
        }
        outcomes
    }

    /// Records the outcomes; returns how many events the round handled.
    async fn record(
        &self,
        db: &impl sea_orm::ConnectionTrait,
        events: &[outbox_event::Model],
        outcomes: &[Outcome],
    ) -> Result<usize, RoundError> {
        let now = Utc::now();
        let confirmed: Vec<i64> = events
            .iter()
            .zip(outcomes)
            .filter(|(_, outcome)| matches!(outcome, Outcome::Confirmed))
            .map(|(event, _)| event.id)
            .collect();
        store::mark_published(db, &confirmed, now).await?;
        let mut handled = confirmed.len();
        self.health
            .0
            .published
            .fetch_add(confirmed.len() as u64, Ordering::Relaxed);
        for (event, outcome) in events.iter().zip(outcomes) {
            if let Outcome::Refused(reason) = outcome {
                let delay = backoff(&self.settings, event.attempts);
                let next = now + chrono::Duration::from_std(delay).unwrap_or_default();
                let dead = store::mark_refused(db, event, reason, next, self.settings.max_attempts)
                    .await?;
                self.health.0.refused.fetch_add(1, Ordering::Relaxed);
                if dead {
                    tracing::error!(event.id = %event.event_id, attempts = event.attempts + 1, reason, "outbox event is dead");
                } else {
                    tracing::warn!(event.id = %event.event_id, reason, retry_in = ?delay, "broker refused an outbox event");
                }
                handled += 1;
            }
        }
        Ok(handled)
    }
}

/// After a round: a closed channel (broker or connection error) means reconnecting.
fn broken_channel(channel: &Channel, outcomes: &[Outcome]) -> Result<(), RoundError> {
    let all_sent = outcomes.iter().all(|o| !matches!(o, Outcome::NotSent));
    if channel.status().connected() && all_sent {
        Ok(())
    } else {
        Err(RoundError::Broker(format!(
            "channel no longer usable (connected: {}, every event sent: {all_sent})",
            channel.status().connected()
        )))
    }
}

/// Broker refusals (a channel closed with a soft error such as 404 NOT_FOUND or 403
/// ACCESS_REFUSED) count as attempts; anything else is connection trouble.
fn classify(error: &lapin::Error) -> Outcome {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp_error)
            if matches!(amqp_error.kind(), AMQPErrorKind::Soft(_)) =>
        {
            Outcome::Refused(format!("refused by the broker: {amqp_error}"))
        }
        _ => Outcome::NotSent,
    }
}

/// `retry_initial_ms * 2^attempts`, at most `retry_max_ms`.
fn backoff(settings: &RelaySettings, attempts: i32) -> Duration {
    let factor = 2u64.saturating_pow(attempts.clamp(0, 30) as u32);
    Duration::from_millis(
        settings
            .retry_initial_ms
            .saturating_mul(factor)
            .min(settings.retry_max_ms),
    )
}

/// The AMQP properties of design.md's contract.
fn properties(event: &outbox_event::Model) -> BasicProperties {
    let mut headers = FieldTable::default();
    if let Value::Object(map) = &event.headers {
        for (name, value) in map {
            let value = match value {
                Value::Number(n) if n.is_i64() => {
                    AMQPValue::LongLongInt(n.as_i64().unwrap_or_default())
                }
                Value::String(s) => AMQPValue::LongString(s.as_str().into()),
                other => AMQPValue::LongString(other.to_string().as_str().into()),
            };
            headers.insert(name.as_str().into(), value);
        }
    }
    let conversation_id = event
        .headers
        .get("x-conversation-id")
        .and_then(Value::as_str)
        .unwrap_or("");
    BasicProperties::default()
        .with_message_id(event.event_id.to_string().as_str().into())
        .with_correlation_id(conversation_id.into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(event.created_at.timestamp().max(0) as u64)
        .with_type(event.message_type.as_str().into())
        .with_app_id("kci-receiver".into())
        .with_headers(headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let mut settings = crate::config::Settings::defaults().unwrap().relay;
        settings.retry_initial_ms = 100;
        settings.retry_max_ms = 1000;
        let delays: Vec<u128> = (0..6).map(|a| backoff(&settings, a).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
    }
}
