//! One account's credit slice as this instance holds it: what it may still spend, the requests
//! it served and has not reported yet, and what Redis last said about the account.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// What a report row does (the `type` field of `slice.lua`'s rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// A request's charge: a fixed price, or a metered request's hold.
    Debit,
    /// A fixed-price charge given back whole (the route's refund policy).
    Refund,
    /// More taken for a running hold (a stream whose running cost passed what is held).
    Extend,
    /// A hold ended at its true cost: `amount` is true cost − held (negative: money back).
    Settle,
}

impl RowKind {
    pub fn code(self) -> &'static str {
        match self {
            RowKind::Debit => "d",
            RowKind::Refund => "r",
            RowKind::Extend => "x",
            RowKind::Settle => "s",
        }
    }
}

/// A request served from the slice (a charge, a refund, a hold's top-up or its settle),
/// waiting for the next report.
#[derive(Debug, Clone)]
pub struct Row {
    pub kind: RowKind,
    pub charge_id: String,
    /// µc: positive for a debit, refund (the whole charge back) or extend; a settle's is
    /// signed (true cost − held).
    pub amount: i64,
    pub route: String,
    pub action: String,
    pub ts_ms: i64,
    pub request_id: String,
    /// A settle's usage for its journal row: `tok_in|tok_out|status|duration_ms|reason`;
    /// an extend's sequence number in its entry id (`<charge>:x<n>`) as text.
    pub extra: String,
    /// A settle's purchased part of its hold in reports already applied (µc), fixed when the
    /// row is first put in a report (the hold's record is gone after that).
    pub part: Option<i64>,
}

impl Row {
    /// What the row adds to the money charged here and not yet applied in Redis (µc).
    pub fn net(&self) -> i64 {
        match self.kind {
            RowKind::Refund => -self.amount,
            RowKind::Debit | RowKind::Extend | RowKind::Settle => self.amount,
        }
    }
}

/// A metered request's hold taken from the slice, until its settle row is in a report.
#[derive(Debug, Clone, Default)]
pub struct SliceHold {
    /// µc held (the hold and its top-ups).
    pub held: i64,
    /// The purchased part of what is held, as the replies of applied reports told it (µc).
    pub from_purchased: i64,
    /// Top-ups taken so far (names the next `extend` row).
    pub extends: u32,
    /// Settled: its settle row waits in `pending`.
    pub settled: bool,
}

/// Whether the slice may serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Serving,
    /// Being given back (idle, recalled, or the account changed): serves nothing.
    Returning,
    /// Near the end of the balance or recalled: requests take the exact path until then.
    Exact(Instant),
}

#[derive(Debug)]
pub struct Slice {
    pub tier: String,
    /// The tier's monthly credits (µc), -1 = unlimited.
    pub monthly: i64,
    /// µc this instance may still spend without asking Redis.
    pub remaining: i64,
    /// Rows not yet sent in a report.
    pub pending: Vec<Row>,
    /// Slice spent since the report in flight was built (µc; a settle that gives money back
    /// makes it smaller): the reply's slice is net of everything before.
    pub spent_since_report: i64,
    /// Net µc (debits + extends + settles − refunds) of the rows in `pending`.
    pub pending_net: i64,
    /// Net µc of the rows in the report in flight, and that report's number: a balance read
    /// subtracts them only while Redis has not applied that report.
    pub sent_net: i64,
    pub sent_seq: u64,
    /// The last few reports whose reply arrived: (number, net µc). A balance read that saw
    /// Redis before such a report landed must still count it.
    pub confirmed: std::collections::VecDeque<(u64, i64)>,
    /// Consecutive times the slice ran dry under a waiting request: each doubles the next
    /// slice, so a burst is not served one small top-up at a time.
    pub dry: u32,
    /// The account's buckets as of the last reply (µc).
    pub allowance: i64,
    pub purchased: i64,
    /// When the last reply confirmed the slice; it serves until `valid_until`.
    pub valid_until: Instant,
    pub mode: Mode,
    /// Largest single price served: no slice is smaller than one request.
    pub floor: i64,
    /// Spending rate (µc/s), smoothed over reports.
    pub rate: i64,
    pub spent_in_window: i64,
    pub window_started: Instant,
    pub last_used: Instant,
    /// Charges served here whose request is still running → the allowance part of the debit
    /// once a reply told it (a refund gives back exactly what was taken, as on the exact path).
    pub in_flight: HashMap<String, Option<i64>>,
    /// Holds of metered requests taken from this slice, by charge id.
    pub holds: HashMap<String, SliceHold>,
    /// Low-balance threshold of the tier, for the `low` flag.
    pub low_threshold: Option<i64>,
    /// A request waits for this slice: include it in the next report whatever its state.
    pub urgent: bool,
    /// Redis holds a slice for this instance (the last reply said so).
    pub held: bool,
}

impl Slice {
    pub fn new(tier: &str, monthly: i64, low_threshold: Option<i64>, now: Instant) -> Self {
        Slice {
            tier: tier.to_string(),
            monthly,
            remaining: 0,
            pending: Vec::new(),
            spent_since_report: 0,
            pending_net: 0,
            sent_net: 0,
            sent_seq: 0,
            confirmed: std::collections::VecDeque::new(),
            dry: 0,
            allowance: 0,
            purchased: 0,
            valid_until: now,
            mode: Mode::Serving,
            floor: 0,
            rate: 0,
            spent_in_window: 0,
            window_started: now,
            last_used: now,
            in_flight: HashMap::new(),
            holds: HashMap::new(),
            low_threshold,
            urgent: false,
            held: false,
        }
    }

    /// Nothing of this slice is out or owed: Redis holds no slice for it, no row waits, and
    /// no request charged from it is still running.
    pub fn settled(&self) -> bool {
        !self.held && self.pending.is_empty() && self.in_flight.is_empty() && self.holds.is_empty()
    }

    pub fn serving(&self, now: Instant) -> bool {
        match self.mode {
            Mode::Serving => now < self.valid_until,
            Mode::Returning | Mode::Exact(_) => false,
        }
    }

    /// The exact path is in force (recalled or short of money) until the deadline passes.
    pub fn exact(&mut self, now: Instant) -> bool {
        match self.mode {
            Mode::Exact(until) if now < until => true,
            Mode::Exact(_) => {
                self.mode = Mode::Serving;
                false
            }
            _ => false,
        }
    }

    /// The balance this instance believes the account has (exact when it is the only one
    /// spending; other instances' spending shows after their next report).
    pub fn balance(&self) -> i64 {
        self.allowance + self.purchased - self.unconfirmed()
    }

    /// Charged here, not yet applied in Redis as far as this instance knows (µc, net).
    pub fn unconfirmed(&self) -> i64 {
        self.pending_net + self.sent_net
    }

    /// The same, given the last report number Redis has applied for this instance's shard.
    pub fn unconfirmed_after(&self, applied_seq: u64) -> i64 {
        let sent = if applied_seq >= self.sent_seq {
            0
        } else {
            self.sent_net
        };
        let landed_since: i64 = self
            .confirmed
            .iter()
            .filter(|(seq, _)| *seq > applied_seq)
            .map(|(_, net)| net)
            .sum();
        self.pending_net + sent + landed_since
    }

    /// The slice to ask for: `window` of the recent rate, at least four requests, and never
    /// less than what is left (a report must not take back money being spent).
    pub fn wanted(&self, window: Duration) -> i64 {
        let by_rate = (self.rate as i128 * window.as_millis() as i128 / 1000) as i64;
        let burst = self.floor.saturating_mul(4) << self.dry.min(10);
        by_rate.max(burst).max(self.remaining)
    }

    /// Folds the spending since the last sample into the rate (EWMA, ¼ weight per sample).
    pub fn sample_rate(&mut self, now: Instant) {
        let dt = now.duration_since(self.window_started).as_millis() as i64;
        if dt < 10 {
            return;
        }
        let sample = self.spent_in_window.saturating_mul(1000) / dt;
        self.rate = if self.rate == 0 {
            sample
        } else {
            (self.rate * 3 + sample) / 4
        };
        self.spent_in_window = 0;
        self.window_started = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_covers_the_window_and_never_shrinks_below_what_is_left() {
        let now = Instant::now();
        let mut s = Slice::new("t", 1_000, None, now);
        s.floor = 200_000;
        assert_eq!(s.wanted(Duration::from_millis(500)), 800_000);
        s.rate = 10_000_000; // 10 credits/s
        assert_eq!(s.wanted(Duration::from_millis(500)), 5_000_000);
        s.remaining = 9_000_000;
        assert_eq!(s.wanted(Duration::from_millis(500)), 9_000_000);
    }

    #[test]
    fn the_rate_follows_spending() {
        let t0 = Instant::now();
        let mut s = Slice::new("t", 1_000, None, t0);
        s.spent_in_window = 1_000_000;
        s.sample_rate(t0 + Duration::from_millis(100));
        assert_eq!(s.rate, 10_000_000);
        s.sample_rate(t0 + Duration::from_millis(200));
        assert_eq!(s.rate, 7_500_000);
    }

    #[test]
    fn a_balance_read_counts_each_served_request_once_whatever_redis_had_applied() {
        let mut s = Slice::new("t", 1_000, None, Instant::now());
        // Report 7 (3 µc) landed and its reply was applied; report 8 (2 µc) is in flight; 1 µc
        // is not sent yet.
        s.confirmed.push_back((7, 3));
        s.sent_seq = 8;
        s.sent_net = 2;
        s.pending_net = 1;
        assert_eq!(
            s.unconfirmed_after(6),
            6,
            "Redis read before report 7 landed"
        );
        assert_eq!(s.unconfirmed_after(7), 3, "after 7, before 8");
        assert_eq!(s.unconfirmed_after(8), 1, "after 8");
    }

    #[test]
    fn exact_mode_ends_by_itself() {
        let t0 = Instant::now();
        let mut s = Slice::new("t", 1_000, None, t0);
        s.mode = Mode::Exact(t0 + Duration::from_millis(10));
        assert!(s.exact(t0));
        assert!(!s.exact(t0 + Duration::from_millis(11)));
        assert_eq!(s.mode, Mode::Serving);
    }
}
