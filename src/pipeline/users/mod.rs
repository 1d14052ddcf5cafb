//! Users stage (§4, §5): between decode and the batcher, makes sure every DID has its user
//! created before its events reach the writer.
//!
//! - A DID known to have an actor row (bounded LRU set) passes straight through.
//! - A new DID's events wait in a [`PendingOps`] map while a task of the stage creates the user
//!   ([`create`]): it checks the `actors` row first (already resolved or scheduled ⇒ known, no
//!   network), else runs [`UserCreator::create`] under the semaphore and writes the outcome
//!   (the `actors` SQL lives in `identity::store`). The result comes back over a bounded
//!   channel and the DID's events are released downstream in their original order
//!   ([`stage`]).
//! - Reaching a bound of the map never drops data: the evicted or overflowing DID's events are
//!   released at once, its creation is cancelled and the user is a stub whose resolution is
//!   scheduled (`next_resolve_at`, [`schedule`]) for the re-resolution job
//!   ([`crate::jobs::run_reresolve`]).
//! - Every forwarded chunk carries a low watermark: the highest seq S such that every event
//!   with seq ≤ S has been forwarded. The writer stores it as the cursor instead of the batch's
//!   last seq, so the durable cursor never passes an event that only lives in a pending map.
//! - `#identity` events invalidate the resolver's caches and refresh the actor in the
//!   background.
//! - The stage owns every task it starts: creations and refreshes live in its `JoinSet`, the
//!   scheduling task behind an abort-on-drop handle, so aborting the stage's task (dropping
//!   the pipeline, e.g. when a leader loses its lease) stops all of them: nothing of the old
//!   term writes `actors` afterwards.
//! - With identity resolution off (offline replay) the stage passes chunks through untouched
//!   and the writer creates stub users as before.

mod config;
mod create;
mod schedule;
mod stage;

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use super::{queue, DecodedChunk, Stats};
use crate::budget::MemoryBudget;
use crate::identity::{IdentityError, UserCreator};
use crate::pending::{PendingConfig, PendingError, PendingOps};
pub use config::{
    UsersArgs, UsersConfig, DEFAULT_KNOWN_DIDS, DEFAULT_RESOLVE_IDENTITIES_REPLAY,
    DEFAULT_RESOLVE_IDENTITIES_RUN, DEFAULT_RESOLVE_TIMEOUT_MS,
};

/// Finished creations queued back to the stage (tasks park when it is full).
const DONE_QUEUE: usize = 1024;
/// Creation tasks talking to the database at once: leaves the rest of the pool to the writer.
const DB_CONCURRENCY: usize = 2;

/// Errors of the users stage and its configuration.
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
/// Aborting the returned task stops everything the stage started (creations, resolutions in
/// flight, the scheduler); the pipeline holds it in an `AbortOnDropHandle`.
pub(crate) fn spawn(
    rx: queue::Receiver<DecodedChunk>,
    budget: &MemoryBudget,
    pool: Pool,
    creator: Option<UserCreator>,
    cfg: &UsersConfig,
    cancel: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(queue::Receiver<DecodedChunk>, JoinHandle<()>), UsersError> {
    let (tx, out) = queue::channel("users", super::DECODED_QUEUE_CHUNKS, budget.users_queue());
    let Some(creator) = creator else {
        return Ok((out, tokio::spawn(pass_through(rx, tx))));
    };
    // The budget decides the byte bound of the map (its other bounds are flags).
    let pending = PendingOps::new(PendingConfig {
        max_bytes: budget.pending(),
        ..cfg.pending
    })?;
    let known = NonZeroUsize::new(cfg.known_dids).ok_or(UsersError::Invalid {
        flag: "known-DID set size",
        value: "0".into(),
        reason: "must be at least 1",
    })?;
    let (done_tx, done_rx) = mpsc::channel(DONE_QUEUE);
    let (sched_tx, sched_rx) = mpsc::channel(schedule::SCHEDULE_QUEUE);
    // Aborted with the stage's task: a dropped pipeline schedules nothing more.
    let scheduler = AbortOnDropHandle::new(tokio::spawn(schedule::schedule_task(
        pool.clone(),
        sched_rx,
        stats.clone(),
    )));
    let stage = stage::Stage::new(stage::Parts {
        pool,
        creator,
        pending,
        known: stage::KnownDids::new(known, budget.known_dids()),
        done_tx,
        db_permits: Arc::new(Semaphore::new(DB_CONCURRENCY)),
        sched_tx,
        stats,
    });
    let task = tokio::spawn(async move {
        stage.run(rx, done_rx, tx, cancel).await;
        // The stage dropped its scheduling sender: the task ends once the queue is written.
        if let Err(e) = scheduler.await {
            tracing::error!(error = %e, "stub scheduling task failed");
        }
    });
    Ok((out, task))
}

async fn pass_through(mut rx: queue::Receiver<DecodedChunk>, tx: queue::Sender<DecodedChunk>) {
    while let Some(chunk) = rx.recv().await {
        if tx.send(chunk).await.is_err() {
            return;
        }
    }
}
