//! `tollgate demo`: everything on the local Redis and Postgres, a bundled OpenAI-style upstream,
//! a demo account with a key, and curl commands to paste.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Json;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::config::Config;

/// The bundled upstream: an OpenAI-compatible chat completion endpoint (JSON, or SSE when the
/// request says `"stream": true`) and a model list.
pub fn upstream_router() -> axum::Router {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/tokens/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
}

async fn models() -> Json<Value> {
    Json(
        json!({"object": "list", "data": [{"id": "demo-1", "object": "model", "owned_by": "tollgate"}]}),
    )
}

async fn chat(body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let prompt = request["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let model = request["model"].as_str().unwrap_or("demo-1").to_string();
    let words: Vec<String> = format!("You said: {prompt}. This answer was metered by tollgate.")
        .split(' ')
        .map(str::to_string)
        .collect();
    let prompt_tokens = (prompt.len() / 4).max(1) as u64;
    let completion_tokens = words.len() as u64;
    let usage = json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    });
    if request["stream"].as_bool() == Some(true) {
        let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
        let stream = async_stream(words, model, usage, include_usage);
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::from_stream(stream))
            .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    }
    Json(json!({
        "id": "chatcmpl-demo",
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": words.join(" ")}, "finish_reason": "stop"}],
        "usage": usage,
    }))
    .into_response()
}

fn async_stream(
    words: Vec<String>,
    model: String,
    usage: Value,
    include_usage: bool,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::convert::Infallible>>(8);
    tokio::spawn(async move {
        let event = |v: Value| Ok(Bytes::from(format!("data: {v}\n\n")));
        for word in words {
            let chunk = json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                "choices": [{"index": 0, "delta": {"content": format!("{word} ")}, "finish_reason": null}]});
            if tx.send(event(chunk)).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let done = json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
        let _ = tx.send(event(done)).await;
        if include_usage {
            let u = json!({"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": usage});
            let _ = tx.send(event(u)).await;
        }
        let _ = tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await;
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// `tollgate demo-upstream`: only the demo model, until SIGTERM or Ctrl-C.
pub async fn serve_upstream(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    eprintln!("listening upstream={addr}");
    let stop = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    axum::serve(listener, upstream_router())
        .with_graceful_shutdown(stop)
        .await
        .context("the demo upstream stopped")?;
    Ok(())
}

/// Binds `preferred`, or any free port when it is taken.
async fn free_addr(preferred: u16) -> SocketAddr {
    for port in [preferred, 0] {
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            if let Ok(addr) = l.local_addr() {
                return addr;
            }
        }
    }
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn demo_config(
    pg_url: &str,
    redis_url: &str,
    prefix: &str,
    upstream: SocketAddr,
    proxy: SocketAddr,
    admin: SocketAddr,
    metrics: SocketAddr,
) -> String {
    format!(
        r#"# Generated by `tollgate demo`.
[server]
listen = "{proxy}"
admin_listen = "{admin}"
metrics_listen = "{metrics}"
shutdown_grace_seconds = 5

[redis]
url = "{redis_url}"
key_prefix = "{prefix}"
shards = 8

[postgres]
url = "{pg_url}"

[admin]
token_env = "TOLLGATE_DEMO_ADMIN_TOKEN"

[[upstreams]]
name = "demo-llm"
url = "http://{upstream}"
set_headers = {{ authorization = "Bearer upstream-secret-the-client-never-sees" }}

[[routes]]
name = "chat"
method = "POST"
path_prefix = "/v1/chat/completions"
upstream = "demo-llm"
action = "ai_message"
cost = 1
feature = "chat"

# The same model priced by the tokens it reports (README "Pricing AI routes"): 0.05 per call,
# 2 per 1k prompt tokens, 10 per 1k completion tokens; 1 credit held until the usage is known.
[[routes]]
name = "chat-tokens"
method = "POST"
path_prefix = "/tokens/v1/chat/completions"
upstream = "demo-llm"
action = "ai_message"
feature = "chat"
pricing = {{ per_request = 0.05, input_per_1k_tokens = 2, output_per_1k_tokens = 10, reserve = 1 }}

[[routes]]
name = "models"
method = "GET"
path_prefix = "/v1/models"
upstream = "demo-llm"
public = true

[tiers.demo]
monthly_credits = 5
requests_per_hour = 100
low_balance_credits = 2
features = ["chat"]

[tiers.pro]
monthly_credits = 1000
features = ["chat"]
price_cents_monthly = 4900
"#
    )
}

/// Replaces the database name of a Postgres URL.
fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let mut u = url::Url::parse(url).context("TOLLGATE_DEMO_PG_URL is not a URL")?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

/// Where the demo keeps its state: a database and a Redis key prefix of its own on the local
/// servers, so `tollgate demo --clean` can remove exactly that. The names can be overridden
/// (`TOLLGATE_DEMO_DB`, `TOLLGATE_DEMO_PREFIX`) so tests run the demo without touching a
/// developer's.
struct DemoStores {
    admin_pg: String,
    redis_url: String,
    db: String,
    prefix: String,
}

const DEFAULT_DB: &str = "tollgate_demo";
const DEFAULT_PREFIX: &str = "tgdemo";

/// An environment variable, or `default` when it is unset or empty.
fn env_or(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_string())
}

impl DemoStores {
    fn from_env() -> anyhow::Result<Self> {
        let stores = DemoStores {
            admin_pg: env_or(
                "TOLLGATE_DEMO_PG_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            redis_url: env_or("TOLLGATE_DEMO_REDIS_URL", "redis://127.0.0.1:6379"),
            db: env_or("TOLLGATE_DEMO_DB", DEFAULT_DB),
            prefix: env_or("TOLLGATE_DEMO_PREFIX", DEFAULT_PREFIX),
        };
        // Both end up in SQL and in SCAN patterns: plain names only.
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        };
        anyhow::ensure!(
            plain(&stores.db),
            "TOLLGATE_DEMO_DB={:?}: use lowercase letters, digits and _",
            stores.db
        );
        anyhow::ensure!(
            plain(&stores.prefix),
            "TOLLGATE_DEMO_PREFIX={:?}: use lowercase letters, digits and _",
            stores.prefix
        );
        Ok(stores)
    }

    /// Where the demo writes its generated config (one directory per prefix).
    fn config_dir(&self) -> std::path::PathBuf {
        if self.prefix == DEFAULT_PREFIX {
            std::env::temp_dir().join("tollgate-demo")
        } else {
            std::env::temp_dir().join(format!("tollgate-demo-{}", self.prefix))
        }
    }

    async fn admin_pool(&self) -> anyhow::Result<sqlx::PgPool> {
        sqlx::PgPool::connect(&self.admin_pg)
            .await
            .with_context(|| {
                format!(
                    "cannot reach Postgres at {} (run scripts/setup)",
                    crate::server::redact(&self.admin_pg)
                )
            })
    }

    async fn database_exists(&self, pool: &sqlx::PgPool) -> anyhow::Result<bool> {
        Ok(
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&self.db)
                .fetch_one(pool)
                .await?,
        )
    }
}

/// `tollgate demo --clean`: drops the demo's database and deletes its Redis keys (its prefix
/// only, found with SCAN so a busy Redis is not blocked), then says what it removed. Stop the
/// demo first: a running one keeps its database open and writes keys again.
pub async fn clean() -> anyhow::Result<()> {
    let stores = DemoStores::from_env()?;

    let pool = stores.admin_pool().await?;
    if stores.database_exists(&pool).await? {
        sqlx::query(&format!("DROP DATABASE \"{}\"", stores.db))
            .execute(&pool)
            .await
            .with_context(|| {
                format!(
                    "cannot drop database {} (is `tollgate demo` still running? stop it first)",
                    stores.db
                )
            })?;
        println!("dropped the Postgres database {}", stores.db);
    } else {
        println!("no Postgres database {} (nothing to drop)", stores.db);
    }
    pool.close().await;

    let client = redis::Client::open(stores.redis_url.as_str()).with_context(|| {
        format!(
            "TOLLGATE_DEMO_REDIS_URL={} is not a Redis URL",
            crate::server::redact(&stores.redis_url)
        )
    })?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| {
            format!(
                "cannot reach Redis at {} (run scripts/setup)",
                crate::server::redact(&stores.redis_url)
            )
        })?;
    let mut deleted = 0usize;
    // Every key tollgate writes is `<prefix>:…` or hash-tagged `{<prefix>:…}…`.
    for pattern in [
        format!("{}:*", stores.prefix),
        format!("{{{}:*", stores.prefix),
    ] {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let n: usize = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await?;
                deleted += n;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    println!(
        "deleted {deleted} Redis key{} with the prefix {} ({}:* and {{{}:*)",
        if deleted == 1 { "" } else { "s" },
        stores.prefix,
        stores.prefix,
        stores.prefix
    );

    let dir = stores.config_dir();
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
        println!("removed {}", dir.display());
    }
    Ok(())
}

pub async fn run() -> anyhow::Result<()> {
    let stores = DemoStores::from_env()?;
    let redis_url = stores.redis_url.clone();

    // The demo database.
    let admin_pool = stores.admin_pool().await?;
    if !stores.database_exists(&admin_pool).await? {
        sqlx::query(&format!("CREATE DATABASE \"{}\"", stores.db))
            .execute(&admin_pool)
            .await?;
    }
    admin_pool.close().await;
    let pg_url = with_database(&stores.admin_pg, &stores.db)?;

    // The bundled upstream.
    let upstream_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream_listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(upstream_listener, upstream_router()).await;
    });

    let proxy = free_addr(8080).await;
    let admin = free_addr(8081).await;
    let metrics = free_addr(9091).await;
    let text = demo_config(
        &pg_url,
        &redis_url,
        &stores.prefix,
        upstream_addr,
        proxy,
        admin,
        metrics,
    );
    let dir = stores.config_dir();
    std::fs::create_dir_all(&dir)?;
    let config_path = dir.join("tollgate.toml");
    std::fs::write(&config_path, &text)?;
    let admin_token = format!("demo-admin-{}", uuid::Uuid::new_v4().simple());
    std::env::set_var("TOLLGATE_DEMO_ADMIN_TOKEN", &admin_token);
    let config = Config::load(&config_path)?;

    // The demo account: a fresh balance and key on every run.
    let pool = crate::server::connect_postgres(&config, true).await?;
    sqlx::query("DELETE FROM accounts WHERE id = 'demo'")
        .execute(&pool)
        .await?;
    sqlx::query("DELETE FROM ledger_entries WHERE account_id = 'demo'")
        .execute(&pool)
        .await?;
    crate::store::accounts::create(&pool, "demo", "demo").await?;
    let (key, prefix, hash) = crate::auth::keys::generate();
    crate::store::keys::insert(
        &pool,
        &crate::auth::keys::new_key_id(),
        "demo",
        "demo key",
        &prefix,
        &hash,
    )
    .await?;
    let (_, mut redis) = crate::server::connect_redis(&config.redis).await?;
    let ledger = crate::ledger::Ledger::new(
        &config.redis.key_prefix,
        config.redis.shards,
        Duration::from_secs(2),
    );
    let k = ledger.keys("demo");
    let _: i64 = redis::cmd("DEL")
        .arg(&k.account)
        .arg(&k.leases)
        .query_async(&mut redis)
        .await?;

    let p = format!("http://{proxy}");
    let a = format!("http://{admin}");
    println!(
        r#"
tollgate demo is running (config: {config})
  proxy    {p}
  admin    {a}   (admin token: {admin_token})
  metrics  http://{metrics}/metrics
  upstream http://{upstream_addr}   (bundled OpenAI-style demo model)

The demo account "demo" is on tier "demo": 5 credits a month, 1 credit per chat call.

  export KEY={key}

  # 1. A metered call: see X-Credits-Charged and X-Credits-Remaining
  curl -si {p}/v1/chat/completions -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
    -d '{{"model":"demo-1","messages":[{{"role":"user","content":"hello"}}]}}'

  # 2. Streaming (SSE), chunk by chunk
  curl -sN {p}/v1/chat/completions -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
    -d '{{"model":"demo-1","stream":true,"messages":[{{"role":"user","content":"stream please"}}]}}'

  # 3. Your balance
  curl -s {p}/_tollgate/v1/balance -H "Authorization: Bearer $KEY"

  # 4. Priced by tokens: 1 credit held (X-Credits-Charged: 1), settled at what the usage says;
  #    streams get stream_options.include_usage added and are settled from the last chunk
  curl -si {p}/tokens/v1/chat/completions -H "Authorization: Bearer $KEY" -H 'content-type: application/json' \
    -d '{{"model":"demo-1","messages":[{{"role":"user","content":"price me by tokens"}}]}}'

  # 5. Spend the rest: once the balance cannot pay for the next call (1 credit), calls answer
  #    402 insufficient_credits, even with a fraction of a credit still left
  for i in 1 2 3 4 5 6; do curl -s -o /dev/null -w '%{{http_code}}\n' {p}/v1/chat/completions \
    -H "Authorization: Bearer $KEY" -H 'content-type: application/json' -d '{{"messages":[]}}'; done
  curl -s {p}/v1/chat/completions -H "Authorization: Bearer $KEY" -d '{{}}'

  # 6. Top up (admin) and look at usage and the journal
  curl -s -X POST {a}/v1/accounts/demo/grants -H "Authorization: Bearer {admin_token}" \
    -H 'content-type: application/json' -d '{{"credits":10,"reason":"demo top-up","idempotency_key":"demo-1"}}'
  curl -s '{a}/v1/accounts/demo/usage?group_by=route' -H "Authorization: Bearer {admin_token}"
  curl -s '{a}/v1/accounts/demo/ledger?limit=5' -H "Authorization: Bearer {admin_token}"

Stop with Ctrl-C. The demo keeps its database {db} and its Redis keys ({prefix}:*, {{{prefix}:*)
between runs; `tollgate demo --clean` (or `scripts/demo --clean`) removes them.
"#,
        config = config_path.display(),
        db = stores.db,
        prefix = stores.prefix,
    );
    crate::server::serve(config, crate::server::ServeOptions { migrate: false })
        .await
        .map_err(anyhow::Error::from)
}
