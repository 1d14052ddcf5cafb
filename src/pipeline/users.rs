//! Users stage (§4, §5): between decode and the batcher, makes sure every DID has its user
//! created before its events reach the writer.
//!
//! - A DID known to have an actor row (bounded LRU set) passes straight through.
//! - A new DID's events wait in a [`PendingOps`] map while a spawned task creates the user:
//!   it checks the `actors` row first (already resolved or scheduled ⇒ known, no network),
//!   else runs [`UserCreator::create`] under the semaphore and writes the outcome
//!   ([`identity::store_resolved`] / [`identity::store_failure`]). The result comes back over a
//!   bounded channel and the DID's events are released downstream in their original order.
//! - Reaching a bound of the map never drops data: the evicted or overflowing DID's events are
//!   released at once, its creation is cancelled and the user is a stub whose resolution is
//!   scheduled (`next_resolve_at`) for [`run_reresolve`].
//! - Every forwarded chunk carries a low watermark: the highest seq S such that every event
//!   with seq ≤ S has been forwarded. The writer stores it as the cursor instead of the batch's
//!   last seq, so the durable cursor never passes an event that only lives in a pending map.
//! - `#identity` events invalidate the resolver's caches and refresh the actor in the
//!   background.
//! - With identity resolution off (offline replay) the stage passes chunks through untouched
//!   and the writer creates stub users as before.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lru::LruCache;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{DecodedChunk, Stats};
use crate::firehose::{Event, EventKind};
use crate::identity::{
    self, config as idcfg, Creation, IdentityConfig, IdentityError, UserCreator,
};
use crate::metrics as m;
use crate::pending::{self, DidOps, PendingConfig, PendingError, PendingOps, PushOutcome};

/// DIDs remembered as having an actor row: ~1 M × ~120 B ≈ 120 MiB at most, enough that a
/// warm indexer almost never asks the database again.
pub const DEFAULT_KNOWN_DIDS: usize = 1_000_000;
/// Re-resolution job period: stubs are retried with backoff of at least a minute anyway.
pub const DEFAULT_RERESOLVE_INTERVAL: Duration = Duration::from_secs(60);
/// Actors re-resolved per job run: bounded so a run stays short and the PLC is not hammered.
pub const DEFAULT_RERESOLVE_BATCH: i64 = 100;
/// `--resolve-identities` default of `replay`: offline, users are stubs.
pub const DEFAULT_RESOLVE_IDENTITIES_REPLAY: bool = false;
/// `--resolve-identities` default of `run`: the daemon resolves new users.
pub const DEFAULT_RESOLVE_IDENTITIES_RUN: bool = true;

/// Finished creations queued back to the stage (tasks park when it is full).
const DONE_QUEUE: usize = 1024;
/// DIDs queued for stub scheduling (the stage parks when it is full).
const SCHEDULE_QUEUE: usize = 1024;
/// DIDs taken per wake-up by the scheduling task.
const SCHEDULE_BATCH: usize = 256;
/// Creation tasks talking to the database at once: leaves the rest of the pool to the writer.
const DB_CONCURRENCY: usize = 2;
/// Background `#identity` refreshes in flight; beyond it refreshes are scheduled in the DB.
const MAX_REFRESHES: usize = 1_000;

/// Errors of the users stage, its configuration and the re-resolution job.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// The identity resolver could not be built.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// A pending-map bound is invalid.
    #[error(transparent)]
    Pending(#[from] PendingError),
    /// A flag has a value that cannot work.
    #[error("invalid {flag} {value:?}: {reason}")]
    Invalid {
        /// The flag (with its env variable).
        flag: &'static str,
        /// The rejected value.
        value: String,
        /// Why.
        reason: &'static str,
    },
    /// A database statement failed.
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    /// No connection from the pool.
    #[error("database pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

/// Settings of the users stage.
#[derive(Debug, Clone)]
pub struct UsersConfig {
    /// Identity resolution; `resolve_identities = false` makes the stage a pass-through.
    pub identity: IdentityConfig,
    /// Bounds of the pending-op map.
    pub pending: PendingConfig,
    /// Bound of the known-DID set (default [`DEFAULT_KNOWN_DIDS`]).
    pub known_dids: usize,
    /// A creator to share with [`run_reresolve`] (same semaphore and caches); built from
    /// `identity` when `None`.
    pub creator: Option<UserCreator>,
}

impl Default for UsersConfig {
    /// Resolution off (offline replay); the other settings at their production defaults.
    fn default() -> Self {
        Self {
            identity: IdentityConfig {
                resolve_identities: false,
                ..IdentityConfig::default()
            },
            pending: PendingConfig::default(),
            known_dids: DEFAULT_KNOWN_DIDS,
            creator: None,
        }
    }
}

impl UsersConfig {
    /// Resolution on, with `identity` otherwise as given.
    pub fn resolving(identity: IdentityConfig) -> Self {
        Self {
            identity: IdentityConfig {
                resolve_identities: true,
                ..identity
            },
            ..Self::default()
        }
    }

    /// Whether the stage resolves identities (otherwise it passes events through).
    pub fn enabled(&self) -> bool {
        match &self.creator {
            Some(c) => c.is_enabled(),
            None => self.identity.resolve_identities,
        }
    }

    /// The creator to use (the shared one, or a new one for `identity`), after checking the
    /// bounds. `None` when resolution is off.
    pub fn creator(&self) -> Result<Option<UserCreator>, UsersError> {
        if !self.enabled() {
            return Ok(None);
        }
        PendingOps::<()>::new(self.pending)?;
        if self.known_dids == 0 {
            return Err(UsersError::Invalid {
                flag: "known-DID set size",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        match &self.creator {
            Some(c) => Ok(Some(c.clone())),
            None => Ok(Some(UserCreator::new(self.identity.clone())?)),
        }
    }
}

/// Command-line flags of user creation; `#[command(flatten)]` them into a subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct UsersArgs {
    /// Resolve the identity (DID document → handle, PDS, signing key) of new users before
    /// their events are written. Off: users are created at once as stubs, without network.
    /// Default: off for `replay`, on for `run`.
    #[arg(
        long,
        env = "RESOLVE_IDENTITIES",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub resolve_identities: Option<bool>,

    /// PLC directory base URL (`did:plc` documents are fetched from `<URL>/<did>`).
    #[arg(long, env = "PLC_URL", value_name = "URL", default_value = idcfg::DEFAULT_PLC_URL)]
    pub plc_url: String,

    /// Most DIDs whose events wait for their user at once; past it the least recently used
    /// DID's events are written at once with a stub user.
    #[arg(long, env = "PENDING_MAX_DIDS", value_name = "N", default_value_t = pending::DEFAULT_MAX_DIDS)]
    pub pending_max_dids: usize,

    /// Most events held per waiting DID; past it the DID's events are written at once with
    /// a stub user.
    #[arg(long, env = "PENDING_MAX_OPS_PER_DID", value_name = "N", default_value_t = pending::DEFAULT_MAX_OPS_PER_DID)]
    pub pending_max_ops_per_did: usize,

    /// Identity resolutions at once (semaphore permits).
    #[arg(long, env = "USER_CREATION_PERMITS", value_name = "N", default_value_t = idcfg::DEFAULT_CONCURRENCY)]
    pub user_creation_permits: usize,

    /// Timeout of one identity resolution, in milliseconds; a user whose identity does not
    /// resolve in time is created as a stub and retried later.
    #[arg(long, env = "RESOLVE_TIMEOUT_MS", value_name = "MS", default_value_t = DEFAULT_RESOLVE_TIMEOUT_MS)]
    pub resolve_timeout_ms: u64,
}

/// `--resolve-timeout-ms` default (the identity module's default timeout).
pub const DEFAULT_RESOLVE_TIMEOUT_MS: u64 = idcfg::DEFAULT_TIMEOUT.as_millis() as u64;

impl UsersArgs {
    /// The stage's settings; `resolve_default` applies when `--resolve-identities` is not
    /// given ([`DEFAULT_RESOLVE_IDENTITIES_REPLAY`] or [`DEFAULT_RESOLVE_IDENTITIES_RUN`]).
    /// Rejects values that cannot work, naming the flag.
    pub fn to_config(&self, resolve_default: bool) -> Result<UsersConfig, UsersError> {
        let positive = |flag: &'static str, v: usize| {
            if v == 0 {
                Err(UsersError::Invalid {
                    flag,
                    value: v.to_string(),
                    reason: "must be at least 1",
                })
            } else {
                Ok(v)
            }
        };
        let max_dids = positive(
            "--pending-max-dids (PENDING_MAX_DIDS)",
            self.pending_max_dids,
        )?;
        let max_ops = positive(
            "--pending-max-ops-per-did (PENDING_MAX_OPS_PER_DID)",
            self.pending_max_ops_per_did,
        )?;
        let permits = positive(
            "--user-creation-permits (USER_CREATION_PERMITS)",
            self.user_creation_permits,
        )?;
        if self.resolve_timeout_ms == 0 {
            return Err(UsersError::Invalid {
                flag: "--resolve-timeout-ms (RESOLVE_TIMEOUT_MS)",
                value: "0".into(),
                reason: "must be at least 1",
            });
        }
        let url = self.plc_url.trim_end_matches('/');
        if !(url.starts_with("https://") || url.starts_with("http://")) || url.len() < 9 {
            return Err(UsersError::Invalid {
                flag: "--plc-url (PLC_URL)",
                value: self.plc_url.clone(),
                reason: "must be an http(s) URL",
            });
        }
        Ok(UsersConfig {
            identity: IdentityConfig {
                resolve_identities: self.resolve_identities.unwrap_or(resolve_default),
                plc_url: url.to_owned(),
                concurrency: permits,
                timeout: Duration::from_millis(self.resolve_timeout_ms),
                ..IdentityConfig::default()
            },
            pending: PendingConfig {
                max_dids,
                max_ops_per_did: max_ops,
            },
            known_dids: DEFAULT_KNOWN_DIDS,
            creator: None,
        })
    }
}

/// Counters of the users stage (read by tests and summaries; Prometheus gets the same).
#[derive(Debug)]
pub struct UsersStats {
    /// Events that waited in the pending-op map.
    pub events_held: AtomicU64,
    /// DIDs evicted from the full map (released as stubs).
    pub evictions: AtomicU64,
    /// DIDs whose per-DID list overflowed (released as stubs).
    pub overflows: AtomicU64,
    /// DIDs released as stubs at shutdown.
    pub shutdown_releases: AtomicU64,
    /// Users created with a resolved identity.
    pub resolved: AtomicU64,
    /// Users created as stubs because resolution failed.
    pub stubs: AtomicU64,
    /// New DIDs that turned out to be known by the database.
    pub known_in_db: AtomicU64,
    /// `#identity` refreshes started or scheduled.
    pub refreshes: AtomicU64,
    /// Database errors (creation still releases the events; the writer creates the row).
    pub db_errors: AtomicU64,
    /// DIDs held right now.
    pub pending_dids: AtomicU64,
    /// Lowest seq held right now (-1: none).
    pub min_pending_seq: AtomicI64,
    /// Last watermark forwarded (-1: none yet).
    pub watermark: AtomicI64,
}

impl Default for UsersStats {
    fn default() -> Self {
        Self {
            events_held: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            overflows: AtomicU64::new(0),
            shutdown_releases: AtomicU64::new(0),
            resolved: AtomicU64::new(0),
            stubs: AtomicU64::new(0),
            known_in_db: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            db_errors: AtomicU64::new(0),
            pending_dids: AtomicU64::new(0),
            min_pending_seq: AtomicI64::new(-1),
            watermark: AtomicI64::new(-1),
        }
    }
}

/// Starts the users stage on `rx`; returns the channel the batcher reads and the task.
/// `creator` is `None` when resolution is off: then chunks pass through untouched.
pub(crate) fn spawn(
    rx: mpsc::Receiver<DecodedChunk>,
    queue: usize,
    pool: Pool,
    creator: Option<UserCreator>,
    cfg: &UsersConfig,
    cancel: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(mpsc::Receiver<DecodedChunk>, JoinHandle<()>), UsersError> {
    let (tx, out) = mpsc::channel(queue);
    let Some(creator) = creator else {
        return Ok((out, tokio::spawn(pass_through(rx, tx))));
    };
    let pending = PendingOps::new(cfg.pending)?;
    let known = NonZeroUsize::new(cfg.known_dids).ok_or(UsersError::Invalid {
        flag: "known-DID set size",
        value: "0".into(),
        reason: "must be at least 1",
    })?;
    let (done_tx, done_rx) = mpsc::channel(DONE_QUEUE);
    let (sched_tx, sched_rx) = mpsc::channel(SCHEDULE_QUEUE);
    let scheduler = tokio::spawn(schedule_task(pool.clone(), sched_rx, stats.clone()));
    let stage = Stage {
        pool,
        creator,
        pending,
        known: LruCache::new(known),
        in_flight: HashMap::new(),
        refreshes: 0,
        next_gen: 0,
        done_tx,
        db_permits: Arc::new(Semaphore::new(DB_CONCURRENCY)),
        sched_tx,
        to_schedule: Vec::new(),
        max_seen: None,
        out: Vec::new(),
        stats,
    };
    let task = tokio::spawn(async move {
        stage.run(rx, done_rx, tx, cancel).await;
        // The stage dropped its scheduling sender: the task ends once the queue is written.
        if let Err(e) = scheduler.await {
            tracing::error!(error = %e, "stub scheduling task failed");
        }
    });
    Ok((out, task))
}

async fn pass_through(mut rx: mpsc::Receiver<DecodedChunk>, tx: mpsc::Sender<DecodedChunk>) {
    while let Some(chunk) = rx.recv().await {
        if tx.send(chunk).await.is_err() {
            return;
        }
    }
}

/// A spawned creation or refresh.
struct Flight {
    generation: u64,
    abort: AbortHandle,
    refresh: bool,
}

/// What a creation task reports back.
struct Done {
    did: String,
    generation: u64,
    outcome: Outcome,
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    /// The actor row already existed, resolved or scheduled: nothing resolved.
    Known,
    Resolved,
    Stub,
    /// A database error: the events are released, the writer creates the row.
    DbError,
}

struct Stage {
    pool: Pool,
    creator: UserCreator,
    pending: PendingOps<Event>,
    known: LruCache<String, ()>,
    in_flight: HashMap<String, Flight>,
    refreshes: usize,
    next_gen: u64,
    done_tx: mpsc::Sender<Done>,
    db_permits: Arc<Semaphore>,
    sched_tx: mpsc::Sender<String>,
    to_schedule: Vec<String>,
    /// Highest seq received.
    max_seen: Option<i64>,
    /// Events to forward, in order.
    out: Vec<Event>,
    stats: Arc<Stats>,
}

impl Stage {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<DecodedChunk>,
        mut done_rx: mpsc::Receiver<Done>,
        tx: mpsc::Sender<DecodedChunk>,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                biased;
                Some(done) = done_rx.recv() => self.finish(done),
                chunk = rx.recv() => match chunk {
                    Some(chunk) => self.accept(chunk),
                    None => break,
                },
            }
            if !self.flush(&tx).await {
                return self.abort_all();
            }
        }
        // Input ended. Draining: wait for the creations (each bounded by the resolution
        // timeout) unless we are told to stop, then release the rest as stubs.
        while !self.in_flight.is_empty() {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    self.release_all_stubs();
                    self.abort_all();
                }
                Some(done) = done_rx.recv() => self.finish(done),
            }
            if !self.flush(&tx).await {
                return self.abort_all();
            }
        }
        self.release_all_stubs();
        let _ = self.flush(&tx).await;
    }

    /// Routes one decoded chunk: known DIDs through, new ones held while created.
    fn accept(&mut self, chunk: DecodedChunk) {
        for ev in chunk.events {
            if ev.seq > 0 {
                self.max_seen = Some(self.max_seen.map_or(ev.seq, |m| m.max(ev.seq)));
            }
            // Events without a DID, or without a seq to order them by, are not held.
            let did = match ev.kind.did() {
                Some(did) if ev.seq > 0 => did.to_owned(),
                _ => {
                    self.out.push(ev);
                    continue;
                }
            };
            if let EventKind::Identity(i) = &ev.kind {
                self.on_identity(&did, i.handle.as_deref());
            }
            if self.pending.contains(&did) {
                self.hold(did, ev);
            } else if self.known.get(&did).is_some() {
                self.out.push(ev);
            } else {
                self.hold(did.clone(), ev);
                self.start(did, false);
            }
        }
        self.publish();
    }

    fn hold(&mut self, did: String, ev: Event) {
        let seq = ev.seq;
        self.stats.users.events_held.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::USERS_EVENTS_HELD_TOTAL).increment(1);
        match self.pending.push(&did, seq, ev) {
            PushOutcome::Held => {}
            PushOutcome::Overflow { did, ops } => {
                self.stats.users.overflows.fetch_add(1, Ordering::Relaxed);
                self.release_stub(did, ops, "overflow");
            }
            PushOutcome::Evicted { did, ops } => {
                self.stats.users.evictions.fetch_add(1, Ordering::Relaxed);
                self.release_stub(did, ops, "evicted");
            }
        }
    }

    /// Releases `did`'s events now; its user is a stub resolved later.
    fn release_stub(&mut self, did: String, ops: DidOps<Event>, reason: &'static str) {
        metrics::counter!(m::USERS_STUB_RELEASES_TOTAL, "reason" => reason).increment(1);
        if let Some(f) = self.in_flight.remove(&did) {
            f.abort.abort();
            if f.refresh {
                self.refreshes = self.refreshes.saturating_sub(1);
            }
        }
        self.out.extend(ops.into_iter().map(|(_, ev)| ev));
        self.mark_known(did.clone());
        self.to_schedule.push(did);
    }

    fn release_all_stubs(&mut self) {
        for (did, ops) in self.pending.drain() {
            self.stats
                .users
                .shutdown_releases
                .fetch_add(1, Ordering::Relaxed);
            self.release_stub(did, ops, "shutdown");
        }
        self.publish();
    }

    fn abort_all(&mut self) {
        for (_, f) in self.in_flight.drain() {
            f.abort.abort();
        }
        self.refreshes = 0;
        metrics::gauge!(m::USERS_TASKS_IN_FLIGHT).set(0.0);
    }

    /// `#identity`: forget cached resolutions and refresh a known actor in the background.
    fn on_identity(&mut self, did: &str, handle: Option<&str>) {
        if let Some(resolver) = self.creator.resolver() {
            resolver.invalidate(did);
            if let Some(h) = handle {
                resolver.invalidate_handle(h);
            }
        }
        // A DID being created resolves afresh; an unknown one will be created.
        if self.in_flight.contains_key(did) || !self.known.contains(did) {
            return;
        }
        self.stats.users.refreshes.fetch_add(1, Ordering::Relaxed);
        if self.refreshes < MAX_REFRESHES {
            metrics::counter!(m::USERS_IDENTITY_REFRESHES_TOTAL, "mode" => "task").increment(1);
            self.start(did.to_owned(), true);
        } else {
            metrics::counter!(m::USERS_IDENTITY_REFRESHES_TOTAL, "mode" => "scheduled")
                .increment(1);
            self.to_schedule.push(did.to_owned());
        }
    }

    /// Spawns the creation (or, with `refresh`, the re-resolution) of `did`'s user.
    fn start(&mut self, did: String, refresh: bool) {
        self.next_gen += 1;
        let generation = self.next_gen;
        let task = tokio::spawn(create_user(
            self.pool.clone(),
            self.creator.clone(),
            self.db_permits.clone(),
            did.clone(),
            refresh,
            generation,
            self.done_tx.clone(),
        ));
        if refresh {
            self.refreshes += 1;
        }
        let flight = Flight {
            generation,
            abort: task.abort_handle(),
            refresh,
        };
        // A refresh still running for a DID that must now be created is superseded.
        if let Some(old) = self.in_flight.insert(did, flight) {
            old.abort.abort();
            if old.refresh {
                self.refreshes = self.refreshes.saturating_sub(1);
            }
        }
        metrics::gauge!(m::USERS_TASKS_IN_FLIGHT).set(self.in_flight.len() as f64);
    }

    /// A creation finished: the DID is known and its events go on, in order.
    fn finish(&mut self, done: Done) {
        let refresh = match self.in_flight.get(&done.did) {
            Some(f) if f.generation == done.generation => f.refresh,
            // Cancelled after it finished (evicted meanwhile): already released.
            _ => return,
        };
        self.in_flight.remove(&done.did);
        metrics::gauge!(m::USERS_TASKS_IN_FLIGHT).set(self.in_flight.len() as f64);
        if refresh {
            // A known actor's `#identity` refresh: nothing was held for it.
            self.refreshes = self.refreshes.saturating_sub(1);
            tracing::debug!(did = %done.did, outcome = ?done.outcome, "identity refreshed");
            if matches!(done.outcome, Outcome::DbError) {
                self.to_schedule.push(done.did);
            }
            return;
        }
        let users = &self.stats.users;
        let label = match done.outcome {
            Outcome::Known => {
                users.known_in_db.fetch_add(1, Ordering::Relaxed);
                "known"
            }
            Outcome::Resolved => {
                users.resolved.fetch_add(1, Ordering::Relaxed);
                "resolved"
            }
            Outcome::Stub => {
                users.stubs.fetch_add(1, Ordering::Relaxed);
                "stub"
            }
            Outcome::DbError => {
                users.db_errors.fetch_add(1, Ordering::Relaxed);
                "error"
            }
        };
        metrics::counter!(m::USERS_CREATED_TOTAL, "result" => label).increment(1);
        if matches!(done.outcome, Outcome::DbError) {
            self.to_schedule.push(done.did.clone());
        }
        if let Some(ops) = self.pending.take(&done.did) {
            self.out.extend(ops.into_iter().map(|(_, ev)| ev));
        }
        self.mark_known(done.did);
        self.publish();
    }

    fn mark_known(&mut self, did: String) {
        self.known.put(did, ());
        metrics::gauge!(m::USERS_KNOWN_DIDS).set(self.known.len() as f64);
    }

    /// Highest S such that every event received with seq ≤ S has been forwarded.
    fn watermark(&self) -> Option<i64> {
        let max = self.max_seen?;
        Some(match self.pending.min_pending_seq() {
            Some(min) => (min - 1).min(max),
            None => max,
        })
    }

    fn publish(&self) {
        let users = &self.stats.users;
        users
            .pending_dids
            .store(self.pending.dids() as u64, Ordering::Relaxed);
        users.min_pending_seq.store(
            self.pending.min_pending_seq().unwrap_or(-1),
            Ordering::Relaxed,
        );
    }

    /// Sends what is ready downstream with the watermark; false when downstream is gone.
    async fn flush(&mut self, tx: &mpsc::Sender<DecodedChunk>) -> bool {
        metrics::gauge!(m::USERS_QUEUE_DEPTH, "queue" => "done").set(depth(&self.done_tx));
        metrics::gauge!(m::USERS_QUEUE_DEPTH, "queue" => "schedule").set(depth(&self.sched_tx));
        for did in self.to_schedule.drain(..) {
            if self.sched_tx.send(did).await.is_err() {
                tracing::error!("stub scheduling task is gone");
                break;
            }
        }
        if self.out.is_empty() {
            return true;
        }
        let watermark = self.watermark();
        if let Some(w) = watermark {
            self.stats.users.watermark.store(w, Ordering::Relaxed);
            metrics::gauge!(m::USERS_WATERMARK_SEQ).set(w as f64);
        }
        let chunk = DecodedChunk {
            events: std::mem::take(&mut self.out),
            watermark,
            ..DecodedChunk::default()
        };
        tx.send(chunk).await.is_ok()
    }
}

/// Items waiting in a bounded channel, for its gauge.
fn depth<T>(s: &mpsc::Sender<T>) -> f64 {
    s.max_capacity().saturating_sub(s.capacity()) as f64
}

const LOOKUP_ACTOR: &str = "SELECT resolved_at IS NOT NULL, next_resolve_at IS NOT NULL, \
     resolve_failures FROM actors WHERE did = $1";
const INSERT_ACTOR: &str = "INSERT INTO actors (did) VALUES ($1) ON CONFLICT (did) DO NOTHING";
/// Stub users (and refreshes that could not run now) get a resolution scheduled, unless one
/// already is (a failed resolution's backoff is kept).
const SCHEDULE_ACTOR: &str = "INSERT INTO actors (did, next_resolve_at) VALUES ($1, now()) \
     ON CONFLICT (did) DO UPDATE SET next_resolve_at = now() WHERE actors.next_resolve_at IS NULL";
const DUE_ACTORS: &str = "SELECT did, resolve_failures FROM actors \
     WHERE next_resolve_at <= now() AND status <> 'deleted' ORDER BY next_resolve_at LIMIT $1";

/// What the database says of an actor before creating it.
struct Existing {
    resolved: bool,
    scheduled: bool,
    failures: u32,
}

async fn lookup(pool: &Pool, did: &str) -> Result<Option<Existing>, UsersError> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(LOOKUP_ACTOR).await?;
    let Some(row) = client.query_opt(&stmt, &[&did]).await? else {
        return Ok(None);
    };
    let failures: i32 = row.try_get(2)?;
    Ok(Some(Existing {
        resolved: row.try_get(0)?,
        scheduled: row.try_get(1)?,
        failures: u32::try_from(failures).unwrap_or(0),
    }))
}

/// Writes a creation's outcome: the actor row, then the resolved identity or the failure.
async fn store(pool: &Pool, creation: &Creation) -> Result<Outcome, UsersError> {
    let client = pool.get().await?;
    let did = creation.did();
    let stmt = client.prepare_cached(INSERT_ACTOR).await?;
    client.execute(&stmt, &[&did]).await?;
    Ok(match creation {
        Creation::Resolved(identity) => {
            identity::store_resolved(&**client, identity).await?;
            Outcome::Resolved
        }
        Creation::Stub {
            did,
            failures,
            retry_after: Some(after),
            ..
        } => {
            identity::store_failure(&**client, did, *failures, *after).await?;
            Outcome::Stub
        }
        Creation::Stub { .. } => Outcome::Stub,
    })
}

/// One user creation (or `refresh`): check the row, resolve under the semaphore, store,
/// report back. Never fails: errors become a [`Outcome::DbError`] or a stub.
async fn create_user(
    pool: Pool,
    creator: UserCreator,
    db_permits: Arc<Semaphore>,
    did: String,
    refresh: bool,
    generation: u64,
    done: mpsc::Sender<Done>,
) {
    let outcome = create_inner(&pool, &creator, &db_permits, &did, refresh).await;
    let _ = done
        .send(Done {
            did,
            generation,
            outcome,
        })
        .await;
}

async fn create_inner(
    pool: &Pool,
    creator: &UserCreator,
    db_permits: &Semaphore,
    did: &str,
    refresh: bool,
) -> Outcome {
    let mut prior_failures = 0;
    {
        // Closed never happens (the semaphore is never closed); then run unthrottled.
        let _permit = db_permits.acquire().await.ok();
        match lookup(pool, did).await {
            Ok(Some(row)) => {
                if !refresh && (row.resolved || row.scheduled || !creator.is_enabled()) {
                    return Outcome::Known;
                }
                prior_failures = row.failures;
            }
            Ok(None) => {}
            Err(e) => {
                metrics::counter!(m::USERS_DB_ERRORS_TOTAL, "op" => "lookup").increment(1);
                tracing::warn!(did, error = %e, "looking up an actor failed; resolving anyway");
            }
        }
    }
    let creation = creator.create(did, prior_failures).await;
    let _permit = db_permits.acquire().await.ok();
    match store(pool, &creation).await {
        Ok(outcome) => outcome,
        Err(e) => {
            metrics::counter!(m::USERS_DB_ERRORS_TOTAL, "op" => "store").increment(1);
            tracing::warn!(did, error = %e, "storing a user's identity failed");
            Outcome::DbError
        }
    }
}

/// Schedules the resolution of stub users, one row per statement (no lock-order concerns).
async fn schedule_task(pool: Pool, mut rx: mpsc::Receiver<String>, stats: Arc<Stats>) {
    let mut buf = Vec::with_capacity(SCHEDULE_BATCH);
    while rx.recv_many(&mut buf, SCHEDULE_BATCH).await > 0 {
        buf.sort_unstable();
        buf.dedup();
        if let Err(e) = schedule(&pool, &buf).await {
            stats.users.db_errors.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::USERS_DB_ERRORS_TOTAL, "op" => "schedule").increment(1);
            tracing::warn!(error = %e, dids = buf.len(), "scheduling stub users for resolution failed; they resolve when next seen");
        }
        buf.clear();
    }
}

async fn schedule(pool: &Pool, dids: &[String]) -> Result<(), UsersError> {
    let client = pool.get().await?;
    let stmt = client.prepare_cached(SCHEDULE_ACTOR).await?;
    for did in dids {
        client.execute(&stmt, &[did]).await?;
    }
    Ok(())
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
}

/// One run of the re-resolution job: up to `limit` actors whose `next_resolve_at` has passed
/// are resolved again (under the creator's semaphore) and the outcomes stored.
pub async fn reresolve_once(
    pool: &Pool,
    creator: &UserCreator,
    limit: i64,
) -> Result<ReresolveRun, UsersError> {
    let mut run = ReresolveRun::default();
    let Some(resolver) = creator.resolver() else {
        return Ok(run);
    };
    let due: Vec<(String, u32)> = {
        let client = pool.get().await?;
        let stmt = client.prepare_cached(DUE_ACTORS).await?;
        let mut out = Vec::new();
        for row in client.query(&stmt, &[&limit]).await? {
            let failures: i32 = row.try_get(1)?;
            out.push((row.try_get(0)?, u32::try_from(failures).unwrap_or(0)));
        }
        out
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
    for creation in &creations {
        match store(pool, creation).await? {
            Outcome::Resolved => run.resolved += 1,
            _ => run.stubs += 1,
        }
    }
    metrics::counter!(m::RERESOLVE_ACTORS_TOTAL, "result" => "resolved")
        .increment(run.resolved as u64);
    metrics::counter!(m::RERESOLVE_ACTORS_TOTAL, "result" => "stub").increment(run.stubs as u64);
    Ok(run)
}

/// The background re-resolution job (§5): every `interval`, resolves again a bounded batch
/// of stub actors whose retry time has passed. Runs until `cancel`; errors are logged and
/// counted, never fatal. Share `creator` with the pipeline (see [`UsersConfig::creator`]) so
/// both use one semaphore.
pub async fn run_reresolve(
    pool: Pool,
    creator: UserCreator,
    interval: Duration,
    cancel: CancellationToken,
) {
    if !creator.is_enabled() {
        return;
    }
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = reresolve_once(&pool, &creator, DEFAULT_RERESOLVE_BATCH) => r,
        };
        metrics::counter!(m::RERESOLVE_RUNS_TOTAL).increment(1);
        match result {
            Ok(run) if run.due > 0 => {
                tracing::info!(
                    due = run.due,
                    resolved = run.resolved,
                    unresolved = run.stubs,
                    "re-resolved stub users"
                );
            }
            Ok(_) => {}
            Err(e) => {
                metrics::counter!(m::USERS_DB_ERRORS_TOTAL, "op" => "reresolve").increment(1);
                tracing::warn!(error = %e, "re-resolution run failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        users: UsersArgs,
    }

    #[test]
    fn flags_parse_with_defaults_and_reject_zero() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        let c = cli.users.to_config(false).unwrap();
        assert!(!c.identity.resolve_identities);
        assert_eq!(c.pending, PendingConfig::default());
        assert_eq!(c.identity.concurrency, idcfg::DEFAULT_CONCURRENCY);
        assert_eq!(c.identity.timeout, idcfg::DEFAULT_TIMEOUT);
        assert!(
            cli.users
                .to_config(true)
                .unwrap()
                .identity
                .resolve_identities
        );

        let cli = Cli::try_parse_from([
            "x",
            "--resolve-identities",
            "--plc-url",
            "http://127.0.0.1:1/",
            "--pending-max-dids",
            "5",
            "--pending-max-ops-per-did",
            "3",
            "--user-creation-permits",
            "2",
            "--resolve-timeout-ms",
            "250",
        ])
        .unwrap();
        let c = cli.users.to_config(false).unwrap();
        assert!(c.identity.resolve_identities);
        assert_eq!(c.identity.plc_url, "http://127.0.0.1:1");
        assert_eq!(c.pending.max_dids, 5);
        assert_eq!(c.pending.max_ops_per_did, 3);
        assert_eq!(c.identity.concurrency, 2);
        assert_eq!(c.identity.timeout, Duration::from_millis(250));
        let off = Cli::try_parse_from(["x", "--resolve-identities=false"]).unwrap();
        assert!(
            !off.users
                .to_config(true)
                .unwrap()
                .identity
                .resolve_identities
        );

        let zero = Cli::try_parse_from(["x", "--pending-max-dids", "0"]).unwrap();
        let err = zero.users.to_config(false).unwrap_err().to_string();
        assert!(err.contains("PENDING_MAX_DIDS"), "{err}");
        let bad = Cli::try_parse_from(["x", "--plc-url", "plc.directory"]).unwrap();
        assert!(bad.users.to_config(false).is_err());
    }
}
