//! Month arithmetic: a calendar month in UTC and the name and bounds of its partition.

use std::fmt;

use chrono::{DateTime, Datelike, Months, NaiveDate, Utc};

use super::PARENT;

/// A calendar month in UTC, by its first day (years 1..=9999, the range partition names cover).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Month(NaiveDate);

impl Month {
    pub fn new(year: i32, month: u32) -> Option<Month> {
        if !(1..=9999).contains(&year) {
            return None;
        }
        NaiveDate::from_ymd_opt(year, month, 1).map(Month)
    }

    /// The month `t` falls in.
    pub fn of(t: DateTime<Utc>) -> Option<Month> {
        Month::new(t.year(), t.month())
    }

    pub fn plus(self, months: u32) -> Option<Month> {
        self.0
            .checked_add_months(Months::new(months))
            .and_then(|d| Month::new(d.year(), d.month()))
    }

    /// Its first instant.
    pub fn start(self) -> DateTime<Utc> {
        self.0.and_time(chrono::NaiveTime::MIN).and_utc()
    }

    /// `ledger_entries_2026_11`.
    pub fn partition_name(self) -> String {
        format!("{PARENT}_{:04}_{:02}", self.0.year(), self.0.month())
    }

    /// The month a managed partition holds, from its name.
    pub fn from_partition_name(name: &str) -> Option<Month> {
        let rest = name.strip_prefix(PARENT)?.strip_prefix('_')?;
        let (y, m) = rest.split_once('_')?;
        if y.len() != 4 || m.len() != 2 {
            return None;
        }
        Month::new(y.parse().ok()?, m.parse().ok()?)
    }

    /// A timestamptz literal of its first instant, independent of the session's time zone.
    pub(super) fn bound(self) -> String {
        format!("'{} 00:00:00+00'", self.0.format("%Y-%m-%d"))
    }
}

impl fmt::Display for Month {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_name_and_bound_their_partitions() {
        let m = Month::new(2026, 11).unwrap();
        assert_eq!(m.partition_name(), "ledger_entries_2026_11");
        assert_eq!(m.bound(), "'2026-11-01 00:00:00+00'");
        assert_eq!(m.plus(2), Month::new(2027, 1));
        assert_eq!(
            Month::from_partition_name("ledger_entries_2026_11"),
            Some(m)
        );
        assert_eq!(Month::from_partition_name("ledger_entries_default"), None);
        assert_eq!(Month::from_partition_name("ledger_entries_2026_13"), None);
        assert_eq!(Month::from_partition_name("other_2026_11"), None);
        let t = DateTime::parse_from_rfc3339("2026-11-30T23:59:59.999Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(Month::of(t), Some(m));
        assert_eq!(m.start().to_rfc3339(), "2026-11-01T00:00:00+00:00");
        assert_eq!(Month::new(10_000, 1), None);
        assert_eq!(Month::new(9999, 12).unwrap().plus(1), None);
    }
}
