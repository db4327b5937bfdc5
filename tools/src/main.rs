use clap::Parser;
use kci_receiver::config::{LogFormat, LogSettings};
use kci_tools::cli::{Cli, Command};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The tools talk to a kci-receiver; they need none of its configuration.
    kci_receiver::telemetry::init(&LogSettings {
        format: LogFormat::Text,
        filter: "warn".to_owned(),
    });
    match Cli::parse().command {
        Command::Simulate(args) => kci_tools::simulate(args).await,
        Command::Bench(args) => kci_tools::bench::run(args).await.map(|_| ()),
        Command::BenchReads(args) => kci_tools::bench::reads::run(args).await.map(|_| ()),
        Command::Drill(args) => {
            let findings = kci_tools::drill::run(args).await?;
            if !findings.iter().all(kci_tools::drill::Finding::held) {
                anyhow::bail!("a drill lost acknowledged KCIs or broke per-entity order");
            }
            Ok(())
        }
    }
}
