//! The reliability drills (`kci-tools drill`): the real `kci-receiver` binary under a steady load
//! from the gateway simulator (which, like the gateway, sends a KCI again after a 503 or no
//! answer), while its dependencies fail the ways they fail in production:
//!
//! - **kill**: `kill -9` of the service, again and again, each time restarted on its port;
//! - **broker outage**: RabbitMQ unreachable (connections refused and cut);
//! - **database outage**: PostgreSQL unreachable;
//! - **database freeze**: PostgreSQL hangs (connections open, nothing goes through);
//! - **broker blocked**: RabbitMQ blocks publishers (`connection.blocked`, as on a memory
//!   alarm: its high watermark set to 0 with `rabbitmqctl`, for the whole broker).
//!
//! For each drill it reports what was acknowledged (204), what of it is missing in the database
//! and on RabbitMQ, duplicates, per-entity order violations, the answers given while the fault
//! lasted, and how long recovery took. Recorded in `docs/reliability.md`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

use crate::cli::DrillArgs;
use crate::delivery::{self, Consumer, Delivery};
use crate::service::{
    ADMIN_PASSWORD, GATEWAY_PASSWORD, Service, host_port, machine, with_authority,
};
use crate::simulator::{self, Answer, Report};
use crate::tcp_proxy::TcpProxy;

/// The drills, in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Drill {
    Kill,
    BrokerOutage,
    DatabaseOutage,
    DatabaseFreeze,
    BrokerBlocked,
    MultiInstance,
}

impl Drill {
    fn name(self) -> &'static str {
        match self {
            Drill::Kill => "kill -9 under load",
            Drill::BrokerOutage => "broker outage under load",
            Drill::DatabaseOutage => "database outage under load",
            Drill::DatabaseFreeze => "database freeze under load",
            Drill::BrokerBlocked => "broker blocks publishers under load",
            Drill::MultiInstance => "two serve and one relay on one database, each killed in turn",
        }
    }
}

/// What one drill found.
pub struct Finding {
    pub drill: Drill,
    pub store: &'static str,
    pub fault: String,
    pub delivery: Delivery,
    pub missing_in_database: usize,
    /// KCIs with more than one (non-anomaly) history entry: a KCI recorded twice.
    pub duplicate_history: usize,
    /// Answers while the fault lasted: status (or "no answer") and count.
    pub during_fault: BTreeMap<String, u64>,
    /// The longest an answer took while the fault lasted.
    pub slowest_during_fault: Duration,
    pub recovery: String,
}

impl Finding {
    /// Nothing acknowledged is missing anywhere and per-entity order held.
    pub fn held(&self) -> bool {
        self.missing_in_database == 0
            && self.duplicate_history == 0
            && self.delivery.missing() == 0
            && self.delivery.order_violations == 0
    }
}

/// The environment the drills run in: one database, one service, proxies in front of both
/// dependencies, one consumer.
struct Rig {
    service: Service,
    database: DatabaseConnection,
    database_proxy: Option<TcpProxy>,
    broker_proxy: TcpProxy,
    consumer: Consumer,
    options: simulator::Options,
    next_gateway_id: u64,
}

/// Runs the drills asked for and prints a table; returns what each found.
pub async fn run(args: DrillArgs) -> anyhow::Result<Vec<Finding>> {
    let binary = crate::service::binary(args.service_binary.as_deref())?;
    println!("# kci-receiver drills");
    println!("{}", machine());
    println!(
        "load: {} KCIs/s offered over {} connections; the simulator sends again after a 503 or no answer",
        args.rate, args.concurrency
    );
    let mut findings = Vec::new();
    let postgres_drills: Vec<Drill> = args
        .only
        .iter()
        .copied()
        .filter(|drill| *drill != Drill::MultiInstance)
        .collect();
    if !postgres_drills.is_empty() {
        findings.extend(run_on(&args, &binary, Store::Postgres, &postgres_drills).await?);
    }
    if args.sqlite && args.only.contains(&Drill::Kill) {
        findings.extend(run_on(&args, &binary, Store::Sqlite, &[Drill::Kill]).await?);
    }
    if args.only.contains(&Drill::MultiInstance) {
        println!("\n## {} (PostgreSQL)", Drill::MultiInstance.name());
        let finding = multi_instance(&args, &binary).await?;
        println!("{}", row(&finding));
        findings.push(finding);
    }
    print_findings(&findings);
    Ok(findings)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Store {
    Postgres,
    Sqlite,
}

async fn run_on(
    args: &DrillArgs,
    binary: &Path,
    store: Store,
    drills: &[Drill],
) -> anyhow::Result<Vec<Finding>> {
    let name = format!("kci_drill_{}", uuid::Uuid::new_v4().simple());
    let sqlite_path = std::env::temp_dir().join(format!("{name}.db"));
    let (service_database_url, direct_url, database_proxy) = match store {
        Store::Postgres => {
            let admin = Database::connect(&args.postgres_url).await?;
            admin
                .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
                .await?;
            admin.close().await?;
            let server = host_port(&args.postgres_url, 5432)?;
            let proxy = TcpProxy::start(server).await;
            let direct = with_authority(&args.postgres_url, &server.to_string(), Some(&name));
            let proxied = with_authority(
                &args.postgres_url,
                &format!("127.0.0.1:{}", proxy.port),
                Some(&name),
            );
            (proxied, direct, Some(proxy))
        }
        Store::Sqlite => {
            let url = format!("sqlite://{}?mode=rwc", sqlite_path.display());
            (url.clone(), url, None)
        }
    };
    let result = drill_all(
        args,
        binary,
        store,
        drills,
        &name,
        &service_database_url,
        &direct_url,
        database_proxy,
    )
    .await;
    match store {
        Store::Postgres => {
            if let Ok(admin) = Database::connect(&args.postgres_url).await {
                let _ = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            }
        }
        Store::Sqlite => {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", sqlite_path.display()));
            }
        }
    }
    result
}

#[allow(clippy::too_many_arguments, reason = "one call, from run_on")]
async fn drill_all(
    args: &DrillArgs,
    binary: &Path,
    store: Store,
    drills: &[Drill],
    name: &str,
    service_database_url: &str,
    direct_url: &str,
    database_proxy: Option<TcpProxy>,
) -> anyhow::Result<Vec<Finding>> {
    let amqp = delivery::amqp_settings(&args.amqp_url, &name.replace('_', "-"));
    let consumer = Consumer::start(&args.amqp_url, &amqp).await?;
    let broker_proxy = TcpProxy::start(host_port(&args.amqp_url, 5672)?).await;
    let service_amqp = with_authority(
        &args.amqp_url,
        &format!("127.0.0.1:{}", broker_proxy.port),
        None,
    );
    let service = Service::start(
        binary,
        name,
        &[
            ("KCI__DATABASE__URL", service_database_url.to_owned()),
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
    let database = Database::connect(direct_url).await?;
    let mut rig = Rig {
        options: load_options(args, &service.base_url),
        service,
        database,
        database_proxy,
        broker_proxy,
        consumer,
        next_gateway_id: 100_000_000,
    };
    let store_name = match store {
        Store::Postgres => "PostgreSQL",
        Store::Sqlite => "SQLite",
    };
    let mut findings = Vec::new();
    for drill in drills {
        if rig.database_proxy.is_none() && *drill != Drill::Kill {
            continue;
        }
        println!("\n## {} ({store_name})", drill.name());
        let finding = match drill {
            Drill::Kill => kill(&mut rig, args).await?,
            Drill::BrokerOutage => broker_outage(&mut rig, args).await?,
            Drill::DatabaseOutage => database_fault(&mut rig, args, false).await?,
            Drill::DatabaseFreeze => database_fault(&mut rig, args, true).await?,
            Drill::BrokerBlocked => broker_blocked(&mut rig, args).await?,
            Drill::MultiInstance => unreachable!("run on a rig of its own, by run()"),
        };
        let finding = Finding {
            store: store_name,
            ..finding
        };
        println!("{}", row(&finding));
        findings.push(finding);
    }
    let Rig {
        service, consumer, ..
    } = rig;
    tokio::task::spawn_blocking(move || service.stop()).await?;
    consumer.close().await;
    Ok(findings)
}

/// Several instances on one database and one broker: two `serve` (no relay of their own) and
/// one `relay`, all started at once on an empty database (their migrations wait for one
/// another), the load's KCIs for the same entities sent through both `serve`s in turn; every
/// process is killed (`-9`) and restarted in turn. Besides the usual checks: no KCI has two
/// history entries.
async fn multi_instance(args: &DrillArgs, binary: &Path) -> anyhow::Result<Finding> {
    let name = format!("kci_drill_{}", uuid::Uuid::new_v4().simple());
    let admin = Database::connect(&args.postgres_url).await?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    admin.close().await?;
    let server = host_port(&args.postgres_url, 5432)?;
    let url = with_authority(&args.postgres_url, &server.to_string(), Some(&name));
    let result = multi_instance_on(args, binary, &name, &url).await;
    if let Ok(admin) = Database::connect(&args.postgres_url).await {
        let _ = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
    result
}

async fn multi_instance_on(
    args: &DrillArgs,
    binary: &Path,
    name: &str,
    database_url: &str,
) -> anyhow::Result<Finding> {
    let amqp = delivery::amqp_settings(&args.amqp_url, &name.replace('_', "-"));
    let consumer = Consumer::start(&args.amqp_url, &amqp).await?;
    let common = [
        ("KCI__DATABASE__URL", database_url.to_owned()),
        ("KCI__AMQP__URL", args.amqp_url.clone()),
        ("KCI__AMQP__EXCHANGE", amqp.exchange.clone()),
        (
            "KCI__AMQP__ALTERNATE_EXCHANGE",
            amqp.alternate_exchange.clone(),
        ),
        ("KCI__AMQP__UNROUTED_QUEUE", amqp.unrouted_queue.clone()),
        ("KCI__RELAY__RECONNECT_MAX_MS", "1000".to_owned()),
        ("KCI__RELAY__NOTIFY_OTHER_PROCESSES", "true".to_owned()),
    ];
    let mut serving = common.to_vec();
    serving.push(("KCI__RELAY__ENABLED", "false".to_owned()));
    let mut processes = vec![
        Service::start(binary, &format!("{name}-serve-a"), &serving)?,
        Service::start(binary, &format!("{name}-serve-b"), &serving)?,
        Service::start_command(binary, "relay", &format!("{name}-relay"), &common)?,
    ];
    for process in &processes[..2] {
        process.wait_ready(None).await?;
    }
    processes[2].wait_ready(Some(true)).await?;
    let database = Database::connect(database_url).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let options = simulator::Options {
        other_base_urls: vec![processes[1].base_url.clone()],
        seed: 26,
        first_gateway_id: 100_000_000,
        stop: Some(stop.clone()),
        ..load_options(args, &processes[0].base_url)
    };
    let load = Load {
        stop,
        running: tokio::spawn(simulator::run(options)),
    };
    let mut faults = Vec::new();
    for n in 0..args.kills.max(3) as usize {
        tokio::time::sleep(Duration::from_secs_f64(args.kill_every_seconds)).await;
        let victim = n % processes.len();
        let killed = Instant::now();
        processes[victim].restart()?;
        processes[victim].wait_ready(None).await?;
        if victim < 2 {
            faults.push((killed, Instant::now()));
        }
        print!("{} ", ["serve-a", "serve-b", "relay"][victim]);
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    println!();
    tokio::time::sleep(Duration::from_secs_f64(args.kill_every_seconds)).await;
    let report = load.finish().await?;
    let (delivery, missing_in_database) = verify(&consumer, &database, &report).await?;
    let duplicate_history = database
        .query_all_raw(Statement::from_string(
            database.get_database_backend(),
            "SELECT kci_id FROM state_transition WHERE NOT flag_anomaly \
             GROUP BY kci_id HAVING COUNT(*) > 1",
        ))
        .await?
        .len();
    let mut during_fault = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    for (killed, ready) in &faults {
        let (answers, slow) = answers_between(&report.answers, *killed, *ready);
        for (status, count) in answers {
            *during_fault.entry(status).or_default() += count;
        }
        slowest = slowest.max(slow);
    }
    for process in processes {
        tokio::task::spawn_blocking(move || process.stop()).await?;
    }
    consumer.close().await;
    Ok(Finding {
        drill: Drill::MultiInstance,
        store: "PostgreSQL",
        fault: format!(
            "{} kill -9s, serve-a, serve-b and the relay in turn, one every {} s; KCIs through both serves",
            args.kills.max(3),
            args.kill_every_seconds
        ),
        delivery,
        missing_in_database,
        duplicate_history,
        during_fault,
        slowest_during_fault: slowest,
        recovery: format!("{duplicate_history} KCIs with two history entries"),
    })
}

/// The drills' load: realistic lifecycles of every type at `args.rate`, sent again after a 503
/// or no answer, like the gateway.
fn load_options(args: &DrillArgs, base_url: &str) -> simulator::Options {
    simulator::Options {
        base_url: base_url.to_owned(),
        gateway_password: GATEWAY_PASSWORD.to_owned(),
        admin: Some(("ops-admin".to_owned(), ADMIN_PASSWORD.to_owned())),
        orders: 300_000,
        ethernet_orders: 20_000,
        unsolicited_ceases: 20_000,
        tests: 150_000,
        problems: 100_000,
        concurrency: args.concurrency,
        rate: Some(args.rate),
        retry_unavailable: Some(Duration::from_millis(500)),
        ..simulator::Options::default()
    }
}

/// A steady load in the background until `stop` is set.
struct Load {
    stop: Arc<AtomicBool>,
    running: tokio::task::JoinHandle<anyhow::Result<Report>>,
}

impl Rig {
    fn load(&mut self, seed: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let options = simulator::Options {
            seed,
            first_gateway_id: self.next_gateway_id,
            stop: Some(stop.clone()),
            ..self.options.clone()
        };
        self.next_gateway_id += 10_000_000;
        Load {
            stop,
            running: tokio::spawn(simulator::run(options)),
        }
    }

    /// Waits for everything acknowledged to reach RabbitMQ, then checks the database and the
    /// consumer.
    async fn verify(&self, report: &Report) -> anyhow::Result<(Delivery, usize)> {
        verify(&self.consumer, &self.database, report).await
    }
}

impl Load {
    async fn finish(self) -> anyhow::Result<Report> {
        self.stop.store(true, Ordering::Relaxed);
        self.running.await?
    }
}

/// Waits for everything acknowledged to reach the consumer, then checks what arrived there and
/// what the database holds: (delivery, acknowledged KCIs missing from the database).
async fn verify(
    consumer: &Consumer,
    database: &DatabaseConnection,
    report: &Report,
) -> anyhow::Result<(Delivery, usize)> {
    let acknowledged: HashMap<String, Instant> = report
        .accepted
        .iter()
        .map(|a| (a.kci_id.clone(), a.at))
        .collect();
    if !consumer
        .wait_for(&acknowledged, Duration::from_secs(180))
        .await
    {
        eprintln!("warning: not every acknowledged KCI reached RabbitMQ within 180 s");
    }
    let delivery = consumer.with_arrivals(|arrivals| delivery::check(arrivals, &acknowledged));
    let stored = stored_kci_ids(database).await?;
    let missing_in_database = acknowledged
        .keys()
        .filter(|id| !stored.contains(id.as_str()))
        .count();
    Ok((delivery, missing_in_database))
}

/// The KCI ids the database holds.
async fn stored_kci_ids(db: &DatabaseConnection) -> anyhow::Result<HashSet<String>> {
    let backend = db.get_database_backend();
    let rows = db
        .query_all_raw(Statement::from_string(backend, "SELECT kci_id FROM kci"))
        .await?;
    let mut ids = HashSet::new();
    for row in rows {
        let id: uuid::Uuid = row.try_get("", "kci_id")?;
        ids.insert(id.to_string());
    }
    Ok(ids)
}

/// Answers to the requests sent while the fault lasted (`from` to `to`), by status; and the
/// slowest of them.
fn answers_between(
    answers: &[Answer],
    from: Instant,
    to: Instant,
) -> (BTreeMap<String, u64>, Duration) {
    let mut by_status = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    let sent_during = |a: &&Answer| {
        let sent = a.at.checked_sub(a.latency).unwrap_or(a.at);
        sent >= from && sent <= to
    };
    for answer in answers.iter().filter(sent_during) {
        let status = answer
            .status
            .map_or_else(|| "no answer".to_owned(), |s| s.to_string());
        *by_status.entry(status).or_default() += 1;
        slowest = slowest.max(answer.latency);
    }
    (by_status, slowest)
}

/// The first 204 after `since`, measured from `since`.
fn first_accepted_after(answers: &[Answer], since: Instant) -> Option<Duration> {
    answers
        .iter()
        .filter(|a| a.status == Some(204) && a.at >= since)
        .map(|a| a.at - since)
        .min()
}

fn seconds(duration: Option<Duration>) -> String {
    duration.map_or_else(
        || "never".to_owned(),
        |d| format!("{:.2} s", d.as_secs_f64()),
    )
}

async fn kill(rig: &mut Rig, args: &DrillArgs) -> anyhow::Result<Finding> {
    let load = rig.load(21);
    let mut faults = Vec::new();
    for n in 1..=args.kills {
        tokio::time::sleep(Duration::from_secs_f64(args.kill_every_seconds)).await;
        let killed = Instant::now();
        rig.service.restart()?;
        rig.service.wait_ready(None).await?;
        faults.push((killed, Instant::now()));
        print!("{n} ");
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
    println!();
    tokio::time::sleep(Duration::from_secs_f64(args.kill_every_seconds)).await;
    let report = load.finish().await?;
    let (delivery, missing_in_database) = rig.verify(&report).await?;
    let mut during_fault = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    let mut recoveries = Vec::new();
    for (killed, ready) in &faults {
        let (answers, slow) = answers_between(&report.answers, *killed, *ready);
        for (status, count) in answers {
            *during_fault.entry(status).or_default() += count;
        }
        slowest = slowest.max(slow);
        recoveries.push(first_accepted_after(&report.answers, *killed).unwrap_or(Duration::MAX));
    }
    recoveries.sort();
    let median = recoveries.get(recoveries.len() / 2).copied();
    let worst = recoveries.last().copied();
    Ok(Finding {
        drill: Drill::Kill,
        store: "",
        fault: format!(
            "{} kills, one every {} s",
            args.kills, args.kill_every_seconds
        ),
        delivery,
        missing_in_database,
        duplicate_history: 0,
        during_fault,
        slowest_during_fault: slowest,
        recovery: format!(
            "first 204 after a kill: median {}, worst {}",
            seconds(median),
            seconds(worst)
        ),
    })
}

async fn broker_outage(rig: &mut Rig, args: &DrillArgs) -> anyhow::Result<Finding> {
    let load = rig.load(22);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cut = Instant::now();
    rig.broker_proxy.cut();
    tokio::time::sleep(Duration::from_secs_f64(args.broker_outage_seconds)).await;
    let restored = Instant::now();
    rig.broker_proxy.restore();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let report = load.finish().await?;
    let (delivery, missing_in_database) = rig.verify(&report).await?;
    let (during_fault, slowest) = answers_between(&report.answers, cut, restored);
    let accepted_during: HashMap<String, Instant> = report
        .accepted
        .iter()
        .filter(|a| a.at >= cut && a.at < restored)
        .map(|a| (a.kci_id.clone(), a.at))
        .collect();
    let (first, drained) = rig.consumer.with_arrivals(|arrivals| {
        let first = arrivals
            .iter()
            .filter(|a| a.at >= restored)
            .map(|a| a.at - restored)
            .min();
        let drained = arrivals
            .iter()
            .filter(|a| accepted_during.contains_key(&a.kci_id))
            .map(|a| a.at - restored)
            .max();
        (first, drained)
    });
    Ok(Finding {
        drill: Drill::BrokerOutage,
        store: "",
        fault: format!(
            "RabbitMQ unreachable for {} s ({} KCIs acknowledged meanwhile)",
            args.broker_outage_seconds,
            accepted_during.len()
        ),
        delivery,
        missing_in_database,
        duplicate_history: 0,
        during_fault,
        slowest_during_fault: slowest,
        recovery: format!(
            "first message {} after the broker returned; everything acknowledged during the outage published {} after",
            seconds(first),
            seconds(drained)
        ),
    })
}

/// RabbitMQ's memory high watermark (`rabbitmqctl`), e.g. `0.4`.
fn memory_watermark() -> anyhow::Result<String> {
    let status = std::process::Command::new("rabbitmqctl")
        .arg("status")
        .output()?;
    let text = String::from_utf8_lossy(&status.stdout);
    text.lines()
        .find_map(|line| line.strip_prefix("Memory high watermark setting: "))
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("rabbitmqctl status did not tell the memory high watermark"))
}

fn set_memory_watermark(value: &str) -> anyhow::Result<()> {
    let set = std::process::Command::new("rabbitmqctl")
        .args(["set_vm_memory_high_watermark", value])
        .output()?;
    if !set.status.success() {
        anyhow::bail!(
            "rabbitmqctl set_vm_memory_high_watermark {value}: {}",
            String::from_utf8_lossy(&set.stderr)
        );
    }
    Ok(())
}

async fn broker_blocked(rig: &mut Rig, args: &DrillArgs) -> anyhow::Result<Finding> {
    let before = memory_watermark()?;
    let load = rig.load(25);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let began = Instant::now();
    set_memory_watermark("0")?;
    // Seen from outside while it lasts: /readyz, and no transaction held by the waiting relay.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let mut seen_blocked = false;
    let mut held_transactions = 0u64;
    while began.elapsed() < Duration::from_secs_f64(args.broker_blocked_seconds) {
        if let Ok(response) = client
            .get(format!("{}/readyz", rig.service.base_url))
            .send()
            .await
            && let Ok(body) = response.json::<serde_json::Value>().await
        {
            seen_blocked |= body["broker"]["status"] == "blocked";
        }
        if rig.database.get_database_backend() == sea_orm::DbBackend::Postgres {
            let statement = Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT count(*)::bigint AS n FROM pg_stat_activity WHERE datname = current_database() \
                 AND state LIKE 'idle in transaction%' AND now() - state_change > interval '1 second'",
            );
            if let Ok(Some(row)) = rig.database.query_one_raw(statement).await {
                held_transactions += row.try_get::<i64>("", "n").unwrap_or(0).max(0) as u64;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ended = Instant::now();
    set_memory_watermark(&before)?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let report = load.finish().await?;
    let (delivery, missing_in_database) = rig.verify(&report).await?;
    let (during_fault, slowest) = answers_between(&report.answers, began, ended);
    let first = rig.consumer.with_arrivals(|arrivals| {
        arrivals
            .iter()
            .filter(|a| a.at >= ended)
            .map(|a| a.at - ended)
            .min()
    });
    Ok(Finding {
        drill: Drill::BrokerBlocked,
        store: "",
        fault: format!(
            "RabbitMQ blocks publishers for {} s (memory watermark 0); /readyz said blocked: {seen_blocked}; transactions held over 1 s meanwhile: {held_transactions}",
            args.broker_blocked_seconds
        ),
        delivery,
        missing_in_database,
        duplicate_history: 0,
        during_fault,
        slowest_during_fault: slowest,
        recovery: format!(
            "first message {} after the broker unblocked",
            seconds(first)
        ),
    })
}

async fn database_fault(rig: &mut Rig, args: &DrillArgs, freeze: bool) -> anyhow::Result<Finding> {
    let Some(proxy) = rig.database_proxy.take() else {
        anyhow::bail!("the database drills need PostgreSQL");
    };
    let load = rig.load(if freeze { 24 } else { 23 });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let began = Instant::now();
    let lasted = if freeze {
        proxy.freeze();
        args.freeze_seconds
    } else {
        proxy.cut();
        args.database_outage_seconds
    };
    tokio::time::sleep(Duration::from_secs_f64(lasted)).await;
    let ended = Instant::now();
    if freeze {
        proxy.thaw();
    } else {
        proxy.restore();
    }
    rig.database_proxy = Some(proxy);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let report = load.finish().await?;
    let (delivery, missing_in_database) = rig.verify(&report).await?;
    let (during_fault, slowest) = answers_between(&report.answers, began, ended);
    Ok(Finding {
        drill: if freeze {
            Drill::DatabaseFreeze
        } else {
            Drill::DatabaseOutage
        },
        store: "",
        fault: if freeze {
            format!("PostgreSQL frozen (connections stall) for {lasted} s")
        } else {
            format!("PostgreSQL unreachable for {lasted} s")
        },
        delivery,
        missing_in_database,
        duplicate_history: 0,
        during_fault,
        slowest_during_fault: slowest,
        recovery: format!(
            "first 204 {} after the database returned",
            seconds(first_accepted_after(&report.answers, ended))
        ),
    })
}

/// A finding as a row of the drills' table.
fn row(finding: &Finding) -> String {
    let answers: Vec<String> = finding
        .during_fault
        .iter()
        .map(|(status, count)| format!("{status}: {count}"))
        .collect();
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} (slowest {:.2} s) | {} |",
        finding.drill.name(),
        finding.store,
        finding.fault,
        finding.delivery.acknowledged,
        finding.missing_in_database,
        finding.delivery.missing(),
        finding.delivery.duplicates,
        finding.delivery.order_violations,
        if answers.is_empty() {
            "no request".to_owned()
        } else {
            answers.join(", ")
        },
        finding.slowest_during_fault.as_secs_f64(),
        finding.recovery,
    )
}

fn print_findings(findings: &[Finding]) {
    println!(
        "\n| drill | store | fault | acknowledged | missing in DB | missing on RabbitMQ | duplicates | order violations | answers during the fault | recovery |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for finding in findings {
        println!("{}", row(finding));
    }
    let held = findings.iter().all(Finding::held);
    println!(
        "\n{}",
        if held {
            "held: nothing acknowledged is missing, per-entity order kept"
        } else {
            "NOT HELD: see the rows above"
        }
    );
}
