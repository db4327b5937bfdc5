use clap::Parser;
use kci_receiver::cli::{Cli, Command, OutboxCommand};
use kci_receiver::config::Settings;
use kci_receiver::outbox::store::{self as outbox_store, Selection};
use kci_receiver::startup::{Application, open_database, run_relay};
use kci_receiver::{store, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load(cli.config.as_deref())?;
    telemetry::init(&settings.log);
    match cli.command {
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
