//! Repo sync verification (atproto Sync 1.1), pure and synchronous: signing keys from DID
//! documents and `did:key`s, commit signatures (low-S ECDSA on K-256 and P-256), MST nodes
//! and partial-tree inversion, `#commit`/`#sync` event verification and full repo CAR
//! (`getRepo`) walks. No I/O: callers (pipeline, resync, backfill) fetch keys and CARs.
//!
//! - [`didkey`]: key parsing; [`signature`]: signature checks and unsigned commit bytes.
//! - [`mst`]: node codec and key heights; [`tree`]: the partial tree ops are inverted on.
//! - [`commit`]: `#commit` / `#sync` verification, chain continuity.
//! - [`repo`]: repo CARs. [`blocks`]: CAR blocks by CID. [`error`]: reasons.

pub mod blocks;
pub mod commit;
pub mod didkey;
pub mod error;
pub mod mst;
pub mod repo;
mod signature;
pub mod tree;

pub use commit::{
    chains, open_commit, prove_ops, verify_commit, verify_sync, SignedCommit, Verified,
};
pub use didkey::{Curve, PublicKey};
pub use error::{KeyError, VerifyError};
pub use repo::{verify_repo_car, walk_tree, RepoRecord, VerifiedRepo, DEFAULT_MAX_REPO_CAR_BYTES};
