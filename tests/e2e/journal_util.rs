//! Helpers shared by the `journal_*` tests: a metered config, the shard streams of a test's
//! prefix (backlog, pending entries, waiting for the flusher to catch up), the journal as
//! Postgres holds it, balances as the admin API shows them, `tollgate ledger audit|rebuild`,
//! and [`PgGate`], a TCP relay in front of the real Postgres that a test can cut and restore
//! to simulate a database outage.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::harness::{
    json_response, metric_value, pg_admin_url, run_tollgate, App, ConfigBuilder, ProcessOutput,
    TestEnv, ADMIN_TOKEN_ENV,
};

/// The shard count tollgate uses when `[redis] shards` is not set.
pub const SHARDS: u32 = 64;

/// Upstream `up`, two metered routes and two tiers:
/// - `chat`: `/v1/chat`, action `ai_message`, 0.25 credits, refunded on 5xx / connect errors;
/// - `tools`: `/v1/tools`, action `tool_call`, 1 credit;
/// - tier `pro`: 1000 monthly credits, no quotas; tier `free`: 2 monthly credits.
pub fn metered_toml(upstream_url: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream_url}"

[[routes]]
name = "chat"
path_prefix = "/v1/chat"
upstream = "up"
action = "ai_message"
cost = 0.25
refund_on = ["connect_error", "5xx"]

[[routes]]
name = "tools"
path_prefix = "/v1/tools"
upstream = "up"
action = "tool_call"
cost = 1

[tiers.pro]
monthly_credits = 1000

[tiers.free]
monthly_credits = 2
"#
    )
}

/// A config for the metered routes with `[journal] claim_idle_seconds = claim_idle`.
pub fn metered_config(env: &TestEnv, upstream_url: &str, claim_idle: u64) -> ConfigBuilder {
    env.config()
        .toml(metered_toml(upstream_url))
        .toml(format!("[journal]\nclaim_idle_seconds = {claim_idle}"))
}

// ---------------------------------------------------------------------------------------------
// Money

/// Micro-credits of a decimal credit amount as the API prints it (`12.5`, `-0.25`, `3`), in
/// integers only; also the shortest round-trip form serde_json gives a JSON number (`1e-6`).
/// More than 6 decimals is a failure, never rounded away.
pub fn micros_of(text: &str) -> i64 {
    let text = text.trim().trim_matches('"');
    if let Some((mantissa, exp)) = text.split_once(['e', 'E']) {
        let exp: i32 = exp
            .parse()
            .unwrap_or_else(|_| panic!("not a credit amount: {text:?}"));
        let (neg, digits) = match mantissa.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, mantissa),
        };
        let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
        // Shift the decimal point by `exp` in the digit string, then read it as usual.
        let all = format!("{whole}{frac}");
        let point = whole.len() as i32 + exp;
        let plain = if point <= 0 {
            format!("0.{}{all}", "0".repeat(point.unsigned_abs() as usize))
        } else if point as usize >= all.len() {
            format!("{all}{}", "0".repeat(point as usize - all.len()))
        } else {
            format!("{}.{}", &all[..point as usize], &all[point as usize..])
        };
        let v = micros_of(&plain);
        return if neg { -v } else { v };
    }
    let (neg, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let frac = frac.trim_end_matches('0');
    assert!(frac.len() <= 6, "more than 6 decimals in {text:?}");
    let whole: i64 = whole
        .parse()
        .unwrap_or_else(|_| panic!("not a credit amount: {text:?}"));
    let frac: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}")
            .parse()
            .unwrap_or_else(|_| panic!("not a credit amount: {text:?}"))
    };
    let v = whole * 1_000_000 + frac;
    if neg {
        -v
    } else {
        v
    }
}

/// Micro-credits of a JSON number or string, never through float arithmetic: the API prints
/// exact decimals as JSON numbers, and serde_json prints a number back as the shortest decimal
/// that reads as the same value, which is the API's decimal for any amount of up to 15
/// significant digits; that text is converted in integers.
pub fn micros(v: &Value) -> i64 {
    match v {
        Value::Number(n) => match n.as_i64() {
            Some(i) => i * 1_000_000,
            None => micros_of(&n.to_string()),
        },
        Value::String(s) => micros_of(s),
        _ => panic!("not an amount: {v}"),
    }
}

/// `(allowance, purchased, total)` in micro-credits, as `GET /v1/accounts/{id}` shows them.
pub async fn balance(app: &App, account: &str) -> (i64, i64, i64) {
    let (status, body) = app.admin_get(&format!("/v1/accounts/{account}")).await;
    assert_eq!(status, StatusCode::OK, "GET account {account}: {body}");
    let b = &body["balance"];
    (
        micros(&b["allowance"]),
        micros(&b["purchased"]),
        micros(&b["total"]),
    )
}

// ---------------------------------------------------------------------------------------------
// Redis: shard streams

/// FNV-1a 64 of the account id modulo `shards` (the documented key layout).
pub fn shard_of(account_id: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in account_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(shards)) as u32
}

/// `{<prefix>:s<N>}:usage`.
pub fn stream_key(prefix: &str, shard: u32) -> String {
    format!("{{{prefix}:s{shard}}}:usage")
}

/// The usage stream of an account's shard (default shard count).
pub fn account_stream(env: &TestEnv, account: &str) -> String {
    stream_key(env.prefix(), shard_of(account, SHARDS))
}

/// The account hash `{<prefix>:s<N>}:acct:<id>` (default shard count).
pub fn account_hash(env: &TestEnv, account: &str) -> String {
    format!(
        "{{{}:s{}}}:acct:{account}",
        env.prefix(),
        shard_of(account, SHARDS)
    )
}

pub fn all_streams(env: &TestEnv) -> Vec<String> {
    (0..SHARDS).map(|s| stream_key(env.prefix(), s)).collect()
}

/// What waits in Redis: entries still in the shard streams (XLEN, the flusher XDELs what it
/// wrote) and entries delivered to a consumer but not acknowledged (XPENDING).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub len: u64,
    pub pending: u64,
}

/// The count of an `XPENDING <stream> <group>` summary. Only a missing stream or group
/// (`NOGROUP`: nothing was ever read from it) counts as nothing pending; any other error or
/// reply fails the test rather than passing for an empty backlog.
pub fn xpending_count(stream: &str, reply: redis::RedisResult<redis::Value>) -> u64 {
    match reply {
        Ok(v) => match redis_to_json(v) {
            Value::Array(parts) => parts
                .first()
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("XPENDING {stream}: no count in {parts:?}")),
            other => panic!("XPENDING {stream}: unexpected reply {other:?}"),
        },
        Err(e) if e.code() == Some("NOGROUP") => 0,
        Err(e) => panic!("XPENDING {stream}: {e}"),
    }
}

pub async fn backlog(env: &TestEnv) -> Backlog {
    let mut conn = env.redis().await;
    let streams = all_streams(env);
    let mut pipe = redis::pipe();
    for s in &streams {
        pipe.cmd("XLEN").arg(s);
    }
    let lens: Vec<u64> = pipe.query_async(&mut conn).await.expect("XLEN");
    let mut pending = 0;
    for s in &streams {
        let r: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
            .arg(s)
            .arg("tollgate-journal")
            .query_async(&mut conn)
            .await;
        pending += xpending_count(s, r);
    }
    Backlog {
        len: lens.iter().sum(),
        pending,
    }
}

/// A Redis reply as JSON (bulk strings as text) for easy inspection.
pub fn redis_to_json(v: redis::Value) -> Value {
    match v {
        redis::Value::Nil => Value::Null,
        redis::Value::Int(i) => Value::from(i),
        redis::Value::BulkString(b) => Value::from(String::from_utf8_lossy(&b).into_owned()),
        redis::Value::SimpleString(s) => Value::from(s),
        redis::Value::Okay => Value::from("OK"),
        redis::Value::Array(items) | redis::Value::Set(items) => {
            Value::Array(items.into_iter().map(redis_to_json).collect())
        }
        other => Value::from(format!("{other:?}")),
    }
}

/// Polls until every shard stream is empty and nothing is pending; `false` after `timeout`.
pub async fn wait_caught_up(env: &TestEnv, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let b = backlog(env).await;
        if b.len == 0 && b.pending == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Like [`wait_caught_up`] but panics with the backlog (and the app's log) on timeout.
pub async fn assert_caught_up(env: &TestEnv, app: Option<&App>, timeout: Duration) {
    if !wait_caught_up(env, timeout).await {
        if let Some(app) = app {
            app.print_logs();
        }
        panic!(
            "the journal did not catch up within {timeout:?}: {:?} still in Redis",
            backlog(env).await
        );
    }
}

/// XADD of `fields` to `stream`; returns the stream id.
pub async fn xadd(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    fields: &[(&str, String)],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(v);
    }
    cmd.query_async(conn).await.expect("XADD")
}

// ---------------------------------------------------------------------------------------------
// Postgres: the journal

/// One account's journal as Postgres holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journal {
    pub rows: i64,
    pub debits: i64,
    pub distinct_debit_ids: i64,
    pub refunds: i64,
    pub sum_allowance: i64,
    pub sum_purchased: i64,
}

impl Journal {
    pub fn total(&self) -> i64 {
        self.sum_allowance + self.sum_purchased
    }
}

pub async fn journal(pg: &sqlx::PgPool, account: &str) -> Journal {
    let (rows, debits, distinct_debit_ids, refunds, sum_allowance, sum_purchased): (
        i64,
        i64,
        i64,
        i64,
        i64,
        i64,
    ) = sqlx::query_as(
        "SELECT count(*),
                count(*) FILTER (WHERE kind = 'debit'),
                count(DISTINCT entry_id) FILTER (WHERE kind = 'debit'),
                count(*) FILTER (WHERE kind = 'refund'),
                COALESCE(sum(d_allowance), 0)::BIGINT,
                COALESCE(sum(d_purchased), 0)::BIGINT
           FROM ledger_entries WHERE account_id = $1",
    )
    .bind(account)
    .fetch_one(pg)
    .await
    .expect("reading ledger_entries");
    Journal {
        rows,
        debits,
        distinct_debit_ids,
        refunds,
        sum_allowance,
        sum_purchased,
    }
}

/// Rows with this entry id.
pub async fn rows_with_id(pg: &sqlx::PgPool, entry_id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE entry_id = $1")
        .bind(entry_id)
        .fetch_one(pg)
        .await
        .expect("counting rows")
}

/// Every row of the table (all accounts).
pub async fn total_rows(pg: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM ledger_entries")
        .fetch_one(pg)
        .await
        .expect("counting rows")
}

/// Polls until `check` holds on the account's journal; panics with the last value after
/// `timeout`.
pub async fn wait_journal(
    pg: &sqlx::PgPool,
    account: &str,
    timeout: Duration,
    check: impl Fn(&Journal) -> bool,
) -> Journal {
    let deadline = Instant::now() + timeout;
    loop {
        let j = journal(pg, account).await;
        if check(&j) {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "the journal of {account} did not get there within {timeout:?}: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asserts the invariant: the live balance equals the sum of the account's journal, and every
/// debit entry id is stored once.
pub async fn assert_balance_is_journal_sum(app: &App, pg: &sqlx::PgPool, account: &str) {
    let j = journal(pg, account).await;
    let (allowance, purchased, total) = balance(app, account).await;
    assert_eq!(
        (allowance, purchased, total),
        (j.sum_allowance, j.sum_purchased, j.total()),
        "live balance of {account} vs the sum of its journal {j:?}"
    );
    assert_eq!(
        j.debits, j.distinct_debit_ids,
        "duplicate debit rows: {j:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Proxy calls and metrics

/// `GET path` with `key`; returns the status, the `X-Credits-Remaining` header and the body.
pub async fn call(app: &App, key: &str, path: &str) -> (StatusCode, Option<String>, Value) {
    let resp = app
        .client()
        .get(app.proxy_url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let (status, headers, body) = json_response(resp).await;
    let remaining = headers
        .get("x-credits-remaining")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, remaining, body)
}

/// Asserts a 200 and returns `X-Credits-Remaining` in micro-credits.
pub async fn call_ok(app: &App, key: &str, path: &str) -> i64 {
    let (status, remaining, body) = call(app, key, path).await;
    assert_eq!(status, StatusCode::OK, "GET {path}: {body}");
    micros_of(&remaining.unwrap_or_else(|| panic!("no X-Credits-Remaining on GET {path}")))
}

/// A metric sample, 0 when absent.
pub async fn metric(app: &App, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&app.metrics_text().await, name, labels).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// `tollgate ledger ...`

/// Runs `tollgate ledger <what> --config <cfg> [extra...]`.
pub async fn ledger_cmd(
    env: &TestEnv,
    cfg: &ConfigBuilder,
    what: &str,
    extra: &[&str],
) -> ProcessOutput {
    let path = cfg.write();
    let mut args = vec![
        "ledger".to_string(),
        what.to_string(),
        "--config".into(),
        path.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    run_tollgate(
        &args,
        &[(ADMIN_TOKEN_ENV.to_string(), env.admin_token().to_string())],
        Duration::from_secs(30),
    )
    .await
}

// ---------------------------------------------------------------------------------------------
// PgGate: a switchable TCP relay in front of Postgres

/// A TCP relay on 127.0.0.1:0 to the test Postgres. [`cut`](Self::cut) closes every relayed
/// connection and black-holes new ones (accepted, never answered: a connect attempt waits for
/// its own timeout); [`restore`](Self::restore) relays again (the black-holed sockets are
/// closed then).
pub struct PgGate {
    pub addr: SocketAddr,
    up: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl PgGate {
    pub async fn start() -> PgGate {
        let admin = url::Url::parse(&pg_admin_url()).expect("TOLLGATE_TEST_PG_URL is a URL");
        let host = admin.host_str().unwrap_or("127.0.0.1").to_string();
        let port = admin.port().unwrap_or(5432);
        let target = tokio::net::lookup_host((host.as_str(), port))
            .await
            .expect("resolving the Postgres host")
            .next()
            .expect("an address for the Postgres host");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the Postgres gate");
        let addr = listener.local_addr().expect("local addr");
        let (up, _) = watch::channel(true);
        let rx = up.subscribe();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(relay(client, target, rx.clone()));
            }
        });
        PgGate { addr, up, task }
    }

    /// `db_url` (a test database URL) with the host and port of this gate.
    pub fn url(&self, db_url: &str) -> String {
        let mut u = url::Url::parse(db_url).expect("a database URL");
        u.set_host(Some(&self.addr.ip().to_string()))
            .expect("setting the host");
        u.set_port(Some(self.addr.port()))
            .expect("setting the port");
        u.to_string()
    }

    pub fn cut(&self) {
        self.up.send_replace(false);
    }

    pub fn restore(&self) {
        self.up.send_replace(true);
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }
}

impl Drop for PgGate {
    fn drop(&mut self) {
        self.task.abort();
        // Close every relayed connection too.
        self.up.send_replace(false);
    }
}

async fn relay(mut client: TcpStream, target: SocketAddr, mut up: watch::Receiver<bool>) {
    if !*up.borrow_and_update() {
        // Black hole: hold the socket, say nothing, close it once the gate is restored.
        let _ = up.wait_for(|up| *up).await;
        return;
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = up.wait_for(|up| !*up) => {}
    }
    // Both sockets are dropped (closed) here.
}

#[test]
fn credit_amounts_are_read_exactly_in_integers() {
    assert_eq!(micros_of("12.5"), 12_500_000);
    assert_eq!(micros_of("-0.25"), -250_000);
    assert_eq!(micros_of("3"), 3_000_000);
    assert_eq!(micros_of("0.10"), 100_000);
    assert_eq!(micros_of("1e-6"), 1);
    assert_eq!(micros_of("-1.5e-5"), -15);
    assert_eq!(micros_of("2.5e3"), 2_500_000_000);
    assert_eq!(micros(&serde_json::json!(0.016667)), 16_667);
    assert_eq!(micros(&serde_json::json!(0.000001)), 1);
    assert_eq!(micros(&serde_json::json!(19.8)), 19_800_000);
    assert_eq!(micros(&serde_json::json!(-7)), -7_000_000);
    assert_eq!(micros(&serde_json::json!("98.94")), 98_940_000);
}

#[test]
#[should_panic(expected = "more than 6 decimals")]
fn a_sub_micro_credit_amount_is_a_failure_not_rounded() {
    micros(&serde_json::json!(0.0000005));
}
