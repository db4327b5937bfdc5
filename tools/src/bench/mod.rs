//! The benchmark (`kci-tools bench`): starts the `kci-receiver` binary against a fresh
//! PostgreSQL database and RabbitMQ (then SQLite), drives it with the gateway simulator,
//! consumes everything it publishes, and prints the figures: throughput at saturation and at half
//! of it, POST latency (HDR histogram), publish lag from 204 to consumer, backlog drain after a
//! broker outage, peak memory, the loss and order check, and the durable-commit ceiling of the
//! same database measured with plain SQL at the same concurrency.

pub mod ceiling;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use sea_orm::{ConnectionTrait, Database};
use secrecy::SecretString;

use crate::cli::BenchArgs;
use crate::simulator::{self, Accepted, Report};
use crate::tcp_proxy::TcpProxy;
use kci_receiver::config::AmqpSettings;
use kci_receiver::outbox::topology::Topology;

const GATEWAY_PASSWORD: &str = "bench-gateway";
const ADMIN_PASSWORD: &str = "bench-admin";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Postgres,
    Sqlite,
}

/// A message as the benchmark's consumer received it.
struct Arrival {
    at: Instant,
    kci_id: String,
    entity: String,
}

#[derive(Default)]
struct Figures {
    saturation: Option<Report>,
    half: Option<Report>,
    /// Other fixed rates: percent of saturation, and the run.
    fixed: Vec<(u32, Report)>,
    lag: Option<Histogram<u64>>,
    drain_events: usize,
    /// From the broker's return to the first message, then from the first to the last.
    reconnect_seconds: f64,
    drain_seconds: f64,
    peak_rss_kib: u64,
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
}

/// Runs the benchmark, prints its figures and returns the loss check of each store.
pub async fn run(args: BenchArgs) -> anyhow::Result<Vec<StoreFigures>> {
    println!("# kci-receiver benchmark");
    let binary = service_binary(&args)?;
    println!("{}", machine());
    let mut stores = vec![Store::Postgres];
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
        });
    }
    Ok(results)
}

/// The kci-receiver binary under test: `--service-binary`, else `kci-receiver` beside this
/// program.
pub fn service_binary(args: &BenchArgs) -> anyhow::Result<PathBuf> {
    let binary = match &args.service_binary {
        Some(binary) => binary.clone(),
        None => std::env::current_exe()?
            .with_file_name(format!("kci-receiver{}", std::env::consts::EXE_SUFFIX)),
    };
    if !binary.is_file() {
        anyhow::bail!(
            "the kci-receiver binary is not at {}: build it first (cargo build --release --workspace) or pass --service-binary",
            binary.display()
        );
    }
    Ok(binary)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024
                    / 1024
            })
        })
        .unwrap_or(0);
    format!("machine: {cores} cores ({cpu}), {memory} GiB memory")
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Host and port of an amqp:// or postgres:// URL.
fn host_port(url: &str, default_port: u16) -> anyhow::Result<std::net::SocketAddr> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority
        .rsplit_once('@')
        .map(|(_, h)| h)
        .unwrap_or(authority);
    let host = host.replace("localhost", "127.0.0.1");
    let host = if host.contains(':') {
        host
    } else {
        format!("{host}:{default_port}")
    };
    Ok(host.parse()?)
}

fn with_authority(url: &str, authority: &str, database: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (old_authority, tail) = rest.split_once('/').unwrap_or((rest, ""));
    let userinfo = old_authority
        .rsplit_once('@')
        .map(|(u, _)| format!("{u}@"))
        .unwrap_or_default();
    let tail = match database {
        Some(database) => match tail.split_once('?') {
            Some((_, query)) => format!("{database}?{query}"),
            None => database.to_owned(),
        },
        None => tail.to_owned(),
    };
    format!("{scheme}://{userinfo}{authority}/{tail}")
}

/// The kci-receiver under test, as its own process (so that its memory is its own).
struct Service {
    child: Child,
    base_url: String,
}

impl Service {
    fn start(
        binary: &Path,
        database_url: &str,
        amqp: &AmqpSettings,
        amqp_url: &str,
    ) -> anyhow::Result<Service> {
        let port = free_port()?;
        // Its logs (the broker outage is noisy on purpose) go to a file, not into the figures.
        let log = std::env::temp_dir().join(format!("{}.log", amqp.exchange));
        println!("kci-receiver under test logs to {}", log.display());
        let child = Command::new(binary)
            .arg("serve")
            .env("KCI_ENVIRONMENT", "bench-no-such-file")
            .env("KCI__SERVER__PORT", port.to_string())
            .env("KCI__DATABASE__URL", database_url)
            .env("KCI__DATABASE__MAX_CONNECTIONS", "32")
            .env("KCI__GATEWAY_AUTH__BASIC_PASSWORD", GATEWAY_PASSWORD)
            .env("KCI__OPERATIONS_AUTH__ADMIN_PASSWORD", ADMIN_PASSWORD)
            .env("KCI__AMQP__URL", amqp_url)
            .env("KCI__AMQP__EXCHANGE", &amqp.exchange)
            .env("KCI__AMQP__ALTERNATE_EXCHANGE", &amqp.alternate_exchange)
            .env("KCI__AMQP__UNROUTED_QUEUE", &amqp.unrouted_queue)
            .env("KCI__RELAY__RECONNECT_MAX_MS", "1000")
            .env("KCI__LOG__FILTER", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .spawn()?;
        Ok(Service {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
        })
    }

    async fn wait_ready(&self, broker_up: bool) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Ok(response) = client.get(format!("{}/readyz", self.base_url)).send().await
                && let Ok(body) = response.json::<serde_json::Value>().await
                && body["status"] == "ready"
                && (body["broker"]["status"] == "up") == broker_up
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("kci-receiver did not become ready (broker up: {broker_up})")
    }

    /// Peak resident memory so far (VmHWM), KiB.
    fn peak_rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
            })
            .unwrap_or(0)
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Everything the benchmark's queue receives.
async fn consume(
    amqp_url: &str,
    amqp: &AmqpSettings,
) -> anyhow::Result<(Connection, Arc<Mutex<Vec<Arrival>>>)> {
    let connection = Connection::connect(amqp_url, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    Topology::from_settings(amqp).declare(&channel).await?;
    channel.basic_qos(1000, BasicQosOptions::default()).await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            amqp.exchange.as_str().into(),
            "kci.#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "bench".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let sink = arrivals.clone();
    tokio::spawn(async move {
        let _channel = channel;
        while let Some(Ok(delivery)) = consumer.next().await {
            let at = Instant::now();
            let Ok(body) = serde_json::from_slice::<serde_json::Value>(&delivery.data) else {
                continue;
            };
            let arrival = Arrival {
                at,
                kci_id: body["kci"]["id"].as_str().unwrap_or_default().to_owned(),
                entity: format!("{}:{}", body["entity"]["type"], body["entity"]["gatewayId"]),
            };
            if let Ok(mut arrivals) = sink.lock() {
                arrivals.push(arrival);
            }
        }
    });
    Ok((connection, arrivals))
}

fn distinct_arrived(arrivals: &Arc<Mutex<Vec<Arrival>>>) -> usize {
    let arrivals = arrivals.lock().map(|a| {
        a.iter()
            .map(|x| x.kci_id.clone())
            .collect::<std::collections::HashSet<_>>()
            .len()
    });
    arrivals.unwrap_or(0)
}

async fn wait_for_arrivals(
    arrivals: &Arc<Mutex<Vec<Arrival>>>,
    expected: usize,
    timeout: Duration,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if distinct_arrived(arrivals) >= expected {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

fn options(
    base_url: &str,
    concurrency: usize,
    seed: u64,
    first_gateway_id: u64,
) -> simulator::Options {
    simulator::Options {
        base_url: base_url.to_owned(),
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

    let prefix = format!("kci-bench-{}", uuid::Uuid::new_v4().simple());
    let amqp = AmqpSettings {
        url: SecretString::from(args.amqp_url.clone()),
        exchange: prefix.clone(),
        alternate_exchange: format!("{prefix}.unrouted"),
        unrouted_queue: format!("{prefix}.unrouted"),
        queue_type: "classic".to_owned(),
        declare_topology: true,
        connect_timeout_ms: 5000,
    };
    let (consumer, arrivals) = consume(&args.amqp_url, &amqp).await?;
    let broker = host_port(&args.amqp_url, 5672)?;
    let proxy = TcpProxy::start(broker).await;
    let service_amqp = with_authority(&args.amqp_url, &format!("127.0.0.1:{}", proxy.port), None);
    let service = Service::start(binary, database_url, &amqp, &service_amqp)?;
    service.wait_ready(true).await?;

    let outcome = async {
        // Saturation.
        let saturation = simulator::run(
            options(&service.base_url, args.concurrency, 11, 10_000_000).duration(phase),
        )
        .await?;
        // Half of it, at a fixed rate.
        let rate = (saturation.throughput() / 2.0).max(1.0);
        let mut half_options =
            options(&service.base_url, args.concurrency, 12, 20_000_000).duration(phase);
        half_options.rate = Some(rate);
        let half = simulator::run(half_options).await?;
        // Other fixed rates, for the shape of latency against load.
        let mut fixed = Vec::new();
        for (n, percent) in args.fixed_rates.iter().enumerate() {
            let mut rate_options = options(
                &service.base_url,
                args.concurrency,
                14 + n as u64,
                40_000_000 + 10_000_000 * n as u64,
            )
            .duration(phase);
            rate_options.rate =
                Some((saturation.throughput() * f64::from(*percent) / 100.0).max(1.0));
            fixed.push((*percent, simulator::run(rate_options).await?));
        }

        let mut accepted: HashMap<String, Instant> = HashMap::new();
        for a in saturation
            .accepted
            .iter()
            .chain(half.accepted.iter())
            .chain(fixed.iter().flat_map(|(_, report)| report.accepted.iter()))
        {
            accepted.entry(a.kci_id.clone()).or_insert(a.at);
        }
        wait_for_arrivals(&arrivals, accepted.len(), Duration::from_secs(120)).await;
        let lag = publish_lag(&arrivals, &half.accepted)?;

        // Backlog drain: the broker goes away, KCIs keep coming, the broker comes back.
        proxy.cut();
        service.wait_ready(false).await?;
        let backlog_entities = (args.backlog / 4).max(1);
        let mut backlog_options = options(&service.base_url, args.concurrency, 13, 30_000_000);
        backlog_options.orders = backlog_entities / 2;
        backlog_options.ethernet_orders = 0;
        backlog_options.unsolicited_ceases = 0;
        backlog_options.tests = backlog_entities / 4;
        backlog_options.problems = backlog_entities / 4;
        let backlog = simulator::run(backlog_options).await?;
        for a in &backlog.accepted {
            accepted.entry(a.kci_id.clone()).or_insert(a.at);
        }
        let before = distinct_arrived(&arrivals);
        let restored = Instant::now();
        proxy.restore();
        let drained = wait_for_arrivals(&arrivals, accepted.len(), Duration::from_secs(300)).await;
        // The relay may be in its reconnect backoff when the broker returns: the wait for the
        // first message is reported apart from the drain itself.
        let (first, last) = arrivals
            .lock()
            .map(|a| {
                let after = a.iter().map(|x| x.at).filter(|at| *at >= restored);
                (after.clone().min(), after.max())
            })
            .unwrap_or((None, None));
        let (first, last) = (first.unwrap_or(restored), last.unwrap_or(restored));
        let drain_events = distinct_arrived(&arrivals).saturating_sub(before);
        if !drained {
            eprintln!(
                "warning: not every accepted KCI arrived within 300 s of the broker's return"
            );
        }
        Ok::<_, anyhow::Error>((
            saturation,
            half,
            fixed,
            lag,
            drain_events,
            (
                (first - restored).as_secs_f64(),
                (last - first).as_secs_f64(),
            ),
            accepted,
        ))
    }
    .await;
    figures.peak_rss_kib = service.peak_rss_kib();
    // Give the relay a moment, then stop the service gracefully.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::spawn_blocking(move || service.stop()).await?;
    let (saturation, half, fixed, lag, drain_events, (reconnect_seconds, drain_seconds), accepted) =
        outcome?;

    // Loss, duplicates, order.
    let check = {
        let arrivals = arrivals
            .lock()
            .map_err(|_| anyhow::anyhow!("consumer poisoned"))?;
        check_delivery(&arrivals, &accepted)
    };
    figures.accepted_distinct = accepted.len();
    (
        figures.arrived_distinct,
        figures.duplicates,
        figures.order_violations,
    ) = check;
    figures.saturation = Some(saturation);
    figures.half = Some(half);
    figures.fixed = fixed;
    figures.lag = Some(lag);
    figures.drain_events = drain_events;
    figures.drain_seconds = drain_seconds;
    figures.reconnect_seconds = reconnect_seconds;
    delete_topology(&consumer, &amqp).await;
    Ok(figures)
}

/// How many acknowledged KCIs arrived, how many duplicates came, and how many first arrivals
/// came before a KCI about the same entity that was accepted earlier.
fn check_delivery(
    arrivals: &[Arrival],
    accepted: &HashMap<String, Instant>,
) -> (usize, usize, usize) {
    let mut first_arrival: HashMap<&str, usize> = HashMap::new();
    for (index, arrival) in arrivals.iter().enumerate() {
        first_arrival
            .entry(arrival.kci_id.as_str())
            .or_insert(index);
    }
    let arrived = accepted
        .keys()
        .filter(|id| first_arrival.contains_key(id.as_str()))
        .count();
    let duplicates = arrivals.len() - first_arrival.len();
    let mut last_accepted: HashMap<&str, Instant> = HashMap::new();
    let mut order_violations = 0;
    for (index, arrival) in arrivals.iter().enumerate() {
        if first_arrival.get(arrival.kci_id.as_str()) != Some(&index) {
            continue;
        }
        let Some(at) = accepted.get(&arrival.kci_id) else {
            continue;
        };
        if last_accepted
            .get(arrival.entity.as_str())
            .is_some_and(|previous| at < previous)
        {
            order_violations += 1;
        }
        last_accepted.insert(arrival.entity.as_str(), *at);
    }
    (arrived, duplicates, order_violations)
}

/// From 204 to the consumer, for the KCIs of the fixed-rate phase (microseconds).
fn publish_lag(
    arrivals: &Arc<Mutex<Vec<Arrival>>>,
    accepted: &[Accepted],
) -> anyhow::Result<Histogram<u64>> {
    let arrivals = arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("consumer poisoned"))?;
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

async fn delete_topology(connection: &Connection, amqp: &AmqpSettings) {
    if let Ok(channel) = connection.create_channel().await {
        let _ = channel
            .queue_delete(amqp.unrouted_queue.as_str().into(), Default::default())
            .await;
        for exchange in [&amqp.exchange, &amqp.alternate_exchange] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), Default::default())
                .await;
        }
    }
    let _ = connection.close(200, "bench done".into()).await;
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
