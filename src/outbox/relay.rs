//! The outbox relay: publishes committed outbox events to RabbitMQ with publisher confirms, and
//! marks an event published only after the broker confirmed it (design.md, flow step 4).
//!
//! One round: take the first events (up to `events_per_entity` each) of up to `batch_size`
//! entities (see [`super::store`]), publish them on a confirming channel (`mandatory`,
//! persistent), the entities side by side and each entity's events one after the other, each
//! once the previous one is confirmed, and record each outcome. Up to `rounds_in_flight` rounds
//! run at once, each a task, never two with the same entity: the next round is read and claimed
//! while the one before waits for its confirms.
//!
//! A nack, a `basic.return`, a broker channel error, or an event that cannot be encoded as an
//! AMQP message is a refusal: the event is retried with exponential backoff and
//! is dead after `max_attempts` (its entity's later events then wait behind it). A lost
//! connection is not the event's fault: it stays pending, unchanged, while the relay reconnects
//! with backoff.
//!
//! Never a database transaction while waiting on the broker (design.md, "Bounded time"): a round
//! reads what is due, publishes, then records the outcomes in a short write transaction. On
//! PostgreSQL several relays share the work through a session-level advisory lock per entity
//! ([`EntityLocks`]) held on a connection of the relay's own, not in a transaction. Connecting,
//! publishing and confirming are each under a timeout; while the broker blocks the connection
//! (`connection.blocked`: a memory or disk alarm) the relay pauses without touching the database.
//!
//! No silent stop: [`Relay::run`] supervises the publishing loop; a panic or an unexpected error
//! restarts it with backoff, logged, counted (`kci_receiver_relay_restarts_total`) and visible in
//! `/readyz`.

use std::collections::HashSet;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, DurationRound, Utc};
use entity::outbox_event;
use futures_util::FutureExt;
use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::AMQPErrorKind;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ConnectionStatus,
};
use sea_orm::DbBackend;
use secrecy::ExposeSecret;
use serde::Serialize;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::signal::{OutboxSignal, forward_postgres_notifications};
use super::store::{self, EntityLocks};
use super::topology::Topology;
use crate::config::{AmqpSettings, RelaySettings, redact_url};
use crate::operations::overview::{LagMinute, LagTally, WINDOW_MINUTES};
use crate::store::{Database, StoreError, Writer};

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
    /// The broker stopped reading from the connection (a resource alarm): nothing is published
    /// until it lifts; KCIs keep waiting in the outbox.
    Blocked {
        since: DateTime<Utc>,
    },
}

/// Whether the relay's publishing loop runs, for `/readyz`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum RelayState {
    /// No relay runs in this process.
    NotRunning,
    Running {
        since: DateTime<Utc>,
    },
    /// It failed (a panic or an unexpected error) and restarts after a backoff.
    Restarting {
        since: DateTime<Utc>,
        error: String,
    },
}

/// The relay's state and counters, shared with `/readyz` and `/metrics`.
#[derive(Clone)]
pub struct RelayHealth(Arc<HealthInner>);

struct HealthInner {
    broker: Mutex<BrokerState>,
    relay: Mutex<RelayState>,
    published: AtomicU64,
    refused: AtomicU64,
    restarts: AtomicU64,
    /// From an event's commit to the broker's ack of it.
    publish_lag: prometheus::Histogram,
    /// One round: read, publish, confirms, record.
    round_duration: prometheus::Histogram,
    /// Rounds publishing at this moment (up to `relay.rounds_in_flight`).
    rounds_in_flight: prometheus::IntGauge,
    /// The same lags per minute, for the dashboard's chart (the last few hours).
    lag_per_minute: Mutex<std::collections::BTreeMap<DateTime<Utc>, LagTally>>,
}

impl Default for RelayHealth {
    fn default() -> Self {
        RelayHealth(Arc::new(HealthInner {
            broker: Mutex::new(BrokerState::NotRunning),
            relay: Mutex::new(RelayState::NotRunning),
            published: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            publish_lag: histogram(
                "outbox_publish_lag_seconds",
                "From an outbox event's commit to the broker's confirm of it",
                &[
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0,
                ],
            ),
            round_duration: histogram(
                "relay_round_duration_seconds",
                "One relay round: read the due events, publish, await the confirms, record",
                &[
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            rounds_in_flight: prometheus::IntGauge::new(
                "relay_rounds_in_flight",
                "Relay rounds publishing at this moment (up to relay.rounds_in_flight)",
            )
            .expect("valid metric"),
            lag_per_minute: Mutex::default(),
        }))
    }
}

/// Observes a round's duration when dropped (whichever way the round ends).
struct RoundTimer<'a>(&'a prometheus::Histogram, std::time::Instant);

impl Drop for RoundTimer<'_> {
    fn drop(&mut self) {
        self.0.observe(self.1.elapsed().as_secs_f64());
    }
}

/// A histogram that is registered by whoever serves `/metrics` (`Metrics::register`).
pub fn histogram(name: &str, help: &str, buckets: &[f64]) -> prometheus::Histogram {
    prometheus::Histogram::with_opts(
        prometheus::HistogramOpts::new(name, help).buckets(buckets.to_vec()),
    )
    .expect("valid metric")
}

impl RelayHealth {
    fn observe_publish_lag(&self, confirmed_at: DateTime<Utc>, seconds: f64) {
        self.0.publish_lag.observe(seconds);
        let minute = confirmed_at
            .duration_trunc(chrono::Duration::minutes(1))
            .unwrap_or(confirmed_at);
        let mut per_minute = self
            .0
            .lag_per_minute
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let tally = per_minute.entry(minute).or_default();
        tally.0 += 1;
        tally.1 += seconds;
        tally.2 = tally.2.max(seconds);
        // Keep the overview's window, no more.
        if per_minute.len() as i64 > WINDOW_MINUTES {
            per_minute.pop_first();
        }
    }

    /// Publish lag per minute of the last [`WINDOW_MINUTES`], as this process's relay confirmed
    /// events (the dashboard's overview).
    pub fn publish_lag_per_minute(&self) -> Vec<LagMinute> {
        self.0
            .lag_per_minute
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(minute, tally)| LagMinute::from_tally(*minute, *tally))
            .collect()
    }

    /// The relay's histograms, for `/metrics`.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.0.publish_lag.clone()),
            Box::new(self.0.round_duration.clone()),
            Box::new(self.0.rounds_in_flight.clone()),
        ]
    }

    pub fn state(&self) -> BrokerState {
        self.0
            .broker
            .lock()
            .map(|s| s.clone())
            .unwrap_or(BrokerState::NotRunning)
    }

    fn set(&self, state: BrokerState) {
        if let Ok(mut current) = self.0.broker.lock() {
            *current = state;
        }
    }

    pub fn relay_state(&self) -> RelayState {
        self.0
            .relay
            .lock()
            .map(|s| s.clone())
            .unwrap_or(RelayState::NotRunning)
    }

    fn set_relay(&self, state: RelayState) {
        if let Ok(mut current) = self.0.relay.lock() {
            *current = state;
        }
    }

    /// Events this relay published (broker confirmed) since it started.
    pub fn published(&self) -> u64 {
        self.0.published.load(Ordering::Relaxed)
    }

    /// Broker refusals (nack, return, channel error, unencodable) since it started.
    pub fn refused(&self) -> u64 {
        self.0.refused.load(Ordering::Relaxed)
    }

    /// Rounds publishing at this moment.
    pub fn rounds_in_flight(&self) -> i64 {
        self.0.rounds_in_flight.get()
    }

    /// Times the publishing loop failed and was restarted.
    pub fn restarts(&self) -> u64 {
        self.0.restarts.load(Ordering::Relaxed)
    }
}

/// What the broker said of one event.
#[derive(Debug)]
enum Outcome {
    Confirmed,
    /// The broker refused it, or it cannot be made into an AMQP message: counts as an attempt.
    Refused(String),
    /// Not known to have reached the broker (connection trouble, timeout): no attempt counted.
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

/// What the publishing loop waits for before it claims the next round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// As many rounds are in flight as allowed: one of them to finish.
    RoundFinished,
    /// The last round was not full: `relay.linger_ms` (or a round finishing).
    Linger,
    /// Nothing was due: a wake-up from intake, the poll interval, or a round finishing.
    Work,
}

/// A round read and claimed, ready to publish.
struct ClaimedRound {
    events: Vec<outbox_event::Model>,
    /// The entities it holds: no other round of this relay reads them until it is recorded (and
    /// on PostgreSQL no other relay, by their advisory locks).
    entities: Vec<i64>,
    started: std::time::Instant,
    /// How long choosing its events (and, on PostgreSQL, claiming their entities) took, and
    /// reading them and claiming in all (the debug log of each round's stages).
    chosen_in: Duration,
    claimed_in: Duration,
}

/// How a round in flight ended: its entities, and what it handled; an error when its task
/// panicked (or was cancelled).
type FinishedRound = Result<(Vec<i64>, Result<usize, RoundError>), tokio::task::JoinError>;

/// The rounds publishing at this moment, each a task, and the entities they hold. Dropping it
/// (a restart of the publishing loop) aborts them: a round cut short records nothing, and its
/// events are still pending.
struct RoundsInFlight {
    tasks: tokio::task::JoinSet<(Vec<i64>, Result<usize, RoundError>)>,
    busy: HashSet<i64>,
    gauge: prometheus::IntGauge,
}

impl RoundsInFlight {
    fn new(gauge: prometheus::IntGauge) -> RoundsInFlight {
        gauge.set(0);
        RoundsInFlight {
            tasks: tokio::task::JoinSet::new(),
            busy: HashSet::new(),
            gauge,
        }
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    fn start(
        &mut self,
        entities: Vec<i64>,
        round: impl Future<Output = Result<usize, RoundError>> + Send + 'static,
    ) {
        self.busy.extend(entities.iter().copied());
        self.tasks.spawn(async move { (entities, round.await) });
        self.gauge.set(self.tasks.len() as i64);
    }

    /// The next round to finish (none while none is in flight); its entities are free again for
    /// this relay's next rounds. Cancel-safe.
    async fn next_finished(&mut self) -> Option<FinishedRound> {
        let finished = self.tasks.join_next().await?;
        if let Ok((entities, _)) = &finished {
            for entity in entities {
                self.busy.remove(entity);
            }
        }
        self.gauge.set(self.tasks.len() as i64);
        Some(finished)
    }
}

impl Drop for RoundsInFlight {
    fn drop(&mut self) {
        self.gauge.set(0);
    }
}

/// After a round: releases its entities (PostgreSQL) and says whether the broker was lost. A
/// round whose task panicked takes the publishing loop down with it (the supervisor restarts it;
/// the lock connection is closed, so the server releases that round's entities).
async fn finish_round(
    finished: FinishedRound,
    locks: Option<&mut EntityLocks>,
) -> Result<(), String> {
    let (entities, result) = match finished {
        Ok(finished) => finished,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(error) => return Err(format!("a relay round was cancelled: {error}")),
    };
    if let Some(locks) = locks
        && let Err(error) = locks.unlock(&entities).await
    {
        // The lock connection is closed on failure: the server released the entities.
        tracing::warn!(error = %error, "relay could not release its entities; its lock connection was closed");
    }
    match result {
        Ok(_) => Ok(()),
        Err(RoundError::Broker(error)) => Err(error),
        Err(RoundError::Store(error)) => {
            tracing::warn!(error = %error, "relay could not record a round; its events stay pending");
            Ok(())
        }
    }
}

/// The relay; cheap to clone.
#[derive(Clone)]
pub struct Relay(Arc<RelayInner>);

struct RelayInner {
    db: Database,
    amqp: AmqpSettings,
    settings: RelaySettings,
    signal: OutboxSignal,
    health: RelayHealth,
    topology: Topology,
}

/// Restart backoff of a failing publishing loop: doubles from 1 s up to 30 s, and starts again
/// from 1 s once a loop has run for a minute.
const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(30);
const RESTART_RESET_AFTER: Duration = Duration::from_secs(60);

impl Relay {
    pub fn new(
        db: Database,
        amqp: AmqpSettings,
        settings: RelaySettings,
        signal: OutboxSignal,
        health: RelayHealth,
    ) -> Relay {
        let topology = Topology::from_settings(&amqp);
        Relay(Arc::new(RelayInner {
            db,
            amqp,
            settings,
            signal,
            health,
            topology,
        }))
    }

    /// Publishes until `shutdown`: then it stops taking new rounds, lets the round in flight
    /// finish (bounded by the confirm timeout) and returns. The publishing loop is supervised.
    pub async fn run(self, shutdown: CancellationToken) {
        let relay = &self.0;
        if relay.db.get_database_backend() == DbBackend::Postgres {
            tokio::spawn(forward_postgres_notifications(
                relay.db.connection().clone(),
                relay.signal.clone(),
                shutdown.child_token(),
            ));
        }
        let health = relay.health.clone();
        let publishing = self.clone();
        supervise("outbox relay", &health, shutdown.clone(), move |shutdown| {
            let relay = publishing.clone();
            async move {
                relay.publish_forever(shutdown).await;
                Ok(())
            }
        })
        .await;
        relay.health.set(BrokerState::NotRunning);
        tracing::info!("relay stopped");
    }

    async fn publish_forever(&self, shutdown: CancellationToken) {
        let relay = &self.0;
        let mut reconnect_delay = Duration::from_millis(relay.settings.reconnect_initial_ms);
        let url = relay.amqp.url.expose_secret().to_owned();
        relay
            .health
            .set(BrokerState::Connecting { last_error: None });
        let mut locks = (relay.db.get_database_backend() == DbBackend::Postgres)
            .then(|| EntityLocks::new(&relay.db));
        while !shutdown.is_cancelled() {
            let (connection, channel) = match self.connect(&url).await {
                Ok(connected) => connected,
                Err(error) => {
                    tracing::warn!(broker = %redact_url(&url), error = %error, retry_in = ?reconnect_delay, "broker unreachable");
                    relay.health.set(BrokerState::Connecting {
                        last_error: Some(error),
                    });
                    tokio::select! {
                        _ = tokio::time::sleep(reconnect_delay) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    reconnect_delay = (reconnect_delay * 2)
                        .min(Duration::from_millis(relay.settings.reconnect_max_ms));
                    continue;
                }
            };
            reconnect_delay = Duration::from_millis(relay.settings.reconnect_initial_ms);
            relay
                .health
                .set(BrokerState::Connected { since: Utc::now() });
            // The broker says at once when it blocks publishers (a resource alarm) and when it
            // lets them go again: shown in /readyz as it happens, even mid-round.
            let watcher = tokio::spawn(watch_blocking(
                connection.events_listener(),
                relay.health.clone(),
            ));
            tracing::info!(broker = %redact_url(&url), exchange = %relay.amqp.exchange, "relay connected");

            let lost = self
                .publish_until_lost(&connection, &channel, locks.as_mut(), &shutdown)
                .await;
            watcher.abort();
            // Closing politely must not hang on a broker that stopped answering.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                connection.close(200, "relay stopping".into()),
            )
            .await;
            if let Some(error) = lost {
                tracing::warn!(error = %error, "relay lost the broker; reconnecting");
                relay.health.set(BrokerState::Connecting {
                    last_error: Some(error),
                });
            }
        }
        if let Some(locks) = locks.as_mut() {
            let _ = locks.unlock_all().await;
        }
    }

    /// Connects, opens a confirming channel and declares the topology, all within
    /// `amqp.connect_timeout_ms`.
    async fn connect(&self, url: &str) -> Result<(Connection, Channel), String> {
        let relay = &self.0;
        let timeout = Duration::from_millis(relay.amqp.connect_timeout_ms);
        let connecting = async {
            let connection = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = connection.create_channel().await?;
            if relay.amqp.declare_topology {
                relay.topology.declare(&channel).await?;
            }
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>((connection, channel))
        };
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!("no connection within {timeout:?}")),
        }
    }

    /// Runs rounds while the channel works; returns why it stopped (none: shutdown).
    ///
    /// Up to `relay.rounds_in_flight` rounds at once, each a task of its own: the next round is
    /// read and claimed while the earlier ones wait for their confirms, so that the database's
    /// part of a round overlaps the broker's. Rounds in flight never share an entity (`busy`), so
    /// an entity's events stay in order. Before it returns, it lets the rounds in flight finish
    /// (each bounded by `relay.confirm_timeout_ms`) and releases their entities.
    async fn publish_until_lost(
        &self,
        connection: &Connection,
        channel: &Channel,
        mut locks: Option<&mut EntityLocks>,
        shutdown: &CancellationToken,
    ) -> Option<String> {
        let relay = &self.0;
        let poll = Duration::from_millis(relay.settings.poll_interval_ms);
        let linger = Duration::from_millis(relay.settings.linger_ms);
        let depth = relay.settings.rounds_in_flight.max(1) as usize;
        let mut rounds = RoundsInFlight::new(relay.health.0.rounds_in_flight.clone());
        let stopped = loop {
            if shutdown.is_cancelled() {
                break None;
            }
            if !channel.status().connected() {
                break Some("the channel closed".to_owned());
            }
            if connection.status().blocked() {
                // The broker does not read what we send: wait, without holding anything (the
                // watcher of the connection's events keeps /readyz and the log up to date).
                // Rounds in flight wait for their confirms on their own.
                while connection.status().blocked() && connection.status().connected() {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.cancelled() => break,
                    }
                }
                if shutdown.is_cancelled() {
                    break None;
                }
                if !connection.status().connected() {
                    break Some("connection closed while blocked".to_owned());
                }
            }
            // What to wait for before claiming the next round.
            let wait = if rounds.len() >= depth {
                Wait::RoundFinished
            } else {
                match self.claim_round(locks.as_deref_mut(), &rounds.busy).await {
                    Ok(Some(round)) => {
                        let full = round.events.len() >= relay.settings.batch_size as usize;
                        let (status, channel) = (connection.status().clone(), channel.clone());
                        let publishing = self.clone();
                        rounds.start(round.entities.clone(), async move {
                            publishing
                                .publish_and_record(&status, &channel, round)
                                .await
                        });
                        if full {
                            continue;
                        }
                        // A round that was not full: let events gather for a moment, so that
                        // a steady trickle is published in rounds of many rather than many
                        // rounds of one (each round costs the database several statements).
                        Wait::Linger
                    }
                    Ok(None) => Wait::Work,
                    Err(error) => {
                        tracing::warn!(error = %error, "relay could not reach the database; retrying");
                        Wait::Work
                    }
                }
            };
            let finished = tokio::select! {
                finished = rounds.next_finished(), if !rounds.is_empty() => finished,
                _ = tokio::time::sleep(linger), if wait == Wait::Linger => None,
                _ = relay.signal.notified(), if wait == Wait::Work => None,
                _ = tokio::time::sleep(poll), if wait == Wait::Work => None,
                _ = shutdown.cancelled() => None,
            };
            if let Some(finished) = finished
                && let Err(lost) = finish_round(finished, locks.as_deref_mut()).await
            {
                break Some(lost);
            }
        };
        while let Some(finished) = rounds.next_finished().await {
            let _ = finish_round(finished, locks.as_deref_mut()).await;
        }
        stopped
    }

    /// Reads the next round and claims its entities (PostgreSQL: advisory locks), passing over
    /// the entities of the rounds in flight (`busy`). None: nothing to publish now.
    async fn claim_round(
        &self,
        locks: Option<&mut EntityLocks>,
        busy: &HashSet<i64>,
    ) -> Result<Option<ClaimedRound>, StoreError> {
        let relay = &self.0;
        let started = std::time::Instant::now();
        let due = store::due_events(
            relay.db.connection(),
            Utc::now(),
            relay.settings.batch_size,
            relay.settings.events_per_entity,
            relay.settings.max_round_bytes,
            busy,
        )
        .await?;
        if due.is_empty() {
            return Ok(None);
        }
        let mut entities: Vec<i64> = due.iter().map(|event| event.entity).collect();
        entities.sort_unstable();
        entities.dedup();
        let mut locks = locks;
        if let Some(locks) = locks.as_deref_mut() {
            // PostgreSQL: another relay may hold some of the entities; the rest are ours until
            // the round is recorded. The events are read after the claim: another relay may have
            // published them a moment ago.
            let locked: HashSet<i64> = locks.lock(&entities).await?.into_iter().collect();
            entities.retain(|entity| locked.contains(entity));
        }
        let chosen_in = started.elapsed();
        let ids: Vec<i64> = due
            .iter()
            .filter(|event| entities.binary_search(&event.entity).is_ok())
            .map(|event| event.id)
            .collect();
        match store::pending_by_id(relay.db.connection(), &ids).await {
            Ok(events) if !events.is_empty() => Ok(Some(ClaimedRound {
                events,
                entities,
                started,
                chosen_in,
                claimed_in: started.elapsed(),
            })),
            read => {
                if let Some(locks) = locks {
                    let _ = locks.unlock(&entities).await;
                }
                read.map(|_| None)
            }
        }
    }

    /// Publishes a claimed round's events, then records the outcomes in a short transaction.
    async fn publish_and_record(
        &self,
        connection: &ConnectionStatus,
        channel: &Channel,
        round: ClaimedRound,
    ) -> Result<usize, RoundError> {
        let relay = &self.0;
        let ClaimedRound {
            mut events,
            entities,
            started,
            chosen_in,
            claimed_in,
        } = round;
        let _timer = RoundTimer(&relay.health.0.round_duration, started);
        let publishing = std::time::Instant::now();
        let outcomes = self.publish(connection, channel, &mut events).await;
        let recording = std::time::Instant::now();
        let txn = relay.db.begin_write(Writer::Relay).await?;
        let handled = self.record(&*txn, &events, &outcomes).await?;
        txn.commit().await?;
        // Where a round's time goes (what bounds a drain): reading and claiming, the broker's
        // confirms, the write transaction (its wait for the writer included).
        tracing::debug!(
            events = events.len(),
            entities = entities.len(),
            choose_ms = chosen_in.as_secs_f64() * 1e3,
            claim_ms = claimed_in.as_secs_f64() * 1e3,
            publish_ms = (recording - publishing).as_secs_f64() * 1e3,
            record_ms = recording.elapsed().as_secs_f64() * 1e3,
            "relay round"
        );
        broken_channel(channel, &outcomes)?;
        Ok(handled)
    }

    /// Publishes every event, then waits for all confirms: sends and confirms together within
    /// `confirm_timeout_ms`, not counting the time the broker blocks the connection (what was
    /// sent is confirmed once it lets go: waiting is cheaper than publishing it all again). An
    /// event that cannot be encoded is refused without being sent.
    ///
    /// Each event's body and headers are let go as soon as it is sent (recording its outcome
    /// needs neither; an event that goes out again is read again): a round's memory shrinks as
    /// its chains advance, and the rounds in flight together hold less than their full size.
    async fn publish(
        &self,
        connection: &ConnectionStatus,
        channel: &Channel,
        events: &mut [outbox_event::Model],
    ) -> Vec<Outcome> {
        let count = events.len();
        let relay = &self.0;
        let cloudevents = relay
            .amqp
            .cloudevents
            .then_some(relay.amqp.cloudevents_source.as_str());
        let exchange = relay.amqp.exchange.as_str();
        // One chain per entity, its events in id order, each sent only once the broker confirmed
        // the one before: a refused event, or one that cannot be encoded, withholds the rest of
        // its entity's (they stay pending, behind its retry). The chains run side by side:
        // entities have no order among them. Each message is encoded just before it is sent, so
        // a round holds the AMQP properties of its chains' current messages, not of all of them.
        let mut chains: Vec<Vec<(usize, &mut outbox_event::Model)>> = Vec::new();
        let mut chain_of: std::collections::HashMap<i64, usize> = std::collections::HashMap::new();
        for (index, event) in events.iter_mut().enumerate() {
            let chain = *chain_of.entry(event.tracked_entity_id).or_insert_with(|| {
                chains.push(Vec::new());
                chains.len() - 1
            });
            chains[chain].push((index, event));
        }
        let publishing = async {
            let sends = chains.into_iter().map(|chain| async move {
                let mut results = Vec::with_capacity(chain.len());
                for (index, event) in chain {
                    let (routing_key, properties) = match encode(&*event, cloudevents) {
                        Ok(message) => message,
                        Err(reason) => {
                            results.push((index, Outcome::Refused(reason)));
                            break;
                        }
                    };
                    let published = channel
                        .basic_publish(
                            exchange.into(),
                            routing_key,
                            BasicPublishOptions {
                                mandatory: true,
                                ..Default::default()
                            },
                            event.payload.as_bytes(),
                            properties,
                        )
                        .await;
                    // Sent, or not at all: this round needs its body no more.
                    event.payload = String::new();
                    event.headers = Value::Null;
                    let outcome = outcome_of(match published {
                        Ok(confirm) => confirm.await,
                        Err(error) => Err(error),
                    });
                    let confirmed = matches!(outcome, Outcome::Confirmed);
                    results.push((index, outcome));
                    if !confirmed {
                        break;
                    }
                }
                results
            });
            join_all(sends)
                .await
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
        };
        let timeout = Duration::from_millis(relay.settings.confirm_timeout_ms);
        let mut publishing = std::pin::pin!(publishing);
        let results = loop {
            match tokio::time::timeout(timeout, &mut publishing).await {
                Ok(results) => break Some(results),
                Err(_) if connection.blocked() && connection.connected() => {}
                Err(_) => break None,
            }
        };
        let mut outcomes: Vec<Outcome> = (0..count).map(|_| Outcome::NotSent).collect();
        match results {
            Some(results) => {
                for (index, outcome) in results {
                    outcomes[index] = outcome;
                }
            }
            None => tracing::warn!(
                ?timeout,
                "the broker did not confirm in time; the events stay pending"
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
        let relay = &self.0;
        let now = Utc::now();
        let confirmed: Vec<i64> = events
            .iter()
            .zip(outcomes)
            .filter(|(_, outcome)| matches!(outcome, Outcome::Confirmed))
            .map(|(event, _)| event.id)
            .collect();
        store::mark_published(db, &confirmed, now).await?;
        for (event, _) in events
            .iter()
            .zip(outcomes)
            .filter(|(_, outcome)| matches!(outcome, Outcome::Confirmed))
        {
            let lag = (now - event.created_at)
                .num_microseconds()
                .unwrap_or(0)
                .max(0);
            relay.health.observe_publish_lag(now, lag as f64 / 1e6);
        }
        let mut handled = confirmed.len();
        relay
            .health
            .0
            .published
            .fetch_add(confirmed.len() as u64, Ordering::Relaxed);
        for (event, outcome) in events.iter().zip(outcomes) {
            if let Outcome::Refused(reason) = outcome {
                let delay = backoff(&relay.settings, event.attempts);
                let next = now
                    + chrono::Duration::from_std(delay).unwrap_or_else(|_| {
                        // Backoff is capped by relay.retry_max_ms: this cannot be, but never
                        // means "at once".
                        tracing::warn!(?delay, "backoff beyond chrono's range; waiting a day");
                        chrono::Duration::days(1)
                    });
                let dead =
                    store::mark_refused(db, event, reason, next, relay.settings.max_attempts)
                        .await?;
                relay.health.0.refused.fetch_add(1, Ordering::Relaxed);
                if dead {
                    tracing::error!(event.id = %event.event_id, attempts = event.attempts + 1, reason, "outbox event is dead; its entity's later events wait behind it");
                } else {
                    tracing::warn!(event.id = %event.event_id, reason, retry_in = ?delay, "broker refused an outbox event");
                }
                handled += 1;
            }
        }
        Ok(handled)
    }
}

/// Follows the connection's events: blocked and unblocked by the broker.
async fn watch_blocking(
    events: impl futures_util::Stream<Item = lapin::Event> + Send,
    health: RelayHealth,
) {
    use futures_util::StreamExt;
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::ConnectionBlocked(reason) => {
                health.set(BrokerState::Blocked { since: Utc::now() });
                tracing::warn!(
                    reason,
                    "the broker blocks publishing (resource alarm); the relay waits, KCIs wait in the outbox"
                );
            }
            lapin::Event::ConnectionUnblocked => {
                health.set(BrokerState::Connected { since: Utc::now() });
                tracing::info!("the broker unblocked publishing");
            }
            _ => {}
        }
    }
}

/// Runs `task` until `shutdown`, restarting it with backoff when it panics or returns an error
/// before `shutdown` (and when it returns at all before `shutdown`: a publishing loop has no
/// reason to end on its own). Each failure is logged, counted and shown in `health`.
pub async fn supervise<F, Fut>(
    name: &'static str,
    health: &RelayHealth,
    shutdown: CancellationToken,
    task: F,
) where
    F: Fn(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut delay = RESTART_INITIAL;
    loop {
        let started = tokio::time::Instant::now();
        health.set_relay(RelayState::Running { since: Utc::now() });
        let running = tokio::spawn(AssertUnwindSafe(task(shutdown.child_token())).catch_unwind());
        let failure = match running.await {
            Ok(Ok(Ok(()))) if shutdown.is_cancelled() => break,
            Ok(Ok(Ok(()))) => "it returned on its own".to_owned(),
            Ok(Ok(Err(error))) => format!("{error:#}"),
            Ok(Err(panic)) => format!("panicked: {}", panic_message(panic.as_ref())),
            Err(join_error) => format!("{join_error}"),
        };
        if shutdown.is_cancelled() {
            break;
        }
        if started.elapsed() >= RESTART_RESET_AFTER {
            delay = RESTART_INITIAL;
        }
        health.0.restarts.fetch_add(1, Ordering::Relaxed);
        health.set_relay(RelayState::Restarting {
            since: Utc::now(),
            error: failure.clone(),
        });
        tracing::error!(task = name, error = failure, restart_in = ?delay, "a supervised task failed; restarting it");
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.cancelled() => break,
        }
        delay = (delay * 2).min(RESTART_MAX);
    }
    health.set_relay(RelayState::NotRunning);
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
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

/// What the broker's answer to one published message means for its event.
fn outcome_of(confirmation: Result<Confirmation, lapin::Error>) -> Outcome {
    match confirmation {
        Ok(Confirmation::Ack(None)) => Outcome::Confirmed,
        Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => {
            Outcome::Refused(format!(
                "returned by the broker: {} {}",
                returned.reply_code, returned.reply_text
            ))
        }
        Ok(Confirmation::Nack(None)) => Outcome::Refused("nacked by the broker".to_owned()),
        Ok(Confirmation::NotRequested) => {
            Outcome::Refused("publisher confirms are not enabled".to_owned())
        }
        Err(error) => classify(&error),
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

/// Most bytes of AMQP properties (headers included) a message may carry: they travel in one
/// content-header frame, which must fit RabbitMQ's smallest allowed `frame_max` with room to
/// spare. Events written by intake are far below it (every header bounded at 255 bytes); an
/// event over it (written otherwise) is refused, not sent, so that it cannot break the channel.
const MAX_PROPERTIES_BYTES: usize = 64 * 1024;

/// CloudEvents 1.0 attributes of an event (binary content mode: `cloudEvents_` headers; the
/// data content type is the message's `content_type`). `type` is the routing key under the
/// `com.fibrecafe` namespace (`com.fibrecafe.kci.provide_order.informational.committed`), the
/// subject the entity (`PROVIDE_ORDER/12345`), the time the KCI's acceptance.
fn cloudevents_attributes(event: &outbox_event::Model, source: &str) -> Vec<(String, String)> {
    let header = |name: &str| event.headers.get(name).and_then(Value::as_str);
    let mut attributes = vec![
        ("specversion", "1.0".to_owned()),
        ("id", event.event_id.to_string()),
        ("source", source.to_owned()),
        ("type", format!("com.fibrecafe.{}", event.routing_key)),
        (
            "time",
            event
                .created_at
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        ),
    ];
    if let (Some(entity_type), Some(entity_id)) = (header("entity-type"), header("entity-id")) {
        attributes.push(("subject", format!("{entity_type}/{entity_id}")));
    }
    if let Some(traceparent) = header("traceparent") {
        attributes.push(("traceparent", traceparent.to_owned()));
    }
    attributes
        .into_iter()
        .map(|(name, value)| (format!("cloudEvents_{name}"), value))
        .collect()
}

/// The routing key and properties of design.md's contract, or why the event cannot be an AMQP
/// message (a routing key or short string over 255 bytes, headers too large for a frame).
fn encode(
    event: &outbox_event::Model,
    cloudevents_source: Option<&str>,
) -> Result<(ShortString, BasicProperties), String> {
    let short = |what: &str, value: &str| {
        ShortString::try_new(value.to_owned())
            .map_err(|_| format!("cannot be encoded: the {what} is over 255 bytes"))
    };
    let routing_key = short("routing key", &event.routing_key)?;
    let mut headers = FieldTable::default();
    let mut size = 0usize;
    if let Value::Object(map) = &event.headers {
        for (name, value) in map {
            let value = match value {
                Value::Number(n) => match n.as_i64() {
                    Some(n) => AMQPValue::LongLongInt(n),
                    None => AMQPValue::LongString(LongString::from(n.to_string())),
                },
                Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
                Value::Bool(b) => AMQPValue::Boolean(*b),
                other => AMQPValue::LongString(LongString::from(other.to_string())),
            };
            size += 1
                + name.len()
                + 5
                + match &value {
                    AMQPValue::LongString(s) => s.as_bytes().len(),
                    _ => 8,
                };
            headers.insert(short("header name", name)?, value);
        }
    }
    if let Some(source) = cloudevents_source {
        for (name, value) in cloudevents_attributes(event, source) {
            size += name.len() + 6 + value.len();
            headers.insert(
                short("header name", &name)?,
                AMQPValue::LongString(LongString::from(value)),
            );
        }
    }
    if size > MAX_PROPERTIES_BYTES {
        return Err(format!(
            "cannot be encoded: {size} bytes of headers do not fit an AMQP frame"
        ));
    }
    // Rows from before the column existed were given it from their header by migration 6.
    let conversation_id = event.correlation_id.as_deref().unwrap_or_default();
    let properties = BasicProperties::default()
        .with_message_id(short("message id", &event.event_id.to_string())?)
        .with_correlation_id(short("correlation id", conversation_id)?)
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_timestamp(event.created_at.timestamp().max(0) as u64)
        .with_type(short("type", &event.message_type)?)
        .with_app_id("kci-receiver".into())
        .with_headers(headers);
    Ok((routing_key, properties))
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

    fn event(routing_key: &str, headers: Value) -> outbox_event::Model {
        let correlation_id = headers
            .get("x-conversation-id")
            .and_then(Value::as_str)
            .unwrap_or("c")
            .to_owned();
        outbox_event::Model {
            id: 1,
            event_id: uuid::Uuid::now_v7(),
            tracked_entity_id: 1,
            kci_ref: 1,
            routing_key: routing_key.to_owned(),
            message_type: "PROVIDE_ORDER".to_owned(),
            headers,
            payload: "{}".to_owned(),
            status: outbox_event::OutboxStatus::Pending,
            attempts: 0,
            next_attempt_at: Utc::now(),
            last_error: None,
            created_at: Utc::now(),
            published_at: None,
            publish_count: 0,
            correlation_id: Some(correlation_id),
        }
    }

    #[test]
    fn cloudevents_binary_mode_adds_the_attributes_as_headers_only_when_asked() {
        let published = event(
            "kci.provide_order.informational.committed",
            serde_json::json!({
                "x-conversation-id": "c", "entity-type": "PROVIDE_ORDER", "entity-id": "12345",
                "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            }),
        );
        let (_, plain) = encode(&published, None).unwrap();
        let plain = plain.headers().clone().unwrap_or_default();
        assert!(
            plain
                .inner()
                .keys()
                .all(|name| !name.as_str().starts_with("cloudEvents_"))
        );
        let (_, with) = encode(&published, Some("urn:kci-receiver:test")).unwrap();
        let headers = with.headers().clone().unwrap();
        let text = |name: &str| match headers.inner().get(name) {
            Some(AMQPValue::LongString(value)) => {
                String::from_utf8_lossy(value.as_bytes()).into_owned()
            }
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(text("cloudEvents_specversion"), "1.0");
        assert_eq!(text("cloudEvents_id"), published.event_id.to_string());
        assert_eq!(text("cloudEvents_source"), "urn:kci-receiver:test");
        assert_eq!(
            text("cloudEvents_type"),
            "com.fibrecafe.kci.provide_order.informational.committed"
        );
        assert_eq!(text("cloudEvents_subject"), "PROVIDE_ORDER/12345");
        assert!(text("cloudEvents_time").ends_with('Z'));
        assert_eq!(
            text("cloudEvents_traceparent"),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(
            with.content_type().as_ref().unwrap().as_str(),
            "application/json"
        );
    }

    #[test]
    fn an_event_that_cannot_be_an_amqp_message_is_refused_not_a_panic() {
        let fine = event("kci.a.b.c", serde_json::json!({"x-conversation-id": "c"}));
        assert!(encode(&fine, None).is_ok());
        let long_key = event(&"k".repeat(256), serde_json::json!({}));
        assert!(encode(&long_key, None).unwrap_err().contains("routing key"));
        let huge_header = event(
            "kci.a.b.c",
            serde_json::json!({"new-status": "S".repeat(200_000)}),
        );
        assert!(encode(&huge_header, None).unwrap_err().contains("frame"));
        let long_correlation = event(
            "kci.a.b.c",
            serde_json::json!({"x-conversation-id": "c".repeat(300)}),
        );
        assert!(
            encode(&long_correlation, None)
                .unwrap_err()
                .contains("correlation")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_supervised_task_that_panics_is_restarted_counted_and_shown() {
        let health = RelayHealth::default();
        let shutdown = CancellationToken::new();
        let runs = Arc::new(AtomicU64::new(0));
        let counted = runs.clone();
        let supervising = tokio::spawn({
            let health = health.clone();
            let shutdown = shutdown.clone();
            async move {
                supervise("test task", &health, shutdown, move |stop| {
                    let run = counted.fetch_add(1, Ordering::SeqCst);
                    async move {
                        match run {
                            0 => panic!("first run panics"),
                            1 => anyhow::bail!("second run fails"),
                            _ => {
                                stop.cancelled().await;
                                Ok(())
                            }
                        }
                    }
                })
                .await
            }
        });
        while runs.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(health.restarts(), 2);
        assert!(matches!(health.relay_state(), RelayState::Running { .. }));
        shutdown.cancel();
        supervising.await.unwrap();
        assert_eq!(health.relay_state(), RelayState::NotRunning);
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "not restarted after shutdown"
        );
    }
}
