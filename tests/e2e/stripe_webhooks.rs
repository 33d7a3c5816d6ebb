//! `POST /webhooks/stripe`: a paid credit pack is credited exactly once however the event
//! arrives (repeated, concurrent, as two different events about one session, after a failure);
//! forged, stale and malformed payloads are refused with nothing changed.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::fake_stripe::FakeStripe;
use crate::harness::TestEnv;
use crate::ledger_util::{GateMode, RedisGate};
use crate::stripe_util::*;
use crate::upstream::FakeUpstream;

async fn purchases(env: &TestEnv, account: &str) -> i64 {
    scalar_i64(
        env,
        "SELECT count(*) FROM purchases WHERE account_id = $1",
        account,
    )
    .await
}

async fn events(env: &TestEnv) -> i64 {
    let pg = env.pg().await;
    sqlx::query_scalar("SELECT count(*) FROM stripe_events")
        .fetch_one(&pg)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_paid_pack_is_credited_once_over_repeated_deliveries() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let session = id("cs_test");
    let completed = event(
        "checkout.session.completed",
        pack_session(&acct, "pack_100", &session, &id("pi")),
        now(),
    );
    deliver_ok(&w.app, &completed, "applied").await;
    for _ in 0..4 {
        deliver_ok(&w.app, &completed, "duplicate").await;
    }
    // Another event about the same session (Stripe sends both for delayed payment methods).
    let mut async_paid = completed.clone();
    async_paid["id"] = json!(id("evt"));
    async_paid["type"] = json!("checkout.session.async_payment_succeeded");
    deliver_ok(&w.app, &async_paid, "already_applied").await;

    let (allowance, purchased, _, _) = state(&w.app, &acct).await;
    assert_eq!((allowance, purchased), (10 * C, 110 * C));
    let entries = journal_of(&w, &acct, "purchase").await;
    assert_eq!(
        entries,
        vec![(format!("purchase:{session}"), 0, 110 * C)],
        "one purchase entry"
    );
    assert_eq!(purchases(&w.env, &acct).await, 1);
    let pg = w.env.pg().await;
    let (pack, credits, bonus, amount, currency): (String, i64, i64, i64, String) = sqlx::query_as(
        "SELECT pack_id, credits, bonus_credits, amount_cents, currency FROM purchases
              WHERE session_id = $1",
    )
    .bind(&session)
    .fetch_one(&pg)
    .await
    .unwrap();
    assert_eq!(
        (pack.as_str(), credits, bonus, amount, currency.as_str()),
        ("pack_100", 100 * C, 10 * C, 1000, "usd")
    );
    // The customer is remembered for the next checkout.
    assert_eq!(
        scalar_i64(
            &w.env,
            "SELECT count(*) FROM stripe_customers WHERE account_id = $1",
            &acct
        )
        .await,
        1
    );
    // The purchased credits are spendable through the proxy.
    let (_, key) = w.app.create_key(&acct).await;
    for _ in 0..11 {
        let a = crate::ledger_util::get(&w.app, &key, "/x").await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    }
    let (allowance, purchased, _, _) = state(&w.app, &acct).await;
    assert_eq!((allowance, purchased), (0, 109 * C));
}

#[tokio::test]
async fn concurrent_deliveries_credit_once() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let session = id("cs_test");
    let completed = event(
        "checkout.session.completed",
        pack_session(&acct, "pack_100", &session, &id("pi")),
        now(),
    );
    // The same event ten times at once, and five other events about the same session.
    let mut all = vec![completed.clone(); 10];
    for _ in 0..5 {
        let mut other = completed.clone();
        other["id"] = json!(id("evt"));
        all.push(other);
    }
    let answers = futures_util::future::join_all(all.iter().map(|e| deliver(&w.app, e))).await;
    let mut applied = 0;
    for (status, body) in &answers {
        assert_eq!(*status, StatusCode::OK, "{body}");
        match body["outcome"].as_str().unwrap() {
            "applied" => applied += 1,
            "duplicate" | "already_applied" => {}
            other => panic!("unexpected outcome {other}: {body}"),
        }
    }
    assert_eq!(applied, 1, "{answers:?}");
    let (_, purchased, _, _) = state(&w.app, &acct).await;
    assert_eq!(purchased, 110 * C);
    assert_eq!(journal_of(&w, &acct, "purchase").await.len(), 1);
    assert_eq!(purchases(&w.env, &acct).await, 1);
    assert_eq!(events(&w.env).await, 6);
}

#[tokio::test]
async fn an_unpaid_session_waits_for_async_payment_succeeded() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let session = id("cs_test");
    let mut object = pack_session(&acct, "pack_small", &session, &id("pi"));
    object["payment_status"] = json!("unpaid");
    let body = deliver_ok(
        &w.app,
        &event("checkout.session.completed", object.clone(), now()),
        "ignored",
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap().contains("unpaid"),
        "{body}"
    );
    assert_eq!(state(&w.app, &acct).await.1, 0);

    object["payment_status"] = json!("paid");
    deliver_ok(
        &w.app,
        &event("checkout.session.async_payment_succeeded", object, now()),
        "applied",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.1, 5 * C);
}

#[tokio::test]
async fn unknown_events_and_unknown_accounts_are_acknowledged_and_ignored() {
    let w = world().await;
    // The fixture event as it is: a plan.created.
    let plan = crate::fake_stripe::fixture("event");
    let (status, body) = deliver(&w.app, &plan).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outcome"], "ignored");

    let ghost = event(
        "checkout.session.completed",
        pack_session("ghost_account", "pack_100", &id("cs_test"), &id("pi")),
        now(),
    );
    deliver_ok(&w.app, &ghost, "unknown_account").await;

    // A session tollgate did not create (no account on it).
    let mut foreign = pack_session("x", "pack_100", &id("cs_test"), &id("pi"));
    foreign["client_reference_id"] = json!(null);
    foreign["metadata"] = json!({});
    foreign["customer"] = json!("cus_unknown");
    deliver_ok(
        &w.app,
        &event("checkout.session.completed", foreign, now()),
        "ignored",
    )
    .await;

    // A pack the config no longer has: acknowledged (retrying cannot help), recorded, logged.
    let acct = account(&w.app, "free").await;
    deliver_ok(
        &w.app,
        &event(
            "checkout.session.completed",
            pack_session(&acct, "pack_gone", &id("cs_test"), &id("pi")),
            now(),
        ),
        "ignored",
    )
    .await;
    assert_eq!(state(&w.app, &acct).await.1, 0);
}

#[tokio::test]
async fn forged_stale_and_malformed_webhooks_are_refused_and_change_nothing() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let good = event(
        "checkout.session.completed",
        pack_session(&acct, "pack_100", &id("cs_test"), &id("pi")),
        now(),
    );
    let body = serde_json::to_vec(&good).unwrap();
    let t = now();
    let tampered = {
        let mut e = good.clone();
        e["data"]["object"]["metadata"]["pack_id"] = json!("pack_small");
        serde_json::to_vec(&e).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, Option<String>, &str)> = vec![
        ("no signature", body.clone(), None, "invalid_signature"),
        (
            "wrong secret",
            body.clone(),
            Some(signature("whsec_forged", t, &body)),
            "invalid_signature",
        ),
        (
            "signed other bytes",
            tampered,
            Some(signature(WEBHOOK_SECRET, t, &body)),
            "invalid_signature",
        ),
        (
            "stale (6 minutes old)",
            body.clone(),
            Some(signature(WEBHOOK_SECRET, t - 360, &body)),
            "invalid_signature",
        ),
        (
            "from the future",
            body.clone(),
            Some(signature(WEBHOOK_SECRET, t + 360, &body)),
            "invalid_signature",
        ),
        (
            "timestamp swapped after signing",
            body.clone(),
            Some(format!(
                "t={},v1={}",
                t + 1,
                hmac_hex(WEBHOOK_SECRET, t, &body)
            )),
            "invalid_signature",
        ),
        (
            "garbage header",
            body.clone(),
            Some("this is not a signature".into()),
            "invalid_signature",
        ),
        (
            "v0 only",
            body.clone(),
            Some(format!("t={t},v0={}", hmac_hex(WEBHOOK_SECRET, t, &body))),
            "invalid_signature",
        ),
    ];
    for (what, body, sig, code) in cases {
        let (status, answer) = post_webhook(&w.app, body, sig).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {answer}");
        assert_eq!(answer["error"], code, "{what}: {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // Correctly signed junk.
    for junk in [
        b"not json at all".to_vec(),
        b"[1,2,3]".to_vec(),
        br#"{"id":"evt_1","type":"checkout.session.completed","created":1}"#.to_vec(),
        br#"{"type":"checkout.session.completed","created":1,"data":{"object":{}}}"#.to_vec(),
        Vec::new(),
    ] {
        let sig = signature(WEBHOOK_SECRET, now(), &junk);
        let (status, answer) = post_webhook(&w.app, junk.clone(), Some(sig)).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{}: {answer}",
            String::from_utf8_lossy(&junk)
        );
        assert_eq!(answer["error"], "invalid_request", "{answer}");
    }
    assert_eq!(state(&w.app, &acct).await.1, 0);
    assert_eq!(events(&w.env).await, 0);
    assert_eq!(purchases(&w.env, &acct).await, 0);

    // Several v1 signatures (a secret being rolled): any one may match.
    let sig = format!(
        "t={t},v1={},v1={}",
        hmac_hex("whsec_old", t, &body),
        hmac_hex(WEBHOOK_SECRET, t, &body)
    );
    let (status, answer) = post_webhook(&w.app, body.clone(), Some(sig)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["outcome"], "applied");
    assert_eq!(state(&w.app, &acct).await.1, 110 * C);

    // Every delivery is counted by outcome, for the webhook-failure alert.
    let n = |outcome: &'static str| {
        let app = &w.app;
        async move {
            crate::ledger_util::metric(
                app,
                "tollgate_stripe_webhooks_total",
                &[("outcome", outcome)],
            )
            .await
        }
    };
    assert_eq!(n("invalid_signature").await, 8.0);
    assert_eq!(n("bad_request").await, 5.0);
    assert_eq!(n("applied").await, 1.0);
}

#[tokio::test]
async fn a_failure_after_the_credit_rolls_back_and_the_retry_credits_once() {
    let w = world().await;
    let acct = account(&w.app, "free").await;
    let session = id("cs_test");
    let completed = event(
        "checkout.session.completed",
        pack_session(&acct, "pack_100", &session, &id("pi")),
        now(),
    );
    // Make the last statement of the event's transaction fail, after the Redis credit.
    let pg = w.env.pg().await;
    sqlx::raw_sql(
        "CREATE FUNCTION fail_outcome() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'injected failure'; END $$;
         CREATE TRIGGER fail_outcome BEFORE UPDATE ON stripe_events
           FOR EACH ROW EXECUTE FUNCTION fail_outcome();",
    )
    .execute(&pg)
    .await
    .unwrap();
    let (status, body) = deliver(&w.app, &completed).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(body["error"], "internal_error");
    assert_eq!(events(&w.env).await, 0);
    assert_eq!(purchases(&w.env, &acct).await, 0);
    // The failed attempt did reach Redis: the retry must not credit a second time.
    assert_eq!(state(&w.app, &acct).await.1, 110 * C);

    // Stripe retries once the handler works again: applied, and credited once in total.
    sqlx::raw_sql("DROP TRIGGER fail_outcome ON stripe_events")
        .execute(&pg)
        .await
        .unwrap();
    deliver_ok(&w.app, &completed, "applied").await;
    deliver_ok(&w.app, &completed, "duplicate").await;
    let (_, purchased, _, _) = state(&w.app, &acct).await;
    assert_eq!(purchased, 110 * C);
    assert_eq!(journal_of(&w, &acct, "purchase").await.len(), 1);
    assert_eq!(purchases(&w.env, &acct).await, 1);
}

#[tokio::test]
async fn redis_down_is_a_500_and_stripes_retry_applies_once() {
    let env = TestEnv::new().await;
    let stripe = FakeStripe::start().await;
    let up = FakeUpstream::start().await;
    let gate = RedisGate::start(env.redis_url()).await;
    let app = stripe_config(&env, &stripe, &up)
        .redis_url(gate.url())
        .spawn()
        .await;
    let acct = account(&app, "free").await;
    // Loaded into Redis, then Redis goes away.
    state(&app, &acct).await;
    let completed = event(
        "checkout.session.completed",
        pack_session(&acct, "pack_100", &id("cs_test"), &id("pi")),
        now(),
    );
    gate.set(GateMode::Down);
    let (status, body) = deliver(&app, &completed).await;
    assert!(status.is_server_error(), "{status} {body}");
    assert_eq!(events(&env).await, 0, "nothing recorded");
    assert_eq!(purchases(&env, &acct).await, 0);

    gate.set(GateMode::Up);
    let ok = crate::harness::poll_until(Duration::from_secs(10), || async {
        deliver(&app, &completed).await.0 == StatusCode::OK
    })
    .await;
    assert!(ok, "the retry never succeeded");
    deliver_ok(&app, &completed, "duplicate").await;
    assert_eq!(state(&app, &acct).await.1, 110 * C);
    assert_eq!(purchases(&env, &acct).await, 1);
}
