//! Group commit of exact debits (`[redis] group_commit`, on by default): while a debit call
//! for a shard is in flight, the next debits of that shard wait and go together in one script
//! call (`debit_batch.lua` around `debit.lua`). These tests check that debits really are
//! grouped (settles too), that a group is exactly what single calls give (to the micro-credit, in the journal
//! too), that one debit's script error does not touch the others of its group, and that the
//! switch turns it off. The model test (`ledger_model`) runs half its cases grouped as well.

use std::time::Duration;

use futures_util::future::join_all;
use prometheus::{IntCounterVec, Opts};
use reqwest::Method;
use tollgate::ledger::holds::{SettleOutcome, SettleRequest};
use tollgate::ledger::{DebitOutcome, DebitRequest, GroupMetrics, Ledger, LedgerError};
use tollgate::money::Credits;
use tollgate::redis_conn::{RedisConn, RedisTarget};

use crate::harness::{delete_redis_prefix, http_client_no_pool, random_id, redis_url, TestEnv};
use crate::journal_util::{assert_balance_is_journal_sum, assert_caught_up, metric};
use crate::ledger_util::{balance, call_with};
use crate::upstream::FakeUpstream;

const C: i64 = 1_000_000;

fn request<'a>(account: &'a str, charge: &'a str) -> DebitRequest<'a> {
    DebitRequest {
        account_id: account,
        tier: "pro",
        monthly: Some(Credits::from_micros(10 * C)),
        cost: Credits::from_micros(C),
        now_ms: tollgate::ledger::now_ms(),
        request_id: charge,
        charge_id: charge,
        route: "chat",
        action: "chat",
        requests_per_hour: 0,
        requests_per_month: 0,
        action_per_hour: 0,
        action_per_month: 0,
        max_concurrent: 0,
        lease_ttl_ms: 60_000,
        deadline_ms: 0,
        hold_ttl_ms: 0,
        wanted: None,
        tokens_per_month: 0,
        counts: None,
        action_max_concurrent: 0,
    }
}

async fn connect() -> RedisConn {
    RedisTarget::parse(&redis_url())
        .expect("redis url")
        .connect(Duration::from_secs(5), Duration::from_secs(5))
        .await
        .expect("redis")
}

/// Creates an account of 10 credits with the real hydrate script.
async fn hydrate(ledger: &Ledger, conn: &mut RedisConn, account: &str) {
    let k = ledger.keys(account);
    let now_s = tollgate::ledger::now_ms() / 1000;
    let created: i64 = redis::Script::new(include_str!("../../src/ledger/hydrate.lua"))
        .key(&k.account)
        .key(&k.stream)
        .arg("pro")
        .arg("active")
        .arg(10 * C)
        .arg(0)
        .arg(now_s - 60)
        .arg(now_s + 30 * 86_400)
        .arg(1)
        .arg(account)
        .arg("1")
        .arg(tollgate::ledger::now_ms())
        .arg(0)
        .invoke_async(conn)
        .await
        .expect("hydrate");
    assert_eq!(created, 1);
}

/// 40 debits of 1 credit queued at once on one shard: two calls (32 + 8), ten charged for
/// the good account's ten credits, nine refused, and the account whose hash is broken (a
/// string, so its script raises WRONGTYPE) fails alone without undoing anybody's debit.
#[tokio::test]
async fn queued_debits_go_in_shared_calls_and_one_error_stays_alone() {
    let prefix = format!("gc{}", random_id(8));
    let counter = |name: &str| IntCounterVec::new(Opts::new(name, name), &["script"]).unwrap();
    let (calls, requests) = (counter("calls"), counter("requests"));
    let ledger = Ledger::new(&prefix, 1, Duration::from_secs(5)).with_group_commit(
        32,
        Some(GroupMetrics {
            calls: calls.clone(),
            requests: requests.clone(),
        }),
    );
    let debit_counts = || {
        (
            calls.with_label_values(&["debit"]).get(),
            requests.with_label_values(&["debit"]).get(),
        )
    };
    let mut conn = connect().await;
    hydrate(&ledger, &mut conn, "good").await;
    let _: () = redis::cmd("SET")
        .arg(ledger.keys("bad").account)
        .arg("not a hash")
        .query_async(&mut conn)
        .await
        .expect("SET");

    // Good and bad interleaved; the good ones ask for 19 credits of the 10 it has.
    let charges: Vec<(String, &str)> = (0..40)
        .map(|i| {
            let account = if i % 2 == 0 && i < 38 { "good" } else { "bad" };
            (format!("c{i:02}"), account)
        })
        .collect();
    let outcomes = join_all(charges.iter().map(|(charge, account)| {
        let ledger = &ledger;
        let mut conn = conn.clone();
        async move { ledger.debit(&mut conn, &request(account, charge)).await }
    }))
    .await;
    assert_eq!(debit_counts(), (2, 40), "32 + 8 in two calls");

    let mut charged = Vec::new();
    let mut refused = 0;
    for ((charge, account), outcome) in charges.iter().zip(&outcomes) {
        match (*account, outcome) {
            ("good", Ok(DebitOutcome::Charged { allowance, .. })) => {
                charged.push((charge.clone(), allowance.micros()))
            }
            ("good", Ok(DebitOutcome::Insufficient { allowance, .. })) => {
                assert_eq!(allowance.micros(), 0, "{charge}");
                refused += 1;
            }
            ("bad", Err(LedgerError::Reply(message))) => {
                assert!(message.contains("WRONGTYPE"), "{charge}: {message}")
            }
            other => panic!("{charge}: {other:?}"),
        }
    }
    // In arrival order, each sees the balance the one before it left.
    let expected: Vec<(String, i64)> = (0..10)
        .map(|i| (format!("c{:02}", 2 * i), (9 - i) * C))
        .collect();
    assert_eq!(charged, expected);
    assert_eq!(refused, 9);

    // The journal: one debit entry per charge, after the opening entry.
    let k = ledger.keys("good");
    let entries: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg(&k.stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    let text = format!("{entries:?}");
    for (charge, _) in &expected {
        assert_eq!(
            text.matches(&format!("{charge}:debit")).count(),
            1,
            "{charge}"
        );
    }
    let allowance: i64 = redis::cmd("HGET")
        .arg(&k.account)
        .arg("allowance")
        .query_async(&mut conn)
        .await
        .expect("HGET");
    assert_eq!(allowance, 0);

    // Settles group too: five holds of up to 2 credits each, then their five settles at 0.5
    // queued at once: one call, each refunding what its hold took beyond 0.5.
    hydrate(&ledger, &mut conn, "held").await;
    let holds: Vec<String> = (0..5).map(|i| format!("h{i}")).collect();
    for charge in &holds {
        let mut r = request("held", charge);
        r.hold_ttl_ms = 60_000;
        r.wanted = Some(Credits::from_micros(2 * C));
        let outcome = ledger.debit(&mut conn, &r).await.expect("hold");
        assert!(matches!(outcome, DebitOutcome::Charged { taken, .. } if taken.micros() == 2 * C));
    }
    let settled = join_all(holds.iter().map(|charge| {
        let (ledger, mut conn) = (&ledger, conn.clone());
        async move {
            let r = SettleRequest {
                account_id: "held",
                charge_id: charge,
                cost: Some(Credits::from_micros(C / 2)),
                status: 200,
                reason: "ok",
                action: "chat",
                ..Default::default()
            };
            ledger.settle(&mut conn, &r).await
        }
    }))
    .await;
    for outcome in &settled {
        assert!(
            matches!(outcome, Ok(SettleOutcome::Settled { delta, .. }) if delta.micros() == -3 * C / 2),
            "{outcome:?}"
        );
    }
    let settle_counts = (
        calls.with_label_values(&["settle"]).get(),
        requests.with_label_values(&["settle"]).get(),
    );
    assert_eq!(settle_counts, (1, 5));
    let allowance: i64 = redis::cmd("HGET")
        .arg(ledger.keys("held").account)
        .arg("allowance")
        .query_async(&mut conn)
        .await
        .expect("HGET");
    assert_eq!(allowance, 10 * C - 5 * C / 2);
    delete_redis_prefix(&redis_url(), &prefix)
        .await
        .expect("cleanup");
}

fn config(upstream: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream}"

[[routes]]
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = 0.5

[tiers.metered]
monthly_credits = 10
"#
    )
}

/// Through the real binary: two accounts on one shard, 60 concurrent requests each for 20
/// requests' worth of credits: exactly 20 served per account, balances 0, journal = balance,
/// and every debit went through a grouped call. With `group_commit = false` the same holds
/// and no grouped call is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_groups_exact_debits_and_the_money_is_exact() {
    for group_commit in [true, false] {
        let env = TestEnv::new().await;
        let up = FakeUpstream::start().await;
        let app = env
            .config()
            .redis("shards = 1")
            .redis(format!("group_commit = {group_commit}"))
            .toml(config(&up.url()))
            .spawn()
            .await;
        let (a, key_a) = app.account_with_key("metered").await;
        let (b, key_b) = app.account_with_key("metered").await;
        let client = http_client_no_pool();
        let answers = join_all((0..120).map(|i| {
            let (client, app) = (&client, &app);
            let key = if i % 2 == 0 { &key_a } else { &key_b };
            async move { call_with(client, app, key, Method::POST, "/v1/echo").await }
        }))
        .await;
        let served = |parity: usize| {
            answers
                .iter()
                .skip(parity)
                .step_by(2)
                .filter(|a| a.status.as_u16() == 200)
                .count()
        };
        for a in &answers {
            assert!(
                matches!(a.status.as_u16(), 200 | 402),
                "{} {}",
                a.status,
                a.body
            );
        }
        assert_eq!(
            (served(0), served(1)),
            (20, 20),
            "group_commit = {group_commit}"
        );
        assert_eq!(up.request_count(), 40);
        for account in [&a, &b] {
            assert_eq!(
                balance(&app, account).await,
                ("0".to_string(), "0".to_string(), "0".to_string())
            );
        }
        assert_caught_up(&env, Some(&app), Duration::from_secs(15)).await;
        let pg = env.pg().await;
        for account in [&a, &b] {
            assert_balance_is_journal_sum(&app, &pg, account).await;
        }
        let debit = [("script", "debit")];
        let calls = metric(&app, "tollgate_redis_grouped_calls_total", &debit).await;
        let debits = metric(&app, "tollgate_redis_grouped_requests_total", &debit).await;
        if group_commit {
            // Every debit (served or refused) went through a grouped call; how many shared
            // one depends on timing (the library test above checks the grouping itself).
            assert!(debits >= 120.0, "{debits} debits");
            assert!(calls >= 1.0 && calls <= debits, "{calls} calls");
        } else {
            assert_eq!((calls, debits), (0.0, 0.0));
        }
    }
}
