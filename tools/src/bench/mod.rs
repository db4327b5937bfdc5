//! The benchmark (`kci-tools bench`): starts the `kci-receiver` binary against a fresh
//! PostgreSQL database and RabbitMQ (then SQLite), drives it with the gateway simulator,
//! consumes everything it publishes, and prints the figures: throughput at saturation and at half
//! of it, POST latency (HDR histogram), publish lag from 204 to consumer, backlog drain after a
//! broker outage, peak memory, the loss and order check, the durable-commit ceiling of the
//! same database measured with plain SQL at the same concurrency (and, as the half-load tail's
//! floor, the same plain SQL offered at the half phase's rate), and the broker's own
//! confirmed-publish rate for messages of the relay's size, in the relay's rounds.

pub mod broker_ceiling;
pub mod ceiling;
pub mod cpu;
mod histograms;
pub mod reads;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sea_orm::{ConnectionTrait, Database};

use self::histograms::{Series, Snapshot};
use crate::cli::BenchArgs;
use crate::delivery::{self, Arrival, Consumer};
use crate::service::{
    ADMIN_PASSWORD, GATEWAY_PASSWORD, Service, host_port, machine, with_authority,
};
use crate::simulator::{self, Accepted, Report};
use crate::tcp_proxy::TcpProxy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Postgres,
    Sqlite,
}

#[derive(Default)]
struct Figures {
    saturation: Option<Report>,
    half: Option<Report>,
    /// The rate offered in the half phase, KCIs per second (0 when the load did not run).
    half_rate: f64,
    /// Other fixed rates: percent of saturation, and the run.
    fixed: Vec<(u32, Report)>,
    lag: Option<Histogram<u64>>,
    drain_events: usize,
    /// From the broker's return to the first message, then from the first to the last.
    reconnect_seconds: f64,
    drain_seconds: f64,
    /// A plain lapin publisher's confirmed publishes per second, same size and window, and the
    /// size used (the average outbox payload of the run).
    broker_rate: f64,
    message_bytes: usize,
    /// The same broker's rate for the backlog's own shape: one chain per entity, each message
    /// once the one before it is confirmed (what per-entity order allows at best); the backlog's
    /// entities, and its longest chain.
    chained_broker_rate: f64,
    backlog_entities: usize,
    longest_chain: usize,
    /// Milliseconds of CPU per event of each part during the drain (the broker's return to the
    /// last arrival), and per message while the plain publisher measured `broker_rate` (the
    /// load generator's share is then the plain publisher and the consumer): what a drain at the
    /// broker's rate would have to fit in, on cores that the broker and the consumer share.
    drain_cpu: Vec<(&'static str, f64)>,
    broker_cpu: Vec<(&'static str, f64)>,
    /// Intake's stages during the half-rate phase (from `/metrics`, before and after it).
    half_stages: Vec<Series>,
    /// `POST /kcis` answered 204 at half of saturation, as the service measured it.
    half_served: Option<Series>,
    /// The tail's floor: the same-rows ceiling's transactions offered at the half phase's rate
    /// (latency in microseconds, and how many failed).
    half_floor: Option<(Histogram<u64>, u64)>,
    /// Write transactions by writer and phase (wait, held) during saturation, and its seconds.
    saturation_writes: Vec<Series>,
    saturation_seconds: f64,
    peak_rss_kib: u64,
    /// Milliseconds of CPU per KCI at saturation, by part of the system.
    cpu_per_kci: Vec<(&'static str, f64)>,
    accepted_distinct: usize,
    arrived_distinct: usize,
    duplicates: usize,
    order_violations: usize,
    /// Plain SQL into kci-receiver's own tables; into minimal tables.
    ceiling: f64,
    minimal_ceiling: f64,
}

/// The figures of one store, as printed.
pub struct StoreFigures {
    pub store: &'static str,
    pub accepted: usize,
    pub missing: usize,
    pub order_violations: usize,
    /// Transactions the tail's floor measured and committed (0 when it did not run).
    pub floor_transactions: u64,
}

/// Runs the benchmark, prints its figures and returns the loss check of each store.
pub async fn run(args: BenchArgs) -> anyhow::Result<Vec<StoreFigures>> {
    println!("# kci-receiver benchmark");
    let binary = crate::service::binary(args.service_binary.as_deref())?;
    println!("{}", machine());
    let mut stores = Vec::new();
    if !args.sqlite_only {
        stores.push(Store::Postgres);
    }
    if !args.postgres_only {
        stores.push(Store::Sqlite);
    }
    let mut results = Vec::new();
    for store in stores {
        println!(
            "\n## {store:?}: running (about {} s)",
            args.seconds * (7 + 2 * args.fixed_rates.len() as u64) / 2 + 30
        );
        let figures = run_store(store, &args, &binary).await?;
        print_figures(store, &args, &figures);
        results.push(StoreFigures {
            store: match store {
                Store::Postgres => "PostgreSQL",
                Store::Sqlite => "SQLite",
            },
            accepted: figures.accepted_distinct,
            missing: figures.accepted_distinct - figures.arrived_distinct,
            order_violations: figures.order_violations,
            floor_transactions: figures
                .half_floor
                .as_ref()
                .map_or(0, |(latency, _)| latency.len()),
        });
    }
    Ok(results)
}

/// The load: over every instance in turn (`base_urls[0]` first).
fn options(
    base_urls: &[String],
    concurrency: usize,
    seed: u64,
    first_gateway_id: u64,
) -> simulator::Options {
    simulator::Options {
        base_url: base_urls[0].clone(),
        other_base_urls: base_urls[1..].to_vec(),
        gateway_password: GATEWAY_PASSWORD.to_owned(),
        admin: Some(("ops-admin".to_owned(), ADMIN_PASSWORD.to_owned())),
        // Far more lifecycles than a phase gets through: the duration ends it.
        orders: 300_000,
        ethernet_orders: 20_000,
        unsolicited_ceases: 20_000,
        tests: 150_000,
        problems: 100_000,
        concurrency,
        seed,
        first_gateway_id,
        ..simulator::Options::default()
    }
}

async fn run_store(store: Store, args: &BenchArgs, binary: &Path) -> anyhow::Result<Figures> {
    let name = format!("kci_bench_{}", uuid::Uuid::new_v4().simple());
    let (database_url, sqlite_path) = match store {
        Store::Postgres => {
            let admin = Database::connect(&args.postgres_url).await?;
            admin
                .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                .await?;
            admin.close().await?;
            let authority = host_port(&args.postgres_url, 5432)?.to_string();
            (
                with_authority(&args.postgres_url, &authority, Some(&name)),
                None,
            )
        }
        Store::Sqlite => {
            let path = std::env::temp_dir().join(format!("{name}.db"));
            (format!("sqlite://{}?mode=rwc", path.display()), Some(path))
        }
    };
    let result = measure(args, binary, &database_url).await;
    // Clean up, whatever happened.
    match store {
        Store::Postgres => {
            if let Ok(admin) = Database::connect(&args.postgres_url).await {
                let _ = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            }
        }
        Store::Sqlite => {
            if let Some(path) = sqlite_path {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
        }
    }
    result
}

async fn measure(args: &BenchArgs, binary: &Path, database_url: &str) -> anyhow::Result<Figures> {
    let mut figures = Figures::default();
    let phase = Duration::from_secs(args.seconds);

    // The ceilings first, in the same database: kci-receiver's tables (emptied afterwards),
    // then minimal tables of their own.
    if !args.drain_only {
        figures.ceiling = ceiling::durable_commits_per_second(
            database_url,
            ceiling::Rows::Schema,
            args.concurrency,
            phase / 2,
        )
        .await?;
        figures.minimal_ceiling = ceiling::durable_commits_per_second(
            database_url,
            ceiling::Rows::Minimal,
            args.concurrency,
            phase / 2,
        )
        .await?;
    }

    let prefix = format!("kci-bench-{}", uuid::Uuid::new_v4().simple());
    let amqp = delivery::amqp_settings(&args.amqp_url, &prefix);
    let consumer = Consumer::start(&args.amqp_url, &amqp).await?;
    let broker = host_port(&args.amqp_url, 5672)?;
    let proxy = TcpProxy::start(broker).await;
    let service_amqp = with_authority(&args.amqp_url, &format!("127.0.0.1:{}", proxy.port), None);
    // `--database-delay-ms`: the service's PostgreSQL as if on another host.
    let distant_database = if args.database_delay_ms > 0 && database_url.starts_with("postgres") {
        let delay = Duration::from_millis(args.database_delay_ms);
        println!(
            "kci-receiver reaches PostgreSQL through a proxy that delays each way by {} ms",
            args.database_delay_ms
        );
        Some(TcpProxy::start_with_delay(host_port(database_url, 5432)?, delay).await)
    } else {
        None
    };
    let service_database_url = match &distant_database {
        Some(distant) => with_authority(database_url, &format!("127.0.0.1:{}", distant.port), None),
        None => database_url.to_owned(),
    };
    let service = Service::start(
        binary,
        &prefix,
        &[
            ("KCI__DATABASE__URL", service_database_url.clone()),
            ("KCI__DATABASE__MAX_CONNECTIONS", "32".to_owned()),
            ("KCI__AMQP__URL", service_amqp),
            ("KCI__AMQP__EXCHANGE", amqp.exchange.clone()),
            (
                "KCI__AMQP__ALTERNATE_EXCHANGE",
                amqp.alternate_exchange.clone(),
            ),
            ("KCI__AMQP__UNROUTED_QUEUE", amqp.unrouted_queue.clone()),
            ("KCI__RELAY__RECONNECT_MAX_MS", "1000".to_owned()),
        ],
    )?;
    service.wait_ready(Some(true)).await?;
    // More instances on the same PostgreSQL database (`--instances`), without relays of their
    // own: the first instance's relay publishes for all, woken by their NOTIFYs.
    let mut base_urls = vec![service.base_url.clone()];
    let mut others = Vec::new();
    if database_url.starts_with("postgres") {
        for n in 1..args.instances.max(1) {
            let other = Service::start(
                binary,
                &format!("{prefix}-{n}"),
                &[
                    ("KCI__DATABASE__URL", service_database_url.clone()),
                    ("KCI__DATABASE__MAX_CONNECTIONS", "32".to_owned()),
                    ("KCI__RELAY__ENABLED", "false".to_owned()),
                    ("KCI__RELAY__NOTIFY_OTHER_PROCESSES", "true".to_owned()),
                ],
            )?;
            other.wait_ready(None).await?;
            base_urls.push(other.base_url.clone());
            others.push(other);
        }
        if !others.is_empty() {
            println!(
                "{} instances of kci-receiver on the database, the load over all of them, one relay",
                base_urls.len()
            );
        }
    }

    let mut drain_cpu = Vec::new();
    let outcome = async {
        let mut accepted: HashMap<String, Instant> = HashMap::new();
        let load = if args.drain_only {
            None
        } else {
            Some(
                load_phases(
                    args,
                    &service,
                    &others,
                    &base_urls,
                    &consumer,
                    &mut accepted,
                )
                .await?,
            )
        };

        // Backlog drain: the broker goes away, KCIs keep coming, the broker comes back.
        let before_backlog = last_outbox_id(database_url).await?;
        proxy.cut();
        service.wait_ready(Some(false)).await?;
        let backlog_entities = (args.backlog / 4).max(1);
        let mut backlog_options = options(&base_urls, args.concurrency, 13, 30_000_000);
        backlog_options.orders = backlog_entities / 2;
        backlog_options.ethernet_orders = 0;
        backlog_options.unsolicited_ceases = 0;
        backlog_options.tests = backlog_entities / 4;
        backlog_options.problems = backlog_entities / 4;
        let backlog = simulator::run(backlog_options).await?;
        for a in &backlog.accepted {
            accepted.entry(a.kci_id.clone()).or_insert(a.at);
        }
        let before = consumer.distinct();
        let drain_pids: Vec<u32> = service.pid().into_iter().collect();
        let cpu_before_drain = cpu::sample(&drain_pids);
        let restored = Instant::now();
        proxy.restore();
        let drained = consumer.wait_for(&accepted, Duration::from_secs(300)).await;
        let cpu_after_drain = cpu::sample(&drain_pids);
        // The relay may be in its reconnect backoff when the broker returns: the wait for the
        // first message is reported apart from the drain itself.
        let (first, last) = consumer.with_arrivals(|a| {
            let after = a.iter().map(|x| x.at).filter(|at| *at >= restored);
            (after.clone().min(), after.max())
        });
        let (first, last) = (first.unwrap_or(restored), last.unwrap_or(restored));
        let drain_events = consumer.distinct().saturating_sub(before);
        drain_cpu = cpu::per_kci(&cpu_before_drain, &cpu_after_drain, drain_events);
        let backlog_chains = chain_lengths(database_url, before_backlog).await?;
        if !drained {
            eprintln!(
                "warning: not every accepted KCI arrived within 300 s of the broker's return"
            );
        }
        Ok::<_, anyhow::Error>((
            load,
            (drain_events, backlog_chains),
            (
                (first - restored).as_secs_f64(),
                (last - first).as_secs_f64(),
            ),
            accepted,
        ))
    }
    .await;
    // The broker's own confirmed-publish rate, for messages of the size the relay published in
    // this run, in rounds of the relay's window: what the drain is compared with.
    let average = bigints(
        database_url,
        "SELECT CAST(COALESCE(AVG(LENGTH(payload)), 0) AS BIGINT) AS n FROM outbox_event",
    )
    .await?
    .first()
    .copied();
    figures.message_bytes = average.unwrap_or(1500).max(64) as usize;
    if let Ok((_, (_, chains), ..)) = &outcome {
        let pids: Vec<u32> = service.pid().into_iter().collect();
        let cpu_before = cpu::sample(&pids);
        let messages = args.backlog.max(5000) as usize;
        figures.broker_rate = broker_ceiling::confirmed_publishes_per_second(
            &args.amqp_url,
            &format!("{prefix}.ceiling"),
            figures.message_bytes,
            broker_ceiling::Shape::Rounds {
                window: 1000,
                messages,
            },
        )
        .await?;
        figures.broker_cpu = cpu::per_kci(&cpu_before, &cpu::sample(&pids), messages);
        figures.drain_cpu = std::mem::take(&mut drain_cpu);
        figures.chained_broker_rate = broker_ceiling::confirmed_publishes_per_second(
            &args.amqp_url,
            &format!("{prefix}.chains"),
            figures.message_bytes,
            broker_ceiling::Shape::Chains(chains.clone()),
        )
        .await?;
        figures.backlog_entities = chains.len();
        figures.longest_chain = chains.iter().copied().max().unwrap_or(0);
    }
    figures.peak_rss_kib = service.peak_rss_kib();
    // Give the relay a moment, then stop the service gracefully.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(move || service.stop()).await?;
    let (load, (drain_events, _), (reconnect_seconds, drain_seconds), accepted) = outcome?;

    // Loss, duplicates, order.
    let check = consumer.with_arrivals(|arrivals| delivery::check(arrivals, &accepted));
    figures.accepted_distinct = check.acknowledged;
    figures.arrived_distinct = check.arrived;
    figures.duplicates = check.duplicates;
    figures.order_violations = check.order_violations;
    if let Some(load) = load {
        figures.half_rate = load.half_rate;
        figures.half_stages = load.half_stages;
        figures.half_served = load.half_served;
        figures.saturation_writes = load.saturation_writes;
        figures.saturation_seconds = load.saturation.elapsed.as_secs_f64();
        figures.cpu_per_kci = load.cpu_per_kci;
        figures.saturation = Some(load.saturation);
        figures.half = Some(load.half);
        figures.fixed = load.fixed;
        figures.lag = Some(load.lag);
    }
    // The tail's floor, last: it writes into the service's tables (now stopped), as full as the
    // run left them, and empties them.
    if let Some(half) = &figures.half
        && figures.half_rate > 0.0
        && !half.latency.is_empty()
    {
        figures.half_floor = Some(
            ceiling::latency_at_rate(
                database_url,
                ceiling::Rows::Schema,
                args.concurrency,
                figures.half_rate,
                phase,
            )
            .await?,
        );
    }
    figures.drain_events = drain_events;
    figures.drain_seconds = drain_seconds;
    figures.reconnect_seconds = reconnect_seconds;
    consumer.close().await;
    Ok(figures)
}

/// The measured load phases: saturation, half of it, the other fixed rates.
struct LoadFigures {
    saturation: Report,
    cpu_per_kci: Vec<(&'static str, f64)>,
    half: Report,
    half_stages: Vec<Series>,
    /// `POST /kcis` answered 204 at half of saturation, as the service measured it.
    half_served: Option<Series>,
    /// The rate offered in the half phase, KCIs per second.
    half_rate: f64,
    saturation_writes: Vec<Series>,
    fixed: Vec<(u32, Report)>,
    lag: Histogram<u64>,
}

/// Saturation (with CPU per KCI), half of it (with intake's stages), the other fixed rates, then
/// waits for their KCIs to arrive; adds what was accepted to `accepted`.
async fn load_phases(
    args: &BenchArgs,
    service: &Service,
    others: &[Service],
    base_urls: &[String],
    consumer: &Consumer,
    accepted: &mut HashMap<String, Instant>,
) -> anyhow::Result<LoadFigures> {
    let phase = Duration::from_secs(args.seconds);
    let service_pids: Vec<u32> = std::iter::once(service)
        .chain(others)
        .filter_map(Service::pid)
        .collect();
    let cpu_before = cpu::sample(&service_pids);
    let writes_before = write_snapshot(&service.base_url).await;
    let saturation =
        simulator::run(options(base_urls, args.concurrency, 11, 10_000_000).duration(phase))
            .await?;
    let saturation_writes =
        histograms::between(&writes_before, &write_snapshot(&service.base_url).await);
    let cpu_per_kci = cpu::per_kci(
        &cpu_before,
        &cpu::sample(&service_pids),
        saturation.accepted.len(),
    );
    // Half of it, at a fixed rate.
    let rate = (saturation.throughput() / 2.0).max(1.0);
    let mut half_options = options(base_urls, args.concurrency, 12, 20_000_000).duration(phase);
    half_options.rate = Some(rate);
    let before_half = stage_snapshot(&service.base_url).await;
    let served_before_half = served_snapshot(&service.base_url).await;
    let half = simulator::run(half_options).await?;
    let half_stages = stage_figures(&before_half, &stage_snapshot(&service.base_url).await);
    let half_served = histograms::between(
        &served_before_half,
        &served_snapshot(&service.base_url).await,
    )
    .into_iter()
    .find(|series| series.key == "/kcis/POST/204");
    // Other fixed rates, for the shape of latency against load.
    let mut fixed = Vec::new();
    for (n, percent) in args.fixed_rates.iter().enumerate() {
        let mut rate_options = options(
            base_urls,
            args.concurrency,
            14 + n as u64,
            40_000_000 + 10_000_000 * n as u64,
        )
        .duration(phase);
        rate_options.rate = Some((saturation.throughput() * f64::from(*percent) / 100.0).max(1.0));
        fixed.push((*percent, simulator::run(rate_options).await?));
    }

    for a in saturation
        .accepted
        .iter()
        .chain(half.accepted.iter())
        .chain(fixed.iter().flat_map(|(_, report)| report.accepted.iter()))
    {
        accepted.entry(a.kci_id.clone()).or_insert(a.at);
    }
    consumer.wait_for(accepted, Duration::from_secs(120)).await;
    let lag = consumer.with_arrivals(|arrivals| publish_lag(arrivals, &half.accepted))?;
    Ok(LoadFigures {
        saturation,
        cpu_per_kci,
        half,
        half_stages,
        half_served,
        half_rate: rate,
        saturation_writes,
        fixed,
        lag,
    })
}

/// The newest outbox event's id (0 when there is none).
async fn last_outbox_id(database_url: &str) -> anyhow::Result<i64> {
    let last = bigints(
        database_url,
        "SELECT CAST(COALESCE(MAX(id), 0) AS BIGINT) AS n FROM outbox_event",
    )
    .await?;
    Ok(last.first().copied().unwrap_or(0))
}

/// How many outbox events each entity has after `after_id`: the backlog's per-entity chains.
async fn chain_lengths(database_url: &str, after_id: i64) -> anyhow::Result<Vec<usize>> {
    let counts = bigints(
        database_url,
        &format!(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM outbox_event WHERE id > {after_id} GROUP BY tracked_entity_id"
        ),
    )
    .await?;
    Ok(counts.into_iter().map(|n| n as usize).collect())
}

/// The `n` column of every row `sql` returns, on a connection of its own.
async fn bigints(database_url: &str, sql: &str) -> anyhow::Result<Vec<i64>> {
    let database = Database::connect(database_url).await?;
    let rows = database
        .query_all_raw(sea_orm::Statement::from_string(
            database.get_database_backend(),
            sql,
        ))
        .await?;
    database.close().await?;
    Ok(rows
        .iter()
        .filter_map(|row| row.try_get::<i64>("", "n").ok())
        .collect())
}

/// Intake's stages over a phase, in the order a KCI meets them.
fn stage_figures(before: &Snapshot, after: &Snapshot) -> Vec<Series> {
    let mut series = histograms::between(before, after);
    let order = ["queue_wait", "begin", "load", "write", "commit"];
    series.sort_by_key(|s| order.iter().position(|stage| *stage == s.key));
    series
}

const STAGES: &str = "kci_receiver_intake_stage_duration_seconds";
const WRITES: &str = "kci_receiver_write_transaction_seconds";

async fn stage_snapshot(base_url: &str) -> Snapshot {
    histograms::snapshot(base_url, STAGES, &["stage"]).await
}

/// The service's own latency histogram of its answers, by route, method and status.
async fn served_snapshot(base_url: &str) -> Snapshot {
    histograms::snapshot(
        base_url,
        "kci_receiver_http_request_duration_seconds",
        &["route", "method", "status"],
    )
    .await
}

async fn write_snapshot(base_url: &str) -> Snapshot {
    histograms::snapshot(base_url, WRITES, &["writer", "phase"]).await
}

/// Who held write transactions during a phase of `seconds`, most held first. Held seconds per
/// second is how many were open on average: on SQLite, whose turn its one writer was.
fn writers_line(writes: &[Series], seconds: f64) -> Option<String> {
    let mut held: Vec<&Series> = writes.iter().filter(|s| s.key.ends_with("/held")).collect();
    if held.is_empty() || seconds <= 0.0 {
        return None;
    }
    held.sort_by(|a, b| b.sum.total_cmp(&a.sum));
    let parts: Vec<String> = held
        .iter()
        .map(|h| {
            let writer = h.key.trim_end_matches("/held");
            let wait = writes
                .iter()
                .find(|w| w.key == format!("{writer}/wait"))
                .map_or(0.0, Series::mean);
            format!(
                "{writer} {:.2} open on average, {:.0} tx, {:.1} ms (p99 <= {}), wait {:.1} ms",
                h.sum / seconds,
                h.count,
                h.mean() * 1e3,
                h.p99_bound
                    .map_or("-".to_owned(), |b| format!("{:.1} ms", b * 1e3)),
                wait * 1e3
            )
        })
        .collect();
    Some(parts.join("; "))
}

/// What the machine's cores allow at this CPU per KCI (`all_ms`, every part of the system on
/// this machine): a rate no build reaches without spending less CPU per KCI, however it batches
/// or waits. It says whether a throughput target is within reach of tuning at all, and the CPU
/// per KCI that would make the minimal-table ceiling's rate possible.
fn print_cpu_bound(all_ms: f64, throughput: f64, minimal_ceiling: f64) {
    if all_ms <= 0.0 {
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let bound = cores * 1000.0 / all_ms;
    let minimal = if minimal_ceiling > 0.0 {
        format!(
            "; the minimal-table ceiling's rate ({minimal_ceiling:.0}/s) would need <= {:.3} ms of CPU per KCI in all",
            cores * 1000.0 / minimal_ceiling
        )
    } else {
        String::new()
    };
    println!(
        "| what the cores allow ({cores:.0} cores / CPU per KCI in all) | {bound:.0} KCIs/s; saturation used {:.0}% of it{minimal} |",
        100.0 * throughput / bound,
    );
}

/// CPU per event in the drain beside CPU per message while the plain publisher measured the
/// broker's own rate. The broker and the consumer run on the same cores as the relay and its
/// database: a drain at 0.9x of the broker's rate needs everything spent per event, by every
/// part, within 1/0.9 of what the plain publisher's run spent per message.
fn print_drain_cpu(figures: &Figures) {
    if figures.drain_cpu.is_empty() || figures.broker_cpu.is_empty() {
        return;
    }
    let line = |cpu: &[(&str, f64)]| -> (String, f64) {
        let parts: Vec<String> = cpu
            .iter()
            .map(|(part, ms)| format!("{part} {:.0} us", ms * 1000.0))
            .collect();
        (
            parts.join(", "),
            cpu.iter().map(|(_, ms)| ms * 1000.0).sum(),
        )
    };
    let (drain, drain_all) = line(&figures.drain_cpu);
    let (broker, broker_all) = line(&figures.broker_cpu);
    println!(
        "| CPU per event in the drain (user + system, /proc; from the broker's return to the last arrival) | {drain}; {drain_all:.0} us in all |"
    );
    println!(
        "| CPU per message at the broker's own rate in rounds (the load generator's share: the plain publisher and the consumer) | {broker}; {broker_all:.0} us in all; a drain at 0.9x of that rate on these cores needs <= {:.0} us per event in all |",
        broker_all / 0.9
    );
}

/// From 204 to the consumer, for the KCIs of the fixed-rate phase (microseconds).
fn publish_lag(arrivals: &[Arrival], accepted: &[Accepted]) -> anyhow::Result<Histogram<u64>> {
    let mut first: HashMap<&str, Instant> = HashMap::new();
    for arrival in arrivals.iter() {
        first.entry(arrival.kci_id.as_str()).or_insert(arrival.at);
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut seen = std::collections::HashSet::new();
    for accepted in accepted {
        if !seen.insert(accepted.kci_id.as_str()) {
            continue;
        }
        if let Some(arrived) = first.get(accepted.kci_id.as_str()) {
            let lag = arrived.saturating_duration_since(accepted.at);
            histogram.record(lag.as_micros().max(1) as u64)?;
        }
    }
    Ok(histogram)
}

fn print_figures(store: Store, args: &BenchArgs, figures: &Figures) {
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!("\n| {store:?} | figure |");
    println!("|---|---|");
    if let Some(saturation) = &figures.saturation {
        let h = &saturation.latency;
        println!(
            "| throughput at saturation ({} connections) | {:.0} KCIs/s ({} accepted in {:.1} s; other answers {:?}) |",
            args.concurrency,
            saturation.throughput(),
            saturation.accepted.len(),
            saturation.elapsed.as_secs_f64(),
            saturation.other_statuses
        );
        println!(
            "| POST latency at saturation | p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
            ms(h, 0.5),
            ms(h, 0.95),
            ms(h, 0.99),
            h.max() as f64 / 1000.0
        );
        if !figures.cpu_per_kci.is_empty() {
            let parts: Vec<String> = figures
                .cpu_per_kci
                .iter()
                .map(|(part, ms)| format!("{part} {ms:.3} ms"))
                .collect();
            let all: f64 = figures.cpu_per_kci.iter().map(|(_, ms)| ms).sum();
            println!(
                "| CPU per KCI at saturation (user + system, /proc; compare builds by it) | {}; {all:.3} ms in all |",
                parts.join(", ")
            );
            print_cpu_bound(all, saturation.throughput(), figures.minimal_ceiling);
        }
        println!(
            "| durable-commit ceiling (plain SQL, same rows into the same tables, same concurrency) | {:.0} tx/s; kci-receiver = {:.2}x |",
            figures.ceiling,
            saturation.throughput() / figures.ceiling.max(1e-9)
        );
        println!(
            "| for scale: plain SQL into minimal tables (primary key and one unique key each) | {:.0} tx/s; kci-receiver = {:.2}x |",
            figures.minimal_ceiling,
            saturation.throughput() / figures.minimal_ceiling.max(1e-9)
        );
    }
    if let Some(half) = &figures.half {
        let h = &half.latency;
        println!(
            "| fixed rate (half of saturation) | {:.0} KCIs/s offered, {:.0} accepted/s |",
            half.accepted.len() as f64 / half.elapsed.as_secs_f64().max(1e-9),
            half.throughput()
        );
        println!(
            "| POST latency at half of saturation | p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
            ms(h, 0.5),
            ms(h, 0.95),
            ms(h, 0.99),
            h.max() as f64 / 1000.0
        );
        if let Some((floor, failed)) = &figures.half_floor {
            println!(
                "| the tail's floor: plain SQL, the same rows at the same rate, open loop, {} connections (due to commit) | p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} failed |",
                args.concurrency,
                ms(floor, 0.5),
                ms(floor, 0.95),
                ms(floor, 0.99),
                floor.max() as f64 / 1000.0,
                failed
            );
        }
        if let Some(served) = &figures.half_served {
            // What the load generator sees beyond this is the network and the wait for a core.
            println!(
                "| the same, as kci-receiver measured it (request to 204, kci_receiver_http_request_duration_seconds) | mean {:.1} ms, p99 <= {} |",
                served.mean() * 1e3,
                served
                    .p99_bound
                    .map_or("-".to_owned(), |b| format!("{:.1} ms", b * 1e3))
            );
        }
        if !figures.half_stages.is_empty() {
            let stages: Vec<String> = figures
                .half_stages
                .iter()
                .map(|s| {
                    format!(
                        "{} {:.1} ms (p99 <= {})",
                        s.key,
                        s.mean() * 1e3,
                        s.p99_bound
                            .map_or("-".to_owned(), |b| format!("{:.1} ms", b * 1e3))
                    )
                })
                .collect();
            println!(
                "| intake's stages at half of saturation, mean per KCI wait or per batch ({STAGES}) | {} |",
                stages.join("; ")
            );
        }
        if let Some(line) = writers_line(&figures.saturation_writes, figures.saturation_seconds) {
            println!(
                "| write transactions at saturation by writer: how many were open on average (on SQLite, the share of its one writer), how many, mean and p99 held, mean wait to begin ({WRITES}) | {line} |"
            );
        }
    }
    for (percent, report) in &figures.fixed {
        let h = &report.latency;
        let offered = figures
            .saturation
            .as_ref()
            .map_or(0.0, |s| s.throughput() * f64::from(*percent) / 100.0);
        println!(
            "| fixed rate {percent}% of saturation | {offered:.0} KCIs/s offered, {:.0} accepted/s; POST latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms |",
            report.throughput(),
            ms(h, 0.5),
            ms(h, 0.95),
            ms(h, 0.99),
            h.max() as f64 / 1000.0
        );
    }
    if let Some(lag) = &figures.lag {
        println!(
            "| publish lag, 204 to consumer (half of saturation) | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} messages) |",
            ms(lag, 0.5),
            ms(lag, 0.99),
            lag.max() as f64 / 1000.0,
            lag.len()
        );
    }
    println!(
        "| backlog drain after a broker outage | {} events in {:.2} s = {:.0} events/s (first message {:.2} s after the broker returned: relay reconnect backoff) |",
        figures.drain_events,
        figures.drain_seconds,
        figures.drain_events as f64 / figures.drain_seconds.max(1e-9),
        figures.reconnect_seconds
    );
    let drain_rate = figures.drain_events as f64 / figures.drain_seconds.max(1e-9);
    println!(
        "| the broker's own confirmed-publish rate (plain lapin, {} B messages, rounds of 1000, same run) | {:.0} messages/s; backlog drain = {:.2}x |",
        figures.message_bytes,
        figures.broker_rate,
        drain_rate / figures.broker_rate.max(1e-9)
    );
    println!(
        "| the broker's own rate in the backlog's per-entity chains ({} entities, the longest {} messages; each sent once the one before is confirmed) | {:.0} messages/s; backlog drain = {:.2}x |",
        figures.backlog_entities,
        figures.longest_chain,
        figures.chained_broker_rate,
        drain_rate / figures.chained_broker_rate.max(1e-9)
    );
    print_drain_cpu(figures);
    println!(
        "| peak RSS of kci-receiver | {:.1} MB |",
        figures.peak_rss_kib as f64 / 1024.0
    );
    println!(
        "| loss check | {} of {} acknowledged KCIs arrived ({} missing), {} duplicates, {} per-entity order violations |",
        figures.arrived_distinct,
        figures.accepted_distinct,
        figures.accepted_distinct - figures.arrived_distinct,
        figures.duplicates,
        figures.order_violations
    );
}

impl simulator::Options {
    /// The same options, stopping after `duration`.
    pub fn duration(mut self, duration: Duration) -> Self {
        self.duration = Some(duration);
        self
    }
}
