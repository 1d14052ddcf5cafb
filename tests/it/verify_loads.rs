//! The verify stage's loads (heads and keys) run ahead of its ordered path (§12): with chunks
//! of a few frames, loads of several chunks are in flight while earlier ones verify and
//! finish; the result is still every commit verified and the truth. An `#identity` makes the
//! next chunk that needs the repo's key fetch its DID document again.
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use atproto_ingest::budget::MemoryBudget;
use atproto_ingest::firehose::event::EventKind;
use atproto_ingest::firehose::frame;

use crate::common::{self, standin};
use crate::verify::{broken, replay_frames, snap_frames, verifying};

/// Chunks of ~30 frames (the raw queue's quarter of 2 MB / 8).
const SMALL_BUDGET_MB: u64 = 2;

/// Repos with a commit at least `gap` frames before an `#identity` (so their key is loaded
/// before it) and another at least `gap` frames after it.
fn rotated_between_commits(frames: &[Vec<u8>], gap: usize) -> BTreeSet<String> {
    let kinds: Vec<Option<EventKind>> = frames
        .iter()
        .map(|m| frame::decode(m).ok().map(|d| d.event.kind))
        .collect();
    let commits_of = |did: &str, range: &[Option<EventKind>]| {
        range
            .iter()
            .any(|k| matches!(k, Some(EventKind::Commit(c)) if c.repo == did))
    };
    let mut out = BTreeSet::new();
    for (i, kind) in kinds.iter().enumerate() {
        let Some(EventKind::Identity(id)) = kind else {
            continue;
        };
        let before = &kinds[..i.saturating_sub(gap)];
        let after = kinds.get(i + gap..).unwrap_or_default();
        if commits_of(&id.did, before) && commits_of(&id.did, after) {
            out.insert(id.did.clone());
        }
    }
    out
}

async fn assert_all_verified_and_truth(
    pool: &sqlx::PgPool,
    stats: &atproto_ingest::pipeline::Stats,
) {
    let v = &stats.verify;
    assert!(v.verified.load(Ordering::Relaxed) > 1000);
    assert_eq!(v.rejected_by_reason(), BTreeMap::new());
    assert_eq!(v.desynchronized.load(Ordering::Relaxed), 0);
    common::assert_matches_truth(pool, &common::truth("snap")).await;
    let (states, queued) = broken(pool).await;
    assert!(
        states.is_empty() && queued.is_empty(),
        "{states:?} {queued:?}"
    );
}

#[sqlx::test(migrations = false)]
async fn loads_ahead_of_small_chunks_equal_the_truth_and_refetch_rotated_keys(pool: sqlx::PgPool) {
    let net = standin::StandIn::snap().await;
    let mut cfg = verifying(&net);
    cfg.budget = MemoryBudget::from_mb(SMALL_BUDGET_MB);
    let frames = snap_frames();
    let stats = replay_frames(&pool, &frames, cfg).await;
    assert_all_verified_and_truth(&pool, &stats).await;
    // 100 frames apart is several chunks apart: the key was loaded before the #identity,
    // and the chunk of the commit after it fetches the DID document again.
    let rotated = rotated_between_commits(&frames, 100);
    assert!(rotated.len() >= 3, "{rotated:?}");
    for did in &rotated {
        let fetched = net.requests(standin::PLC, did);
        assert!(fetched >= 2, "{did}: DID document fetched {fetched} times");
    }
}
