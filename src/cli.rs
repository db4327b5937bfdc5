//! The command line: one binary, a subcommand per role.

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

#[derive(Debug, Parser)]
#[command(
    name = "kci-receiver",
    version,
    about = "Receives, records and republishes Fibre Cafe KCIs"
)]
pub struct Cli {
    /// An extra configuration file, read after config/default.toml and config/<KCI_ENVIRONMENT>.toml.
    #[arg(long, global = true, env = "KCI_CONFIG_FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve POST /kcis and the operations API (and publish the outbox, with relay.enabled).
    Serve,
    /// Publish the outbox to RabbitMQ, without serving HTTP (run any number on PostgreSQL).
    Relay,
    /// Apply pending database migrations, then exit.
    Migrate,
    /// Validate the configuration and print it (secrets redacted).
    CheckConfig,
    /// Inspect and requeue outbox events.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Send one request to the Tenant API through the egress client (token, headers, recording),
    /// and print the answer: for testing the connection.
    EgressRequest(EgressRequestArgs),
    /// Play the Fibre Cafe gateway against a running kci-receiver: register original requests,
    /// then POST realistic KCI lifecycles (for demos, dashboards and load).
    Simulate(SimulateArgs),
    /// Measure throughput, latency, publish lag, backlog drain, memory and loss against
    /// PostgreSQL and RabbitMQ (and SQLite), and print the figures.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// kci-receiver's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
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
    /// Gateway ids start here.
    #[arg(long, default_value_t = 1_000_000)]
    pub first_gateway_id: u64,
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
    #[arg(long)]
    pub postgres_only: bool,
    /// Fixed rates measured besides half of saturation, in percent of saturation
    /// (`--fixed-rates` alone: none).
    #[arg(long, value_delimiter = ',', num_args = 0.., default_value = "25,75")]
    pub fixed_rates: Vec<u32>,
}

#[derive(Debug, Args)]
pub struct EgressRequestArgs {
    /// GET, POST, PATCH, ...
    pub method: String,
    /// Path under the Tenant API's base URL, with any query string, e.g. `/service-tests/123`.
    pub path: String,
    /// A file with the request body (JSON), or `-` for standard input.
    #[arg(long)]
    pub body: Option<PathBuf>,
    /// Extra headers, `Name: value` (repeatable), e.g. `X-Conversation-ID: abc` or CVT's
    /// `X-Scenario: ORDER_DELAYED`.
    #[arg(long = "header", short = 'H')]
    pub headers: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// List dead events (the broker kept refusing them), oldest first, as JSON lines.
    Dead {
        /// Start after this outbox row id.
        #[arg(long)]
        after: Option<i64>,
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Requeue dead events: one by its event id, or all.
    Retry(RetryArgs),
    /// Publish again (same message ids) the events of an entity, a conversation or a time range.
    Replay(ReplayArgs),
    /// How many events wait to be published, and since when.
    Backlog,
}

#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RetryArgs {
    /// The event id (the AMQP message_id).
    pub event_id: Option<Uuid>,
    /// Every dead event.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// With --gateway-id: the entity's type, e.g. PROVIDE_ORDER.
    #[arg(long, requires = "gateway_id", conflicts_with_all = ["conversation_id", "from"])]
    pub entity_type: Option<String>,
    #[arg(long, requires = "entity_type")]
    pub gateway_id: Option<String>,
    /// Every event of the KCIs that came with this X-Conversation-ID.
    #[arg(long, conflicts_with = "from")]
    pub conversation_id: Option<String>,
    /// With --to: every event created in [from, to), RFC 3339.
    #[arg(long, requires = "to")]
    pub from: Option<DateTime<Utc>>,
    #[arg(long, requires = "from")]
    pub to: Option<DateTime<Utc>>,
}
