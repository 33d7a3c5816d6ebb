//! `serve` never needs Postgres to start: with Postgres cut (the [`PgGate`] black-holes it) a
//! fresh instance binds, says it is degraded, serves from Redis a caller whose account is
//! there (a JWT, and an API key created before the outage that it never saw), debits exactly, refuses the admin calls that need
//! Postgres with a quick 503, and once Postgres is back migrates and writes the journal it
//! kept in Redis exactly once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{metric_value, poll_until, random_id, toml_str, App, ConfigBuilder, TestEnv};
use crate::journal_util::{
    assert_balance_is_journal_sum, assert_caught_up, backlog, call_ok, journal, ledger_cmd,
    metered_config, metric, wait_journal, PgGate,
};
use crate::upstream::FakeUpstream;

const ISSUER: &str = "https://issuer.pg-outage.example/";
const AUDIENCE: &str = "tollgate-e2e";
const SECRET_ENV: &str = "E2E_PG_OUTAGE_JWT_SECRET";
const DURING_OUTAGE: i64 = 12;
/// A generous bound for calls that must not hang (the pool waits 2 s for a connection).
const NO_HANG: Duration = Duration::from_secs(30);

fn jwt_config(env: &TestEnv, up: &FakeUpstream, secret: &str) -> ConfigBuilder {
    metered_config(env, &up.url(), 2)
        .toml(format!(
            "[auth.jwt]\naccount_claim = \"org\"\nissuer = {}\naudience = {}\n\
             algorithms = [\"HS256\"]\nsecret_env = \"{SECRET_ENV}\"\n",
            toml_str(ISSUER),
            toml_str(AUDIENCE)
        ))
        .env(SECRET_ENV, secret)
}

fn token(secret: &str, account: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let claims = json!({
        "org": account, "sub": "user-1", "iss": ISSUER, "aud": AUDIENCE,
        "iat": now, "exp": now + 3600,
    });
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// `/readyz`: 200 (the data plane works) naming Postgres as degraded.
async fn assert_ready_but_degraded(app: &App) -> Value {
    let (status, body) = tokio::time::timeout(NO_HANG, app.admin_get("/readyz"))
        .await
        .expect("/readyz hangs");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "degraded", "{body}");
    assert_eq!(body["redis"], true, "{body}");
    assert_eq!(body["postgres"], false, "{body}");
    let why = body["degraded"]["postgres"].as_str().unwrap_or_default();
    assert!(why.starts_with("unavailable since "), "{body}");
    body
}

/// An admin call that needs Postgres: 503 `store_unavailable` naming it, not a hang.
async fn assert_needs_postgres(app: &App, account: &str) {
    let (status, body) = tokio::time::timeout(
        NO_HANG,
        app.admin_post(
            "/v1/accounts",
            json!({"id": format!("{account}_new"), "tier": "pro"}),
        ),
    )
    .await
    .expect("creating an account hangs while Postgres is down");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "store_unavailable", "{body}");
    assert_eq!(body["dependency"], "postgres", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Postgres"),
        "{body}"
    );
}

/// A metric that must be exported (present), not merely absent-so-zero.
async fn exported(app: &App, name: &str) -> Option<f64> {
    metric_value(&app.metrics_text().await, name, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_instance_starts_serves_and_catches_up_without_postgres() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = PgGate::start().await;
    let secret = format!("jwt-secret-{}", random_id(24));
    let pg = env.pg().await; // direct, not through the gate

    // A first instance (Postgres up) creates the account and serves it once: it is in Redis.
    let account = format!("org_{}", random_id(8));
    let jwt = token(&secret, &account);
    let (mut expected, key) = {
        let first = jwt_config(&env, &up, &secret).spawn().await;
        first.create_account(&account, "pro").await;
        // A key created before the outage and never used: the fresh instance has never seen
        // it, and can only find it in Redis.
        let (_, key) = first.create_key(&account).await;
        let remaining = call_ok(&first, &jwt, "/v1/chat/warm").await;
        assert_eq!(remaining, 999_750_000);
        wait_journal(&pg, &account, Duration::from_secs(10), |j| j.debits == 1).await;
        assert_caught_up(&env, Some(&first), Duration::from_secs(10)).await;
        (remaining, key)
    };
    let rows_before = journal(&pg, &account).await.rows;

    // Postgres cut, then a fresh instance: it starts (spawn waits for `listening`).
    gate.cut();
    let fresh = jwt_config(&env, &up, &secret)
        .postgres_url(gate.url(env.db_url()))
        .spawn()
        .await;
    assert_ready_but_degraded(&fresh).await;
    let down = poll_until(NO_HANG, || async {
        exported(&fresh, "tollgate_postgres_connect_failures_total")
            .await
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    assert!(down, "no failed Postgres connection counted");
    assert_eq!(exported(&fresh, "tollgate_postgres_up").await, Some(0.0));

    // The account in Redis is served and debited exactly.
    for i in 0..DURING_OUTAGE {
        let path = if i % 4 == 0 {
            "/v1/tools/x"
        } else {
            "/v1/chat/x"
        };
        // JWT and API key alternate: both resolve from Redis alone.
        let credential = if i % 2 == 0 { &jwt } else { &key };
        let remaining = call_ok(&fresh, credential, path).await;
        expected -= if i % 4 == 0 { 1_000_000 } else { 250_000 };
        assert_eq!(remaining, expected, "request {i} during the outage");
    }
    assert_needs_postgres(&fresh, &account).await;

    // The backlog waits in Redis, its size and age exported.
    assert_eq!(journal(&pg, &account).await.rows, rows_before);
    assert!(backlog(&env).await.len >= DURING_OUTAGE as u64);
    let aged = poll_until(NO_HANG, || async {
        metric(&fresh, "tollgate_journal_backlog", &[]).await >= DURING_OUTAGE as f64
            && metric(&fresh, "tollgate_journal_backlog_oldest_seconds", &[]).await >= 1.0
    })
    .await;
    assert!(
        aged,
        "backlog {} entries, oldest {} s",
        metric(&fresh, "tollgate_journal_backlog", &[]).await,
        metric(&fresh, "tollgate_journal_backlog_oldest_seconds", &[]).await
    );

    // Postgres back: probed, migrated, the journal written exactly once.
    gate.restore();
    let back = poll_until(NO_HANG, || async {
        exported(&fresh, "tollgate_postgres_up").await == Some(1.0)
    })
    .await;
    assert!(
        back,
        "tollgate_postgres_up stays 0 after Postgres came back"
    );
    assert_caught_up(&env, Some(&fresh), NO_HANG).await;
    let j = wait_journal(&pg, &account, Duration::from_secs(10), |j| {
        j.debits == 1 + DURING_OUTAGE
    })
    .await;
    assert_eq!(j.rows, rows_before + DURING_OUTAGE, "{j:?}");
    assert_eq!(j.total(), expected, "{j:?}");
    assert_balance_is_journal_sum(&fresh, &pg, &account).await;
    let drained = poll_until(NO_HANG, || async {
        metric(&fresh, "tollgate_journal_backlog", &[]).await == 0.0
            && metric(&fresh, "tollgate_journal_backlog_oldest_seconds", &[]).await == 0.0
    })
    .await;
    assert!(drained, "the backlog metrics stay above 0");
    let (status, body) = fresh.admin_get("/readyz").await;
    assert_eq!(
        (status, &body["status"]),
        (StatusCode::OK, &json!("ok")),
        "{body}"
    );

    // Logged once when missing and once when back, not on every retry.
    let logs = fresh.logs();
    assert_eq!(logs.matches("Postgres unavailable").count(), 1, "{logs}");
    assert_eq!(logs.matches("Postgres is back").count(), 1, "{logs}");

    let audit = ledger_cmd(&env, &metered_config(&env, &up.url(), 2), "audit", &[]).await;
    assert!(audit.success(), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_on_an_unreachable_new_database_migrates_once_it_is_back() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = PgGate::start().await;
    gate.cut();
    let app = metered_config(&env, &up.url(), 2)
        .postgres_url(gate.url(env.db_url()))
        .spawn()
        .await;
    assert_ready_but_degraded(&app).await;
    assert_needs_postgres(&app, "acct_x").await;

    let pg = env.pg().await;
    let tables = || async {
        sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass('_sqlx_migrations')::text")
            .fetch_one(&pg)
            .await
            .unwrap()
    };
    assert_eq!(tables().await, None, "migrated through a cut gate?");

    gate.restore();
    let migrated = poll_until(NO_HANG, || async {
        app.logs().contains("migrations applied")
    })
    .await;
    assert!(migrated, "never migrated: {}", app.logs());
    assert!(tables().await.is_some());
    let ok = poll_until(NO_HANG, || async {
        app.admin_post("/v1/accounts", json!({"id": "acct_after", "tier": "pro"}))
            .await
            .0
            == StatusCode::CREATED
    })
    .await;
    assert!(ok, "creating an account fails after Postgres came back");
    let (_, key) = app.create_key("acct_after").await;
    assert_eq!(call_ok(&app, &key, "/v1/tools/x").await, 999_000_000);
}
