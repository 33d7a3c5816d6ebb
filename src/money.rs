//! Credits as integer micro-credits.
//!
//! Every balance, price and journal amount in tollgate is an `i64` count of micro-credits
//! (1 credit = 1,000,000 µc). Decimal text is parsed and printed exactly, digit by digit, so no
//! float ever touches money: `0.1 + 0.2` prints `0.3`.

use std::fmt;
use std::ops::{Add, AddAssign, Neg, Sub, SubAssign};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Micro-credits per credit.
pub const MICROS_PER_CREDIT: i64 = 1_000_000;
/// Decimal places a credit amount may carry.
pub const DECIMALS: usize = 6;

/// An exact amount of credits, stored as micro-credits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Credits(i64);

/// Why a decimal text is not a credit amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("{0:?} is not a decimal number")]
    NotDecimal(String),
    #[error("{0:?} has more than 6 decimal places")]
    TooPrecise(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

impl Credits {
    pub const ZERO: Credits = Credits(0);

    /// From a raw micro-credit count.
    pub const fn from_micros(micros: i64) -> Self {
        Credits(micros)
    }

    /// From whole credits; `None` on overflow.
    pub fn from_credits(credits: i64) -> Option<Self> {
        credits.checked_mul(MICROS_PER_CREDIT).map(Credits)
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    pub fn is_negative(self) -> bool {
        self.0 < 0
    }

    pub fn checked_add(self, other: Credits) -> Option<Credits> {
        self.0.checked_add(other.0).map(Credits)
    }

    pub fn checked_mul(self, n: i64) -> Option<Credits> {
        self.0.checked_mul(n).map(Credits)
    }

    /// Parses `"12"`, `"0.2"`, `"-1.000001"`, `"+3."` exactly. Rejects exponents, more than six
    /// decimal places (never silently rounded) and anything that is not plain decimal.
    pub fn parse(text: &str) -> Result<Self, MoneyError> {
        let not_decimal = || MoneyError::NotDecimal(text.to_string());
        let s = text.trim();
        let (negative, digits) = match s.as_bytes().first() {
            Some(b'-') => (true, &s[1..]),
            Some(b'+') => (false, &s[1..]),
            _ => (false, s),
        };
        let (int_part, frac_part) = match digits.split_once('.') {
            Some((i, f)) => (i, f),
            None => (digits, ""),
        };
        let int_part = int_part.replace('_', "");
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(not_decimal());
        }
        if !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(not_decimal());
        }
        let frac_trimmed = frac_part.trim_end_matches('0');
        if frac_trimmed.len() > DECIMALS {
            return Err(MoneyError::TooPrecise(text.to_string()));
        }
        let too_large = || MoneyError::TooLarge(text.to_string());
        let mut micros: i64 = 0;
        for b in int_part.bytes() {
            micros = micros
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(b - b'0')))
                .ok_or_else(too_large)?;
        }
        micros = micros
            .checked_mul(MICROS_PER_CREDIT)
            .ok_or_else(too_large)?;
        let mut frac: i64 = 0;
        for i in 0..DECIMALS {
            let digit = frac_trimmed
                .as_bytes()
                .get(i)
                .map_or(0, |b| i64::from(b - b'0'));
            frac = frac * 10 + digit;
        }
        micros = micros.checked_add(frac).ok_or_else(too_large)?;
        Ok(Credits(if negative { -micros } else { micros }))
    }
}

impl fmt::Display for Credits {
    /// Shortest exact decimal: `12.5`, `0.3`, `0`, `-1.000001`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let whole = abs / MICROS_PER_CREDIT as u64;
        let frac = abs % MICROS_PER_CREDIT as u64;
        if frac == 0 {
            return write!(f, "{sign}{whole}");
        }
        let frac_text = format!("{frac:06}");
        write!(f, "{sign}{whole}.{}", frac_text.trim_end_matches('0'))
    }
}

impl std::str::FromStr for Credits {
    type Err = MoneyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Credits::parse(s)
    }
}

impl Add for Credits {
    type Output = Credits;
    fn add(self, rhs: Credits) -> Credits {
        Credits(self.0.saturating_add(rhs.0))
    }
}
impl AddAssign for Credits {
    fn add_assign(&mut self, rhs: Credits) {
        *self = *self + rhs;
    }
}
impl Sub for Credits {
    type Output = Credits;
    fn sub(self, rhs: Credits) -> Credits {
        Credits(self.0.saturating_sub(rhs.0))
    }
}
impl SubAssign for Credits {
    fn sub_assign(&mut self, rhs: Credits) {
        *self = *self - rhs;
    }
}
impl Neg for Credits {
    type Output = Credits;
    fn neg(self) -> Credits {
        Credits(self.0.saturating_neg())
    }
}

/// In JSON, credits are decimal numbers (`12.5`), printed exactly from the integer.
impl Serialize for Credits {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // A raw JSON number keeps every digit; an f64 would not past 15 significant digits.
        match serde_json::value::RawValue::from_string(self.to_string()) {
            Ok(raw) => raw.serialize(serializer),
            Err(_) => serializer.serialize_str(&self.to_string()),
        }
    }
}

/// Accepts a decimal string, an integer, or (from JSON) a number whose literal text is parsed
/// exactly. Config loading turns TOML floats into their literal text before this runs.
impl<'de> Deserialize<'de> for Credits {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Credits;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a decimal number of credits (up to 6 decimal places)")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Credits, E> {
                Credits::from_credits(v).ok_or_else(|| E::custom(format!("{v} is too large")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Credits, E> {
                i64::try_from(v)
                    .ok()
                    .and_then(Credits::from_credits)
                    .ok_or_else(|| E::custom(format!("{v} is too large")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Credits, E> {
                // Only reached from formats that already lost the literal; the shortest
                // round-trip text of an f64 is the decimal the user wrote (≤ 15 digits).
                Credits::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Credits, E> {
                Credits::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// Exact arbitrary-precision-free multiply-and-divide for prices: `amount × num / den`, rounded
/// up to the next micro-credit (the documented rounding rule: never undercharge by a fraction).
pub fn mul_div_ceil(amount: Credits, num: u64, den: u64) -> Option<Credits> {
    if den == 0 {
        return None;
    }
    let product = i128::from(amount.0).checked_mul(i128::from(num))?;
    let den = i128::from(den);
    let q = product.div_euclid(den);
    let r = product.rem_euclid(den);
    let q = if r > 0 { q + 1 } else { q };
    i64::try_from(q).ok().map(Credits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Credits {
        Credits::parse(s).unwrap()
    }

    #[test]
    fn parses_exactly() {
        assert_eq!(c("0.2").micros(), 200_000);
        assert_eq!(c("12").micros(), 12_000_000);
        assert_eq!(c("12.5").micros(), 12_500_000);
        assert_eq!(c("0.000001").micros(), 1);
        assert_eq!(c("-1.5").micros(), -1_500_000);
        assert_eq!(c("+3.").micros(), 3_000_000);
        assert_eq!(c(".5").micros(), 500_000);
        assert_eq!(c("1.2300000").micros(), 1_230_000);
        assert_eq!(c("1_000").micros(), 1_000_000_000);
    }

    #[test]
    fn rejects_junk() {
        for bad in [
            "", "lots", "1e3", "1.2.3", "--1", "0x10", ".", "-", "1,5", " 1 2",
        ] {
            assert!(Credits::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(
            Credits::parse("0.0000001"),
            Err(MoneyError::TooPrecise("0.0000001".into()))
        );
        assert!(matches!(
            Credits::parse("99999999999999999999"),
            Err(MoneyError::TooLarge(_))
        ));
        assert_eq!(
            Credits::parse("lots").unwrap_err().to_string(),
            "\"lots\" is not a decimal number"
        );
    }

    #[test]
    fn prints_shortest_exact() {
        assert_eq!(c("0.1").to_string(), "0.1");
        assert_eq!((c("0.1") + c("0.2")).to_string(), "0.3");
        assert_eq!(c("12.50").to_string(), "12.5");
        assert_eq!(c("0").to_string(), "0");
        assert_eq!(c("-1.000001").to_string(), "-1.000001");
        assert_eq!(Credits::from_micros(-5).to_string(), "-0.000005");
        assert_eq!(
            Credits::from_micros(i64::MIN).to_string(),
            "-9223372036854.775808"
        );
    }

    #[test]
    fn ten_tenths_make_one() {
        let mut sum = Credits::ZERO;
        for _ in 0..10 {
            sum += c("0.1");
        }
        assert_eq!(sum, c("1"));
    }

    #[test]
    fn round_trips_through_text() {
        for m in [0, 1, 7, 10, 999_999, 1_000_000, 123_456_789, -42, i64::MAX] {
            let x = Credits::from_micros(m);
            assert_eq!(Credits::parse(&x.to_string()), Ok(x));
        }
    }

    #[test]
    fn json_is_a_decimal_number() {
        assert_eq!(serde_json::to_string(&c("12.5")).unwrap(), "12.5");
        assert_eq!(serde_json::to_string(&c("0.3")).unwrap(), "0.3");
        let back: Credits = serde_json::from_str("0.3").unwrap();
        assert_eq!(back, c("0.3"));
        let back: Credits = serde_json::from_str("\"0.000001\"").unwrap();
        assert_eq!(back.micros(), 1);
    }

    #[test]
    fn mul_div_rounds_up() {
        // 0.5 credits per 1k tokens × 3 tokens = 0.0015 credits = 1500 µc exactly
        assert_eq!(
            mul_div_ceil(c("0.5"), 3, 1000),
            Some(Credits::from_micros(1500))
        );
        // 1 µc per 1k tokens × 1 token rounds up to 1 µc
        assert_eq!(
            mul_div_ceil(Credits::from_micros(1), 1, 1000),
            Some(Credits::from_micros(1))
        );
        assert_eq!(mul_div_ceil(c("1"), 1, 0), None);
    }
}
