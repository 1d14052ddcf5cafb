//! The leader loop: stand by until the lease is ours, claim the fence, lead a term, and on its
//! end release (or lose) the lease and stand by again, until shutdown.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::cursor::{self, Claim};
use crate::identity::UserCreator;
use crate::leader::{Elector, Leadership};
use crate::metrics as m;
use crate::pipeline::Stats;

use super::lifecycle::Lifecycle;
use super::term::{term, TermEnd};
use super::{AppConfig, AppError};

/// Limit on releasing the lease outside a graceful stop (step-down, failure).
const RELEASE_LIMIT: Duration = Duration::from_secs(2);

/// What the leader loop and its terms share, built once by `run`. The live handles (creator,
/// relay seq counter, statistics) are here, not in the `Clone` config.
pub(super) struct Ctx<'a> {
    pub cfg: &'a AppConfig,
    pub pool: &'a Pool,
    pub elector: &'a Arc<Elector>,
    /// `firehose_cursor.service` of the relay.
    pub service: &'a str,
    pub life: &'a Lifecycle,
    /// The process's root token: cancelled on shutdown or a background failure.
    pub shutdown: &'a CancellationToken,
    /// One creator (one semaphore, one cache) for every term; `None` without resolution.
    pub creator: Option<&'a UserCreator>,
    /// Highest relay seq received, over every term (for the lag).
    pub seen_seq: Arc<AtomicI64>,
    pub stats: Arc<Stats>,
}

/// Runs terms until shutdown (`Ok`) or a fatal error.
pub(super) async fn lead(ctx: &Ctx<'_>) -> Result<(), AppError> {
    let (elector, life, shutdown, service, pool) =
        (ctx.elector, ctx.life, ctx.shutdown, ctx.service, ctx.pool);
    loop {
        let first = match elector.try_acquire().await {
            Ok(l) => l,
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "Redis unreachable; standing by until it answers");
                None
            }
            Err(e) => return Err(e.into()),
        };
        let leadership = match first {
            Some(l) => l,
            None => {
                life.standby();
                match elector.acquire(shutdown).await? {
                    Some(l) => l,
                    None => {
                        life.draining();
                        tracing::info!("shutdown while standing by; exiting");
                        return Ok(());
                    }
                }
            }
        };
        let fence = leadership.fence;
        let resume = match cursor::claim_fence(pool, service, fence).await {
            Ok(Claim::Claimed(seq)) => seq,
            Ok(Claim::Behind { db_fence }) => {
                // Redis' fence counter is behind the database (Redis lost its data?), or a
                // newer leader claimed first. Raise the counter past the database and retry.
                tracing::error!(
                    fence,
                    db_fence,
                    "the database holds a fence at least as new as ours; raising the Redis fence counter and re-acquiring"
                );
                metrics::counter!(m::FENCE_CLAIMS_REFUSED_TOTAL).increment(1);
                elector.raise_fence_floor(db_fence).await?;
                release(leadership, RELEASE_LIMIT).await;
                life.standby();
                pause_or_shutdown(elector.config().poll_interval, shutdown).await;
                if shutdown.is_cancelled() {
                    life.draining();
                    return Ok(());
                }
                continue;
            }
            Err(e) => {
                release(leadership, RELEASE_LIMIT).await;
                return Err(e.into());
            }
        };
        life.leader(fence, resume);
        tracing::info!(service = %service, fence, cursor = ?resume, "leading: fence claimed; streaming from the relay");
        match term(ctx, &leadership, resume).await {
            TermEnd::Shutdown { deadline, result } => {
                let left = deadline.saturating_duration_since(Instant::now());
                release(leadership, left.max(Duration::from_millis(100))).await;
                if result.is_ok() {
                    tracing::info!(
                        cursor = ctx.stats.cursor.load(Ordering::Relaxed),
                        "stopped gracefully"
                    );
                }
                return result;
            }
            TermEnd::Lost => {
                drop(leadership);
                tracing::warn!(
                    fence,
                    "lease lost: stopped reading and writing at once; standing by"
                );
            }
            TermEnd::Fenced => {
                metrics::counter!(m::FENCED_TOTAL).increment(1);
                tracing::error!(
                    fence,
                    "fenced out by a newer leader: our last batch was rolled back; standing by"
                );
                release(leadership, RELEASE_LIMIT).await;
            }
            TermEnd::Failed(e) => {
                tracing::error!(fence, error = %e, "leader term failed; releasing the lease");
                release(leadership, RELEASE_LIMIT).await;
                return Err(e);
            }
        }
        if shutdown.is_cancelled() {
            life.draining();
            return Ok(());
        }
        life.standby();
    }
}

async fn pause_or_shutdown(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

async fn release(leadership: Leadership, limit: Duration) {
    match tokio::time::timeout(limit, leadership.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "releasing the lease failed; it expires within one TTL")
        }
        Err(_) => tracing::warn!("releasing the lease timed out; it expires within one TTL"),
    }
}
