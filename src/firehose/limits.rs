//! The sync spec's limits on one `#commit` (ops, `blocks` bytes, record bytes), checked before
//! any record is hashed or decoded, and the per-commit block cache that hashes and decodes each
//! distinct block once, however many ops point at it.
//!
//! A commit over a limit is not applied at all: the decoder hands it on without ops or blocks,
//! carrying the [`OverLimit`] reason, and the writer marks its repo for resync (§3, §12).

use std::collections::HashMap;

use cid::Cid;

use super::car::{BlockError, Car};
use super::event::{OpRecord, Unavailable};
use super::record::{self, Decoded, Rejection};

/// Ops in one commit (sync spec: 200).
pub const DEFAULT_MAX_COMMIT_OPS: usize = 200;
/// Bytes of one commit's `blocks` CAR slice (sync spec: 2,000,000).
pub const DEFAULT_MAX_COMMIT_BLOCKS_BYTES: usize = 2_000_000;
/// Bytes of one record block (sync spec: 1,000,000).
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1_000_000;

/// The limits one commit is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitLimits {
    pub max_ops: usize,
    /// Bytes of `blocks`; also the most the ops' records may add up to, counted once per op
    /// (see [`OverLimit::RecordsTooLarge`]).
    pub max_blocks_bytes: usize,
    pub max_record_bytes: usize,
}

impl Default for CommitLimits {
    fn default() -> Self {
        Self {
            max_ops: DEFAULT_MAX_COMMIT_OPS,
            max_blocks_bytes: DEFAULT_MAX_COMMIT_BLOCKS_BYTES,
            max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
        }
    }
}

/// Why a commit was skipped: `reason()` is the bounded label of `commits_over_limit_total`
/// and the `sync_reason` its repo is desynchronized with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OverLimit {
    /// More ops than `max_ops`.
    TooManyOps,
    /// `blocks` longer than `max_blocks_bytes`.
    BlocksTooLarge,
    /// A record block an op uses is longer than `max_record_bytes`.
    RecordTooLarge,
    /// The records the ops use, counted once per op, add up to more than `max_blocks_bytes`:
    /// a small CAR whose one block many ops share would otherwise expand into many copies of
    /// it in memory, far beyond what the `blocks` limit means to allow.
    RecordsTooLarge,
}

impl OverLimit {
    pub fn reason(self) -> &'static str {
        match self {
            Self::TooManyOps => "too_many_ops",
            Self::BlocksTooLarge => "blocks_too_large",
            Self::RecordTooLarge => "record_too_large",
            Self::RecordsTooLarge => "records_too_large",
        }
    }
}

impl CommitLimits {
    /// Checks what the commit body states, before its CAR is parsed.
    pub(crate) fn check_body(&self, ops: usize, blocks_bytes: usize) -> Result<(), OverLimit> {
        if ops > self.max_ops {
            Err(OverLimit::TooManyOps)
        } else if blocks_bytes > self.max_blocks_bytes {
            Err(OverLimit::BlocksTooLarge)
        } else {
            Ok(())
        }
    }

    /// Checks the sizes of the record blocks the ops use (one entry per op), before any of
    /// them is hashed; returns their sum.
    pub(crate) fn check_records(
        &self,
        sizes: impl IntoIterator<Item = usize>,
    ) -> Result<usize, OverLimit> {
        let mut total = 0usize;
        for size in sizes {
            if size > self.max_record_bytes {
                return Err(OverLimit::RecordTooLarge);
            }
            total = total.saturating_add(size);
        }
        if total > self.max_blocks_bytes {
            return Err(OverLimit::RecordsTooLarge);
        }
        Ok(total)
    }
}

/// The blocks of one commit as its ops use them: each distinct CID is hashed once, and each
/// distinct (CID, collection, rkey is `self`) decoded once. The only record-key rule of the
/// lexicons is the profile's `self`, so that flag is all of the key a decode depends on.
pub(crate) struct BlockCache<'c, 'a> {
    car: &'c Car<'a>,
    verified: HashMap<Cid, Result<&'a [u8], BlockError>>,
    decoded: HashMap<(Cid, &'a str, bool), Result<Decoded, Rejection>>,
    /// Blocks hashed and records decoded so far (what the tests check).
    pub(crate) hashes: usize,
    pub(crate) decodes: usize,
}

impl<'c, 'a> BlockCache<'c, 'a> {
    pub(crate) fn new(car: &'c Car<'a>) -> Self {
        Self {
            car,
            verified: HashMap::new(),
            decoded: HashMap::new(),
            hashes: 0,
            decodes: 0,
        }
    }

    /// The record of a create/update op of `collection`/`rkey` whose block is `cid`.
    pub(crate) fn record(&mut self, cid: &Cid, collection: &'a str, rkey: &str) -> OpRecord {
        let car = self.car;
        let hashes = &mut self.hashes;
        let verified = *self.verified.entry(*cid).or_insert_with(|| {
            *hashes += 1;
            car.get_verified(cid)
        });
        let block = match verified {
            Err(BlockError::Missing) => return OpRecord::Unavailable(Unavailable::BlockMissing),
            Err(BlockError::Mismatch) => return OpRecord::Unavailable(Unavailable::BlockMismatch),
            Ok(block) => block,
        };
        let decodes = &mut self.decodes;
        let decoded = self
            .decoded
            .entry((*cid, collection, rkey == "self"))
            .or_insert_with(|| {
                *decodes += 1;
                record::decode(collection, rkey, block)
            });
        match decoded {
            Ok(Decoded::Known(k)) => OpRecord::Known(k.clone()),
            Ok(Decoded::Generic(j)) => OpRecord::Generic(j.clone()),
            Err(r) => OpRecord::Invalid(r.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firehose::car::tests::{build, cid_of};

    #[test]
    fn limits_are_inclusive_and_checked_in_order() {
        let l = CommitLimits {
            max_ops: 2,
            max_blocks_bytes: 100,
            max_record_bytes: 40,
        };
        assert_eq!(l.check_body(2, 100), Ok(()));
        assert_eq!(l.check_body(3, 100), Err(OverLimit::TooManyOps));
        assert_eq!(l.check_body(3, 101), Err(OverLimit::TooManyOps));
        assert_eq!(l.check_body(2, 101), Err(OverLimit::BlocksTooLarge));
        assert_eq!(l.check_records([40, 40]), Ok(80));
        assert_eq!(l.check_records([41]), Err(OverLimit::RecordTooLarge));
        // One 40-byte block shared by three ops expands to 120 bytes.
        assert_eq!(
            l.check_records([40, 40, 40]),
            Err(OverLimit::RecordsTooLarge)
        );
        assert_eq!(
            l.check_records([usize::MAX, 1]),
            Err(OverLimit::RecordTooLarge)
        );
        let defaults = CommitLimits::default();
        assert_eq!(defaults.check_body(200, 2_000_000), Ok(()));
        assert_eq!(defaults.check_body(201, 0), Err(OverLimit::TooManyOps));
        assert_eq!(
            defaults.check_records([1_000_001]),
            Err(OverLimit::RecordTooLarge)
        );
        assert_eq!(OverLimit::TooManyOps.reason(), "too_many_ops");
    }

    #[test]
    fn each_block_is_hashed_and_decoded_once() {
        let like = serde_ipld_dagcbor::to_vec(&serde_json::json!({
            "$type": "com.example.thing",
            "text": "shared",
        }))
        .unwrap();
        let other =
            serde_ipld_dagcbor::to_vec(&serde_json::json!({"$type": "com.example.thing"})).unwrap();
        let (a, b) = (cid_of(&like), cid_of(&other));
        let car_bytes = build(&[(a, &like), (b, &other)]);
        let car = Car::parse(&car_bytes).unwrap();
        let mut cache = BlockCache::new(&car);
        for i in 0..50 {
            let rec = cache.record(&a, "com.example.thing", &format!("k{i}"));
            assert!(matches!(rec, OpRecord::Generic(ref j) if j["text"] == "shared"));
        }
        assert!(matches!(
            cache.record(&b, "com.example.thing", "x"),
            OpRecord::Generic(_)
        ));
        // A missing block is looked up once too, and reported to every op that uses it.
        let missing = cid_of(b"absent");
        for _ in 0..3 {
            assert!(matches!(
                cache.record(&missing, "com.example.thing", "y"),
                OpRecord::Unavailable(Unavailable::BlockMissing)
            ));
        }
        assert_eq!((cache.hashes, cache.decodes), (3, 2));
    }
}
