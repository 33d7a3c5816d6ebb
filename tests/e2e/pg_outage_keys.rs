//! Keys never need Postgres once they exist: with Postgres cut (the `PgGate`), an instance that
//! never saw a key resolves it from its Redis record and debits exactly; revocation and
//! suspension apply in Redis at once on every instance, wait in the Redis auth outbox, and
//! reach Postgres exactly once, in order, when it returns; a revoked key never comes back from
//! a stale Postgres row.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::harness::{poll_until, random_id, scan_prefix, App, TestEnv};
use crate::journal_util::{
    assert_balance_is_journal_sum, assert_caught_up, call, call_ok, ledger_cmd, metered_config,
    PgGate,
};
use crate::upstream::FakeUpstream;

const JWT_SECRET_ENV: &str = "E2E_PG_OUTAGE_JWT_SECRET";
const JWT_SECRET: &str = "pg-outage-keys-e2e-secret-0123456789";

/// Revocation reaches every instance within 2 s; awaited with a generous margin.
const PROPAGATION: Duration = Duration::from_secs(10);

fn outbox(env: &TestEnv) -> String {
    format!("{{{}:outbox}}:auth", env.prefix())
}

async fn outbox_len(env: &TestEnv) -> i64 {
    let mut redis = env.redis().await;
    redis::cmd("XLEN")
        .arg(outbox(env))
        .query_async(&mut redis)
        .await
        .expect("XLEN of the auth outbox")
}

/// The Redis record of a key (found by its hash, which is all Redis holds of it).
async fn key_record_name(env: &TestEnv, key: &str) -> Option<String> {
    let hex = hex::encode(Sha256::digest(key.as_bytes()));
    let mut redis = env.redis().await;
    scan_prefix(&mut redis, env.prefix())
        .await
        .expect("SCAN")
        .into_iter()
        .find(|k| k.ends_with(&format!(":key:{hex}")))
}

async fn status_of(app: &App, key: &str) -> StatusCode {
    call(app, key, "/v1/chat/probe").await.0
}

async fn set_status(app: &App, account: &str, status: &str) {
    let (code, body) = app
        .admin_put(
            &format!("/v1/accounts/{account}/status"),
            json!({"status": status}),
        )
        .await;
    assert_eq!(code, StatusCode::OK, "set {account} {status}: {body}");
    assert_eq!(body["status"], status, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_never_saw_a_key_serves_it_from_redis_during_a_postgres_outage() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = PgGate::start().await;
    let cfg = metered_config(&env, &up.url(), 2)
        .toml(format!(
            "[auth.jwt]\nalgorithms = [\"HS256\"]\naccount_claim = \"org\"\nsecret_env = \"{JWT_SECRET_ENV}\""
        ))
        .env(JWT_SECRET_ENV, JWT_SECRET)
        .postgres_url(gate.url(env.db_url()));
    let a = cfg.spawn().await;
    let b = cfg.spawn().await;
    drop(cfg);
    let pg = env.pg().await;

    // Used on A only: B has never seen it.
    let (used_account, used_key) = a.account_with_key("pro").await;
    assert_eq!(call_ok(&a, &used_key, "/v1/chat/warm").await, 999_750_000);
    // Created just before the outage, never used anywhere.
    let (fresh_account, fresh_key) = a.account_with_key("pro").await;
    assert_caught_up(&env, Some(&a), Duration::from_secs(10)).await;

    gate.cut();
    let mut used = 999_750_000;
    for i in 0..6 {
        let (path, cost) = if i % 3 == 0 {
            ("/v1/tools/x", 1_000_000)
        } else {
            ("/v1/chat/x", 250_000)
        };
        used -= cost;
        assert_eq!(call_ok(&b, &used_key, path).await, used, "call {i} on B");
    }
    let mut fresh = 1_000_000_000;
    for app in [&b, &a] {
        fresh -= 250_000;
        assert_eq!(call_ok(app, &fresh_key, "/v1/chat/x").await, fresh);
    }
    // A JWT caller B never saw: its account's plan comes from the ledger hash in Redis.
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"org": used_account, "exp": chrono::Utc::now().timestamp() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("a token");
    used -= 250_000;
    assert_eq!(call_ok(&b, &token, "/v1/chat/x").await, used, "JWT on B");

    gate.restore();
    assert_caught_up(&env, Some(&a), Duration::from_secs(30)).await;
    for account in [&used_account, &fresh_account] {
        assert_balance_is_journal_sum(&a, &pg, account).await;
    }
    // Redis holds a record of each key, under its hash only: never the key itself.
    for key in [&used_key, &fresh_key] {
        assert!(key_record_name(&env, key).await.is_some(), "no record");
        let mut redis = env.redis().await;
        for name in scan_prefix(&mut redis, env.prefix()).await.expect("SCAN") {
            assert!(!name.contains(key.as_str()), "{name} names the key");
            let dump: Vec<String> = redis::cmd("HVALS")
                .arg(&name)
                .query_async(&mut redis)
                .await
                .unwrap_or_default();
            assert!(!dump.iter().any(|v| v.contains(key.as_str())), "{name}");
        }
    }
    let direct = metered_config(&env, &up.url(), 2);
    let audit = ledger_cmd(&env, &direct, "audit", &[]).await;
    assert!(audit.success(), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_and_suspend_during_a_postgres_outage_hold_everywhere_and_reach_postgres_once() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = PgGate::start().await;
    let cfg = metered_config(&env, &up.url(), 2)
        .toml("[auth]\nkey_cache_ttl_seconds = 1")
        .postgres_url(gate.url(env.db_url()));
    let a = cfg.spawn().await;
    let b = cfg.spawn().await;
    drop(cfg);
    let pg = env.pg().await;

    let account = format!("acct_{}", random_id(10));
    a.create_account(&account, "pro").await;
    let (doomed_id, doomed_key) = a.create_key(&account).await;
    let (_, kept_key) = a.create_key(&account).await;
    let (suspended, suspended_key) = a.account_with_key("pro").await;
    // Every key cached on both instances.
    for app in [&a, &b] {
        for key in [&doomed_key, &kept_key, &suspended_key] {
            call_ok(app, key, "/v1/chat/warm").await;
        }
    }
    assert_caught_up(&env, Some(&a), Duration::from_secs(10)).await;

    gate.cut();
    // Revoked on A: every instance refuses it.
    a.revoke_key(&doomed_id).await;
    for app in [&a, &b] {
        let dead = poll_until(PROPAGATION, || async {
            status_of(app, &doomed_key).await == StatusCode::UNAUTHORIZED
        })
        .await;
        assert!(dead, "the revoked key still works on {}", app.proxy_url(""));
        call_ok(app, &kept_key, "/v1/chat/x").await;
    }
    // Reinstated (a no-op), suspended on B, reinstated, suspended again: the last word holds
    // everywhere, and Postgres ends with it only if the changes land in order.
    set_status(&a, &suspended, "active").await;
    set_status(&b, &suspended, "suspended").await;
    set_status(&a, &suspended, "active").await;
    set_status(&b, &suspended, "suspended").await;
    for app in [&a, &b] {
        let refused = poll_until(PROPAGATION, || async {
            status_of(app, &suspended_key).await == StatusCode::FORBIDDEN
        })
        .await;
        let (code, _, body) = call(app, &suspended_key, "/v1/chat/x").await;
        assert!(refused, "suspended account still served: {code} {body}");
        assert_eq!(body["error"], "account_inactive", "{body}");
    }
    // Postgres has none of it yet; the outbox holds all five changes, in order.
    assert_eq!(outbox_len(&env).await, 5);
    let live: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1")
            .bind(&doomed_id)
            .fetch_one(&pg)
            .await
            .expect("key row");
    assert_eq!(live, None);
    // The in-process caches expire: the records in Redis still say no.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for app in [&a, &b] {
        assert_eq!(status_of(app, &doomed_key).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status_of(app, &suspended_key).await, StatusCode::FORBIDDEN);
    }
    let cut_over = chrono::Utc::now();

    gate.restore();
    let drained = poll_until(Duration::from_secs(30), || async {
        outbox_len(&env).await == 0
    })
    .await;
    assert!(
        drained,
        "auth outbox still holds {}",
        outbox_len(&env).await
    );
    let revoked_at: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("SELECT revoked_at FROM api_keys WHERE id = $1")
            .bind(&doomed_id)
            .fetch_one(&pg)
            .await
            .expect("key row");
    let revoked_at = revoked_at.expect("revoked in postgres after the outage");
    // Stamped with the time of the revocation (during the outage), not of the drain.
    assert!(
        revoked_at < cut_over,
        "revoked_at {revoked_at} >= {cut_over}"
    );
    let (status, updated_at): (String, chrono::DateTime<chrono::Utc>) =
        sqlx::query_as("SELECT status, updated_at FROM accounts WHERE id = $1")
            .bind(&suspended)
            .fetch_one(&pg)
            .await
            .expect("account row");
    assert_eq!(status, "suspended");
    // Written once: later drain rounds change nothing.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let again: (
        Option<chrono::DateTime<chrono::Utc>>,
        chrono::DateTime<chrono::Utc>,
    ) = sqlx::query_as(
        "SELECT k.revoked_at, a.updated_at FROM api_keys k, accounts a
              WHERE k.id = $1 AND a.id = $2",
    )
    .bind(&doomed_id)
    .bind(&suspended)
    .fetch_one(&pg)
    .await
    .expect("rows");
    assert_eq!(again, (Some(revoked_at), updated_at));

    // Redis loses the key's record: the re-fill from Postgres keeps it dead.
    let record = key_record_name(&env, &doomed_key)
        .await
        .expect("the revoked key's record");
    let mut redis = env.redis().await;
    let _: i64 = redis::cmd("DEL")
        .arg(&record)
        .query_async(&mut redis)
        .await
        .expect("DEL");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for app in [&a, &b] {
        assert_eq!(status_of(app, &doomed_key).await, StatusCode::UNAUTHORIZED);
        assert_eq!(status_of(app, &suspended_key).await, StatusCode::FORBIDDEN);
        call_ok(app, &kept_key, "/v1/chat/x").await;
    }
    // A revoked key cannot be revoked twice, and a later reinstatement applies in order.
    let (code, body) = b.admin_delete(&format!("/v1/keys/{doomed_id}")).await;
    assert_eq!(code, StatusCode::NOT_FOUND, "{body}");
    set_status(&a, &suspended, "active").await;
    for app in [&a, &b] {
        let back = poll_until(PROPAGATION, || async {
            status_of(app, &suspended_key).await == StatusCode::OK
        })
        .await;
        assert!(back, "reinstated account still refused");
    }
    let status: String = sqlx::query_scalar("SELECT status FROM accounts WHERE id = $1")
        .bind(&suspended)
        .fetch_one(&pg)
        .await
        .expect("account row");
    assert_eq!(status, "active");

    assert_caught_up(&env, Some(&a), Duration::from_secs(30)).await;
    for acct in [&account, &suspended] {
        assert_balance_is_journal_sum(&a, &pg, acct).await;
    }
    let direct = metered_config(&env, &up.url(), 2);
    let audit = ledger_cmd(&env, &direct, "audit", &[]).await;
    assert!(audit.success(), "{audit}");
}
