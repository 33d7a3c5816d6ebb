//! Model-based test of the ledger scripts: generated sequences of debit / hold / extend /
//! settle / refund / grant / clawback / clock moves (hour windows, period resets) / tier
//! changes / past-due states run against the real Lua scripts on the real Redis through the
//! real Rust ledger API (`tollgate::ledger::Ledger`), each compared after every step with a
//! small reference model written from the README's money rules (`model.rs`): the reply, the
//! buckets, the status, the period, the plan counters, the open holds, and the journal — every
//! entry of the shard stream, parsed by the journal's own parser, must be the one the model
//! expects, and for every bucket balance = Σ entry deltas. Every settled hold's entries add up
//! to exactly its true cost and an open hold's to what it holds.
//!
//! Each case gets its own key prefix (deleted by SCAN afterwards), so no Postgres is needed:
//! the account is created by the real hydrate script with its opening entry. The clock is
//! injected (`now_ms` of the debit), so hour and period boundaries are crossed without sleeping.
//! Not covered: concurrency leases, counted resources, per-action quotas, the sweeper (its
//! clock is Redis's own; a hold settled at what it holds stands in for it).
//!
//! Deterministic: a fixed seed and 256 cases by default, 1–40 steps each. More on demand:
//! `TOLLGATE_MODEL_CASES=5000 TOLLGATE_MODEL_SEED=7 cargo test --test e2e ledger_model`
//! (`PROPTEST_CASES` works too). A failure prints the step that diverged and the shortest
//! sequence that still fails (proptest's shrinking, then a greedy pass removing steps).

mod model;

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use redis::Value;
use tollgate::journal::entry::JournalEntry;
use tollgate::ledger::holds::SettleRequest;
use tollgate::ledger::{CreditRequest, DebitRequest, Ledger};
use tollgate::money::Credits;
use tollgate::redis_conn::{RedisConn, RedisTarget};

use crate::harness::{delete_redis_prefix, random_id, redis_url};
use model::{Model, Op, Reply, ACCOUNT, ACTION, ANCHOR_DAY, PERIOD_END, PERIOD_START, TIERS};

const DEFAULT_CASES: u32 = 256;
const DEFAULT_SEED: u64 = 20;
const HOLD_TTL_MS: u64 = 300_000;

#[derive(Debug, Clone)]
struct Case {
    tier: usize,
    purchased: i64,
    ops: Vec<Op>,
    /// Debits go through group commit (`debit_batch.lua` around `debit.lua`), as by default.
    grouped: bool,
}

fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        1 => Just(0i64),
        3 => (1i64..=30).prop_map(|n| n * 100_000),
        2 => 1i64..=3_000_000,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (amount(), prop::bool::weighted(0.1))
            .prop_map(|(cost, stale_tier)| Op::Debit { cost, stale_tier }),
        4 => (amount(), prop::option::weighted(0.7, amount()))
            .prop_map(|(cost, wanted)| Op::Hold { cost, wanted }),
        3 => (0usize..8, amount()).prop_map(|(hold, step)| Op::Extend { hold, step }),
        4 => (0usize..8, prop::option::weighted(0.75, amount()), 0u64..200)
            .prop_map(|(hold, cost, tokens)| Op::Settle { hold, cost, tokens }),
        2 => (0usize..8).prop_map(|charge| Op::Refund { charge }),
        2 => (0u8..3, amount()).prop_map(|(key, amount)| Op::Grant { key, amount }),
        1 => (0u8..3, amount()).prop_map(|(key, amount)| Op::Clawback { key, amount }),
        3 => prop_oneof![
            Just(60_000i64),
            Just(1_800_000),
            Just(2 * 3_600_000),
            Just(10 * 86_400_000),
            Just(31 * 86_400_000),
        ]
        .prop_map(|ms| Op::Advance { ms }),
        1 => (0usize..TIERS.len()).prop_map(|tier| Op::SetTier { tier }),
        1 => (0u8..3).prop_map(|state| Op::Billing { state }),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    (
        0usize..TIERS.len(),
        prop_oneof![Just(0i64), (1i64..=50).prop_map(|n| n * 100_000)],
        prop::collection::vec(op(), 1..=40),
        prop::bool::ANY,
    )
        .prop_map(|(tier, purchased, ops, grouped)| Case {
            tier,
            purchased,
            ops,
            grouped,
        })
}

fn env_num<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn ledger_scripts_follow_the_model() {
    let config = Config {
        cases: env_num("TOLLGATE_MODEL_CASES")
            .or_else(|| env_num("PROPTEST_CASES"))
            .unwrap_or(DEFAULT_CASES),
        // Deterministic: no regression files; the seed reproduces a failure.
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let seed: u64 = env_num("TOLLGATE_MODEL_SEED").unwrap_or(DEFAULT_SEED);
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = redis_url();
    let conn = rt.block_on(async {
        RedisTarget::parse(&url)
            .unwrap()
            .connect(Duration::from_secs(5), Duration::from_secs(5))
            .await
            .unwrap()
    });
    let run = random_id(8);
    let n = Cell::new(0u64);
    let seen = RefCell::new(BTreeMap::<String, u64>::new());
    let run_one = |case: &Case| {
        n.set(n.get() + 1);
        let prefix = format!("tm{run}c{}", n.get());
        let outcome = rt.block_on(run_case(conn.clone(), &prefix, case, &seen));
        rt.block_on(delete_redis_prefix(&url, &prefix))
            .map_err(|e| TestCaseError::fail(format!("cleanup of {prefix}: {e}")))?;
        outcome
    };
    match runner.run(&case(), |case| run_one(&case)) {
        Ok(()) => {}
        Err(TestError::Fail(_, shrunk)) => {
            // proptest removes steps only before it shrinks their values; a last greedy pass
            // removes every step that the failure does not need.
            let mut case = shrunk;
            let mut i = 0;
            while i < case.ops.len() {
                let mut fewer = case.clone();
                fewer.ops.remove(i);
                if run_one(&fewer).is_err() {
                    case = fewer;
                } else {
                    i += 1;
                }
            }
            let why = run_one(&case)
                .err()
                .map_or_else(String::new, |e| e.to_string());
            panic!(
                "ledger model (seed {seed}): the scripts and the model diverge: {why}\n\
                 minimal failing sequence: {case:#?}"
            );
        }
        Err(e) => panic!("ledger model (seed {seed}): {e}"),
    }
    // The generator must reach every rule, else a passing run proves little.
    let seen = seen.into_inner();
    eprintln!("ledger model: {} cases, outcomes {seen:?}", n.get());
    for outcome in [
        "debit:Charged",
        "debit:Insufficient",
        "debit:Quota:requests_per_hour",
        "debit:Quota:requests_per_month",
        "debit:Quota:tokens_per_month",
        "debit:TierMismatch",
        "debit:Charged:frozen",
        "journal:reset",
        "journal:extend",
        "journal:subscription",
        "extend:short",
        "settle:refund",
        "settle:extra",
        "settle:NotFound",
        "settle:into_debt",
        "credit:Applied",
        "credit:Duplicate",
    ] {
        assert!(
            seen.contains_key(outcome),
            "no generated case reached {outcome}: {seen:?}"
        );
    }
}

/// A short name of what a step did, for the coverage check.
fn label(reply: &Reply, model: &Model, before: (i64, i64)) -> Option<String> {
    Some(match reply {
        Reply::Debit(tollgate::ledger::DebitOutcome::Quota { name, .. }) => {
            format!("debit:Quota:{name}")
        }
        Reply::Debit(tollgate::ledger::DebitOutcome::Charged { .. }) if model.frozen() => {
            "debit:Charged:frozen".into()
        }
        Reply::Debit(d) => format!("debit:{}", format!("{d:?}").split([' ', '{']).next()?),
        Reply::Credit(c) => format!("credit:{}", format!("{c:?}").split([' ', '{']).next()?),
        Reply::Settle(tollgate::ledger::holds::SettleOutcome::Settled { delta, .. }) => {
            if before.0 + before.1 >= 0 && model.allowance + model.purchased < 0 {
                "settle:into_debt".into()
            } else if delta.micros() < 0 {
                "settle:refund".into()
            } else if delta.micros() > 0 {
                "settle:extra".into()
            } else {
                "settle:even".into()
            }
        }
        Reply::Settle(s) => format!("settle:{s:?}"),
        Reply::Extend(Some(x)) if x.short => "extend:short".into(),
        Reply::Extend(x) => format!("extend:{}", if x.is_some() { "ok" } else { "gone" }),
        Reply::Tier(_) => "tier".into(),
        Reply::Status(_) => "billing".into(),
        Reply::None => return None,
    })
}

fn fail(step: usize, op: &Op, what: &str) -> TestCaseError {
    TestCaseError::fail(format!("step {step} ({op:?}): {what}"))
}

async fn run_case(
    mut conn: RedisConn,
    prefix: &str,
    case: &Case,
    seen: &RefCell<BTreeMap<String, u64>>,
) -> Result<(), TestCaseError> {
    let ledger = Ledger::new(prefix, 1, Duration::from_secs(5));
    let ledger = if case.grouped {
        ledger.with_group_commit(8, None)
    } else {
        ledger
    };
    let mut model = Model::new(case.tier, case.purchased);
    hydrate(&ledger, &mut conn, &model)
        .await
        .map_err(|e| TestCaseError::fail(format!("hydrate: {e}")))?;
    check(&ledger, &mut conn, &model)
        .await
        .map_err(|e| TestCaseError::fail(format!("after hydrating: {e}")))?;
    for (step, op) in case.ops.iter().enumerate() {
        let charge = format!("ch{step}");
        let before = (model.allowance, model.purchased);
        let journaled = model.journal.len();
        let (expected, got) = apply(&ledger, &mut conn, &mut model, op, &charge)
            .await
            .map_err(|e| fail(step, op, &format!("ledger error: {e}")))?;
        if expected != got {
            return Err(fail(
                step,
                op,
                &format!("reply\n  model:   {expected:?}\n  scripts: {got:?}"),
            ));
        }
        check(&ledger, &mut conn, &model)
            .await
            .map_err(|e| fail(step, op, &e))?;
        let mut seen = seen.borrow_mut();
        let kinds = model.journal[journaled..]
            .iter()
            .map(|e| format!("journal:{}", e.kind));
        for l in label(&expected, &model, before).into_iter().chain(kinds) {
            *seen.entry(l).or_default() += 1;
        }
    }
    Ok(())
}

/// Creates the account with the real hydrate script, as a first hydration does (no journal
/// yet: the opening allowance is journaled).
async fn hydrate(ledger: &Ledger, conn: &mut RedisConn, model: &Model) -> redis::RedisResult<()> {
    let k = ledger.keys(ACCOUNT);
    let created: i64 = redis::Script::new(include_str!("../../../src/ledger/hydrate.lua"))
        .key(&k.account)
        .key(&k.stream)
        .arg(TIERS[model.tier].name)
        .arg("active")
        .arg(model.allowance)
        .arg(model.purchased)
        .arg(PERIOD_START)
        .arg(PERIOD_END)
        .arg(ANCHOR_DAY)
        .arg(ACCOUNT)
        .arg("1")
        .arg(model.now_ms)
        .arg(0)
        .invoke_async(conn)
        .await?;
    assert_eq!(created, 1, "the account already existed");
    Ok(())
}

/// Runs one step on the model and on the real ledger: (the model's reply, the scripts' reply).
async fn apply(
    ledger: &Ledger,
    conn: &mut RedisConn,
    model: &mut Model,
    op: &Op,
    charge: &str,
) -> Result<(Reply, Reply), tollgate::ledger::LedgerError> {
    Ok(match *op {
        Op::Debit { cost, stale_tier } => {
            let tier = model.caller_tier(stale_tier);
            let req = debit_request(model, tier, cost, charge, None);
            let expected = model.debit(charge, cost, stale_tier, None);
            let got = ledger.debit(conn, &req).await?;
            (Reply::Debit(expected), Reply::Debit(got))
        }
        Op::Hold { cost, wanted } => {
            let tier = model.caller_tier(false);
            let req = debit_request(model, tier, cost, charge, Some(wanted));
            let expected = model.debit(charge, cost, false, Some(wanted));
            let got = ledger.debit(conn, &req).await?;
            (Reply::Debit(expected), Reply::Debit(got))
        }
        Op::Extend { hold, step } => {
            if model.holds.is_empty() {
                return Ok((Reply::None, Reply::None));
            }
            let i = newest(hold, model.holds.len());
            let id = model.holds[i].charge.clone();
            let expected = model.extend(i, step);
            let got = ledger
                .extend(
                    conn,
                    ACCOUNT,
                    &id,
                    Credits::from_micros(step),
                    HOLD_TTL_MS,
                    "model",
                    ACTION,
                )
                .await?;
            (Reply::Extend(expected), Reply::Extend(got))
        }
        Op::Settle { hold, cost, tokens } => {
            if model.holds.is_empty() {
                return Ok((Reply::None, Reply::None));
            }
            let i = newest(hold, model.holds.len());
            let id = model.holds[i].charge.clone();
            let expected = model.settle(i, cost, tokens);
            let got = ledger
                .settle(
                    conn,
                    &SettleRequest {
                        account_id: ACCOUNT,
                        charge_id: &id,
                        cost: cost.map(Credits::from_micros),
                        tokens_in: tokens,
                        tokens_out: 0,
                        status: 200,
                        duration_ms: 1,
                        reason: if cost.is_some() {
                            "usage"
                        } else {
                            "hold_expired"
                        },
                        action: ACTION,
                    },
                )
                .await?;
            (Reply::Settle(expected), Reply::Settle(got))
        }
        Op::Refund { charge: c } => {
            if model.charges.is_empty() {
                return Ok((Reply::None, Reply::None));
            }
            let i = newest(c, model.charges.len());
            let c = model.charges[i].clone();
            let (entry_id, external_id) = (
                format!("{}:refund", c.charge),
                format!("refund:{}", c.charge),
            );
            let req = CreditRequest {
                account_id: ACCOUNT,
                kind: "refund",
                to_allowance: Credits::from_micros(c.from_allow),
                to_purchased: Credits::from_micros(c.from_purch),
                counted: Credits::from_micros(-c.cost),
                entry_id: &entry_id,
                external_id: &external_id,
                mark_ttl: Duration::from_secs(3600),
                route: "chat",
                action: ACTION,
                request_id: &c.charge,
                reason: "upstream_5xx",
                now_ms: model.now_ms,
            };
            let expected = model.refund(i);
            let got = ledger.credit(conn, &req).await?;
            (Reply::Credit(expected), Reply::Credit(got))
        }
        Op::Grant { key, amount } => {
            let id = model::grant_id(key);
            let req = purchased_credit(model, "grant", &id, amount);
            let expected = model.grant(key, amount);
            let got = ledger.credit(conn, &req).await?;
            (Reply::Credit(expected), Reply::Credit(got))
        }
        Op::Clawback { key, amount } => {
            let id = model::clawback_id(key);
            let req = purchased_credit(model, "adjustment", &id, -amount);
            let expected = model.clawback(key, amount);
            let got = ledger.credit(conn, &req).await?;
            (Reply::Credit(expected), Reply::Credit(got))
        }
        Op::Billing { state } => {
            let grace = match state {
                0 => None,
                1 => Some(model::GRACE_LATER),
                _ => Some(model::GRACE_PAST),
            };
            let expected = model.set_billing(state);
            let got = ledger.set_billing_status(conn, ACCOUNT, grace).await?;
            (Reply::Status(expected), Reply::Status(got))
        }
        Op::Advance { ms } => {
            model.now_ms += ms;
            (Reply::None, Reply::None)
        }
        Op::SetTier { tier } => {
            let t = TIERS[tier];
            let entry_id = format!("{charge}:tier");
            let expected = model.set_tier(tier, &entry_id);
            let got = ledger
                .set_tier(
                    conn,
                    ACCOUNT,
                    t.name,
                    t.monthly.map(Credits::from_micros),
                    &entry_id,
                )
                .await?;
            (Reply::Tier(expected), Reply::Tier(got))
        }
    })
}

/// The `i`-th newest of `len` (the oldest when `i` is larger): shrinking an index moves it to
/// the newest, and removing an older step does not change what it picks.
fn newest(i: usize, len: usize) -> usize {
    len - 1 - i.min(len - 1)
}

fn debit_request<'a>(
    model: &Model,
    tier: model::Tier,
    cost: i64,
    charge: &'a str,
    hold: Option<Option<i64>>,
) -> DebitRequest<'a> {
    DebitRequest {
        account_id: ACCOUNT,
        tier: tier.name,
        monthly: tier.monthly.map(Credits::from_micros),
        cost: Credits::from_micros(cost),
        now_ms: model.now_ms,
        request_id: charge,
        charge_id: charge,
        route: "chat",
        action: ACTION,
        requests_per_hour: tier.per_hour,
        requests_per_month: tier.per_month,
        action_per_hour: 0,
        action_per_month: 0,
        max_concurrent: 0,
        lease_ttl_ms: HOLD_TTL_MS,
        deadline_ms: 0,
        hold_ttl_ms: if hold.is_some() { HOLD_TTL_MS } else { 0 },
        wanted: hold.flatten().map(Credits::from_micros),
        tokens_per_month: tier.tokens_per_month,
        counts: None,
        action_max_concurrent: 0,
    }
}

/// A grant or clawback as `RecordedCredit::request` builds it (the entry id is the key).
fn purchased_credit<'a>(
    model: &Model,
    kind: &'a str,
    id: &'a str,
    to_purchased: i64,
) -> CreditRequest<'a> {
    CreditRequest {
        account_id: ACCOUNT,
        kind,
        to_allowance: Credits::ZERO,
        to_purchased: Credits::from_micros(to_purchased),
        counted: Credits::ZERO,
        entry_id: id,
        external_id: id,
        mark_ttl: Duration::from_secs(3600),
        route: "",
        action: "",
        request_id: "",
        reason: "model",
        now_ms: model.now_ms,
    }
}

/// Compares Redis with the model after a step: buckets, tier, period, counters, open holds,
/// and the whole journal (entry by entry, and balance = Σ deltas per bucket).
async fn check(ledger: &Ledger, conn: &mut RedisConn, model: &Model) -> Result<(), String> {
    let e = |e: tollgate::ledger::LedgerError| e.to_string();
    let state = ledger
        .state(conn, ACCOUNT)
        .await
        .map_err(e)?
        .ok_or("the account is gone from Redis")?;
    let want = (
        TIERS[model.tier].name,
        model.status(),
        model.allowance,
        model.purchased,
        model.period_start,
        model.period_end,
    );
    let got = (
        state.tier.as_str(),
        state.status.as_str(),
        state.allowance.micros(),
        state.purchased.micros(),
        state.period_start,
        state.period_end,
    );
    if want != got {
        return Err(format!(
            "state (tier, status, allowance, purchased, period_start, period_end)\n  model:   {want:?}\n  scripts: {got:?}"
        ));
    }
    let counters = ledger.counters(conn, ACCOUNT).await.map_err(e)?;
    let (want, got) = (
        (model.req_p as i64, model.tok_p as i64),
        (counters.requests, counters.tokens),
    );
    if want != got {
        return Err(format!(
            "counters (requests, tokens) this period\n  model:   {want:?}\n  scripts: {got:?}"
        ));
    }

    // The journal: the shard stream, parsed as the flusher parses it.
    let k = ledger.keys(ACCOUNT);
    let reply: Value = redis::cmd("XRANGE")
        .arg(&k.stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let Value::Array(items) = reply else {
        return Err(format!("XRANGE reply: {reply:?}"));
    };
    let mut journal = Vec::with_capacity(items.len());
    for item in &items {
        journal.extend(JournalEntry::from_stream(item).map_err(|e| e.to_string())?);
    }
    let (sum_a, sum_p) = journal
        .iter()
        .fold((0, 0), |(a, p), j| (a + j.d_allowance, p + j.d_purchased));
    if (sum_a, sum_p) != (state.allowance.micros(), state.purchased.micros()) {
        return Err(format!(
            "balance != Σ journal: buckets ({}, {}), journal sums ({sum_a}, {sum_p})",
            state.allowance.micros(),
            state.purchased.micros()
        ));
    }
    for (i, j) in journal.iter().enumerate() {
        let got = model::Entry {
            id: j.entry_id.clone(),
            kind: "",
            amount: j.amount,
            d_allow: j.d_allowance,
            d_purch: j.d_purchased,
            allow_after: j.allowance_after,
            purch_after: j.purchased_after,
        };
        let want = model.journal.get(i).cloned();
        let same = want.as_ref().is_some_and(|w| {
            model::Entry {
                kind: "",
                ..w.clone()
            } == got
                && w.kind == j.kind
                && j.account_id == ACCOUNT
        });
        if !same {
            return Err(format!(
                "journal entry {i}\n  model:   {want:?}\n  scripts: {} {got:?}",
                j.kind
            ));
        }
    }
    if journal.len() != model.journal.len() {
        return Err(format!(
            "journal has {} entries, the model {}: missing {:?}",
            journal.len(),
            model.journal.len(),
            &model.journal[journal.len().min(model.journal.len())..]
        ));
    }

    // Holds: what each one spent is exactly what it holds (open) or its true cost (settled),
    // by the journal; the open ones are in the shard's holds with what the model holds.
    for h in &model.holds {
        let spent: i64 = journal
            .iter()
            .filter(|j| {
                j.entry_id
                    .strip_prefix(h.charge.as_str())
                    .is_some_and(|r| r.starts_with(':') && !r.starts_with(":reset:"))
            })
            .map(|j| -(j.d_allowance + j.d_purchased))
            .sum();
        let want = if h.unlimited {
            0
        } else {
            h.settled_at.unwrap_or(h.held)
        };
        if spent != want {
            return Err(format!(
                "hold {}: its journal entries spend {spent}, the model {want}",
                h.charge
            ));
        }
        let record: Option<String> = redis::cmd("HGET")
            .arg(&k.hold_data)
            .arg(&h.charge)
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        let held = record
            .as_deref()
            .and_then(|r| r.split('|').nth(1))
            .and_then(|v| v.parse::<i64>().ok());
        let want = h.settled_at.is_none().then_some(h.held);
        if held != want {
            return Err(format!(
                "hold {}: Redis holds {held:?}, the model {want:?}",
                h.charge
            ));
        }
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(&k.holds)
            .arg(&h.charge)
            .query_async(conn)
            .await
            .map_err(|e| e.to_string())?;
        if score.is_some() != h.settled_at.is_none() {
            return Err(format!(
                "hold {}: in the holds set {}, settled in the model {}",
                h.charge,
                score.is_some(),
                h.settled_at.is_some()
            ));
        }
    }
    Ok(())
}
