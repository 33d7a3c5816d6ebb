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
    /// Start everything on the local Redis and Postgres with a bundled demo upstream, a demo
    /// account and key, and print curl commands to try.
    Demo {
        /// Instead: drop the demo's database and delete its Redis keys (what a run leaves).
        #[arg(long)]
        clean: bool,
    },
    /// Serve only the bundled OpenAI-style demo model (what `demo` proxies to), e.g. as the
    /// upstream of a compose or Kubernetes trial deployment.
    DemoUpstream {
        /// Address to listen on; port 0 picks a free one (printed as `listening upstream=…`).
        #[arg(long, default_value = "127.0.0.1:7001")]
        listen: std::net::SocketAddr,
    },
    /// The journal: audit live balances against it, or restore them from it.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// The Postgres journal's monthly partitions and retention.
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Load-test a deployment over HTTP/1.1: open loop at a fixed `--rate` (latency from each
    /// request's due time) or closed loop over `--connections`; prints HDR latency percentiles,
    /// throughput and status counts (`--json` for machines).
    Loadtest(Box<crate::loadtest::Args>),
    /// Print the admin API's OpenAPI document (YAML), generated from the handlers; this is
    /// what `docs/openapi.yaml` must hold.
    Openapi,
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Compare every account's live Redis balance with its journal (plus unflushed entries);
    /// exits non-zero and lists the accounts that drift.
    Audit {
        #[arg(long, short)]
        config: PathBuf,
        /// Only this account.
        #[arg(long)]
        account: Option<String>,
    },
    /// Set live Redis balances to what the journal says (all accounts, or one).
    Rebuild {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        account: Option<String>,
    },
    /// Apply again the purchases, clawbacks and grants recorded in Postgres (last 7 days) that
    /// Redis lost before their journal entry was written (what `serve` does every
    /// `journal.reconcile_after_seconds`); prints each one.
    Reconcile {
        #[arg(long, short)]
        config: PathBuf,
        /// Only credits recorded at least this long ago.
        #[arg(long, default_value_t = 60)]
        older_than_seconds: u64,
        /// Say what would be re-applied, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Create the coming months' partitions and roll up the months every tier's
    /// `history_days` has let go of (what `serve` does hourly); prints what it did.
    Prune {
        #[arg(long, short)]
        config: PathBuf,
        /// Say what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // `serve` installs its logging once its config is read ([telemetry]).
    if !matches!(cli.command, Command::Serve { .. }) {
        crate::telemetry::init();
    }
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
        Command::Openapi => {
            print!("{}", crate::admin::openapi::yaml()?);
            Ok(ExitCode::SUCCESS)
        }
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
        Command::Demo { clean: true } => {
            runtime(1)?.block_on(crate::demo::clean())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { clean: false } => {
            runtime(0)?.block_on(crate::demo::run())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::DemoUpstream { listen } => {
            runtime(0)?.block_on(crate::demo::serve_upstream(listen))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ledger { command } => match command {
            LedgerCommand::Audit { config, account } => {
                runtime(2)?.block_on(ledger_command(Config::load(&config)?, account, false))
            }
            LedgerCommand::Rebuild { config, account } => {
                runtime(2)?.block_on(ledger_command(Config::load(&config)?, account, true))
            }
            LedgerCommand::Reconcile {
                config,
                older_than_seconds,
                dry_run,
            } => {
                let cfg = Config::load(&config)?;
                runtime(2)?.block_on(reconcile_command(cfg, older_than_seconds, dry_run))
            }
        },
        Command::Journal {
            command: JournalCommand::Prune { config, dry_run },
        } => {
            let cfg = Config::load(&config)?;
            runtime(2)?.block_on(async {
                let (pg, mut redis) = cli_stores(&cfg).await?;
                let settings = crate::journal::partitions::MaintenanceSettings::from_config(&cfg);
                let report = crate::journal::partitions::run_once(
                    &pg,
                    &mut redis,
                    &settings,
                    chrono::Utc::now(),
                    dry_run,
                )
                .await?;
                print!("{report}");
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Loadtest(args) => Ok(crate::loadtest::run_cli(*args)?),
        Command::Serve { config, no_migrate } => {
            let cfg = Config::load(&config)?;
            // Before the runtime: the trace exporter's blocking client lives on plain threads.
            let telemetry = crate::telemetry::init_serve(&cfg.telemetry)?;
            let threads = cfg.server.threads;
            let served = runtime(threads)?.block_on(crate::server::serve(
                cfg,
                crate::server::ServeOptions {
                    migrate: !no_migrate,
                },
            ));
            // The runtime is gone; send the spans still queued.
            telemetry.shutdown();
            served?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn reconcile_command(
    cfg: Config,
    older_than_seconds: u64,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let (pg, mut redis) = cli_stores(&cfg).await?;
    let report = crate::ledger::reconcile::run_once(
        &cli_ledger(&cfg),
        &mut redis,
        &pg,
        &cfg,
        std::time::Duration::from_secs(older_than_seconds),
        dry_run,
    )
    .await?;
    print!("{report}");
    Ok(ExitCode::SUCCESS)
}

/// Exit code of `ledger audit`/`rebuild --account ID` for an account that does not exist:
/// apart from 1 (drift, or a failure), so a script can tell a typo from a broken ledger.
const NO_SUCH_ACCOUNT: u8 = 2;

async fn ledger_command(
    cfg: Config,
    account: Option<String>,
    rebuild: bool,
) -> anyhow::Result<ExitCode> {
    use crate::journal::audit::Auditor;
    let (pg, redis) = cli_stores(&cfg).await?;
    let ledger = cli_ledger(&cfg);
    let mut auditor = Auditor::new(&ledger, &pg, redis);
    let accounts = match auditor.accounts(account.as_deref()).await {
        Ok(accounts) => accounts,
        Err(crate::ledger::LedgerError::NoSuchAccount(id)) => {
            eprintln!("error: no account {id:?} (neither in Postgres nor in Redis)");
            return Ok(ExitCode::from(NO_SUCH_ACCOUNT));
        }
        Err(e) => return Err(e.into()),
    };
    let (mut drifting, mut unflushed, mut not_loaded) = (0usize, 0usize, 0usize);
    for id in &accounts {
        if rebuild {
            match auditor.rebuild(id).await? {
                Some(row) => {
                    let (a, p) = row.expected();
                    if row.drifts() {
                        println!(
                            "{id}: restored allowance {a} purchased {p} (was {} / {})",
                            row.redis.map_or(String::new(), |r| r.0.to_string()),
                            row.redis.map_or(String::new(), |r| r.1.to_string())
                        );
                        drifting += 1;
                    }
                }
                None => not_loaded += 1,
            }
            continue;
        }
        let row = auditor.audit(id).await?;
        unflushed += row.unflushed;
        match row.redis {
            None => not_loaded += 1,
            Some((a, p)) if row.drifts() => {
                drifting += 1;
                let (ea, ep) = row.expected();
                println!(
                    "DRIFT {id}: redis allowance {a} purchased {p}; journal allowance {ea} purchased {ep} ({} unflushed entries); difference {}",
                    row.unflushed,
                    (a + p) - (ea + ep)
                );
            }
            Some(_) => {}
        }
    }
    if rebuild {
        println!(
            "rebuild: {} accounts, {drifting} restored, {not_loaded} not loaded in Redis",
            accounts.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "audit: {} accounts, {drifting} drifting, {not_loaded} not loaded in Redis, {unflushed} journal entries not yet flushed",
        accounts.len()
    );
    Ok(if drifting > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Postgres (no migrations) and Redis for the maintenance commands, with a generous Redis
/// timeout: they run beside live traffic.
async fn cli_stores(cfg: &Config) -> anyhow::Result<(sqlx::PgPool, crate::redis_conn::RedisConn)> {
    let pg = crate::server::connect_postgres(cfg, false).await?;
    let (_, redis) =
        crate::server::connect_redis_with_timeout(&cfg.redis, std::time::Duration::from_secs(30))
            .await?;
    Ok((pg, redis))
}

/// The ledger as the CLI's commands use it (a generous timeout: they run beside live traffic).
fn cli_ledger(cfg: &Config) -> crate::ledger::Ledger {
    crate::ledger::Ledger::new(
        &cfg.redis.key_prefix,
        cfg.redis.shards,
        std::time::Duration::from_secs(5),
    )
}
