//! Bounded LRU caches whose entries expire, with hit/miss counters and a size gauge.

use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::metrics::{
    IDENTITY_CACHE_ENTRIES as CACHE_ENTRIES, IDENTITY_CACHE_HITS_TOTAL as CACHE_HITS,
    IDENTITY_CACHE_MISSES_TOTAL as CACHE_MISSES,
};

/// An LRU cache of at most `capacity` entries, each valid for its own TTL.
pub struct TtlCache<K: Hash + Eq, V> {
    inner: Mutex<LruCache<K, (V, Instant)>>,
    label: &'static str,
}

impl<K: Hash + Eq, V: Clone> TtlCache<K, V> {
    /// A cache of at most `capacity` entries (at least 1); `label` names it in metrics.
    pub fn new(capacity: usize, label: &'static str) -> Self {
        let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            inner: Mutex::new(LruCache::new(cap)),
            label,
        }
    }

    /// The value if present and not expired (counts a hit or a miss).
    pub fn get(&self, key: &K) -> Option<V> {
        let now = Instant::now();
        let mut cache = self.lock();
        let found = match cache.get(key) {
            Some((v, expires)) if *expires > now => Some(v.clone()),
            Some(_) => {
                cache.pop(key);
                None
            }
            None => None,
        };
        let len = cache.len();
        drop(cache);
        let counter = if found.is_some() {
            CACHE_HITS
        } else {
            CACHE_MISSES
        };
        metrics::counter!(counter, "cache" => self.label).increment(1);
        metrics::gauge!(CACHE_ENTRIES, "cache" => self.label).set(len as f64);
        found
    }

    /// Peeks without counting or promoting (expired entries count as absent).
    pub fn peek(&self, key: &K) -> Option<V> {
        let cache = self.lock();
        cache
            .peek(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(v, _)| v.clone())
    }

    /// Inserts `value` valid for `ttl`, evicting the least recently used entry when full.
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        let expires = Instant::now() + ttl;
        let mut cache = self.lock();
        cache.put(key, (value, expires));
        let len = cache.len();
        drop(cache);
        metrics::gauge!(CACHE_ENTRIES, "cache" => self.label).set(len as f64);
    }

    /// Removes the entry, returning its value if it was there (expired or not).
    pub fn remove(&self, key: &K) -> Option<V> {
        let mut cache = self.lock();
        let old = cache.pop(key).map(|(v, _)| v);
        let len = cache.len();
        drop(cache);
        metrics::gauge!(CACHE_ENTRIES, "cache" => self.label).set(len as f64);
        old
    }

    /// Entries held (expired ones included until touched).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<K, (V, Instant)>> {
        // A panic while holding this lock cannot leave the LRU inconsistent for our use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_and_evicts() {
        let c: TtlCache<String, u32> = TtlCache::new(2, "test");
        c.insert("a".into(), 1, Duration::from_secs(60));
        c.insert("b".into(), 2, Duration::ZERO);
        assert_eq!(c.get(&"a".into()), Some(1));
        assert_eq!(c.get(&"b".into()), None, "expired");
        c.insert("b".into(), 2, Duration::from_secs(60));
        c.insert("c".into(), 3, Duration::from_secs(60));
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&"a".into()), None, "least recently used was evicted");
        assert_eq!(c.remove(&"c".into()), Some(3));
        assert_eq!(c.peek(&"b".into()), Some(2));
    }
}
