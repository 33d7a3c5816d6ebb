//! When things fail: refunds follow the route's policy (upstream 5xx, connect errors, timeouts);
//! Redis unreachable or hung fails closed with 503 `metering_unavailable` (quickly) or, on a
//! `fail_mode = "open"` route, forwards unmetered and counts it; the ledger recovers when Redis
//! returns; a flushed script cache is transparent.

use std::time::Duration;

use reqwest::Method;

use crate::harness::{http_client, poll_until, TestEnv};
use crate::ledger_util::{
    balance, call_with, get, get_ok, grant, metric, total, wait_metric_at_least, wait_total,
    ClosedPort, GateMode, RedisGate,
};
use crate::upstream::{Blackhole, FakeUpstream};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_follow_the_route_policy() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let blackhole = Blackhole::start().await;
    let closed = ClosedPort::new();
    let app = env
        .config()
        .toml(format!(
            r#"
[[upstreams]]
name = "up"
url = "{up}"

[[upstreams]]
name = "closed"
url = "http://{closed_addr}"
connect_timeout_ms = 2000

[[upstreams]]
name = "blackhole"
url = "{blackhole}"
read_timeout_ms = 300

[[routes]]
name = "refunding"
path_prefix = "/v1/a"
upstream = "up"
cost = 1

[[routes]]
name = "keeping"
path_prefix = "/v1/b"
upstream = "up"
cost = 1
refund_on = []

[[routes]]
name = "dead"
path_prefix = "/v1/dead"
upstream = "closed"
cost = 1

[[routes]]
name = "hung"
path_prefix = "/v1/hung"
upstream = "blackhole"
cost = 1

[[routes]]
name = "hung_refunding"
path_prefix = "/v1/hung-refunding"
upstream = "blackhole"
cost = 1
refund_on = ["timeout"]

[tiers.basic]
monthly_credits = 10
"#,
            up = up.url(),
            blackhole = blackhole.url(),
            closed_addr = closed.addr,
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    // Error answers may close their connection: one connection per request.
    let c = crate::harness::http_client_no_pool();

    // Upstream 5xx with the default policy: the status passes through, nothing is charged.
    for code in [500, 503] {
        let r = call_with(&c, &app, &key, Method::GET, &format!("/v1/a/status/{code}")).await;
        assert_eq!(r.status.as_u16(), code, "{}", r.body);
        assert_eq!(r.body["upstream_status"], code, "{}", r.body);
        assert_eq!(r.charged().as_deref(), Some("0"), "{:?}", r.headers);
        assert_eq!(r.remaining().as_deref(), Some("10"), "{:?}", r.headers);
    }
    wait_total(&app, &account, "10").await;
    // A 4xx is the caller's problem: charged.
    let r = call_with(&c, &app, &key, Method::GET, "/v1/a/status/404").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.charged().as_deref(), Some("1"));
    wait_total(&app, &account, "9").await;

    // refund_on = []: the charge stays on a 5xx.
    let r = call_with(&c, &app, &key, Method::GET, "/v1/b/status/500").await;
    assert_eq!(r.status, 500);
    assert_eq!(r.charged().as_deref(), Some("1"));
    assert_eq!(r.remaining().as_deref(), Some("8"));

    // Connection refused: 502 that says it was refunded.
    let r = call_with(&c, &app, &key, Method::POST, "/v1/dead/x").await;
    r.assert_error(502, "upstream_unavailable");
    assert_eq!(r.body["refunded"], true, "{}", r.body);

    // A timeout is not refunded by default, and is where the route asks for it.
    let r = call_with(&c, &app, &key, Method::GET, "/v1/hung/x").await;
    r.assert_error(504, "upstream_timeout");
    assert_eq!(r.body["refunded"], false, "{}", r.body);
    let r = call_with(&c, &app, &key, Method::GET, "/v1/hung-refunding/x").await;
    r.assert_error(504, "upstream_timeout");
    assert_eq!(r.body["refunded"], true, "{}", r.body);

    // 10 - 1 (404) - 1 (refund_on = []) - 1 (unrefunded timeout).
    wait_total(&app, &account, "7").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        balance(&app, &account).await,
        ("7".to_string(), "0".to_string(), "7".to_string())
    );
}

fn outage_config(upstream: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream}"

[[routes]]
name = "open"
path_prefix = "/v1/open"
upstream = "up"
cost = 1
fail_mode = "open"

[[routes]]
name = "metered"
path_prefix = "/v1"
upstream = "up"
cost = 1

[tiers.basic]
monthly_credits = 100
"#
    )
}

/// A metered request during the outage: 503 `metering_unavailable`, not forwarded. (It does
/// not hang: the client's own timeout would fail the call; how fast is not checked here.)
async fn assert_fails_closed(app: &crate::harness::App, key: &str, up: &FakeUpstream) {
    let before = up.request_count();
    let r = call_with(
        &crate::harness::http_client_no_pool(),
        app,
        key,
        Method::GET,
        "/v1/metered",
    )
    .await;
    r.assert_error(503, "metering_unavailable");
    assert_eq!(up.request_count(), before, "forwarded during the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_closed_or_open_per_route_and_recovers() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = RedisGate::start(env.redis_url()).await;
    let app = env
        .config()
        .redis_url(gate.url())
        .toml(outage_config(&up.url()))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    get_ok(&app, &key, "/v1/metered").await;
    let r = get_ok(&app, &key, "/v1/open").await;
    assert_eq!(
        r.charged().as_deref(),
        Some("1"),
        "metered while Redis is up"
    );
    assert_eq!(total(&app, &account).await, "98");
    let mut served_metered = 2;

    for mode in [GateMode::Down, GateMode::Freeze] {
        gate.set(mode);
        assert_fails_closed(&app, &key, &up).await;
        assert_fails_closed(&app, &key, &up).await;
        let unmetered_before = metric(
            &app,
            "tollgate_unmetered_requests_total",
            &[("route", "open")],
        )
        .await;
        let before = up.request_count();
        let r = get_ok(&app, &key, "/v1/open/x").await;
        assert!(r.charged().is_none(), "{mode:?}: {:?}", r.headers);
        assert_eq!(up.request_count(), before + 1);
        wait_metric_at_least(
            &app,
            "tollgate_unmetered_requests_total",
            &[("route", "open")],
            unmetered_before + 1.0,
        )
        .await;

        // Back: metered requests succeed again once the connection is re-established.
        gate.set(GateMode::Up);
        let client = http_client();
        let ok = poll_until(Duration::from_secs(10), || async {
            call_with(&client, &app, &key, Method::GET, "/v1/metered")
                .await
                .status
                == 200
        })
        .await;
        assert!(ok, "metering did not recover after {mode:?}");
        served_metered += 1;
    }
    // Nothing was charged for the refused or unmetered requests.
    assert_eq!(
        total(&app, &account).await,
        (100 - served_metered).to_string()
    );
    wait_metric_at_least(
        &app,
        "tollgate_redis_errors_total",
        &[("script", "debit")],
        1.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_scripts_are_reloaded_transparently() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(outage_config(&up.url())).spawn().await;
    let (account, key) = app.account_with_key("basic").await;
    get_ok(&app, &key, "/v1/x").await;
    let (status, body) = grant(&app, &account, serde_json::json!(1), "before").await;
    assert_eq!(status, 201, "{body}");

    let mut conn = env.redis().await;
    let _: String = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Debit, refund (credit), grant (credit) and tier change scripts all still work.
    let r = get_ok(&app, &key, "/v1/x").await;
    assert_eq!(r.remaining().as_deref(), Some("99"));
    let _: String = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = get(&app, &key, "/v1/status/500").await;
    assert_eq!(r.status, 500);
    wait_total(&app, &account, "99").await;
    let (status, body) = grant(&app, &account, serde_json::json!(1), "after").await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        balance(&app, &account).await,
        ("98".to_string(), "2".to_string(), "100".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_client_request_id_is_charged_refunded_and_leased_separately() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env
        .config()
        .toml(format!(
            r#"
[[upstreams]]
name = "up"
url = "{}"

[[routes]]
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = 1

[tiers.pair]
monthly_credits = 10
max_concurrent = 2
"#,
            up.url()
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("pair").await;
    let c = crate::harness::http_client_no_pool();
    let send = |path: &str, request_id: &str| {
        c.get(app.proxy_url(path))
            .bearer_auth(&key)
            .header("x-request-id", request_id)
            .send()
    };

    // A client retrying with the same X-Request-Id: each failure is refunded.
    for _ in 0..2 {
        let resp = send("/v1/status/500", "retry-1").await.unwrap();
        assert_eq!(resp.status(), 500);
        assert_eq!(resp.headers()["x-request-id"], "retry-1");
        assert_eq!(resp.headers()["x-credits-charged"], "0");
    }
    wait_total(&app, &account, "10").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        total(&app, &account).await,
        "10",
        "the second failure was not refunded"
    );

    // Two requests in flight under one X-Request-Id hold two slots: a third is refused.
    let slow = |request_id: &'static str| {
        let (c, url, key) = (c.clone(), app.proxy_url("/v1/slow?ms=1500"), key.clone());
        tokio::spawn(async move {
            c.get(url)
                .bearer_auth(key)
                .header("x-request-id", request_id)
                .send()
                .await
        })
    };
    let first = slow("dup");
    let second = slow("dup");
    up.wait_for_requests(4, Duration::from_secs(5)).await;
    let third = send("/v1/x", "other").await.unwrap();
    assert_eq!(
        third.status(),
        429,
        "a third request in flight was let through"
    );
    for handle in [first, second] {
        assert_eq!(handle.await.unwrap().unwrap().status(), 200);
    }
    wait_total(&app, &account, "8").await;
    // Both slots come back.
    let ok = poll_until(Duration::from_secs(5), || async {
        let leases: i64 = redis::cmd("ZCARD")
            .arg(crate::ledger_util::leases_key(&env, &account))
            .query_async(&mut env.redis().await)
            .await
            .unwrap();
        leases == 0
    })
    .await;
    assert!(ok, "leases left after both requests ended");
}

/// `base` talking to Redis through `gate`, with a short timeout: a muted reply is a lost one.
fn behind(base: crate::harness::ConfigBuilder, gate: &RedisGate) -> crate::harness::ConfigBuilder {
    base.redis_url(gate.url()).redis("timeout_ms = 300")
}

/// A debit that ran while its reply was lost (the client got 503 and was not served) is
/// refunded once the journal shows it ran; one that never reached Redis is left alone. Both
/// are counted in `tollgate_unanswered_debits_total`; the balance ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_debit_replies_are_voided_once_the_journal_shows_them() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = RedisGate::start(env.redis_url()).await;
    let app = behind(env.config(), &gate)
        .toml(outage_config(&up.url()))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;
    get_ok(&app, &key, "/v1/metered").await;
    assert_eq!(total(&app, &account).await, "99");

    // The script runs, its reply never comes back: 503, and the debit stands for now.
    gate.set(GateMode::MuteReplies);
    assert_fails_closed(&app, &key, &up).await;
    gate.set(GateMode::Up);
    wait_metric_at_least(
        &app,
        "tollgate_unanswered_debits_total",
        &[("outcome", "voided")],
        1.0,
    )
    .await;
    wait_total(&app, &account, "99").await;

    // Nothing reaches Redis: resolved as never run, nothing to give back.
    gate.set(GateMode::Freeze);
    assert_fails_closed(&app, &key, &up).await;
    gate.set(GateMode::Up);
    wait_metric_at_least(
        &app,
        "tollgate_unanswered_debits_total",
        &[("outcome", "not_run")],
        1.0,
    )
    .await;
    let client = http_client();
    let ok = poll_until(Duration::from_secs(10), || async {
        call_with(&client, &app, &key, Method::GET, "/v1/metered")
            .await
            .status
            == 200
    })
    .await;
    assert!(ok, "metering did not recover");
    wait_total(&app, &account, "98").await;
    assert_eq!(
        metric(
            &app,
            "tollgate_unanswered_debits_total",
            &[("outcome", "voided")]
        )
        .await,
        1.0
    );

    // The journal tells the story: three debits, one refund of the lost one, nothing else.
    let pg = env.pg().await;
    let ok = poll_until(Duration::from_secs(10), || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE account_id = $1")
                .bind(&account)
                .fetch_one(&pg)
                .await
                .unwrap();
        n >= 5
    })
    .await;
    assert!(ok, "journal not flushed");
    let rows: Vec<(String, Option<String>, i64)> = sqlx::query_as(
        "SELECT kind, reason, d_allowance + d_purchased FROM ledger_entries
         WHERE account_id = $1 AND kind IN ('debit', 'refund') ORDER BY created_at",
    )
    .bind(&account)
    .fetch_all(&pg)
    .await
    .unwrap();
    let debits = rows.iter().filter(|r| r.0 == "debit").count();
    let refunds: Vec<_> = rows.iter().filter(|r| r.0 == "refund").collect();
    assert_eq!(debits, 3, "{rows:?}");
    assert_eq!(refunds.len(), 1, "{rows:?}");
    assert_eq!(refunds[0].1.as_deref(), Some("unanswered_debit"));
    assert_eq!(refunds[0].2, 1_000_000);
    let sum: i64 = rows.iter().map(|r| r.2).sum();
    assert_eq!(sum, -2_000_000, "{rows:?}");
}

/// Waits until `app` has voided an unanswered debit, or panics with its log.
async fn wait_voided(app: &crate::harness::App, timeout: Duration) {
    let voided = poll_until(timeout, || async {
        metric(
            app,
            "tollgate_unanswered_debits_total",
            &[("outcome", "voided")],
        )
        .await
            >= 1.0
    })
    .await;
    assert!(voided, "no unanswered debit voided:\n{}", app.logs());
}

/// Whether `unanswered_debits` becomes empty within `timeout`.
async fn no_unanswered_rows(pg: &sqlx::PgPool, timeout: Duration) -> bool {
    poll_until(timeout, || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM unanswered_debits")
            .fetch_one(pg)
            .await
            .unwrap();
        left == 0
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_debit_reply_left_by_a_dead_instance_is_voided_by_another() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = RedisGate::start(env.redis_url()).await;
    let base = env
        .config()
        .toml(outage_config(&up.url()))
        .toml("[journal]\nclaim_idle_seconds = 1\n");
    let mut a = behind(base.clone(), &gate).spawn().await;
    let (account, key) = a.account_with_key("basic").await;
    get_ok(&a, &key, "/v1/metered").await;

    // A's debit runs, its reply never comes back: 503, noted, stored in Postgres within a
    // second. A cannot resolve it (Redis stays mute to it) and is killed.
    gate.set(GateMode::MuteReplies);
    assert_fails_closed(&a, &key, &up).await;
    let pg = env.pg().await;
    let stored = poll_until(Duration::from_secs(5), || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM unanswered_debits WHERE account_id = $1")
                .bind(&account)
                .fetch_one(&pg)
                .await
                .unwrap();
        n == 1
    })
    .await;
    assert!(stored, "the unanswered debit was not stored:\n{}", a.logs());
    a.kill();

    // B (straight to Redis) takes the row over once A's claim has lapsed, sees the debit in
    // the journal and refunds it: the balance is back to 99, the row is gone.
    let b = base.spawn().await;
    assert_eq!(
        total(&b, &account).await,
        "98",
        "the lost debit had charged"
    );
    // A's claim lapses at most 10 s after its last renewal.
    wait_voided(&b, Duration::from_secs(30)).await;
    wait_total(&b, &account, "99").await;
    // The row goes once the refund is made (just after the metric).
    assert!(
        no_unanswered_rows(&pg, Duration::from_secs(5)).await,
        "the resolved row is still there"
    );
    let refunds = || async {
        sqlx::query_as::<_, (Option<String>, i64)>(
            "SELECT reason, d_allowance + d_purchased FROM ledger_entries
              WHERE account_id = $1 AND kind = 'refund'",
        )
        .bind(&account)
        .fetch_all(&pg)
        .await
        .unwrap()
    };
    let flushed = poll_until(Duration::from_secs(10), || async {
        !refunds().await.is_empty()
    })
    .await;
    assert!(flushed, "no refund entry");
    assert_eq!(
        refunds().await,
        vec![(Some("unanswered_debit".to_string()), 1_000_000)]
    );
    assert!(b
        .logs()
        .contains("taking over an unanswered debit another instance left"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unanswered_hold_resolved_twice_is_given_back_once() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let gate = RedisGate::start(env.redis_url()).await;
    let app = behind(env.config(), &gate)
        .toml(outage_config(&up.url()).replace(
            "[[routes]]\nname = \"metered\"",
            "[[routes]]\nname = \"timed\"\npath_prefix = \"/v1/timed\"\nupstream = \"up\"\n\
                 pricing = { per_minute = 6, tick_seconds = 60 }\n\n[[routes]]\nname = \"metered\"",
        ))
        .spawn()
        .await;
    let (account, key) = app.account_with_key("basic").await;

    // A held request whose reply is lost: resolved by settling the hold at zero.
    gate.set(GateMode::MuteReplies);
    let r = call_with(
        &crate::harness::http_client_no_pool(),
        &app,
        &key,
        Method::GET,
        "/v1/timed",
    )
    .await;
    r.assert_error(503, "metering_unavailable");
    gate.set(GateMode::Up);
    wait_voided(&app, Duration::from_secs(15)).await;
    wait_total(&app, &account, "100").await;

    // The same charge comes back (a row that was not removed, taken over later): its entries
    // already even out, so nothing more is given back.
    let pg = env.pg().await;
    let entries = || async {
        sqlx::query_as::<_, (String, Option<String>, i64)>(
            "SELECT entry_id, reason, d_allowance + d_purchased FROM ledger_entries
              WHERE account_id = $1 AND kind <> 'reset' ORDER BY created_at, entry_id",
        )
        .bind(&account)
        .fetch_all(&pg)
        .await
        .unwrap()
    };
    assert!(
        poll_until(Duration::from_secs(10), || async {
            entries().await.len() == 2
        })
        .await,
        "{:?}",
        entries().await
    );
    let first = entries().await;
    let charge = first[0]
        .0
        .strip_suffix(":debit")
        .unwrap_or_else(|| panic!("{first:?}"))
        .to_string();
    sqlx::query(
        "INSERT INTO unanswered_debits (charge_id, account_id, request_id, route, action,
             deadline_ms, hold, claimed_until, owner)
         VALUES ($1, $2, 'r', 'timed', '', 1, true, now() - interval '1 second', 'gone')",
    )
    .bind(&charge)
    .bind(&account)
    .execute(&pg)
    .await
    .unwrap();
    let taken = no_unanswered_rows(&pg, Duration::from_secs(10)).await;
    assert!(taken, "the row was not taken over:\n{}", app.logs());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(total(&app, &account).await, "100");
    let e = entries().await;
    assert_eq!(e.len(), 2, "{e:?}");
    assert_eq!(e[1].0, format!("{charge}:settle"));
    assert_eq!(e[1].1.as_deref(), Some("unanswered_debit"));
    assert_eq!(e[0].2 + e[1].2, 0, "{e:?}");
    assert_eq!(
        metric(
            &app,
            "tollgate_unanswered_debits_total",
            &[("outcome", "voided")]
        )
        .await,
        1.0
    );
}
