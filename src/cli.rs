//! The command line: one binary, a subcommand per role, and what each subcommand does
//! (`main.rs` only parses the arguments and calls [`run`]).

use std::path::PathBuf;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::config::{Needs, Settings};
use crate::outbox::store::{self as outbox_store, Selection};
use crate::startup::{Application, open_database, run_relay};
use crate::{store, telemetry};

#[derive(Debug, Parser)]
#[command(
    name = "kci-receiver",
    version,
    about = "Receives, records and republishes Fibre Cafe KCIs"
)]
pub struct Cli {
    /// An extra configuration file, read after the compiled-in defaults and
    /// config/<KCI_ENVIRONMENT>.toml.
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
    /// Probe a running instance's /readyz (the container image's HEALTHCHECK: no curl needed):
    /// exit 0 when ready, 1 otherwise.
    Healthcheck(HealthcheckArgs),
    /// Send one request to the Tenant API through the egress client (token, headers, recording),
    /// and print the answer: for testing the connection.
    EgressRequest(EgressRequestArgs),
    /// Reconcile with the Tenant API now (gap repair): one entity, or every entity with an open
    /// gap. KCIs the gateway never delivered are recorded and published as recovered. Prints
    /// each reconciliation as a JSON line; exits 1 if any failed. Needs [egress] configured.
    Reconcile(ReconcileArgs),
    /// Delete what the [retention] periods let go (audit records, published outbox events, raw
    /// bodies of finished entities), in small batches; prints what went, as JSON.
    Prune {
        /// Count what would go, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The entity's type, e.g. PROVIDE_ORDER (with --gateway-id).
    #[arg(long, requires = "gateway_id", conflicts_with = "all_gaps")]
    pub entity_type: Option<String>,
    /// The entity's gateway id (`entity.id`), also one never seen here.
    #[arg(long, requires = "entity_type")]
    pub gateway_id: Option<String>,
    /// Every entity with an open gap, however recent, oldest first, at most
    /// reconcile.max_per_minute per minute.
    #[arg(long)]
    pub all_gaps: bool,
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

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// What to probe (default: `/readyz` on this instance's metrics port when `metrics.port` is
    /// set, else on `server.port`, at 127.0.0.1).
    #[arg(long)]
    pub url: Option<String>,
    /// Give up after this many milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
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
    /// Do not publish a dead event: its entity's later events, which wait behind it, go on.
    /// Recorded on the event (who, when, why).
    Skip {
        /// The event id (the AMQP message_id).
        event_id: Uuid,
        /// Why, kept on the event.
        #[arg(long)]
        reason: Option<String>,
    },
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

/// Runs one subcommand to its end.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let needs = match &cli.command {
        Command::Serve | Command::CheckConfig | Command::EgressRequest(_) => Needs::Everything,
        Command::Relay => Needs::Publishing,
        Command::Reconcile(_) => Needs::Reconciling,
        Command::Migrate | Command::Outbox(_) | Command::Healthcheck(_) | Command::Prune { .. } => {
            Needs::Database
        }
    };
    let settings = Settings::load_for(cli.config.as_deref(), needs)?;
    if let Command::Healthcheck(args) = &cli.command {
        // Quiet: its output is a container runtime's health log.
        return healthcheck(&settings, args).await;
    }
    let _telemetry = telemetry::init(&settings.log);
    match cli.command {
        Command::Serve => {
            Application::build(settings)
                .await?
                .run_until_stopped()
                .await?
        }
        Command::Relay => run_relay(settings).await?,
        Command::Migrate => {
            let db = store::connect_for(&settings.database, store::Purpose::Maintenance).await?;
            store::migrate(&db).await?;
            tracing::info!("migrations applied");
        }
        Command::CheckConfig => println!("{settings:#?}"),
        Command::Outbox(command) => outbox(settings, command).await?,
        Command::Healthcheck(_) => unreachable!("answered above"),
        Command::EgressRequest(args) => egress_request(settings, args).await?,
        Command::Reconcile(args) => reconcile(settings, args).await?,
        Command::Prune { dry_run } => {
            use crate::store::retention;
            if !settings.retention.any() {
                eprintln!(
                    "no retention period is set ([retention] audit_log_days, published_events_days, finished_raw_bodies_days): nothing goes"
                );
            }
            let db = open_database(&settings).await?;
            let now = Utc::now();
            let pruned = match dry_run {
                true => retention::dry_run(&db, &settings.retention, now).await?,
                false => retention::prune(&db, &settings.retention, now).await?,
            };
            println!("{}", serde_json::to_string(&pruned)?);
        }
    }
    Ok(())
}

async fn egress_request(settings: Settings, args: EgressRequestArgs) -> anyhow::Result<()> {
    use std::io::Read;

    use crate::egress::{EgressClient, Outbound, creates_something, record_original_request};
    settings.validate()?;
    if settings.egress.upstream_base_url.is_empty() || settings.egress.token_url.is_empty() {
        anyhow::bail!(
            "set egress.upstream_base_url, egress.token_url, egress.client_id and egress.client_secret"
        );
    }
    let client = EgressClient::new(&settings.egress)?;
    let body = match &args.body {
        None => Vec::new(),
        Some(path) if path.as_os_str() == "-" => {
            let mut buffer = Vec::new();
            std::io::stdin().read_to_end(&mut buffer)?;
            buffer
        }
        Some(path) => std::fs::read(path)?,
    };
    let mut headers = vec![("content-type".to_owned(), b"application/json".to_vec())];
    for header in &args.headers {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("--header {header:?}: expected `Name: value`"))?;
        headers.push((name.trim().to_owned(), value.trim().as_bytes().to_vec()));
    }
    let outbound = Outbound {
        method: args.method.to_uppercase().parse()?,
        path_and_query: args.path.clone(),
        headers,
        body: body.into(),
    };
    let upstream = client.send(&outbound).await?;
    let status = upstream.response.status();
    println!("HTTP {status}");
    println!("x-request-id: {}", upstream.request_id);
    println!("x-conversation-id: {}", upstream.conversation_id);
    for (name, value) in upstream.response.headers() {
        println!("{name}: {}", String::from_utf8_lossy(value.as_bytes()));
    }
    let bytes = upstream.response.bytes().await?;
    println!();
    println!("{}", String::from_utf8_lossy(&bytes));
    if status.is_success() && creates_something(&outbound.method, outbound.path()) {
        let db = open_database(&settings).await?;
        let registration = record_original_request(
            &db,
            &outbound,
            &upstream.request_id,
            &upstream.conversation_id,
            status.as_u16(),
            &bytes,
        )
        .await?;
        eprintln!(
            "recorded as the original request of conversation {} ({} waiting entities matched)",
            upstream.conversation_id, registration.matched_entities
        );
    }
    Ok(())
}

async fn reconcile(settings: Settings, args: ReconcileArgs) -> anyhow::Result<()> {
    use entity::reconciliation::{ReconcileOutcome, ReconcileTrigger};

    use crate::operations::queries::Family;
    use crate::reconcile::{ReconcileError, Reconciler, Target, store as reconcile_store};
    if !settings.egress.enabled {
        anyhow::bail!(
            "reconciliation asks the Tenant API: set egress.enabled, egress.upstream_base_url, egress.token_url, egress.client_id and egress.client_secret"
        );
    }
    let aliases = settings.kci.aliases();
    let targets: Vec<Target> = match (&args.entity_type, &args.gateway_id, args.all_gaps) {
        (Some(entity_type), Some(gateway_id), false) => {
            let listed = crate::kci::EntityType::from_wire(entity_type)
                .or_else(|| aliases.get(entity_type).copied())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "--entity-type {entity_type}: not a listed entity type (PROVIDE_ORDER, CEASE_ORDER, MODIFY_ORDER, UNSOLICITED_CEASE_ORDER, PROVIDE_ETHERNET_ORDER, SERVICE_TEST, SERVICE_PROBLEM) or an alias"
                    )
                })?;
            vec![Target {
                family: Family::of(listed),
                gateway_id: gateway_id.clone(),
            }]
        }
        (None, None, true) => Vec::new(),
        _ => anyhow::bail!("give --entity-type and --gateway-id, or --all-gaps"),
    };
    let db = open_database(&settings).await?;
    let targets = if args.all_gaps {
        reconcile_store::open_gaps(&db, 100_000)
            .await?
            .iter()
            .filter_map(Target::of)
            .collect()
    } else {
        targets
    };
    let client = std::sync::Arc::new(crate::egress::EgressClient::new(&settings.egress)?);
    let reconciler = Reconciler::new(db, client, settings.reconcile.clone(), aliases)
        .notifying_other_processes(true);
    let pause = std::time::Duration::from_secs(60) / settings.reconcile.max_per_minute.max(1);
    let mut failed = 0usize;
    for (index, target) in targets.iter().enumerate() {
        if index > 0 {
            tokio::time::sleep(pause).await;
        }
        match reconciler
            .reconcile(target, ReconcileTrigger::OnDemand, Some("cli"))
            .await
        {
            Ok(done) => {
                if matches!(
                    done.outcome,
                    ReconcileOutcome::Failed | ReconcileOutcome::NotFound
                ) {
                    failed += 1;
                }
                println!("{}", serde_json::to_string(&done)?);
            }
            Err(ReconcileError::Busy) => {
                eprintln!(
                    "{} {}: being reconciled by another instance right now; skipped",
                    target.family.resource(),
                    target.gateway_id
                );
            }
            Err(error) => return Err(error.into()),
        }
    }
    eprintln!("{} reconciled, {failed} failed", targets.len());
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}

async fn outbox(settings: Settings, command: OutboxCommand) -> anyhow::Result<()> {
    let db = open_database(&settings).await?;
    let selection = match command {
        OutboxCommand::Dead { after, limit } => {
            for event in outbox_store::dead_events(&db, after, limit).await? {
                println!("{}", serde_json::to_string(&event)?);
            }
            return Ok(());
        }
        OutboxCommand::Backlog => {
            let (pending, oldest) = outbox_store::backlog(&db).await?;
            println!(
                "{}",
                serde_json::json!({"pending": pending, "oldestPendingCreatedAt": oldest})
            );
            return Ok(());
        }
        OutboxCommand::Skip { event_id, reason } => {
            let operator = std::env::var("USER").unwrap_or_else(|_| "command line".to_owned());
            let skipped =
                outbox_store::skip_dead(&db, event_id, &operator, reason.as_deref()).await?;
            if !skipped {
                anyhow::bail!("no dead event {event_id}");
            }
            println!("{}", serde_json::json!({"skipped": 1}));
            return Ok(());
        }
        OutboxCommand::Retry(retry) => match retry.event_id {
            Some(event_id) => Selection::DeadEvent(event_id),
            None => Selection::AllDead,
        },
        OutboxCommand::Replay(replay) => Selection::replay(
            replay.entity_type,
            replay.gateway_id,
            replay.conversation_id,
            replay.from,
            replay.to,
        )
        .map_err(|problem| anyhow::anyhow!(problem))?,
    };
    let requeued = outbox_store::requeue_and_notify(&db, &selection).await?;
    println!("{}", serde_json::json!({"requeued": requeued}));
    Ok(())
}

/// `kci-receiver healthcheck`: `/readyz` answered 200 within the timeout, or an error (exit 1).
async fn healthcheck(settings: &Settings, args: &HealthcheckArgs) -> anyhow::Result<()> {
    let url = args.url.clone().unwrap_or_else(|| {
        let port = settings.metrics.port.unwrap_or(settings.server.port);
        format!("http://127.0.0.1:{port}/readyz")
    });
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(args.timeout_ms))
        .build()?;
    let response = client.get(&url).send().await?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status.is_success() {
        println!("ready: {body}");
        Ok(())
    } else {
        anyhow::bail!("{url} answered {status}: {body}")
    }
}
