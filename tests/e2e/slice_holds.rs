//! Holds from credit slices (README "Credit slices" and "Pricing AI routes"): with
//! `[leases] enabled = true`, a token-priced or SSE (`pricing = {…}`) request on an eligible
//! tier (no quotas, no `max_concurrent`, no `tokens_per_month`; no `per_minute`) takes its hold
//! from the instance's in-process slice instead of a Redis script call, tops it up from the
//! slice while a stream runs, and settles it locally; the batch report journals each step.
//!
//! What this file proves, each against real `tollgate serve` processes, Redis and Postgres:
//! - a sliced hold makes no Redis call of its own: the `debit`, `settle` and `extend` scripts
//!   run only for holds admitted on the exact path (`tollgate_metered_admissions_total{path}`
//!   against `tollgate_redis_script_duration_seconds_count{script}`), and it holds exactly
//!   what the exact path would (the reserve, or the `max_tokens` estimate);
//! - money is exact: N concurrent sliced holds settle to the balance initial − Σ true cost to
//!   the micro-credit; the journal has per request one `<charge>:debit` (the hold) and one
//!   `<charge>:settle` (true cost − held, with tokens, status and reason); balance = Σ journal;
//!   `ledger audit` clean;
//! - an SSE stream tops its hold up from the slice (`extend` rows `<charge>:x1`, `:x2`, …) and
//!   the settle makes the total exactly the true cost of its final usage event, also when the
//!   stream outlasts `leases.idle_ms` before its first top-up (no false cut);
//! - a settle that costs more than held takes the extra, allowance first, then purchased into
//!   debt, and the account is refused (402) after it;
//! - SIGKILL with a sliced hold outstanding: the reported hold stays charged as held, the dead
//!   instance's slice comes back within `leases.ttl_ms`, balance = Σ journal on the survivor;
//! - two instances at the exhaustion boundary: a balance of exactly K holds buys exactly K
//!   requests across both (no over-spend, no false 402).
//! - an exact-path stream's top-ups beside another instance's slice take only money outside the
//!   slices: the balance ends at exactly 0 when both are spent, never below.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::harness::{http_client_no_pool, json_response, poll_until, App, ConfigBuilder, TestEnv};
use crate::journal_util::{journal, ledger_cmd, micros};
use crate::leases::{account_view, leased_of, total_of};
use crate::ledger_util::{grant, metric, Answer};
use crate::upstream::FakeUpstream;

/// µc per credit.
const C: i64 = 1_000_000;

/// A config with credit slices on, one upstream `ai`, the given routes and tier `metered`
/// (`monthly` credits, nothing that would keep it off the slice path). A generous Redis
/// timeout: CI runs this on 2 cores beside other tollgates, and a report that times out sends
/// its request down the exact path (correct, but not what these tests look at).
fn config(
    env: &TestEnv,
    upstream: &str,
    monthly: u64,
    leases: &str,
    routes: &str,
) -> ConfigBuilder {
    env.config().redis("timeout_ms = 2000").toml(format!(
        r#"
[leases]
enabled = true
{leases}

[[upstreams]]
name = "ai"
url = "{upstream}"

{routes}

[tiers.metered]
monthly_credits = {monthly}
"#
    ))
}

/// A token-priced route `name` at `prefix`.
fn route(name: &str, prefix: &str, pricing: &str) -> String {
    format!(
        r#"
[[routes]]
name = "{name}"
method = "POST"
path_prefix = "{prefix}"
upstream = "ai"
pricing = {pricing}
"#
    )
}

/// ⌈price × quantity / 1000⌉ (µc): one dimension priced per 1k tokens, rounded up on its own.
fn per_1k(price: i64, quantity: i64) -> i64 {
    if price == 0 || quantity == 0 {
        0
    } else {
        (price * quantity + 999) / 1000
    }
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "stream": stream})
}

/// A JSON POST through the proxy: status, headers, body.
async fn post(client: &reqwest::Client, app: &App, key: &str, path: &str, body: &Value) -> Answer {
    let bytes = serde_json::to_vec(body).expect("a JSON body");
    post_bytes(client, app, key, path, bytes).await
}

/// A POST of exactly these JSON bytes (the hold's input estimate depends on the length).
async fn post_bytes(
    client: &reqwest::Client,
    app: &App,
    key: &str,
    path: &str,
    bytes: Vec<u8>,
) -> Answer {
    let resp = client
        .post(app.proxy_url(path))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(bytes)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let (status, headers, body) = json_response(resp).await;
    Answer {
        status,
        headers,
        body,
    }
}

/// A streamed POST read to its end: status, `X-Credits-Charged`, the body text.
async fn post_stream(
    client: &reqwest::Client,
    app: &App,
    key: &str,
    path: &str,
) -> (StatusCode, Option<String>, String) {
    let mut resp = client
        .post(app.proxy_url(path))
        .bearer_auth(key)
        .json(&chat(true))
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}"));
    let status = resp.status();
    let charged = resp
        .headers()
        .get("x-credits-charged")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let mut text = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        text.extend_from_slice(&chunk);
    }
    (status, charged, String::from_utf8_lossy(&text).into_owned())
}

/// Waits until no slice of the account is outstanding and the journal in Postgres has caught
/// up with the balance (allowance and purchased each); returns the balance (µc).
async fn quiet(env: &TestEnv, app: &App, account: &str) -> i64 {
    caught_up(env, app, account, true).await
}

/// Waits until the journal in Postgres has caught up with the balance (allowance and purchased
/// each) and, with `slices_back`, no slice of the account is outstanding; returns the balance.
async fn caught_up(env: &TestEnv, app: &App, account: &str, slices_back: bool) -> i64 {
    let pg = env.pg().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let view = account_view(app, account).await;
        let j = journal(&pg, account).await;
        let b = &view["balance"];
        if (!slices_back || leased_of(&view) == 0)
            && micros(&b["allowance"]) == j.sum_allowance
            && micros(&b["purchased"]) == j.sum_purchased
        {
            assert_eq!(
                j.debits, j.distinct_debit_ids,
                "duplicate debit rows: {j:?}"
            );
            return total_of(&view);
        }
        assert!(
            Instant::now() < deadline,
            "balance vs Σ journal never agreed (slices back: {slices_back}): view {view} vs journal {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `tollgate ledger audit` on the test's database and Redis finds nothing wrong.
async fn assert_audit_clean(env: &TestEnv, cfg: &ConfigBuilder) {
    let out = ledger_cmd(env, cfg, "audit", &[]).await;
    assert!(out.success(), "ledger audit: {out}");
}

/// One instance with slices on (see [`config`]), an account on tier `metered` with a key, and
/// a client without connection reuse.
async fn one_instance(
    env: &TestEnv,
    up: &FakeUpstream,
    monthly: u64,
    leases: &str,
    routes: &str,
) -> (ConfigBuilder, App, String, String, reqwest::Client) {
    let cfg = config(env, &up.url(), monthly, leases, routes);
    let app = cfg.spawn().await;
    let (account, key) = app.account_with_key("metered").await;
    (cfg, app, account, key, http_client_no_pool())
}

/// One journal row of a hold (kinds debit, extend, settle).
#[derive(Debug, Clone, sqlx::FromRow)]
struct Row {
    entry_id: String,
    kind: String,
    amount: i64,
    d_allowance: i64,
    d_purchased: i64,
    allowance_after: i64,
    purchased_after: i64,
    request_id: Option<String>,
    route: Option<String>,
    tokens_in: Option<i64>,
    tokens_out: Option<i64>,
    upstream_status: Option<i32>,
    reason: Option<String>,
}

async fn hold_rows(pg: &sqlx::PgPool, account: &str) -> Vec<Row> {
    sqlx::query_as::<_, Row>(
        "SELECT entry_id, kind, amount, d_allowance, d_purchased, allowance_after,
                purchased_after, request_id, route, tokens_in, tokens_out, upstream_status, reason
           FROM ledger_entries
          WHERE account_id = $1 AND kind IN ('debit', 'extend', 'settle')
          ORDER BY created_at, entry_id",
    )
    .bind(account)
    .fetch_all(pg)
    .await
    .expect("reading the journal")
}

/// The journal rows of one charge: its hold, its top-ups (in `:x<n>` order), its settle.
#[derive(Debug, Default)]
struct Charged {
    debit: Vec<Row>,
    extends: Vec<(u32, Row)>,
    settle: Vec<Row>,
}

impl Charged {
    /// What was held in the end: the hold and every top-up.
    fn held(&self) -> i64 {
        self.debit.iter().map(|r| r.amount).sum::<i64>()
            + self.extends.iter().map(|(_, r)| r.amount).sum::<i64>()
    }

    /// What the request cost in all: held + the settle's difference.
    fn total(&self) -> i64 {
        self.held() + self.settle.iter().map(|r| r.amount).sum::<i64>()
    }

    /// Σ bucket deltas of all its rows.
    fn balance_effect(&self) -> i64 {
        self.debit
            .iter()
            .chain(self.extends.iter().map(|(_, r)| r))
            .chain(self.settle.iter())
            .map(|r| r.d_allowance + r.d_purchased)
            .sum()
    }
}

/// The account's hold rows grouped by charge id (the part of the entry id before `:debit`,
/// `:x<n>` or `:settle`); panics on a row whose entry id does not have that shape.
async fn charges(pg: &sqlx::PgPool, account: &str) -> BTreeMap<String, Charged> {
    let mut out: BTreeMap<String, Charged> = BTreeMap::new();
    for row in hold_rows(pg, account).await {
        let (charge, suffix) = row
            .entry_id
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("entry id without a suffix: {row:?}"));
        let (charge, suffix) = (charge.to_string(), suffix.to_string());
        let c = out.entry(charge).or_default();
        match (row.kind.as_str(), suffix.as_str()) {
            ("debit", "debit") => c.debit.push(row),
            ("settle", "settle") => c.settle.push(row),
            ("extend", x) if x.starts_with('x') => {
                let n: u32 = x[1..]
                    .parse()
                    .unwrap_or_else(|_| panic!("extend entry id {:?}", row.entry_id));
                c.extends.push((n, row));
            }
            _ => panic!("a {} row with entry id {:?}", row.kind, row.entry_id),
        }
    }
    for c in out.values_mut() {
        c.extends.sort_by_key(|(n, _)| *n);
    }
    out
}

/// Waits until `n` charges of the account have their settle row in Postgres.
async fn wait_settled(pg: &sqlx::PgPool, account: &str, n: usize) -> BTreeMap<String, Charged> {
    let ok = poll_until(Duration::from_secs(15), || async {
        charges(pg, account)
            .await
            .values()
            .filter(|c| !c.settle.is_empty())
            .count()
            >= n
    })
    .await;
    let found = charges(pg, account).await;
    assert!(
        ok,
        "expected {n} settled charges, the journal has {found:#?}"
    );
    found
}

/// Asserts the rows of one request: one debit of `hold` µc, no top-up, one settle of
/// `cost − hold` with the usage, both rows on `route` with the same request id.
fn assert_settled_at(id: &str, c: &Charged, route: &str, hold: i64, cost: i64, tokens: (i64, i64)) {
    assert_eq!(c.debit.len(), 1, "{id}: one debit row: {c:#?}");
    assert_eq!(c.settle.len(), 1, "{id}: one settle row: {c:#?}");
    assert!(c.extends.is_empty(), "{id}: no top-up: {c:#?}");
    let (d, s) = (&c.debit[0], &c.settle[0]);
    assert_eq!(d.amount, hold, "{id}: the hold: {d:?}");
    assert_eq!(
        d.d_allowance + d.d_purchased,
        -hold,
        "{id}: the hold is taken from the buckets: {d:?}"
    );
    assert_eq!(
        s.amount,
        cost - hold,
        "{id}: settle = true cost − held: {s:?}"
    );
    assert_eq!(
        s.d_allowance + s.d_purchased,
        hold - cost,
        "{id}: the settle moves the buckets by held − true cost: {s:?}"
    );
    assert_eq!(
        (s.tokens_in, s.tokens_out),
        (Some(tokens.0), Some(tokens.1)),
        "{id}: tokens on the settle row: {s:?}"
    );
    assert_eq!(s.upstream_status, Some(200), "{id}: {s:?}");
    assert_eq!(s.reason.as_deref(), Some("usage"), "{id}: {s:?}");
    assert_eq!(d.route.as_deref(), Some(route), "{id}: {d:?}");
    assert_eq!(s.route.as_deref(), Some(route), "{id}: {s:?}");
    assert!(
        d.request_id.as_deref().is_some_and(|r| !r.is_empty()),
        "{id}: the hold traces to its request: {d:?}"
    );
    assert_eq!(
        d.request_id, s.request_id,
        "{id}: hold and settle of one request"
    );
}

/// How an instance admitted its metered requests, and the ledger script calls it made.
#[derive(Debug, Clone, Copy)]
struct Paths {
    sliced: f64,
    exact: f64,
    debit_calls: f64,
    settle_calls: f64,
    extend_calls: f64,
}

async fn paths(app: &App) -> Paths {
    let admissions = |path: &'static str| async move {
        metric(app, "tollgate_metered_admissions_total", &[("path", path)]).await
    };
    let calls = |script: &'static str| async move {
        metric(
            app,
            "tollgate_redis_script_duration_seconds_count",
            &[("script", script)],
        )
        .await
    };
    Paths {
        sliced: admissions("slice").await,
        exact: admissions("exact").await,
        debit_calls: calls("debit").await,
        settle_calls: calls("settle").await,
        extend_calls: calls("extend").await,
    }
}

/// Served from a slice, a hold makes no script call of its own: the debit and settle scripts
/// ran once per hold admitted on the exact path (none of which was refused, retried or
/// hydrated in these tests), never for a sliced one.
fn assert_no_calls_for_sliced_holds(p: Paths, admitted: usize) {
    assert_eq!(p.sliced + p.exact, admitted as f64, "admissions: {p:?}");
    assert_eq!(
        p.debit_calls, p.exact,
        "debit script calls vs exact admissions: {p:?}"
    );
    assert_eq!(
        p.settle_calls, p.exact,
        "settle script calls vs holds admitted on the exact path: {p:?}"
    );
}

// ---------------------------------------------------------------------------------------------

/// 1. Each hold is what the exact path would hold (the reserve; the `max_tokens` estimate with
///    `reserve_from_max_tokens`, or the reserve when that is larger), taken from the slice with
///    no debit, settle or extend script call; each settles locally at its true cost and the
///    batch report journals the settle row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_that_fits_the_slice_is_taken_and_settled_in_process() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let prices = "per_request = 0.01, input_per_1k_tokens = 0.5, output_per_1k_tokens = 1.5";
    let routes = format!(
        "{}{}",
        route("chat", "/v1", &format!("{{ {prices}, reserve = 1 }}")),
        route(
            "est",
            "/est",
            &format!("{{ {prices}, reserve = 0.1, reserve_from_max_tokens = true }}")
        )
    );
    let (cfg, app, account, key, client) =
        one_instance(&env, &up, 1000, "batch_ms = 50\nidle_ms = 1000", &routes).await;
    let usage = "/v1/chat/completions?prompt_tokens=10&completion_tokens=20";
    let est_usage = format!("/est{usage}");
    // 0.01 + ⌈10 × 0.5⌉ + 20 × 1.5 per 1k = 0.045.
    let cost = 10_000 + per_1k(500_000, 10) + per_1k(1_500_000, 20);
    assert_eq!(cost, 45_000);

    // (path, body, the hold the exact path would take).
    let big = serde_json::to_vec(&json!({"model": "gpt-4o-mini", "max_tokens": 1000,
        "messages": [{"role": "user", "content": "hi"}]}))
    .unwrap();
    let small = serde_json::to_vec(&json!({"model": "gpt-4o-mini", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}]}))
    .unwrap();
    let plain = serde_json::to_vec(&chat(false)).unwrap();
    let estimate = |body: &[u8], max_tokens: i64| {
        10_000 + per_1k(500_000, (body.len() as i64 + 3) / 4) + per_1k(1_500_000, max_tokens)
    };
    let big_hold = estimate(&big, 1000);
    assert!(big_hold > 1_500_000, "{big_hold}");
    assert!(estimate(&small, 10) < 100_000, "the reserve is larger");
    let cases: Vec<(&str, Vec<u8>, i64)> = vec![
        (usage, plain.clone(), C),
        (est_usage.as_str(), big.clone(), big_hold),
        (est_usage.as_str(), plain.clone(), 100_000),
        (est_usage.as_str(), small.clone(), 100_000),
    ];
    let rounds = 3;
    let mut holds_by_request = BTreeMap::new();
    for round in 0..rounds {
        for (path, body, hold) in &cases {
            let a = post_bytes(&client, &app, &key, path, body.clone()).await;
            assert_eq!(a.status, 200, "round {round} {path}: {}", a.body);
            assert_eq!(a.body["usage"]["completion_tokens"], 20, "{}", a.body);
            // The header goes out before the body: it carries the hold.
            assert_eq!(
                a.charged().map(|c| crate::journal_util::micros_of(&c)),
                Some(*hold),
                "X-Credits-Charged of {path} with {} body bytes",
                body.len()
            );
            let request_id = a
                .header("x-request-id")
                .unwrap_or_else(|| panic!("no X-Request-Id: {:?}", a.headers));
            holds_by_request.insert(request_id, (*hold, path.starts_with("/est")));
        }
    }
    let n = rounds * cases.len();
    assert_eq!(up.request_count(), n);

    let pg = env.pg().await;
    let found = wait_settled(&pg, &account, n).await;
    assert_eq!(found.len(), n, "one charge per request: {found:#?}");
    for (id, c) in &found {
        let request_id = c.debit.first().and_then(|d| d.request_id.clone());
        let (hold, est) = request_id
            .as_ref()
            .and_then(|r| holds_by_request.get(r))
            .copied()
            .unwrap_or_else(|| panic!("{id}: a hold of no request sent: {c:#?}"));
        let route = if est { "est" } else { "chat" };
        assert_settled_at(id, c, route, hold, cost, (10, 20));
    }
    let p = paths(&app).await;
    assert_no_calls_for_sliced_holds(p, n);
    assert_eq!(p.extend_calls, 0.0, "no stream, no top-up: {p:?}");
    // With the slice in hand after the first report, holds take no other path.
    assert!(
        p.sliced >= (n - 2) as f64,
        "{} of {n} holds took the exact path: {p:?}",
        p.exact
    );
    assert_eq!(
        quiet(&env, &app, &account).await,
        1000 * C - n as i64 * cost
    );
    assert_audit_clean(&env, &cfg).await;
}

/// 2. Money is exact: N concurrent sliced holds, each settled at its true cost; once quiet the
///    balance is initial − Σ true cost to the micro-credit, = Σ journal, audit clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sliced_holds_settle_to_the_exact_true_cost() {
    const N: usize = 40;
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let routes = route(
        "chat",
        "/v1",
        "{ per_request = 0.01, input_per_1k_tokens = 0.5, output_per_1k_tokens = 1.5, reserve = 1 }",
    );
    let (cfg, app, account, key, client) =
        one_instance(&env, &up, 500, "batch_ms = 50\nidle_ms = 1000", &routes).await;
    // Half the requests report 10 / 20 tokens (0.045), half 1000 / 3000 (0.01 + 0.5 + 4.5 =
    // 5.01, more than the hold of 1: the settle takes the extra).
    let cheap = 10_000 + per_1k(500_000, 10) + per_1k(1_500_000, 20);
    let dear = 10_000 + per_1k(500_000, 1000) + per_1k(1_500_000, 3000);
    assert_eq!((cheap, dear), (45_000, 5_010_000));
    let answers = join_all((0..N).map(|i| {
        let (client, app, key) = (&client, &app, &key);
        async move {
            let path = if i % 2 == 0 {
                "/v1/chat/completions?prompt_tokens=10&completion_tokens=20"
            } else {
                "/v1/chat/completions?prompt_tokens=1000&completion_tokens=3000"
            };
            post(client, app, key, path, &chat(false)).await
        }
    }))
    .await;
    let mut by_request = BTreeMap::new();
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.status, 200, "request {i}: {}", a.body);
        assert_eq!(a.charged().as_deref(), Some("1"), "request {i}");
        let request_id = a.header("x-request-id").expect("X-Request-Id");
        let (cost, tokens) = if i % 2 == 0 {
            (cheap, (10, 20))
        } else {
            (dear, (1000, 3000))
        };
        by_request.insert(request_id, (cost, tokens));
    }
    let spent: i64 = by_request.values().map(|(c, _)| c).sum();
    assert_eq!(spent, (N as i64 / 2) * (cheap + dear));

    let balance = quiet(&env, &app, &account).await;
    assert_eq!(
        balance,
        500 * C - spent,
        "initial − Σ true cost, to the micro-credit"
    );
    let pg = env.pg().await;
    let found = wait_settled(&pg, &account, N).await;
    assert_eq!(found.len(), N, "one charge per request: {found:#?}");
    for (id, c) in &found {
        let request_id = c.debit.first().and_then(|d| d.request_id.clone());
        let (cost, tokens) = request_id
            .as_ref()
            .and_then(|r| by_request.get(r))
            .copied()
            .unwrap_or_else(|| panic!("{id}: a hold of no request sent: {c:#?}"));
        assert_settled_at(id, c, "chat", C, cost, tokens);
        assert_eq!(c.balance_effect(), -cost, "{id}");
    }
    let j = journal(&pg, &account).await;
    assert_eq!(j.debits as usize, N, "one debit row per request: {j:?}");
    assert_eq!(j.total(), balance, "balance = Σ journal");
    let p = paths(&app).await;
    assert_no_calls_for_sliced_holds(p, N);
    assert_eq!(p.extend_calls, 0.0, "no stream, no top-up: {p:?}");
    assert!(
        p.exact <= (N / 4) as f64,
        "{} of {N} holds took the exact path: {p:?}",
        p.exact
    );
    assert_audit_clean(&env, &cfg).await;
}

/// 3. SSE streams whose running cost passes the hold top it up from the slice (`extend` rows
///    `<charge>:x1`, `:x2`, …, no extend script call), and the settle makes the total exactly
///    the true cost of the final usage event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_top_up_from_the_slice_and_settle_to_their_final_usage() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // 0.1 credit per output token, hold 1: the running cost (one token per event) passes the
    // hold after 10 events, and again every 10 events after each top-up of one reserve.
    let routes = route("chat", "/v1", "{ output_per_1k_tokens = 100, reserve = 1 }");
    let (cfg, app, account, key, client) =
        one_instance(&env, &up, 100, "batch_ms = 50\nidle_ms = 1000", &routes).await;
    // The slice is taken by a first, small request (1 output token: 0.1).
    let a = post(
        &client,
        &app,
        &key,
        "/v1/chat/completions?prompt_tokens=3&completion_tokens=1",
        &chat(false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let warm = per_1k(100 * C, 1);

    // Two streams at once: 40 events then usage 45 output tokens (4.5); 30 events then 27
    // (2.7).
    let streams = [(40, 45), (30, 27)];
    let results = join_all(streams.iter().map(|(n, tokens)| {
        let (client, app, key) = (&client, &app, &key);
        async move {
            let path = format!(
                "/v1/chat/completions?n={n}&delay_ms=25&prompt_tokens=5&completion_tokens={tokens}"
            );
            post_stream(client, app, key, &path).await
        }
    }))
    .await;
    for ((status, charged, text), (n, tokens)) in results.iter().zip(streams) {
        assert_eq!(*status, 200, "{text}");
        assert_eq!(charged.as_deref(), Some("1"), "a stream carries its hold");
        assert!(
            !text.contains("event: error") && !text.contains("insufficient_credits"),
            "a stream the balance pays for was cut: {text}"
        );
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(
            text.contains(&format!("\"completion_tokens\":{tokens}")),
            "the usage event of the {n}-event stream: {text}"
        );
    }

    let pg = env.pg().await;
    let found = wait_settled(&pg, &account, 3).await;
    assert_eq!(found.len(), 3, "{found:#?}");
    let mut totals = Vec::new();
    for (id, c) in &found {
        assert_eq!(c.debit.len(), 1, "{id}: {c:#?}");
        assert_eq!(c.settle.len(), 1, "{id}: {c:#?}");
        assert_eq!(
            c.debit[0].amount, C,
            "{id}: the hold is the reserve: {c:#?}"
        );
        let s = &c.settle[0];
        assert_eq!(s.reason.as_deref(), Some("usage"), "{id}: {s:?}");
        assert_eq!(s.upstream_status, Some(200), "{id}: {s:?}");
        // Top-ups are numbered from 1 without a gap, each takes something, each is charged,
        // and they carry the hold's request id.
        for (i, (n, x)) in c.extends.iter().enumerate() {
            assert_eq!(*n as usize, i + 1, "{id}: top-up numbers: {c:#?}");
            assert!(x.amount > 0, "{id}: {x:?}");
            assert_eq!(x.d_allowance + x.d_purchased, -x.amount, "{id}: {x:?}");
            assert_eq!(x.request_id, c.debit[0].request_id, "{id}: {x:?}");
        }
        let tokens_out = s.tokens_out.unwrap_or(-1);
        let cost = per_1k(100 * C, tokens_out);
        assert_eq!(
            s.amount,
            cost - c.held(),
            "{id}: settle = true cost − (hold + top-ups): {c:#?}"
        );
        assert_eq!(c.total(), cost, "{id}");
        assert_eq!(c.balance_effect(), -cost, "{id}");
        totals.push((tokens_out, c.extends.len(), cost));
    }
    totals.sort();
    let tokens: Vec<i64> = totals.iter().map(|t| t.0).collect();
    assert_eq!(tokens, [1, 27, 45], "{totals:?}");
    assert_eq!(totals[0].1, 0, "the small request needed no top-up");
    assert!(
        totals[1].1 >= 1 && totals[2].1 >= 2,
        "the streams' running cost passed their holds: {totals:?}"
    );
    let spent = warm + per_1k(100 * C, 45) + per_1k(100 * C, 27);
    assert_eq!(spent, 7_300_000);
    assert_eq!(quiet(&env, &app, &account).await, 100 * C - spent);
    let p = paths(&app).await;
    assert_no_calls_for_sliced_holds(p, 3);
    assert_eq!(
        p.exact, 0.0,
        "the slice was taken by the first request: the streams' holds fit it: {p:?}"
    );
    assert_eq!(
        p.extend_calls, 0.0,
        "the streams were topped up from the slice, not by the extend script: {p:?}"
    );
    assert_audit_clean(&env, &cfg).await;
}

/// 4. A settle that costs more than held takes the extra, allowance first, then purchased into
///    debt; the account is refused after it, until a grant pays the debt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_past_the_hold_charges_the_extra_into_debt_then_refuses() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // Held: the reserve of 2; 1 credit per 1k output tokens.
    let routes = route("chat", "/v1", "{ output_per_1k_tokens = 1, reserve = 2 }");
    let (cfg, app, account, key, client) =
        one_instance(&env, &up, 100, "batch_ms = 50\nidle_ms = 1000", &routes).await;
    // Admitted on the hold (100 ≥ 2); the response really costs 150.
    let a = post(
        &client,
        &app,
        &key,
        "/v1/chat/completions?prompt_tokens=0&completion_tokens=150000",
        &chat(false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.charged().as_deref(), Some("2"));
    let p = paths(&app).await;
    assert_eq!(p.sliced, 1.0, "the hold came from the slice: {p:?}");
    // The instance that served sees the settle at once (its view is exact), the others once
    // it is reported.
    let in_debt = poll_until(Duration::from_secs(10), || async {
        total_of(&account_view(&app, &account).await) == -50 * C
    })
    .await;
    assert!(
        in_debt,
        "the extra was not charged: {}",
        account_view(&app, &account).await
    );
    // In debt: refused, from the slice and on the exact path alike.
    let a = post(&client, &app, &key, "/v1/chat/completions", &chat(false)).await;
    a.assert_error(402, "insufficient_credits");
    let balance = quiet(&env, &app, &account).await;
    assert_eq!(balance, -50 * C);
    let view = account_view(&app, &account).await;
    assert_eq!(
        (
            micros(&view["balance"]["allowance"]),
            micros(&view["balance"]["purchased"])
        ),
        (0, -50 * C),
        "allowance first, the rest as debt in purchased: {view}"
    );
    let a = post(&client, &app, &key, "/v1/chat/completions", &chat(false)).await;
    a.assert_error(402, "insufficient_credits");
    assert_eq!(micros(&a.body["credits_remaining"]), -50 * C, "{}", a.body);
    assert_eq!(micros(&a.body["credits_required"]), 2 * C, "{}", a.body);
    assert_eq!(
        up.request_count(),
        1,
        "a refused request reached the upstream"
    );

    let pg = env.pg().await;
    let found = wait_settled(&pg, &account, 1).await;
    assert_eq!(found.len(), 1, "{found:#?}");
    let (id, c) = found.iter().next().unwrap();
    assert_settled_at(id, c, "chat", 2 * C, 150 * C, (0, 150_000));
    let s = &c.settle[0];
    assert_eq!(
        (s.d_allowance, s.d_purchased),
        (-98 * C, -50 * C),
        "the extra 148: the 98 left in the allowance, then 50 of debt: {s:?}"
    );
    assert_eq!(
        (s.allowance_after, s.purchased_after),
        (0, -50 * C),
        "{s:?}"
    );

    // A grant pays the debt first; then the account is served again.
    let (status, body) = grant(&app, &account, json!(60), "pays-the-debt").await;
    assert_eq!(status, 201, "{body}");
    let a = post(
        &client,
        &app,
        &key,
        "/v1/chat/completions?prompt_tokens=0&completion_tokens=500",
        &chat(false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(quiet(&env, &app, &account).await, 10 * C - C / 2);
    assert_audit_clean(&env, &cfg).await;
}

/// 5. SIGKILL with a sliced hold outstanding: once reported, the hold stays charged as held
///    (as an expired exact hold is settled at what it holds), the dead instance's slice comes
///    back within `ttl_ms`, and the survivor's balance = Σ journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_leaves_its_reported_hold_charged_and_its_slice_comes_back() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let routes = route("chat", "/v1", "{ output_per_1k_tokens = 1, reserve = 3 }");
    let cfg = config(
        &env,
        &up.url(),
        100,
        "batch_ms = 100\nttl_ms = 2000\nidle_ms = 60000",
        &routes,
    );
    let mut a = cfg.spawn().await;
    let b = cfg.spawn().await;
    let (account, key) = a.account_with_key("metered").await;
    let client = http_client_no_pool();
    // A first request takes the slice on A (10 output tokens: 0.01).
    let first = post(
        &client,
        &a,
        &key,
        "/v1/chat/completions?prompt_tokens=0&completion_tokens=10",
        &chat(false),
    )
    .await;
    assert_eq!(first.status, 200, "{}", first.body);
    let warm = per_1k(C, 10);
    let pg = env.pg().await;
    wait_settled(&pg, &account, 1).await;

    // A slow stream through A: 100 events 100 ms apart, far less than its hold of 3.
    let stream = {
        let (client, url, key) = (
            client.clone(),
            a.proxy_url("/v1/chat/completions?n=100&delay_ms=100&completion_tokens=100"),
            key.clone(),
        );
        tokio::spawn(async move {
            if let Ok(mut resp) = client
                .post(url)
                .bearer_auth(key)
                .json(&chat(true))
                .send()
                .await
            {
                while let Ok(Some(_)) = resp.chunk().await {}
            }
        })
    };
    assert!(
        poll_until(Duration::from_secs(10), || async {
            up.sse_sent().len() >= 3
        })
        .await,
        "the stream did not start"
    );
    let p = paths(&a).await;
    assert_eq!(
        (p.sliced, p.exact),
        (2.0, 0.0),
        "both holds came from A's slice: {p:?}"
    );
    // Its hold reported: the debit row is in the journal.
    let reported = poll_until(Duration::from_secs(10), || async {
        charges(&pg, &account)
            .await
            .values()
            .any(|c| c.settle.is_empty() && c.debit.len() == 1)
    })
    .await;
    assert!(
        reported,
        "the stream's hold never reached the journal: {:#?}",
        charges(&pg, &account).await
    );
    a.kill();
    let _ = stream.await;
    let view = account_view(&b, &account).await;
    assert!(
        leased_of(&view) > 0,
        "the dead instance's slice should still be out: {view}"
    );
    // Within the TTL (+ a sweep) the slice is back.
    let back = poll_until(Duration::from_secs(15), || async {
        leased_of(&account_view(&b, &account).await) == 0
    })
    .await;
    assert!(
        back,
        "the dead instance's slice never came back: {}",
        account_view(&b, &account).await
    );
    // The hold stays charged as held: nothing given back, nothing more taken.
    let expected = 100 * C - warm - 3 * C;
    assert_eq!(quiet(&env, &b, &account).await, expected);
    let found = charges(&pg, &account).await;
    assert_eq!(found.len(), 2, "{found:#?}");
    let held: Vec<&Charged> = found.values().filter(|c| c.settle.is_empty()).collect();
    assert_eq!(held.len(), 1, "{found:#?}");
    assert_eq!(held[0].debit[0].amount, 3 * C, "{found:#?}");
    assert_eq!(held[0].balance_effect(), -3 * C, "{found:#?}");
    assert!(
        held[0].extends.is_empty(),
        "no top-up for a stream under its hold"
    );
    // The slice's return is balance-neutral: its journal row may land after the balance agrees.
    let expired = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM ledger_entries WHERE account_id = $1 AND kind = 'lease' AND entry_id LIKE '%:expired'",
        )
        .bind(&account)
        .fetch_one(&pg)
        .await
        .expect("query")
    };
    poll_until(Duration::from_secs(10), || async { expired().await >= 1 }).await;
    assert_eq!(
        expired().await,
        1,
        "the expired slice's return is journaled once"
    );

    // The survivor spends the rest: nothing stays stuck in the dead slice or the dead hold.
    let a2 = post(
        &client,
        &b,
        &key,
        "/v1/chat/completions?prompt_tokens=0&completion_tokens=1000",
        &chat(false),
    )
    .await;
    assert_eq!(a2.status, 200, "{}", a2.body);
    // (B keeps the slice it took for this: idle_ms is long here.)
    assert_eq!(caught_up(&env, &b, &account, false).await, expected - C);
    assert_audit_clean(&env, &cfg).await;
}

/// 6. Two instances, a balance of exactly K holds, requests whose true cost is their hold:
///    exactly K pass across both, not one more; no 402 while the money exists, and the balance
///    never goes below 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k_holds_worth_buys_exactly_k_token_priced_requests_across_two_instances() {
    const K: usize = 30;
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // 1 credit per 1k output tokens, hold 1: a response of 1000 tokens costs exactly its hold.
    let routes = route("chat", "/v1", "{ output_per_1k_tokens = 1, reserve = 1 }");
    // The recall's bound is generous (see leases.rs): what is tested is that no request is
    // refused while the other instance's slice holds the money, not how fast a loaded host is.
    let cfg = config(
        &env,
        &up.url(),
        K as u64,
        "batch_ms = 50\nrecall_wait_ms = 3000",
        &routes,
    );
    let a = cfg.spawn().await;
    let b = cfg.spawn().await;
    let (account, key) = a.account_with_key("metered").await;
    let clients = [http_client_no_pool(), http_client_no_pool()];
    let path = "/v1/chat/completions?prompt_tokens=7&completion_tokens=1000";
    let call = |i: usize| {
        let (client, app, key) = (&clients[i % 2], [&a, &b][i % 2], &key);
        async move { post(client, app, key, path, &chat(false)).await }
    };
    // Both instances take slices first, so the boundary is crossed with money reserved on
    // both sides.
    for i in 0..4 {
        let answer = call(i).await;
        assert_eq!(answer.status, 200, "warm-up {i}: {}", answer.body);
    }
    // Exactly the rest of the balance, concurrently through both: every call must pass.
    let rest = K - 4;
    let answers = join_all((0..rest).map(call)).await;
    let refused: Vec<String> = answers
        .iter()
        .filter(|a| a.status != 200)
        .map(|a| format!("{} {}", a.status, a.body))
        .collect();
    assert!(
        refused.is_empty(),
        "refused while the balance could pay: {refused:?}"
    );
    // Not one more, on either instance.
    for i in 0..2 {
        let answer = call(i).await;
        answer.assert_error(402, "insufficient_credits");
    }
    assert_eq!(up.request_count(), K, "requests the upstream served");
    assert_eq!(quiet(&env, &a, &account).await, 0);
    assert_eq!(quiet(&env, &b, &account).await, 0);
    let pg = env.pg().await;
    let found = wait_settled(&pg, &account, K).await;
    assert_eq!(found.len(), K, "one charge per request");
    for (id, c) in &found {
        assert_settled_at(id, c, "chat", C, C, (7, 1000));
    }
    // Never below zero, at any row.
    let lowest: i64 = sqlx::query_scalar(
        "SELECT COALESCE(min(allowance_after + purchased_after), 0)::BIGINT FROM ledger_entries WHERE account_id = $1",
    )
    .bind(&account)
    .fetch_one(&pg)
    .await
    .expect("query");
    assert!(lowest >= 0, "the balance went to {lowest} µc");
    let (pa, pb) = (paths(&a).await, paths(&b).await);
    assert!(
        pa.sliced + pb.sliced > 0.0,
        "no hold came from a slice: {pa:?} {pb:?}"
    );
    assert_audit_clean(&env, &cfg).await;
}

/// 3b. A stream that outlasts `idle_ms` before its running cost passes the hold still tops up
///     from the slice: an outstanding hold is use of the slice, and a slice given back for
///     idleness must not leave the stream short (cut with `insufficient_credits` while the
///     balance has plenty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_outlasts_idle_ms_still_tops_up_and_is_not_cut() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    // 0.1 credit per output token, hold 1: the running cost passes the hold after 10 events,
    // 1.5 s in, three times the idle time.
    let routes = route("chat", "/v1", "{ output_per_1k_tokens = 100, reserve = 1 }");
    let (cfg, app, account, key, client) =
        one_instance(&env, &up, 100, "batch_ms = 50\nidle_ms = 500", &routes).await;
    let (status, charged, text) = post_stream(
        &client,
        &app,
        &key,
        "/v1/chat/completions?n=25&delay_ms=150&prompt_tokens=5&completion_tokens=25",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(charged.as_deref(), Some("1"));
    let p = paths(&app).await;
    assert_eq!((p.sliced, p.exact), (1.0, 0.0), "{p:?}");
    assert!(
        !text.contains("event: error") && !text.contains("insufficient_credits"),
        "a stream the balance pays for was cut: {text}"
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let cost = per_1k(100 * C, 25);
    assert_eq!(quiet(&env, &app, &account).await, 100 * C - cost);
    let found = wait_settled(&env.pg().await, &account, 1).await;
    let c = found.values().next().unwrap();
    assert!(!c.extends.is_empty(), "no top-up: {c:#?}");
    assert_eq!(c.total(), cost, "{c:#?}");
    assert_eq!(c.settle[0].reason.as_deref(), Some("usage"), "{c:#?}");
    assert_eq!(paths(&app).await.extend_calls, 0.0);
    assert_audit_clean(&env, &cfg).await;
}

/// 8. An exact-path stream (its tier has `tokens_per_month`, so its holds stay exact) beside
///    another instance's slice of the same account: its top-ups take only money outside the
///    slices, so when the slice is spent too the balance ends at exactly 0, never below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exact_streams_top_ups_leave_other_instances_slices_alone() {
    let env = TestEnv::new().await;
    let up = FakeUpstream::start().await;
    let cfg = env.config().redis("timeout_ms = 2000").toml(format!(
        r#"
[leases]
enabled = true
batch_ms = 50
idle_ms = 60000

[[upstreams]]
name = "ai"
url = "{}"

{}
[[routes]]
name = "fixed"
path_prefix = "/fixed"
upstream = "ai"
cost = 1

[tiers.mixed]
monthly_credits = 10
tokens_per_month = 100000000
"#,
        up.url(),
        route("chat", "/v1", "{ output_per_1k_tokens = 100, reserve = 1 }")
    ));
    let a = cfg.spawn().await;
    let b = cfg.spawn().await;
    let (account, key) = a.account_with_key("mixed").await;
    let client = http_client_no_pool();
    let fixed = || async {
        crate::ledger_util::call_with(&client, &b, &key, reqwest::Method::GET, "/fixed/x")
            .await
            .status
    };
    // B takes a slice of the account with two fixed-price requests.
    for _ in 0..2 {
        assert_eq!(fixed().await, StatusCode::OK);
    }
    let reserved = poll_until(Duration::from_secs(10), || async {
        leased_of(&account_view(&b, &account).await) > 0
    })
    .await;
    assert!(
        reserved,
        "B holds no slice: {}",
        account_view(&b, &account).await
    );

    // A 30-credit stream through A on the exact path: cut once the money outside B's slice is
    // gone.
    let (status, _, text) = post_stream(
        &client,
        &a,
        &key,
        "/v1/chat/completions?n=300&delay_ms=5&completion_tokens=300",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("insufficient_credits"), "not cut: {text}");
    assert_eq!(paths(&a).await.sliced, 0.0, "the stream's hold is exact");

    // B spends what its slice still holds, then is refused.
    let mut served = 0;
    while fixed().await == StatusCode::OK {
        served += 1;
        assert!(served <= 10, "B served more than the account ever had");
    }
    assert_eq!(quiet(&env, &b, &account).await, 0, "spent to exactly zero");
    let pg = env.pg().await;
    let lowest: i64 = sqlx::query_scalar(
        "SELECT COALESCE(min(allowance_after + purchased_after), 0)::BIGINT FROM ledger_entries WHERE account_id = $1",
    )
    .bind(&account)
    .fetch_one(&pg)
    .await
    .expect("query");
    assert!(lowest >= 0, "the balance went to {lowest} µc");
    assert_audit_clean(&env, &cfg).await;
}
