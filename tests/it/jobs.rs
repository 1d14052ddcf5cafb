//! Background jobs against a real database: cleanup removes only expired rows, in bounded
//! batches; re-resolution resolves only the stub actors that are due.
use crate::common;

use common::deadpool;

use std::time::Duration;

use atproto_ingest::identity::{IdentityConfig, UserCreator};
use atproto_ingest::jobs::{self, Job, JobsConfig, ReresolveRun};
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

/// (did, handle, resolved, failures, scheduled) of every actor, by DID.
type Resolution = (String, Option<String>, bool, i32, bool);

async fn resolutions(pg: &PgPool) -> Vec<Resolution> {
    sqlx::query_as(
        "SELECT did, handle, resolved_at IS NOT NULL, resolve_failures, \
         next_resolve_at IS NOT NULL FROM actors ORDER BY did",
    )
    .fetch_all(pg)
    .await
    .unwrap()
}

#[sqlx::test(migrations = "./migrations")]
async fn reresolve_resolves_only_due_stubs_and_runs_as_a_job(pg: PgPool) {
    let handle = metrics::install();
    let server = common::fake_identity::Server::start().await;
    for did in ["did:plc:due", "did:plc:later", "did:plc:gone"] {
        server.account(did, &format!("{}.test", &did[8..]), true);
    }
    sqlx::raw_sql(
        "INSERT INTO actors (did, resolve_failures, next_resolve_at) VALUES
           ('did:plc:due', 2, now() - interval '1 minute'),
           ('did:plc:missing', 1, now() - interval '2 minutes'),
           ('did:plc:later', 1, now() + interval '1 hour');
         INSERT INTO actors (did, status, next_resolve_at)
           VALUES ('did:plc:gone', 'deleted', now() - interval '1 minute');",
    )
    .execute(&pg)
    .await
    .unwrap();
    let pool = deadpool(&pg, 2).await;
    let creator = UserCreator::new(IdentityConfig {
        resolve_identities: true,
        ..server.config()
    })
    .unwrap();

    let run = jobs::reresolve_once(&pool, &creator, 10).await.unwrap();
    assert_eq!(
        run,
        ReresolveRun {
            due: 2,
            resolved: 1,
            stubs: 1,
            given_up: 0,
        }
    );
    let rows = resolutions(&pg).await;
    let row = |did: &str| rows.iter().find(|r| r.0 == did).unwrap().clone();
    assert_eq!(
        row("did:plc:due"),
        (
            "did:plc:due".into(),
            Some("due.test".into()),
            true,
            0,
            false
        )
    );
    // Not in the directory: one more failure, retried later with backoff.
    assert_eq!(
        row("did:plc:missing"),
        ("did:plc:missing".into(), None, false, 2, true)
    );
    // Not due yet, or deleted: untouched, and never asked for.
    assert_eq!(
        row("did:plc:later"),
        ("did:plc:later".into(), None, false, 1, true)
    );
    assert!(!row("did:plc:gone").2, "a deleted actor is not resolved");
    assert_eq!(server.requests("/plc/did:plc:later"), 0);
    assert_eq!(server.requests("/plc/did:plc:gone"), 0);
    let missing_next: bool = sqlx::query_scalar(
        "SELECT next_resolve_at > now() FROM actors WHERE did = 'did:plc:missing'",
    )
    .fetch_one(&pg)
    .await
    .unwrap();
    assert!(missing_next, "the failed actor's next try is in the future");

    // The job loop: first run at once, counted with the other jobs, stops on cancel.
    sqlx::query("UPDATE actors SET next_resolve_at = now() WHERE did = 'did:plc:later'")
        .execute(&pg)
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(jobs::run_reresolve(
        pool.clone(),
        creator,
        Duration::from_secs(3600),
        cancel.clone(),
    ));
    for _ in 0..100 {
        if row_resolved(&pg, "did:plc:later").await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(row_resolved(&pg, "did:plc:later").await);
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
    let text = handle.render();
    assert!(
        text.contains("atproto_ingest_job_runs_total{job=\"reresolve\",outcome=\"ok\"}"),
        "{text}"
    );
    assert!(
        text.contains("atproto_ingest_job_seconds_bucket{job=\"reresolve\""),
        "{text}"
    );
    pool.close();
}

#[sqlx::test(migrations = "./migrations")]
async fn tombstoned_and_unsupported_dids_are_given_up_not_retried_daily(pg: PgPool) {
    let server = common::fake_identity::Server::start().await;
    // The PLC answers 410 Gone for a tombstoned DID, 404 for one it does not know (yet).
    server
        .fake()
        .docs
        .insert("did:plc:tombstoned".into(), (410, String::new()));
    sqlx::raw_sql(
        "INSERT INTO actors (did, next_resolve_at) VALUES
           ('did:plc:tombstoned', now() - interval '1 minute'),
           ('did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK', now() - interval '1 minute'),
           ('did:plc:unknown', now() - interval '1 minute');",
    )
    .execute(&pg)
    .await
    .unwrap();
    let pool = deadpool(&pg, 2).await;
    let creator = UserCreator::new(IdentityConfig {
        resolve_identities: true,
        ..server.config()
    })
    .unwrap();
    let run = jobs::reresolve_once(&pool, &creator, 10).await.unwrap();
    assert_eq!(
        run,
        ReresolveRun {
            due: 3,
            resolved: 0,
            stubs: 1,
            given_up: 2,
        }
    );
    let marks: Vec<(String, bool, i32)> = sqlx::query_as(
        "SELECT did, next_resolve_at = 'infinity', resolve_failures FROM actors ORDER BY did",
    )
    .fetch_all(&pg)
    .await
    .unwrap();
    assert_eq!(
        marks,
        vec![
            (
                "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK".into(),
                true,
                1
            ),
            ("did:plc:tombstoned".into(), true, 1),
            ("did:plc:unknown".into(), false, 1),
        ],
        "given up: marked for good; unknown: retried with backoff"
    );
    // Even when every other actor is due again, the given-up ones are never asked for.
    sqlx::query("UPDATE actors SET next_resolve_at = now() WHERE did = 'did:plc:unknown'")
        .execute(&pg)
        .await
        .unwrap();
    let again = jobs::reresolve_once(&pool, &creator, 10).await.unwrap();
    assert_eq!((again.due, again.given_up), (1, 0));
    assert_eq!(server.requests("/plc/did:plc:tombstoned"), 1);
    pool.close();
}

async fn row_resolved(pg: &PgPool, did: &str) -> bool {
    sqlx::query_scalar("SELECT resolved_at IS NOT NULL FROM actors WHERE did = $1")
        .bind(did)
        .fetch_one(pg)
        .await
        .unwrap()
}
