//! Grouped resyncs (§12, §13): a backfill whose workers write groups of repos in one
//! transaction, new repos by `COPY`, stores exactly what one diffing transaction per repo
//! stores; a repo of a group that cannot be verified fails alone.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use atproto_ingest::resync::backfill::{backfill_timed, BackfillConfig, Report};
use tokio_util::sync::CancellationToken;

use crate::backfill::{assert_backfilled, config};
use crate::common::standin::{self, Failure, StandIn};
use crate::common::{self, ScratchDb};

/// The backfill of `cfg` into `pool` (migrated here), with the workers' time per phase.
async fn run_timed(
    pool: &sqlx::PgPool,
    db: &atproto_ingest::db::DbConfig,
    cfg: BackfillConfig,
) -> (Report, BTreeMap<&'static str, u64>) {
    atproto_ingest::db::prepare(db).await.unwrap();
    let dp = common::deadpool(pool, 8).await;
    backfill_timed(dp, cfg, Arc::default(), CancellationToken::new())
        .await
        .unwrap()
}

/// Every actor row as JSON, without the times of its last resolution and sync change.
async fn actors(pool: &sqlx::PgPool) -> BTreeSet<String> {
    sqlx::query_scalar(
        "SELECT (to_jsonb(a) - 'resolved_at' - 'sync_changed_at' - 'indexed_at')::text FROM actors a",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

fn grouped(net: &StandIn, group_repos: usize) -> BackfillConfig {
    let mut cfg = config(net, 100);
    cfg.resync.group_repos = group_repos;
    cfg
}

#[sqlx::test(migrations = false)]
async fn grouped_copy_backfill_stores_what_one_repo_per_transaction_stores(pool: sqlx::PgPool) {
    let net = StandIn::snap().await;
    let (report, times) = run_timed(&pool, &common::db_config(&pool), grouped(&net, 16)).await;
    assert_eq!((report.done, report.failed.len()), (48, 0), "{report:?}");
    // The groups were written by the grouped path, new repos by COPY (no diffing insert).
    assert!(times.contains_key("group_lock"), "{times:?}");

    let other = ScratchDb::new(&pool, "perrepo").await;
    let (single, times) = run_timed(&other.pool, &other.cfg, grouped(&net, 1)).await;
    assert_eq!((single.done, single.failed.len()), (48, 0), "{single:?}");
    assert!(!times.contains_key("group_lock"), "{times:?}");

    let want = common::snapshot_without_times(&other.pool).await;
    let got = common::snapshot_without_times(&pool).await;
    let (want_actors, got_actors) = (actors(&other.pool).await, actors(&pool).await);
    other.drop_db().await;
    // `actors` also holds when each identity was resolved: compared without it.
    let differ: Vec<&String> = want
        .keys()
        .filter(|t| *t != "actors" && want.get(*t) != got.get(*t))
        .collect();
    assert!(differ.is_empty(), "tables differ: {differ:?}");
    let extra: Vec<_> = got_actors.difference(&want_actors).take(2).collect();
    let missing: Vec<_> = want_actors.difference(&got_actors).take(2).collect();
    assert!(
        extra.is_empty() && missing.is_empty(),
        "actors: {extra:?} instead of {missing:?}"
    );
    assert_eq!(got_actors.len(), 49);
    assert_backfilled(&pool, &net, &common::truth("snap")).await;

    // Grouped again over what is now stored: every repo takes the diffing path, nothing moves.
    sqlx::query("UPDATE actors SET rev = NULL WHERE rev IS NOT NULL AND did IN (SELECT did FROM actors ORDER BY did LIMIT 10)")
        .execute(&pool)
        .await
        .unwrap();
    let again = run_timed(&pool, &common::db_config(&pool), grouped(&net, 16))
        .await
        .0;
    assert_eq!((again.done, again.failed.len()), (48, 0), "{again:?}");
    assert_backfilled(&pool, &net, &common::truth("snap")).await;
}

#[sqlx::test(migrations = false)]
async fn a_repo_that_fails_verification_leaves_the_rest_of_its_group_written(pool: sqlx::PgPool) {
    let net = StandIn::snap().await;
    let dids = net.network().fetchable_dids();
    // Two in the middle of what one group claims (48 repos over 4 workers: groups of 12).
    net.fail(&dids[3], Failure::Corrupt);
    net.fail(&dids[20], Failure::Corrupt);
    let (report, _) = run_timed(&pool, &common::db_config(&pool), grouped(&net, 16)).await;
    assert_eq!((report.listed, report.done, report.inactive), (49, 46, 1));
    let failed: BTreeMap<_, _> = report.failed.iter().cloned().collect();
    assert_eq!(failed.len(), 2, "{failed:?}");
    let stored = common::stored(&pool).await;
    for did in [&dids[3], &dids[20]] {
        assert!(failed[did].starts_with("bad_car"), "{failed:?}");
        let prefix = format!("at://{did}/");
        let rows = stored
            .values()
            .flatten()
            .filter(|u| u.starts_with(&prefix))
            .count();
        assert_eq!(rows, 0, "{did}");
    }
    // Every record of every other repo is stored (the groups of the two were written).
    let bad = [format!("at://{}/", dids[3]), format!("at://{}/", dids[20])];
    let fetchable: Vec<String> = dids.iter().map(|d| format!("at://{d}/")).collect();
    let truth = common::truth("snap");
    let missing: Vec<&String> = truth
        .live
        .iter()
        .flat_map(|(coll, uris)| uris.iter().map(move |u| (coll, u)))
        .filter(|(_, u)| fetchable.iter().any(|p| u.starts_with(p)))
        .filter(|(_, u)| !bad.iter().any(|p| u.starts_with(p)))
        .filter(|(coll, u)| !stored.get(*coll).is_some_and(|s| s.contains(*u)))
        .map(|(_, u)| u)
        .take(3)
        .collect();
    assert!(missing.is_empty(), "missing {missing:?}");
    common::assert_aggregates_consistent(&pool).await;
    // Healed, the next backfill fetches only those two, and all is the truth.
    net.heal(&dids[3]);
    net.heal(&dids[20]);
    let (report, _) = run_timed(&pool, &common::db_config(&pool), grouped(&net, 16)).await;
    assert_eq!((report.done, report.failed.len()), (48, 0));
    assert_eq!(net.total_requests(standin::GET_REPO), 50);
    assert_backfilled(&pool, &net, &common::truth("snap")).await;
}

#[sqlx::test(migrations = false)]
async fn a_group_whose_transaction_fails_is_written_repo_by_repo(pool: sqlx::PgPool) {
    let net = StandIn::snap().await;
    let db = common::db_config(&pool);
    atproto_ingest::db::prepare(&db).await.unwrap();
    // A feed item already stored for a post of a repo never stored: the group's COPY of its
    // feed items hits the duplicate key and the whole group transaction fails.
    let fetchable: Vec<String> = net.network().fetchable_dids();
    let truth = common::truth("snap");
    let post = truth.live["app.bsky.feed.post"]
        .iter()
        .find(|u| {
            fetchable
                .iter()
                .any(|d| u.starts_with(&format!("at://{d}/")))
        })
        .unwrap()
        .clone();
    let did = post
        .trim_start_matches("at://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    sqlx::query(
        "INSERT INTO feed_items (uri, post_uri, originator_did, type, sort_at) \
         VALUES ($1, $1, $2, 'post', now())",
    )
    .bind(&post)
    .bind(&did)
    .execute(&pool)
    .await
    .unwrap();
    let (report, times) = run_timed(&pool, &db, grouped(&net, 16)).await;
    assert_eq!((report.done, report.failed.len()), (48, 0), "{report:?}");
    assert!(times.contains_key("group_fallback"), "{times:?}");
    assert_backfilled(&pool, &net, &truth).await;
}
