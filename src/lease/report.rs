//! The report: one `slice.lua` call per shard per batch window. It applies the requests this
//! instance served from its slices (one journal row each, written to the stream as one entry),
//! then renews, tops up or gives back each slice, and brings back each account's tier, status
//! and balance. Reports of one shard are sequential and numbered; a report whose outcome is
//! unknown (timeout, lost connection) is sent again unchanged, and Redis applies it once.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use redis::{Script, Value};

use super::slice::{Mode, Row, RowKind};
use super::{Leases, Slot, Stores};
use crate::ledger::keys::{shard_tag, stream, AccountKeys};
use crate::ledger::LedgerError;

static SLICE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("slice.lua")));
static EXPIRE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("slice_expire.lua")));

/// How long a recalled or short account stays on the exact path.
const EXACT_FOR: Duration = Duration::from_millis(1_000);

/// Per shard: the report sequence and a report waiting to be sent again.
#[derive(Default)]
pub struct ShardReports {
    seq: u64,
    unsent: Option<Report>,
}

pub struct Report {
    seq: u64,
    pub(super) sections: Vec<Section>,
}

pub(super) struct Section {
    account_id: String,
    slot: Slot,
    tier: String,
    monthly: i64,
    want: i64,
    floor: i64,
    pub(super) rows: Vec<Row>,
    /// Per row: a refund's allowance part when a reply told it (else -1); a settle's
    /// purchased part of its hold from applied reports.
    pub(super) parts: Vec<i64>,
}

/// The sorted set of a shard's slices (score = expiry, ms).
pub fn slices_key(prefix: &str, shard: u32) -> String {
    format!("{}:slices", shard_tag(prefix, shard))
}

/// The hash of a shard's slice amounts and report sequence numbers.
pub fn slice_data_key(prefix: &str, shard: u32) -> String {
    format!("{}:slicedata", shard_tag(prefix, shard))
}

/// Takes from the shard's slices what the next report must carry.
pub(super) fn build(leases: &Leases, shard: usize, seq: u64, closing: bool) -> Report {
    let slots: Vec<(String, Slot)> = leases.shards[shard]
        .read()
        .iter()
        .map(|(k, v)| (k.clone(), Arc::clone(v)))
        .collect();
    let now = Instant::now();
    let idle_after = Duration::from_millis(leases.cfg.idle_ms);
    let window = Duration::from_millis(leases.cfg.window_ms);
    let half_life = leases.serve_window() / 2;
    let mut sections = Vec::new();
    let mut drop = Vec::new();
    for (account_id, slot) in slots {
        let mut s = slot.lock();
        s.sample_rate(now);
        // A running hold keeps its slice: a long stream may need a top-up any time.
        let idle = now.duration_since(s.last_used) >= idle_after && !s.urgent && s.holds.is_empty();
        let exact = s.exact(now);
        if closing || (idle && s.mode == Mode::Serving) {
            s.mode = Mode::Returning;
        }
        let serving = s.mode == Mode::Serving && !exact;
        let want = if serving { s.wanted(window) } else { 0 };
        let renew = s.held && s.valid_until.saturating_duration_since(now) < half_life;
        let top_up = serving && s.remaining < want / 2;
        let needed = s.urgent
            || !s.pending.is_empty()
            || (serving && (top_up || renew))
            || (!serving && s.held);
        if !needed {
            if s.settled() && (idle || exact) {
                drop.push(account_id);
            }
            continue;
        }
        s.urgent = false;
        if !top_up {
            s.dry = s.dry.saturating_sub(1);
        }
        let mut rows = std::mem::take(&mut s.pending);
        s.spent_since_report = 0;
        let mut net = 0;
        let mut parts = Vec::with_capacity(rows.len());
        for r in rows.iter_mut() {
            net += r.net();
            let part = match r.kind {
                RowKind::Refund => s
                    .in_flight
                    .get(&r.charge_id)
                    .copied()
                    .flatten()
                    .unwrap_or(-1),
                // The hold's record ends here: what applied reports said of it travels in
                // the row (kept if the row must be sent again).
                RowKind::Settle => *r.part.get_or_insert_with(|| {
                    s.holds.remove(&r.charge_id).map_or(0, |h| h.from_purchased)
                }),
                RowKind::Debit | RowKind::Extend => -1,
            };
            parts.push(part);
        }
        s.pending_net -= net;
        s.sent_net = net;
        s.sent_seq = seq;
        sections.push(Section {
            account_id,
            slot: Arc::clone(&slot),
            tier: s.tier.clone(),
            monthly: s.monthly,
            want,
            floor: if want > 0 { s.floor } else { 0 },
            rows,
            parts,
        });
    }
    if !drop.is_empty() {
        let mut map = leases.shards[shard].write();
        for account_id in drop {
            // Re-checked under the write lock: a request may have used it meanwhile.
            let idle = map.get(&account_id).is_some_and(|slot| {
                let s = slot.lock();
                s.settled() && !s.urgent
            });
            if idle {
                map.remove(&account_id);
            }
        }
    }
    Report { seq, sections }
}

/// One reply field.
#[derive(Debug, Clone)]
enum Field {
    Int(i64),
    Text(String),
}

impl Field {
    fn int(&self) -> i64 {
        match self {
            Field::Int(i) => *i,
            Field::Text(t) => t.parse().unwrap_or(0),
        }
    }
    fn text(&self) -> String {
        match self {
            Field::Int(i) => i.to_string(),
            Field::Text(t) => t.clone(),
        }
    }
}

fn fields(reply: &Value) -> Result<Vec<Field>, LedgerError> {
    let Value::Array(items) = reply else {
        return Err(LedgerError::Reply(format!("slice: {reply:?}")));
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    if items.len() == 2 && items.first().and_then(text).as_deref() == Some("dup") {
        // The stored reply of a report applied before: '\n'-joined integer text.
        let stored = items.get(1).and_then(text).unwrap_or_default();
        if stored.is_empty() {
            return Ok(Vec::new());
        }
        return Ok(stored
            .split('\n')
            .map(|p| match p.parse::<i64>() {
                Ok(i) => Field::Int(i),
                Err(_) => Field::Text(p.to_string()),
            })
            .collect());
    }
    Ok(items
        .iter()
        .map(|v| match v {
            Value::Int(i) => Field::Int(*i),
            other => Field::Text(text(other).unwrap_or_default()),
        })
        .collect())
}

async fn send(
    leases: &Leases,
    stores: &impl Stores,
    shard: u32,
    report: &Report,
) -> Result<Value, LedgerError> {
    let ledger = stores.ledger();
    let prefix = &ledger.prefix;
    let now_ms = ledger.redis_now_ms().unwrap_or_else(crate::ledger::now_ms);
    let mut call = SLICE.prepare_invoke();
    call.key(stream(prefix, shard))
        .key(slices_key(prefix, shard))
        .key(slice_data_key(prefix, shard));
    call.arg(&leases.instance)
        .arg(report.seq)
        .arg(now_ms)
        .arg(leases.cfg.ttl_ms)
        .arg(report.sections.len());
    for sec in &report.sections {
        call.key(AccountKeys::new(prefix, ledger.shards, &sec.account_id).account);
        call.arg(&sec.account_id)
            .arg(&sec.tier)
            .arg(sec.monthly)
            .arg(sec.want)
            .arg(sec.floor)
            .arg(sec.rows.len());
        for (row, part) in sec.rows.iter().zip(&sec.parts) {
            call.arg(row.kind.code())
                .arg(&row.charge_id)
                .arg(row.amount)
                .arg(*part)
                .arg(&row.route)
                .arg(&row.action)
                .arg(row.ts_ms)
                .arg(&row.request_id)
                .arg(&row.extra);
        }
    }
    let mut conn = stores.redis();
    let started = Instant::now();
    let reply = tokio::time::timeout(ledger.timeout, call.invoke_async::<Value>(&mut conn)).await;
    stores
        .metrics()
        .redis_script_seconds
        .with_label_values(&["slice"])
        .observe(started.elapsed().as_secs_f64());
    match reply {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(LedgerError::Redis(e)),
        Err(_) => Err(LedgerError::Timeout(ledger.timeout)),
    }
}

/// Applies a reply to the slices; returns the accounts Redis no longer has.
fn apply(leases: &Leases, report: Report, reply: &[Field], sent_at: Instant) -> Vec<String> {
    let report_seq = report.seq;
    let mut missing = Vec::new();
    let mut at = 0usize;
    let mut next = || {
        let f = reply.get(at).cloned().unwrap_or(Field::Int(0));
        at += 1;
        f
    };
    let now_ms = crate::ledger::now_ms();
    for sec in report.sections {
        let code = next().int();
        let slice = next().int();
        let allowance = next().int();
        let purchased = next().int();
        let _leased = next().int();
        let period_end_s = next().int();
        let text = next().text();
        let n = next().int().max(0) as usize;
        let splits: Vec<i64> = (0..n).map(|_| next().int()).collect();
        let mut s = sec.slot.lock();
        if code == 1 {
            // Not applied: the rows go first in the next report, after hydration.
            let mut rows = sec.rows;
            rows.append(&mut s.pending);
            s.pending = rows;
            s.pending_net += s.sent_net;
            s.sent_net = 0;
            s.remaining = 0;
            s.held = false;
            s.urgent = true;
            missing.push(sec.account_id);
            continue;
        }
        let limited = s.monthly >= 0;
        let taken = sec
            .rows
            .iter()
            .filter(|r| matches!(r.kind, RowKind::Debit | RowKind::Extend));
        for (row, part) in taken.zip(&splits) {
            if let Some(entry) = s.in_flight.get_mut(&row.charge_id) {
                *entry = Some(*part);
            } else if let Some(hold) = s.holds.get_mut(&row.charge_id).filter(|_| limited) {
                hold.from_purchased += row.amount - part;
            }
        }
        let landed = (report_seq, s.sent_net);
        if s.confirmed.len() >= 4 {
            s.confirmed.pop_front();
        }
        s.confirmed.push_back(landed);
        s.sent_net = 0;
        s.allowance = allowance;
        s.purchased = purchased;
        s.remaining = (slice - s.spent_since_report).max(0);
        s.held = slice > 0;
        // Serve until the window ends, and never into the next period (1 s margin for clocks).
        let to_period_end = (period_end_s * 1000 - now_ms - 1000).max(0) as u64;
        let window = leases
            .serve_window()
            .min(Duration::from_millis(to_period_end));
        s.valid_until = sent_at + window;
        match code {
            0 => {}
            2 => s.mode = Mode::Exact(Instant::now() + EXACT_FOR),
            _ => {
                tracing::debug!(account = %sec.account_id, code, state = %text, "slice given back");
                s.mode = Mode::Exact(Instant::now() + EXACT_FOR);
            }
        }
        if s.mode == Mode::Returning && slice == 0 && sec.want == 0 {
            s.mode = Mode::Serving;
            s.valid_until = sent_at;
        }
    }
    missing
}

/// Sends this shard's report (and first any report whose outcome is unknown). Called by the
/// reporter every batch window and by a request that waits for a slice.
pub async fn report_shard(
    leases: &Leases,
    stores: &impl Stores,
    shard: usize,
    closing: bool,
) -> Result<(), LedgerError> {
    report_shard_for(leases, stores, shard, closing, None).await
}

/// The same, for a request waiting for `(account, cost)`: nothing is sent when a report that
/// ran while it waited for the shard already made room.
pub async fn report_shard_for(
    leases: &Leases,
    stores: &impl Stores,
    shard: usize,
    closing: bool,
    waiting: Option<(&str, i64)>,
) -> Result<(), LedgerError> {
    let mut reports = leases.reports[shard].lock().await;
    if let Some((account_id, cost)) = waiting {
        if reports.unsent.is_none() && leases.can_serve(account_id, cost) {
            return Ok(());
        }
    }
    for attempt in 0..2 {
        let report = match reports.unsent.take() {
            Some(unsent) => unsent,
            None if attempt == 0 => {
                reports.seq += 1;
                build(leases, shard, reports.seq, closing)
            }
            None => break,
        };
        if report.sections.is_empty() {
            // Nothing to say; the number is reused.
            reports.seq -= 1;
            break;
        }
        let sent_at = Instant::now();
        match send(leases, stores, shard as u32, &report)
            .await
            .and_then(|v| fields(&v))
        {
            Ok(reply) => {
                stores
                    .metrics()
                    .slice_reports
                    .with_label_values(&["ok"])
                    .inc();
                let missing = apply(leases, report, &reply, sent_at);
                for account_id in missing {
                    let mut conn = stores.redis();
                    let config = stores.config();
                    if let Err(e) = stores
                        .ledger()
                        .hydrate(&mut conn, stores.pg(), &config, &account_id)
                        .await
                    {
                        tracing::warn!(error = %e, account = %account_id, "slice report: cannot load the account into Redis");
                    }
                }
            }
            Err(e) => {
                stores
                    .metrics()
                    .slice_reports
                    .with_label_values(&["error"])
                    .inc();
                // Sent again unchanged (same number): Redis applies it at most once.
                reports.unsent = Some(report);
                return Err(e);
            }
        }
    }
    Ok(())
}

/// Gives expired slices (their instance died) back to their accounts.
pub async fn sweep_expired(stores: &impl Stores, shards: u32) -> Result<u64, LedgerError> {
    let prefix = &stores.ledger().prefix;
    let now_ms = stores
        .ledger()
        .redis_now_ms()
        .unwrap_or_else(crate::ledger::now_ms);
    let mut conn = stores.redis();
    let mut returned = 0u64;
    for shard in 0..shards {
        let zs = slices_key(prefix, shard);
        let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(&zs)
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(64)
            .query_async(&mut conn)
            .await?;
        for member in members {
            let Some((_, account_id)) = member.split_once('|') else {
                continue;
            };
            let keys = AccountKeys::new(prefix, shards, account_id);
            let amount: i64 = EXPIRE
                .key(&keys.account)
                .key(&keys.stream)
                .key(&zs)
                .key(slice_data_key(prefix, shard))
                .arg(&member)
                .arg(account_id)
                .arg(now_ms)
                .invoke_async(&mut conn)
                .await?;
            if amount > 0 {
                returned += 1;
                tracing::info!(account = %account_id, amount, slice = %member, "an expired credit slice went back to its account");
            }
        }
    }
    Ok(returned)
}
