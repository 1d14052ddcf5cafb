//! Backfill (§13) against the stand-in network alone: every record of every fetchable repo,
//! inactive accounts' status from listRepos, aggregates exact; a killed backfill resumes; a
//! repo that cannot be fetched is reported with its reason.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use atproto_ingest::resync::backfill::{backfill, BackfillConfig, Progress, Report};
use atproto_ingest::resync::ResyncConfig;
use atproto_ingest::txn::RetryPolicy;
use tokio_util::sync::CancellationToken;

use crate::common::standin::{self, Failure, StandIn};
use crate::common::{self, Truth};

pub fn config(net: &StandIn, page_limit: usize) -> BackfillConfig {
    let mut identity = net.identity_config();
    identity.resolve_identities = true;
    BackfillConfig {
        relay_url: net.url().to_owned(),
        page_limit,
        identity,
        resync: ResyncConfig {
            poll_interval: Duration::from_millis(20),
            fetch_timeout: Duration::from_secs(5),
            max_attempts: Some(1),
            ..ResyncConfig::default()
        },
        retry: RetryPolicy::default(),
    }
}

pub async fn run(pool: &sqlx::PgPool, cfg: BackfillConfig) -> Report {
    let db = common::db_config(pool);
    atproto_ingest::db::prepare(&db).await.unwrap();
    let dp = common::deadpool(pool, 8).await;
    backfill(dp, cfg, Arc::default(), CancellationToken::new())
        .await
        .unwrap()
}

/// The database holds exactly the fetchable repos' records of the truth, the inactive
/// accounts' status, and consistent aggregates.
pub async fn assert_backfilled(pool: &sqlx::PgPool, net: &StandIn, truth: &Truth) {
    let fetchable: BTreeSet<String> = net.network().fetchable_dids().into_iter().collect();
    let of_fetchable = |uri: &String| {
        uri.strip_prefix("at://")
            .and_then(|r| r.split('/').next())
            .is_some_and(|did| fetchable.contains(did))
    };
    let want: BTreeMap<&String, BTreeSet<&String>> = truth
        .live
        .iter()
        .map(|(c, uris)| (c, uris.iter().filter(|u| of_fetchable(u)).collect()))
        .filter(|(_, uris): &(_, BTreeSet<_>)| !uris.is_empty())
        .collect();
    let stored = common::stored(pool).await;
    let got: BTreeMap<&String, BTreeSet<&String>> = stored
        .iter()
        .map(|(c, u)| (c, u.iter().collect()))
        .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (coll, uris) in &want {
        let have = &got[coll];
        let missing: Vec<_> = uris.difference(have).take(3).collect();
        let extra: Vec<_> = have.difference(uris).take(3).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{coll}: missing {missing:?} extra {extra:?}"
        );
    }
    let actors: Vec<(String, Option<String>, String, String)> =
        sqlx::query_as("SELECT did, handle, status, sync_state FROM actors")
            .fetch_all(pool)
            .await
            .unwrap();
    let actors: BTreeMap<_, _> = actors
        .into_iter()
        .map(|(d, h, s, st)| (d, (h, s, st)))
        .collect();
    for (did, (handle, status)) in &truth.accounts {
        match (fetchable.contains(did), status.as_str()) {
            (true, _) => {
                let (h, s, st) = &actors[did];
                assert_eq!(
                    (h, s.as_str(), st.as_str()),
                    (handle, "active", "synchronized"),
                    "{did}"
                );
            }
            // listRepos says so; nothing is fetched.
            (false, "deactivated") => assert_eq!(actors[did].1, "deactivated", "{did}"),
            // Deleted accounts are not listed: nothing of them is stored.
            (false, _) => assert!(!actors.contains_key(did), "{did}"),
        }
    }
    common::assert_aggregates_consistent(pool).await;
}

#[sqlx::test(migrations = false)]
async fn backfill_alone_equals_the_truth(pool: sqlx::PgPool) {
    let net = StandIn::snap().await;
    let report = run(&pool, config(&net, 20)).await;
    assert_eq!((report.listed, report.done, report.inactive), (49, 48, 1));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(net.total_requests(standin::LIST_REPOS), 3);
    // The deactivated account was never fetched.
    assert_eq!(net.total_requests(standin::GET_REPO), 48);
    assert_backfilled(&pool, &net, &common::truth("snap")).await;
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM resync_queue")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 0);

    // A second backfill finds everything synchronized at the listed revs: no fetch at all.
    let before = common::snapshot_without_times(&pool).await;
    let again = run(&pool, config(&net, 20)).await;
    assert_eq!((again.done, again.inactive), (48, 1));
    assert_eq!(net.total_requests(standin::GET_REPO), 48);
    assert_eq!(common::snapshot_without_times(&pool).await, before);
}

#[sqlx::test(migrations = false)]
async fn killed_backfill_resumes_to_the_same_result(pool: sqlx::PgPool) {
    let net = StandIn::snap().await;
    let truth = common::truth("snap");
    let db = common::db_config(&pool);
    atproto_ingest::db::prepare(&db).await.unwrap();
    let dp = common::deadpool(&pool, 8).await;
    // One repo per page, so the kill lands in the middle of the listing too.
    let task = tokio::spawn(backfill(
        dp,
        config(&net, 1),
        Arc::new(Progress::default()),
        CancellationToken::new(),
    ));
    let synchronized = async || -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM actors WHERE sync_state = 'synchronized'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while synchronized().await < 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "backfill made no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    let pages_before = net.total_requests(standin::LIST_REPOS);
    let done_before = synchronized().await;
    assert!(
        done_before < 48,
        "killed too late to test anything ({done_before} done)"
    );

    let report = run(&pool, config(&net, 1)).await;
    assert_eq!((report.listed, report.done, report.inactive), (49, 48, 1));
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    // The listing resumed at its stored cursor: 49 pages in all, plus at most the page in
    // flight when killed.
    let pages = net.total_requests(standin::LIST_REPOS);
    assert!(
        (49..=50).contains(&pages),
        "{pages_before} then {pages} pages"
    );
    assert_backfilled(&pool, &net, &truth).await;
}

#[sqlx::test(migrations = false)]
async fn repos_that_cannot_be_fetched_are_reported_with_their_reason(pool: sqlx::PgPool) {
    let net = StandIn::snap().await;
    let dids = net.network().fetchable_dids();
    net.fail(&dids[0], Failure::Status(500));
    net.fail(&dids[1], Failure::NotFound);
    let report = run(&pool, config(&net, 100)).await;
    assert_eq!((report.listed, report.done, report.inactive), (49, 46, 1));
    let failed: BTreeMap<_, _> = report.failed.iter().cloned().collect();
    assert_eq!(failed.len(), 2);
    assert!(failed[&dids[0]].starts_with("xrpc_error"), "{failed:?}");
    assert!(failed[&dids[1]].starts_with("repo_not_found"), "{failed:?}");
    let summary = atproto_ingest::resync::command::summary(&report);
    assert!(
        summary.contains(&format!("failed {}: repo_not_found", dids[1])),
        "{summary}"
    );
    // Healed, a new backfill fetches only those two.
    net.heal(&dids[0]);
    net.heal(&dids[1]);
    let report = run(&pool, config(&net, 100)).await;
    assert_eq!((report.done, report.failed.len()), (48, 0));
    assert_eq!(net.total_requests(standin::GET_REPO), 50);
    assert_backfilled(&pool, &net, &common::truth("snap")).await;
}

#[sqlx::test(migrations = false)]
async fn run_backfills_while_live_ingestion_continues(pool: sqlx::PgPool) {
    use atproto_ingest::testrelay::{TestRelay, TestRelayConfig};
    let net = StandIn::snap().await;
    // Live events arrive over ~3 s while the leader backfills the same repos.
    let relay = TestRelay::from_file(
        &common::fixture("snap.frames"),
        TestRelayConfig {
            rate_limit: Some(1_000),
        },
    )
    .await
    .unwrap();
    let prefix = crate::live_common::prefix("backfill");
    let mut cfg = crate::live_common::app_config(&pool, &relay, &prefix);
    cfg.db.pool_size = 8;
    cfg.pipeline.users.identity = net.identity_config();
    cfg.pipeline.users.identity.resolve_identities = false;
    cfg.resync = Some(config(&net, 10).resync);
    cfg.backfill = true;
    cfg.backfill_url = Some(net.url().to_owned());
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(atproto_ingest::app::run(cfg, shutdown.clone()));
    let service = crate::live_common::service(&relay);
    crate::live_common::wait_cursor(&pool, &service, 3000, Duration::from_secs(60)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (finished, queued): (bool, i64) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM backfill_runs WHERE finished_at IS NOT NULL), \
             (SELECT count(*) FROM resync_queue)",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        if finished && queued == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backfill did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(net.total_requests(standin::LIST_REPOS), 1);
    assert!(net.total_requests(standin::GET_REPO) > 0);
    common::assert_matches_truth(&pool, &common::truth("snap")).await;
    crate::live_common::cleanup(&prefix).await;
}
