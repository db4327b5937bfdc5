//! A simulator of the Fibre Cafe gateway (`kci-tools simulate`): it registers the original
//! requests of a configurable number of orders, tests and problems (through the operations API,
//! or as creating calls through kci-receiver's egress proxy to the simulated Tenant API,
//! [`tenant_api`]), then POSTs their KCI
//! lifecycles ([`scenarios`]) as the gateway does, with what a real gateway mixes in:
//! redeliveries, out-of-order delivery, sequence gaps, KCIs before their conversation is known.
//! Rate, concurrency, duration and mix are options; the seed makes a run repeatable. The
//! benchmark drives kci-receiver with it.

pub mod random;
pub mod scenarios;
pub mod tenant_api;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;
use tokio::sync::Mutex;

use kci_receiver::kci::EntityType;
use random::Random;

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Options {
    /// kci-receiver's base URL, e.g. `http://127.0.0.1:8080`.
    pub base_url: String,
    /// More instances of kci-receiver (on one database): KCIs go to all of them in turn, as
    /// behind a load balancer, so that the same entity's KCIs arrive through several.
    pub other_base_urls: Vec<String>,
    pub gateway_user: String,
    pub gateway_password: String,
    /// Operations admin credentials, to register original requests; none: do not register.
    pub admin: Option<(String, String)>,
    /// Register by sending each creating call through kci-receiver's egress proxy mounted at
    /// this path prefix (e.g. `/fibre-cafe/v1`), as a CP's systems would; none: register through
    /// `POST /api/v1/conversations`.
    pub egress_prefix: Option<String>,
    /// Entities of each type: provide/cease/modify orders share `orders`.
    pub orders: u64,
    pub ethernet_orders: u64,
    pub unsolicited_ceases: u64,
    pub tests: u64,
    pub problems: u64,
    /// POSTs in flight at once.
    pub concurrency: usize,
    /// KCIs per second over all workers; none: as fast as the service answers.
    pub rate: Option<f64>,
    /// Stop starting new lifecycles after this long.
    pub duration: Option<Duration>,
    pub seed: u64,
    /// Chances, per KCI or per entity, of what real gateways do.
    pub redelivery_chance: f64,
    pub out_of_order_chance: f64,
    pub gap_chance: f64,
    pub late_registration_chance: f64,
    /// Gateway ids start here (different runs can use different ranges).
    pub first_gateway_id: u64,
    /// Like the gateway: a KCI answered 503 (or not answered at all) is sent again after this
    /// long (or its `Retry-After`, whichever is shorter), up to 100 times. None: never.
    pub retry_unavailable: Option<Duration>,
    /// Stop starting new POSTs once this is set (for drills that end a load from outside).
    pub stop: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Share of KCIs the gateway "loses": produced (and kept in `gateway_record`) but never
    /// posted. kci-receiver then sees sequence gaps that only the Tenant API can fill.
    pub drop_rate: f64,
    /// Where the simulated gateway keeps every KCI it produces (the simulated Tenant API's
    /// `updates[]`).
    pub gateway_record: Option<tenant_api::GatewayRecord>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            base_url: "http://127.0.0.1:8080".to_owned(),
            other_base_urls: Vec::new(),
            drop_rate: 0.0,
            gateway_record: None,
            gateway_user: "fibrecafe".to_owned(),
            gateway_password: String::new(),
            admin: None,
            egress_prefix: None,
            orders: 100,
            ethernet_orders: 10,
            unsolicited_ceases: 10,
            tests: 50,
            problems: 30,
            concurrency: 8,
            rate: None,
            duration: None,
            seed: 1,
            redelivery_chance: 0.02,
            out_of_order_chance: 0.02,
            gap_chance: 0.02,
            late_registration_chance: 0.05,
            first_gateway_id: 1_000_000,
            retry_unavailable: None,
            stop: None,
        }
    }
}

/// One answer to a `POST /kcis`, for timelines (drills).
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// When the answer came (or the request failed).
    pub at: Instant,
    /// The status; none when no answer came (connection refused or cut, timeout).
    pub status: Option<u16>,
    pub latency: Duration,
}

/// A KCI that got 204, and when.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub kci_id: String,
    pub at: Instant,
}

/// What a run did.
/// A KCI the simulated gateway produced but never posted (`Options::drop_rate`).
#[derive(Debug, Clone)]
pub struct Dropped {
    pub kci_id: String,
    pub entity_type: String,
    pub gateway_id: u64,
    pub at: Instant,
}

pub struct Report {
    /// KCIs "lost" on purpose (never posted).
    pub dropped: Vec<Dropped>,
    pub lifecycles: u64,
    pub posted: u64,
    pub accepted: Vec<Accepted>,
    /// Answers other than 204, by status.
    pub other_statuses: BTreeMap<u16, u64>,
    pub transport_errors: u64,
    pub registrations: u64,
    /// POST /kcis latency, microseconds.
    pub latency: Histogram<u64>,
    pub elapsed: Duration,
    /// Every answer, in no particular order.
    pub answers: Vec<Answer>,
}

impl Report {
    /// Accepted KCIs per second (redeliveries included: each one is a 204).
    pub fn throughput(&self) -> f64 {
        self.accepted.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn summary(&self) -> String {
        let ms = |q: f64| self.latency.value_at_quantile(q) as f64 / 1000.0;
        format!(
            "{} lifecycles, {} POSTs, {} accepted (204), other answers {:?}, {} transport errors, {} registrations in {:.2}s: \
             {:.0} KCIs/s; latency p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            self.lifecycles,
            self.posted,
            self.accepted.len(),
            self.other_statuses,
            self.transport_errors,
            self.registrations,
            self.elapsed.as_secs_f64(),
            self.throughput(),
            ms(0.5),
            ms(0.95),
            ms(0.99),
            self.latency.max() as f64 / 1000.0,
        ) + &if self.dropped.is_empty() {
            String::new()
        } else {
            format!(
                "; {} KCIs dropped on purpose (never posted; the Tenant API's updates[] has them)",
                self.dropped.len()
            )
        }
    }
}

/// What became of the dropped KCIs: how many kci-receiver recovered (gap repair) and how long
/// after the simulated gateway dropped them.
#[derive(Debug, Default)]
pub struct Recovery {
    pub dropped: usize,
    /// Time from the drop to the KCI being found in kci-receiver, per recovered KCI.
    pub delays: Vec<Duration>,
    /// Dropped KCIs not recovered within the wait, by KCI id.
    pub missing: Vec<String>,
}

impl Recovery {
    pub fn summary(&self) -> String {
        let mut delays = self.delays.clone();
        delays.sort();
        let at = |q: f64| {
            delays
                .get(((delays.len() as f64 * q).ceil() as usize).saturating_sub(1))
                .map_or(0.0, Duration::as_secs_f64)
        };
        format!(
            "gap repair: {} of {} dropped KCIs recovered; {:.1} s after the drop at the median, {:.1} s at p95, {:.1} s at most",
            delays.len(),
            self.dropped,
            at(0.5),
            at(0.95),
            delays.last().map_or(0.0, Duration::as_secs_f64)
        )
    }
}

/// Waits up to `wait` for every dropped KCI to be recorded by kci-receiver (asked through
/// `GET /api/v1/kcis/{id}` with the operations credentials `admin`), polling every 250 ms.
pub async fn await_recovery(
    base_url: &str,
    admin: &(String, String),
    dropped: &[Dropped],
    wait: Duration,
) -> anyhow::Result<Recovery> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + wait;
    let mut waiting: Vec<&Dropped> = dropped.iter().collect();
    let mut recovery = Recovery {
        dropped: dropped.len(),
        ..Recovery::default()
    };
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for kci in waiting {
            let found = client
                .get(format!("{base_url}/api/v1/kcis/{}", kci.kci_id))
                .basic_auth(&admin.0, Some(&admin.1))
                .send()
                .await?
                .status()
                .is_success();
            if found {
                recovery.delays.push(kci.at.elapsed());
            } else {
                still.push(kci);
            }
        }
        waiting = still;
        if waiting.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    recovery.missing = waiting.iter().map(|k| k.kci_id.clone()).collect();
    Ok(recovery)
}

/// The entity type of each lifecycle, in a seeded shuffled order.
fn plan(options: &Options) -> Vec<EntityType> {
    let mut plan = Vec::new();
    let orders = [
        EntityType::ProvideOrder,
        EntityType::CeaseOrder,
        EntityType::ModifyOrder,
    ];
    for i in 0..options.orders {
        plan.push(orders[(i % 3) as usize]);
    }
    for (count, entity_type) in [
        (options.ethernet_orders, EntityType::ProvideEthernetOrder),
        (
            options.unsolicited_ceases,
            EntityType::UnsolicitedCeaseOrder,
        ),
        (options.tests, EntityType::ServiceTest),
        (options.problems, EntityType::ServiceProblem),
    ] {
        plan.extend(std::iter::repeat_n(entity_type, count as usize));
    }
    let mut random = Random::new(options.seed);
    for i in (1..plan.len()).rev() {
        plan.swap(i, random.below(i as u64 + 1) as usize);
    }
    plan
}

struct Shared {
    options: Options,
    plan: Vec<EntityType>,
    next: AtomicUsize,
    started: Instant,
    pacer: Option<Mutex<tokio::time::Interval>>,
    client: reqwest::Client,
    /// Turns among the instances KCIs are posted to.
    posts: AtomicUsize,
}

#[derive(Default)]
struct WorkerTally {
    dropped: Vec<Dropped>,
    lifecycles: u64,
    posted: u64,
    accepted: Vec<Accepted>,
    other_statuses: BTreeMap<u16, u64>,
    transport_errors: u64,
    registrations: u64,
    answers: Vec<Answer>,
}

/// Runs the simulation to the end (or its duration).
pub async fn run(options: Options) -> anyhow::Result<Report> {
    let concurrency = options.concurrency.max(1);
    let pacer = options.rate.filter(|r| *r > 0.0).map(|rate| {
        let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Mutex::new(interval)
    });
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .timeout(Duration::from_secs(30))
        .build()?;
    let shared = Arc::new(Shared {
        plan: plan(&options),
        options,
        next: AtomicUsize::new(0),
        started: Instant::now(),
        pacer,
        client,
        posts: AtomicUsize::new(0),
    });
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let shared = shared.clone();
            tokio::spawn(async move {
                let mut histogram =
                    Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).expect("valid bounds");
                let mut tally = WorkerTally::default();
                worker(&shared, &mut tally, &mut histogram).await;
                (tally, histogram)
            })
        })
        .collect();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut report_tally = WorkerTally::default();
    for worker in workers {
        let (tally, histogram) = worker.await?;
        latency.add(&histogram)?;
        report_tally.dropped.extend(tally.dropped);
        report_tally.lifecycles += tally.lifecycles;
        report_tally.posted += tally.posted;
        report_tally.accepted.extend(tally.accepted);
        report_tally.transport_errors += tally.transport_errors;
        report_tally.registrations += tally.registrations;
        report_tally.answers.extend(tally.answers);
        for (status, count) in tally.other_statuses {
            *report_tally.other_statuses.entry(status).or_default() += count;
        }
    }
    Ok(Report {
        dropped: report_tally.dropped,
        lifecycles: report_tally.lifecycles,
        posted: report_tally.posted,
        accepted: report_tally.accepted,
        other_statuses: report_tally.other_statuses,
        transport_errors: report_tally.transport_errors,
        registrations: report_tally.registrations,
        latency,
        elapsed: shared.started.elapsed(),
        answers: report_tally.answers,
    })
}

impl Shared {
    /// The instance the next KCI goes to (round robin over `base_url` and `other_base_urls`).
    fn next_base_url(&self) -> &str {
        let turn = self.posts.fetch_add(1, Ordering::Relaxed);
        match turn % (1 + self.options.other_base_urls.len()) {
            0 => &self.options.base_url,
            n => &self.options.other_base_urls[n - 1],
        }
    }

    fn stopped(&self) -> bool {
        self.options
            .duration
            .is_some_and(|d| self.started.elapsed() >= d)
            || self
                .options
                .stop
                .as_ref()
                .is_some_and(|stop| stop.load(Ordering::Relaxed))
    }
}

async fn worker(shared: &Shared, tally: &mut WorkerTally, histogram: &mut Histogram<u64>) {
    let options = &shared.options;
    loop {
        if shared.stopped() {
            return;
        }
        let index = shared.next.fetch_add(1, Ordering::Relaxed);
        let Some(entity_type) = shared.plan.get(index).copied() else {
            return;
        };
        // Each lifecycle has a generator of its own: a run replays whatever the scheduling.
        let mut random = Random::new(options.seed ^ (index as u64).wrapping_mul(0x9E37_79B9));
        let story = scenarios::lifecycle(
            &mut random,
            entity_type,
            options.first_gateway_id + index as u64,
            options.gap_chance,
        );
        tally.lifecycles += 1;
        let late = random.chance(options.late_registration_chance);
        if !late {
            register(shared, &story, tally).await;
        }
        let mut kcis = story.kcis.clone();
        for i in 1..kcis.len() {
            if random.chance(options.out_of_order_chance) {
                kcis.swap(i - 1, i);
            }
        }
        for (position, planned) in kcis.iter().enumerate() {
            if let Some(record) = &options.gateway_record {
                record.record(&planned.body);
            }
            // Drawn only when dropping is on: a seed replays the same run as before otherwise.
            if options.drop_rate > 0.0 && random.chance(options.drop_rate) {
                tally.dropped.push(Dropped {
                    kci_id: planned.body["id"].as_str().unwrap_or_default().to_owned(),
                    entity_type: planned.body["entityType"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    gateway_id: story.gateway_id,
                    at: Instant::now(),
                });
                continue;
            }
            let times = if random.chance(options.redelivery_chance) {
                2
            } else {
                1
            };
            for _ in 0..times {
                post(
                    shared,
                    &planned.body,
                    &story.conversation_id,
                    tally,
                    histogram,
                )
                .await;
            }
            if late && position == 0 {
                register(shared, &story, tally).await;
            }
        }
    }
}

async fn register(shared: &Shared, story: &scenarios::Lifecycle, tally: &mut WorkerTally) {
    let (Some((user, password)), Some(operation)) = (&shared.options.admin, story.operation) else {
        return;
    };
    let request_id = uuid::Uuid::new_v4().to_string();
    let order_type = match story.entity_type {
        EntityType::CeaseOrder => "CEASE",
        EntityType::ModifyOrder => "MODIFY",
        _ => "NEW",
    };
    let sent = match &shared.options.egress_prefix {
        // The creating call itself, through the proxy: it records the original request from
        // the simulated gateway's answer.
        Some(prefix) => {
            let (method, path) = operation.split_once(' ').unwrap_or(("POST", operation));
            let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or_default();
            shared
                .client
                .request(method, format!("{}{prefix}{path}", shared.options.base_url))
                .basic_auth(user, Some(password))
                .header("X-Request-ID", &request_id)
                .header("X-Conversation-ID", &story.conversation_id)
                .json(&json!({"orderType": order_type, "simulatorGatewayId": story.gateway_id}))
                .send()
                .await
        }
        None => {
            let body = json!({
                "conversationId": story.conversation_id,
                "requestId": request_id,
                "operation": operation,
                "gatewayId": story.gateway_id,
                "responseStatus": 201,
                "requestBody": {"orderType": order_type},
            });
            shared
                .client
                .post(format!("{}/api/v1/conversations", shared.options.base_url))
                .basic_auth(user, Some(password))
                .json(&body)
                .send()
                .await
        }
    };
    if sent.is_ok_and(|r| r.status().is_success()) {
        tally.registrations += 1;
    }
}

/// Posts one KCI; like the gateway, again after a 503 or no answer when `retry_unavailable`.
async fn post(
    shared: &Shared,
    body: &serde_json::Value,
    conversation_id: &str,
    tally: &mut WorkerTally,
    histogram: &mut Histogram<u64>,
) {
    for _ in 0..100 {
        let retry_after = post_once(shared, body, conversation_id, tally, histogram).await;
        match (retry_after, shared.options.retry_unavailable) {
            (Some(retry_after), Some(delay)) if !shared.stopped() => {
                tokio::time::sleep(retry_after.min(delay)).await;
            }
            _ => return,
        }
    }
}

/// One attempt; returns how long to wait before trying again, when it should be tried again.
async fn post_once(
    shared: &Shared,
    body: &serde_json::Value,
    conversation_id: &str,
    tally: &mut WorkerTally,
    histogram: &mut Histogram<u64>,
) -> Option<Duration> {
    if let Some(pacer) = &shared.pacer {
        pacer.lock().await.tick().await;
    }
    let started = Instant::now();
    let sent = shared
        .client
        .post(format!("{}/kcis", shared.next_base_url()))
        .basic_auth(
            &shared.options.gateway_user,
            Some(&shared.options.gateway_password),
        )
        .header("X-Request-ID", uuid::Uuid::new_v4().to_string())
        .header("X-Conversation-ID", conversation_id)
        .json(body)
        .send()
        .await;
    tally.posted += 1;
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs)
                .unwrap_or(Duration::from_secs(1));
            let _ = response.bytes().await;
            let now = Instant::now();
            let _ = histogram.record((now - started).as_micros().max(1) as u64);
            tally.answers.push(Answer {
                at: now,
                status: Some(status),
                latency: now - started,
            });
            if status == 204 {
                tally.accepted.push(Accepted {
                    kci_id: body["id"].as_str().unwrap_or_default().to_owned(),
                    at: now,
                });
                None
            } else {
                *tally.other_statuses.entry(status).or_default() += 1;
                (status == 503).then_some(retry_after)
            }
        }
        Err(_) => {
            let now = Instant::now();
            tally.answers.push(Answer {
                at: now,
                status: None,
                latency: now - started,
            });
            tally.transport_errors += 1;
            Some(Duration::from_secs(1))
        }
    }
}
