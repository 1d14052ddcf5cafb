//! Derived rows that should not exist (§6): the writer inserts notifications and feed items
//! without a conflict check, because a record's derived rows are created by the transaction
//! that inserted the record and deleted with it. Were that ever untrue (a row left by an older
//! version, a hand edit), the batch fails with a unique violation: nothing stops, the event is
//! set aside and its repo queued for a resync, and `dead-letters retry` repairs it.
use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use atproto_ingest::cursor::CursorKey;
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use atproto_ingest::replay::replay;
use atproto_ingest::txn::RetryPolicy;
use atproto_ingest::writer::dead_letters;

#[sqlx::test(migrations = false)]
async fn a_stray_feed_item_sets_its_event_aside_and_the_retry_repairs_it(pool: sqlx::PgPool) {
    let truth = common::truth("small");
    let db = common::db_config(&pool);
    atproto_ingest::db::prepare(&db).await.unwrap();
    // A live post of an active account; its feed item is planted before the replay creates
    // the post, as the writer itself would write it.
    let post = truth.live["app.bsky.feed.post"]
        .iter()
        .find(|u| {
            let did = u.trim_start_matches("at://").split('/').next().unwrap();
            truth.accounts.get(did).is_some_and(|(_, s)| s == "active")
        })
        .unwrap()
        .clone();
    let did = post.trim_start_matches("at://").split('/').next().unwrap();
    sqlx::query(
        "INSERT INTO feed_items (uri, post_uri, originator_did, type, sort_at) \
         VALUES ($1, $1, $2, 'post', now())",
    )
    .bind(&post)
    .bind(did)
    .execute(&pool)
    .await
    .unwrap();

    let stats = Arc::new(Stats::default());
    let cfg = PipelineConfig::new(CursorKey {
        service: String::new(),
        fence: 0,
    });
    replay(
        &db,
        vec![common::fixture("small.frames")],
        cfg,
        CancellationToken::new(),
        stats.clone(),
    )
    .await
    .expect("a stray derived row does not stop the replay");
    assert_eq!(stats.dead_letters.load(Ordering::Relaxed), 1);
    assert_eq!(common::replay_cursor(&pool).await, 2000);
    let pg = common::deadpool(&pool, 2).await;
    let rows = dead_letters::list(&pg, None, 10).await.unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].sqlstate, "23505");
    assert_eq!(rows[0].did.as_deref(), Some(did));
    let queued: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM resync_queue WHERE did = $1)")
            .bind(did)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(
        queued,
        "the repo of the set-aside event is queued for a resync"
    );

    // The retry keeps the stray row (it is the feed item the post needs) and applies the rest.
    let report = dead_letters::retry(
        &pg,
        &RetryPolicy::default(),
        &CancellationToken::new(),
        None,
    )
    .await
    .unwrap();
    assert_eq!((report.applied, report.failed), (1, 0));
    common::assert_matches_truth(&pool, &truth).await;
}
