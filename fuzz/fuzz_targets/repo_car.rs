//! Fuzz target: any bytes given to the repo CAR checks must yield a verdict, never a panic
//! or a hang: the full check (which stops at the signature for fuzzed input), the MST walk
//! from the CAR's root (what runs after a valid signature), and partial-tree edits (what a
//! commit's inversion does).
//!
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run repo_car -O` from the crate root; seed the corpus with
//! the CARs of `fixtures/firehose/snap.network/repos/`.
#![no_main]

use atproto_ingest::sync::blocks::Blocks;
use atproto_ingest::sync::repo::walk_tree;
use atproto_ingest::sync::tree::PartialTree;
use atproto_ingest::sync::{verify_repo_car, PublicKey, SignedCommit};
use libfuzzer_sys::fuzz_target;

/// A valid key, so the check gets past key parsing (the signature will not verify).
const KEY: &str = "did:key:zQ3shryyC9656fBANu4g19iXepuANMzHZm1rkT7Qoo5kqNgUL";
const MAX_BYTES: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Ok(key) = PublicKey::parse(KEY) {
        let _ = verify_repo_car(data, "did:plc:73w5gmpgkg2tmhnafikja5jk", &key, MAX_BYTES);
    }
    let Ok(blocks) = Blocks::parse(data) else {
        return;
    };
    let Some(root) = blocks.root() else {
        return;
    };
    // A real repo CAR's root is the commit: walk its tree; otherwise walk the root as a tree.
    let tree_root = blocks
        .get(&root)
        .ok()
        .and_then(|b| SignedCommit::decode(b).ok())
        .map_or(root, |c| c.data);
    let _ = walk_tree(&blocks, &tree_root);
    if let Ok(mut tree) = PartialTree::load(&blocks, &tree_root) {
        let _ = tree.insert(b"app.bsky.feed.like/3kfuzz", root);
        let _ = tree.remove(b"app.bsky.feed.post/3kfuzz");
        let _ = tree.root_cid();
    }
});
