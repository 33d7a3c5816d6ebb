//! What a metered request really cost, from what was measured: tokens, request body size and
//! duration, priced by a route's `pricing` table. Exact in micro-credits.
//!
//! Rounding rule: each dimension is rounded up to the next micro-credit on its own, then the
//! dimensions are added. Rounding up by less than one micro-credit per dimension never
//! undercharges and never charges a full credit for a fraction of one.

use crate::config::raw::Pricing;
use crate::money::{mul_div_ceil, Credits};

/// "MB" in prices means MiB, as in the tier body limits.
pub const BYTES_PER_MB: u64 = 1_048_576;

/// What was measured for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measured {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub request_body_bytes: u64,
    /// Started minutes of a long stream or session (a 61 s session is 2 minutes).
    pub started_minutes: u64,
}

/// Why a cost could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cost of this request overflows the credit range")]
pub struct Overflow;

/// The true cost of a request under `pricing`.
pub fn cost(pricing: &Pricing, m: &Measured) -> Result<Credits, Overflow> {
    let per = |price: Option<Credits>, quantity: u64, unit: u64| -> Result<Credits, Overflow> {
        match price {
            None => Ok(Credits::ZERO),
            Some(p) => mul_div_ceil(p, quantity, unit).ok_or(Overflow),
        }
    };
    let parts = [
        pricing.per_request.unwrap_or(Credits::ZERO),
        per(pricing.input_per_1k_tokens, m.input_tokens, 1000)?,
        per(pricing.output_per_1k_tokens, m.output_tokens, 1000)?,
        per(
            pricing.per_mb_request_body,
            m.request_body_bytes,
            BYTES_PER_MB,
        )?,
        per(pricing.per_minute, m.started_minutes, 1)?,
    ];
    parts
        .iter()
        .try_fold(Credits::ZERO, |sum, p| sum.checked_add(*p))
        .ok_or(Overflow)
}

/// Minutes started in `elapsed_ms` (0 ms is 0 minutes; 1 ms to 60 s is 1).
pub fn started_minutes(elapsed_ms: u64) -> u64 {
    elapsed_ms.div_ceil(60_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Option<Credits> {
        Some(Credits::parse(s).unwrap())
    }

    fn pricing() -> Pricing {
        Pricing {
            per_request: c("0.01"),
            input_per_1k_tokens: c("0.5"),
            output_per_1k_tokens: c("1.5"),
            per_mb_request_body: c("1"),
            per_minute: c("1"),
            reserve: c("5"),
        }
    }

    #[test]
    fn tokens_are_priced_exactly() {
        let m = Measured {
            input_tokens: 1200,
            output_tokens: 300,
            ..Measured::default()
        };
        // 0.01 + 1.2 × 0.5 + 0.3 × 1.5 = 0.01 + 0.6 + 0.45
        assert_eq!(cost(&pricing(), &m), Ok(Credits::parse("1.06").unwrap()));
    }

    #[test]
    fn each_dimension_rounds_up_to_a_micro_credit() {
        let m = Measured {
            input_tokens: 1,
            output_tokens: 1,
            ..Measured::default()
        };
        // 0.5/1000 = 0.0005 and 1.5/1000 = 0.0015: exact; a price of 1 µc per 1k tokens for
        // one token rounds up to 1 µc.
        assert_eq!(cost(&pricing(), &m), Ok(Credits::parse("0.012").unwrap()));
        let tiny = Pricing {
            per_request: None,
            input_per_1k_tokens: Some(Credits::from_micros(1)),
            output_per_1k_tokens: None,
            per_mb_request_body: None,
            per_minute: None,
            reserve: None,
        };
        let one = Measured {
            input_tokens: 1,
            ..Measured::default()
        };
        assert_eq!(cost(&tiny, &one), Ok(Credits::from_micros(1)));
    }

    #[test]
    fn body_size_and_minutes() {
        let m = Measured {
            request_body_bytes: BYTES_PER_MB / 2,
            started_minutes: started_minutes(61_000),
            ..Measured::default()
        };
        // 0.01 + 0.5 MiB × 1 + 2 minutes × 1
        assert_eq!(cost(&pricing(), &m), Ok(Credits::parse("2.51").unwrap()));
        assert_eq!(started_minutes(0), 0);
        assert_eq!(started_minutes(1), 1);
        assert_eq!(started_minutes(60_000), 1);
        assert_eq!(started_minutes(60_001), 2);
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let m = Measured {
            output_tokens: u64::MAX,
            ..Measured::default()
        };
        assert_eq!(cost(&pricing(), &m), Err(Overflow));
    }
}
