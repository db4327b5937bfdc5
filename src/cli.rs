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
