//! Bounded LRU pending-op maps: ops of DIDs whose user is not created yet wait here (§5).
//!
//! Reaching a bound never drops data: a full per-DID list is handed back whole (overflow) and
//! a full map hands back the least-recently-used DID's ops (eviction); the caller flushes them
//! at once with a stub user. [`PendingOps::min_pending_seq`] is the low watermark the durable
//! cursor must stay below.

use std::collections::BTreeMap;

use lru::LruCache;

use crate::budget::{MemoryBudget, Weigh};
use crate::metrics as m;

/// Default bound on DIDs held: ~10k users being created at once covers a backfill burst
/// while keeping the map a few MiB.
pub const DEFAULT_MAX_DIDS: usize = 10_000;
/// Default bound on ops per DID: a new account rarely writes more than this before its
/// identity resolves; past it we flush with a stub user rather than grow.
pub const DEFAULT_MAX_OPS_PER_DID: usize = 100;

/// Errors of this module (configuration only: the map itself cannot fail).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PendingError {
    /// A bound was zero.
    #[error("pending-op map bound `{name}` must be at least 1, got {value}")]
    ZeroBound {
        /// Name of the bound.
        name: &'static str,
        /// The rejected value.
        value: usize,
    },
}

/// Bounds of a [`PendingOps`] map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingConfig {
    /// Most DIDs held at once (default [`DEFAULT_MAX_DIDS`]).
    pub max_dids: usize,
    /// Most ops held per DID (default [`DEFAULT_MAX_OPS_PER_DID`]).
    pub max_ops_per_did: usize,
    /// Most bytes held over all DIDs (default: the pending share of the default
    /// [`MemoryBudget`]).
    pub max_bytes: usize,
}

impl Default for PendingConfig {
    fn default() -> Self {
        Self {
            max_dids: DEFAULT_MAX_DIDS,
            max_ops_per_did: DEFAULT_MAX_OPS_PER_DID,
            max_bytes: MemoryBudget::default().pending(),
        }
    }
}

/// The ops of one DID, in push order, each with its firehose seq.
pub type DidOps<T> = Vec<(i64, T)>;

/// What [`PendingOps::push`] did with the op.
#[derive(Debug, PartialEq, Eq)]
pub enum PushOutcome<T> {
    /// The op is held until [`PendingOps::take`].
    Held,
    /// The DID's list was full, or holding the op would pass the map's byte bound: all the
    /// DID's ops, the new one last, must be flushed now.
    Overflow {
        /// The DID whose ops these are.
        did: String,
        /// Its ops in push order, including the one just pushed.
        ops: DidOps<T>,
    },
    /// The map was full: the least-recently-used DID was evicted and its ops must be flushed
    /// now. The new op is held.
    Evicted {
        /// The evicted DID (not the one pushed).
        did: String,
        /// Its ops in push order.
        ops: DidOps<T>,
    },
}

/// Bounded LRU map DID → ops waiting for that DID's user to exist.
pub struct PendingOps<T> {
    map: LruCache<String, DidOps<T>>,
    /// seq → number of held ops with that seq (one commit's ops share a seq).
    seqs: BTreeMap<i64, usize>,
    ops: usize,
    /// Bytes held ([`Weigh`]), never above `config.max_bytes`.
    bytes: usize,
    config: PendingConfig,
}

impl<T> PendingOps<T> {
    /// A map with the given bounds; both must be at least 1.
    pub fn new(config: PendingConfig) -> Result<Self, PendingError> {
        for (name, value) in [
            ("max_dids", config.max_dids),
            ("max_ops_per_did", config.max_ops_per_did),
            ("max_bytes", config.max_bytes),
        ] {
            if value == 0 {
                return Err(PendingError::ZeroBound { name, value });
            }
        }
        Ok(Self {
            map: LruCache::unbounded(),
            seqs: BTreeMap::new(),
            ops: 0,
            bytes: 0,
            config,
        })
    }
}

impl<T: Weigh> PendingOps<T> {
    /// Holds `item` (firehose `seq`) for `did`, marking the DID most recently used.
    /// Never drops: whatever no longer fits is returned to be flushed now.
    pub fn push(&mut self, did: &str, seq: i64, item: T) -> PushOutcome<T> {
        let weight = item.bytes();
        let over_bytes = self.bytes.saturating_add(weight) > self.config.max_bytes;
        if over_bytes && !self.map.contains(did) {
            // Holding it would pass the byte bound: this DID's op goes on now, as a stub.
            metrics::counter!(m::PENDING_OVERFLOWS_TOTAL).increment(1);
            return PushOutcome::Overflow {
                did: did.to_owned(),
                ops: vec![(seq, item)],
            };
        }
        if let Some(list) = self.map.get_mut(did) {
            if list.len() >= self.config.max_ops_per_did || over_bytes {
                let mut ops = self.map.pop(did).unwrap_or_default();
                self.forget(&ops);
                ops.push((seq, item));
                metrics::counter!(m::PENDING_OVERFLOWS_TOTAL).increment(1);
                self.publish();
                return PushOutcome::Overflow {
                    did: did.to_owned(),
                    ops,
                };
            }
            list.push((seq, item));
            self.remember(seq, weight);
            self.publish();
            return PushOutcome::Held;
        }
        let evicted = if self.map.len() >= self.config.max_dids {
            self.map.pop_lru()
        } else {
            None
        };
        if let Some((_, ops)) = &evicted {
            self.forget(ops);
            metrics::counter!(m::PENDING_EVICTIONS_TOTAL).increment(1);
        }
        self.map.put(did.to_owned(), vec![(seq, item)]);
        self.remember(seq, weight);
        self.publish();
        match evicted {
            Some((did, ops)) => PushOutcome::Evicted { did, ops },
            None => PushOutcome::Held,
        }
    }

    /// Removes and returns the DID's ops in push order (its user is ready).
    pub fn take(&mut self, did: &str) -> Option<DidOps<T>> {
        let ops = self.map.pop(did)?;
        self.forget(&ops);
        self.publish();
        Some(ops)
    }

    /// Removes and returns everything, least recently used first (shutdown drain).
    pub fn drain(&mut self) -> Vec<(String, DidOps<T>)> {
        let mut out = Vec::with_capacity(self.map.len());
        while let Some(entry) = self.map.pop_lru() {
            out.push(entry);
        }
        self.seqs.clear();
        self.ops = 0;
        self.bytes = 0;
        self.publish();
        out
    }

    /// Lowest seq still held: the durable cursor must stay below it. O(log n).
    pub fn min_pending_seq(&self) -> Option<i64> {
        self.seqs.first_key_value().map(|(seq, _)| *seq)
    }

    /// Whether ops of `did` are held.
    pub fn contains(&self, did: &str) -> bool {
        self.map.contains(did)
    }

    /// Number of DIDs held.
    pub fn dids(&self) -> usize {
        self.map.len()
    }

    /// Number of ops held over all DIDs.
    pub fn ops(&self) -> usize {
        self.ops
    }

    /// Bytes held over all DIDs.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The bounds in force.
    pub fn config(&self) -> PendingConfig {
        self.config
    }

    fn remember(&mut self, seq: i64, weight: usize) {
        *self.seqs.entry(seq).or_insert(0) += 1;
        self.ops += 1;
        self.bytes += weight;
    }

    fn forget(&mut self, ops: &[(i64, T)]) {
        for (seq, item) in ops {
            self.bytes = self.bytes.saturating_sub(item.bytes());
            if let Some(count) = self.seqs.get_mut(seq) {
                *count -= 1;
                if *count == 0 {
                    self.seqs.remove(seq);
                }
            }
        }
        self.ops = self.ops.saturating_sub(ops.len());
    }

    fn publish(&self) {
        metrics::gauge!(m::PENDING_DIDS).set(self.map.len() as f64);
        metrics::gauge!(m::PENDING_OPS).set(self.ops as f64);
        metrics::gauge!(m::PENDING_BYTES).set(self.bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(max_dids: usize, max_ops_per_did: usize) -> PendingOps<u32> {
        PendingOps::new(PendingConfig {
            max_dids,
            max_ops_per_did,
            max_bytes: usize::MAX,
        })
        .expect("valid bounds")
    }

    #[test]
    fn the_byte_bound_flushes_instead_of_growing() {
        let mut m = PendingOps::new(PendingConfig {
            max_dids: 10,
            max_ops_per_did: 10,
            max_bytes: 100,
        })
        .unwrap();
        assert_eq!(m.push("did:a", 1, 40), PushOutcome::Held);
        assert_eq!(m.push("did:b", 2, 50), PushOutcome::Held);
        assert_eq!(m.bytes(), 90);
        // A new DID that does not fit goes on at once, alone.
        assert_eq!(
            m.push("did:c", 3, 20),
            PushOutcome::Overflow {
                did: "did:c".into(),
                ops: vec![(3, 20)]
            }
        );
        // A held DID that would pass the bound is flushed whole.
        assert_eq!(
            m.push("did:a", 4, 30),
            PushOutcome::Overflow {
                did: "did:a".into(),
                ops: vec![(1, 40), (4, 30)]
            }
        );
        assert_eq!((m.bytes(), m.dids()), (50, 1));
        assert_eq!(m.take("did:b"), Some(vec![(2, 50)]));
        assert_eq!(m.bytes(), 0);
    }

    #[test]
    fn zero_bounds_are_rejected() {
        for (max_dids, max_ops_per_did, max_bytes) in [(0, 1, 1), (1, 0, 1), (1, 1, 0)] {
            assert!(PendingOps::<u32>::new(PendingConfig {
                max_dids,
                max_ops_per_did,
                max_bytes,
            })
            .is_err());
        }
        assert_eq!(PendingConfig::default().max_dids, DEFAULT_MAX_DIDS);
    }

    #[test]
    fn take_returns_ops_in_push_order() {
        let mut m = map(10, 10);
        assert_eq!(m.push("did:a", 1, 10), PushOutcome::Held);
        assert_eq!(m.push("did:b", 2, 20), PushOutcome::Held);
        assert_eq!(m.push("did:a", 3, 11), PushOutcome::Held);
        assert_eq!(m.ops(), 3);
        assert_eq!(m.dids(), 2);
        assert_eq!(m.take("did:a"), Some(vec![(1, 10), (3, 11)]));
        assert_eq!(m.take("did:a"), None);
        assert_eq!(m.ops(), 1);
        assert!(m.contains("did:b"));
    }

    #[test]
    fn eviction_takes_the_least_recently_used_did() {
        let mut m = map(2, 10);
        m.push("did:a", 1, 1);
        m.push("did:b", 2, 2);
        // Touching a makes b the least recently used.
        m.push("did:a", 3, 3);
        match m.push("did:c", 4, 4) {
            PushOutcome::Evicted { did, ops } => {
                assert_eq!(did, "did:b");
                assert_eq!(ops, vec![(2, 2)]);
            }
            other => panic!("expected eviction, got {other:?}"),
        }
        assert!(m.contains("did:a") && m.contains("did:c") && !m.contains("did:b"));
        // Now a is the least recently used.
        match m.push("did:d", 5, 5) {
            PushOutcome::Evicted { did, ops } => {
                assert_eq!(did, "did:a");
                assert_eq!(ops, vec![(1, 1), (3, 3)]);
            }
            other => panic!("expected eviction, got {other:?}"),
        }
        assert_eq!(m.dids(), 2);
        assert_eq!(m.ops(), 2);
    }

    #[test]
    fn full_list_overflows_whole_with_the_new_op_last() {
        let mut m = map(10, 3);
        for seq in 1..=3 {
            assert_eq!(m.push("did:a", seq, seq as u32), PushOutcome::Held);
        }
        m.push("did:b", 4, 40);
        match m.push("did:a", 5, 5) {
            PushOutcome::Overflow { did, ops } => {
                assert_eq!(did, "did:a");
                assert_eq!(ops, vec![(1, 1), (2, 2), (3, 3), (5, 5)]);
            }
            other => panic!("expected overflow, got {other:?}"),
        }
        assert!(!m.contains("did:a"));
        assert_eq!(m.ops(), 1);
        assert_eq!(m.min_pending_seq(), Some(4));
        // The DID starts afresh.
        assert_eq!(m.push("did:a", 6, 6), PushOutcome::Held);
    }

    #[test]
    fn low_watermark_follows_pushes_takes_and_evictions() {
        let mut m = map(2, 10);
        assert_eq!(m.min_pending_seq(), None);
        m.push("did:a", 10, 0);
        m.push("did:a", 10, 1); // same commit, same seq
        m.push("did:b", 12, 0);
        assert_eq!(m.min_pending_seq(), Some(10));
        m.push("did:b", 13, 0);
        // Evicts a (least recently used): its seqs go.
        assert!(matches!(
            m.push("did:c", 14, 0),
            PushOutcome::Evicted { .. }
        ));
        assert_eq!(m.min_pending_seq(), Some(12));
        m.take("did:b");
        assert_eq!(m.min_pending_seq(), Some(14));
        m.take("did:c");
        assert_eq!(m.min_pending_seq(), None);
        assert!(m.is_empty());
    }

    #[test]
    fn nothing_is_ever_dropped() {
        let mut m = map(7, 5);
        let mut pushed: Vec<(String, i64, u32)> = Vec::new();
        let mut returned: Vec<(String, i64, u32)> = Vec::new();
        let mut rng_state = 0x2545_f491_u64;
        for seq in 0..5_000_i64 {
            // Small xorshift: deterministic mix of DIDs and takes.
            rng_state ^= rng_state << 13;
            rng_state ^= rng_state >> 7;
            rng_state ^= rng_state << 17;
            let did = format!("did:plc:{}", rng_state % 13);
            if rng_state % 11 == 0 {
                if let Some(ops) = m.take(&did) {
                    returned.extend(ops.into_iter().map(|(s, i)| (did.clone(), s, i)));
                }
                continue;
            }
            let item = seq as u32;
            pushed.push((did.clone(), seq, item));
            match m.push(&did, seq, item) {
                PushOutcome::Held => {}
                PushOutcome::Overflow { did, ops } | PushOutcome::Evicted { did, ops } => {
                    // Per-DID order is preserved in what comes back.
                    assert!(ops.windows(2).all(|w| w[0].0 < w[1].0));
                    returned.extend(ops.into_iter().map(|(s, i)| (did.clone(), s, i)));
                }
            }
            assert!(m.dids() <= 7);
            if let Some(min) = m.min_pending_seq() {
                assert!(min <= seq);
            }
        }
        for (did, ops) in m.drain() {
            returned.extend(ops.into_iter().map(|(s, i)| (did.clone(), s, i)));
        }
        assert_eq!(m.ops(), 0);
        assert_eq!(m.min_pending_seq(), None);
        pushed.sort();
        returned.sort();
        assert_eq!(pushed, returned);
    }
}
