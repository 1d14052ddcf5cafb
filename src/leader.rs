//! Redis leader election (§7): one lease key held with a random token, renewed at ttl/3, a
//! monotonically increasing fencing token per acquisition, and a `lost` signal the moment the
//! lease can no longer be vouched for.
//!
//! Keys (under `key_prefix`):
//! - `{prefix}leader`: the lease, `SET NX PX ttl` with a random per-acquisition token.
//! - `{prefix}fence`: an `INCR` counter; its value at acquisition is the [`Leadership::fence`].
//! - `{prefix}progress`: what the leader last reported (relay seq seen, cursor), for `status`.
//!
//! The lease value is `host:pid:random`, so `status` can name the holder.
//!
//! The lease and the fence are taken in one Lua script, so fence order equals lease order: a
//! holder whose lease expired while it was paused can never own a larger fence than the holder
//! that replaced it. The writer stores the fence with the cursor and refuses to commit when a
//! larger fence has already written; that, not the lease alone, is what keeps a paused old
//! leader from overwriting a new leader's progress.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// Default lease TTL: long enough to ride out a Redis failover blip, short enough that a
/// standby takes over within seconds of a crash.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);
/// Default standby poll interval: ttl/3, so a standby notices a free lease well within one TTL.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(3_333);
/// Default key prefix; distinct deployments sharing a Redis must use distinct prefixes.
pub const DEFAULT_KEY_PREFIX: &str = "atproto-ingest:";
/// Default Redis URL.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
/// Upper bound on one Redis round trip outside renewal (connect, acquire, release).
const REDIS_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed renewal, retry this often (as a fraction of the TTL) until the lease expires.
const RENEW_RETRY_DIVISOR: u32 = 10;

/// `SET lease token NX PX ttl`, and on success `INCR fence` in the same atomic step.
/// Returns the new fence, or 0 when the lease is held by someone else.
const ACQUIRE_LUA: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"#;
/// Compare-and-extend: 1 if the lease was ours and is extended, 0 otherwise.
const RENEW_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;
/// Raises the fence counter to at least ARGV[1] (never lowers it); returns the new value.
const FENCE_FLOOR_LUA: &str = r#"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local floor = tonumber(ARGV[1])
if cur < floor then
  redis.call('SET', KEYS[1], ARGV[1])
  return floor
end
return cur
"#;
/// Compare-and-delete: 1 if the lease was ours and is deleted, 0 otherwise.
const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Leader election settings.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Redis URL (`redis://host:port/db`). Default [`DEFAULT_REDIS_URL`].
    pub redis_url: String,
    /// Prefix of the `leader` and `fence` keys. Default [`DEFAULT_KEY_PREFIX`].
    pub key_prefix: String,
    /// Lease TTL; renewed every ttl/3. Default [`DEFAULT_TTL`].
    pub ttl: Duration,
    /// Standby poll interval; must be at most ttl/3. Default [`DEFAULT_POLL_INTERVAL`].
    pub poll_interval: Duration,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        Self {
            redis_url: DEFAULT_REDIS_URL.to_owned(),
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            ttl: DEFAULT_TTL,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }
}

/// Leader election errors.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("invalid leader config: {0}")]
    Config(String),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("redis call timed out after {0:?}")]
    Timeout(Duration),
}

impl LeaderError {
    /// Whether retrying later may succeed (Redis down or slow), as opposed to a setup error.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Config(_) | Self::Tls(_) => false,
            Self::Timeout(_) => true,
            Self::Redis(e) => !matches!(e.retry_method(), redis::RetryMethod::NoRetry),
        }
    }
}

/// What Redis says about the lease, for `status`.
#[derive(Debug, Clone)]
pub struct LeaseInfo {
    /// The lease value (`host:pid:random`), if the lease is held.
    pub holder: Option<String>,
    /// Milliseconds until the lease expires, if held.
    pub ttl_ms: Option<i64>,
    /// The fence counter (the newest acquisition's fence).
    pub fence: Option<i64>,
    /// The leader's last progress report, if fresh.
    pub progress: Option<String>,
}

/// Competes for the lease. Cheap to keep around; one per process.
pub struct Elector {
    cfg: LeaderConfig,
    conn: ConnectionManager,
    lease_key: String,
    fence_key: String,
    progress_key: String,
}

impl Elector {
    /// Validates the config and connects to Redis.
    pub async fn connect(cfg: LeaderConfig) -> Result<Self, LeaderError> {
        if cfg.ttl < Duration::from_millis(30) {
            return Err(LeaderError::Config(format!(
                "ttl {:?} is too short",
                cfg.ttl
            )));
        }
        if cfg.poll_interval.is_zero() || cfg.poll_interval > cfg.ttl / 3 {
            return Err(LeaderError::Config(format!(
                "poll_interval {:?} must be in (0, ttl/3 = {:?}]",
                cfg.poll_interval,
                cfg.ttl / 3
            )));
        }
        let client = crate::tls::redis_client(&cfg.redis_url)?;
        // One attempt on a throwaway connection first: the manager retries a failed first
        // connection until our timeout, which would hide why it failed (refused, TLS).
        let probe = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_CALL_TIMEOUT))
            .set_response_timeout(Some(REDIS_CALL_TIMEOUT));
        drop(
            timed(
                REDIS_CALL_TIMEOUT,
                client.get_multiplexed_async_connection_with_config(&probe),
            )
            .await?,
        );
        let mgr_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(REDIS_CALL_TIMEOUT))
            .set_response_timeout(Some(REDIS_CALL_TIMEOUT));
        let conn = timed(
            REDIS_CALL_TIMEOUT,
            ConnectionManager::new_with_config(client, mgr_cfg),
        )
        .await?;
        metrics::gauge!(m::LEADER).set(0.0);
        Ok(Self {
            lease_key: format!("{}leader", cfg.key_prefix),
            fence_key: format!("{}fence", cfg.key_prefix),
            progress_key: format!("{}progress", cfg.key_prefix),
            cfg,
            conn,
        })
    }

    /// Waits (as a standby, polling every `poll_interval`) until this instance holds the lease,
    /// or returns `Ok(None)` when `cancel` fires. Transient Redis errors are logged and retried
    /// at the poll interval; other errors are returned.
    pub async fn acquire(
        &self,
        cancel: &CancellationToken,
    ) -> Result<Option<Leadership>, LeaderError> {
        let mut standby_logged = false;
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            match self.try_acquire().await {
                Ok(Some(l)) => return Ok(Some(l)),
                Ok(None) if !standby_logged => {
                    tracing::info!(key = %self.lease_key, "lease held elsewhere; standing by");
                    standby_logged = true;
                }
                Ok(None) => {}
                Err(e) if e.is_transient() => {
                    tracing::warn!(key = %self.lease_key, error = %e, "leader poll failed; retrying");
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                _ = tokio::time::sleep(self.cfg.poll_interval) => {}
            }
        }
    }

    /// One attempt: takes the lease if it is free.
    pub async fn try_acquire(&self) -> Result<Option<Leadership>, LeaderError> {
        let token = format!("{}:{:032x}", holder_id(), rand::random::<u128>());
        let mut conn = self.conn.clone();
        let sent_at = Instant::now();
        let fence: i64 = timed(
            REDIS_CALL_TIMEOUT,
            Script::new(ACQUIRE_LUA)
                .key(&self.lease_key)
                .key(&self.fence_key)
                .arg(&token)
                .arg(ttl_ms(self.cfg.ttl))
                .invoke_async(&mut conn),
        )
        .await?;
        if fence == 0 {
            return Ok(None);
        }
        metrics::gauge!(m::LEADER).set(1.0);
        metrics::counter!(m::LEADER_ACQUISITIONS_TOTAL).increment(1);
        tracing::info!(key = %self.lease_key, fence, ttl_ms = ttl_ms(self.cfg.ttl), "leader lease acquired");
        let lost = CancellationToken::new();
        let renewer = Renewer {
            conn: self.conn.clone(),
            key: self.lease_key.clone(),
            token: token.clone(),
            ttl: self.cfg.ttl,
            lost: lost.clone(),
            fence,
        };
        let task = tokio::spawn(renewer.run(sent_at));
        Ok(Some(Leadership {
            fence,
            lost,
            token,
            key: self.lease_key.clone(),
            conn: self.conn.clone(),
            task,
        }))
    }
}

impl Elector {
    /// The config this elector runs with.
    pub fn config(&self) -> &LeaderConfig {
        &self.cfg
    }

    /// Raises the fence counter to at least `floor`. Needed when Redis lost the counter (restart
    /// without persistence) while the database still holds a larger fence: without it every new
    /// leader would be fenced out. Never lowers the counter, so fencing stays monotonic.
    pub async fn raise_fence_floor(&self, floor: i64) -> Result<i64, LeaderError> {
        let mut conn = self.conn.clone();
        timed(
            REDIS_CALL_TIMEOUT,
            Script::new(FENCE_FLOOR_LUA)
                .key(&self.fence_key)
                .arg(floor)
                .invoke_async(&mut conn),
        )
        .await
    }

    /// Stores the leader's progress report (JSON) for `status`; it expires after `ttl`.
    pub async fn publish_progress(&self, json: &str, ttl: Duration) -> Result<(), LeaderError> {
        let mut conn = self.conn.clone();
        timed(
            REDIS_CALL_TIMEOUT,
            redis::cmd("SET")
                .arg(&self.progress_key)
                .arg(json)
                .arg("PX")
                .arg(ttl_ms(ttl))
                .query_async::<()>(&mut conn),
        )
        .await
    }

    /// Reads the lease holder, its remaining TTL, the fence counter and the progress report.
    pub async fn lease_info(&self) -> Result<LeaseInfo, LeaderError> {
        let mut conn = self.conn.clone();
        let (holder, pttl, fence, progress): (Option<String>, i64, Option<i64>, Option<String>) =
            timed(
                REDIS_CALL_TIMEOUT,
                redis::pipe()
                    .cmd("GET")
                    .arg(&self.lease_key)
                    .cmd("PTTL")
                    .arg(&self.lease_key)
                    .cmd("GET")
                    .arg(&self.fence_key)
                    .cmd("GET")
                    .arg(&self.progress_key)
                    .query_async(&mut conn),
            )
            .await?;
        Ok(LeaseInfo {
            holder,
            ttl_ms: (pttl >= 0).then_some(pttl),
            fence,
            progress,
        })
    }
}

/// `host:pid` of this process, the readable part of the lease value.
fn holder_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!("{host}:{}", std::process::id())
}

/// A held lease. Renewal runs in a task owned by this value, stopped on release or drop.
/// Dropping without [`Leadership::release`] leaves the key to expire within one TTL.
pub struct Leadership {
    /// Fencing token: strictly larger for every acquisition (any instance, same prefix).
    /// The writer stores it with the cursor and refuses to commit once a larger fence wrote.
    pub fence: i64,
    /// Cancelled the moment this instance can no longer vouch for the lease (renewal refused, or
    /// Redis unreachable until the lease would have expired), and on release or drop. Every
    /// task that reads or writes as leader must stop when it fires.
    pub lost: CancellationToken,
    token: String,
    key: String,
    conn: ConnectionManager,
    task: JoinHandle<()>,
}

impl Leadership {
    /// Whether the lease is still believed held.
    pub fn is_held(&self) -> bool {
        !self.lost.is_cancelled()
    }

    /// Stops renewing and deletes the lease if it is still ours, so a standby takes over at once.
    pub async fn release(self) -> Result<(), LeaderError> {
        self.task.abort();
        self.lost.cancel();
        metrics::gauge!(m::LEADER).set(0.0);
        let mut conn = self.conn.clone();
        let deleted: i64 = timed(
            REDIS_CALL_TIMEOUT,
            Script::new(RELEASE_LUA)
                .key(&self.key)
                .arg(&self.token)
                .invoke_async(&mut conn),
        )
        .await?;
        tracing::info!(key = %self.key, fence = self.fence, was_ours = deleted == 1, "leader lease released");
        Ok(())
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
        if !self.lost.is_cancelled() {
            self.lost.cancel();
            metrics::gauge!(m::LEADER).set(0.0);
        }
    }
}

/// The renewal loop of one acquisition.
struct Renewer {
    conn: ConnectionManager,
    key: String,
    token: String,
    ttl: Duration,
    lost: CancellationToken,
    fence: i64,
}

impl Renewer {
    /// Renews every ttl/3. The lease is known good until `last_sent + ttl`, where `last_sent` is
    /// when the last successful renewal was *sent* (Redis set the expiry no earlier than that).
    async fn run(mut self, acquired_sent_at: Instant) {
        let interval = self.ttl / 3;
        let retry = self.ttl / RENEW_RETRY_DIVISOR;
        let mut expires_at = acquired_sent_at + self.ttl;
        let mut next = acquired_sent_at + interval;
        loop {
            tokio::time::sleep_until(next).await;
            let sent_at = Instant::now();
            if sent_at >= expires_at {
                return self.lose("lease expired before it could be renewed");
            }
            // The call may not outlive the lease: past that point the answer is moot.
            match timed(expires_at - sent_at, self.renew_once()).await {
                Ok(1) => {
                    expires_at = sent_at + self.ttl;
                    next = sent_at + interval;
                }
                Ok(_) => return self.lose("lease no longer ours"),
                Err(e) => {
                    tracing::warn!(key = %self.key, fence = self.fence, error = %e, "lease renewal failed; retrying");
                    next = Instant::now() + retry;
                }
            }
        }
    }

    async fn renew_once(&mut self) -> Result<i64, LeaderError> {
        Ok(Script::new(RENEW_LUA)
            .key(&self.key)
            .arg(&self.token)
            .arg(ttl_ms(self.ttl))
            .invoke_async(&mut self.conn)
            .await?)
    }

    fn lose(self, why: &'static str) {
        self.lost.cancel();
        metrics::gauge!(m::LEADER).set(0.0);
        metrics::counter!(m::LEADER_LOST_TOTAL).increment(1);
        tracing::error!(key = %self.key, fence = self.fence, reason = why, "leader lease lost; stopping");
    }
}

fn ttl_ms(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)
}

/// Bounds a Redis call in time.
async fn timed<T, E>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, LeaderError>
where
    LeaderError: From<E>,
{
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(LeaderError::from),
        Err(_) => Err(LeaderError::Timeout(limit)),
    }
}
