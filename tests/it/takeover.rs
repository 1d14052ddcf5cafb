//! A leader killed within seconds of a first start loses nothing: its starting point is made
//! durable before any event reaches the pipeline, so the standby resumes there (not at its own
//! live tail) even though no batch of the first leader ever committed.
use crate::{common, live_common};

use std::time::Duration;

use atproto_ingest::app;
use atproto_ingest::pipeline::UsersConfig;
use atproto_ingest::testrelay::{TestRelay, TestRelayConfig};
use common::fake_identity::Server;
use live_common::{app_config, cursor, service, wait_cursor, LAST_SEQ};
use tokio_util::sync::CancellationToken;

#[sqlx::test(migrations = false)]
async fn a_leader_killed_right_after_a_first_start_loses_no_event(pool: sqlx::PgPool) {
    let relay = TestRelay::from_file(&common::fixture("small.frames"), TestRelayConfig::default())
        .await
        .unwrap();
    let svc = service(&relay);
    let prefix = live_common::prefix("takeover");

    // Leader A resolves identities against a PLC that answers after 30 s: every event waits in
    // the pending-op maps, so no batch can carry a cursor while A lives.
    let slow = Server::start().await;
    slow.fake().default_delay = Duration::from_secs(30);
    let mut a_cfg = app_config(&pool, &relay, &prefix);
    a_cfg.pipeline.users = UsersConfig::resolving(slow.config());
    let a = tokio::spawn(app::run(a_cfg, CancellationToken::new()));

    // A reads from the live tail, anchors its start, then holds events while users resolve.
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if cursor(&pool, &svc).await.is_some_and(|(seq, _)| seq >= 0) && slow.total_requests() > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < until, "A never anchored");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (anchored, _) = cursor(&pool, &svc).await.unwrap();
    assert_eq!(anchored, 0, "the first event of small.frames is seq 1");
    // Killed mid-resolution: nothing of A's term is durable but its starting point.
    a.abort();
    let _ = a.await;

    // Standby B (resolution off) takes over once the lease expires.
    let b_cfg = app_config(&pool, &relay, &prefix);
    let shutdown = CancellationToken::new();
    let b = tokio::spawn(app::run(b_cfg, shutdown.clone()));
    wait_cursor(&pool, &svc, LAST_SEQ, Duration::from_secs(60)).await;
    shutdown.cancel();
    b.await.unwrap().unwrap();

    let requested = relay.cursors_requested();
    assert_eq!(
        requested.first(),
        Some(&None),
        "A live-tailed: {requested:?}"
    );
    assert_eq!(
        requested.get(1),
        Some(&Some(0)),
        "B resumed at A's starting point, not at its own live tail: {requested:?}"
    );
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    common::assert_aggregates_consistent(&pool).await;
    live_common::cleanup(&prefix).await;
}

/// Records stored, all collections.
async fn records(pool: &sqlx::PgPool) -> usize {
    common::stored(pool).await.values().map(|s| s.len()).sum()
}

/// Runs a daemon with `start_cursor` until it has connected to the relay and the cursor
/// reached the fixture's last seq.
async fn run_to_the_end(
    pool: &sqlx::PgPool,
    relay: &TestRelay,
    prefix: &str,
    start_cursor: Option<i64>,
) {
    let mut cfg = app_config(pool, relay, prefix);
    cfg.start_cursor = start_cursor;
    let connections = relay.cursors_requested().len();
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(app::run(cfg, shutdown.clone()));
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    while relay.cursors_requested().len() == connections {
        assert!(tokio::time::Instant::now() < until, "never connected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_cursor(pool, &service(relay), LAST_SEQ, Duration::from_secs(60)).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
}

#[sqlx::test(migrations = false)]
async fn start_cursor_sets_the_first_start_and_is_ignored_once_a_cursor_is_stored(
    pool: sqlx::PgPool,
) {
    let relay = TestRelay::from_file(&common::fixture("small.frames"), TestRelayConfig::default())
        .await
        .unwrap();
    let prefix = live_common::prefix("start-cursor");

    // No stored cursor: `--start-cursor 0` reads from the oldest event the relay has.
    run_to_the_end(&pool, &relay, &prefix, Some(0)).await;
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    // A cursor is stored now: the flag is ignored, the next term resumes from the cursor.
    run_to_the_end(&pool, &relay, &prefix, Some(1500)).await;
    assert_eq!(
        relay.cursors_requested(),
        vec![Some(0), Some(LAST_SEQ)],
        "from the oldest event, then from the stored cursor"
    );
    live_common::cleanup(&prefix).await;
}

#[sqlx::test(migrations = false)]
async fn start_cursor_skips_what_lies_before_it(pool: sqlx::PgPool) {
    let relay = TestRelay::from_file(&common::fixture("small.frames"), TestRelayConfig::default())
        .await
        .unwrap();
    let prefix = live_common::prefix("start-cursor-late");
    run_to_the_end(&pool, &relay, &prefix, Some(1500)).await;
    assert_eq!(relay.cursors_requested().first(), Some(&Some(1500)));
    let all: usize = common::truth("small").live.values().map(|s| s.len()).sum();
    let stored = records(&pool).await;
    assert!(
        stored > 0 && stored < all,
        "only events after seq 1500 were applied: {stored} of {all} records"
    );
    live_common::cleanup(&prefix).await;
}
