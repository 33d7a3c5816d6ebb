//! The per-tier burst-rate limiters (governor, per instance), built with each config
//! snapshot and carried over a reload; the proxy's gate phase asks them.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::Config;
use crate::error::GatewayError;

/// One keyed limiter per tier that sets `rate_per_second` (keys: API key id, or the account
/// for JWT callers).
pub struct RateLimiters {
    /// Each limiter with the rate it was built for; shared with the next config's limiters
    /// when a reload leaves that tier's rate alone.
    by_tier: HashMap<String, (NonZeroU32, Arc<DefaultKeyedRateLimiter<String>>)>,
    clock: DefaultClock,
}

impl RateLimiters {
    pub fn new(config: &Config) -> Self {
        Self::carried_over(None, config)
    }

    /// The limiters for a reloaded config: a tier whose `rate_per_second` did not change keeps
    /// its limiter (and the bursts its callers already used), so a reload is no way around the
    /// rate; a new or changed rate starts fresh.
    pub fn carried_over(previous: Option<&RateLimiters>, config: &Config) -> Self {
        let by_tier = config
            .tiers
            .iter()
            .filter_map(|(name, t)| {
                let rate = NonZeroU32::new(t.rate_per_second()?)?;
                let limiter = previous
                    .and_then(|p| p.by_tier.get(name))
                    .filter(|(old_rate, _)| *old_rate == rate)
                    .map(|(_, l)| Arc::clone(l))
                    .unwrap_or_else(|| Arc::new(RateLimiter::keyed(Quota::per_second(rate))));
                Some((name.clone(), (rate, limiter)))
            })
            .collect();
        RateLimiters {
            by_tier,
            clock: DefaultClock::default(),
        }
    }

    /// One request of `key` on `tier`'s limiter; `RateLimited` when its burst is spent.
    pub fn check(&self, tier: &str, key: &str) -> Result<(), GatewayError> {
        let Some((_, limiter)) = self.by_tier.get(tier) else {
            return Ok(());
        };
        match limiter.check_key(&key.to_string()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err(GatewayError::RateLimited {
                    retry_after_secs: (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
                    limit: 0,
                    window_secs: 1,
                })
            }
        }
    }

    /// Forgets idle keys so the limiter's memory stays bounded.
    pub fn shrink(&self) {
        for (_, limiter) in self.by_tier.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}
