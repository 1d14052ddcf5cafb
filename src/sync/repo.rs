//! A full repo CAR (`com.atproto.sync.getRepo`): the signed commit as the CAR's root, its
//! signature, then the whole MST walked in key order, every node and record block present
//! and hash-checked, keys strictly ascending and at the height their hash gives. The result
//! lists every record as (collection, rkey, CID, bytes), borrowed from the CAR buffer.

use cid::Cid;

use super::blocks::Blocks;
use super::commit::SignedCommit;
use super::didkey::PublicKey;
use super::error::VerifyError;
use super::mst::{decode_node, key_height};
use super::tree::MAX_HEIGHT;
use crate::firehose::syntax::{is_nsid, is_record_key};

/// Default cap on a repo CAR: the biggest repos on the network are a few hundred MB; a
/// resync holds the whole CAR in memory, so a cap bounds what one account can cost.
pub const DEFAULT_MAX_REPO_CAR_BYTES: usize = 256 * 1024 * 1024;

/// One record of a verified repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRecord<'a> {
    pub collection: String,
    pub rkey: String,
    pub cid: Cid,
    /// The record's DAG-CBOR block, checked to hash to `cid`.
    pub bytes: &'a [u8],
}

/// A repo whose commit signature and whole MST verified.
#[derive(Debug)]
pub struct VerifiedRepo<'a> {
    pub did: String,
    pub rev: String,
    pub data: Cid,
    pub commit_cid: Cid,
    /// Every record, in key order.
    pub records: Vec<RepoRecord<'a>>,
}

/// Verifies the repo CAR `car` of `did` with its signing key `key`, refusing CARs over
/// `max_bytes`.
pub fn verify_repo_car<'a>(
    car: &'a [u8],
    did: &str,
    key: &PublicKey,
    max_bytes: usize,
) -> Result<VerifiedRepo<'a>, VerifyError> {
    if car.len() > max_bytes {
        return Err(VerifyError::TooLarge(car.len()));
    }
    let blocks = Blocks::parse(car)?;
    let root = blocks
        .root()
        .ok_or_else(|| VerifyError::BadCar("not exactly one root".into()))?;
    let commit = SignedCommit::decode(blocks.get(&root)?)?;
    if commit.did != did {
        return Err(VerifyError::CommitMismatch { field: "did" });
    }
    commit.verify_signature(key)?;
    let records = walk_tree(&blocks, &commit.data)?;
    Ok(VerifiedRepo {
        did: commit.did,
        rev: commit.rev,
        data: commit.data,
        commit_cid: root,
        records,
    })
}

/// Walks the whole MST rooted at `data` in key order: every node and record block present
/// and hash-checked, keys ascending and at their height, every key `collection/rkey`.
pub fn walk_tree<'a>(blocks: &Blocks<'a>, data: &Cid) -> Result<Vec<RepoRecord<'a>>, VerifyError> {
    let mut walk = Walk {
        blocks,
        last: Vec::new(),
        records: Vec::new(),
    };
    walk.node(data, None)?;
    Ok(walk.records)
}

struct Walk<'b, 'a> {
    blocks: &'b Blocks<'a>,
    /// The last key yielded: keys must come out strictly ascending.
    last: Vec<u8>,
    records: Vec<RepoRecord<'a>>,
}

impl<'a> Walk<'_, 'a> {
    /// Walks node `cid` of `height` (`None`: the root, height from its first key).
    fn node(&mut self, cid: &Cid, height: Option<u8>) -> Result<(), VerifyError> {
        let node = decode_node(self.blocks.get(cid)?)?;
        let height = match (height, node.entries.first()) {
            (Some(_), None) if node.left.is_none() => {
                return Err(VerifyError::BadMst("empty subtree".into()))
            }
            (Some(h), _) => h,
            (None, Some(first)) => key_height(&first.key),
            (None, None) if node.left.is_none() => return Ok(()),
            (None, None) => return Err(VerifyError::BadMst("root with only a subtree".into())),
        };
        if height > MAX_HEIGHT {
            return Err(VerifyError::TooDeep);
        }
        let has_subtree = node.left.is_some() || node.entries.iter().any(|e| e.right.is_some());
        if height == 0 && has_subtree {
            return Err(VerifyError::BadMst("subtree below height 0".into()));
        }
        if let Some(left) = &node.left {
            self.node(left, Some(height - 1))?;
        }
        for entry in node.entries {
            if key_height(&entry.key) != height {
                return Err(VerifyError::BadMst(format!("key at wrong height {height}")));
            }
            if !self.last.is_empty() && entry.key <= self.last {
                return Err(VerifyError::BadMst("keys out of order".into()));
            }
            self.record(&entry.key, entry.value)?;
            self.last = entry.key;
            if let Some(right) = &entry.right {
                self.node(right, Some(height - 1))?;
            }
        }
        Ok(())
    }

    fn record(&mut self, key: &[u8], cid: Cid) -> Result<(), VerifyError> {
        let bad =
            || VerifyError::BadRecordKey(String::from_utf8_lossy(key).chars().take(200).collect());
        let path = std::str::from_utf8(key).map_err(|_| bad())?;
        let (collection, rkey) = path.split_once('/').ok_or_else(bad)?;
        if !is_nsid(collection) || !is_record_key(rkey) {
            return Err(bad());
        }
        self.records.push(RepoRecord {
            collection: collection.to_owned(),
            rkey: rkey.to_owned(),
            cid,
            bytes: self.blocks.get(&cid)?,
        });
        Ok(())
    }
}
