//! `run` in-process against the test relay serving `small.frames`, real PostgreSQL and Redis:
//! a clean live run, a relay that keeps dropping the connection, and a graceful stop followed by
//! a restart that resumes from the durable cursor.
use crate::{common, live_common};

use std::time::Duration;

use atproto_ingest::app;
use atproto_ingest::testrelay::{TestRelay, TestRelayConfig};
use live_common::{app_config, cursor, service, wait_cursor, LAST_SEQ};
use tokio_util::sync::CancellationToken;

async fn relay(rate_limit: Option<u32>) -> TestRelay {
    TestRelay::from_file(
        &common::fixture("small.frames"),
        TestRelayConfig { rate_limit },
    )
    .await
    .unwrap()
}

#[sqlx::test(migrations = false)]
async fn live_run_equals_truth(pool: sqlx::PgPool) {
    let relay = relay(None).await;
    let prefix = live_common::prefix("run");
    let cfg = app_config(&pool, &relay, &prefix);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(app::run(cfg, shutdown.clone()));
    wait_cursor(&pool, &service(&relay), LAST_SEQ, Duration::from_secs(60)).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    assert_eq!(
        relay.cursors_requested(),
        vec![None],
        "first start live-tails"
    );
    let (seq, fence) = cursor(&pool, &service(&relay)).await.unwrap();
    assert_eq!(seq, LAST_SEQ);
    assert!(fence > 0);
    live_common::cleanup(&prefix).await;
}

#[sqlx::test(migrations = false)]
async fn relay_drops_resume_from_the_durable_cursor(pool: sqlx::PgPool) {
    let relay = relay(None).await;
    let prefix = live_common::prefix("drops");
    let cfg = app_config(&pool, &relay, &prefix);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(app::run(cfg, shutdown.clone()));
    // Cut the connection at random points of the stream, several times.
    let mut cuts: Vec<u64> = (0..5).map(|_| rand::random_range(50..3_000)).collect();
    cuts.sort_unstable();
    let mut done = 0;
    for at in &cuts {
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        while relay.served_count() < *at && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if cursor(&pool, &service(&relay))
            .await
            .is_some_and(|(s, _)| s >= LAST_SEQ)
        {
            break;
        }
        relay.drop_connections();
        done += 1;
    }
    wait_cursor(&pool, &service(&relay), LAST_SEQ, Duration::from_secs(60)).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    let asked = relay.cursors_requested();
    eprintln!("cuts at {cuts:?} ({done} done); cursors asked: {asked:?}");
    assert!(asked.len() > done.min(1), "reconnected after every cut");
    // Resume cursors never go backwards (each is the durable cursor at that moment).
    let resumed: Vec<i64> = asked.iter().flatten().copied().collect();
    assert!(resumed.windows(2).all(|w| w[0] <= w[1]), "{asked:?}");
    live_common::cleanup(&prefix).await;
}

#[sqlx::test(migrations = false)]
async fn graceful_stop_then_restart_resumes_from_the_cursor(pool: sqlx::PgPool) {
    // Slow enough that the stop lands mid-stream.
    let relay = relay(Some(400)).await;
    let prefix = live_common::prefix("stop");
    let cfg = app_config(&pool, &relay, &prefix);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(app::run(cfg.clone(), shutdown.clone()));
    let at = rand::random_range(200..1_200);
    wait_cursor(&pool, &service(&relay), at, Duration::from_secs(60)).await;
    let stop = tokio::time::Instant::now();
    shutdown.cancel();
    run.await.unwrap().unwrap();
    let took = stop.elapsed();
    assert!(took < cfg.drain_limit, "stopped in {took:?}");
    let (stopped_at, _) = cursor(&pool, &service(&relay)).await.unwrap();
    assert!(
        (at..LAST_SEQ).contains(&stopped_at),
        "stopped mid-stream at {stopped_at}"
    );
    // The lease was released at once: a restart leads without waiting for the TTL.
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(app::run(cfg, shutdown.clone()));
    wait_cursor(&pool, &service(&relay), LAST_SEQ, Duration::from_secs(60)).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(
        relay.cursors_requested(),
        vec![None, Some(stopped_at)],
        "the restart resumed from the durable cursor"
    );
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    live_common::cleanup(&prefix).await;
}
