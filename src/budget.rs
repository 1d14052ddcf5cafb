//! The memory budget (`--memory-budget-mb`) and its split among the bounded queues, maps and
//! caches. Every one of them is bounded in bytes (an item count alone means nothing when one
//! frame may weigh 5 MiB); the shares below add up to 23/32 (72 %) of the budget, and the
//! rest is left to what no bound covers: the binary and runtime, the decode jobs'
//! working set and the writer's statement buffers. The systemd unit sets `MemoryHigh` and
//! `MemoryMax` to match the default (§9).
//!
//! | share | of the budget | at 256 MB |
//! | --- | --- | --- |
//! | raw frames queued ahead of the decoder | 1/8 | 32 MB |
//! | decoded chunks queued ahead of the users stage | 1/8 | 32 MB |
//! | chunks queued ahead of the verify stage (or the batcher) | 1/32 | 8 MB |
//! | chunks queued between the verify stage and the batcher | 1/32 | 8 MB |
//! | batches: one built, one queued, one written (each) | 1/16 | 16 MB × 3 |
//! | pending-op map (events of users being created) | 1/8 | 32 MB |
//! | live relay messages queued ahead of the pipeline (per hop) | 1/32 | 8 MB |
//! | known-DID set | 1/32 | 8 MB |
//! | identity caches (DID documents, handles) | 1/32 | 8 MB |
//! | not covered by a bound (runtime, decode jobs, SQL buffers) | the rest | 72 MB |

/// Default budget: what a small VM can give the indexer next to PostgreSQL.
pub const DEFAULT_MEMORY_BUDGET_MB: u64 = 256;
/// Smallest budget accepted: below it a share cannot hold one 5 MiB frame.
pub const MIN_MEMORY_BUDGET_MB: u64 = 64;

/// What one decoded event costs in memory besides its bytes (structs, strings, map slots).
pub const EVENT_OVERHEAD_BYTES: usize = 512;

/// What an item weighs in memory, in bytes (an estimate that errs on the heavy side): what
/// the byte bounds of the queues and maps count.
pub trait Weigh {
    fn bytes(&self) -> usize;
}

impl Weigh for String {
    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.len()
    }
}

impl<T: Weigh> Weigh for Option<T> {
    fn bytes(&self) -> usize {
        self.as_ref()
            .map_or(std::mem::size_of::<Self>(), Weigh::bytes)
    }
}

/// Test items weigh their value in bytes.
#[cfg(test)]
impl Weigh for u32 {
    fn bytes(&self) -> usize {
        *self as usize
    }
}

/// A memory budget in bytes, and the share of each bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    pub total: usize,
}

impl Default for MemoryBudget {
    fn default() -> Self {
        Self::from_mb(DEFAULT_MEMORY_BUDGET_MB)
    }
}

impl MemoryBudget {
    pub fn from_mb(mb: u64) -> Self {
        let bytes = mb.saturating_mul(1_000_000);
        Self {
            total: usize::try_from(bytes).unwrap_or(usize::MAX),
        }
    }

    /// Raw frames queued between the source and the decoder.
    pub fn raw_queue(&self) -> usize {
        self.total / 8
    }

    /// Decoded chunks queued between the decoder and the users stage.
    pub fn decoded_queue(&self) -> usize {
        self.total / 8
    }

    /// Chunks queued after the users stage (ahead of the verify stage, or of the batcher).
    pub fn users_queue(&self) -> usize {
        self.total / 32
    }

    /// Chunks queued between the verify stage and the batcher (when verification is on).
    pub fn verified_queue(&self) -> usize {
        self.total / 32
    }

    /// One batch (the batcher cuts a batch at this size; the batch queue holds one).
    pub fn batch(&self) -> usize {
        self.total / 16
    }

    /// Events held in the pending-op map.
    pub fn pending(&self) -> usize {
        self.total / 8
    }

    /// Live relay messages queued ahead of the pipeline.
    pub fn live_queue(&self) -> usize {
        self.total / 32
    }

    /// The known-DID set of the users stage.
    pub fn known_dids(&self) -> usize {
        self.total / 32
    }

    /// The identity caches, all together.
    pub fn identity_caches(&self) -> usize {
        self.total / 32
    }

    /// Live messages of up to `max_frame_bytes` the live queue may hold (at least 2: the
    /// client can hand one on while the source takes another).
    pub fn live_queue_frames(&self, max_frame_bytes: usize) -> usize {
        (self.live_queue() / max_frame_bytes.max(1)).max(2)
    }

    /// Every share by name, for the `memory_budget_bytes` gauge and the docs.
    pub fn shares(&self) -> [(&'static str, usize); 10] {
        [
            ("total", self.total),
            ("raw_queue", self.raw_queue()),
            ("decoded_queue", self.decoded_queue()),
            ("users_queue", self.users_queue()),
            ("verified_queue", self.verified_queue()),
            ("batch", self.batch()),
            ("pending", self.pending()),
            ("live_queue", self.live_queue()),
            ("known_dids", self.known_dids()),
            ("identity_caches", self.identity_caches()),
        ]
    }

    /// Publishes the shares (gauge `memory_budget_bytes{share}`).
    pub fn publish(&self) {
        for (share, bytes) in self.shares() {
            metrics::gauge!(crate::metrics::MEMORY_BUDGET_BYTES, "share" => share)
                .set(bytes as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_leave_a_quarter_unassigned() {
        let b = MemoryBudget::default();
        assert_eq!(b.total, 256_000_000);
        let assigned = b.raw_queue()
            + b.decoded_queue()
            + b.users_queue()
            + b.verified_queue()
            + 3 * b.batch()
            + b.pending()
            + b.live_queue()
            + b.known_dids()
            + b.identity_caches();
        assert_eq!(assigned, 184_000_000, "23/32 of the budget");
        assert_eq!(b.live_queue_frames(5 * 1024 * 1024), 2);
        assert_eq!(b.live_queue_frames(4_000), 2_000);
    }
}
