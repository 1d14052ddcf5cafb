//! `run_tx` against the real PostgreSQL: real deadlocks, serialization failures, statement and
//! transaction timeouts, lost connections, permanent errors, cancellation.
use crate::common;

use common::deadpool;

use std::time::{Duration, Instant};

use atproto_ingest::metrics;
use atproto_ingest::txn::{run_tx, RetryPolicy, TxError};
use sqlx::PgPool;
use tokio::sync::{Barrier, Notify};
use tokio_util::sync::CancellationToken;

type PgError = tokio_postgres::Error;

async fn setup(pg: &PgPool) {
    sqlx::raw_sql(
        "CREATE TABLE acct (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO acct VALUES (1, 0), (2, 0);
         CREATE TABLE applied (who text NOT NULL);",
    )
    .execute(pg)
    .await
    .unwrap();
}

async fn applied(pg: &PgPool, who: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM applied WHERE who = $1")
        .bind(who)
        .fetch_one(pg)
        .await
        .unwrap()
}

async fn values(pg: &PgPool) -> Vec<i32> {
    sqlx::query_scalar("SELECT v FROM acct ORDER BY id")
        .fetch_all(pg)
        .await
        .unwrap()
}

fn fast(max_retries: u32) -> RetryPolicy {
    RetryPolicy {
        max_retries,
        base_delay: Duration::from_millis(10),
        ..RetryPolicy::default()
    }
}

/// Locks `first` then `second` (after the barrier on the first attempt), records `who`.
async fn transfer(
    pool: &deadpool_postgres::Pool,
    barrier: &Barrier,
    (first, second): (i32, i32),
    amount: i32,
    who: &str,
) -> (Result<(), TxError<PgError>>, u32) {
    let mut attempts = 0u32;
    let r = run_tx(
        pool,
        &RetryPolicy::default(),
        &CancellationToken::new(),
        async |tx| {
            attempts += 1;
            // Detect the deadlock after 100 ms instead of the default 1 s.
            tx.batch_execute("SET LOCAL deadlock_timeout = '100ms'")
                .await?;
            let upd = "UPDATE acct SET v = v + $2 WHERE id = $1";
            tx.execute(upd, &[&first, &amount]).await?;
            if attempts == 1 {
                barrier.wait().await;
            }
            tx.execute(upd, &[&second, &amount]).await?;
            tx.execute("INSERT INTO applied VALUES ($1)", &[&who])
                .await?;
            Ok::<_, PgError>(())
        },
    )
    .await;
    (r, attempts)
}

#[sqlx::test(migrations = "./migrations")]
async fn real_deadlock_is_retried_and_each_side_commits_once(pg: PgPool) {
    let handle = metrics::install();
    setup(&pg).await;
    let pool = deadpool(&pg, 4).await;
    let barrier = Barrier::new(2);
    let (a, b) = tokio::join!(
        transfer(&pool, &barrier, (1, 2), 1, "a"),
        transfer(&pool, &barrier, (2, 1), 10, "b"),
    );
    a.0.unwrap();
    b.0.unwrap();
    let mut attempts = [a.1, b.1];
    attempts.sort();
    assert_eq!(attempts, [1, 2], "exactly one side was the deadlock victim");
    assert_eq!(values(&pg).await, [11, 11]);
    assert_eq!((applied(&pg, "a").await, applied(&pg, "b").await), (1, 1));
    let text = handle.render();
    assert!(
        text.contains("atproto_ingest_db_retries_total{sqlstate=\"40P01\"}"),
        "{text}"
    );
    pool.close();
}

#[sqlx::test(migrations = "./migrations")]
async fn real_serialization_failure_is_retried_and_commits_once(pg: PgPool) {
    setup(&pg).await;
    let pool = deadpool(&pg, 4).await;
    let (a_has_snapshot, b_committed) = (Notify::new(), Notify::new());
    let cancel = CancellationToken::new();
    let policy = RetryPolicy::default();
    let mut a_attempts = 0u32;
    let a = run_tx(&pool, &policy, &cancel, async |tx| {
        a_attempts += 1;
        tx.batch_execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await?;
        tx.query_one("SELECT v FROM acct WHERE id = 1", &[]).await?;
        if a_attempts == 1 {
            a_has_snapshot.notify_one();
            b_committed.notified().await;
        }
        // Row 1 changed after our snapshot: 40001 on the first attempt.
        tx.execute("UPDATE acct SET v = v + 1 WHERE id = 1", &[])
            .await?;
        tx.execute("INSERT INTO applied VALUES ('a')", &[]).await?;
        Ok::<_, PgError>(())
    });
    let b = async {
        a_has_snapshot.notified().await;
        let r = run_tx(&pool, &policy, &cancel, async |tx| {
            tx.execute("UPDATE acct SET v = v + 10 WHERE id = 1", &[])
                .await?;
            tx.execute("INSERT INTO applied VALUES ('b')", &[]).await?;
            Ok::<_, PgError>(())
        })
        .await;
        b_committed.notify_one();
        r
    };
    let (ra, rb) = tokio::join!(a, b);
    ra.unwrap();
    rb.unwrap();
    assert_eq!(a_attempts, 2, "one 40001, then a clean retry");
    assert_eq!(values(&pg).await, [11, 0]);
    assert_eq!((applied(&pg, "a").await, applied(&pg, "b").await), (1, 1));
    pool.close();
}

#[sqlx::test(migrations = "./migrations")]
async fn statement_timeout_is_retried_then_fails_clearly(pg: PgPool) {
    let pool = deadpool(&pg, 2).await;
    let mut runs = 0u32;
    let started = Instant::now();
    let err = run_tx(&pool, &fast(2), &CancellationToken::new(), async |tx| {
        runs += 1;
        tx.batch_execute("SET LOCAL statement_timeout = 50").await?;
        tx.execute("SELECT pg_sleep(1)", &[]).await?;
        Ok::<_, PgError>(())
    })
    .await
    .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "each attempt was cut at 50 ms"
    );
    assert_eq!(runs, 3);
    assert_eq!(err.attempts(), 3);
    assert_eq!(err.sqlstate(), Some("57014"));
    assert!(matches!(
        err,
        TxError::RetriesExhausted {
            reason: "statement_timeout",
            ..
        }
    ));
    let msg = err.to_string();
    assert!(msg.contains("57014") && msg.contains("3 attempts"), "{msg}");
    pool.close();
}

#[sqlx::test(migrations = "./migrations")]
async fn permanent_error_is_not_retried_and_rolls_back(pg: PgPool) {
    setup(&pg).await;
    let pool = deadpool(&pg, 2).await;
    let mut runs = 0u32;
    let err = run_tx(&pool, &fast(3), &CancellationToken::new(), async |tx| {
        runs += 1;
        tx.execute("INSERT INTO applied VALUES ('x')", &[]).await?;
        tx.execute("INSERT INTO acct VALUES (1, 5)", &[]).await?; // duplicate key
        Ok::<_, PgError>(())
    })
    .await
    .unwrap_err();
    assert_eq!((runs, err.attempts()), (1, 1));
    assert_eq!(err.sqlstate(), Some("23505"));
    assert!(matches!(err, TxError::Permanent { .. }), "{err}");
    assert_eq!(applied(&pg, "x").await, 0, "rolled back");
    pool.close();
}

#[sqlx::test(migrations = "./migrations")]
async fn transaction_timeout_cancels_the_query(pg: PgPool) {
    let pool = deadpool(&pg, 2).await;
    let policy = RetryPolicy {
        tx_timeout: Duration::from_millis(300),
        ..fast(1)
    };
    let started = Instant::now();
    let mut runs = 0u32;
    let err = run_tx(&pool, &policy, &CancellationToken::new(), async |tx| {
        runs += 1;
        tx.execute("SELECT pg_sleep(5)", &[]).await?;
        Ok::<_, PgError>(())
    })
    .await
    .unwrap_err();
    assert!(
        matches!(err, TxError::TimedOut { attempts: 2, .. }),
        "{err}"
    );
    assert_eq!(runs, 2);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // The server stopped running the sleeps (cancelled, not merely abandoned).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND state = 'active' AND query LIKE 'SELECT pg_sleep(5)%'",
        )
        .fetch_one(&pg)
        .await
        .unwrap();
        if running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{running} sleeps still running");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Not retried when the policy says so.
    let once = RetryPolicy {
        retry_on_timeout: false,
        ..policy
    };
    let err = run_tx(&pool, &once, &CancellationToken::new(), async |tx| {
        tx.execute("SELECT pg_sleep(5)", &[]).await?;
        Ok::<_, PgError>(())
    })
    .await
    .unwrap_err();
    assert_eq!(err.attempts(), 1);
    pool.close();
}

#[sqlx::test(migrations = "./migrations")]
async fn lost_connection_is_retried_on_a_new_one(pg: PgPool) {
    setup(&pg).await;
    let pool = deadpool(&pg, 2).await;
    let mut runs = 0u32;
    run_tx(&pool, &fast(3), &CancellationToken::new(), async |tx| {
        runs += 1;
        if runs == 1 {
            tx.execute("SELECT pg_terminate_backend(pg_backend_pid())", &[])
                .await?;
        }
        tx.execute("INSERT INTO applied VALUES ('c')", &[]).await?;
        Ok::<_, PgError>(())
    })
    .await
    .unwrap();
    assert_eq!(runs, 2);
    assert_eq!(applied(&pg, "c").await, 1);
    pool.close();
}

#[sqlx::test(migrations = "./migrations")]
async fn cancel_stops_the_backoff_wait(pg: PgPool) {
    let pool = deadpool(&pg, 2).await;
    let cancel = CancellationToken::new();
    let policy = RetryPolicy {
        base_delay: Duration::from_secs(10),
        ..RetryPolicy::default()
    };
    let canceller = {
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            c.cancel();
        })
    };
    let started = Instant::now();
    let err = run_tx(&pool, &policy, &cancel, async |tx| {
        // A synthetic deadlock error: retryable, so run_tx waits 10 s before retrying.
        tx.batch_execute("DO $$ BEGIN RAISE EXCEPTION 'boom' USING ERRCODE = '40P01'; END $$")
            .await?;
        Ok::<_, PgError>(())
    })
    .await
    .unwrap_err();
    assert!(matches!(err, TxError::Cancelled { attempts: 1 }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    canceller.await.unwrap();
    pool.close();
}
