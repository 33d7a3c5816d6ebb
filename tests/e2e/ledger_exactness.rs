//! The ledger never over- or under-charges: N credits buy exactly N requests, even when many
//! more race through two tollgate processes sharing one database and one Redis prefix; and
//! fractional prices add up exactly (micro-credit integers, never floats).

use std::collections::BTreeSet;

use futures_util::future::join_all;
use reqwest::Method;

use crate::harness::{http_client_no_pool, TestEnv};
use crate::ledger_util::{balance, call_with, get_ok, total, Answer};
use crate::upstream::FakeUpstream;

const CREDITS: usize = 20;
const REQUESTS: usize = 3 * CREDITS;

fn config(upstream: &str, cost: &str, monthly: usize) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream}"

[[routes]]
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = {cost}

[[routes]]
name = "tenth"
path_prefix = "/tenth"
upstream = "up"
cost = 0.1

[[routes]]
name = "third"
path_prefix = "/third"
upstream = "up"
cost = 0.3

[[routes]]
name = "micro"
path_prefix = "/micro"
upstream = "up"
cost = 0.000001

[tiers.metered]
monthly_credits = {monthly}
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_credits_buy_exactly_n_requests_across_two_instances() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let config = env.config().toml(config(&up.url(), "1", CREDITS));
    let a = config.spawn().await;
    let b = config.spawn().await;
    let (account, key) = a.account_with_key("metered").await;
    assert_eq!(total(&b, &account).await, CREDITS.to_string());

    let clients = [http_client_no_pool(), http_client_no_pool()];
    let apps = [&a, &b];
    let answers = join_all((0..REQUESTS).map(|i| {
        let (client, app, key) = (&clients[i % 2], apps[i % 2], &key);
        async move { call_with(client, app, key, Method::POST, "/v1/echo").await }
    }))
    .await;

    let mut remaining = Vec::new();
    let mut refused = 0;
    for a in &answers {
        match a.status.as_u16() {
            200 => {
                assert_eq!(a.charged().as_deref(), Some("1"), "{:?}", a.headers);
                remaining.push(
                    a.remaining()
                        .expect("X-Credits-Remaining on a success")
                        .parse::<usize>()
                        .expect("an integer balance"),
                );
            }
            402 => {
                a.assert_error(402, "insufficient_credits");
                assert_eq!(a.body["credits_remaining"].to_string(), "0", "{}", a.body);
                assert_eq!(a.body["credits_required"].to_string(), "1", "{}", a.body);
                assert_eq!(a.body["tier"], "metered", "{}", a.body);
                refused += 1;
            }
            other => panic!("unexpected status {other}: {}", a.body),
        }
    }
    assert_eq!(remaining.len(), CREDITS, "successes");
    assert_eq!(refused, REQUESTS - CREDITS, "402s");
    assert_eq!(up.request_count(), CREDITS, "requests the upstream served");
    // Each instance serves from its own credit slice: its X-Credits-Remaining is exact for its
    // own spending and lags the other's by at most one report (README "Credit slices"), so
    // the two instances' headers are not one sequence. Each instance's own are distinct.
    assert!(remaining.iter().all(|r| *r < CREDITS), "{remaining:?}");
    for parity in 0..2 {
        let own: Vec<usize> = remaining_by_app(&answers, parity);
        let distinct: BTreeSet<usize> = own.iter().copied().collect();
        assert_eq!(distinct.len(), own.len(), "instance {parity}: {own:?}");
    }

    for app in [&a, &b] {
        assert_eq!(
            balance(app, &account).await,
            ("0".to_string(), "0".to_string(), "0".to_string())
        );
    }
    // And it stays there.
    let more = call_with(&clients[0], &b, &key, Method::POST, "/v1/echo").await;
    more.assert_error(402, "insufficient_credits");
    assert_eq!(up.request_count(), CREDITS);
}

/// The X-Credits-Remaining values of one instance's successes (requests alternate between
/// the two instances: even ones to `a`, odd ones to `b`).
fn remaining_by_app(answers: &[Answer], parity: usize) -> Vec<usize> {
    answers
        .iter()
        .enumerate()
        .filter(|(i, a)| i % 2 == parity && a.status.as_u16() == 200)
        .filter_map(|(_, a)| a.remaining().and_then(|r| r.parse().ok()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fractional_prices_add_up_exactly() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let app = env.config().toml(config(&up.url(), "1", 20)).spawn().await;
    let (account, key) = app.account_with_key("metered").await;

    // Ten times 0.1 is exactly one credit.
    let expected = [
        "19.9", "19.8", "19.7", "19.6", "19.5", "19.4", "19.3", "19.2", "19.1", "19",
    ];
    for want in expected {
        let a = get_ok(&app, &key, "/tenth/x").await;
        assert_eq!(a.charged().as_deref(), Some("0.1"));
        assert_eq!(a.remaining().as_deref(), Some(want));
    }
    assert_eq!(
        balance(&app, &account).await,
        ("19".to_string(), "0".to_string(), "19".to_string())
    );

    // 0.3 three times: 0.9, not 0.8999999999.
    for want in ["18.7", "18.4", "18.1"] {
        let a = get_ok(&app, &key, "/third/x").await;
        assert_eq!(a.charged().as_deref(), Some("0.3"));
        assert_eq!(a.remaining().as_deref(), Some(want));
    }
    // The smallest unit, one micro-credit.
    for want in ["18.099999", "18.099998"] {
        let a = get_ok(&app, &key, "/micro/x").await;
        assert_eq!(a.charged().as_deref(), Some("0.000001"));
        assert_eq!(a.remaining().as_deref(), Some(want));
    }
    assert_eq!(total(&app, &account).await, "18.099998");
    assert_eq!(up.request_count(), 15);
}
