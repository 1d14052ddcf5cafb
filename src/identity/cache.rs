//! LRU caches bounded in entries and in bytes whose entries expire, with hit/miss counters
//! and size gauges (entries, bytes).

use std::hash::Hash;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

use super::DidDocument;
use crate::budget::Weigh;
use crate::metrics::{
    IDENTITY_CACHE_BYTES as CACHE_BYTES, IDENTITY_CACHE_ENTRIES as CACHE_ENTRIES,
    IDENTITY_CACHE_HITS_TOTAL as CACHE_HITS, IDENTITY_CACHE_MISSES_TOTAL as CACHE_MISSES,
};

/// What an entry costs besides its key and value (LRU node, hash slot, expiry).
const ENTRY_OVERHEAD_BYTES: usize = 64;

/// An LRU cache of at most `capacity` entries and `max_bytes` bytes, each entry valid for its
/// own TTL.
pub struct TtlCache<K: Hash + Eq, V> {
    inner: Mutex<Inner<K, V>>,
    max_bytes: usize,
    label: &'static str,
}

struct Inner<K: Hash + Eq, V> {
    lru: LruCache<K, (V, Instant)>,
    bytes: usize,
}

fn weight<K: Weigh, V: Weigh>(k: &K, v: &V) -> usize {
    k.bytes() + v.bytes() + ENTRY_OVERHEAD_BYTES
}

impl<K: Hash + Eq + Weigh, V: Weigh> Inner<K, V> {
    fn pop(&mut self, key: &K) -> Option<V> {
        let (v, _) = self.lru.pop(key)?;
        self.bytes = self.bytes.saturating_sub(weight(key, &v));
        Some(v)
    }
}

impl<K: Hash + Eq + Weigh, V: Clone + Weigh> TtlCache<K, V> {
    /// A cache of at most `capacity` entries (at least 1) and `max_bytes` bytes; `label` names
    /// it in metrics.
    pub fn new(capacity: usize, max_bytes: usize, label: &'static str) -> Self {
        let cap = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            inner: Mutex::new(Inner {
                lru: LruCache::new(cap),
                bytes: 0,
            }),
            max_bytes,
            label,
        }
    }

    fn publish(&self, inner: &Inner<K, V>) {
        metrics::gauge!(CACHE_ENTRIES, "cache" => self.label).set(inner.lru.len() as f64);
        metrics::gauge!(CACHE_BYTES, "cache" => self.label).set(inner.bytes as f64);
    }

    /// The value if present and not expired (counts a hit or a miss).
    pub fn get(&self, key: &K) -> Option<V> {
        let now = Instant::now();
        let mut cache = self.lock();
        let found = match cache.lru.get(key) {
            Some((v, expires)) if *expires > now => Some(v.clone()),
            Some(_) => {
                cache.pop(key);
                None
            }
            None => None,
        };
        self.publish(&cache);
        drop(cache);
        let counter = if found.is_some() {
            CACHE_HITS
        } else {
            CACHE_MISSES
        };
        metrics::counter!(counter, "cache" => self.label).increment(1);
        found
    }

    /// Peeks without counting or promoting (expired entries count as absent).
    pub fn peek(&self, key: &K) -> Option<V> {
        let cache = self.lock();
        cache
            .lru
            .peek(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(v, _)| v.clone())
    }

    /// Inserts `value` valid for `ttl`, evicting the least recently used entries past either
    /// bound. An entry heavier than the whole byte bound is not kept.
    pub fn insert(&self, key: K, value: V, ttl: Duration) {
        let expires = Instant::now() + ttl;
        let w = weight(&key, &value);
        let mut cache = self.lock();
        cache.pop(&key);
        if w <= self.max_bytes {
            if let Some((k, (v, _))) = cache.lru.push(key, (value, expires)) {
                cache.bytes = cache.bytes.saturating_sub(weight(&k, &v));
            }
            cache.bytes += w;
        }
        while cache.bytes > self.max_bytes {
            let Some((k, (v, _))) = cache.lru.pop_lru() else {
                break;
            };
            cache.bytes = cache.bytes.saturating_sub(weight(&k, &v));
        }
        self.publish(&cache);
    }

    /// Removes the entry, returning its value if it was there (expired or not).
    pub fn remove(&self, key: &K) -> Option<V> {
        let mut cache = self.lock();
        let old = cache.pop(key);
        self.publish(&cache);
        old
    }

    /// Entries held (expired ones included until touched).
    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether the cache holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        // A panic while holding this lock cannot leave the LRU inconsistent for our use.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Weigh for DidDocument {
    fn bytes(&self) -> usize {
        self.did.bytes()
            + self.handle.bytes()
            + self.pds_endpoint.bytes()
            + self.signing_key.bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_bound_evicts_the_least_recently_used() {
        let entry = weight(&"a".to_owned(), &"x".repeat(100));
        let c: TtlCache<String, String> = TtlCache::new(100, 2 * entry, "test");
        let ttl = Duration::from_secs(60);
        for k in ["a", "b", "c"] {
            c.insert(k.into(), "x".repeat(100), ttl);
        }
        assert_eq!((c.len(), c.bytes()), (2, 2 * entry));
        assert_eq!(c.peek(&"a".into()), None);
        // Replacing an entry does not count it twice; one too heavy is not kept.
        c.insert("c".into(), "x".repeat(100), ttl);
        assert_eq!(c.bytes(), 2 * entry);
        c.insert("d".into(), "x".repeat(10 * entry), ttl);
        assert_eq!(c.peek(&"d".into()), None);
        assert_eq!(c.remove(&"b".into()).map(|v| v.len()), Some(100));
        assert_eq!(c.bytes(), entry);
    }

    #[test]
    fn expires_and_evicts() {
        let c: TtlCache<String, u32> = TtlCache::new(2, usize::MAX, "test");
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
