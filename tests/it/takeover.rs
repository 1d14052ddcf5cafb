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
