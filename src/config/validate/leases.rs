//! `[leases]`: credit slice timings, bounded so control reaches a slice within a second.

use super::*;

/// `[leases]`: batch, window, TTL, idle and recall timings against each other.
pub(super) fn leases(raw: &raw::Config, p: &mut Problems) -> raw::Leases {
    // [leases]
    let l = &raw.leases;
    if !(10..=1000).contains(&l.batch_ms) {
        p.add(
            "leases.batch_ms",
            "must be between 10 and 1000 (control must reach a slice within 1 s)",
        );
    }
    if !(10..=60_000).contains(&l.window_ms) {
        p.add("leases.window_ms", "must be between 10 and 60000");
    }
    if l.ttl_ms < l.batch_ms.saturating_mul(5) || l.ttl_ms > 600_000 {
        p.add(
            "leases.ttl_ms",
            "must be at least 5 × leases.batch_ms (a live instance renews its slices every batch) and at most 600000",
        );
    }
    if !(l.batch_ms..=600_000).contains(&l.idle_ms) {
        p.add(
            "leases.idle_ms",
            "must be between leases.batch_ms and 600000",
        );
    }
    if l.recall_wait_ms > 10_000 {
        p.add("leases.recall_wait_ms", "must be at most 10000");
    }
    raw.leases.clone()
}
