//! Postgres: accounts, API keys (and, later, the journal). Never on the hot path: the proxy
//! reaches it only on an auth-cache miss or an account hydration.

pub mod accounts;
pub mod keys;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

use crate::config::PostgresConfig;

/// Migrations compiled into the binary, so `tollgate migrate` needs no files on disk.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connects, failing within a few seconds with the server's own message when it is unreachable.
pub async fn connect(cfg: &PostgresConfig) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = cfg.url.parse()?;
    let options = options.application_name("tollgate");
    PgPoolOptions::new()
        .max_connections(cfg.max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
