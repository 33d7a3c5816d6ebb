//! Liveness and readiness.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use crate::state::AppState;

pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// Ready when Redis answers within a second: Redis is the data plane. Postgres down does not
/// make an instance unready (it serves from Redis, the journal waits there); the body names it
/// as degraded (`status: "degraded"`, `degraded.postgres: "unavailable since …"`).
pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Value>) {
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
    let mut body = json!({"status": "ok", "redis": redis_ok, "postgres": pg_ok});
    let code = if !redis_ok {
        body["status"] = json!("unavailable");
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        if !pg_ok {
            body["status"] = json!("degraded");
            let since = state.metrics.postgres_down_since.load(Ordering::Relaxed);
            let since = chrono::DateTime::from_timestamp(since, 0)
                .filter(|_| since > 0)
                .unwrap_or_else(chrono::Utc::now);
            body["degraded"] = json!({"postgres": format!(
                "unavailable since {}",
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )});
        }
        StatusCode::OK
    };
    (code, Json(body))
}
