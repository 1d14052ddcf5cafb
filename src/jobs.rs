//! Background cleanup jobs (§8): expired sessions and expired OAuth states, deleted in bounded
//! batches (one short autocommit statement each, no long table locks). Leader only: the caller
//! starts [`run`] when it becomes leader and cancels it when it stops being leader.

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// §8: sessions are cleaned every 60 minutes.
pub const DEFAULT_SESSIONS_INTERVAL: Duration = Duration::from_secs(60 * 60);
/// §8: OAuth states every 6 hours.
pub const DEFAULT_OAUTH_STATES_INTERVAL: Duration = Duration::from_secs(6 * 60 * 60);
/// Rows per DELETE: a few ms of row locks per statement on this hardware.
pub const DEFAULT_BATCH_SIZE: i64 = 1000;

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
    metrics::histogram!(m::JOB_SECONDS, "job" => name).record(elapsed.as_secs_f64());
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!(m::JOB_RUNS_TOTAL, "job" => name, "outcome" => outcome).increment(1);
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

fn interval(every: Duration) -> tokio::time::Interval {
    let mut i = tokio::time::interval(every);
    i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    i
}
