//! The scheduled task: partition creation and retention, hourly, with their metrics.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::ConnectionLike;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::{ensure_partitions, prune, EnsureReport, MaintenanceError, PruneReport, EVERY};
use crate::config::Config;
use crate::metrics::Metrics;

const RETRY_AFTER_ERROR: Duration = Duration::from_secs(300);

/// What the background task needs from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaintenanceSettings {
    /// Redis key prefix and shard count: where unflushed journal entries wait.
    pub prefix: String,
    pub shards: u32,
    /// Days of journal kept: the longest `history_days` of all tiers, `None` (keep
    /// everything) when a tier has none.
    pub keep_days: Option<u32>,
    pub every: Duration,
}

impl MaintenanceSettings {
    pub fn from_config(config: &Config) -> Self {
        MaintenanceSettings {
            prefix: config.redis.key_prefix.clone(),
            shards: config.redis.shards,
            keep_days: config.journal_retention_days(),
            every: EVERY,
        }
    }
}

/// What one maintenance run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MaintenanceReport {
    /// `None` in a dry run (partitions are neither checked nor created).
    pub ensure: Option<EnsureReport>,
    pub prune: PruneReport,
}

impl fmt::Display for MaintenanceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ensure) = &self.ensure {
            if ensure.created.is_empty() {
                writeln!(f, "partitions: all present")?;
            } else {
                writeln!(
                    f,
                    "partitions created: {} ({} rows moved out of DEFAULT)",
                    ensure.created.join(", "),
                    ensure.moved_from_default
                )?;
            }
            if ensure.left_in_default > 0 {
                writeln!(
                    f,
                    "{} rows dated outside the years 1-9999 stay in DEFAULT",
                    ensure.left_in_default
                )?;
            }
        }
        write!(f, "{}", self.prune)
    }
}

/// One maintenance run: [`ensure_partitions`], then [`prune`] when retention is on. With
/// `dry_run`, nothing changes: only what retention would roll up is reported.
pub async fn run_once<C: ConnectionLike + Send>(
    pool: &PgPool,
    redis: &mut C,
    settings: &MaintenanceSettings,
    now: DateTime<Utc>,
    dry_run: bool,
) -> Result<MaintenanceReport, MaintenanceError> {
    let ensure = if dry_run {
        None
    } else {
        Some(ensure_partitions(pool, now).await?)
    };
    let prune = match settings.keep_days {
        Some(days) => {
            prune(
                pool,
                redis,
                &settings.prefix,
                settings.shards,
                days,
                now,
                dry_run,
            )
            .await?
        }
        None => PruneReport {
            dry_run,
            ..PruneReport::default()
        },
    };
    Ok(MaintenanceReport { ensure, prune })
}

/// Counters of the background task, registered on the process's registry.
struct MaintenanceMetrics {
    created: prometheus::IntCounter,
    rolled_up: prometheus::IntCounter,
    moved: prometheus::IntCounter,
    errors: prometheus::IntCounter,
    last_success: prometheus::IntGauge,
}

impl MaintenanceMetrics {
    fn new(metrics: Option<&Metrics>) -> Option<Self> {
        let counter = |name: &str, help: &str| prometheus::IntCounter::new(name, help).ok();
        let m = MaintenanceMetrics {
            created: counter(
                "tollgate_journal_partitions_created_total",
                "Monthly journal partitions created by this process's maintenance.",
            )?,
            rolled_up: counter(
                "tollgate_journal_partitions_rolled_up_total",
                "Monthly journal partitions rolled up into carry_forward entries and dropped (retention).",
            )?,
            moved: counter(
                "tollgate_journal_default_rows_moved_total",
                "Journal rows moved out of the DEFAULT partition into their month's partition.",
            )?,
            errors: counter(
                "tollgate_journal_maintenance_errors_total",
                "Journal partition maintenance runs that failed (retried in 5 minutes).",
            )?,
            last_success: prometheus::IntGauge::new(
                "tollgate_journal_maintenance_last_success_timestamp_seconds",
                "When journal partition maintenance last completed (Unix time).",
            )
            .ok()?,
        };
        if let Some(metrics) = metrics {
            let r = &metrics.registry;
            for c in [&m.created, &m.rolled_up, &m.moved, &m.errors] {
                if let Err(e) = r.register(Box::new(c.clone())) {
                    tracing::debug!(error = %e, "journal maintenance metric not registered");
                }
            }
            if let Err(e) = r.register(Box::new(m.last_success.clone())) {
                tracing::debug!(error = %e, "journal maintenance metric not registered");
            }
        }
        Some(m)
    }
}

/// The background task: [`run_once`] at start and then every `settings.every` (5 minutes
/// after a failure) until `stop`. Failures are logged and counted, never fatal: the DEFAULT
/// partition keeps every entry storable meanwhile. Its metrics are registered by this call,
/// not when the task first runs, so they are on `/metrics` before `serve` says it listens.
pub fn run_maintenance<C: ConnectionLike + Send>(
    pool: PgPool,
    redis: C,
    settings: MaintenanceSettings,
    metrics: Option<Arc<Metrics>>,
    stop: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send {
    let m = MaintenanceMetrics::new(metrics.as_deref());
    maintenance_loop(pool, redis, settings, m, stop)
}

async fn maintenance_loop<C: ConnectionLike + Send>(
    pool: PgPool,
    mut redis: C,
    settings: MaintenanceSettings,
    m: Option<MaintenanceMetrics>,
    stop: CancellationToken,
) {
    loop {
        let run = tokio::select! {
            _ = stop.cancelled() => return,
            run = run_once(&pool, &mut redis, &settings, Utc::now(), false) => run,
        };
        let wait = match run {
            Ok(report) => {
                if let Some(m) = &m {
                    let ensure = report.ensure.unwrap_or_default();
                    m.created.inc_by(ensure.created.len() as u64);
                    m.moved.inc_by(ensure.moved_from_default);
                    m.rolled_up.inc_by(report.prune.rolled_up.len() as u64);
                    m.last_success.set(Utc::now().timestamp());
                }
                if let Some(why) = &report.prune.postponed {
                    tracing::info!(reason = %why, "journal retention postponed");
                }
                settings.every
            }
            Err(e) => {
                if let Some(m) = &m {
                    m.errors.inc();
                }
                tracing::warn!(error = %e, "journal partition maintenance failed; retrying later");
                RETRY_AFTER_ERROR.min(settings.every)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compiles only if the background task can be `tokio::spawn`ed with any connection.
    #[allow(dead_code)]
    fn the_background_task_is_spawnable<C: ConnectionLike + Send + 'static>(
        pool: PgPool,
        redis: C,
        settings: MaintenanceSettings,
    ) {
        fn spawnable<T: std::future::Future + Send + 'static>(_: &T) {}
        spawnable(&run_maintenance(
            pool,
            redis,
            settings,
            None,
            CancellationToken::new(),
        ));
    }
}
