//! The command line: subcommands and nothing else. `anyhow` lives only here, at the edge.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "A metering reverse proxy for AI services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy, the admin API, the metrics endpoint and the usage flusher.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
        /// Do not apply Postgres migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Apply the Postgres migrations (idempotent).
    Migrate {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file; exits non-zero naming the field and the reason.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    crate::telemetry::init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if threads > 0 {
        builder.worker_threads(threads);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { config } => {
            let cfg = Config::load(&config)?;
            for missing in &cfg.missing_secrets {
                eprintln!("warning: {}: {missing}", config.display());
            }
            println!(
                "{}: ok ({} upstreams, {} routes, {} tiers, {} credit packs)",
                config.display(),
                cfg.upstreams.len(),
                cfg.routes.len(),
                cfg.tiers.len(),
                cfg.credit_packs.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate { config } => {
            let cfg = Config::load(&config)?;
            runtime(1)?.block_on(async {
                crate::server::connect_postgres(&cfg, true).await?;
                anyhow::Ok(())
            })?;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve { config, no_migrate } => {
            let cfg = Config::load(&config)?;
            let threads = cfg.server.threads;
            runtime(threads)?.block_on(crate::server::serve(
                cfg,
                crate::server::ServeOptions {
                    migrate: !no_migrate,
                },
            ))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
