//! `run`: the daemon. Competes for the Redis lease (§7); as leader, claims the fence in the
//! database, then streams the relay into the pipeline (§2–§4) until shutdown, loss of the lease,
//! or a failure; as standby, polls until the lease is free.
//!
//! One leader term:
//! ```text
//! acquire lease (fence F) ─▶ claim F in firehose_cursor (RETURNING seq) ─▶ relay client ─▶ pipeline
//!                                                           ▲                                │
//!                                                           └──── durable cursor (watch) ◀───┘
//! ```
//! - The claim (`fence = F WHERE fence < F`) is the serialisation point: once it committed, every
//!   batch of an older leader fails its cursor update (`WriteError::Fenced`) and rolls back.
//!   The resume cursor is the one the claim returned, read under the same row lock.
//! - `seq = -1` ([`NO_CURSOR`]) in `firehose_cursor` means "fence claimed, nothing applied yet";
//!   the client then live-tails.
//! - Lease lost: the term's tasks are aborted at once (no drain; an open transaction rolls
//!   back) and the instance becomes a standby.
//! - Fenced by a newer leader: the same, and the lease is released if it is still ours.
//! - Shutdown: the relay client stops, the pipeline drains and commits, the lease is released;
//!   all within the drain limit, else what is left is aborted and named in the log.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, watch};
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::db::{self, DbConfig, DbError};
use crate::firehose::client::{self, ClientConfig, ClientError};
use crate::leader::{Elector, LeaderConfig, LeaderError, Leadership};
use crate::pipeline::{self, Input, PipelineConfig, PipelineError, Stats};
use crate::txn::TxError;
use crate::writer::{CursorKey, WriteError};

/// `firehose_cursor.seq` of a row whose fence is claimed but which covers no event yet.
pub const NO_CURSOR: i64 = -1;
/// Default graceful-stop limit: well inside systemd's default 90 s stop timeout, long enough to
/// flush a full batch on a busy database.
pub const DEFAULT_DRAIN_LIMIT: Duration = Duration::from_secs(20);
/// Frames queued between the relay client and the pipeline (the pipeline has its own queues).
const FRAME_QUEUE: usize = 1_024;
/// How often the leader reports relay seq and cursor to Redis (for `status` and the lag gauge).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// A progress report outlives this many intervals, then `status` shows no lag.
const PROGRESS_TTL_INTERVALS: u32 = 10;
/// Part of the drain limit kept for releasing the lease after the pipeline drained.
const RELEASE_RESERVE: Duration = Duration::from_millis(1_000);

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub db: DbConfig,
    pub relay: ClientConfig,
    pub leader: LeaderConfig,
    /// Batch sizes and frame limit; `cursor` and `durable` are set per term.
    pub pipeline: PipelineConfig,
    /// Graceful stop limit (drain + commit + release). Default [`DEFAULT_DRAIN_LIMIT`].
    pub drain_limit: Duration,
    /// `firehose_cursor.service`; default: the relay's host (and port, if given).
    pub service: Option<String>,
}

impl AppConfig {
    pub fn new(db: DbConfig, relay: ClientConfig, leader: LeaderConfig) -> Self {
        Self {
            db,
            relay,
            leader,
            pipeline: PipelineConfig::new(CursorKey {
                service: String::new(),
                fence: 0,
            }),
            drain_limit: DEFAULT_DRAIN_LIMIT,
            service: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Leader(#[from] LeaderError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("claiming the fence in firehose_cursor: {0}")]
    Claim(#[from] tokio_postgres::Error),
    #[error("drain limit of {limit:?} passed; aborted: {pending}")]
    DrainTimeout { limit: Duration, pending: String },
    #[error("the relay client stopped unexpectedly")]
    ClientStopped,
    #[error("a task failed: {0}")]
    Task(String),
}

/// `firehose_cursor.service` for a relay URL: its host, with the port when one is given.
pub fn relay_service(relay_url: &str) -> Result<String, ClientError> {
    let bad = |why| ClientError::InvalidUrl {
        url: relay_url.to_owned(),
        why,
    };
    let rest = relay_url
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| bad("missing scheme"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    if host.is_empty() {
        return Err(bad("missing host"));
    }
    Ok(host.to_ascii_lowercase())
}

/// What `status` needs from `firehose_cursor`.
#[derive(Debug, Clone)]
pub struct CursorRow {
    pub service: String,
    /// `None` for [`NO_CURSOR`].
    pub seq: Option<i64>,
    pub fence: i64,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// All rows of `firehose_cursor`.
pub async fn cursors(pool: &Pool) -> Result<Vec<CursorRow>, AppError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let rows = client
        .query(
            "SELECT service, seq, fence, updated_at FROM firehose_cursor ORDER BY service",
            &[],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let seq: i64 = r.try_get(1)?;
        out.push(CursorRow {
            service: r.try_get(0)?,
            seq: (seq > 0).then_some(seq),
            fence: r.try_get(2)?,
            updated_at: r.try_get(3)?,
        });
    }
    Ok(out)
}

/// Outcome of claiming a fence.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Ours; resume after this seq (`None`: no cursor yet, live tail).
    Claimed(Option<i64>),
    /// The database already holds this fence or a larger one.
    Behind { db_fence: i64 },
}

/// Records `fence` as the newest in `firehose_cursor` for `service`, unless a fence at least as
/// large is there. Returns the durable cursor read under the same row lock.
pub async fn claim_fence(pool: &Pool, service: &str, fence: i64) -> Result<Claim, AppError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let row = client
        .query_opt(
            "INSERT INTO firehose_cursor AS c (service, seq, fence) VALUES ($1, $2, $3) \
             ON CONFLICT (service) DO UPDATE SET fence = excluded.fence \
             WHERE c.fence < excluded.fence RETURNING seq",
            &[&service, &NO_CURSOR, &fence],
        )
        .await?;
    if let Some(r) = row {
        let seq: i64 = r.try_get(0)?;
        return Ok(Claim::Claimed((seq > 0).then_some(seq)));
    }
    let db_fence: i64 = client
        .query_one(
            "SELECT fence FROM firehose_cursor WHERE service = $1",
            &[&service],
        )
        .await?
        .try_get(0)?;
    Ok(Claim::Behind { db_fence })
}

/// Runs the daemon until `shutdown` fires (then drains, commits, releases and returns `Ok`) or
/// a fatal error. Applies migrations first.
pub async fn run(cfg: AppConfig, shutdown: CancellationToken) -> Result<(), AppError> {
    client::install_crypto_provider();
    client::subscribe_url(&cfg.relay.relay_url, None)?;
    let service = match &cfg.service {
        Some(s) => s.clone(),
        None => relay_service(&cfg.relay.relay_url)?,
    };
    db::ensure_database(&cfg.db).await?;
    db::migrate(&cfg.db).await?;
    let pool = db::connect(&cfg.db).await?;
    let elector = Arc::new(Elector::connect(cfg.leader.clone()).await?);
    tracing::info!(
        service = %service,
        relay = %cfg.relay.relay_url,
        key_prefix = %cfg.leader.key_prefix,
        drain_limit_ms = cfg.drain_limit.as_millis() as u64,
        "atproto-ingest ready; competing for the leader lease"
    );
    // No-op unless started by systemd with Type=notify.
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let stats = Arc::new(Stats::default());
    loop {
        let leadership = match elector.acquire(&shutdown).await? {
            Some(l) => l,
            None => {
                tracing::info!("shutdown while standing by; exiting");
                return Ok(());
            }
        };
        let fence = leadership.fence;
        let resume = match claim_fence(&pool, &service, fence).await {
            Ok(Claim::Claimed(seq)) => seq,
            Ok(Claim::Behind { db_fence }) => {
                // Redis' fence counter is behind the database (Redis lost its data?), or a
                // newer leader claimed first. Raise the counter past the database and retry.
                tracing::error!(
                    fence,
                    db_fence,
                    "the database holds a fence at least as new as ours; raising the Redis fence counter and re-acquiring"
                );
                metrics::counter!("atproto_ingest_fence_claims_refused_total").increment(1);
                elector.raise_fence_floor(db_fence).await?;
                release(leadership, Duration::from_secs(2)).await;
                pause_or_shutdown(elector.config().poll_interval, &shutdown).await;
                continue;
            }
            Err(e) => {
                release(leadership, Duration::from_secs(2)).await;
                return Err(e);
            }
        };
        tracing::info!(service = %service, fence, cursor = ?resume, "leading: fence claimed; streaming from the relay");
        match term(
            &cfg,
            &pool,
            &elector,
            &service,
            &leadership,
            resume,
            &shutdown,
            &stats,
        )
        .await
        {
            TermEnd::Shutdown { deadline, result } => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
                let left = deadline.saturating_duration_since(Instant::now());
                release(leadership, left.max(Duration::from_millis(100))).await;
                if result.is_ok() {
                    tracing::info!(
                        cursor = stats.cursor.load(Ordering::Relaxed),
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
                metrics::counter!("atproto_ingest_fenced_total").increment(1);
                tracing::error!(
                    fence,
                    "fenced out by a newer leader: our last batch was rolled back; standing by"
                );
                release(leadership, Duration::from_secs(2)).await;
            }
            TermEnd::Failed(e) => {
                tracing::error!(fence, error = %e, "leader term failed; releasing the lease");
                release(leadership, Duration::from_secs(2)).await;
                return Err(e);
            }
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
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

enum TermEnd {
    Shutdown {
        deadline: Instant,
        result: Result<(), AppError>,
    },
    Lost,
    Fenced,
    Failed(AppError),
}

enum TaskOut {
    Client(Result<(), ClientError>),
    Pipeline(Result<(), PipelineError>),
    Progress,
}

/// One leader term: relay client, pipeline and progress reporter as named tasks.
#[allow(clippy::too_many_arguments)]
async fn term(
    cfg: &AppConfig,
    pool: &Pool,
    elector: &Arc<Elector>,
    service: &str,
    leadership: &Leadership,
    resume: Option<i64>,
    shutdown: &CancellationToken,
    stats: &Arc<Stats>,
) -> TermEnd {
    let term = shutdown.child_token();
    let (cursor_tx, cursor_rx) = watch::channel(resume);
    let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
    let mut pcfg = cfg.pipeline.clone();
    pcfg.cursor = CursorKey {
        service: service.to_owned(),
        fence: leadership.fence,
    };
    pcfg.durable = Some(cursor_tx);
    let mut tasks: JoinSet<TaskOut> = JoinSet::new();
    let mut names: HashMap<Id, &'static str> = HashMap::new();
    let client_run = client::run(
        cfg.relay.clone(),
        cursor_rx.clone(),
        frames_tx,
        term.clone(),
    );
    let h = tasks.spawn(async move { TaskOut::Client(client_run.await) });
    names.insert(h.id(), "relay client");
    let pipeline_run = pipeline::run(
        pool.clone(),
        pcfg,
        Input::Live(frames_rx),
        term.clone(),
        stats.clone(),
    );
    let h = tasks.spawn(async move { TaskOut::Pipeline(pipeline_run.await) });
    names.insert(h.id(), "pipeline (decode, batch, write)");
    let h = tasks.spawn(progress(
        elector.clone(),
        cfg.relay.seen_seq.clone(),
        cursor_rx,
        service.to_owned(),
        leadership.fence,
        term.clone(),
    ));
    names.insert(h.id(), "progress reporter");
    let mut tasks = Tasks { set: tasks, names };

    let lost = leadership.lost.clone();
    let end = tokio::select! {
        biased;
        _ = lost.cancelled() => None,
        _ = shutdown.cancelled() => Some(Ok(())),
        first = tasks.next() => Some(Err(first)),
    };
    match end {
        None => {
            term.cancel();
            tasks.abort_all().await;
            TermEnd::Lost
        }
        Some(Ok(())) => {
            // Graceful: `term` is a child of `shutdown`, so the client stopped reading and the
            // pipeline is draining.
            let deadline = Instant::now() + cfg.drain_limit;
            let drain_until = deadline - RELEASE_RESERVE.min(cfg.drain_limit / 4);
            let result = tokio::select! {
                biased;
                _ = lost.cancelled() => {
                    tasks.abort_all().await;
                    return TermEnd::Lost;
                }
                r = tokio::time::timeout_at(drain_until, tasks.drain()) => r,
            };
            let result = match result {
                Ok(r) => r,
                Err(_) => {
                    let pending = tasks.pending();
                    tracing::error!(limit_ms = cfg.drain_limit.as_millis() as u64, pending = %pending, "drain limit passed; aborting the tasks that did not stop");
                    tasks.abort_all().await;
                    Err(AppError::DrainTimeout {
                        limit: cfg.drain_limit,
                        pending,
                    })
                }
            };
            TermEnd::Shutdown { deadline, result }
        }
        Some(Err((name, mut out))) => {
            // A task ended on its own. A failing pipeline cancels `term` itself, so the
            // relay client or the progress reporter may end first: then wait (bounded) for the
            // pipeline's result, which is what decides.
            term.cancel();
            if !matches!(out, Ok(TaskOut::Pipeline(_)) | Err(_)) {
                let wait = tokio::time::timeout(cfg.drain_limit, async {
                    loop {
                        match tasks.next().await {
                            (_, r @ Ok(TaskOut::Pipeline(_))) | (_, r @ Err(_)) => return r,
                            _ => {}
                        }
                    }
                });
                tokio::select! {
                    biased;
                    _ = lost.cancelled() => {}
                    r = wait => if let Ok(r) = r { out = r },
                }
            }
            tasks.abort_all().await;
            match out {
                Ok(TaskOut::Pipeline(Err(PipelineError::Write(TxError::Permanent {
                    source: WriteError::Fenced { .. },
                    ..
                })))) => TermEnd::Fenced,
                _ if lost.is_cancelled() => TermEnd::Lost,
                Ok(TaskOut::Pipeline(Err(e))) => TermEnd::Failed(e.into()),
                Ok(TaskOut::Client(Err(e))) => TermEnd::Failed(e.into()),
                Ok(_) if shutdown.is_cancelled() => TermEnd::Shutdown {
                    deadline: Instant::now() + RELEASE_RESERVE,
                    result: Ok(()),
                },
                Ok(_) => TermEnd::Failed(AppError::Task(format!("{name} stopped unexpectedly"))),
                Err(e) => TermEnd::Failed(AppError::Task(format!("{name}: {e}"))),
            }
        }
    }
}

/// A JoinSet whose tasks have names, for "which tasks did not stop".
struct Tasks {
    set: JoinSet<TaskOut>,
    names: HashMap<Id, &'static str>,
}

impl Tasks {
    /// The next task to end, with its name.
    async fn next(&mut self) -> (&'static str, Result<TaskOut, tokio::task::JoinError>) {
        match self.set.join_next_with_id().await {
            Some(Ok((id, out))) => (self.names.remove(&id).unwrap_or("task"), Ok(out)),
            Some(Err(e)) => (self.names.remove(&e.id()).unwrap_or("task"), Err(e)),
            // Empty set: never happens while a term runs; wait forever like an idle task.
            None => std::future::pending().await,
        }
    }

    /// Waits for every task; the first error wins.
    async fn drain(&mut self) -> Result<(), AppError> {
        let mut result = Ok(());
        while let Some(r) = self.set.join_next_with_id().await {
            let out = match r {
                Ok((id, out)) => {
                    self.names.remove(&id);
                    out
                }
                Err(e) => {
                    let name = self.names.remove(&e.id()).unwrap_or("task");
                    if result.is_ok() {
                        result = Err(AppError::Task(format!("{name}: {e}")));
                    }
                    continue;
                }
            };
            let err = match out {
                TaskOut::Pipeline(Err(e)) => Some(AppError::from(e)),
                TaskOut::Client(Err(e)) => Some(AppError::from(e)),
                _ => None,
            };
            if let (Some(e), true) = (err, result.is_ok()) {
                result = Err(e);
            }
        }
        result
    }

    /// Names of the tasks still running.
    fn pending(&self) -> String {
        let mut v: Vec<&str> = self.names.values().copied().collect();
        v.sort_unstable();
        v.join(", ")
    }

    async fn abort_all(&mut self) {
        self.set.abort_all();
        while self.set.join_next().await.is_some() {}
        self.names.clear();
    }
}

/// Reports relay seq, durable cursor and lag every [`PROGRESS_INTERVAL`] (gauge + Redis).
async fn progress(
    elector: Arc<Elector>,
    seen: Arc<std::sync::atomic::AtomicI64>,
    cursor: watch::Receiver<Option<i64>>,
    service: String,
    fence: i64,
    cancel: CancellationToken,
) -> TaskOut {
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return TaskOut::Progress,
            _ = tick.tick() => {}
        }
        let relay_seq = seen.load(Ordering::Relaxed);
        let durable = *cursor.borrow();
        let lag = match (relay_seq, durable) {
            (r, Some(c)) if r > 0 => Some((r - c).max(0)),
            _ => None,
        };
        if let Some(l) = lag {
            metrics::gauge!("atproto_ingest_relay_lag_events").set(l as f64);
        }
        let json = serde_json::json!({
            "service": service,
            "fence": fence,
            "relay_seq": (relay_seq > 0).then_some(relay_seq),
            "cursor": durable,
            "lag_events": lag,
            "at": chrono::Utc::now().to_rfc3339(),
        })
        .to_string();
        if let Err(e) = elector
            .publish_progress(&json, PROGRESS_INTERVAL * PROGRESS_TTL_INTERVALS)
            .await
        {
            tracing::debug!(error = %e, "progress report to Redis failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_is_the_relay_host() {
        assert_eq!(
            relay_service("wss://relay1.us-east.bsky.network").unwrap(),
            "relay1.us-east.bsky.network"
        );
        assert_eq!(
            relay_service("wss://Relay.Example/xrpc/x?cursor=1").unwrap(),
            "relay.example"
        );
        assert_eq!(
            relay_service("ws://127.0.0.1:9000").unwrap(),
            "127.0.0.1:9000"
        );
        assert_eq!(relay_service("ws://u:p@h:1/").unwrap(), "h:1");
        assert!(relay_service("relay.example").is_err());
        assert!(relay_service("wss:///x").is_err());
    }
}
