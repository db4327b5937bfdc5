//! `kci-tools bench-reads`: the operations API at scale (issue 17, item 5). Loads a realistic
//! history of `--kcis` KCIs into a fresh PostgreSQL database in bulk (`history.sql`, not through
//! HTTP), then reads every read endpoint of the operations API and the dashboard in turn, while
//! the simulator posts KCIs at `--intake-rate`, in two phases: `--readers` concurrent readers
//! without pause (the read capacity), then calls at a fixed rate (`--read-rate`, by default half
//! of that capacity). It prints p50/p99 of each endpoint in each phase, PostgreSQL's plans of
//! the queries behind the single-entity reads, and which indexes were used.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use sea_orm::{ConnectionTrait, Database, FromQueryResult};

use crate::cli::BenchReadsArgs;
use crate::service::{ADMIN_PASSWORD, Service, host_port, machine, with_authority};
use crate::simulator;

const HISTORY: &str = include_str!("history.sql");
const ENTITY_TYPES: [&str; 10] = [
    "PROVIDE_ORDER",
    "PROVIDE_ORDER",
    "PROVIDE_ORDER",
    "PROVIDE_ORDER",
    "PROVIDE_ORDER",
    "CEASE_ORDER",
    "MODIFY_ORDER",
    "SERVICE_TEST",
    "SERVICE_PROBLEM",
    "PROVIDE_ETHERNET_ORDER",
];

fn resource(entity_type: &str) -> &'static str {
    match entity_type {
        "SERVICE_TEST" => "service-tests",
        "SERVICE_PROBLEM" => "service-problems",
        "PROVIDE_ETHERNET_ORDER" => "ethernet/service-orders",
        _ => "service-orders",
    }
}

/// The id history.sql gives KCI number `k`.
fn kci_uuid(k: u64) -> String {
    format!("00000000-0000-4000-8000-{k:012x}")
}

/// A small, seeded generator: the same run picks the same ids.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// One read: its name in the report, and the path of a call of it.
fn read_path(endpoint: usize, entities: u64, random: &mut XorShift) -> (&'static str, String) {
    let n = random.below(entities) + 1;
    let k = (n - 1) * 5 + random.below(5) + 1;
    let entity_type = ENTITY_TYPES[(n % 10) as usize];
    let gateway_id = 1_000_000 + n;
    let hour_ago = (chrono::Utc::now() - chrono::Duration::hours(1))
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    match endpoint % READS {
        0 => ("GET /kcis/{kciId}", format!("/api/v1/kcis/{}", kci_uuid(k))),
        1 => (
            "GET /{entities}/{id}",
            format!(
                "/api/v1/{}/{gateway_id}?entityType={entity_type}",
                resource(entity_type)
            ),
        ),
        2 => (
            "GET /{entities}/{id}/history",
            format!(
                "/api/v1/{}/{gateway_id}/history?entityType={entity_type}",
                resource(entity_type)
            ),
        ),
        3 => ("GET /audit/{xRequestId}", format!("/api/v1/audit/req-{k}")),
        4 => (
            "GET /search?q={gateway id}",
            format!("/api/v1/search?q={gateway_id}"),
        ),
        5 => (
            "GET /service-orders?status=IN_PROGRESS",
            "/api/v1/service-orders?status=IN_PROGRESS".to_owned(),
        ),
        6 => (
            "GET /entities?supplier=&status=",
            "/api/v1/entities?supplier=OTHERCO&status=SENT_TO_SUPPLIER".to_owned(),
        ),
        7 => (
            "GET /entities?correlation=unmatched",
            "/api/v1/entities?correlation=unmatched".to_owned(),
        ),
        8 => (
            "GET /entities?flagged=gap",
            "/api/v1/entities?flagged=gap".to_owned(),
        ),
        9 => (
            "GET /entities?stuckFor=P7D",
            "/api/v1/entities?stuckFor=P7D".to_owned(),
        ),
        10 => (
            "GET /entities?updatedAfter=(an hour ago)",
            format!("/api/v1/entities?updatedAfter={hour_ago}"),
        ),
        11 => (
            "GET /service-tests?cursor=(deep)",
            format!(
                "/api/v1/service-tests?cursor={}",
                random.below(entities) + 1
            ),
        ),
        12 => ("GET /attention", "/api/v1/attention?limit=20".to_owned()),
        13 => ("GET /overview", "/api/v1/overview".to_owned()),
        14 => ("GET /outbox/dead", "/api/v1/outbox/dead".to_owned()),
        _ => (
            "GET /conversations/{id}",
            format!("/api/v1/conversations/conv-{n}"),
        ),
    }
}
const READS: usize = 16;

/// Per endpoint: latencies (µs) and answers other than 200 (404 counts as answered: an id the
/// history does not have, e.g. a conversation never registered).
#[derive(Default)]
struct Calls {
    latency: BTreeMap<&'static str, Histogram<u64>>,
    not_ok: BTreeMap<&'static str, BTreeMap<u16, u64>>,
}

/// What a run saw, for its smoke test: per endpoint, calls and answers other than 200; the
/// single-entity queries whose plan used no index.
#[derive(Debug, Default)]
pub struct ReadsReport {
    /// Readers without pause.
    pub endpoints: Vec<(String, u64, u64)>,
    /// Reads at a fixed rate.
    pub paced_endpoints: Vec<(String, u64, u64)>,
    pub plans_without_index: Vec<String>,
}

/// How the reads of a phase are issued.
#[derive(Debug, Clone, Copy)]
enum Pace {
    /// `readers` loops, each sending its next call when the last is answered.
    WithoutPause { readers: usize },
    /// Calls due at evenly spaced times, each sent when due whatever is still unanswered.
    AtRate { calls_per_second: f64 },
}

/// What one phase saw.
struct Phase {
    calls: Calls,
    elapsed: Duration,
    intake: simulator::Report,
}

impl Phase {
    fn calls_per_second(&self) -> f64 {
        let calls: u64 = self.calls.latency.values().map(|h| h.len()).sum();
        calls as f64 / self.elapsed.as_secs_f64().max(0.001)
    }

    fn endpoints(&self) -> Vec<(String, u64, u64)> {
        self.calls
            .latency
            .iter()
            .map(|(name, h)| {
                let not_ok = self.calls.not_ok.get(name).map_or(0, |n| n.values().sum());
                ((*name).to_owned(), h.len(), not_ok)
            })
            .collect()
    }

    fn print(&self, what: &str) {
        println!(
            "\n{what}: {:.0} calls/s, while the simulator posted {} KCIs ({:.0}/s; {} other answers)",
            self.calls_per_second(),
            self.intake.accepted.len(),
            self.intake.throughput(),
            self.intake.other_statuses.values().sum::<u64>() + self.intake.transport_errors,
        );
        println!("\n| endpoint | calls | p50 | p99 | max | answers other than 200 |");
        println!("|---|---|---|---|---|---|");
        for (name, h) in &self.calls.latency {
            let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
            println!(
                "| {name} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:?} |",
                h.len(),
                ms(0.5),
                ms(0.99),
                h.max() as f64 / 1000.0,
                self.calls.not_ok.get(name).cloned().unwrap_or_default()
            );
        }
    }
}

/// One call: its latency from `due` is recorded under `name`.
async fn read_once(
    client: &reqwest::Client,
    calls: &Mutex<Calls>,
    url: String,
    name: &'static str,
    due: Instant,
) {
    let status = match client
        .get(url)
        .basic_auth("ops-admin", Some(ADMIN_PASSWORD))
        .send()
        .await
    {
        Ok(response) => {
            let status = response.status().as_u16();
            let _ = response.bytes().await;
            status
        }
        Err(_) => 0,
    };
    let took = due.elapsed().as_micros() as u64;
    let mut calls = calls.lock().unwrap_or_else(|p| p.into_inner());
    calls
        .latency
        .entry(name)
        .or_insert_with(|| Histogram::new_with_bounds(1, 120_000_000, 3).expect("a histogram"))
        .saturating_record(took.max(1));
    if status != 200 {
        *calls
            .not_ok
            .entry(name)
            .or_default()
            .entry(status)
            .or_default() += 1;
    }
}

/// Reads every endpoint in turn for `length`, paced as `pace` says, while the simulator posts
/// KCIs at `intake_rate`.
async fn read_phase(
    pace: Pace,
    base: &str,
    entities: u64,
    length: Duration,
    intake_rate: f64,
) -> anyhow::Result<Phase> {
    let mut intake = super::options(&[base.to_owned()], 16, 21, 50_000_000).duration(length);
    intake.rate = Some(intake_rate);
    let intake = tokio::spawn(simulator::run(intake));
    let calls = Arc::new(Mutex::new(Calls::default()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let started = Instant::now();
    let deadline = started + length;
    match pace {
        Pace::WithoutPause { readers } => {
            let readers: Vec<_> = (0..readers)
                .map(|reader| {
                    let (client, calls, base) = (client.clone(), calls.clone(), base.to_owned());
                    tokio::spawn(async move {
                        let mut random = XorShift(0x9e37_79b9_7f4a_7c15 ^ (reader as u64 + 1));
                        let mut endpoint = reader;
                        while Instant::now() < deadline {
                            let (name, path) = read_path(endpoint, entities, &mut random);
                            endpoint += 1;
                            let url = format!("{base}{path}");
                            read_once(&client, &calls, url, name, Instant::now()).await;
                        }
                    })
                })
                .collect();
            for reader in readers {
                reader.await?;
            }
        }
        Pace::AtRate { calls_per_second } => {
            let interval = Duration::from_secs_f64(1.0 / calls_per_second);
            let mut random = XorShift(0x2545_f491_4f6c_dd1d);
            let mut in_flight = tokio::task::JoinSet::new();
            let mut due = started;
            let mut endpoint = 0;
            while due < deadline {
                tokio::time::sleep_until(due.into()).await;
                let (name, path) = read_path(endpoint, entities, &mut random);
                endpoint += 1;
                let (client, calls, url) = (client.clone(), calls.clone(), format!("{base}{path}"));
                in_flight.spawn(async move { read_once(&client, &calls, url, name, due).await });
                due += interval;
            }
            while let Some(done) = in_flight.join_next().await {
                done?;
            }
        }
    }
    let elapsed = started.elapsed();
    let intake = intake.await??;
    let calls = std::mem::take(&mut *calls.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Phase {
        calls,
        elapsed,
        intake,
    })
}

/// The fastest fixed rate a phase is paced at (a call every 10 µs).
const MOST_CALLS_PER_SECOND: f64 = 100_000.0;

pub async fn run(args: BenchReadsArgs) -> anyhow::Result<ReadsReport> {
    if let Some(rate) = args.read_rate
        && !(1.0..=MOST_CALLS_PER_SECOND).contains(&rate)
    {
        anyhow::bail!("--read-rate: 1 to {MOST_CALLS_PER_SECOND} calls per second, not {rate}");
    }
    println!("# kci-receiver at scale: the operations API's reads");
    let binary = crate::service::binary(args.service_binary.as_deref())?;
    println!("{}", machine());
    let name = format!("kci_reads_{}", uuid::Uuid::new_v4().simple());
    let mut admin_options = sea_orm::ConnectOptions::new(args.postgres_url.clone());
    admin_options.sqlx_logging(false);
    let admin = Database::connect(admin_options).await?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE \"{name}\""))
        .await?;
    let authority = host_port(&args.postgres_url, 5432)?.to_string();
    let database_url = with_authority(&args.postgres_url, &authority, Some(&name));
    let result = measure(&args, &binary, &database_url).await;
    if args.keep_database {
        println!("kept the database: {database_url}");
    } else {
        let _ = admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await;
    }
    result
}

async fn measure(
    args: &BenchReadsArgs,
    binary: &std::path::Path,
    database_url: &str,
) -> anyhow::Result<ReadsReport> {
    let mut report = ReadsReport::default();
    let service = Service::start(
        binary,
        &format!("kci-reads-{}", uuid::Uuid::new_v4().simple()),
        &[
            ("KCI__DATABASE__URL", database_url.to_owned()),
            ("KCI__DATABASE__MAX_CONNECTIONS", "32".to_owned()),
            // No broker here: the KCIs posted during the reads wait in the outbox.
            ("KCI__RELAY__ENABLED", "false".to_owned()),
        ],
    )?;
    service.wait_ready(None).await?;

    // The history, in chunks of 20,000 entities (100,000 KCIs).
    let entities = (args.kcis / 5).max(1);
    let mut options = sea_orm::ConnectOptions::new(database_url.to_owned());
    // The bulk statements run for seconds by design: no slow-statement warnings.
    options.sqlx_logging(false);
    let database = Database::connect(options).await?;
    let started = Instant::now();
    let chunk = 20_000;
    let mut lo = 1;
    while lo <= entities {
        let hi = (lo + chunk - 1).min(entities);
        let sql = HISTORY
            .replace(":lo", &lo.to_string())
            .replace(":hi", &hi.to_string())
            .replace(":total", &entities.to_string());
        database.execute_unprepared(&sql).await?;
        lo = hi + 1;
    }
    database.execute_unprepared("ANALYZE").await?;
    // Index use is counted from here on: the reads and the intake that goes with them, not the
    // bulk load (needs a superuser; without one the counts include the load).
    let _ = database.execute_unprepared("SELECT pg_stat_reset()").await;
    println!(
        "history: {} entities, {} KCIs (with their audit records, history and published events) loaded in {:.0} s",
        entities,
        entities * 5,
        started.elapsed().as_secs_f64()
    );

    // Two phases, intake going on in both. First the readers read without pause: the API's
    // read capacity on this machine, and the latency of a queue for the cores. Then the same
    // reads arrive at a fixed rate, half of that capacity unless `--read-rate` says otherwise,
    // as a dashboard's refreshes and an operator's clicks do: the latency a reader sees when
    // the machine is not saturated by readers (as POST's tail is taken at half of saturation).
    // Each call's latency counts from when it was due, not from when it was sent, so a service
    // that falls behind is charged for the wait (no coordinated omission).
    let phase = Duration::from_secs(args.seconds);
    let saturated = read_phase(
        Pace::WithoutPause {
            readers: args.readers,
        },
        &service.base_url,
        entities,
        phase,
        args.intake_rate,
    )
    .await?;
    saturated.print(&format!(
        "{} readers without pause for {} s",
        args.readers, args.seconds
    ));
    report.endpoints = saturated.endpoints();
    let rate = args
        .read_rate
        .unwrap_or((saturated.calls_per_second() / 2.0).clamp(1.0, MOST_CALLS_PER_SECOND));
    let paced = read_phase(
        Pace::AtRate {
            calls_per_second: rate,
        },
        &service.base_url,
        entities,
        phase,
        args.intake_rate,
    )
    .await?;
    paced.print(&format!(
        "reads at {rate:.0} calls/s ({}) for {} s",
        if args.read_rate.is_some() {
            "--read-rate"
        } else {
            "half of the rate without pause"
        },
        args.seconds
    ));
    report.paced_endpoints = paced.endpoints();

    // The plans of the single-entity reads' queries (as the handlers issue them).
    let k = entities * 5 / 2;
    println!(
        "\nPlans (EXPLAIN ANALYZE), KCI {} of entity {}:",
        kci_uuid(k),
        (k - 1) / 5 + 1
    );
    for (what, sql) in [
        (
            "a KCI, its entity and its outbox event (one statement)",
            format!(
                "SELECT * FROM kci k LEFT JOIN tracked_entity e ON e.id = k.tracked_entity_id \
                 LEFT JOIN outbox_event o ON o.tracked_entity_id = k.tracked_entity_id AND o.kci_ref = k.id \
                 WHERE k.kci_id = '{}' LIMIT 1",
                kci_uuid(k)
            ),
        ),
        (
            "the stuck list (stuckFor=P7D), as the handler says it",
            format!(
                "SELECT * FROM tracked_entity WHERE last_kci_at < now() - interval '7 days' AND {} \
                 ORDER BY id DESC LIMIT 51",
                kci_receiver::operations::queries::in_flight_rows()
            ),
        ),
        (
            "its history entries",
            format!(
                "SELECT * FROM state_transition WHERE tracked_entity_id = (SELECT tracked_entity_id FROM kci WHERE kci_id = '{0}') AND kci_ref = (SELECT id FROM kci WHERE kci_id = '{0}') ORDER BY id",
                kci_uuid(k)
            ),
        ),
        (
            "its deliveries",
            format!(
                "SELECT * FROM audit_log WHERE kci_id = '{}' ORDER BY id",
                kci_uuid(k)
            ),
        ),
        (
            "an entity's history",
            format!(
                "SELECT * FROM state_transition WHERE tracked_entity_id = {} ORDER BY id",
                (k - 1) / 5 + 1
            ),
        ),
    ] {
        let plan = database
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!("EXPLAIN (ANALYZE, COSTS OFF) {sql}"),
            ))
            .await?;
        let lines: Vec<String> = plan
            .iter()
            .filter_map(|row| row.try_get_by_index::<String>(0).ok())
            .collect();
        // Every table through an index: one sequential scan in a join is one too many.
        let index_used = lines.iter().any(|l| l.contains("Index"))
            && !lines.iter().any(|l| l.contains("Seq Scan"));
        if !index_used {
            report.plans_without_index.push(what.to_owned());
        }
        println!(
            "- {what}: {} ({})",
            lines
                .iter()
                .find(|l| l.contains("Execution Time"))
                .map(|l| l.trim())
                .unwrap_or("?"),
            if index_used {
                "index"
            } else {
                "NO INDEX: sequential scan"
            }
        );
        for line in lines.iter().filter(|l| l.contains("Scan")) {
            println!("    {}", line.trim());
        }
    }
    // Which indexes the reads and the intake of this run used (item 1's index diet: an index no
    // question of the operations API uses only costs intake).
    #[derive(sea_orm::FromQueryResult)]
    struct IndexUse {
        table_name: String,
        index_name: String,
        scans: i64,
        size_kib: i64,
    }
    let uses = IndexUse::find_by_statement(sea_orm::Statement::from_string(
        sea_orm::DbBackend::Postgres,
        "SELECT relname::text AS table_name, indexrelname::text AS index_name, idx_scan AS scans, \
         (pg_relation_size(indexrelid) / 1024)::bigint AS size_kib \
         FROM pg_stat_user_indexes WHERE relname <> 'seaql_migrations' ORDER BY relname, indexrelname",
    ))
    .all(&database)
    .await?;
    println!("\nIndex use during the reads and their intake (pg_stat_user_indexes):");
    println!("\n| table | index | scans | size |\n|---|---|---|---|");
    for u in &uses {
        println!(
            "| {} | {} | {} | {:.1} MB |",
            u.table_name,
            u.index_name,
            u.scans,
            u.size_kib as f64 / 1024.0
        );
    }
    database.close().await?;
    println!(
        "\npeak RSS of kci-receiver: {:.1} MB",
        service.peak_rss_kib() as f64 / 1024.0
    );
    tokio::task::spawn_blocking(move || service.stop()).await?;
    Ok(report)
}
