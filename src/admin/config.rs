//! `POST /v1/config/reload`: the admin side of hot reload ([`crate::reload`]).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::components::Unauthorized;
use super::schemas::ReloadRefused;
use crate::reload::{ReloadError, Reloaded};
use crate::state::AppState;

/// 200 `{"version", "changed"}`; 400 `config_invalid` with `problems` (the lines
/// `check-config` prints) or 400 `restart_required` with `fields`. The old config keeps
/// serving on a 400.
#[utoipa::path(
    post,
    path = "/v1/config/reload",
    tag = "config",
    operation_id = "reloadConfig",
    summary = "Read the config file again and apply it without a restart (like SIGHUP)",
    description = "Reads the file `serve` was started with and validates it exactly as \
        `tollgate check-config` does. A valid file is swapped in atomically: requests in flight \
        finish on the config they started with; the next request sees the new prices, routes, \
        tiers, credit packs, upstreams, `[auth.jwt]` keys, `[stripe]` and `[admin]`. An invalid \
        file, or one that changes a field only a restart applies (listen addresses, `[redis]`, \
        `[postgres]`, `[journal]`, `server.threads`, `auth.key_cache_ttl_seconds`, `[alerts]`), \
        changes nothing and answers 400. Reloads are serialized. Each instance reloads its own \
        file: call every instance (or send each one SIGHUP). No request body is read.",
    responses(
        (status = 200, description = "Applied.", body = Reloaded,
            example = json!({"version": 3, "changed": ["routes.chat", "tiers.pro"]})),
        (status = 400, description = "Nothing changed; the old config keeps serving.",
            body = ReloadRefused, examples(
                ("invalid" = (value = json!({"error": "config_invalid",
                    "message": "the config file is not valid; nothing changed",
                    "problems": ["/etc/tollgate/tollgate.toml: routes[0].upstream: no upstream named \"agnt\" (line 31)"]}))),
                ("restart" = (value = json!({"error": "restart_required",
                    "message": "redis.shards only change with a restart; nothing changed",
                    "fields": ["redis.shards"]}))),
            )),
        (status = 401, response = Unauthorized),
    )
)]
pub async fn reload(State(state): State<Arc<AppState>>) -> Response {
    match crate::reload::reload(&*state).await {
        Ok(reloaded) => {
            tracing::info!(version = reloaded.version, changed = ?reloaded.changed, "config reloaded (admin API)");
            (StatusCode::OK, Json(reloaded)).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "config not reloaded (admin API)");
            let mut body = json!({"error": e.code(), "message": e.to_string()});
            match &e {
                ReloadError::Invalid { problems } => body["problems"] = json!(problems),
                ReloadError::RestartRequired { fields } => body["fields"] = json!(fields),
            }
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
    }
}
