//! `run`: the daemon. Competes for the Redis lease (§7); as leader, claims the fence in the
//! database, then streams the relay into the pipeline (§2–§4) until shutdown, loss of the lease,
//! or a failure; as standby, polls until the lease is free.
//!
//! Process tasks (all under one root token; the first to fail stops the rest):
//! ```text
//! metrics upkeep · HTTP (/metrics /healthz /readyz) · pool monitor · systemd watchdog
//! leader loop ─▶ term (leader only): relay client ─▶ pipeline ─▶ durable cursor
//!                                    progress reporter · cleanup jobs · stub re-resolution
//! ```
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
//! - Health (`/readyz`, systemd): `starting` until migrations ran and the first lease decision
//!   is made (then `READY=1`), `leader` / `standby`, `draining` from the stop request on.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, watch};
use tokio::task::{Id, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{check, BatchArgs, ConfigError, DbArgs};
use crate::db::{self, redact_url, DbConfig, DbError};
use crate::firehose::client::{self, ClientConfig, ClientError};
use crate::http::{self, Health, HttpError, HttpState, Role};
use crate::identity::UserCreator;
use crate::jobs::{self, JobsConfig};
use crate::leader::{self, Elector, LeaderConfig, LeaderError, Leadership};
use crate::metrics as m;
use crate::notify;
use crate::pipeline::users::{self, UsersError};
use crate::pipeline::{self, Input, PipelineConfig, PipelineError, Stats, UsersArgs};
use crate::pool_monitor::{self, PoolMonitor};
use crate::txn::TxError;
use crate::writer::{CursorKey, WriteError};

/// `firehose_cursor.seq` of a row whose fence is claimed but which covers no event yet.
pub const NO_CURSOR: i64 = -1;
/// Default graceful-stop limit: well inside systemd's stop timeout (`TimeoutStopSec=30`), long
/// enough to flush a full batch on a busy database.
pub const DEFAULT_DRAIN_LIMIT: Duration = Duration::from_secs(20);
/// Shortest lease TTL accepted on the command line: below it renewals (every TTL/3) race
/// ordinary Redis and scheduling latency.
pub const MIN_LEADER_TTL: Duration = Duration::from_millis(300);
/// Shortest drain limit accepted on the command line.
pub const MIN_DRAIN_LIMIT: Duration = Duration::from_millis(100);
/// How long the process-wide background tasks (HTTP, pool monitor, …) get to stop once the
/// leader loop has ended; they only need to notice the token (HTTP finishes open requests).
pub const BACKGROUND_STOP_LIMIT: Duration = Duration::from_secs(2);
/// Frames queued between the relay client and the pipeline (the pipeline has its own queues).
const FRAME_QUEUE: usize = 1_024;
/// How often the leader reports relay seq and cursor to Redis (for `status` and the lag gauge).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// A progress report outlives this many intervals, then `status` shows no lag.
const PROGRESS_TTL_INTERVALS: u32 = 10;
/// Part of the drain limit kept for releasing the lease after the pipeline drained.
const RELEASE_RESERVE: Duration = Duration::from_millis(1_000);
/// Limit on releasing the lease outside a graceful stop (step-down, failure).
const RELEASE_LIMIT: Duration = Duration::from_secs(2);
/// Standby poll interval as a fraction of the lease TTL (takeover within one TTL).
const POLL_DIVISOR: u32 = 3;

/// Daemon settings.
#[derive(Clone)]
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
    /// `/metrics`, `/healthz`, `/readyz` listen address (port 0: any free port, logged);
    /// `None`: no HTTP server (in-process tests).
    pub http_addr: Option<SocketAddr>,
    /// Pool monitor sampling interval. Default [`pool_monitor::DEFAULT_INTERVAL`].
    pub pool_monitor_interval: Duration,
    /// Leader-only cleanup jobs.
    pub jobs: JobsConfig,
    /// Leader-only re-resolution of stub users (when identity resolution is on).
    pub reresolve_interval: Duration,
}

impl std::fmt::Debug for AppConfig {
    /// URLs with their passwords redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppConfig")
            .field("db", &self.db)
            .field("relay_url", &redact_url(&self.relay.relay_url))
            .field("redis_url", &redact_url(&self.leader.redis_url))
            .field("key_prefix", &self.leader.key_prefix)
            .field("ttl", &self.leader.ttl)
            .field("poll_interval", &self.leader.poll_interval)
            .field("batch_max_ops", &self.pipeline.batch_max_ops)
            .field("batch_max_age", &self.pipeline.batch_max_age)
            .field("resolve_identities", &self.pipeline.users.enabled())
            .field("drain_limit", &self.drain_limit)
            .field("service", &self.service)
            .field("http_addr", &self.http_addr)
            .field("pool_monitor_interval", &self.pool_monitor_interval)
            .field("jobs", &self.jobs)
            .field("reresolve_interval", &self.reresolve_interval)
            .finish()
    }
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
            http_addr: None,
            pool_monitor_interval: pool_monitor::DEFAULT_INTERVAL,
            jobs: JobsConfig::default(),
            reresolve_interval: users::DEFAULT_RERESOLVE_INTERVAL,
        }
    }
}

const fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Options of `run`. Every flag falls back to its environment variable; values are checked at
/// start and a bad one stops the process with one line naming the flag, the variable and the
/// value (passwords redacted).
#[derive(Clone, clap::Args)]
pub struct RunOptions {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(flatten)]
    pub batch: BatchArgs,
    #[command(flatten)]
    pub users: UsersArgs,
    /// Relay to read `com.atproto.sync.subscribeRepos` from (`wss://`, `ws://`; `https://` and
    /// `http://` are mapped).
    #[arg(long, env = "RELAY_URL", value_name = "URL", default_value = client::DEFAULT_RELAY_URL, hide_env_values = true)]
    pub relay_url: String,
    /// Name of this relay's row in `firehose_cursor`. Default: the relay URL's host[:port].
    #[arg(long, env = "CURSOR_SERVICE", value_name = "NAME")]
    pub cursor_service: Option<String>,
    /// Redis for the leader lease and fencing counter (one instance ingests at a time).
    #[arg(long, env = "REDIS_URL", value_name = "URL", default_value = leader::DEFAULT_REDIS_URL, hide_env_values = true)]
    pub redis_url: String,
    /// Prefix of the Redis keys (`<prefix>leader`, `<prefix>fence`, `<prefix>progress`).
    /// Instances with the same prefix compete for one lease.
    #[arg(long, env = "LEADER_KEY_PREFIX", value_name = "PREFIX", default_value = leader::DEFAULT_KEY_PREFIX)]
    pub leader_key_prefix: String,
    /// Lease time-to-live in milliseconds (at least 300). The leader renews every TTL/3; a
    /// standby polls every TTL/3 and takes over within one TTL of a crash.
    #[arg(long, env = "LEADER_TTL_MS", value_name = "MS", default_value_t = ms(leader::DEFAULT_TTL))]
    pub leader_ttl_ms: u64,
    /// Graceful-stop limit in milliseconds: after SIGTERM/SIGINT, stop reading, flush and
    /// commit, release the lease; past it the remaining tasks are aborted (and named in the
    /// log) and the exit code is 1. Keep it below systemd's `TimeoutStopSec`.
    #[arg(long, env = "DRAIN_LIMIT_MS", value_name = "MS", default_value_t = ms(DEFAULT_DRAIN_LIMIT))]
    pub drain_limit_ms: u64,
    /// Listen address of `/metrics`, `/healthz` and `/readyz` (port 0: any free port, logged).
    #[arg(long, env = "HTTP_ADDR", value_name = "ADDR", default_value = http::DEFAULT_HTTP_ADDR)]
    pub http_addr: String,
    /// Pool monitor sampling interval in milliseconds (WARNING at 80 %, CRITICAL at 95 %
    /// utilization).
    #[arg(long, env = "POOL_MONITOR_INTERVAL_MS", value_name = "MS", default_value_t = ms(pool_monitor::DEFAULT_INTERVAL))]
    pub pool_monitor_interval_ms: u64,
    /// Expired-session cleanup interval in milliseconds (leader only; first run at start).
    #[arg(long, env = "SESSION_CLEANUP_INTERVAL_MS", value_name = "MS", default_value_t = ms(jobs::DEFAULT_SESSIONS_INTERVAL))]
    pub session_cleanup_interval_ms: u64,
    /// Expired OAuth-state cleanup interval in milliseconds (leader only; first run at start).
    #[arg(long, env = "OAUTH_CLEANUP_INTERVAL_MS", value_name = "MS", default_value_t = ms(jobs::DEFAULT_OAUTH_STATES_INTERVAL))]
    pub oauth_cleanup_interval_ms: u64,
    /// Rows deleted per cleanup statement (bounded batches: no long row locks).
    #[arg(long, env = "CLEANUP_BATCH", value_name = "N", default_value_t = jobs::DEFAULT_BATCH_SIZE)]
    pub cleanup_batch: i64,
    /// How often stub users (identity not resolved yet) are retried, in milliseconds (leader
    /// only, with identity resolution on).
    #[arg(long, env = "RERESOLVE_INTERVAL_MS", value_name = "MS", default_value_t = ms(users::DEFAULT_RERESOLVE_INTERVAL))]
    pub reresolve_interval_ms: u64,
}

impl std::fmt::Debug for RunOptions {
    /// URLs with their passwords redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("database_url", &redact_url(&self.db.database_url))
            .field("relay_url", &redact_url(&self.relay_url))
            .field("redis_url", &redact_url(&self.redis_url))
            .field("leader_key_prefix", &self.leader_key_prefix)
            .field("leader_ttl_ms", &self.leader_ttl_ms)
            .field("drain_limit_ms", &self.drain_limit_ms)
            .field("http_addr", &self.http_addr)
            .finish_non_exhaustive()
    }
}

fn at_least(
    v: u64,
    min: Duration,
    flag: &'static str,
    env: &'static str,
    problem: &'static str,
) -> Result<Duration, ConfigError> {
    check(v >= ms(min), flag, env, problem, v)?;
    Ok(Duration::from_millis(v))
}

impl RunOptions {
    /// The validated daemon settings.
    pub fn to_config(&self) -> Result<AppConfig, AppError> {
        let db = self.db.db_config()?;
        let mut pipeline = self.batch.pipeline_config(&self.db)?;
        pipeline.users = self
            .users
            .to_config(users::DEFAULT_RESOLVE_IDENTITIES_RUN)?;
        check(
            client::subscribe_url(&self.relay_url, None).is_ok()
                && relay_service(&self.relay_url).is_ok(),
            "--relay-url",
            "RELAY_URL",
            "is not a relay URL (wss://host[:port], ws://, https://, http://; no query)",
            redact_url(&self.relay_url),
        )?;
        if let Some(s) = &self.cursor_service {
            check(
                !s.trim().is_empty(),
                "--cursor-service",
                "CURSOR_SERVICE",
                "must not be empty",
                s,
            )?;
        }
        check(
            crate::tls::redis_client(&self.redis_url).is_ok(),
            "--redis-url",
            "REDIS_URL",
            "is not a Redis URL (redis[s]://[user:password@]host:port[/db][?ssl_ca_certs=ca.pem]) or its CA file is unreadable",
            redact_url(&self.redis_url),
        )?;
        check(
            !self.leader_key_prefix.is_empty(),
            "--leader-key-prefix",
            "LEADER_KEY_PREFIX",
            "must not be empty",
            &self.leader_key_prefix,
        )?;
        let ttl = at_least(
            self.leader_ttl_ms,
            MIN_LEADER_TTL,
            "--leader-ttl-ms",
            "LEADER_TTL_MS",
            "must be at least 300",
        )?;
        let drain_limit = at_least(
            self.drain_limit_ms,
            MIN_DRAIN_LIMIT,
            "--drain-limit-ms",
            "DRAIN_LIMIT_MS",
            "must be at least 100",
        )?;
        let http_addr: Option<SocketAddr> = self.http_addr.parse().ok();
        check(
            http_addr.is_some(),
            "--http-addr",
            "HTTP_ADDR",
            "is not an IP:port address (e.g. 127.0.0.1:9464; port 0 picks a free port)",
            &self.http_addr,
        )?;
        let positive = |v: u64, flag, env| {
            at_least(v, Duration::from_millis(1), flag, env, "must be at least 1")
        };
        let pool_monitor_interval = positive(
            self.pool_monitor_interval_ms,
            "--pool-monitor-interval-ms",
            "POOL_MONITOR_INTERVAL_MS",
        )?;
        let sessions_interval = positive(
            self.session_cleanup_interval_ms,
            "--session-cleanup-interval-ms",
            "SESSION_CLEANUP_INTERVAL_MS",
        )?;
        let oauth_states_interval = positive(
            self.oauth_cleanup_interval_ms,
            "--oauth-cleanup-interval-ms",
            "OAUTH_CLEANUP_INTERVAL_MS",
        )?;
        let reresolve_interval = positive(
            self.reresolve_interval_ms,
            "--reresolve-interval-ms",
            "RERESOLVE_INTERVAL_MS",
        )?;
        check(
            self.cleanup_batch >= 1,
            "--cleanup-batch",
            "CLEANUP_BATCH",
            "must be at least 1",
            self.cleanup_batch,
        )?;
        let relay = ClientConfig {
            relay_url: self.relay_url.clone(),
            max_message_bytes: pipeline.max_frame_bytes,
            ..ClientConfig::default()
        };
        let leader = LeaderConfig {
            redis_url: self.redis_url.clone(),
            key_prefix: self.leader_key_prefix.clone(),
            ttl,
            poll_interval: ttl / POLL_DIVISOR,
        };
        let mut cfg = AppConfig::new(db, relay, leader);
        cfg.pipeline = pipeline;
        cfg.drain_limit = drain_limit;
        cfg.service = self.cursor_service.clone();
        cfg.http_addr = http_addr;
        cfg.pool_monitor_interval = pool_monitor_interval;
        cfg.jobs = JobsConfig {
            sessions_interval,
            oauth_states_interval,
            batch_size: self.cleanup_batch,
        };
        cfg.reresolve_interval = reresolve_interval;
        Ok(cfg)
    }
}

/// `run` from the command line: validates the options, installs the SIGTERM/SIGINT handlers
/// (first: graceful stop; second: exit at once) and runs the daemon until it stops.
pub async fn run_command(opts: &RunOptions) -> Result<(), AppError> {
    let cfg = opts.to_config()?;
    let shutdown = CancellationToken::new();
    crate::signals::install(shutdown.clone()).map_err(AppError::Signals)?;
    run(cfg, shutdown).await
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Users(#[from] UsersError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Leader(#[from] LeaderError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error("claiming the fence in firehose_cursor: {0}")]
    Claim(#[from] tokio_postgres::Error),
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
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

/// Role and readiness as seen by `/readyz` and systemd; every transition is logged once.
struct Lifecycle {
    health: Arc<Health>,
    ready_sent: AtomicBool,
    stopping_sent: AtomicBool,
}

impl Lifecycle {
    fn new(health: Arc<Health>) -> Self {
        Self {
            health,
            ready_sent: AtomicBool::new(false),
            stopping_sent: AtomicBool::new(false),
        }
    }

    /// Start-up is finished once the first lease decision is made: tell systemd (once).
    fn ready(&self) {
        if !self.ready_sent.swap(true, Ordering::AcqRel) {
            notify::ready();
        }
    }

    fn standby(&self) {
        if self.stopping_sent.load(Ordering::Acquire) {
            return;
        }
        self.health.set_role(Role::Standby);
        self.ready();
        notify::status("standby: waiting for the leader lease");
    }

    fn leader(&self, fence: i64, cursor: Option<i64>) {
        self.health.set_role(Role::Leader);
        if let Some(c) = cursor {
            self.health.set_cursor(c);
        }
        self.ready();
        notify::status(&format!("leader (fence {fence})"));
    }

    /// The stop request was seen: `/readyz` goes 503 and systemd hears `STOPPING=1` (once).
    fn draining(&self) {
        self.health.set_role(Role::Draining);
        if !self.stopping_sent.swap(true, Ordering::AcqRel) {
            notify::stopping();
        }
    }
}

/// Output of a process-wide background task.
enum BgOut {
    Done,
    Http(Result<Result<(), HttpError>, tokio::task::JoinError>),
}

/// Runs the daemon until `shutdown` fires (then drains, commits, releases and returns `Ok`) or
/// a fatal error. Applies migrations first. A background task that fails (HTTP server error,
/// panic) stops the daemon the same graceful way, and its error is returned.
pub async fn run(mut cfg: AppConfig, shutdown: CancellationToken) -> Result<(), AppError> {
    client::install_crypto_provider();
    client::subscribe_url(&cfg.relay.relay_url, None)?;
    let service = match &cfg.service {
        Some(s) => s.clone(),
        None => relay_service(&cfg.relay.relay_url)?,
    };
    // One creator for every term's users stage and the re-resolution job: one semaphore, one
    // cache.
    let creator = cfg.pipeline.users.creator()?;
    cfg.pipeline.users.creator = creator.clone();
    let health = Health::new();
    db::ensure_database(&cfg.db).await?;
    db::migrate(&cfg.db).await?;
    let pool = db::connect(&cfg.db).await?;
    let elector = Arc::new(Elector::connect(cfg.leader.clone()).await?);
    let root = shutdown.child_token();
    let metrics_handle = m::install();
    let mut bg: Tasks<BgOut> = Tasks::new();
    {
        let (h, c) = (metrics_handle.clone(), root.clone());
        bg.spawn("metrics upkeep", async move {
            m::run_upkeep(h, c).await;
            BgOut::Done
        });
    }
    if let Some(addr) = cfg.http_addr {
        let state = HttpState {
            health: health.clone(),
            metrics: metrics_handle,
            pool: pool.clone(),
        };
        let (_bound, server) = http::serve(addr, state, root.clone()).await?;
        bg.spawn("HTTP server", async move { BgOut::Http(server.await) });
    }
    {
        let monitor = PoolMonitor::new(pool.clone(), cfg.pool_monitor_interval);
        let c = root.clone();
        bg.spawn("pool monitor", async move {
            monitor.run(c).await;
            BgOut::Done
        });
    }
    {
        let c = root.clone();
        bg.spawn("systemd watchdog", async move {
            notify::run_watchdog(c).await;
            BgOut::Done
        });
    }
    tracing::info!(
        service = %service,
        relay = %redact_url(&cfg.relay.relay_url),
        redis = %redact_url(&cfg.leader.redis_url),
        key_prefix = %cfg.leader.key_prefix,
        ttl_ms = ms(cfg.leader.ttl),
        drain_limit_ms = ms(cfg.drain_limit),
        resolve_identities = creator.is_some(),
        "atproto-ingest started; competing for the leader lease"
    );
    let life = Lifecycle::new(health);
    let leading = lead(&cfg, &pool, &elector, &service, &life, &root, creator);
    tokio::pin!(leading);
    let mut failed: Option<AppError> = None;
    let result = loop {
        tokio::select! {
            r = &mut leading => break r,
            (name, out) = bg.next() => {
                let err = match out {
                    Ok(BgOut::Done) | Ok(BgOut::Http(Ok(Ok(())))) => {
                        tracing::debug!(task = name, "background task ended");
                        None
                    }
                    Ok(BgOut::Http(Ok(Err(e)))) => Some(AppError::Http(e)),
                    Ok(BgOut::Http(Err(e))) | Err(e) => Some(AppError::Task(format!("{name}: {e}"))),
                };
                if let (Some(e), None) = (err, &failed) {
                    tracing::error!(task = name, error = %e, "a background task failed; stopping gracefully");
                    failed = Some(e);
                    root.cancel();
                }
            }
        }
    };
    life.draining();
    root.cancel();
    let stopped = tokio::time::timeout(BACKGROUND_STOP_LIMIT, async {
        while let Some((name, out)) = bg.next_or_none().await {
            if let Ok(BgOut::Http(Ok(Err(e)))) = out {
                tracing::warn!(task = name, error = %e, "HTTP server ended with an error");
            }
        }
    })
    .await;
    if stopped.is_err() {
        tracing::error!(
            limit_ms = ms(BACKGROUND_STOP_LIMIT),
            pending = %bg.pending(),
            "background tasks did not stop in time; aborting them"
        );
        bg.abort_all().await;
    }
    match (failed, result) {
        (Some(e), _) => Err(e),
        (None, r) => r,
    }
}

/// The leader loop: stand by until the lease is ours, lead a term, repeat until shutdown.
async fn lead(
    cfg: &AppConfig,
    pool: &Pool,
    elector: &Arc<Elector>,
    service: &str,
    life: &Lifecycle,
    shutdown: &CancellationToken,
    creator: Option<UserCreator>,
) -> Result<(), AppError> {
    let stats = Arc::new(Stats::default());
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
        let resume = match claim_fence(pool, service, fence).await {
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
                return Err(e);
            }
        };
        life.leader(fence, resume);
        tracing::info!(service = %service, fence, cursor = ?resume, "leading: fence claimed; streaming from the relay");
        let ctx = TermCtx {
            cfg,
            pool,
            elector,
            service,
            life,
            shutdown,
            stats: &stats,
            creator: creator.as_ref(),
        };
        match term(&ctx, &leadership, resume).await {
            TermEnd::Shutdown { deadline, result } => {
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
    /// The progress reporter, cleanup jobs or re-resolution job (they only end when told to).
    Helper,
}

/// What a term needs from the daemon.
struct TermCtx<'a> {
    cfg: &'a AppConfig,
    pool: &'a Pool,
    elector: &'a Arc<Elector>,
    service: &'a str,
    life: &'a Lifecycle,
    shutdown: &'a CancellationToken,
    stats: &'a Arc<Stats>,
    creator: Option<&'a UserCreator>,
}

/// One leader term: relay client, pipeline, progress reporter, cleanup jobs and (with identity
/// resolution) stub re-resolution, as named tasks under the term's token.
async fn term(ctx: &TermCtx<'_>, leadership: &Leadership, resume: Option<i64>) -> TermEnd {
    let cfg = ctx.cfg;
    let shutdown = ctx.shutdown;
    let term = shutdown.child_token();
    let (cursor_tx, cursor_rx) = watch::channel(resume);
    let (frames_tx, frames_rx) = mpsc::channel(FRAME_QUEUE);
    let mut pcfg = cfg.pipeline.clone();
    pcfg.cursor = CursorKey {
        service: ctx.service.to_owned(),
        fence: leadership.fence,
    };
    pcfg.durable = Some(cursor_tx);
    let mut tasks: Tasks<TaskOut> = Tasks::new();
    let client_run = client::run(
        cfg.relay.clone(),
        cursor_rx.clone(),
        frames_tx,
        term.clone(),
    );
    tasks.spawn(
        "relay client",
        async move { TaskOut::Client(client_run.await) },
    );
    let pipeline_run = pipeline::run(
        ctx.pool.clone(),
        pcfg,
        Input::Live(frames_rx),
        term.clone(),
        ctx.stats.clone(),
    );
    tasks.spawn("pipeline (decode, batch, write)", async move {
        TaskOut::Pipeline(pipeline_run.await)
    });
    tasks.spawn(
        "progress reporter",
        progress(
            ctx.elector.clone(),
            cfg.relay.seen_seq.clone(),
            cursor_rx,
            ctx.life.health.clone(),
            ctx.service.to_owned(),
            leadership.fence,
            term.clone(),
        ),
    );
    let jobs_run = jobs::run(ctx.pool.clone(), cfg.jobs.clone(), term.clone());
    tasks.spawn("cleanup jobs", async move {
        jobs_run.await;
        TaskOut::Helper
    });
    if let Some(creator) = ctx.creator {
        let reresolve = users::run_reresolve(
            ctx.pool.clone(),
            creator.clone(),
            cfg.reresolve_interval,
            term.clone(),
        );
        tasks.spawn("stub re-resolution", async move {
            reresolve.await;
            TaskOut::Helper
        });
    }

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
            ctx.life.draining();
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
                    tracing::error!(limit_ms = ms(cfg.drain_limit), pending = %pending, "drain limit passed; aborting the tasks that did not stop");
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
            // relay client or a helper may end first: then wait (bounded) for the pipeline's
            // result, which is what decides.
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
                Ok(_) if shutdown.is_cancelled() => {
                    ctx.life.draining();
                    TermEnd::Shutdown {
                        deadline: Instant::now() + RELEASE_RESERVE,
                        result: Ok(()),
                    }
                }
                Ok(_) => TermEnd::Failed(AppError::Task(format!("{name} stopped unexpectedly"))),
                Err(e) => TermEnd::Failed(AppError::Task(format!("{name}: {e}"))),
            }
        }
    }
}

/// A JoinSet whose tasks have names, for "which tasks did not stop".
struct Tasks<T> {
    set: JoinSet<T>,
    names: HashMap<Id, &'static str>,
}

impl<T: Send + 'static> Tasks<T> {
    fn new() -> Self {
        Self {
            set: JoinSet::new(),
            names: HashMap::new(),
        }
    }

    fn spawn(&mut self, name: &'static str, fut: impl Future<Output = T> + Send + 'static) {
        let h = self.set.spawn(fut);
        self.names.insert(h.id(), name);
    }

    /// The next task to end, with its name; `None` once the set is empty.
    async fn next_or_none(&mut self) -> Option<(&'static str, Result<T, tokio::task::JoinError>)> {
        match self.set.join_next_with_id().await? {
            Ok((id, out)) => Some((self.names.remove(&id).unwrap_or("task"), Ok(out))),
            Err(e) => Some((self.names.remove(&e.id()).unwrap_or("task"), Err(e))),
        }
    }

    /// The next task to end, with its name; waits forever on an empty set (like an idle task).
    async fn next(&mut self) -> (&'static str, Result<T, tokio::task::JoinError>) {
        match self.next_or_none().await {
            Some(r) => r,
            None => std::future::pending().await,
        }
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

impl Tasks<TaskOut> {
    /// Waits for every task; the first error wins.
    async fn drain(&mut self) -> Result<(), AppError> {
        let mut result = Ok(());
        while let Some((name, r)) = self.next_or_none().await {
            let err = match r {
                Err(e) => Some(AppError::Task(format!("{name}: {e}"))),
                Ok(TaskOut::Pipeline(Err(e))) => Some(AppError::from(e)),
                Ok(TaskOut::Client(Err(e))) => Some(AppError::from(e)),
                Ok(_) => None,
            };
            if let (Some(e), true) = (err, result.is_ok()) {
                result = Err(e);
            }
        }
        result
    }
}

/// Reports relay seq, durable cursor and lag every [`PROGRESS_INTERVAL`] (health, gauge,
/// systemd status, Redis for `status`).
async fn progress(
    elector: Arc<Elector>,
    seen: Arc<std::sync::atomic::AtomicI64>,
    cursor: watch::Receiver<Option<i64>>,
    health: Arc<Health>,
    service: String,
    fence: i64,
    cancel: CancellationToken,
) -> TaskOut {
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return TaskOut::Helper,
            _ = tick.tick() => {}
        }
        let relay_seq = seen.load(Ordering::Relaxed);
        let durable = *cursor.borrow();
        if let Some(c) = durable {
            health.set_cursor(c);
        }
        let lag = match (relay_seq, durable) {
            (r, Some(c)) if r > 0 => Some((r - c).max(0)),
            _ => None,
        };
        if let Some(l) = lag {
            metrics::gauge!(m::LAG_EVENTS).set(l as f64);
        }
        notify::status(&match (durable, lag) {
            (Some(c), Some(l)) => format!("leader (fence {fence}), cursor {c}, lag {l} events"),
            (Some(c), None) => format!("leader (fence {fence}), cursor {c}"),
            _ => format!("leader (fence {fence}), no cursor yet"),
        });
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
