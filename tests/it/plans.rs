//! The writer's statements keep their index plans where PostgreSQL has no statistics (a
//! database just loaded or backfilled before autoanalyze ran, or autovacuum off): without
//! them the planner scanned all of `notifications` for every batch's delete once the table
//! was large (the growth benchmark fell 3x from ~4 M rows).
use atproto_ingest::cursor::{self, CursorKey};
use atproto_ingest::txn::{run_tx, RetryPolicy};
use atproto_ingest::writer::{self, WriteError};
use tokio_util::sync::CancellationToken;

#[sqlx::test(migrations = "./migrations")]
async fn the_writers_deletes_use_their_index_on_a_table_never_analyzed(pg: sqlx::PgPool) {
    // 20,000 notifications of 2,000 likes, never analyzed.
    sqlx::query(
        "INSERT INTO notifications (record_uri, reason, recipient_did, author_did, record_cid, created_at) \
         SELECT 'at://did:plc:a' || (i % 2000) || '/app.bsky.feed.like/' || i, 'like', \
                'did:plc:r' || (i % 97), 'did:plc:a', 'bafy', now() \
         FROM generate_series(1, 20000) AS i",
    )
    .execute(&pg)
    .await
    .unwrap();
    let analyzed: Option<f32> = sqlx::query_scalar(
        "SELECT reltuples FROM pg_class WHERE relname = 'notifications' AND reltuples >= 0",
    )
    .fetch_optional(&pg)
    .await
    .unwrap();
    assert_eq!(analyzed, None, "the table must have no statistics yet");

    let pool = crate::common::deadpool(&pg, 1).await;
    let key = CursorKey {
        service: "plans.test".into(),
        fence: 1,
    };
    cursor::claim_fence(&pool, &key.service, 1).await.unwrap();
    let uris: Vec<String> = (0..500)
        .map(|i| format!("at://did:plc:a{i}/app.bsky.feed.like/{i}"))
        .collect();
    let plan = run_tx(
        &pool,
        &RetryPolicy::default(),
        &CancellationToken::new(),
        async |tx| {
            // An empty batch: what every writing transaction sets first, then the writer's
            // delete of a batch's notifications, explained in the same transaction.
            writer::apply(tx, &[], None, &key).await?;
            let rows = tx
                .query(
                    "EXPLAIN DELETE FROM notifications WHERE record_uri = ANY($1)",
                    &[&uris],
                )
                .await?;
            Ok::<_, WriteError>(
                rows.iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        },
    )
    .await
    .unwrap();
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(plan.contains("notifications_pkey"), "{plan}");
}
