//! A small in-process TTL cache for resolved credentials and accounts, so the hot path never
//! waits on Postgres. Entries are dropped early by the invalidation channel; while that channel
//! is down every entry lives at most `degraded_ttl`, which keeps revocation within its bound.
//!
//! Storage is a `moka` cache: bounded by entry count, so a full cache evicts a few cold entries
//! (TinyLFU) instead of clearing itself and sending every caller to the store at once.

use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;

/// One cached value with what the read-time TTL check needs.
#[derive(Clone)]
struct Entry<V> {
    value: V,
    inserted: Instant,
    /// A cached miss: lives only the short TTL.
    short: bool,
}

/// When moka may drop an entry for good: the longest TTL a read could still accept. The exact
/// TTL (which depends on whether push is healthy right now) is checked on every read.
struct EntryExpiry {
    ttl: Duration,
    degraded_ttl: Duration,
}

impl EntryExpiry {
    fn lifetime(&self, short: bool) -> Duration {
        if short {
            self.degraded_ttl
        } else {
            self.ttl.max(self.degraded_ttl)
        }
    }
}

impl<K, V> Expiry<K, Entry<V>> for EntryExpiry {
    fn expire_after_create(&self, _: &K, entry: &Entry<V>, _: Instant) -> Option<Duration> {
        Some(self.lifetime(entry.short))
    }

    fn expire_after_update(
        &self,
        _: &K,
        entry: &Entry<V>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.lifetime(entry.short))
    }
}

pub struct TtlCache<K, V> {
    map: Cache<K, Entry<V>>,
    ttl: Duration,
    degraded_ttl: Duration,
    /// False while the invalidation channel is not subscribed.
    push_healthy: AtomicBool,
}

impl<K, V> TtlCache<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Clone + Send + Sync + 'static,
{
    pub fn new(ttl: Duration, degraded_ttl: Duration, capacity: usize) -> Self {
        let map = Cache::builder()
            .max_capacity(u64::try_from(capacity).unwrap_or(u64::MAX))
            .expire_after(EntryExpiry { ttl, degraded_ttl })
            .build();
        TtlCache {
            map,
            ttl,
            degraded_ttl,
            push_healthy: AtomicBool::new(false),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let entry = self.map.get(key)?;
        let ttl = if self.push_healthy.load(Ordering::Relaxed) && !entry.short {
            self.ttl
        } else {
            self.degraded_ttl
        };
        (entry.inserted.elapsed() < ttl).then_some(entry.value)
    }

    pub fn insert(&self, key: K, value: V) {
        self.insert_entry(key, value, false);
    }

    /// Caches a miss: it lives only the short TTL, so a key or account created right after a
    /// failed lookup works within a second.
    pub fn insert_short(&self, key: K, value: V) {
        self.insert_entry(key, value, true);
    }

    fn insert_entry(&self, key: K, value: V, short: bool) {
        let entry = Entry {
            value,
            inserted: Instant::now(),
            short,
        };
        self.map.insert(key, entry);
    }

    pub fn remove(&self, key: &K) {
        self.map.invalidate(key);
    }

    /// Drops every entry `keep` rejects, right away (not lazily), so the next read misses.
    pub fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) {
        for (key, entry) in self.map.iter() {
            if !keep(&key, &entry.value) {
                self.map.invalidate(key.as_ref());
            }
        }
    }

    pub fn clear(&self) {
        self.map.invalidate_all();
    }

    pub fn set_push_healthy(&self, healthy: bool) {
        self.push_healthy.store(healthy, Ordering::Relaxed);
    }

    /// Entries held after pending evictions ran (moka applies them in batches).
    pub fn len(&self) -> usize {
        self.map.run_pending_tasks();
        usize::try_from(self.map.entry_count()).unwrap_or(usize::MAX)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_and_degrades() {
        let c = TtlCache::new(Duration::from_secs(60), Duration::from_millis(0), 10);
        c.set_push_healthy(true);
        c.insert(1, "a");
        assert_eq!(c.get(&1), Some("a"));
        c.set_push_healthy(false);
        assert_eq!(c.get(&1), None, "degraded TTL applies while push is down");
        c.set_push_healthy(true);
        c.remove(&1);
        assert_eq!(c.get(&1), None);
    }

    #[test]
    fn misses_are_short_lived() {
        let c = TtlCache::new(Duration::from_secs(60), Duration::from_millis(0), 10);
        c.set_push_healthy(true);
        c.insert_short(1, None::<u8>);
        assert_eq!(c.get(&1), None);
        c.insert(2, Some(2));
        assert_eq!(c.get(&2), Some(Some(2)));
    }

    #[test]
    fn stays_bounded() {
        let c = TtlCache::new(Duration::from_secs(60), Duration::from_secs(1), 4);
        for i in 0..100 {
            c.insert(i, i);
        }
        assert!(c.len() <= 4);
    }

    #[test]
    fn overfilling_does_not_evict_everything() {
        let c = TtlCache::new(Duration::from_secs(60), Duration::from_secs(1), 100);
        c.set_push_healthy(true);
        for i in 0..100 {
            c.insert(i, i);
        }
        // The first hundred are in use, so they are the hot set.
        for _ in 0..3 {
            for i in 0..100 {
                assert_eq!(c.get(&i), Some(i));
            }
        }
        for i in 100..250 {
            c.insert(i, i);
        }
        let len = c.len();
        assert!(len <= 100, "bounded: {len}");
        let kept = (0..100).filter(|i| c.get(i).is_some()).count();
        assert!(
            kept >= 50,
            "a full cache keeps most hot entries, kept {kept}"
        );
    }

    #[test]
    fn retain_and_clear_apply_at_once() {
        let c = TtlCache::new(Duration::from_secs(60), Duration::from_secs(1), 10);
        c.set_push_healthy(true);
        for i in 0..6 {
            c.insert(i, i);
        }
        c.retain(|_, v| v % 2 == 0);
        assert_eq!(c.get(&1), None);
        assert_eq!(c.get(&2), Some(2));
        c.clear();
        assert_eq!(c.get(&2), None);
    }
}
