//! Two `run` instances on one Redis key prefix (in-process): only the leader writes; when it
//! crashes the standby takes over within the TTL and finishes; a leader fenced out by a newer
//! fence cannot commit and steps down. Final state always equals the truth.
use crate::{common, live_common};

use std::time::Duration;

use atproto_ingest::app;
use atproto_ingest::cursor::{self, Claim};
use atproto_ingest::testrelay::{TestRelay, TestRelayConfig};
use live_common::{app_config, cursor, service, wait_cursor, LAST_SEQ};
use redis::AsyncCommands;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Scheduling slack on a busy 2-core machine.
const SLACK: Duration = Duration::from_millis(700);

async fn slow_relay() -> TestRelay {
    // ~5 s of stream: the failover happens mid-stream.
    TestRelay::from_file(
        &common::fixture("small.frames"),
        TestRelayConfig {
            rate_limit: Some(400),
        },
    )
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn standby_takes_over_within_the_ttl_after_a_crash(pool: sqlx::PgPool) {
    let relay = slow_relay().await;
    let svc = service(&relay);
    let prefix = live_common::prefix("takeover");
    let cfg = app_config(&pool, &relay, &prefix);
    let ttl = cfg.leader.ttl;
    let a = tokio::spawn(app::run(cfg.clone(), CancellationToken::new()));
    wait_cursor(&pool, &svc, 300, Duration::from_secs(60)).await;
    let (_, fence_a) = cursor(&pool, &svc).await.unwrap();
    let shutdown_b = CancellationToken::new();
    let b = tokio::spawn(app::run(cfg.clone(), shutdown_b.clone()));
    // B stands by: A keeps writing with its fence.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (seq, fence) = cursor(&pool, &svc).await.unwrap();
    assert_eq!(fence, fence_a, "only the leader writes");
    assert!(seq < LAST_SEQ, "the crash must land mid-stream ({seq})");
    // Crash A: its tasks stop, its lease is not released.
    a.abort();
    let crashed = Instant::now();
    let took = loop {
        if cursor(&pool, &svc).await.is_some_and(|(_, f)| f > fence_a) {
            break crashed.elapsed();
        }
        assert!(crashed.elapsed() < ttl + SLACK * 3, "no takeover");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("takeover after {took:?} (ttl {ttl:?})");
    assert!(took <= ttl + SLACK, "takeover took {took:?}");
    wait_cursor(&pool, &svc, LAST_SEQ, Duration::from_secs(60)).await;
    shutdown_b.cancel();
    b.await.unwrap().unwrap();
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    live_common::cleanup(&prefix).await;
}

#[sqlx::test(migrations = false)]
async fn a_fenced_out_leader_cannot_commit_and_steps_down(pool: sqlx::PgPool) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("atproto_ingest=info")
        .with_test_writer()
        .try_init();
    let relay = slow_relay().await;
    let svc = service(&relay);
    let prefix = live_common::prefix("fenced");
    let cfg = app_config(&pool, &relay, &prefix);
    let shutdown = CancellationToken::new();
    let a = tokio::spawn(app::run(cfg.clone(), shutdown.clone()));
    wait_cursor(&pool, &svc, 300, Duration::from_secs(60)).await;
    let (_, fence_a) = cursor(&pool, &svc).await.unwrap();

    // A newer leader starts (as if A's lease had expired while it was paused): it takes the next
    // fence and claims it in the database. A still believes it leads.
    let mut redis = redis::Client::open(live_common::REDIS_URL)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let newer: i64 = redis.incr(format!("{prefix}fence"), 1).await.unwrap();
    assert_eq!(newer, fence_a + 1);
    let dp = atproto_ingest::db::connect(&cfg.db).await.unwrap();
    let claimed = cursor::claim_fence(&dp, &svc, newer).await.unwrap();
    let Claim::Claimed(Some(at_claim)) = claimed else {
        panic!("claim: {claimed:?}")
    };
    // An older fence can no longer claim. (A, fenced out by now, may already have stepped down
    // and re-acquired the lease with a fence above `newer`.)
    let behind = cursor::claim_fence(&dp, &svc, fence_a).await.unwrap();
    assert!(
        matches!(behind, Claim::Behind { db_fence } if db_fence >= newer),
        "{behind:?}"
    );
    // While the newer fence is the last writer, A's batches are refused: the cursor stays put.
    let until = Instant::now() + Duration::from_secs(30);
    let resumed_with = loop {
        let (seq, fence) = cursor(&pool, &svc).await.unwrap();
        if fence == newer {
            assert_eq!(seq, at_claim, "a fenced-out leader committed");
        } else {
            break fence;
        }
        assert!(
            Instant::now() < until,
            "A never stepped down and re-acquired"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // A stepped down (Fenced), released the lease and won it again with a newer fence.
    assert!(resumed_with > newer, "{resumed_with} > {newer}");
    wait_cursor(&pool, &svc, LAST_SEQ, Duration::from_secs(60)).await;
    shutdown.cancel();
    a.await.unwrap().unwrap();
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    live_common::cleanup(&prefix).await;
}

/// The first `n` events of `small.frames`, with their seqs dropped (as `#info` and error
/// frames arrive): a batch of them carries no cursor.
fn events_without_seq(n: usize) -> Vec<atproto_ingest::firehose::Event> {
    use atproto_ingest::firehose::fixture::{self, FrameReader, RawFrame};
    use atproto_ingest::firehose::frame::{self, DEFAULT_MAX_FRAME_BYTES};
    let reader = fixture::open(&common::fixture("small.frames")).unwrap();
    FrameReader::new(reader, DEFAULT_MAX_FRAME_BYTES)
        .filter_map(|f| match f.unwrap() {
            RawFrame::Message(m) => frame::decode(&m).ok(),
            RawFrame::Oversized { .. } => None,
        })
        .map(|d| atproto_ingest::firehose::Event { seq: 0, ..d.event })
        .take(n)
        .collect()
}

#[sqlx::test(migrations = "./migrations")]
async fn a_batch_without_a_cursor_of_an_old_fence_commits_nothing(pg: sqlx::PgPool) {
    use atproto_ingest::cursor::CursorKey;
    use atproto_ingest::txn::{self, RetryPolicy, TxError};
    use atproto_ingest::writer::{self, WriteError};

    let pool = common::deadpool(&pg, 2).await;
    let svc = "fence.test";
    let events = events_without_seq(200);
    assert_eq!(events.len(), 200);
    let apply = async |fence: i64| {
        let key = CursorKey {
            service: svc.into(),
            fence,
        };
        txn::run_tx(
            &pool,
            &RetryPolicy::default(),
            &CancellationToken::new(),
            async |tx| writer::apply(tx, &events, None, &key).await,
        )
        .await
    };
    let rows = async || -> i64 {
        sqlx::query_scalar("SELECT (SELECT count(*) FROM actors) + (SELECT count(*) FROM posts)")
            .fetch_one(&pg)
            .await
            .unwrap()
    };
    assert_eq!(
        cursor::claim_fence(&pool, svc, 1).await.unwrap(),
        Claim::Claimed(None)
    );
    // A newer leader claims the service: the old one's cursor-less batch is refused.
    assert_eq!(
        cursor::claim_fence(&pool, svc, 2).await.unwrap(),
        Claim::Claimed(None)
    );
    let refused = apply(1).await;
    assert!(
        matches!(
            refused,
            Err(TxError::Permanent {
                source: WriteError::Fenced { fence: 1, .. },
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(rows().await, 0, "a fenced-out leader committed rows");

    // The current fence's cursor-less batch commits, and the stored cursor does not move.
    let applied = apply(2).await.unwrap();
    assert_eq!(applied.cursor, None);
    assert!(rows().await > 0);
    let stored: (i64, i64) =
        sqlx::query_as("SELECT seq, fence FROM firehose_cursor WHERE service = $1")
            .bind(svc)
            .fetch_one(&pg)
            .await
            .unwrap();
    assert_eq!(stored, (cursor::NO_CURSOR, 2));
}
