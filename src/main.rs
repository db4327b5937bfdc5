use clap::Parser;
use kci_receiver::cli::{Cli, Command};
use kci_receiver::config::Settings;
use kci_receiver::startup::Application;
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
        Command::Migrate => {
            let db = store::connect(&settings.database).await?;
            store::migrate(&db).await?;
            tracing::info!("migrations applied");
        }
        Command::CheckConfig => println!("{settings:#?}"),
    }
    Ok(())
}
