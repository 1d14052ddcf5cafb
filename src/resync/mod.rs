//! Resync (§12): makes a repo's rows equal to its `com.atproto.sync.getRepo` CAR. A bounded
//! pool of workers ([`run_workers`]) claims due repos from `resync_queue` ([`crate::repos`]),
//! resolves each account's DID document (PDS and signing key), fetches the CAR through the
//! network guard ([`fetch`]), verifies it ([`crate::sync::verify_repo_car`]; a bad signature
//! refreshes the document once), and in one transaction applies the difference
//! ([`crate::writer::apply_repo`]), the live events held meanwhile ([`held`]) and the new head.
//! Failures back off per repo (1 min doubling to 1 h); permanent ones leave the queue with a
//! reason. [`backfill`] enumerates a relay's repos and queues them for the same workers.
//!
//! - [`one`]: the resync of one repo. [`group`]: several claimed repos in one transaction.
//!   [`worker`]: the pool. [`error`]: failure reasons.

pub mod backfill;
pub mod command;
mod error;
mod fetch;
mod group;
pub mod held;
mod one;
mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;

use crate::cursor::CursorKey;
use crate::identity::{IdentityConfig, IdentityError, Resolver};
use crate::txn::RetryPolicy;

pub use error::ResyncError;
pub use held::{Held, HeldLimits, Overflow};
pub use one::Resynced;
pub use worker::run_workers;

/// Default `--resync-concurrency`: repos fetched and written at once. Each holds its CAR in
/// memory and one connection during its transaction.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Default limit on one `getRepo` download (connect to last byte).
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(120);
/// How often idle workers look for due repos.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Limit of a resync transaction: a whole repo is written at once, far more than a batch.
pub const DEFAULT_TX_TIMEOUT: Duration = Duration::from_secs(120);
/// Default `--resync-group-repos`: repos a worker claims and writes in one transaction. 16
/// repos of a typical size are a few thousand rows: per-transaction costs (locks, commit,
/// one statement per table) are shared, and a failed group costs little to redo repo by repo.
pub const DEFAULT_GROUP_REPOS: usize = 16;

/// Settings of the resync workers.
#[derive(Debug, Clone)]
pub struct ResyncConfig {
    /// Workers: groups of repos resynced at once (≥ 1).
    pub concurrency: usize,
    /// Repos claimed and written together by one worker (≥ 1; 1: one transaction per repo,
    /// always the diffing path).
    pub group_repos: usize,
    pub fetch_timeout: Duration,
    /// Largest repo CAR accepted.
    pub max_car_bytes: usize,
    pub poll_interval: Duration,
    /// Failed attempts after which a repo is given up for good (`None`: retried forever with
    /// backoff, as the daemon does; backfill gives up to be able to finish).
    pub max_attempts: Option<u32>,
    /// Retries and limit of each resync transaction.
    pub retry: RetryPolicy,
    /// Bounds of the held live events.
    pub held: HeldLimits,
}

impl Default for ResyncConfig {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            group_repos: DEFAULT_GROUP_REPOS,
            fetch_timeout: DEFAULT_FETCH_TIMEOUT,
            max_car_bytes: crate::sync::DEFAULT_MAX_REPO_CAR_BYTES,
            poll_interval: DEFAULT_POLL_INTERVAL,
            max_attempts: None,
            retry: RetryPolicy {
                tx_timeout: DEFAULT_TX_TIMEOUT,
                ..RetryPolicy::default()
            },
            held: HeldLimits::default(),
        }
    }
}

/// Counters of what the workers did, for progress bars and summaries.
#[derive(Debug, Default)]
pub struct ResyncStats {
    /// Time spent per phase (`fetch`, `verify`, `write_tx`…) and per statement group of the
    /// writes, in µs, summed over the workers. Bounded: its keys are the fixed names of the
    /// phases and of the writer's statement groups.
    times: Mutex<BTreeMap<&'static str, u64>>,
    pub resynced: AtomicU64,
    pub failed: AtomicU64,
    /// Records of the CARs written (created + updated + deleted).
    pub records_written: AtomicU64,
    /// Records of the CARs, changed or not.
    pub records_seen: AtomicU64,
    /// Signalled when the workers find no repo due and none in flight (at most once per
    /// poll): a backfill checks whether it is over at once instead of at its next period.
    pub(crate) idle: tokio::sync::Notify,
}

impl ResyncStats {
    /// Adds the time since `since` to phase `what`.
    pub(crate) fn add_time(&self, what: &'static str, since: Instant) {
        let micros = since.elapsed().as_micros() as u64;
        if let Ok(mut t) = self.times.lock() {
            *t.entry(what).or_default() += micros;
        }
    }

    /// Adds a write's time per statement group.
    pub(crate) fn add_statements(&self, micros: &BTreeMap<&'static str, u64>) {
        if let Ok(mut t) = self.times.lock() {
            for (k, v) in micros {
                *t.entry(k).or_default() += v;
            }
        }
    }

    /// Time per phase and statement group so far, in µs (summed over the workers).
    pub fn times(&self) -> BTreeMap<&'static str, u64> {
        self.times.lock().map(|t| t.clone()).unwrap_or_default()
    }
}

/// The live side of a resync: the fence its transactions check and the held events they
/// apply. `None` for a standalone backfill, where no pipeline runs.
#[derive(Debug, Clone)]
pub struct Live {
    pub fence: CursorKey,
    pub held: Arc<Held>,
}

/// Everything a resync worker needs; share it as `Arc<Resyncer>`.
pub struct Resyncer {
    pool: Pool,
    cfg: ResyncConfig,
    resolver: Arc<Resolver>,
    pds: fetch::Pds,
    live: Option<Live>,
    stats: Arc<ResyncStats>,
}

impl std::fmt::Debug for Resyncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resyncer")
            .field("cfg", &self.cfg)
            .field("live", &self.live.is_some())
            .finish()
    }
}

impl Resyncer {
    /// Workers' shared state. `resolver`: the daemon's (shared caches), or `None` to build
    /// one from `identity` (whose network policy also guards the PDS fetches).
    pub fn new(
        pool: Pool,
        cfg: ResyncConfig,
        identity: &IdentityConfig,
        resolver: Option<Arc<Resolver>>,
        live: Option<Live>,
    ) -> Result<Self, IdentityError> {
        let resolver = match resolver {
            Some(r) => r,
            None => Arc::new(Resolver::new(identity.clone())?),
        };
        Ok(Self {
            pds: fetch::Pds::new(identity, cfg.fetch_timeout, cfg.max_car_bytes)?,
            pool,
            cfg,
            resolver,
            live,
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> &Arc<ResyncStats> {
        &self.stats
    }

    pub fn config(&self) -> &ResyncConfig {
        &self.cfg
    }
}

/// Command-line flags of the resync workers (`run`, `replay`, `backfill`).
#[derive(Debug, Clone, clap::Args)]
pub struct ResyncArgs {
    /// Repos resynced at once (fetch, verify, write).
    #[arg(long, env = "RESYNC_CONCURRENCY", value_name = "N", default_value_t = DEFAULT_CONCURRENCY)]
    pub resync_concurrency: usize,
    /// Repos a worker claims and writes in one transaction (1: one transaction per repo).
    #[arg(long, env = "RESYNC_GROUP_REPOS", value_name = "N", default_value_t = DEFAULT_GROUP_REPOS)]
    pub resync_group_repos: usize,
    /// Limit on one `getRepo` download, in milliseconds.
    #[arg(long, env = "RESYNC_FETCH_TIMEOUT_MS", value_name = "MS", default_value_t = DEFAULT_FETCH_TIMEOUT.as_millis() as u64)]
    pub resync_fetch_timeout_ms: u64,
    /// Largest repo CAR accepted, in bytes; a bigger repo fails for good (`too_large`).
    #[arg(long, env = "MAX_REPO_CAR_BYTES", value_name = "BYTES", default_value_t = crate::sync::DEFAULT_MAX_REPO_CAR_BYTES)]
    pub max_repo_car_bytes: usize,
    /// Limit on one resync transaction (the whole repo's rows), in milliseconds.
    #[arg(long, env = "RESYNC_TX_TIMEOUT_MS", value_name = "MS", default_value_t = DEFAULT_TX_TIMEOUT.as_millis() as u64)]
    pub resync_tx_timeout_ms: u64,
    /// Most live events held in total for repos being resynced.
    #[arg(long, env = "HELD_MAX_EVENTS", value_name = "N", default_value_t = held::DEFAULT_MAX_EVENTS)]
    pub held_max_events: usize,
    /// Most bytes (estimated) of live events held for repos being resynced.
    #[arg(long, env = "HELD_MAX_BYTES", value_name = "BYTES", default_value_t = held::DEFAULT_MAX_BYTES)]
    pub held_max_bytes: usize,
}

impl ResyncArgs {
    /// The workers' settings; transactions retry as `retry` says, with the resync limit.
    pub fn to_config(
        &self,
        retry: &RetryPolicy,
    ) -> Result<ResyncConfig, crate::config::ConfigError> {
        use crate::config::check;
        let at_least_one = "must be at least 1";
        check(
            self.resync_concurrency >= 1,
            "--resync-concurrency",
            "RESYNC_CONCURRENCY",
            at_least_one,
            self.resync_concurrency,
        )?;
        check(
            self.resync_group_repos >= 1,
            "--resync-group-repos",
            "RESYNC_GROUP_REPOS",
            at_least_one,
            self.resync_group_repos,
        )?;
        check(
            self.resync_fetch_timeout_ms >= 1,
            "--resync-fetch-timeout-ms",
            "RESYNC_FETCH_TIMEOUT_MS",
            at_least_one,
            self.resync_fetch_timeout_ms,
        )?;
        check(
            self.max_repo_car_bytes >= 1,
            "--max-repo-car-bytes",
            "MAX_REPO_CAR_BYTES",
            at_least_one,
            self.max_repo_car_bytes,
        )?;
        check(
            self.resync_tx_timeout_ms >= 1,
            "--resync-tx-timeout-ms",
            "RESYNC_TX_TIMEOUT_MS",
            at_least_one,
            self.resync_tx_timeout_ms,
        )?;
        check(
            self.held_max_events >= 1,
            "--held-max-events",
            "HELD_MAX_EVENTS",
            at_least_one,
            self.held_max_events,
        )?;
        check(
            self.held_max_bytes >= 1,
            "--held-max-bytes",
            "HELD_MAX_BYTES",
            at_least_one,
            self.held_max_bytes,
        )?;
        Ok(ResyncConfig {
            concurrency: self.resync_concurrency,
            group_repos: self.resync_group_repos,
            fetch_timeout: Duration::from_millis(self.resync_fetch_timeout_ms),
            max_car_bytes: self.max_repo_car_bytes,
            retry: RetryPolicy {
                tx_timeout: Duration::from_millis(self.resync_tx_timeout_ms),
                ..retry.clone()
            },
            held: HeldLimits {
                max_events: self.held_max_events,
                max_bytes: self.held_max_bytes,
                max_events_per_repo: held::DEFAULT_MAX_EVENTS_PER_REPO.min(self.held_max_events),
            },
            ..ResyncConfig::default()
        })
    }
}
