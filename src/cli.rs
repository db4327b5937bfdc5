//! The command line: one binary, a subcommand per role.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

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
    /// Serve POST /kcis and the operations API.
    Serve,
    /// Apply pending database migrations, then exit.
    Migrate,
    /// Validate the configuration and print it (secrets redacted).
    CheckConfig,
}
