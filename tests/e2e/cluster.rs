//! tollgate on a real Redis Cluster (`redis.url = "redis+cluster://…"`): each test starts its
//! own 3-primary cluster (one test with a replica per primary) ([`RedisCluster`]), so the tests run in parallel and the fault test can
//! kill its own primary. Accounts are picked so that their shards live on every node.
//!
//! - two processes on one cluster charge exactly: N credits buy N requests per account, on every
//!   node, and the journal and `ledger audit` agree;
//! - a Stripe payment delivered to both processes credits once;
//! - a key revoked on one process is refused by the other within 2 s (pub/sub on the cluster);
//! - moving a busy shard's slot to another node while requests run (ASK / TRYAGAIN, then
//!   MOVED) charges every success once and fails no request, and the flusher drains that
//!   shard's stream on its new node;
//! - a primary killed (SIGKILL) mid-load and started again from its AOF: its accounts answer
//!   503 `metering_unavailable` meanwhile, the other nodes' accounts are served and their
//!   journal keeps reaching Postgres, and once the cluster is whole no credit is lost or spent
//!   twice (a debit whose reply died with the node is voided by the unanswered-debit
//!   reconciler);
//! - on a cluster with a replica per primary ([`RedisCluster::start_with_replicas`]), a primary
//!   killed mid-load for good: its replica is promoted, both processes find it without a
//!   restart (503 only between the kill and shortly after the promotion), the other nodes'
//!   accounts are served throughout, and once the journal has flushed every balance is the sum
//!   of its journal and no account was charged more than one credit per success (debits the
//!   dead primary had not replicated are forgiven, and counted in the output).

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use reqwest::{Method, StatusCode};

use crate::cluster_util::{key_slot, RedisCluster, SlotMap, NODES, NODE_TIMEOUT_MS};
use crate::fake_stripe::FakeStripe;
use crate::harness::{
    http_client, http_client_no_pool, passthrough_toml, poll_until, random_id, App, ConfigBuilder,
    TestEnv,
};
use crate::journal_util::{
    assert_balance_is_journal_sum, journal, ledger_cmd, shard_of, stream_key, Backlog,
};
use crate::ledger_util::{balance, call_with, total, Answer};
use crate::stripe_util::{
    deliver, deliver_ok, event, id, now, pack_session, state, stripe_config, C,
};
use crate::upstream::FakeUpstream;

/// `redis.shards` in these tests: enough for every node to own a few shards.
const SHARDS: u32 = 32;
/// One credit in micro-credits.
const CREDIT: i64 = 1_000_000;

/// A catch-all route under `/v1` costing one credit, and tier `metered` with `credits`.
fn metered_toml(upstream: &str, credits: i64) -> String {
    format!(
        r#"
[[upstreams]]
name = "up"
url = "{upstream}"

[[routes]]
name = "paid"
path_prefix = "/v1"
upstream = "up"
cost = 1

[tiers.metered]
monthly_credits = {credits}
"#
    )
}

/// Two tollgate processes on the cluster with `metered_toml`: `a` names the nodes from the
/// first, `b` from the second (so they start from different seeds).
async fn metered_pair(
    env: &TestEnv,
    cluster: &RedisCluster,
    up: &FakeUpstream,
    credits: i64,
) -> (ConfigBuilder, App, App) {
    let cfg = on_cluster(env.config(), cluster).toml(metered_toml(&up.url(), credits));
    let a = cfg.spawn().await;
    let b = cfg.clone().redis_url(cluster.url_from(1)).spawn().await;
    (cfg, a, b)
}

/// `base` on the cluster, with [`SHARDS`] shards. The timeout is generous: every write is
/// fsynced (`appendfsync always`) on a busy test machine, and a slow reply is not what these
/// tests are about.
fn on_cluster(base: ConfigBuilder, cluster: &RedisCluster) -> ConfigBuilder {
    base.redis_url(cluster.url())
        .redis(format!("shards = {SHARDS}"))
        .redis("timeout_ms = 2000")
}

// ---------------------------------------------------------------------------------------------
// Where accounts live

/// `{<prefix>:s<N>}:acct:<id>`.
fn account_hash(prefix: &str, account: &str) -> String {
    format!("{{{prefix}:s{}}}:acct:{account}", shard_of(account, SHARDS))
}

/// The stream of the account's shard.
fn account_stream(prefix: &str, account: &str) -> String {
    stream_key(prefix, shard_of(account, SHARDS))
}

/// The node serving the account's shard.
fn node_of(map: &SlotMap, prefix: &str, account: &str) -> usize {
    map.owner_of_key(&account_stream(prefix, account))
}

/// `per_node` new account ids whose shard lives on each node: `(id, node)`, node by node.
/// Opens each account on tier `metered` with one key; returns the keys in order.
async fn open_metered(app: &App, accounts: impl IntoIterator<Item = &String>) -> Vec<String> {
    let mut keys = Vec::new();
    for account in accounts {
        app.create_account(account, "metered").await;
        keys.push(app.create_key(account).await.1);
    }
    keys
}

/// Indexes of the accounts on `node`, and of the others.
fn split_by_node(accounts: &[(String, usize)], node: usize) -> (Vec<usize>, Vec<usize>) {
    (0..accounts.len()).partition(|i| accounts[*i].1 == node)
}

fn accounts_per_node(map: &SlotMap, prefix: &str, per_node: usize) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    for node in 0..NODES {
        let mut found = 0;
        for _ in 0..100_000 {
            if found == per_node {
                break;
            }
            let id = format!("acct_{}", random_id(10));
            if node_of(map, prefix, &id) == node {
                out.push((id, node));
                found += 1;
            }
        }
        assert_eq!(
            found, per_node,
            "none of the {SHARDS} shards of {prefix} is on node {node}"
        );
    }
    out
}

/// Another account id in the same shard as `account`.
fn same_shard_as(account: &str) -> String {
    let shard = shard_of(account, SHARDS);
    loop {
        let id = format!("acct_{}", random_id(10));
        if shard_of(&id, SHARDS) == shard && id != account {
            return id;
        }
    }
}

/// Asserts that the account's hash is on `node` (read there with a plain connection).
async fn assert_hash_on(cluster: &RedisCluster, prefix: &str, account: &str, node: usize) {
    let key = account_hash(prefix, account);
    let mut conn = cluster.conn(node).await;
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("EXISTS {key} on node {node}: {e}"));
    assert_eq!(exists, 1, "{key} is not on node {node}");
}

/// `(allowance, purchased)` in µc, read straight from the account's hash on the node that owns
/// it (no hydration can hide a loss); `None` when the hash does not exist.
async fn redis_buckets(cluster: &RedisCluster, prefix: &str, account: &str) -> Option<(i64, i64)> {
    let key = account_hash(prefix, account);
    let (allowance, purchased): (Option<i64>, Option<i64>) = cluster
        .on_owner(
            &key,
            redis::cmd("HMGET")
                .arg(&key)
                .arg("allowance")
                .arg("purchased"),
        )
        .await;
    Some((allowance?, purchased.unwrap_or(0)))
}

// ---------------------------------------------------------------------------------------------
// The journal on a cluster

/// What waits in the shard streams, each read on the node that owns it (a promoted replica
/// included).
async fn backlog(cluster: &RedisCluster, prefix: &str) -> Backlog {
    let map = cluster.slot_map().await;
    let mut conns = BTreeMap::new();
    let mut total = Backlog { len: 0, pending: 0 };
    for shard in 0..SHARDS {
        let stream = stream_key(prefix, shard);
        let owner = map.owner_of_key(&stream);
        let conn = match conns.entry(owner) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(cluster.conn(owner).await),
        };
        let len: u64 = redis::cmd("XLEN")
            .arg(&stream)
            .query_async(conn)
            .await
            .unwrap_or_else(|e| panic!("XLEN {stream}: {e}"));
        total.len += len;
        // No group yet: nothing pending; any other error fails.
        let summary: redis::RedisResult<redis::Value> = redis::cmd("XPENDING")
            .arg(&stream)
            .arg("tollgate-journal")
            .query_async(conn)
            .await;
        total.pending += crate::journal_util::xpending_count(&stream, summary);
    }
    total
}

/// Polls until every shard stream is empty and nothing is pending; panics after `timeout`.
async fn assert_caught_up(cluster: &RedisCluster, prefix: &str, timeout: Duration) {
    let ok = poll_until(timeout, || async {
        let b = backlog(cluster, prefix).await;
        b.len == 0 && b.pending == 0
    })
    .await;
    assert!(
        ok,
        "the journal did not catch up within {timeout:?}: {:?} still in the cluster",
        backlog(cluster, prefix).await
    );
}

/// The account's journal entries by `kind/reason`: count and sum (µc).
async fn journal_by_kind(pg: &sqlx::PgPool, account: &str) -> BTreeMap<String, (i64, i64)> {
    let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT kind, COALESCE(reason, ''), count(*),
                COALESCE(sum(d_allowance + d_purchased), 0)::BIGINT
           FROM ledger_entries WHERE account_id = $1 GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(account)
    .fetch_all(pg)
    .await
    .expect("reading ledger_entries");
    rows.into_iter()
        .map(|(kind, reason, n, sum)| {
            let name = if reason.is_empty() {
                kind
            } else {
                format!("{kind}/{reason}")
            };
            (name, (n, sum))
        })
        .collect()
}

/// `tollgate ledger audit` on this config: asserts it passes without a drift.
async fn assert_audit_clean(env: &TestEnv, cfg: &ConfigBuilder) {
    let out = ledger_cmd(env, cfg, "audit", &[]).await;
    assert!(out.success(), "ledger audit failed: {out}");
    assert!(!out.stdout.contains("DRIFT"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Load

/// One proxied request and what it got.
#[derive(Debug, Clone)]
struct Outcome {
    account: usize,
    /// Which process served it (index into the `apps` given to [`run_load`]).
    app: usize,
    started: Instant,
    finished: Instant,
    status: u16,
    /// The `error` code of an error answer.
    error: String,
}

/// Per-account answers of a load run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    ok: i64,
    insufficient: i64,
    unavailable: i64,
    other: i64,
}

#[derive(Default)]
struct Recorder {
    outcomes: Mutex<Vec<Outcome>>,
    stop: AtomicBool,
}

impl Recorder {
    fn all(&self) -> Vec<Outcome> {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn push(&self, o: Outcome) {
        self.outcomes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(o);
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Answers of an account matching `filter`.
    fn count(&self, account: usize, filter: impl Fn(&Outcome) -> bool) -> Counts {
        let mut c = Counts::default();
        for o in self
            .all()
            .iter()
            .filter(|o| o.account == account && filter(o))
        {
            match o.status {
                200 => c.ok += 1,
                402 => c.insufficient += 1,
                503 => c.unavailable += 1,
                _ => c.other += 1,
            }
        }
        c
    }

    fn counts(&self, account: usize) -> Counts {
        self.count(account, |_| true)
    }

    /// One line for a failure message: the account, its node and its answers so far.
    fn report(&self, accounts: &[(String, usize)], i: usize) -> String {
        format!(
            "{} (node {}): {:?}",
            accounts[i].0,
            accounts[i].1,
            self.counts(i)
        )
    }

    /// Waits until every account has `ok` successes (the load is running), or panics.
    async fn wait_warm(&self, accounts: usize, ok: i64) {
        let warm = poll_until(Duration::from_secs(10), || async {
            (0..accounts).all(|i| self.counts(i).ok >= ok)
        })
        .await;
        assert!(warm, "no load before the fault");
    }
}

/// Load workers per account for a fault test: more traffic on the node that dies, so debits
/// are in flight when it does.
fn fault_workers(accounts: &[(String, usize)], killed: usize) -> Vec<usize> {
    accounts
        .iter()
        .map(|(_, node)| if *node == killed { 3 } else { 1 })
        .collect()
}

/// The `tollgate_unanswered_debits_total` samples of every process, `pid N: …` each.
async fn unanswered_samples(apps: &[&App]) -> Vec<String> {
    let mut samples = Vec::new();
    for app in apps {
        let text = app.metrics_text().await;
        samples.extend(
            text.lines()
                .filter(|l| l.starts_with("tollgate_unanswered_debits_total"))
                .map(|l| format!("pid {}: {l}", app.pid)),
        );
    }
    samples
}

/// `workers` loops per (account, proxy), each sending `POST /v1/load` with the account's key
/// then pausing `pace`, until the recorder is stopped.
async fn run_load(
    apps: &[&App],
    keys: &[String],
    workers: &[usize],
    pace: Duration,
    rec: &Recorder,
) {
    let client = http_client();
    let mut loops = Vec::new();
    for (account, key) in keys.iter().enumerate() {
        for (app_index, app) in apps.iter().enumerate() {
            for _ in 0..workers[account] {
                let client = &client;
                loops.push(async move {
                    while !rec.stopped() {
                        let started = Instant::now();
                        let a = call_with(client, app, key, Method::POST, "/v1/load").await;
                        rec.push(Outcome {
                            account,
                            app: app_index,
                            started,
                            finished: Instant::now(),
                            status: a.status.as_u16(),
                            error: a.body["error"].as_str().unwrap_or_default().to_string(),
                        });
                        tokio::time::sleep(pace).await;
                    }
                });
            }
        }
    }
    join_all(loops).await;
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_a_cluster_charge_exactly_on_every_node() {
    const CREDITS: usize = 12;
    let env = TestEnv::new().await;
    let cluster = RedisCluster::start(env.dir()).await;
    let up = FakeUpstream::start().await;
    let (cfg, a, b) = metered_pair(&env, &cluster, &up, CREDITS as i64).await;

    let map = cluster.slot_map().await;
    let accounts = accounts_per_node(&map, env.prefix(), 2);
    let keys = open_metered(&a, accounts.iter().map(|(id, _)| id)).await;
    for (account, _) in &accounts {
        assert_eq!(total(&b, account).await, CREDITS.to_string());
    }

    // Three times the affordable demand per account, all at once, half through each process.
    let clients = [http_client_no_pool(), http_client_no_pool()];
    let apps = [&a, &b];
    let calls = (0..accounts.len()).flat_map(|acct| (0..3 * CREDITS).map(move |i| (acct, i)));
    let answers: Vec<(usize, Answer)> = join_all(calls.map(|(acct, i)| {
        let (client, app, key) = (&clients[i % 2], apps[i % 2], &keys[acct]);
        async move {
            (
                acct,
                call_with(client, app, key, Method::POST, "/v1/echo").await,
            )
        }
    }))
    .await;

    for (acct, (account, node)) in accounts.iter().enumerate() {
        let mut remaining = Vec::new();
        let mut refused = 0;
        for (_, a) in answers.iter().filter(|(i, _)| *i == acct) {
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
                    refused += 1;
                }
                other => panic!(
                    "{account} (node {node}): unexpected status {other}: {}",
                    a.body
                ),
            }
        }
        assert_eq!(
            remaining.len(),
            CREDITS,
            "successes of {account} (node {node})"
        );
        assert_eq!(refused, 2 * CREDITS, "402s of {account} (node {node})");
        // Every debit saw a distinct balance: CREDITS-1, ..., 0.
        let seen: BTreeSet<usize> = remaining.iter().copied().collect();
        assert_eq!(seen, (0..CREDITS).collect(), "{account}: {remaining:?}");
        for app in [&a, &b] {
            assert_eq!(
                balance(app, account).await,
                ("0".to_string(), "0".to_string(), "0".to_string()),
                "{account}"
            );
        }
        // The account lives on the node its shard's slot says.
        assert_hash_on(&cluster, env.prefix(), account, *node).await;
        assert_eq!(
            redis_buckets(&cluster, env.prefix(), account).await,
            Some((0, 0))
        );
    }
    assert_eq!(up.request_count(), accounts.len() * CREDITS, "upstream");

    // The journal, drained from every node's streams, matches every balance.
    assert_caught_up(&cluster, env.prefix(), Duration::from_secs(15)).await;
    let pg = env.pg().await;
    for (account, _) in &accounts {
        let j = journal(&pg, account).await;
        assert_eq!(j.debits, CREDITS as i64, "{account}: {j:?}");
        assert_balance_is_journal_sum(&a, &pg, account).await;
    }
    assert_audit_clean(&env, &cfg).await;

    // And it stays spent.
    let more = call_with(&clients[0], &b, &keys[0], Method::POST, "/v1/echo").await;
    more.assert_error(402, "insufficient_credits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stripe_payment_delivered_to_both_instances_credits_once() {
    let env = TestEnv::new().await;
    let cluster = RedisCluster::start(env.dir()).await;
    let stripe = FakeStripe::start().await;
    let up = FakeUpstream::start().await;
    let cfg = on_cluster(stripe_config(&env, &stripe, &up), &cluster);
    let a = cfg.spawn().await;
    let b = cfg.clone().redis_url(cluster.url_from(2)).spawn().await;

    let map = cluster.slot_map().await;
    let accounts = accounts_per_node(&map, env.prefix(), 1);
    let mut sessions = Vec::new();
    for (account, node) in &accounts {
        a.create_account(account, "free").await;
        let session = id("cs_test");
        let completed = event(
            "checkout.session.completed",
            pack_session(account, "pack_100", &session, &id("pi")),
            now(),
        );
        // Stripe retries: the same signed event reaches both processes at once...
        let (first, second) = tokio::join!(deliver(&a, &completed), deliver(&b, &completed));
        let mut outcomes = Vec::new();
        for (status, body) in [&first, &second] {
            assert_eq!(*status, StatusCode::OK, "{account} (node {node}): {body}");
            outcomes.push(body["outcome"].as_str().unwrap_or_default().to_string());
        }
        outcomes.sort();
        assert!(
            outcomes[0] == "applied"
                && (outcomes[1] == "duplicate" || outcomes[1] == "already_applied"),
            "{account} (node {node}): outcomes {outcomes:?}"
        );
        // ... and again to each, later.
        deliver_ok(&b, &completed, "duplicate").await;
        deliver_ok(&a, &completed, "duplicate").await;
        for app in [&a, &b] {
            let (allowance, purchased, _, _) = state(app, account).await;
            assert_eq!((allowance, purchased), (10 * C, 110 * C), "{account}");
        }
        assert_hash_on(&cluster, env.prefix(), account, *node).await;
        assert_eq!(
            redis_buckets(&cluster, env.prefix(), account).await,
            Some((10 * C, 110 * C))
        );
        sessions.push(session);
    }

    assert_caught_up(&cluster, env.prefix(), Duration::from_secs(15)).await;
    let pg = env.pg().await;
    for ((account, _), session) in accounts.iter().zip(&sessions) {
        assert_balance_is_journal_sum(&a, &pg, account).await;
        let purchases: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT entry_id, d_allowance, d_purchased FROM ledger_entries
              WHERE account_id = $1 AND kind = 'purchase'",
        )
        .bind(account)
        .fetch_all(&pg)
        .await
        .unwrap();
        assert_eq!(
            purchases,
            vec![(format!("purchase:{session}"), 0, 110 * C)],
            "{account}: one purchase entry"
        );
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM purchases WHERE account_id = $1")
            .bind(account)
            .fetch_one(&pg)
            .await
            .unwrap();
        assert_eq!(rows, 1, "{account}: purchases");
    }
    assert_audit_clean(&env, &cfg).await;
}

/// Subscribers of the invalidation channel on node `i` (`PUBSUB NUMSUB` is per node).
async fn subscribers_on(cluster: &RedisCluster, i: usize, channel: &str) -> i64 {
    let mut conn = cluster.conn(i).await;
    let (_, n): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("PUBSUB NUMSUB on node {i}: {e}"));
    n
}

async fn status_with(app: &App, key: &str) -> u16 {
    app.client()
        .get(app.proxy_url("/v1/models"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// README: within 2 s everywhere; awaited on the refusal, with the margin of
/// `harness::REVOKED_WITHIN`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_on_one_instance_is_refused_by_the_other() {
    let env = TestEnv::new().await;
    let cluster = RedisCluster::start(env.dir()).await;
    let up = FakeUpstream::start().await;
    // A long cache TTL, so only the pub/sub invalidation can explain a fast revocation.
    let cfg = on_cluster(env.config(), &cluster)
        .toml(passthrough_toml(&up.url()))
        .toml("[auth]\nkey_cache_ttl_seconds = 3600\n");
    let a = cfg.spawn().await;
    // B lists the nodes from the last one: the two processes subscribe on different nodes.
    let b = cfg.clone().redis_url(cluster.url_from(2)).spawn().await;
    let channel = format!("{}:invalidate", env.prefix());
    let subscribed = poll_until(Duration::from_secs(5), || async {
        let mut per_node = Vec::new();
        for i in 0..NODES {
            per_node.push(subscribers_on(&cluster, i, &channel).await);
        }
        per_node.iter().sum::<i64>() == 2 && per_node.iter().all(|n| *n <= 1)
    })
    .await;
    let mut per_node = Vec::new();
    for i in 0..NODES {
        per_node.push(subscribers_on(&cluster, i, &channel).await);
    }
    assert!(
        subscribed,
        "expected the two processes subscribed on two different nodes, got {per_node:?}"
    );

    let account = format!("acct_{}", random_id(8));
    a.create_account(&account, "default").await;
    let mut keys = Vec::new();
    for _ in 0..3 {
        keys.push(a.create_key(&account).await);
    }
    let (_, other_key) = b.create_key(&account).await;
    for app in [&a, &b, &a, &b] {
        for (_, key) in &keys {
            assert_eq!(status_with(app, key).await, 200);
        }
        assert_eq!(status_with(app, &other_key).await, 200);
    }

    // Revoked one by one through A: the announcements leave from whichever node A's
    // PUBLISH reaches; B hears each on its own node.
    for (key_id, key) in &keys {
        let revoked_at = Instant::now();
        a.revoke_key(key_id).await;
        let on_b = poll_until(crate::harness::REVOKED_WITHIN, || async {
            status_with(&b, key).await == 401
        })
        .await;
        let took = revoked_at.elapsed();
        assert!(
            on_b,
            "B still accepts key {key_id} {took:?} after its revocation on A"
        );
        assert_eq!(status_with(&a, key).await, 401);
    }
    for app in [&a, &b] {
        for (_, key) in &keys {
            assert_eq!(status_with(app, key).await, 401);
        }
        assert_eq!(status_with(app, &other_key).await, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_busy_shard_to_another_node_charges_every_request_once() {
    const CREDITS: i64 = 100_000;
    let env = TestEnv::new().await;
    let cluster = RedisCluster::start(env.dir()).await;
    let up = FakeUpstream::start().await;
    let (cfg, a, b) = metered_pair(&env, &cluster, &up, CREDITS).await;
    let prefix = env.prefix().to_string();

    // `busy` and `neighbour` share a shard (so the slot holds two accounts while it is half
    // moved); `elsewhere` lives on the node the slot moves to.
    let map = cluster.slot_map().await;
    let busy = accounts_per_node(&map, &prefix, 1)[0].0.clone();
    let neighbour = same_shard_as(&busy);
    let from = node_of(&map, &prefix, &busy);
    let to = (from + 1) % NODES;
    let elsewhere = accounts_per_node(&map, &prefix, 1)
        .into_iter()
        .find(|(_, node)| *node == to)
        .map(|(id, _)| id)
        .expect("an account on the target node");
    let accounts = [busy.clone(), neighbour, elsewhere];
    let keys = open_metered(&a, &accounts).await;
    let stream = account_stream(&prefix, &busy);
    let slot = cluster.keyslot(&stream).await;
    assert_eq!(slot, key_slot(&stream));

    let rec = Recorder::default();
    let mut migrating_at = Instant::now();
    let mut moved_at = Instant::now();
    let mut keys_moved = 0;
    let apps = [&a, &b];
    let load = run_load(&apps, &keys, &[2, 1, 1], Duration::from_millis(5), &rec);
    let reshard = async {
        let warm = poll_until(Duration::from_secs(10), || async { rec.counts(0).ok >= 20 }).await;
        if warm {
            // As `redis-cli --cluster reshard` moves a slot, one key at a time with 20 ms
            // between keys (about as long as a slot holding a few hundred accounts takes), so
            // requests meet the slot half moved: the source answers TRYAGAIN to a script while
            // it holds some of its keys and ASK once it holds none; the importing node answers
            // TRYAGAIN to a multi-key script missing keys, until the slot is handed over.
            let mut m = cluster.begin_migration(slot, to).await;
            migrating_at = Instant::now();
            while cluster.migrate_keys(&mut m, 1, 1).await > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cluster.finish_migration(&mut m).await;
            moved_at = Instant::now();
            keys_moved = m.keys_moved;
            // Requests go on against the new owner (MOVED).
            poll_until(Duration::from_secs(10), || async {
                rec.count(0, |o| o.started > moved_at && o.status == 200).ok >= 20
            })
            .await;
        }
        rec.stop();
        warm
    };
    let (_, warm) = tokio::join!(load, reshard);
    assert!(warm, "no load before the migration: {:?}", rec.counts(0));
    let window = moved_at - migrating_at;
    eprintln!(
        "slot {slot} (shard of {busy}) moved from node {from} to node {to}: {keys_moved} keys, \
         MIGRATING for {window:?}"
    );
    assert!(keys_moved >= 3, "the slot held {keys_moved} keys");

    let served: Vec<i64> = (0..accounts.len()).map(|i| rec.counts(i).ok).collect();
    let during = rec
        .count(0, |o| o.started >= migrating_at && o.started < moved_at)
        .ok;
    let after = rec.count(0, |o| o.started >= moved_at).ok;
    eprintln!("busy account: {during} successes started while MIGRATING, {after} after the move");
    assert!(after >= 20, "{after}");
    assert_eq!(
        up.request_count() as i64,
        served.iter().sum::<i64>(),
        "upstream"
    );

    // The slot, with its stream, is on the new node now.
    assert_eq!(cluster.owner_of_key(&stream).await, to);
    assert_eq!(cluster.count_keys_in_slot(from, slot).await, 0);
    assert_hash_on(&cluster, &prefix, &busy, to).await;

    // Charged once per success, exactly; the journal drained from the new node agrees.
    for (account, ok) in accounts.iter().zip(&served) {
        assert_eq!(
            redis_buckets(&cluster, &prefix, account).await,
            Some(((CREDITS - ok) * CREDIT, 0)),
            "{account}: {ok} successes"
        );
    }
    assert_caught_up(&cluster, &prefix, Duration::from_secs(20)).await;
    let pg = env.pg().await;
    for (account, ok) in accounts.iter().zip(&served) {
        let j = journal(&pg, account).await;
        assert_eq!(
            (j.debits, j.distinct_debit_ids),
            (*ok, *ok),
            "{account}: {j:?}"
        );
        assert_balance_is_journal_sum(&a, &pg, account).await;
    }
    assert_audit_clean(&env, &cfg).await;

    // And the move cost no request: every answer was a success (a debit refused with ASK /
    // TRYAGAIN while the slot is half moved is retried until it lands).
    for (i, account) in accounts.iter().enumerate() {
        let failures: Vec<String> = rec
            .all()
            .iter()
            .filter(|o| o.account == i && o.status != 200)
            .map(|o| {
                let at = o.started.checked_duration_since(migrating_at).map_or_else(
                    || format!("{:?} before", migrating_at - o.started),
                    |d| format!("{d:?} into"),
                );
                format!("{} {} (started {at} the migration)", o.status, o.error)
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{account}: {:?} with the slot MIGRATING for {window:?}; failures: {failures:#?}",
            rec.counts(i)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_restarted_mid_load_loses_no_credit_and_spends_none_twice() {
    const CREDITS: i64 = 100_000;
    const KILLED: usize = 0;
    let env = TestEnv::new().await;
    let mut cluster = RedisCluster::start(env.dir()).await;
    let up = FakeUpstream::start().await;
    let (cfg, a, b) = metered_pair(&env, &cluster, &up, CREDITS).await;
    let prefix = env.prefix().to_string();

    let map = cluster.slot_map().await;
    let accounts = accounts_per_node(&map, &prefix, 2);
    let keys = open_metered(&a, accounts.iter().map(|(id, _)| id)).await;
    let (on_killed, elsewhere) = split_by_node(&accounts, KILLED);

    let rec = Recorder::default();
    let mut kill_at = Instant::now();
    let mut restart_at = Instant::now();
    let mut healthy_at = Instant::now();
    let mut outage_journal: Vec<String> = Vec::new();
    let pg = env.pg().await;
    let apps = [&a, &b];
    let workers = fault_workers(&accounts, KILLED);
    let load = run_load(&apps, &keys, &workers, Duration::from_millis(10), &rec);
    let fault = async {
        rec.wait_warm(accounts.len(), 20).await;
        kill_at = Instant::now();
        cluster.kill_node(KILLED);
        let noticed = poll_until(Duration::from_secs(10), || async {
            on_killed
                .iter()
                .all(|&i| rec.count(i, |o| o.started > kill_at).unavailable > 0)
        })
        .await;
        assert!(noticed, "no 503 for the killed node's accounts");
        // Long enough for the other nodes to flag it as failed.
        let down_for = Duration::from_millis(NODE_TIMEOUT_MS + 1000);
        if let Some(rest) = down_for.checked_sub(kill_at.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        // The healthy nodes' journal keeps flowing meanwhile: what they charged in the first
        // half of the outage reaches Postgres while the node is still down.
        let mid = kill_at + down_for / 2;
        let flushed = poll_until(Duration::from_secs(10), || async {
            for &i in &elsewhere {
                let charged = rec.count(i, |o| o.finished < mid).ok;
                if journal(&pg, &accounts[i].0).await.debits < charged {
                    return false;
                }
            }
            true
        })
        .await;
        if !flushed {
            for &i in &elsewhere {
                outage_journal.push(format!(
                    "{}: {} successes before mid-outage, {:?} in the journal",
                    accounts[i].0,
                    rec.count(i, |o| o.finished < mid).ok,
                    journal(&pg, &accounts[i].0).await
                ));
            }
        }
        restart_at = Instant::now();
        cluster.restart_node(KILLED).await;
        healthy_at = Instant::now();
        let recovered = poll_until(Duration::from_secs(15), || async {
            on_killed
                .iter()
                .all(|&i| rec.count(i, |o| o.started > healthy_at).ok >= 5)
        })
        .await;
        rec.stop();
        recovered
    };
    let (_, recovered) = tokio::join!(load, fault);

    let report = |i: usize| rec.report(&accounts, i);
    let all: Vec<String> = (0..accounts.len()).map(report).collect();
    eprintln!(
        "outage {:?}, restart took {:?}; answers: {all:#?}",
        restart_at - kill_at,
        healthy_at - restart_at
    );
    assert!(
        recovered,
        "the killed node's accounts are not served again: {all:#?}"
    );

    // During the outage: the killed node's accounts fail closed, the others are served.
    let in_outage = |o: &Outcome| o.started > kill_at && o.finished < restart_at;
    for &i in &on_killed {
        let wrong: Vec<String> = rec
            .all()
            .iter()
            .filter(|o| o.account == i && in_outage(o))
            .filter(|o| !(o.status == 503 && o.error == "metering_unavailable"))
            .map(|o| format!("{} {}", o.status, o.error))
            .collect();
        assert!(
            wrong.is_empty(),
            "{}: during the outage {wrong:?}",
            report(i)
        );
        assert!(rec.count(i, in_outage).unavailable > 0, "{}", report(i));
    }
    for &i in &elsewhere {
        let c = rec.count(i, in_outage);
        assert!(
            c.ok > 0
                && c == Counts {
                    ok: c.ok,
                    ..Counts::default()
                },
            "{}: during the outage {c:?}",
            report(i)
        );
    }
    for i in 0..accounts.len() {
        let c = rec.counts(i);
        assert_eq!((c.insufficient, c.other), (0, 0), "{}", report(i));
    }
    let served: i64 = (0..accounts.len()).map(|i| rec.counts(i).ok).sum();
    assert_eq!(up.request_count() as i64, served, "upstream");

    // Once the cluster is whole and the journal has flushed: every balance is the initial
    // credit minus one per success, exactly. (A debit whose reply was lost with the node is
    // voided by a `refund` with reason `unanswered_debit` once the journal proves it ran.)
    assert_caught_up(&cluster, &prefix, Duration::from_secs(30)).await;
    let expected = |i: usize| Some(((CREDITS - rec.counts(i).ok) * CREDIT, 0));
    let exact = poll_until(Duration::from_secs(30), || async {
        for (i, (account, _)) in accounts.iter().enumerate() {
            if redis_buckets(&cluster, &prefix, account).await != expected(i) {
                return false;
            }
        }
        true
    })
    .await;
    if !exact {
        let mut lines = Vec::new();
        for (i, (account, _)) in accounts.iter().enumerate() {
            let got = redis_buckets(&cluster, &prefix, account).await;
            lines.push(format!(
                "{}\n    balance {got:?}, expected {:?} (difference {} µc)\n    journal {:?}",
                report(i),
                expected(i),
                got.map_or(0, |g| g.0 - expected(i).map_or(0, |e| e.0)),
                journal_by_kind(&pg, account).await
            ));
        }
        panic!(
            "balances are not initial - cost x successes 30 s after the journal caught up:\n{}\n\
             unanswered debits:\n{}",
            lines.join("\n"),
            unanswered_samples(&apps).await.join("\n")
        );
    }
    assert_caught_up(&cluster, &prefix, Duration::from_secs(30)).await;
    let unanswered = unanswered_samples(&apps).await;
    for (i, (account, _)) in accounts.iter().enumerate() {
        assert_balance_is_journal_sum(&a, &pg, account).await;
        eprintln!(
            "{}: journal {:?}",
            report(i),
            journal_by_kind(&pg, account).await
        );
    }
    eprintln!("unanswered debits (both processes): {unanswered:?}");
    assert_audit_clean(&env, &cfg).await;
    assert!(
        outage_journal.is_empty(),
        "the journal of the healthy nodes stalled while node {KILLED} was down (10 s after the \
         restart was due):\n{}",
        outage_journal.join("\n")
    );
}

/// How long after every surviving node knows the promoted replica a process may still answer
/// 503 for its accounts: the next failed request to the dead node triggers a slot map refresh
/// (at most one per 200 ms), which may first wait on the dead node (up to `redis.timeout_ms`)
/// before asking a live one.
const FOLLOW_PROMOTION_WITHIN: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_primary_is_replaced_by_its_replica_and_no_credit_is_spent_twice() {
    const CREDITS: i64 = 100_000;
    const KILLED: usize = 0;
    // An unanswered debit is settled once Redis's clock is past its deadline (`timeout_ms`)
    // plus a 1 s margin, in rounds a second apart: give it that and three rounds.
    const RESOLVED_AFTER: Duration = Duration::from_secs(2 + 1 + 3);
    let env = TestEnv::new().await;
    let mut cluster = RedisCluster::start_with_replicas(env.dir()).await;
    let up = FakeUpstream::start().await;
    let (cfg, a, b) = metered_pair(&env, &cluster, &up, CREDITS).await;
    let prefix = env.prefix().to_string();

    let before = cluster.slot_map().await;
    assert_eq!(before.primaries(), (0..NODES).collect::<BTreeSet<_>>());
    let replicas = before.replicas_of(KILLED);
    assert_eq!(replicas.len(), 1, "replicas of node {KILLED}: {replicas:?}");
    let replica = replicas.into_iter().next().unwrap_or(usize::MAX);
    let accounts = accounts_per_node(&before, &prefix, 2);
    let keys = open_metered(&a, accounts.iter().map(|(id, _)| id)).await;
    let (on_killed, elsewhere) = split_by_node(&accounts, KILLED);

    let rec = Recorder::default();
    let mut kill_at = Instant::now();
    let mut promoted_at = Instant::now();
    let mut promoted = usize::MAX;
    let apps = [&a, &b];
    let workers = fault_workers(&accounts, KILLED);
    let load = run_load(&apps, &keys, &workers, Duration::from_millis(10), &rec);
    let fault = async {
        rec.wait_warm(accounts.len(), 20).await;
        kill_at = Instant::now();
        // Killed for good: only its replica can bring its shards back.
        cluster.kill_node(KILLED);
        promoted = cluster.wait_promotion(KILLED, &before).await;
        promoted_at = Instant::now();
        // Both processes find the new primary by themselves (no restart, no config change).
        let recovered = poll_until(Duration::from_secs(15), || async {
            on_killed.iter().all(|&i| {
                (0..apps.len())
                    .all(|p| rec.count(i, |o| o.app == p && o.started > promoted_at).ok >= 5)
            })
        })
        .await;
        rec.stop();
        recovered
    };
    let (_, recovered) = tokio::join!(load, fault);

    let report = |i: usize| rec.report(&accounts, i);
    let all: Vec<String> = (0..accounts.len()).map(report).collect();
    let outcomes = rec.all();
    // Per process: the last 503 of the killed node's accounts, and its first success after
    // the kill, relative to the promotion as the cluster's nodes all saw it.
    let since_promotion = |t: Instant| {
        t.checked_duration_since(promoted_at)
            .map_or_else(|| format!("-{:?}", promoted_at - t), |d| format!("+{d:?}"))
    };
    let mut timeline = Vec::new();
    for (p, app) in apps.iter().enumerate() {
        let mine: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| o.app == p && on_killed.contains(&o.account))
            .collect();
        let last_503 = mine
            .iter()
            .filter(|o| o.status == 503)
            .map(|o| o.started)
            .max();
        let first_ok = mine
            .iter()
            .filter(|o| o.status == 200 && o.started > kill_at)
            .map(|o| o.finished)
            .min();
        let mut waits: Vec<Duration> = mine
            .iter()
            .filter(|o| o.status == 503)
            .map(|o| o.finished - o.started)
            .collect();
        waits.sort();
        timeline.push(format!(
            "process {p} (pid {}): last 503 started {}, first success after the kill finished \
             {} (relative to the promotion); {} 503s taking {:?} (median) to {:?}",
            app.pid,
            last_503.map_or("never".into(), since_promotion),
            first_ok.map_or("never".into(), since_promotion),
            waits.len(),
            waits.get(waits.len() / 2).copied().unwrap_or_default(),
            waits.last().copied().unwrap_or_default(),
        ));
    }
    eprintln!(
        "node {KILLED} killed; node {promoted} (its replica) serves its slots on every node \
         {:?} later\n{}\nanswers: {all:#?}",
        promoted_at - kill_at,
        timeline.join("\n")
    );
    assert_eq!(promoted, replica, "the promoted node");
    assert!(
        recovered,
        "PRODUCT BUG? node {KILLED}'s accounts are not served again 15 s after its replica \
         (node {replica}) took over its slots, without a restart of tollgate:\n{}\n{all:#?}",
        timeline.join("\n")
    );

    // The failed node's accounts: 503 `metering_unavailable` only between the kill and the
    // processes finding the new primary, served before and after.
    for &i in &on_killed {
        let answers: Vec<&Outcome> = outcomes.iter().filter(|o| o.account == i).collect();
        let wrong: Vec<String> = answers
            .iter()
            .filter(|o| o.status != 200)
            .filter(|o| {
                !(o.status == 503
                    && o.error == "metering_unavailable"
                    && o.finished > kill_at
                    && o.started < promoted_at + FOLLOW_PROMOTION_WITHIN)
            })
            .map(|o| {
                format!(
                    "{} {} from process {} started {}",
                    o.status,
                    o.error,
                    o.app,
                    since_promotion(o.started)
                )
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "{}: failures outside the failover window (kill at {}, promotion, then {:?} for \
             the processes to follow):\n{wrong:#?}\n{}",
            report(i),
            since_promotion(kill_at),
            FOLLOW_PROMOTION_WITHIN,
            timeline.join("\n")
        );
        assert!(rec.counts(i).unavailable > 0, "{}: no 503", report(i));
    }
    // The other nodes' accounts: served all along, also while the slots changed hands.
    for &i in &elsewhere {
        let c = rec.counts(i);
        assert_eq!(
            c,
            Counts {
                ok: c.ok,
                ..Counts::default()
            },
            "{}",
            report(i)
        );
        let in_failover = rec
            .count(i, |o| o.started > kill_at && o.finished < promoted_at)
            .ok;
        assert!(
            in_failover > 0,
            "{}: none served in the failover",
            report(i)
        );
    }
    let served: Vec<i64> = (0..accounts.len()).map(|i| rec.counts(i).ok).collect();
    assert_eq!(
        up.request_count() as i64,
        served.iter().sum::<i64>(),
        "upstream"
    );

    // Once the journal has flushed (the failed node's streams from its replica) and the
    // unanswered debits are resolved: every balance is the sum of its journal. Replication is
    // asynchronous, so a debit the dead primary acknowledged but had not passed on is lost
    // with it (the client was served, the credit is forgiven): the failed node's accounts may
    // be charged less than one credit per success, never more.
    let pg = env.pg().await;
    let last_503 = outcomes
        .iter()
        .filter(|o| o.status == 503)
        .map(|o| o.finished)
        .max()
        .unwrap_or(kill_at);
    let unanswered = || unanswered_samples(&apps);
    let voided = |samples: &[String]| -> i64 {
        samples
            .iter()
            .filter(|l| l.contains("outcome=\"voided\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as i64)
            .sum()
    };
    assert_caught_up(&cluster, &prefix, Duration::from_secs(30)).await;
    let settled = poll_until(Duration::from_secs(60), || async {
        if last_503.elapsed() < RESOLVED_AFTER {
            return false;
        }
        let b = backlog(&cluster, &prefix).await;
        if b.len != 0 || b.pending != 0 {
            return false;
        }
        let mut refunds = 0;
        for (i, (account, _)) in accounts.iter().enumerate() {
            let j = journal(&pg, account).await;
            let got = redis_buckets(&cluster, &prefix, account).await;
            if got != Some((j.sum_allowance, j.sum_purchased)) || j.debits - j.refunds > served[i] {
                return false;
            }
            refunds += j.refunds;
        }
        refunds == voided(&unanswered().await)
    })
    .await;

    let mut lines = Vec::new();
    let mut forgiven = Vec::new();
    for (i, (account, node)) in accounts.iter().enumerate() {
        let got = redis_buckets(&cluster, &prefix, account).await;
        let charged_micros = CREDITS * CREDIT - got.map_or(0, |(al, pu)| al + pu);
        let f = served[i] - charged_micros / CREDIT;
        if *node == KILLED {
            forgiven.push((account.clone(), f));
        }
        lines.push(format!(
            "{}\n    balance {got:?} = initial - {charged_micros} µc; {} successes, {f} forgiven\n    \
             journal {:?}",
            report(i),
            served[i],
            journal_by_kind(&pg, account).await
        ));
        if f != 0 && *node != KILLED {
            lines.push("    ^ an account of a node that did not fail".into());
        }
    }
    let unanswered_now = unanswered().await;
    let summary = format!(
        "{}\nforgiven (served, charge lost with node {KILLED}): {forgiven:?}\nunanswered debits \
         (both processes): {unanswered_now:?}",
        lines.join("\n")
    );
    eprintln!("{summary}");
    assert!(
        settled,
        "balances are not the sum of their journals (or charge more than one credit per \
         success) 60 s after the journal caught up:\n{summary}"
    );

    let mut refunds = 0;
    for (i, (account, node)) in accounts.iter().enumerate() {
        let j = journal(&pg, account).await;
        assert_balance_is_journal_sum(&a, &pg, account).await;
        let (allowance, purchased) = redis_buckets(&cluster, &prefix, account)
            .await
            .unwrap_or_else(|| panic!("{account}: no hash\n{summary}"));
        assert_eq!(
            (allowance, purchased),
            (j.sum_allowance, j.sum_purchased),
            "{}\n{summary}",
            report(i)
        );
        let charged = j.debits - j.refunds;
        assert_eq!(
            (allowance + purchased, purchased),
            ((CREDITS - charged) * CREDIT, 0),
            "{}: one credit per debit entry not refunded\n{summary}",
            report(i)
        );
        let kinds = journal_by_kind(&pg, account).await;
        assert_eq!(
            kinds.get("refund/unanswered_debit").map_or(0, |(n, _)| *n),
            j.refunds,
            "{}: every refund voids an unanswered debit\n{summary}",
            report(i)
        );
        refunds += j.refunds;
        if *node == KILLED {
            // Never spent twice: at most one credit per success.
            assert!(
                charged <= served[i],
                "{}: charged {charged} for {} successes\n{summary}",
                report(i),
                served[i]
            );
        } else {
            // Untouched by the failover: exactly one credit per success, no refund.
            assert_eq!(
                (j.debits, j.refunds, charged),
                (served[i], 0, served[i]),
                "{}\n{summary}",
                report(i)
            );
        }
    }
    assert_eq!(
        refunds,
        voided(&unanswered_now),
        "refund entries vs unanswered debits voided\n{summary}"
    );
    assert_audit_clean(&env, &cfg).await;
}
