use clap::Parser;
use kci_receiver::cli::{Cli, Command, EgressRequestArgs, OutboxCommand, SimulateArgs};
use kci_receiver::config::Settings;
use kci_receiver::outbox::store::{self as outbox_store, Selection};
use kci_receiver::startup::{Application, open_database, run_relay};
use kci_receiver::{store, telemetry};

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

/// glibc gives every allocating thread its own malloc arena (up to 8 per core), and actix
/// workers, tokio, the database connections' threads and the AMQP I/O all allocate: resident
/// memory grows with arenas, not with work (measured by `kci-receiver bench`: peak 171 MB on
/// SQLite, 95 MB with two arenas). Two are plenty. It must happen before any thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only changes allocator tuning; it is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The load tools talk to a kci-receiver; they need none of its configuration.
    let quiet = kci_receiver::config::LogSettings {
        format: kci_receiver::config::LogFormat::Text,
        filter: "warn".to_owned(),
    };
    match cli.command {
        Command::Simulate(args) => {
            telemetry::init(&quiet);
            return simulate(args).await;
        }
        Command::Bench(args) => {
            telemetry::init(&quiet);
            return kci_receiver::bench::run(args).await;
        }
        _ => {}
    }
    let settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log);
    match cli.command {
        Command::Simulate(_) | Command::Bench(_) => unreachable!("handled above"),
        Command::Serve => {
            Application::build(settings)
                .await?
                .run_until_stopped()
                .await?
        }
        Command::Relay => run_relay(settings).await?,
        Command::Migrate => {
            let db = store::connect(&settings.database).await?;
            store::migrate(&db).await?;
            tracing::info!("migrations applied");
        }
        Command::CheckConfig => println!("{settings:#?}"),
        Command::Outbox(command) => outbox(settings, command).await?,
        Command::EgressRequest(args) => egress_request(settings, args).await?,
    }
    Ok(())
}

async fn egress_request(settings: Settings, args: EgressRequestArgs) -> anyhow::Result<()> {
    use std::io::Read;

    use kci_receiver::egress::{
        EgressClient, Outbound, creates_something, record_original_request,
    };
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
        OutboxCommand::Retry(retry) => match retry.event_id {
            Some(event_id) => Selection::DeadEvent(event_id),
            None => Selection::AllDead,
        },
        OutboxCommand::Replay(replay) => {
            match (
                replay.entity_type,
                replay.gateway_id,
                replay.conversation_id,
                replay.from,
                replay.to,
            ) {
                (Some(entity_type), Some(gateway_id), None, None, None) => Selection::Entity {
                    entity_type,
                    gateway_id,
                },
                (None, None, Some(conversation_id), None, None) => {
                    Selection::Conversation(conversation_id)
                }
                (None, None, None, Some(from), Some(to)) if from < to => {
                    Selection::TimeRange { from, to }
                }
                _ => anyhow::bail!(
                    "give one of: --entity-type with --gateway-id, --conversation-id, or --from with --to"
                ),
            }
        }
    };
    let requeued = outbox_store::requeue_and_notify(&db, &selection).await?;
    println!("{}", serde_json::json!({"requeued": requeued}));
    Ok(())
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    use kci_receiver::simulator::{Options, run};
    let options = Options {
        base_url: args.url.trim_end_matches('/').to_owned(),
        gateway_user: args.gateway_user,
        gateway_password: args.gateway_password,
        admin: args
            .admin_password
            .map(|password| (args.admin_user, password)),
        egress_prefix: args.via_egress,
        orders: args.orders,
        ethernet_orders: args.ethernet_orders,
        unsolicited_ceases: args.unsolicited_ceases,
        tests: args.tests,
        problems: args.problems,
        concurrency: args.concurrency,
        rate: args.rate,
        duration: args.duration_seconds.map(std::time::Duration::from_secs),
        seed: args.seed,
        redelivery_chance: args.redeliveries,
        out_of_order_chance: args.out_of_order,
        gap_chance: args.gaps,
        late_registration_chance: args.late_registrations,
        first_gateway_id: args.first_gateway_id,
    };
    let tenant_api = match &args.serve_tenant_api {
        Some(address) => {
            let api = kci_receiver::simulator::tenant_api::SimulatedTenantApi::start(address)?;
            println!(
                "simulated Tenant API at {0}: egress.upstream_base_url = {0}/v1, egress.token_url = {0}/token",
                api.base_url
            );
            Some(api)
        }
        None => None,
    };
    let report = run(options).await?;
    println!("{}", report.summary());
    if let Some(api) = tenant_api {
        println!(
            "simulated Tenant API: {} creating calls answered, {} tokens issued",
            api.created(),
            api.tokens_issued()
        );
    }
    Ok(())
}
