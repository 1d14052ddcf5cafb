//! Backfill (§13): enumerate a relay's repos with `com.atproto.sync.listRepos`, page by page
//! (the next page's cursor stored with each page, so a killed backfill resumes there), and
//! queue every active repo not already synchronized at the listed rev for the resync workers.
//! Inactive accounts (deactivated, taken down, …) get their status from the listing and are not
//! fetched. The backfill is over when the last page was read and every listed repo is
//! synchronized, inactive, or given up with a reason.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{run_workers, ResyncConfig, ResyncStats, Resyncer};
use crate::identity::IdentityConfig;
use crate::metrics as m;
use crate::txn::{RetryPolicy, TxError};
use crate::writer::WriteError;

mod pages;
pub use pages::http_base;
use pages::{fetch_page, store_page};

/// Repos asked for per `listRepos` page (the lexicon's maximum).
pub const DEFAULT_PAGE_LIMIT: usize = 1000;
/// Failed attempts after which backfill gives a repo up (1 + 2 minutes of backoff in all).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// Limit on one page request.
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often completion is checked once every page is read (an `EXISTS` over the repos still
/// queued: cheap at any size), and the shortest period of the full count below.
const CHECK_PERIOD: Duration = Duration::from_millis(250);
/// The full count of the listed repos by outcome (progress bar, gauges, the final report) reads
/// every listed repo: at network size (tens of millions) one takes seconds. It runs at most
/// once per this many times its last duration (5 % of the time), between [`CHECK_PERIOD`] and
/// [`MAX_COUNT_PERIOD`]; before, it ran after every page, quadratic in the listing.
const COUNT_COST_SHARE: u32 = 20;
/// The longest the progress and the gauges go without a full count.
const MAX_COUNT_PERIOD: Duration = Duration::from_secs(300);

/// Why a backfill stopped before it was over.
#[derive(Debug, thiserror::Error)]
pub enum BackfillError {
    #[error("listRepos {url}: {reason}")]
    List { url: String, reason: String },
    #[error("database: {0}")]
    Db(#[from] TxError<WriteError>),
    #[error("database: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database: {0}")]
    Query(#[from] tokio_postgres::Error),
    #[error("identity setup: {0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("backfill listing task: {0}")]
    Task(String),
    #[error("backfill interrupted; run it again to resume")]
    Interrupted,
}

/// Settings of one backfill.
#[derive(Debug, Clone)]
pub struct BackfillConfig {
    /// The relay (or PDS) to enumerate: `http(s)://` or `ws(s)://` (taken as http(s)).
    pub relay_url: String,
    pub page_limit: usize,
    pub identity: IdentityConfig,
    pub resync: ResyncConfig,
    /// Transactions of the listing itself.
    pub retry: RetryPolicy,
}

/// Where a backfill stands (shared with the progress bar).
#[derive(Debug, Default)]
pub struct Progress {
    pub listed: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub inactive: AtomicU64,
    /// Records written by this process's resyncs.
    pub records: AtomicU64,
}

/// How a finished backfill ended.
#[derive(Debug, Default)]
pub struct Report {
    pub listed: u64,
    pub done: u64,
    pub inactive: u64,
    /// (DID, reason) of every repo given up.
    pub failed: Vec<(String, String)>,
}

/// Runs a backfill of `cfg.relay_url` until it is over (`Ok`), `cancel` fires
/// ([`BackfillError::Interrupted`]) or the listing fails for good. Resync workers run meanwhile
/// (`cfg.resync.concurrency` of them); `progress` is kept current. A finished earlier run of
/// the same relay starts over (new repos, new revs).
pub async fn backfill(
    pool: Pool,
    cfg: BackfillConfig,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<Report, BackfillError> {
    backfill_timed(pool, cfg, progress, cancel)
        .await
        .map(|(report, _)| report)
}

/// [`backfill`], also returning where the workers' time went (µs per phase and statement
/// group, summed over the workers: [`ResyncStats::times`]).
pub async fn backfill_timed(
    pool: Pool,
    cfg: BackfillConfig,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<(Report, BTreeMap<&'static str, u64>), BackfillError> {
    let resyncer = Arc::new(Resyncer::new(
        pool.clone(),
        cfg.resync.clone(),
        &cfg.identity,
        None,
        None,
    )?);
    // Dropping this future (an aborted task) stops the listing and the workers at once.
    let inner = cancel.child_token();
    let _stop = inner.clone().drop_guard();
    let workers = tokio::spawn(run_workers(
        resyncer.clone(),
        CancellationToken::new(),
        inner.clone(),
    ));
    let stats = resyncer.stats().clone();
    let result = list(pool, cfg, true, progress, stats, inner.clone()).await;
    inner.cancel();
    let _ = workers.await;
    result.map(|report| (report, resyncer.stats().times()))
}

/// The listing half of a backfill, for callers that run resync workers of their own (`run
/// --backfill`): lists the relay's repos, queues them, and returns once every listed repo is
/// done. `restart_finished`: whether a run of this relay that already finished starts over
/// (`false`: it is reported as it ended, nothing is listed).
pub async fn list(
    pool: Pool,
    cfg: BackfillConfig,
    restart_finished: bool,
    progress: Arc<Progress>,
    stats: Arc<ResyncStats>,
    cancel: CancellationToken,
) -> Result<Report, BackfillError> {
    // On a blocking thread driving its own future, as the batch writer does: rustc cannot
    // prove the retrying transaction's async closure `Send` for `spawn` (higher-ranked lifetime
    // bug), and `run --backfill` spawns this as a task. Dropping this future cancels it.
    let token = cancel.child_token();
    let _stop = token.clone().drop_guard();
    let rt = tokio::runtime::Handle::current();
    let listing = tokio::task::spawn_blocking(move || {
        rt.block_on(
            async move { drive(&pool, &cfg, restart_finished, &stats, &progress, &token).await },
        )
    });
    match listing.await {
        Ok(r) => r,
        Err(e) => Err(BackfillError::Task(e.to_string())),
    }
}

async fn drive(
    pool: &Pool,
    cfg: &BackfillConfig,
    restart_finished: bool,
    stats: &ResyncStats,
    progress: &Progress,
    cancel: &CancellationToken,
) -> Result<Report, BackfillError> {
    let relay = http_base(&cfg.relay_url);
    let client = reqwest::Client::builder()
        .timeout(PAGE_TIMEOUT)
        .user_agent(concat!("atproto-ingest/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| BackfillError::List {
            url: relay.clone(),
            reason: e.to_string(),
        })?;
    let (mut cursor, mut listed_all) = start(pool, &relay, restart_finished).await?;
    info!(relay = %relay, resume = ?cursor, listed_all, "backfill: enumerating repos");
    let mut counts = CountPeriod::default();
    loop {
        if cancel.is_cancelled() {
            return Err(BackfillError::Interrupted);
        }
        if !listed_all {
            let page =
                fetch_page(&client, &relay, cursor.as_deref(), cfg.page_limit, cancel).await?;
            metrics::counter!(m::BACKFILL_PAGES_TOTAL).increment(1);
            let next = page
                .cursor
                .filter(|c| !c.is_empty() && !page.repos.is_empty());
            store_page(
                pool,
                &cfg.retry,
                cancel,
                &relay,
                &page.repos,
                next.as_deref(),
            )
            .await?;
            listed_all = next.is_none();
            cursor = next;
        }
        if counts.due() {
            let started = Instant::now();
            check(pool, &relay, progress, stats).await?;
            counts.counted(started.elapsed());
        }
        if listed_all && !any_pending(pool, &relay).await? {
            let status = check(pool, &relay, progress, stats).await?;
            return finish(pool, &relay, status).await;
        }
        if listed_all {
            // The next check after the period, or as soon as the workers find nothing to do
            // (the likely end, seen without waiting out the period).
            tokio::select! {
                _ = cancel.cancelled() => return Err(BackfillError::Interrupted),
                _ = tokio::time::sleep(CHECK_PERIOD) => {}
                _ = stats.idle.notified() => {}
            }
        }
    }
}

/// The stored run of `relay`: its resume cursor, or a new run (a finished one starts over).
async fn start(
    pool: &Pool,
    relay: &str,
    restart_finished: bool,
) -> Result<(Option<String>, bool), BackfillError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT cursor, listed_all, finished_at IS NOT NULL FROM backfill_runs WHERE relay = $1",
            &[&relay],
        )
        .await?;
    match row {
        Some(r) if !restart_finished || !r.try_get::<_, bool>(2)? => {
            Ok((r.try_get(0)?, r.try_get(1)?))
        }
        _ => {
            client
                .execute("DELETE FROM backfill_runs WHERE relay = $1", &[&relay])
                .await?;
            client
                .execute("INSERT INTO backfill_runs (relay) VALUES ($1)", &[&relay])
                .await?;
            Ok((None, false))
        }
    }
}

/// Listed repos by outcome.
#[derive(Debug, Default)]
struct Status {
    listed: u64,
    done: u64,
    inactive: u64,
    pending: u64,
}

/// When the next full count ([`check`]) is due: its period follows its cost.
#[derive(Debug, Default)]
struct CountPeriod {
    last: Option<Instant>,
    every: Duration,
}

impl CountPeriod {
    fn due(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= self.every)
    }

    /// A count just took `took`.
    fn counted(&mut self, took: Duration) {
        self.every = (took * COUNT_COST_SHARE).clamp(CHECK_PERIOD, MAX_COUNT_PERIOD);
        self.last = Some(Instant::now());
    }
}

/// Whether a listed active repo is still queued for a resync (due, claimed or backing off):
/// the backfill is not over. Read from the queue side, so it costs what is still queued, not
/// what was listed.
async fn any_pending(pool: &Pool, relay: &str) -> Result<bool, BackfillError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM resync_queue q \
               JOIN backfill_repos b ON b.relay = $1 AND b.did = q.did \
               WHERE b.status IS NULL)",
            &[&relay],
        )
        .await?;
    Ok(row.try_get(0)?)
}

/// Counts the listed repos by outcome; updates the progress and the gauges.
async fn check(
    pool: &Pool,
    relay: &str,
    progress: &Progress,
    stats: &ResyncStats,
) -> Result<Status, BackfillError> {
    let client = pool.get().await?;
    let row = client
        .query_one(
            "SELECT count(*), \
               count(*) FILTER (WHERE b.status IS NOT NULL), \
               count(*) FILTER (WHERE b.status IS NULL AND q.did IS NULL \
                 AND a.sync_state = 'synchronized'), \
               count(*) FILTER (WHERE b.status IS NULL AND q.did IS NULL \
                 AND a.sync_state IS DISTINCT FROM 'synchronized') \
             FROM backfill_repos b LEFT JOIN actors a ON a.did = b.did \
             LEFT JOIN resync_queue q ON q.did = b.did WHERE b.relay = $1",
            &[&relay],
        )
        .await?;
    let n = |i: usize| -> Result<u64, tokio_postgres::Error> {
        Ok(row.try_get::<_, i64>(i)?.max(0) as u64)
    };
    let (listed, inactive, done, failed) = (n(0)?, n(1)?, n(2)?, n(3)?);
    let status = Status {
        listed,
        done,
        inactive,
        pending: listed.saturating_sub(done + failed + inactive),
    };
    progress.listed.store(listed, Ordering::Relaxed);
    progress.done.store(done, Ordering::Relaxed);
    progress.failed.store(failed, Ordering::Relaxed);
    progress.inactive.store(inactive, Ordering::Relaxed);
    progress.records.store(
        stats.records_written.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    metrics::gauge!(m::BACKFILL_REPOS_LISTED).set(listed as f64);
    for (outcome, v) in [
        ("done", done),
        ("failed", failed),
        ("inactive", inactive),
        ("pending", status.pending),
    ] {
        metrics::gauge!(m::BACKFILL_REPOS, "outcome" => outcome).set(v as f64);
    }
    Ok(status)
}

/// Marks the run finished and lists the repos given up, with their reasons.
async fn finish(pool: &Pool, relay: &str, status: Status) -> Result<Report, BackfillError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE backfill_runs SET finished_at = now(), updated_at = now() WHERE relay = $1",
            &[&relay],
        )
        .await?;
    let rows = client
        .query(
            "SELECT b.did, COALESCE(a.sync_reason, a.sync_state, 'no actor row') \
             FROM backfill_repos b LEFT JOIN actors a ON a.did = b.did \
             LEFT JOIN resync_queue q ON q.did = b.did \
             WHERE b.relay = $1 AND b.status IS NULL AND q.did IS NULL \
               AND a.sync_state IS DISTINCT FROM 'synchronized' ORDER BY 1",
            &[&relay],
        )
        .await?;
    let failed = rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(String, String)>, tokio_postgres::Error>>()?;
    info!(
        listed = status.listed,
        done = status.done,
        inactive = status.inactive,
        failed = failed.len(),
        "backfill finished"
    );
    Ok(Report {
        listed: status.listed,
        done: status.done,
        inactive: status.inactive,
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_count_runs_at_once_then_as_often_as_its_cost_allows() {
        let mut p = CountPeriod::default();
        assert!(p.due(), "the first count is due at once");
        p.counted(Duration::from_millis(1));
        assert_eq!(p.every, CHECK_PERIOD, "a cheap count: every check");
        assert!(!p.due());
        p.counted(Duration::from_secs(2));
        assert_eq!(p.every, Duration::from_secs(40), "5 % of the time");
        p.counted(Duration::from_secs(60));
        assert_eq!(p.every, MAX_COUNT_PERIOD);
    }
}
