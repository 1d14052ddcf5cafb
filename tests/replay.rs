//! Replays the bundled fixtures into fresh databases and checks the result against the
//! ground truth, replays again (nothing changes), and replays the malformed corpus.

mod common;

use std::sync::Arc;

use atproto_ingest::pipeline::{PipelineConfig, Stats};
use atproto_ingest::replay::replay;
use atproto_ingest::writer::CursorKey;
use tokio_util::sync::CancellationToken;

fn cfg() -> PipelineConfig {
    PipelineConfig::new(CursorKey {
        service: String::new(),
        fence: 0,
    })
}

#[sqlx::test(migrations = false)]
async fn small_replay_equals_truth_and_replays_change_nothing(pool: sqlx::PgPool) {
    let db = common::db_config(&pool);
    let stats = Arc::new(Stats::default());
    replay(
        &db,
        vec![common::fixture("small.frames")],
        cfg(),
        CancellationToken::new(),
        stats.clone(),
    )
    .await
    .unwrap();
    eprintln!("{}", stats.summary());
    assert_eq!(stats.skipped_total(), 0);
    assert_eq!(stats.invalid_total(), 6, "the six validate:false records");
    let truth = common::truth("small");
    common::assert_matches_truth(&pool, &truth).await;
    let cursor: i64 =
        sqlx::query_scalar("SELECT seq FROM firehose_cursor WHERE service = 'replay'")
            .fetch_one(&pool)
            .await
            .unwrap();
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
