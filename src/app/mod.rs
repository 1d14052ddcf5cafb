//! `run`: the daemon. Competes for the Redis lease (§7); as leader, claims the fence in the
//! database, then streams the relay into the pipeline (§2–§4) until shutdown, loss of the lease,
//! or a failure; as standby, polls until the lease is free.
//!
//! Process tasks (one [`Tasks`] registry under the root token; the first to fail stops the rest):
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
//! - `seq = -1` ([`crate::cursor::NO_CURSOR`]) in `firehose_cursor` means "fence claimed, nothing applied yet";
//!   the client then live-tails.
//! - Lease lost: the term's tasks are aborted at once (no drain; an open transaction rolls
//!   back) and the instance becomes a standby.
//! - Fenced by a newer leader: the same, and the lease is released if it is still ours.
//! - Shutdown: the relay client stops, the pipeline drains and commits, the lease is released;
//!   all within the drain limit, else what is left is aborted and named in the log.
//! - Health (`/readyz`, systemd): `starting` until migrations ran and the first lease decision
//!   is made (then `READY=1`), `leader` / `standby`, `draining` from the stop request on.
//!
//! Files: [`options`] (flags → [`AppConfig`]), `lead` (the leader loop), `term` (one leader
//! term's tasks and how it ends), `lifecycle` (role and readiness), `progress` (the leader's
//! progress report); this file wires the process tasks.

mod anchor;
mod lead;
mod lifecycle;
mod options;
mod progress;
mod term;

use std::net::SocketAddr;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::config::ConfigError;
use crate::cursor::{CursorError, CursorKey};
use crate::db::{self, redact_url, DbConfig, DbError};
use crate::firehose::client::{self, ClientConfig, ClientError};
use crate::http::{self, Health, HttpError, HttpState};
use crate::jobs::{self, JobsConfig};
use crate::leader::{Elector, LeaderConfig, LeaderError};
use crate::metrics as m;
use crate::notify;
use crate::pipeline::users::UsersError;
use crate::pipeline::{PipelineConfig, PipelineError, Stats};
use crate::pool_monitor::{self, PoolMonitor};
use crate::resync::ResyncConfig;
use crate::tasks::{TaskError, Tasks};

use lead::Ctx;
use lifecycle::Lifecycle;
use options::ms;
pub use options::{RunOptions, MIN_DRAIN_LIMIT, MIN_LEADER_TTL};

/// Default graceful-stop limit: well inside systemd's stop timeout (`TimeoutStopSec=30`), long
/// enough to flush a full batch on a busy database.
pub const DEFAULT_DRAIN_LIMIT: Duration = Duration::from_secs(20);
/// How long the process-wide background tasks (HTTP, pool monitor, …) get to stop once the
/// leader loop has ended; they only need to notice the token (HTTP finishes open requests).
pub const BACKGROUND_STOP_LIMIT: Duration = Duration::from_secs(2);

/// Daemon settings.
#[derive(Clone)]
pub struct AppConfig {
    pub db: DbConfig,
    /// Relay client settings. The counter of seqs seen is a live handle: `run` owns one for
    /// the process and hands it to each term's client.
    pub relay: ClientConfig,
    pub leader: LeaderConfig,
    /// Batch sizes, frame limit and users stage; `cursor` is set per term. The user creator and
    /// the durable-cursor channel are live handles that `run` builds and passes to each term.
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
    /// Leader-only resync workers (§12); `None`: repos are queued but not resynced here.
    pub resync: Option<ResyncConfig>,
    /// While leading, also backfill the relay's repos (§13) through the resync workers.
    pub backfill: bool,
    /// Where the backfill enumerates repos; `None`: the relay.
    pub backfill_url: Option<String>,
    /// The first start's resume point when no cursor is stored (`Some(0)`: the oldest event
    /// the relay has); `None`: the live tail. Ignored once a cursor is stored (§4).
    pub start_cursor: Option<i64>,
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
            .field("resync", &self.resync)
            .field("backfill", &self.backfill)
            .field(
                "backfill_url",
                &self.backfill_url.as_deref().map(redact_url),
            )
            .field("start_cursor", &self.start_cursor)
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
            reresolve_interval: jobs::DEFAULT_RERESOLVE_INTERVAL,
            resync: None,
            backfill: false,
            backfill_url: None,
            start_cursor: None,
        }
    }
}

/// `run` from the command line: validates the options, installs the SIGTERM/SIGINT handlers
/// (first: graceful stop; second: exit at once) and runs the daemon until it stops.
pub(crate) async fn run_command(opts: &RunOptions) -> Result<(), AppError> {
    let cfg = opts.to_config()?;
    let shutdown = CancellationToken::new();
    let _signals = crate::signals::install(shutdown.clone()).map_err(AppError::Signals)?;
    run(cfg, shutdown).await
}

/// Why the daemon stopped with an error. Each variant names the step that failed.
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
    #[error(transparent)]
    Cursor(#[from] CursorError),
    #[error(transparent)]
    Anchor(#[from] crate::cursor::AnchorError),
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("resync workers: {0}")]
    Resync(#[source] crate::identity::IdentityError),
    /// A task panicked, stopped unexpectedly, or did not stop within its limit.
    #[error(transparent)]
    Task(#[from] TaskError),
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

/// Runs the daemon until `shutdown` fires (then drains, commits, releases and returns `Ok`) or
/// a fatal error. Applies migrations first. A background task that fails (HTTP server error,
/// panic) stops the daemon the same graceful way, and its error is returned.
pub async fn run(cfg: AppConfig, shutdown: CancellationToken) -> Result<(), AppError> {
    client::install_crypto_provider();
    client::subscribe_url(&cfg.relay.relay_url, None)?;
    let service = match &cfg.service {
        Some(s) => s.clone(),
        None => relay_service(&cfg.relay.relay_url)?,
    };
    // One creator for every term's users stage and the re-resolution job: one semaphore, one
    // cache.
    let creator = cfg.pipeline.users.creator()?;
    let health = Health::new();
    db::prepare(&cfg.db).await?;
    let pool = db::connect(&cfg.db).await?;
    let elector = Arc::new(Elector::connect(cfg.leader.clone()).await?);
    let mut bg: Tasks<AppError> = Tasks::new(shutdown.child_token());
    let root = bg.token().clone();
    let metrics_handle = m::install();
    {
        let (h, c) = (metrics_handle.clone(), root.clone());
        bg.spawn("metrics upkeep", async move {
            m::run_upkeep(h, c).await;
            Ok(())
        });
    }
    if let Some(addr) = cfg.http_addr {
        let state = HttpState {
            health: health.clone(),
            metrics: metrics_handle,
            pool: pool.clone(),
        };
        let (_bound, server) = http::serve(addr, state, root.clone()).await?;
        // Aborting the registry's task aborts the server's own task too.
        let server = AbortOnDropHandle::new(server);
        bg.spawn("HTTP server", async move {
            let served = server.await.map_err(|source| TaskError::Join {
                name: "HTTP server",
                source,
            })?;
            Ok(served?)
        });
    }
    {
        let monitor = PoolMonitor::new(pool.clone(), cfg.pool_monitor_interval);
        let c = root.clone();
        bg.spawn("pool monitor", async move {
            monitor.run(c).await;
            Ok(())
        });
    }
    {
        let c = root.clone();
        bg.spawn("systemd watchdog", async move {
            notify::run_watchdog(c).await;
            Ok(())
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
    let ctx = Ctx {
        cfg: &cfg,
        pool: &pool,
        elector: &elector,
        service: &service,
        life: &life,
        shutdown: &root,
        creator: creator.as_ref(),
        seen_seq: Arc::new(AtomicI64::new(-1)),
        stats: Arc::new(Stats::default()),
    };
    let leading = lead::lead(&ctx);
    tokio::pin!(leading);
    let mut failed: Option<AppError> = None;
    let result = loop {
        tokio::select! {
            r = &mut leading => break r,
            ended = bg.next() => {
                let name = ended.name;
                match ended.into_result() {
                    Ok(()) => tracing::debug!(task = name, "background task ended"),
                    // The registry cancelled `root`: the leader loop stops gracefully.
                    Err(e) if failed.is_none() => {
                        tracing::error!(task = name, error = %e, "a background task failed; stopping gracefully");
                        failed = Some(e);
                    }
                    Err(e) => tracing::warn!(task = name, error = %e, "another background task failed"),
                }
            }
        }
    };
    life.draining();
    match bg.drain(Instant::now() + BACKGROUND_STOP_LIMIT).await {
        Ok(()) | Err(AppError::Task(TaskError::Unfinished { .. })) => {}
        Err(e) => {
            tracing::warn!(error = %e, "a background task ended with an error while stopping")
        }
    }
    match (failed, result) {
        (Some(e), _) => Err(e),
        (None, r) => r,
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
