//! Liveness and readiness.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::schemas::{Health, HealthStatus, Readiness, ReadinessStatus};

use crate::state::AppState;

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    operation_id = "healthz",
    summary = "Liveness",
    security(()),
    responses((status = 200, description = "The process is up.", body = super::schemas::Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: HealthStatus::Ok,
    })
}

/// Ready when Redis answers within a second: Redis is the data plane. Postgres down does not
/// make an instance unready (it serves from Redis, the journal waits there); the body names it
/// as degraded (`status: "degraded"`, `degraded.postgres: "unavailable since …"`).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    operation_id = "readyz",
    summary = "Readiness",
    description = "Ready when Redis (the data plane) answers `PING` within 1 s. Postgres is probed \
        too (`SELECT 1`, 1 s); while it does not answer the instance still serves from Redis, so it \
        stays ready (200) with `status: degraded` and the dependency named under `degraded`.",
    security(()),
    responses(
        (status = 200, description = "Redis answered; `status` is `ok`, or `degraded` when Postgres did not.",
            body = super::schemas::Readiness,
            example = json!({"status": "degraded", "redis": true, "postgres": false,
                "degraded": {"postgres": "unavailable since 2026-01-01T00:00:00Z"}})),
        (status = 503, description = "Redis did not answer in time.", body = super::schemas::Readiness,
            example = json!({"status": "unavailable", "redis": false, "postgres": true})),
    )
)]
pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Readiness>) {
    let mut redis = state.redis.clone();
    let redis_ok = tokio::time::timeout(
        Duration::from_secs(1),
        redis::cmd("PING").query_async::<String>(&mut redis),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let pg_ok = tokio::time::timeout(
        Duration::from_secs(1),
        sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&state.pg),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    let mut body = Readiness {
        status: ReadinessStatus::Ok,
        redis: redis_ok,
        postgres: pg_ok,
        degraded: None,
    };
    let code = if !redis_ok {
        body.status = ReadinessStatus::Unavailable;
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        if !pg_ok {
            body.status = ReadinessStatus::Degraded;
            let since = state.metrics.postgres_down_since.load(Ordering::Relaxed);
            let since = chrono::DateTime::from_timestamp(since, 0)
                .filter(|_| since > 0)
                .unwrap_or_else(chrono::Utc::now);
            let since = since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            body.degraded = Some(
                [("postgres".to_string(), format!("unavailable since {since}"))]
                    .into_iter()
                    .collect(),
            );
        }
        StatusCode::OK
    };
    (code, Json(body))
}
