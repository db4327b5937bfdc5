//! The command line of `kci-tools`: one binary, a subcommand per tool.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "kci-tools",
    version,
    about = "Tools around kci-receiver: gateway simulator and benchmark"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Play the Fibre Cafe gateway against a running kci-receiver: register original requests,
    /// then POST realistic KCI lifecycles (for demos, dashboards and load).
    Simulate(SimulateArgs),
    /// Measure throughput, latency, publish lag, backlog drain, memory and loss against
    /// PostgreSQL and RabbitMQ (and SQLite), and print the figures.
    Bench(BenchArgs),
    /// The operations API at scale: load a history of --kcis KCIs in bulk (PostgreSQL), then
    /// measure p50/p99 of every read endpoint under concurrent readers while KCIs keep coming,
    /// and print the plans of the single-entity reads' queries.
    BenchReads(BenchReadsArgs),
    /// Reliability drills under load: kill -9 of the service, broker outage, database outage,
    /// database freeze; report what was acknowledged, what is missing, duplicates, order,
    /// answers during each fault and recovery times.
    Drill(DrillArgs),
}

#[derive(Debug, Clone, Args)]
pub struct DrillArgs {
    /// An administrative PostgreSQL URL; the drills create (and drop) their own database.
    #[arg(
        long,
        env = "KCI_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    #[arg(
        long,
        env = "KCI_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Which drills, comma separated (default: all, in this order).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "kill,broker-outage,database-outage,database-freeze,broker-blocked,multi-instance"
    )]
    pub only: Vec<crate::drill::Drill>,
    /// kill -9s of the service.
    #[arg(long, default_value_t = 20)]
    pub kills: u32,
    /// Seconds of load between two kills.
    #[arg(long, default_value_t = 3.0)]
    pub kill_every_seconds: f64,
    #[arg(long, default_value_t = 60.0)]
    pub broker_outage_seconds: f64,
    #[arg(long, default_value_t = 20.0)]
    pub database_outage_seconds: f64,
    #[arg(long, default_value_t = 20.0)]
    pub freeze_seconds: f64,
    /// How long RabbitMQ blocks publishers (the broker-blocked drill sets its memory high
    /// watermark to 0 with `rabbitmqctl`, for the whole broker, then back).
    #[arg(long, default_value_t = 20.0)]
    pub broker_blocked_seconds: f64,
    /// KCIs per second offered.
    #[arg(long, default_value_t = 150.0)]
    pub rate: f64,
    /// POSTs in flight at once.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Also run the kill drill on SQLite (the embedded default).
    #[arg(long)]
    pub sqlite: bool,
    /// The kci-receiver binary (default: `kci-receiver` beside this program).
    #[arg(long, env = "KCI_RECEIVER_BIN")]
    pub service_binary: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// kci-receiver's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// More instances on the same database (repeatable): KCIs go to all in turn, as behind a
    /// load balancer.
    #[arg(long)]
    pub also_url: Vec<String>,
    #[arg(long, default_value = "fibrecafe")]
    pub gateway_user: String,
    /// The gateway's Basic password on kci-receiver.
    #[arg(long, env = "KCI_SIM_GATEWAY_PASSWORD")]
    pub gateway_password: String,
    /// Register each original request by sending its creating call through kci-receiver's
    /// egress proxy at this path prefix (e.g. /fibre-cafe/v1), as a CP's systems would, instead
    /// of through the operations API. kci-receiver's egress must reach a Tenant API that answers
    /// them: see --serve-tenant-api.
    #[arg(long, value_name = "PATH_PREFIX")]
    pub via_egress: Option<String>,
    /// Also play the gateway's Tenant API on this address (e.g. 127.0.0.1:9099) while the
    /// simulation runs: point kci-receiver's egress.upstream_base_url at http://<address>/v1 and
    /// egress.token_url at http://<address>/token.
    #[arg(long, value_name = "ADDRESS")]
    pub serve_tenant_api: Option<String>,
    /// Operations admin user, to register original requests (none: KCIs stay unmatched).
    #[arg(long, default_value = "ops-admin")]
    pub admin_user: String,
    #[arg(long, env = "KCI_SIM_ADMIN_PASSWORD")]
    pub admin_password: Option<String>,
    /// Provide, cease and modify orders (in turn).
    #[arg(long, default_value_t = 100)]
    pub orders: u64,
    #[arg(long, default_value_t = 10)]
    pub ethernet_orders: u64,
    #[arg(long, default_value_t = 10)]
    pub unsolicited_ceases: u64,
    #[arg(long, default_value_t = 50)]
    pub tests: u64,
    #[arg(long, default_value_t = 30)]
    pub problems: u64,
    /// POSTs in flight at once.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// KCIs per second (default: as fast as answered).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Stop starting lifecycles after this many seconds.
    #[arg(long)]
    pub duration_seconds: Option<u64>,
    /// Same seed, same run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Chance that a KCI is delivered twice.
    #[arg(long, default_value_t = 0.02)]
    pub redeliveries: f64,
    /// Chance that two neighbouring KCIs swap places.
    #[arg(long, default_value_t = 0.02)]
    pub out_of_order: f64,
    /// Chance that a sequence number is skipped.
    #[arg(long, default_value_t = 0.02)]
    pub gaps: f64,
    /// Chance that the original request is registered only after the first KCI.
    #[arg(long, default_value_t = 0.05)]
    pub late_registrations: f64,
    /// Share of KCIs the gateway "loses": produced but never posted (with --serve-tenant-api,
    /// its GET endpoints still return them in updates[]).
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// After the run, wait up to this many seconds for kci-receiver to recover the dropped KCIs
    /// (gap repair; needs --admin-password) and report how many it did and how long after the
    /// drop.
    #[arg(long, requires = "admin_password")]
    pub await_recovery_seconds: Option<u64>,
    /// Gateway ids start here.
    #[arg(long, default_value_t = 1_000_000)]
    pub first_gateway_id: u64,
    /// Like the gateway: send a KCI again after a 503 or no answer.
    #[arg(long)]
    pub retry_unavailable: bool,
}

#[derive(Debug, Args)]
pub struct BenchReadsArgs {
    /// An administrative PostgreSQL URL; a database of its own is created (and dropped).
    #[arg(
        long,
        env = "KCI_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    /// KCIs in the history (five per entity).
    #[arg(long, default_value_t = 1_000_000)]
    pub kcis: u64,
    /// Concurrent readers.
    #[arg(long, default_value_t = 16)]
    pub readers: usize,
    /// Seconds of reading.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// KCIs per second posted while the readers read.
    #[arg(long, default_value_t = 100.0)]
    pub intake_rate: f64,
    /// Calls per second of the second phase, reads at a fixed rate (default: half of what the
    /// readers without pause managed in the first).
    #[arg(long)]
    pub read_rate: Option<f64>,
    /// Keep the database afterwards (for EXPLAIN by hand).
    #[arg(long)]
    pub keep_database: bool,
    /// The kci-receiver binary (default: the one next to this program).
    #[arg(long, env = "KCI_RECEIVER_BIN")]
    pub service_binary: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// An administrative PostgreSQL URL; the benchmark creates (and drops) its own database.
    #[arg(
        long,
        env = "KCI_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub postgres_url: String,
    #[arg(
        long,
        env = "KCI_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// Connections at saturation.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Seconds of each measured phase.
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// KCIs accepted while the broker is unreachable, then drained.
    #[arg(long, default_value_t = 10_000)]
    pub backlog: u64,
    /// Skip the SQLite run.
    #[arg(long, conflicts_with = "sqlite_only")]
    pub postgres_only: bool,
    /// Skip the PostgreSQL run.
    #[arg(long)]
    pub sqlite_only: bool,
    /// Only the backlog drain and the broker's own rate (no ceilings, no load phases): for
    /// working on the relay.
    #[arg(long)]
    pub drain_only: bool,
    /// kci-receiver instances on the PostgreSQL database, the load over all of them (one relay,
    /// in the first). SQLite always has one.
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    /// PostgreSQL as if on another host: the service's connections go through a proxy that
    /// delays every byte by this many milliseconds each way (a round trip costs twice that).
    /// The ceilings are measured without it.
    #[arg(long, default_value_t = 0)]
    pub database_delay_ms: u64,
    /// Fixed rates measured besides half of saturation, in percent of saturation
    /// (`--fixed-rates` alone: none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "25,75")]
    pub fixed_rates: Vec<u32>,
    /// The kci-receiver binary to measure (default: `kci-receiver` next to this program, as
    /// `cargo build --release` leaves it in `target/release/`).
    #[arg(long, env = "KCI_RECEIVER_BIN")]
    pub service_binary: Option<PathBuf>,
}
