//! A small in-process TTL cache for resolved credentials and accounts, so the hot path never
//! waits on Postgres. Entries are dropped early by the invalidation channel; while that channel
//! is down every entry lives at most `degraded_ttl`, which keeps revocation within its bound.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::RwLock;

pub struct TtlCache<K, V> {
    /// value, inserted at, short-lived (a cached miss)
    map: RwLock<HashMap<K, (V, Instant, bool)>>,
    ttl: Duration,
    degraded_ttl: Duration,
    capacity: usize,
    /// False while the invalidation channel is not subscribed.
    push_healthy: AtomicBool,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    pub fn new(ttl: Duration, degraded_ttl: Duration, capacity: usize) -> Self {
        TtlCache {
            map: RwLock::new(HashMap::new()),
            ttl,
            degraded_ttl,
            capacity,
            push_healthy: AtomicBool::new(false),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let map = self.map.read();
        let (value, inserted, short) = map.get(key)?;
        let ttl = if self.push_healthy.load(Ordering::Relaxed) && !short {
            self.ttl
        } else {
            self.degraded_ttl
        };
        (inserted.elapsed() < ttl).then(|| value.clone())
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
        let mut map = self.map.write();
        if map.len() >= self.capacity && !map.contains_key(&key) {
            let ttl = self.ttl;
            map.retain(|_, (_, at, _)| at.elapsed() < ttl);
            if map.len() >= self.capacity {
                map.clear();
            }
        }
        map.insert(key, (value, Instant::now(), short));
    }

    pub fn remove(&self, key: &K) {
        self.map.write().remove(key);
    }

    pub fn retain(&self, mut keep: impl FnMut(&K, &V) -> bool) {
        self.map.write().retain(|k, (v, _, _)| keep(k, v));
    }

    pub fn clear(&self) {
        self.map.write().clear();
    }

    pub fn set_push_healthy(&self, healthy: bool) {
        self.push_healthy.store(healthy, Ordering::Relaxed);
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
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
}
