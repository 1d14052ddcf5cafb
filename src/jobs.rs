//! Leader-only background jobs: each runs on its interval until cancelled, a failed run is
//! logged and counted (`job_runs_total`, `job_seconds` by `job`) and retried at the next
//! interval. The caller starts them when it becomes leader and cancels them when it stops
//! being leader.
//!
//! - Cleanup (§8, [`run`]): expired sessions and expired OAuth states, deleted in bounded
//!   batches (one short autocommit statement each, no long table locks).
//! - Re-resolution (§5, [`run_reresolve`]): stub actors whose retry time has passed get their
//!   identity resolved again, a bounded batch per run. An identity that will never resolve
//!   (tombstoned DID, unsupported method) is marked (`next_resolve_at = infinity`) and not
//!   retried again.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::identity::{store, Creation, UserCreator};
use crate::metrics as m;

/// §8: sessions are cleaned every 60 minutes.
pub const DEFAULT_SESSIONS_INTERVAL: Duration = Duration::from_secs(60 * 60);
/// §8: OAuth states every 6 hours.
pub const DEFAULT_OAUTH_STATES_INTERVAL: Duration = Duration::from_secs(6 * 60 * 60);
/// Rows per DELETE: a few ms of row locks per statement on this hardware.
pub const DEFAULT_BATCH_SIZE: i64 = 1000;
/// Re-resolution job period: stubs are retried with backoff of at least a minute anyway.
pub const DEFAULT_RERESOLVE_INTERVAL: Duration = Duration::from_secs(60);
/// Actors re-resolved per job run: bounded so a run stays short and the PLC is not hammered.
pub const DEFAULT_RERESOLVE_BATCH: i64 = 100;
/// The `job` label of the re-resolution job.
const RERESOLVE: &str = "reresolve";

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{job}: no database connection: {source}")]
    Pool {
        job: &'static str,
        #[source]
        source: deadpool_postgres::PoolError,
    },
    #[error("{job}: delete failed after removing {deleted} rows: {source}")]
    Delete {
        job: &'static str,
        deleted: u64,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("{job}: batch size must be positive, got {batch}")]
    BadBatch { job: &'static str, batch: i64 },
    #[error("{job}: database: {source}")]
    Db {
        job: &'static str,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// A cleanup job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    Sessions,
    OAuthStates,
}

impl Job {
    /// The `job` label and log name.
    pub fn name(self) -> &'static str {
        match self {
            Job::Sessions => "sessions",
            Job::OAuthStates => "oauth_states",
        }
    }

    /// One bounded batch; `SKIP LOCKED` so a row the app is touching never blocks us.
    fn sql(self) -> &'static str {
        match self {
            Job::Sessions => {
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions \
                 WHERE expires_at < now() ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            }
            Job::OAuthStates => {
                "DELETE FROM oauth_states WHERE state IN (SELECT state FROM oauth_states \
                 WHERE expires_at < now() ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)"
            }
        }
    }
}

/// Intervals and batch size.
#[derive(Debug, Clone)]
pub struct JobsConfig {
    pub sessions_interval: Duration,
    pub oauth_states_interval: Duration,
    pub batch_size: i64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            sessions_interval: DEFAULT_SESSIONS_INTERVAL,
            oauth_states_interval: DEFAULT_OAUTH_STATES_INTERVAL,
            batch_size: DEFAULT_BATCH_SIZE,
        }
    }
}

/// What one run did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunReport {
    pub deleted: u64,
    pub batches: u32,
    pub elapsed: Duration,
}

/// Runs `job` once: deletes expired rows batch by batch until a batch comes back short.
/// Stops early (with what it did so far) when `cancel` fires between batches.
pub async fn run_once(
    pool: &Pool,
    job: Job,
    batch: i64,
    cancel: &CancellationToken,
) -> Result<RunReport, JobError> {
    let name = job.name();
    if batch <= 0 {
        return Err(JobError::BadBatch { job: name, batch });
    }
    let started = Instant::now();
    let result = delete_batches(pool, job, batch, cancel).await;
    let elapsed = started.elapsed();
    record_run(name, elapsed, result.is_ok());
    let (deleted, batches) = match &result {
        Ok(v) => *v,
        Err(JobError::Delete { deleted, .. }) => (*deleted, 0),
        Err(_) => (0, 0),
    };
    metrics::counter!(m::JOB_ROWS_DELETED_TOTAL, "job" => name).increment(deleted);
    result.map(|_| {
        tracing::info!(
            job = name,
            deleted,
            batches,
            elapsed_ms = elapsed.as_millis() as u64,
            "cleanup job {name}: removed {deleted} expired rows in {:.2}s",
            elapsed.as_secs_f64()
        );
        RunReport {
            deleted,
            batches,
            elapsed,
        }
    })
}

async fn delete_batches(
    pool: &Pool,
    job: Job,
    batch: i64,
    cancel: &CancellationToken,
) -> Result<(u64, u32), JobError> {
    let name = job.name();
    let client = pool
        .get()
        .await
        .map_err(|source| JobError::Pool { job: name, source })?;
    let stmt = client
        .prepare_cached(job.sql())
        .await
        .map_err(|source| JobError::Delete {
            job: name,
            deleted: 0,
            source,
        })?;
    let (mut deleted, mut batches) = (0u64, 0u32);
    loop {
        let n = client
            .execute(&stmt, &[&batch])
            .await
            .map_err(|source| JobError::Delete {
                job: name,
                deleted,
                source,
            })?;
        deleted += n;
        batches += 1;
        if n < batch.unsigned_abs() || cancel.is_cancelled() {
            return Ok((deleted, batches));
        }
        // Let other tasks (and the writer) have the reactor between batches.
        tokio::task::yield_now().await;
    }
}

/// Runs both jobs on their intervals (first run at once) until `cancel`. A failed run is
/// logged and counted; the next interval tries again.
pub async fn run(pool: Pool, cfg: JobsConfig, cancel: CancellationToken) {
    let mut sessions = interval(cfg.sessions_interval);
    let mut oauth = interval(cfg.oauth_states_interval);
    loop {
        let job = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = sessions.tick() => Job::Sessions,
            _ = oauth.tick() => Job::OAuthStates,
        };
        if let Err(e) = run_once(&pool, job, cfg.batch_size, &cancel).await {
            tracing::error!(job = job.name(), error = %e, "cleanup job failed; will retry at its next interval");
        }
    }
}

/// What one re-resolution run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReresolveRun {
    /// Actors due that were tried.
    pub due: usize,
    /// Resolved now.
    pub resolved: usize,
    /// Still unresolved (retry rescheduled with backoff).
    pub stubs: usize,
    /// Will never resolve (tombstoned DID, unsupported method): marked, never retried.
    pub given_up: usize,
}

/// One run of the re-resolution job: up to `limit` actors whose `next_resolve_at` has passed
/// are resolved again (under the creator's semaphore) and the outcomes stored.
pub async fn reresolve_once(
    pool: &Pool,
    creator: &UserCreator,
    limit: i64,
) -> Result<ReresolveRun, JobError> {
    let mut run = ReresolveRun::default();
    let Some(resolver) = creator.resolver() else {
        return Ok(run);
    };
    let pool_err = |source| JobError::Pool {
        job: RERESOLVE,
        source,
    };
    let db_err = |source| JobError::Db {
        job: RERESOLVE,
        source,
    };
    let due = {
        let client = pool.get().await.map_err(pool_err)?;
        store::due(&client, limit).await.map_err(db_err)?
    };
    run.due = due.len();
    let creations: Vec<Creation> = futures_util::stream::iter(due)
        .map(|(did, failures)| async move {
            // A refresh must not be answered from the cache.
            resolver.invalidate(&did);
            creator.create(&did, failures).await
        })
        .buffer_unordered(creator.concurrency())
        .collect()
        .await;
    let client = pool.get().await.map_err(pool_err)?;
    for creation in &creations {
        store::store_creation(&client, creation)
            .await
            .map_err(db_err)?;
        if creation.is_given_up() {
            run.given_up += 1;
        } else if creation.is_stub() {
            run.stubs += 1;
        } else {
            run.resolved += 1;
        }
    }
    metrics::counter!(m::RERESOLVE_ACTORS_TOTAL, "result" => "resolved")
        .increment(run.resolved as u64);
    metrics::counter!(m::RERESOLVE_ACTORS_TOTAL, "result" => "stub").increment(run.stubs as u64);
    metrics::counter!(m::RERESOLVE_ACTORS_TOTAL, "result" => "given_up")
        .increment(run.given_up as u64);
    Ok(run)
}

/// The re-resolution job (§5): every `interval` (first run at once), resolves again a bounded
/// batch ([`DEFAULT_RERESOLVE_BATCH`]) of stub actors whose retry time has passed. Runs until
/// `cancel` (a run in progress is dropped, its resolutions with it); errors are logged and
/// counted, never fatal. Share `creator` with the pipeline so both use one semaphore. Returns
/// at once when resolution is switched off.
pub async fn run_reresolve(
    pool: Pool,
    creator: UserCreator,
    interval: Duration,
    cancel: CancellationToken,
) {
    if !creator.is_enabled() {
        return;
    }
    let mut tick = self::interval(interval.max(Duration::from_millis(1)));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = reresolve_once(&pool, &creator, DEFAULT_RERESOLVE_BATCH) => r,
        };
        record_run(RERESOLVE, started.elapsed(), result.is_ok());
        metrics::counter!(m::RERESOLVE_RUNS_TOTAL).increment(1);
        match result {
            Ok(run) if run.due > 0 => {
                tracing::info!(
                    job = RERESOLVE,
                    due = run.due,
                    resolved = run.resolved,
                    unresolved = run.stubs,
                    given_up = run.given_up,
                    "re-resolved stub users"
                );
            }
            Ok(_) => {}
            Err(e) => {
                metrics::counter!(m::USERS_DB_ERRORS_TOTAL, "op" => "reresolve").increment(1);
                tracing::warn!(job = RERESOLVE, error = %e, "re-resolution run failed; will retry at its next interval");
            }
        }
    }
}

/// Duration and outcome of one run of `job`.
fn record_run(job: &'static str, elapsed: Duration, ok: bool) {
    metrics::histogram!(m::JOB_SECONDS, "job" => job).record(elapsed.as_secs_f64());
    let outcome = if ok { "ok" } else { "error" };
    metrics::counter!(m::JOB_RUNS_TOTAL, "job" => job, "outcome" => outcome).increment(1);
}

fn interval(every: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(every);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    i
}
