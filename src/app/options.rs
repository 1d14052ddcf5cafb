//! The options of `run`: flags with their environment variables and defaults, checked once into
//! an [`AppConfig`]; a bad value stops start-up with one line naming the flag, the variable and
//! the value (passwords redacted).

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{check, BatchArgs, ConfigError, DbArgs};
use crate::db::redact_url;
use crate::firehose::client::{self, ClientConfig};
use crate::http;
use crate::jobs::{self, JobsConfig};
use crate::leader::{self, LeaderConfig};
use crate::pipeline::users;
use crate::pipeline::UsersArgs;
use crate::pool_monitor;

use super::{relay_service, AppConfig, AppError, DEFAULT_DRAIN_LIMIT};

/// Shortest lease TTL accepted on the command line: below it renewals (every TTL/3) race
/// ordinary Redis and scheduling latency.
pub const MIN_LEADER_TTL: Duration = Duration::from_millis(300);
/// Shortest drain limit accepted on the command line.
pub const MIN_DRAIN_LIMIT: Duration = Duration::from_millis(100);
/// Standby poll interval as a fraction of the lease TTL (takeover within one TTL).
const POLL_DIVISOR: u32 = 3;

pub(crate) const fn ms(d: Duration) -> u64 {
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
    #[command(flatten)]
    pub verify: crate::pipeline::VerifyArgs,
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
    #[arg(long, env = "RERESOLVE_INTERVAL_MS", value_name = "MS", default_value_t = ms(jobs::DEFAULT_RERESOLVE_INTERVAL))]
    pub reresolve_interval_ms: u64,
    /// Resync repos found out of sync (damaged commits, broken chains, backfill) from their
    /// PDS while leading (`--resync=false`: they stay queued for another instance or later).
    #[arg(
        long,
        env = "RESYNC",
        num_args = 0..=1,
        default_value_t = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub resync: bool,
    #[command(flatten)]
    pub resync_args: crate::resync::ResyncArgs,
    /// While leading, also backfill the relay's repos (`listRepos`, resumed where it stopped)
    /// through the resync workers, as the `backfill` command does; live ingestion continues.
    #[arg(long, env = "BACKFILL")]
    pub backfill: bool,
    /// Where `--backfill` enumerates repos (`listRepos`); default: the relay.
    #[arg(long, env = "BACKFILL_URL", value_name = "URL", hide_env_values = true)]
    pub backfill_url: Option<String>,
    /// Where a first start begins when this relay has no stored cursor: resume after seq N
    /// (`0`: from the oldest event the relay still has). Without it a first start reads the
    /// live tail. Made durable at once; ignored (and logged) once a cursor is stored.
    #[arg(long, env = "START_CURSOR", value_name = "N")]
    pub start_cursor: Option<i64>,
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
        pipeline.set_users(
            self.users
                .to_config(users::DEFAULT_RESOLVE_IDENTITIES_RUN)?,
        );
        pipeline.verify_commits = self
            .verify
            .enabled(crate::pipeline::DEFAULT_VERIFY_COMMITS_RUN);
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
        if let Some(n) = self.start_cursor {
            check(
                n >= 0,
                "--start-cursor",
                "START_CURSOR",
                "must be at least 0 (0: the oldest event the relay has)",
                n,
            )?;
        }
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
        check(
            self.resync || !self.backfill,
            "--backfill",
            "BACKFILL",
            "needs the resync workers (--resync)",
            self.backfill,
        )?;
        cfg.resync = match self.resync {
            true => Some(self.resync_args.to_config(&cfg.pipeline.retry)?),
            false => None,
        };
        cfg.backfill = self.backfill;
        if let Some(url) = &self.backfill_url {
            let base = crate::resync::backfill::http_base(url);
            check(
                base.starts_with("http://") || base.starts_with("https://"),
                "--backfill-url",
                "BACKFILL_URL",
                "must be a ws(s):// or http(s):// URL",
                redact_url(url),
            )?;
        }
        cfg.backfill_url = self.backfill_url.clone();
        cfg.start_cursor = self.start_cursor;
        Ok(cfg)
    }
}
