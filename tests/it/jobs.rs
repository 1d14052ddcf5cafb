//! Cleanup jobs against a real database: only expired rows go, in bounded batches.
use crate::common;

use common::deadpool;

use std::time::Duration;

use atproto_ingest::jobs::{self, Job, JobsConfig};
use atproto_ingest::metrics;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

async fn seed(pg: &PgPool) {
    sqlx::raw_sql(
        "INSERT INTO sessions (id, did, expires_at)
           SELECT 'old' || g, 'did:plc:old', now() - interval '1 hour' FROM generate_series(1, 2500) g;
         INSERT INTO sessions (id, did, expires_at)
           SELECT 'live' || g, 'did:plc:live', now() + interval '1 hour' FROM generate_series(1, 7) g;
         INSERT INTO oauth_states (state, expires_at)
           SELECT 'old' || g, now() - interval '1 minute' FROM generate_series(1, 1200) g;
         INSERT INTO oauth_states (state, expires_at)
           SELECT 'live' || g, now() + interval '10 minutes' FROM generate_series(1, 3) g;",
    )
    .execute(pg)
    .await
    .unwrap();
}

async fn remaining(pg: &PgPool, sql: &str) -> Vec<String> {
    sqlx::query_scalar(sql).fetch_all(pg).await.unwrap()
}

#[sqlx::test(migrations = "./migrations")]
async fn run_once_removes_only_expired_rows_in_batches(pg: PgPool) {
    let handle = metrics::install();
    seed(&pg).await;
    let pool = deadpool(&pg, 2).await;
    let cancel = CancellationToken::new();

    let r = jobs::run_once(&pool, Job::Sessions, 1000, &cancel)
        .await
        .unwrap();
    assert_eq!((r.deleted, r.batches), (2500, 3));
    let left = remaining(&pg, "SELECT id FROM sessions ORDER BY id").await;
    assert_eq!(left.len(), 7);
    assert!(left.iter().all(|id| id.starts_with("live")), "{left:?}");
    // The OAuth job did not touch sessions, and vice versa.
    assert_eq!(
        remaining(&pg, "SELECT state FROM oauth_states").await.len(),
        1203
    );

    let r = jobs::run_once(&pool, Job::OAuthStates, 1000, &cancel)
        .await
        .unwrap();
    assert_eq!((r.deleted, r.batches), (1200, 2));
    let left = remaining(&pg, "SELECT state FROM oauth_states ORDER BY state").await;
    assert_eq!(left, ["live1", "live2", "live3"]);

    // Nothing left to do: one empty batch.
    let r = jobs::run_once(&pool, Job::Sessions, 1000, &cancel)
        .await
        .unwrap();
    assert_eq!((r.deleted, r.batches), (0, 1));
    assert!(jobs::run_once(&pool, Job::Sessions, 0, &cancel)
        .await
        .is_err());

    let text = handle.render();
    // The recorder is global to this test binary and the other test deletes rows too: at least
    // this test's 1,200 are counted.
    let deleted: u64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("atproto_ingest_job_rows_deleted_total{job=\"oauth_states\"} ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    assert!(deleted >= 1200, "{text}");
    assert!(
        text.contains("atproto_ingest_job_runs_total{job=\"sessions\",outcome=\"ok\"}"),
        "{text}"
    );
    assert!(
        text.contains("atproto_ingest_job_seconds_bucket{job=\"sessions\""),
        "{text}"
    );
    pool.close();
}

#[sqlx::test(migrations = "./migrations")]
async fn run_loop_cleans_both_tables_at_start_and_stops_on_cancel(pg: PgPool) {
    seed(&pg).await;
    let pool = deadpool(&pg, 2).await;
    let cancel = CancellationToken::new();
    let cfg = JobsConfig {
        batch_size: 500,
        ..JobsConfig::default()
    };
    let task = tokio::spawn(jobs::run(pool.clone(), cfg, cancel.clone()));
    for _ in 0..100 {
        let s = remaining(&pg, "SELECT id FROM sessions").await.len();
        let o = remaining(&pg, "SELECT state FROM oauth_states").await.len();
        if (s, o) == (7, 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(remaining(&pg, "SELECT id FROM sessions").await.len(), 7);
    assert_eq!(
        remaining(&pg, "SELECT state FROM oauth_states").await.len(),
        3
    );
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
    pool.close();
}
