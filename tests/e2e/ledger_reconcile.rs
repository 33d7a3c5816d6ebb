//! Credits Redis lost: a purchase or grant recorded in Postgres whose credit, idempotency mark
//! and stream entry vanished together before the flusher wrote the entry, which is what a
//! failover does to a write its replica had not received yet (the script's effects replicate
//! as one unit). The state is set up by hand from a real purchase and real grants: Redis
//! rewound by exactly the credit and its mark, the not-yet-flushed journal row removed. The
//! ledger then agrees with itself (`ledger audit` is clean) although the customer paid;
//! reconciliation finds the credit from the Postgres record and applies it once.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::fake_stripe::FakeStripe;
use crate::harness::{poll_until, App, ConfigBuilder, TestEnv};
use crate::journal_util::{
    account_hash, account_stream, assert_balance_is_journal_sum, assert_caught_up, balance,
    ledger_cmd, metric, rows_with_id, xadd,
};
use crate::ledger_util::grant;
use crate::stripe_util::{charge, deliver_ok, event, id, now, pack_session, stripe_config};
use crate::upstream::FakeUpstream;

const C: i64 = 1_000_000;
/// 10 monthly + a pack of 110 + grants of 5 and 7 − a quarter of the pack clawed back (27.5).
const TOTAL: i64 = (10 + 110 + 5 + 7) * C - 27_500_000;

/// The idempotency mark of a credit: `{<prefix>:s<N>}:seen:<entry id>`.
fn mark_key(env: &TestEnv, account: &str, entry_id: &str) -> String {
    let hash = account_hash(env, account);
    let tag = &hash[..=hash.find('}').unwrap_or(0)];
    format!("{tag}:seen:{entry_id}")
}

/// The journal row of `entry_id` as `(d_allowance, d_purchased)`.
async fn entry_deltas(pg: &sqlx::PgPool, entry_id: &str) -> (i64, i64) {
    sqlx::query_as("SELECT d_allowance, d_purchased FROM ledger_entries WHERE entry_id = $1")
        .bind(entry_id)
        .fetch_one(pg)
        .await
        .unwrap_or_else(|e| panic!("journal row {entry_id}: {e}"))
}

/// What a failover does to a credit whose stream entry was not flushed yet: Redis loses the
/// credit and its mark, and the journal never gets the row.
async fn lose_credit(env: &TestEnv, pg: &sqlx::PgPool, account: &str, entry_id: &str) {
    let deltas = entry_deltas(pg, entry_id).await;
    rewind(env, account, entry_id, deltas).await;
    delete_row(pg, entry_id).await;
}

/// The same loss, while a flusher had already read the entry: it writes the original late
/// (here: the entry goes back into the stream for the next flusher).
async fn lose_credit_held_by_a_flusher(
    env: &TestEnv,
    pg: &sqlx::PgPool,
    account: &str,
    entry_id: &str,
) {
    let deltas = entry_deltas(pg, entry_id).await;
    unflush(env, pg, account, entry_id).await;
    rewind(env, account, entry_id, deltas).await;
}

/// Takes a credit and its mark out of Redis, atomically.
async fn rewind(
    env: &TestEnv,
    account: &str,
    entry_id: &str,
    (d_allowance, d_purchased): (i64, i64),
) {
    let mut redis = env.redis().await;
    let hash = account_hash(env, account);
    let _: () = redis::pipe()
        .atomic()
        .cmd("HINCRBY")
        .arg(&hash)
        .arg("allowance")
        .arg(-d_allowance)
        .ignore()
        .cmd("HINCRBY")
        .arg(&hash)
        .arg("purchased")
        .arg(-d_purchased)
        .ignore()
        .cmd("DEL")
        .arg(mark_key(env, account, entry_id))
        .ignore()
        .query_async(&mut redis)
        .await
        .expect("rewinding Redis");
}

async fn delete_row(pg: &sqlx::PgPool, entry_id: &str) {
    sqlx::query("DELETE FROM ledger_entries WHERE entry_id = $1")
        .bind(entry_id)
        .execute(pg)
        .await
        .expect("deleting the journal row");
}

/// A credit that Redis kept but whose stream entry the flusher has not written yet: the row
/// goes back into the shard stream (as the credit script wrote it) and out of the journal.
async fn unflush(env: &TestEnv, pg: &sqlx::PgPool, account: &str, entry_id: &str) {
    let row: (String, i64, i64, i64, i64, i64, String, i64) = sqlx::query_as(
        "SELECT kind, amount, d_allowance, d_purchased, allowance_after, purchased_after,
                COALESCE(reason, ''), (extract(epoch FROM created_at) * 1000)::BIGINT
           FROM ledger_entries WHERE entry_id = $1",
    )
    .bind(entry_id)
    .fetch_one(pg)
    .await
    .expect("reading the row");
    let (kind, amount, d_allow, d_purch, allow, purch, reason, ts) = row;
    let mut redis = env.redis().await;
    xadd(
        &mut redis,
        &account_stream(env, account),
        &[
            ("id", entry_id.to_string()),
            ("acct", account.to_string()),
            ("kind", kind),
            ("amount", amount.to_string()),
            ("d_allow", d_allow.to_string()),
            ("d_purch", d_purch.to_string()),
            ("allow", allow.to_string()),
            ("purch", purch.to_string()),
            ("route", String::new()),
            ("action", String::new()),
            ("req", String::new()),
            ("reason", reason),
            ("ts", ts.to_string()),
        ],
    )
    .await;
    delete_row(pg, entry_id).await;
}

/// A Stripe config whose background reconciliation runs every `seconds`.
fn config(env: &TestEnv, stripe: &FakeStripe, up: &FakeUpstream, seconds: u64) -> ConfigBuilder {
    stripe_config(env, stripe, up).toml(format!("[journal]\nreconcile_after_seconds = {seconds}\n"))
}

/// An account on tier `free` (10 monthly credits) with a credit pack bought through Stripe
/// (110 credits, a quarter of it refunded: 27.5 clawed back) and two grants (5 and 7); every
/// entry journaled. Returns the account and the entry ids of the purchase, the grants and the
/// clawback.
async fn paid_account(app: &App, env: &TestEnv) -> (String, [String; 4]) {
    let account = id("acct");
    app.create_account(&account, "free").await;
    let (session, pi, ch) = (id("cs_test"), id("pi"), id("ch"));
    let completed = event(
        "checkout.session.completed",
        pack_session(&account, "pack_100", &session, &pi),
        now(),
    );
    deliver_ok(app, &completed, "applied").await;
    let refunded = event("charge.refunded", charge(&ch, &pi, 1000, 250), now());
    deliver_ok(app, &refunded, "applied").await;
    for (key, credits) in [("k1", 5), ("k2", 7)] {
        let (status, body) = grant(app, &account, json!(credits), key).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    assert_caught_up(env, Some(app), Duration::from_secs(15)).await;
    assert_eq!(balance(app, &account).await.2, TOTAL);
    let ids = [
        format!("purchase:{session}"),
        format!("grant:{account}:k1"),
        format!("grant:{account}:k2"),
        format!("refund:{ch}:250"),
    ];
    (account, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credits_redis_lost_are_found_in_postgres_and_applied_once() {
    let env = TestEnv::new().await;
    let stripe = FakeStripe::start().await;
    let up = FakeUpstream::start().await;
    // The background pass is out of the way: the CLI runs it here.
    let cfg = config(&env, &stripe, &up, 3600);
    let mut app = cfg.spawn().await;
    let pg = env.pg().await;
    let (account, [purchase, k1, k2, clawback]) = paid_account(&app, &env).await;

    // The process stops; Redis loses the first grant and the clawback; the second grant is
    // kept but its entry is still waiting in the stream.
    app.kill();
    for lost in [&k1, &clawback] {
        lose_credit(&env, &pg, &account, lost).await;
    }
    unflush(&env, &pg, &account, &k2).await;

    // The ledger agrees with itself: only the Postgres records show what was paid for.
    let audit = ledger_cmd(&env, &cfg, "audit", &["--account", &account]).await;
    assert!(audit.success(), "{audit}");

    // Redis loses the purchase too, whose entry a flusher had read and will write late.
    lose_credit_held_by_a_flusher(&env, &pg, &account, &purchase).await;

    let args = ["--older-than-seconds", "0"];
    let dry = ledger_cmd(
        &env,
        &cfg,
        "reconcile",
        &[&args[..], &["--dry-run"]].concat(),
    )
    .await;
    assert!(dry.success(), "{dry}");
    let out = dry.stdout.clone();
    assert!(
        out.contains(&format!(
            "would re-apply purchase {purchase} to {account}: 110 credits"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "would re-apply grant {k1} to {account}: 5 credits"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "would re-apply adjustment {clawback} to {account}: -27.5 credits"
        )),
        "{out}"
    );
    assert!(!out.contains(&k2), "{out}");
    assert!(
        out.contains(
            "4 recorded credits without a journal entry, 1 still in Redis, 3 would re-apply, 0 failed"
        ),
        "{out}"
    );
    let mut redis = env.redis().await;
    let purchased: i64 = redis::cmd("HGET")
        .arg(account_hash(&env, &account))
        .arg("purchased")
        .query_async(&mut redis)
        .await
        .expect("HGET");
    assert_eq!(purchased, 7 * C, "the dry run changed Redis");

    let run = ledger_cmd(&env, &cfg, "reconcile", &args).await;
    assert!(run.success(), "{run}");
    assert!(
        run.stdout
            .contains("1 still in Redis, 3 re-applied, 0 failed"),
        "{}",
        run.stdout
    );

    // Back up: the flusher writes the waiting grant, the late original of the purchase and the
    // three re-applied credits; the purchase's two entries carry the same date, so it is
    // stored once.
    let app = cfg.spawn().await;
    assert_caught_up(&env, Some(&app), Duration::from_secs(15)).await;
    assert_eq!(balance(&app, &account).await.2, TOTAL);
    for entry in [&purchase, &k1, &k2, &clawback] {
        assert_eq!(rows_with_id(&pg, entry).await, 1, "{entry}");
    }
    assert_balance_is_journal_sum(&app, &pg, &account).await;
    let audit = ledger_cmd(&env, &cfg, "audit", &["--account", &account]).await;
    assert!(audit.success(), "{audit}");

    // Nothing left to do, and running again changes nothing.
    let again = ledger_cmd(&env, &cfg, "reconcile", &args).await;
    assert!(
        again
            .stdout
            .contains("0 recorded credits without a journal entry"),
        "{}",
        again.stdout
    );
    assert_eq!(balance(&app, &account).await.2, TOTAL);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reapplies_a_lost_credit_by_itself_even_when_redis_lost_the_account() {
    let env = TestEnv::new().await;
    let stripe = FakeStripe::start().await;
    let up = FakeUpstream::start().await;
    let cfg = config(&env, &stripe, &up, 1);
    let app = cfg.spawn().await;
    let pg = env.pg().await;
    let (account, [purchase, k1, _, _]) = paid_account(&app, &env).await;

    // Redis loses the whole account, with the purchase and a grant whose entries had not
    // reached the journal (it is loaded again from the journal, which never got them). The
    // rows go first: a pass in between finds the marks and does nothing.
    delete_row(&pg, &purchase).await;
    delete_row(&pg, &k1).await;
    let mut redis = env.redis().await;
    let _: () = redis::cmd("DEL")
        .arg(account_hash(&env, &account))
        .arg(mark_key(&env, &account, &purchase))
        .arg(mark_key(&env, &account, &k1))
        .query_async(&mut redis)
        .await
        .expect("DEL");

    let restored = poll_until(Duration::from_secs(15), || async {
        metric(
            &app,
            "tollgate_credits_reapplied_total",
            &[("kind", "grant")],
        )
        .await
            == 1.0
            && metric(
                &app,
                "tollgate_credits_reapplied_total",
                &[("kind", "purchase")],
            )
            .await
                == 1.0
    })
    .await;
    assert!(restored, "not re-applied:\n{}", app.logs());
    assert_caught_up(&env, Some(&app), Duration::from_secs(15)).await;
    assert_eq!(balance(&app, &account).await.2, TOTAL);
    for entry in [&purchase, &k1] {
        assert_eq!(rows_with_id(&pg, entry).await, 1, "{entry}");
    }
    assert_balance_is_journal_sum(&app, &pg, &account).await;
    assert!(app
        .logs()
        .contains("credit lost by Redis (failover?) applied again"));
    // Later passes find nothing: no second application.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for kind in ["grant", "purchase"] {
        let n = metric(&app, "tollgate_credits_reapplied_total", &[("kind", kind)]).await;
        assert_eq!(n, 1.0, "{kind}");
    }
    assert_eq!(balance(&app, &account).await.2, TOTAL);
}
