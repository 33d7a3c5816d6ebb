//! What a metered request costs, from what was measured: tokens, request body size and
//! duration, priced by a route's `pricing` table (and its per-model entries). Exact in
//! micro-credits; no floats anywhere.
//!
//! Rounding rule: each dimension is rounded up to the next micro-credit on its own, then the
//! dimensions are added. Rounding up by less than one micro-credit per dimension never
//! undercharges and never charges a full credit for a fraction of one.

use crate::config::raw::Pricing;
use crate::money::{mul_div_ceil, Credits};

/// "MB" in prices means MiB, as in the tier body limits.
pub const BYTES_PER_MB: u64 = 1_048_576;

/// Bytes of request JSON per input token when the input must be estimated before the upstream
/// reports it (the common "4 characters per token" rule, rounded up).
pub const BYTES_PER_TOKEN_ESTIMATE: u64 = 4;

/// What was measured for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Measured {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub request_body_bytes: u64,
    /// Started duration steps (`tick_seconds` each; minutes by default) of a long stream or
    /// session: a 61 s session is 2 minutes.
    pub ticks: u64,
}

/// Why a cost could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the cost of this request overflows the credit range")]
pub struct Overflow;

/// The prices that apply to one request: the route's, with its model's entry laid over them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    pub per_request: Credits,
    pub input_per_1k: Credits,
    pub output_per_1k: Credits,
    pub per_mb: Credits,
    /// Price of one started duration step (`per_minute × tick_seconds / 60`, rounded up).
    pub per_tick: Credits,
    pub tick_ms: u64,
    pub reserve: Credits,
    /// Input or output tokens have a price: the response's usage decides the cost.
    pub by_tokens: bool,
}

/// The model's entry in `pricing.models`: an exact name first, then the longest `prefix*`.
fn model_entry<'a>(
    pricing: &'a Pricing,
    model: &str,
) -> Option<&'a crate::config::raw::ModelPrice> {
    if let Some(exact) = pricing.models.get(model) {
        return Some(exact);
    }
    pricing
        .models
        .iter()
        .filter_map(|(name, price)| {
            let prefix = name.strip_suffix('*')?;
            model.starts_with(prefix).then_some((prefix.len(), price))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, price)| price)
}

/// Why a request cannot be priced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("model {0:?} has no price on this route")]
    UnknownModel(String),
    #[error("this route prices by model; the request names none")]
    NoModel,
}

impl Rates {
    /// The rates for `model` (the request's JSON `model`, when it has one).
    pub fn resolve(pricing: &Pricing, model: Option<&str>) -> Result<Rates, RateError> {
        let entry = match model {
            Some(m) => model_entry(pricing, m),
            None => None,
        };
        let route_has_tokens =
            pricing.input_per_1k_tokens.is_some() || pricing.output_per_1k_tokens.is_some();
        if entry.is_none() && !pricing.models.is_empty() && !route_has_tokens {
            // Every price lives in the model table: an unknown model cannot be priced.
            return Err(match model {
                Some(m) => RateError::UnknownModel(m.to_string()),
                None => RateError::NoModel,
            });
        }
        let pick = |own: Option<Option<Credits>>, route: Option<Credits>| {
            own.flatten().or(route).unwrap_or(Credits::ZERO)
        };
        let input = pick(
            entry.map(|e| e.input_per_1k_tokens),
            pricing.input_per_1k_tokens,
        );
        let output = pick(
            entry.map(|e| e.output_per_1k_tokens),
            pricing.output_per_1k_tokens,
        );
        let tick_seconds = pricing.tick_seconds.unwrap_or(60).max(1);
        let per_tick = pricing
            .per_minute
            .and_then(|p| mul_div_ceil(p, tick_seconds, 60))
            .unwrap_or(Credits::ZERO);
        Ok(Rates {
            per_request: pick(entry.map(|e| e.per_request), pricing.per_request),
            input_per_1k: input,
            output_per_1k: output,
            per_mb: pricing.per_mb_request_body.unwrap_or(Credits::ZERO),
            per_tick,
            tick_ms: tick_seconds * 1000,
            reserve: pick(entry.map(|e| e.reserve), pricing.reserve),
            by_tokens: route_has_tokens || entry.is_some(),
        })
    }

    /// The true cost of a request.
    pub fn cost(&self, m: &Measured) -> Result<Credits, Overflow> {
        let per = |price: Credits, quantity: u64, unit: u64| -> Result<Credits, Overflow> {
            if price == Credits::ZERO || quantity == 0 {
                return Ok(Credits::ZERO);
            }
            mul_div_ceil(price, quantity, unit).ok_or(Overflow)
        };
        let parts = [
            self.per_request,
            per(self.input_per_1k, m.input_tokens, 1000)?,
            per(self.output_per_1k, m.output_tokens, 1000)?,
            per(self.per_mb, m.request_body_bytes, BYTES_PER_MB)?,
            per(self.per_tick, m.ticks, 1)?,
        ];
        parts
            .iter()
            .try_fold(Credits::ZERO, |sum, p| sum.checked_add(*p))
            .ok_or(Overflow)
    }

    /// The least held when a request is admitted: the `reserve`, and never less than the parts
    /// known up front (per request, the body's declared size, the first duration step).
    pub fn minimum_hold(&self, body_bytes: u64) -> Result<Credits, Overflow> {
        let known = self.cost(&Measured {
            request_body_bytes: body_bytes,
            ticks: u64::from(self.per_tick != Credits::ZERO),
            ..Measured::default()
        })?;
        Ok(known.max(self.reserve))
    }

    /// The cost if the response used all of `max_tokens`, with the input estimated from the
    /// request body's size.
    pub fn estimate(&self, body_bytes: u64, max_tokens: u64) -> Result<Credits, Overflow> {
        self.cost(&Measured {
            input_tokens: estimate_input_tokens(body_bytes),
            output_tokens: max_tokens,
            request_body_bytes: body_bytes,
            ticks: u64::from(self.per_tick != Credits::ZERO),
        })
    }

    /// How many output tokens `held` pays for once everything but the output is paid for
    /// (`None`: output tokens are free, no cap applies).
    pub fn affordable_output_tokens(&self, held: Credits, body_bytes: u64) -> Option<u64> {
        if self.output_per_1k == Credits::ZERO {
            return None;
        }
        let fixed = self.estimate(body_bytes, 0).ok()?;
        let left = held.micros().saturating_sub(fixed.micros());
        if left <= 0 {
            return Some(0);
        }
        // tokens × price / 1000 ≤ left  ⇔  tokens ≤ left × 1000 / price (rounded down, so the
        // rounded-up charge of the capped count still fits).
        let tokens = (i128::from(left) * 1000) / i128::from(self.output_per_1k.micros());
        Some(u64::try_from(tokens).unwrap_or(u64::MAX))
    }
}

/// Input tokens guessed from the request body before the upstream reports the real count.
pub fn estimate_input_tokens(body_bytes: u64) -> u64 {
    body_bytes.div_ceil(BYTES_PER_TOKEN_ESTIMATE)
}

/// Steps of `tick_ms` started in `elapsed_ms` (0 ms is 0; 1 ms up to one step is 1).
pub fn started_ticks(elapsed_ms: u64, tick_ms: u64) -> u64 {
    elapsed_ms.div_ceil(tick_ms.max(1))
}

/// The true cost of a request under `pricing` at the route's own prices.
pub fn cost(pricing: &Pricing, m: &Measured) -> Result<Credits, Overflow> {
    Rates::resolve(pricing, None).unwrap_or_default().cost(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::ModelPrice;

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
            reserve_from_max_tokens: false,
            include_usage: true,
            tick_seconds: None,
            models: Default::default(),
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
        assert_eq!(cost(&pricing(), &m), Ok(Credits::parse("0.012").unwrap()));
        let tiny = Pricing {
            per_request: None,
            input_per_1k_tokens: Some(Credits::from_micros(1)),
            output_per_1k_tokens: None,
            per_mb_request_body: None,
            per_minute: None,
            reserve: None,
            ..pricing()
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
            ticks: started_ticks(61_000, 60_000),
            ..Measured::default()
        };
        // 0.01 + 0.5 MiB × 1 + 2 minutes × 1
        assert_eq!(cost(&pricing(), &m), Ok(Credits::parse("2.51").unwrap()));
        assert_eq!(started_ticks(0, 60_000), 0);
        assert_eq!(started_ticks(1, 60_000), 1);
        assert_eq!(started_ticks(60_000, 60_000), 1);
        assert_eq!(started_ticks(60_001, 60_000), 2);
    }

    #[test]
    fn ticks_prorate_the_minute_price_and_round_up() {
        let p = Pricing {
            per_minute: c("0.6"),
            tick_seconds: Some(1),
            ..pricing()
        };
        let r = Rates::resolve(&p, None).unwrap();
        assert_eq!(r.per_tick, Credits::parse("0.01").unwrap());
        assert_eq!(r.tick_ms, 1000);
        let odd = Pricing {
            per_minute: Some(Credits::from_micros(7)),
            tick_seconds: Some(1),
            ..pricing()
        };
        // 7 µc / 60 rounds up to 1 µc per second.
        assert_eq!(
            Rates::resolve(&odd, None).unwrap().per_tick,
            Credits::from_micros(1)
        );
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        let m = Measured {
            output_tokens: u64::MAX,
            ..Measured::default()
        };
        assert_eq!(cost(&pricing(), &m), Err(Overflow));
    }

    #[test]
    fn models_override_and_prefixes_match_longest() {
        let mut p = pricing();
        p.models.insert(
            "gpt-4o".into(),
            ModelPrice {
                per_request: None,
                input_per_1k_tokens: c("2.5"),
                output_per_1k_tokens: c("10"),
                reserve: c("20"),
            },
        );
        p.models.insert(
            "gpt-4o*".into(),
            ModelPrice {
                per_request: None,
                input_per_1k_tokens: c("3"),
                output_per_1k_tokens: None,
                reserve: None,
            },
        );
        p.models.insert(
            "gpt-4o-mini*".into(),
            ModelPrice {
                per_request: None,
                input_per_1k_tokens: c("0.15"),
                output_per_1k_tokens: c("0.6"),
                reserve: None,
            },
        );
        let exact = Rates::resolve(&p, Some("gpt-4o")).unwrap();
        assert_eq!(exact.input_per_1k, Credits::parse("2.5").unwrap());
        assert_eq!(exact.reserve, Credits::parse("20").unwrap());
        let dated = Rates::resolve(&p, Some("gpt-4o-2024-08-06")).unwrap();
        assert_eq!(dated.input_per_1k, Credits::parse("3").unwrap());
        assert_eq!(dated.output_per_1k, Credits::parse("1.5").unwrap());
        let mini = Rates::resolve(&p, Some("gpt-4o-mini-2024")).unwrap();
        assert_eq!(mini.output_per_1k, Credits::parse("0.6").unwrap());
        // Unknown models fall back to the route's prices when it has some ...
        let other = Rates::resolve(&p, Some("llama")).unwrap();
        assert_eq!(other.input_per_1k, Credits::parse("0.5").unwrap());
        // ... and are refused when only the table has prices.
        p.input_per_1k_tokens = None;
        p.output_per_1k_tokens = None;
        assert_eq!(
            Rates::resolve(&p, Some("llama")),
            Err(RateError::UnknownModel("llama".into()))
        );
        assert_eq!(Rates::resolve(&p, None), Err(RateError::NoModel));
    }

    #[test]
    fn holds_estimates_and_caps() {
        let r = Rates::resolve(&pricing(), None).unwrap();
        // The reserve (5) is more than per request + 1 minute + body.
        assert_eq!(r.minimum_hold(0), Ok(Credits::parse("5").unwrap()));
        // 400 bytes → 100 input tokens (0.05) + 1000 output (1.5) + 0.01 + 1 minute (1)
        // + 400 B of a MiB (0.000382 rounded up).
        assert_eq!(
            r.estimate(400, 1000),
            Ok(Credits::parse("2.560382").unwrap())
        );
        // Holding 2.560382 pays for exactly 1000 output tokens.
        let held = Credits::parse("2.560382").unwrap();
        assert_eq!(r.affordable_output_tokens(held, 400), Some(1000));
        assert_eq!(
            r.affordable_output_tokens(Credits::parse("0.5").unwrap(), 400),
            Some(0)
        );
        let free_output = Rates {
            output_per_1k: Credits::ZERO,
            ..r
        };
        assert_eq!(free_output.affordable_output_tokens(held, 400), None);
    }
}
