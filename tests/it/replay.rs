//! Replays the bundled fixtures into fresh databases and checks the result against the
//! ground truth, replays again (nothing changes), and replays the malformed corpus.
use crate::common;

use std::sync::Arc;

use atproto_ingest::cursor::CursorKey;
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use atproto_ingest::replay::replay;
use tokio_util::sync::CancellationToken;

fn cfg() -> PipelineConfig {
    PipelineConfig::new(CursorKey {
        service: String::new(),
        fence: 0,
    })
}

/// Replays one bundled fixture to the end and returns its counters (summary printed).
async fn replay_fixture(
    db: &atproto_ingest::db::DbConfig,
    name: &str,
    cfg: PipelineConfig,
) -> Arc<Stats> {
    common::replay_files(db, vec![common::fixture(name)], cfg).await
}

#[sqlx::test(migrations = false)]
async fn small_replay_equals_truth_and_replays_change_nothing(pool: sqlx::PgPool) {
    let db = common::db_config(&pool);
    let stats = replay_fixture(&db, "small.frames", cfg()).await;
    assert_eq!(stats.skipped_total(), 0);
    assert_eq!(stats.invalid_total(), 6, "the six validate:false records");
    let truth = common::truth("small");
    common::assert_matches_truth(&pool, &truth).await;
    let cursor = common::replay_cursor(&pool).await;
    assert_eq!(cursor, 2000);

    let before = common::snapshot(&pool).await;
    let again = Arc::new(Stats::default());
    replay(
        &db,
        vec![common::fixture("small.frames")],
        cfg(),
        CancellationToken::new(),
        again.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        common::snapshot(&pool).await,
        before,
        "a second replay changed rows"
    );
    assert_eq!(
        again
            .commits_applied
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[sqlx::test(migrations = false)]
async fn tiny_batches_give_the_same_result(pool: sqlx::PgPool) {
    let db = common::db_config(&pool);
    let mut c = cfg();
    c.batch_max_ops = 7;
    // One lane: the batch and its cursor in one transaction (lanes: the test below).
    c.writer_lanes = 1;
    replay(
        &db,
        vec![common::fixture("small.frames")],
        c,
        CancellationToken::new(),
        Arc::new(Stats::default()),
    )
    .await
    .unwrap();
    common::assert_matches_truth(&pool, &common::truth("small")).await;
}

/// Four writer lanes and batches of 5 ops: the lanes of each batch interleave their
/// transactions (shared aggregate rows, notifications across lanes, accounts deleted in one
/// lane while another writes to them), and the end state is still the truth, the cursor the
/// last seq, and a second replay changes nothing.
#[sqlx::test(migrations = false)]
async fn interleaved_writer_lanes_end_at_the_truth(pool: sqlx::PgPool) {
    let db = common::db_config(&pool);
    let lanes_cfg = || {
        let mut c = cfg();
        c.batch_max_ops = 5;
        c.writer_lanes = 4;
        c
    };
    let stats = replay_fixture(&db, "small.frames", lanes_cfg()).await;
    assert!(stats.batches.load(std::sync::atomic::Ordering::Relaxed) > 100);
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    let cursor = common::replay_cursor(&pool).await;
    assert_eq!(cursor, 2000);
    let before = common::snapshot(&pool).await;
    let again = replay_fixture(&db, "small.frames", lanes_cfg()).await;
    assert_eq!(common::snapshot(&pool).await, before);
    assert_eq!(
        again
            .commits_applied
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// malformed.frames = small.frames seq 1..150 with 17 bad frames inserted: the bad ones are
/// skipped and counted by reason, and the end state equals replaying seq 1..150 alone.
#[sqlx::test(migrations = false)]
async fn malformed_replay_equals_clean_prefix(pool: sqlx::PgPool) {
    let db = common::db_config(&pool);
    let stats = replay_fixture(&db, "malformed.frames", cfg()).await;
    for (reason, n) in [
        ("bad_header", 2),
        ("bad_body", 1),
        ("trailing_data", 1),
        ("unknown_type", 1),
        ("bad_car", 1),
        ("oversized", 1),
        ("non_canonical", 1),
        ("empty", 1),
        ("body_missing", 1),
        ("unknown_op", 1),
    ] {
        assert_eq!(stats.skipped(reason), n, "{reason}");
    }
    assert_eq!(stats.skipped_total(), 11);
    assert_eq!(stats.unavailable("block_missing"), 1);
    assert_eq!(stats.unavailable("block_cid_mismatch"), 1);
    assert_eq!(
        stats
            .non_canonical
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    let clean = common::first_frames("small.frames", 150);
    let other = common::ScratchDb::new(&pool, "clean").await;
    replay(
        &other.cfg,
        vec![clean.path().to_owned()],
        cfg(),
        CancellationToken::new(),
        Arc::new(Stats::default()),
    )
    .await
    .unwrap();
    let want = common::snapshot_without_times(&other.pool).await;
    let got = common::snapshot_without_times(&pool).await;
    other.drop_db().await;
    // The repos whose damaged commits we saw are desynchronized and queued for a resync: the
    // only allowed difference.
    sqlx::raw_sql(
        "UPDATE actors SET needs_resync = false, sync_state = 'synchronized', sync_reason = NULL; \
         DELETE FROM resync_queue",
    )
    .execute(&pool)
    .await
    .unwrap();
    let got_fixed = common::snapshot_without_times(&pool).await;
    assert_ne!(
        got, want,
        "damaged commits should have flagged their repos for resync"
    );
    assert_eq!(got_fixed, want);
}

/// Replays stopped at random points (cancellation: the pipeline drains and commits what it
/// read) and resumed end equal to the truth.
#[sqlx::test(migrations = false)]
async fn interrupted_replays_resume_to_the_truth(pool: sqlx::PgPool) {
    use rand::Rng;
    use std::sync::atomic::Ordering;
    let db = common::db_config(&pool);
    let mut rng = rand::rng();
    for _ in 0..3 {
        let stop_after = rng.random_range(1..1900u64);
        let stats = Arc::new(Stats::default());
        let cancel = CancellationToken::new();
        let mut c = cfg();
        c.batch_max_ops = rng.random_range(5..400);
        let run = tokio::spawn({
            let (db, stats, cancel) = (db.clone(), stats.clone(), cancel.clone());
            async move { replay(&db, vec![common::fixture("small.frames")], c, cancel, stats).await }
        });
        while stats.frames.load(Ordering::Relaxed) < stop_after && !run.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        cancel.cancel();
        run.await.unwrap().unwrap();
    }
    replay(
        &db,
        vec![common::fixture("small.frames")],
        cfg(),
        CancellationToken::new(),
        Arc::new(Stats::default()),
    )
    .await
    .unwrap();
    common::assert_matches_truth(&pool, &common::truth("small")).await;
}
