//! Sync 1.1 verification of firehose events, in the order indigo's `VerifyCommitMessage` and
//! jacquard's `validate_v1_1` check them: the CAR's root is the event's commit; the signed
//! commit's `did`/`rev` are the event's; its signature verifies with the account's key; then
//! every op is proven by the MST nodes in the CAR (the tree rooted at the commit's `data`
//! holds each op's new value, and inverting the ops gives `prevData`).
//! Chain continuity against stored state (`since`/`prevData`) is [`chains`], for the caller.

use cid::Cid;
use serde::Deserialize;

use super::blocks::Blocks;
use super::didkey::PublicKey;
use super::error::VerifyError;
use super::mst::{cid_for, encode_node, NodeData};
use super::signature::unsigned_commit_bytes;
use super::tree::PartialTree;
use crate::firehose::event::{Action, Commit, OpRecord, Sync, Unavailable};

/// The repo format version Sync 1.1 commits carry.
const COMMIT_VERSION: u64 = 3;
/// Most ops a `#commit` may carry (the lexicon's `maxLength`); also bounds the per-path
/// folding below, which is quadratic in the op count.
pub const MAX_COMMIT_OPS: usize = 200;

#[derive(Deserialize)]
struct WireCommit<'a> {
    did: String,
    version: u64,
    data: Cid,
    rev: String,
    #[serde(default)]
    prev: Option<Cid>,
    #[serde(with = "serde_bytes", borrow)]
    sig: &'a [u8],
}

/// A decoded signed commit block (`{did, version, data, rev, prev, sig}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCommit {
    pub did: String,
    pub rev: String,
    /// Root of the repo's MST after this commit.
    pub data: Cid,
    pub prev: Option<Cid>,
    sig: Vec<u8>,
    /// The bytes the signature covers.
    unsigned: Vec<u8>,
}

impl SignedCommit {
    /// Decodes a commit block (version 3 only).
    pub fn decode(block: &[u8]) -> Result<Self, VerifyError> {
        let wire: WireCommit = serde_ipld_dagcbor::from_slice(block)
            .map_err(|e| VerifyError::BadCommit(e.to_string()))?;
        if wire.version != COMMIT_VERSION {
            return Err(VerifyError::BadCommit(format!("version {}", wire.version)));
        }
        Ok(Self {
            unsigned: unsigned_commit_bytes(block)?,
            did: wire.did,
            rev: wire.rev,
            data: wire.data,
            prev: wire.prev,
            sig: wire.sig.to_vec(),
        })
    }

    /// Checks the signature with the account's signing key.
    pub fn verify_signature(&self, key: &PublicKey) -> Result<(), VerifyError> {
        key.verify(&self.unsigned, &self.sig)
    }
}

/// What a verified commit or `#sync` establishes about its repo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub rev: String,
    /// MST root after the commit.
    pub data: Cid,
    pub commit_cid: Cid,
}

/// Whether `commit` continues a repo whose last applied commit had `rev` and MST root
/// `data`: its `since` is that rev and its `prevData` that root. A commit that does not
/// chain leaves the repo desynchronized.
pub fn chains(commit: &Commit, rev: &str, data: &Cid) -> bool {
    commit.since.as_deref() == Some(rev) && commit.prev_data.as_ref() == Some(data)
}

/// Verifies a `#commit` completely: [`open_commit`], the signature, then [`prove_ops`].
pub fn verify_commit(ev: &Commit, key: &PublicKey) -> Result<Verified, VerifyError> {
    let (blocks, commit) = open_commit(ev)?;
    commit.verify_signature(key)?;
    prove_ops(ev, &blocks, &commit)?;
    Ok(Verified {
        rev: commit.rev,
        data: commit.data,
        commit_cid: ev.commit,
    })
}

/// Parses a `#commit`'s CAR and its signed commit block, checking that the CAR's root is the
/// event's `commit` and that the block's `did` and `rev` are the event's. No signature check.
pub fn open_commit(ev: &Commit) -> Result<(Blocks<'_>, SignedCommit), VerifyError> {
    if ev.too_big {
        return Err(VerifyError::TooBig);
    }
    let blocks = Blocks::parse(&ev.blocks)?;
    if blocks.root() != Some(ev.commit) {
        return Err(VerifyError::RootMismatch { car: blocks.root() });
    }
    let commit = SignedCommit::decode(blocks.get(&ev.commit)?)?;
    if commit.did != ev.repo {
        return Err(VerifyError::CommitMismatch { field: "did" });
    }
    if commit.rev != ev.rev {
        return Err(VerifyError::CommitMismatch { field: "rev" });
    }
    Ok((blocks, commit))
}

/// Verifies a `#sync` event: its CAR holds the signed commit alone, as the CAR's root.
pub fn verify_sync(ev: &Sync, key: &PublicKey) -> Result<Verified, VerifyError> {
    let blocks = Blocks::parse(&ev.blocks)?;
    let root = blocks
        .root()
        .ok_or_else(|| VerifyError::BadCar("not exactly one root".into()))?;
    let commit = SignedCommit::decode(blocks.get(&root)?)?;
    if commit.did != ev.did {
        return Err(VerifyError::CommitMismatch { field: "did" });
    }
    if commit.rev != ev.rev {
        return Err(VerifyError::CommitMismatch { field: "rev" });
    }
    commit.verify_signature(key)?;
    Ok(Verified {
        rev: commit.rev,
        data: commit.data,
        commit_cid: root,
    })
}

/// One path's net change in a commit: its value before (`prev`) and after (`value`).
#[derive(Debug, Clone, PartialEq, Eq)]
struct NetOp {
    path: String,
    prev: Option<Cid>,
    value: Option<Cid>,
    /// The decoder read the record from the block `value` names, so it is present and
    /// hashes to `value` already (see [`decoded_from_block`]).
    hashed: bool,
}

/// Whether the frame decoder read `record` from its op's block: it hash-checks a block
/// before decoding it (`limits::BlockCache::record`), and only a hash-checked block yields
/// a known, generic or lexicon-invalid record.
fn decoded_from_block(record: &OpRecord) -> bool {
    matches!(
        record,
        OpRecord::Known(_) | OpRecord::Generic(_) | OpRecord::Invalid(_)
    )
}

/// Folds the ops of a commit into one net change per path. An `applyWrites` batch may touch
/// a path twice; every op then carries the path's value before the commit as `prev`, so the
/// first op's `prev` and the last op's value are the net change.
fn net_ops(ev: &Commit) -> Result<Vec<NetOp>, VerifyError> {
    if ev.ops.len() > MAX_COMMIT_OPS {
        return Err(VerifyError::BadOp {
            path: String::new(),
            why: "more ops than a commit may carry",
        });
    }
    let mut out: Vec<NetOp> = Vec::with_capacity(ev.ops.len());
    for op in &ev.ops {
        let path = format!("{}/{}", op.collection, op.rkey);
        let bad = |why| VerifyError::BadOp {
            path: path.clone(),
            why,
        };
        if matches!(op.record, OpRecord::Unavailable(Unavailable::BadPath)) {
            return Err(bad("bad path"));
        }
        match (op.action, op.cid.is_some()) {
            (Action::Create | Action::Update, false) => return Err(bad("no cid")),
            (Action::Delete, true) => return Err(bad("delete with a cid")),
            _ => {}
        }
        let hashed = op.cid.is_some() && decoded_from_block(&op.record);
        if let Some(earlier) = out.iter_mut().find(|o| o.path == path) {
            earlier.value = op.cid;
            earlier.hashed = hashed;
            continue;
        }
        match (op.action, op.prev.is_some()) {
            (Action::Create, true) => return Err(bad("create with a prev")),
            (Action::Update | Action::Delete, false) => return Err(bad("no prev: not invertible")),
            _ => {}
        }
        out.push(NetOp {
            path,
            prev: op.prev,
            value: op.cid,
            hashed,
        });
    }
    Ok(out)
}

/// CID of the empty MST node `{e: [], l: null}`, the root of a repo without records.
fn empty_tree_cid() -> Result<Cid, VerifyError> {
    let empty = NodeData {
        left: None,
        entries: Vec::new(),
    };
    Ok(cid_for(&encode_node(&empty)?))
}

/// Proves every op of `ev` against the MST in its CAR: each op's record block is present,
/// the signed tree (`commit.data`) holds each path's new value, and undoing the ops on that
/// tree yields the event's `prevData`.
pub fn prove_ops(
    ev: &Commit,
    blocks: &Blocks<'_>,
    commit: &SignedCommit,
) -> Result<(), VerifyError> {
    let prev_data = match (ev.prev_data, &ev.since) {
        (Some(data), _) => data,
        // A repo's first commit follows nothing: undoing it must give the empty tree.
        (None, None) => empty_tree_cid()?,
        (None, Some(_)) => return Err(VerifyError::NoPrevData),
    };
    let ops = net_ops(ev)?;
    let mut tree = PartialTree::load(blocks, &commit.data)?;
    for op in &ops {
        let key = op.path.as_bytes();
        let not_proven = || VerifyError::OpNotProven(op.path.clone());
        match &op.value {
            // Hashed by the decoder, from these very bytes: present is enough.
            Some(value) if op.hashed && !blocks.contains(value) => {
                return Err(VerifyError::MissingBlock(*value));
            }
            Some(value) if !op.hashed => {
                blocks.get(value)?;
            }
            _ => {}
        }
        let found = match (op.prev, op.value) {
            // Undo a create (or a create then delete: the path must be absent).
            (None, _) => tree.remove(key)?,
            // Undo an update or a delete: put the old value back.
            (Some(prev), _) => tree.insert(key, prev)?,
        };
        if found != op.value {
            return Err(not_proven());
        }
    }
    let computed = tree.root_cid()?;
    if computed != prev_data {
        if let Some(cid) = tree.unresolved_root() {
            return Err(VerifyError::MissingBlock(cid));
        }
        return Err(VerifyError::PrevDataMismatch { computed });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firehose::event::RecordOp;
    use crate::sync::mst::cid_for;

    fn op(action: Action, rkey: &str, cid: Option<Cid>, prev: Option<Cid>) -> RecordOp {
        RecordOp {
            action,
            collection: "com.example.status".into(),
            rkey: rkey.into(),
            cid,
            prev,
            record: OpRecord::None,
        }
    }

    fn commit(ops: Vec<RecordOp>) -> Commit {
        Commit {
            repo: "did:plc:x".into(),
            rev: "3aaa".into(),
            since: None,
            commit: Cid::default(),
            prev_data: None,
            time: String::new(),
            too_big: false,
            ops,
            blocks: Vec::new(),
            over_limit: None,
            records_bytes: 0,
            data: None,
        }
    }

    #[test]
    fn ops_on_one_path_fold_into_the_net_change() {
        let (a, b, c) = (cid_for(b"a"), cid_for(b"b"), cid_for(b"c"));
        // Update then delete, both with the path's old value as prev: a delete of `a`.
        let ev = commit(vec![
            op(Action::Update, "k", Some(b), Some(a)),
            op(Action::Delete, "k", None, Some(a)),
            op(Action::Create, "n", Some(c), None),
        ]);
        let net = net_ops(&ev).expect("folds");
        assert_eq!(net.len(), 2);
        assert_eq!((net[0].prev, net[0].value), (Some(a), None));
        assert_eq!((net[1].prev, net[1].value), (None, Some(c)));
        // Two updates: `a` became `c`.
        let ev = commit(vec![
            op(Action::Update, "k", Some(b), Some(a)),
            op(Action::Update, "k", Some(c), Some(a)),
        ]);
        let net = net_ops(&ev).expect("folds");
        assert_eq!((net[0].prev, net[0].value), (Some(a), Some(c)));
    }

    #[test]
    fn malformed_ops_are_rejected() {
        let a = cid_for(b"a");
        for ops in [
            vec![op(Action::Create, "k", None, None)],
            vec![op(Action::Create, "k", Some(a), Some(a))],
            vec![op(Action::Update, "k", Some(a), None)],
            vec![op(Action::Delete, "k", None, None)],
            vec![op(Action::Delete, "k", Some(a), Some(a))],
            (0..=MAX_COMMIT_OPS)
                .map(|i| op(Action::Create, &format!("k{i}"), Some(a), None))
                .collect(),
        ] {
            let err = net_ops(&commit(ops)).expect_err("rejected");
            assert_eq!(err.reason(), "bad_op");
        }
        let mut too_big = commit(vec![]);
        too_big.too_big = true;
        assert_eq!(open_commit(&too_big).map(|_| ()), Err(VerifyError::TooBig));
    }
}
