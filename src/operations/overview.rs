//! The dashboard's overview (`GET /api/v1/overview`), served from memory.
//!
//! The background task that reads the metrics' gauges (`http::metrics`, every
//! `metrics.refresh_interval_ms`) also feeds this: the entities by type and status it already
//! counts, the outbox backlog it already reads (kept as samples, a time series), and the KCIs
//! recorded since its last round, read by primary key (`kci.id > last seen`), so that a round
//! costs what arrived since the previous one, whatever the size of the database, and a page load
//! costs no query at all. Publish lag per minute comes from this process's relay as it confirms
//! events (`RelayHealth::publish_lag_per_minute`).
//!
//! The window is [`WINDOW_MINUTES`]. On start, the first round finds the window's first KCI by a
//! binary search over the primary key (KCIs are numbered in the order they were recorded), so
//! even that round reads only the window.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, DurationRound, Utc};
use entity::kci;
use sea_orm::{
    ColumnTrait, ConnectionTrait, EntityTrait, FromQueryResult, QueryFilter, QueryOrder,
    QuerySelect,
};
use serde::Serialize;
use utoipa::ToSchema;

use crate::kci::{EntityType, UpdateType};
use crate::operations::queries::Family;
use crate::store::StoreError;

/// Three hours of per-minute figures.
pub const WINDOW_MINUTES: i64 = 180;

/// Publish lag per minute, as [`LagMinute`] needs it: `(events, sum of lags, largest lag)`.
pub type LagTally = (u64, f64, f64);
/// KCIs read per query while catching up, so that a burst never loads at once.
const CHUNK: u64 = 5_000;
/// How long after its `received_at` a KCI's transaction may still commit and be counted.
const LATE_COMMIT: Duration = Duration::seconds(15);

/// What the refresh task has read; cheap to clone (one shared state).
#[derive(Clone, Default)]
pub struct Overview(Arc<Mutex<State>>);

#[derive(Default)]
struct State {
    /// `(entity type, status) -> entities`, as the database says.
    entities: Vec<(String, String, i64)>,
    /// Minute -> update type -> KCIs recorded in it.
    kcis: BTreeMap<DateTime<Utc>, BTreeMap<&'static str, u64>>,
    /// Every KCI with an id above this one is either counted in `recent` or not read yet.
    floor_kci_id: Option<i64>,
    /// KCIs counted in the last [`LATE_COMMIT`] (id -> received at): a transaction that took
    /// its ids before another's but committed after it shows up on a later read, and is
    /// counted then, once.
    recent: BTreeMap<i64, DateTime<Utc>>,
    backlog: VecDeque<BacklogSample>,
    refreshed_at: Option<DateTime<Utc>>,
}

/// The outbox as one refresh round found it.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct BacklogSample {
    pub at: DateTime<Utc>,
    pub pending: u64,
    pub dead: u64,
    /// Age of the oldest pending event, in seconds (0 when none).
    pub oldest_pending_seconds: f64,
}

/// `GET /api/v1/overview`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OverviewView {
    /// When the figures were last read from the database (null before the first read, a few
    /// seconds after start).
    pub refreshed_at: Option<DateTime<Utc>>,
    /// How often they are read (`metrics.refresh_interval_ms`), so that a page knows how often
    /// asking again is worth it.
    pub refresh_seconds: f64,
    pub window_minutes: i64,
    /// Per entity type: its lifecycle's statuses in order, each with how many entities are in it.
    pub entity_types: Vec<EntityTypeFunnel>,
    /// One entry per minute of the window, oldest first.
    pub kcis_per_minute: Vec<KciMinute>,
    /// The outbox backlog at each refresh round of the window (this instance's rounds).
    pub outbox: Vec<BacklogSample>,
    /// Publish lag per minute as this process's relay saw it (empty when the relay runs as a
    /// process of its own).
    pub publish_lag: Vec<LagMinute>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct EntityTypeFunnel {
    /// The KCI entity type, or `UNLISTED` for the types the gateway sent that are not listed.
    pub entity_type: String,
    /// The operations API's list of the type (`service-orders`, ...), without the slash.
    pub resource: Option<String>,
    pub total: i64,
    /// Not in a final status.
    pub in_flight: i64,
    pub statuses: Vec<StatusCount>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StatusCount {
    /// A status of the lifecycle, or `OTHER` for statuses it does not know.
    pub status: String,
    pub count: i64,
    pub terminal: bool,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KciMinute {
    pub minute: DateTime<Utc>,
    pub informational: u64,
    pub action_required: u64,
    pub error: u64,
    /// Update types the gateway sent that are not listed.
    pub other: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct LagMinute {
    pub minute: DateTime<Utc>,
    pub events: u64,
    pub average_seconds: f64,
    pub max_seconds: f64,
}

impl LagMinute {
    pub fn from_tally(minute: DateTime<Utc>, (events, sum, max): LagTally) -> LagMinute {
        LagMinute {
            minute,
            events,
            average_seconds: if events > 0 { sum / events as f64 } else { 0.0 },
            max_seconds: max,
        }
    }
}

#[derive(FromQueryResult)]
struct KciTick {
    id: i64,
    update_type: String,
    received_at: DateTime<Utc>,
}

fn minute_of(at: DateTime<Utc>) -> DateTime<Utc> {
    at.duration_trunc(Duration::minutes(1)).unwrap_or(at)
}

fn update_type_label(wire: &str) -> &'static str {
    UpdateType::from_wire(wire).map_or("OTHER", UpdateType::as_str)
}

impl Overview {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the figures inconsistent in a way that
        // matters for a chart; go on with them.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One refresh round: the entity counts and backlog the metrics task read, and the KCIs
    /// recorded since the previous round.
    pub async fn refresh(
        &self,
        db: &impl ConnectionTrait,
        entities: Vec<(String, String, i64)>,
        backlog: BacklogSample,
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        let window_start = minute_of(now) - Duration::minutes(WINDOW_MINUTES - 1);
        let floor = self.state().floor_kci_id;
        let start = match floor {
            Some(id) => id,
            None => first_id_in_window(db, window_start).await? - 1,
        };
        let mut after = start;
        let mut counted: Vec<KciTick> = Vec::new();
        loop {
            let chunk = kci::Entity::find()
                .select_only()
                .column(kci::Column::Id)
                .column(kci::Column::UpdateType)
                .column(kci::Column::ReceivedAt)
                .filter(kci::Column::Id.gt(after))
                .order_by_asc(kci::Column::Id)
                .limit(CHUNK)
                .into_model::<KciTick>()
                .all(db)
                .await?;
            let full = chunk.len() as u64 == CHUNK;
            if let Some(last) = chunk.last() {
                after = last.id;
            }
            counted.extend(chunk);
            if !full {
                break;
            }
        }
        let mut state = self.state();
        state.entities = entities;
        state.floor_kci_id.get_or_insert(start);
        for tick in &counted {
            if state.recent.insert(tick.id, tick.received_at).is_some() {
                continue;
            }
            let minute = minute_of(tick.received_at);
            if minute >= window_start {
                *state
                    .kcis
                    .entry(minute)
                    .or_default()
                    .entry(update_type_label(&tick.update_type))
                    .or_default() += 1;
            }
        }
        // KCIs older than LATE_COMMIT leave `recent`; the floor rises to the highest of them
        // only while nothing newer sits below it.
        let settled_before = now - LATE_COMMIT;
        while let Some((&id, &received_at)) = state.recent.first_key_value() {
            if received_at >= settled_before {
                break;
            }
            state.recent.pop_first();
            state.floor_kci_id = Some(id);
        }
        state.kcis = state.kcis.split_off(&window_start);
        state.backlog.push_back(backlog);
        while state
            .backlog
            .front()
            .is_some_and(|sample| sample.at < window_start)
        {
            state.backlog.pop_front();
        }
        state.refreshed_at = Some(now);
        Ok(())
    }

    /// The overview now; `publish_lag` is the relay's per-minute series
    /// ([`crate::outbox::relay::RelayHealth::publish_lag_per_minute`]).
    pub fn view(&self, refresh_seconds: f64, publish_lag: Vec<LagMinute>) -> OverviewView {
        let state = self.state();
        let now = Utc::now();
        let window_start = minute_of(now) - Duration::minutes(WINDOW_MINUTES - 1);
        let kcis_per_minute = (0..WINDOW_MINUTES)
            .map(|offset| {
                let minute = window_start + Duration::minutes(offset);
                let counts = state.kcis.get(&minute);
                let of = |label: &str| counts.and_then(|c| c.get(label)).copied().unwrap_or(0);
                KciMinute {
                    minute,
                    informational: of(UpdateType::Informational.as_str()),
                    action_required: of(UpdateType::ActionRequired.as_str()),
                    error: of(UpdateType::Error.as_str()),
                    other: of("OTHER"),
                }
            })
            .collect();
        OverviewView {
            refreshed_at: state.refreshed_at,
            refresh_seconds,
            window_minutes: WINDOW_MINUTES,
            entity_types: funnels(&state.entities),
            kcis_per_minute,
            outbox: state
                .backlog
                .iter()
                .filter(|sample| sample.at >= window_start)
                .copied()
                .collect(),
            publish_lag: publish_lag
                .into_iter()
                .filter(|lag| lag.minute >= window_start)
                .collect(),
        }
    }
}

/// Each listed entity type with every status of its lifecycle (zero counts included, in the
/// lifecycle's order), then the unlisted ones together; statuses a lifecycle does not know are
/// counted as `OTHER`, so that what the gateway sends cannot grow the answer without bound.
fn funnels(counts: &[(String, String, i64)]) -> Vec<EntityTypeFunnel> {
    let mut funnels: Vec<EntityTypeFunnel> = EntityType::ALL
        .iter()
        .map(|entity_type| {
            let lifecycle = entity_type.lifecycle();
            EntityTypeFunnel {
                entity_type: entity_type.as_str().to_owned(),
                resource: Some(Family::of(*entity_type).resource().to_owned()),
                total: 0,
                in_flight: 0,
                statuses: lifecycle
                    .statuses
                    .iter()
                    .map(|status| StatusCount {
                        status: (*status).to_owned(),
                        count: 0,
                        terminal: lifecycle.is_terminal(status),
                    })
                    .collect(),
            }
        })
        .collect();
    let mut unlisted = EntityTypeFunnel {
        entity_type: "UNLISTED".to_owned(),
        resource: None,
        total: 0,
        in_flight: 0,
        statuses: Vec::new(),
    };
    for (entity_type, status, n) in counts {
        let listed = EntityType::from_wire(entity_type);
        let funnel = match listed {
            Some(listed) => {
                &mut funnels[EntityType::ALL
                    .iter()
                    .position(|t| *t == listed)
                    .expect("listed")]
            }
            None => &mut unlisted,
        };
        let terminal = listed.is_some_and(|t| t.lifecycle().is_terminal(status));
        funnel.total += n;
        if !terminal {
            funnel.in_flight += n;
        }
        let label = if listed.is_some() && funnel.statuses.iter().any(|s| s.status == *status) {
            status.as_str()
        } else {
            "OTHER"
        };
        match funnel.statuses.iter_mut().find(|s| s.status == label) {
            Some(existing) => existing.count += n,
            None => funnel.statuses.push(StatusCount {
                status: label.to_owned(),
                count: *n,
                terminal: false,
            }),
        }
    }
    if unlisted.total > 0 {
        funnels.push(unlisted);
    }
    funnels
}

/// The id of the first KCI recorded at or after `since` (one past the last KCI when none is),
/// by a binary search over the primary key: KCIs are numbered in the order they were recorded,
/// so their `received_at` grows with their id (within a group commit's few milliseconds).
async fn first_id_in_window(
    db: &impl ConnectionTrait,
    since: DateTime<Utc>,
) -> Result<i64, StoreError> {
    let bound = |ascending: bool| {
        let query = kci::Entity::find().select_only().column(kci::Column::Id);
        let query = if ascending {
            query.order_by_asc(kci::Column::Id)
        } else {
            query.order_by_desc(kci::Column::Id)
        };
        query.into_tuple::<i64>().one(db)
    };
    let (Some(mut low), Some(high)) = (bound(true).await?, bound(false).await?) else {
        return Ok(1);
    };
    let mut high = high + 1;
    // Invariant: every KCI below `low` is older than `since`; the one at `high` (if any) is not.
    while low < high {
        let middle = low + (high - low) / 2;
        // The first KCI at or after `middle` (ids can have holes: rolled-back inserts).
        let at = kci::Entity::find()
            .select_only()
            .column(kci::Column::Id)
            .column(kci::Column::ReceivedAt)
            .filter(kci::Column::Id.gte(middle))
            .order_by_asc(kci::Column::Id)
            .limit(1)
            .into_model::<IdAndTime>()
            .one(db)
            .await?;
        match at {
            Some(found) if found.received_at < since => low = found.id + 1,
            _ => high = middle,
        }
    }
    Ok(low)
}

#[derive(FromQueryResult)]
struct IdAndTime {
    id: i64,
    received_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn funnels_keep_the_lifecycle_order_and_bound_what_the_gateway_sends() {
        let counts = vec![
            ("PROVIDE_ORDER".to_owned(), "COMPLETED".to_owned(), 3),
            ("PROVIDE_ORDER".to_owned(), "IN_PROGRESS".to_owned(), 2),
            ("PROVIDE_ORDER".to_owned(), "SOMETHING_NEW".to_owned(), 1),
            ("PROVIDE_ORDER".to_owned(), "ANOTHER_NEW".to_owned(), 1),
            ("FIBRE_THING".to_owned(), "WHATEVER".to_owned(), 4),
        ];
        let funnels = funnels(&counts);
        let provide = funnels
            .iter()
            .find(|f| f.entity_type == "PROVIDE_ORDER")
            .unwrap();
        assert_eq!(provide.total, 7);
        assert_eq!(provide.in_flight, 4, "COMPLETED is final");
        let lifecycle = EntityType::ProvideOrder.lifecycle();
        let listed: Vec<&str> = provide
            .statuses
            .iter()
            .take(lifecycle.statuses.len())
            .map(|s| s.status.as_str())
            .collect();
        assert_eq!(listed, lifecycle.statuses, "every status, in order");
        let other: Vec<_> = provide
            .statuses
            .iter()
            .filter(|s| s.status == "OTHER")
            .collect();
        assert_eq!(other.len(), 1);
        assert_eq!(other[0].count, 2);
        let unlisted = funnels.last().unwrap();
        assert_eq!(
            (unlisted.entity_type.as_str(), unlisted.total),
            ("UNLISTED", 4)
        );
        assert_eq!(unlisted.statuses.len(), 1);
        assert_eq!(unlisted.statuses[0].status, "OTHER");
        assert!(
            funnels[..funnels.len() - 1]
                .iter()
                .all(|f| f.resource.is_some())
        );
    }

    #[test]
    fn an_empty_database_gives_zero_funnels_and_a_full_window_of_minutes() {
        let view = Overview::default().view(10.0, Vec::new());
        assert!(view.refreshed_at.is_none());
        assert_eq!(view.kcis_per_minute.len() as i64, WINDOW_MINUTES);
        assert!(view.entity_types.iter().all(|f| f.total == 0));
    }
}
