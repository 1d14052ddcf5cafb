//! The ingest pipeline (§2): one task per stage, joined by bounded channels so a slow
//! database slows the reader instead of growing memory. Fixture replay and the live relay
//! feed the same stages.
//!
//! ```text
//!  source    fixture files or live messages, in chunks              (source.rs)
//!    │ raw chunks (queue 4)
//!  decode    CBOR/CAR on blocking threads, order kept; bad frames   (decode.rs)
//!    │ decoded chunks (4)    skipped, counted, logged once per run
//!  users     a new DID's events wait in a pending-op map while its  (users.rs)
//!    │ chunks + low watermark (4)   user is created; off: pass-through
//!  batcher   a batch per `batch_max_ops`, its byte share or         (batcher.rs)
//!    │ batches (1)          `batch_max_age`
//!
//!  Every queue is bounded in items (above) and in bytes (its share of the memory budget,
//!  `crate::budget`, enforced by `queue.rs`).
//!  write     one transaction per batch, its cursor included         (write.rs → writer)
//!    └──▶ durable cursor (watch): where the live client resumes
//! ```
//!
//! This file holds the configuration, the wiring and the rules of a run ([`run`]): it drains
//! on cancel, and stops without a drain when dropped.

mod batcher;
mod decode;
pub(crate) mod queue;
mod source;
pub mod stats;
pub mod users;
mod verify;
mod write;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::budget::MemoryBudget;
use crate::cursor::CursorKey;
use crate::firehose::fixture::{self, RawFrame};
use crate::firehose::CommitLimits;
use crate::identity::{Resolver, UserCreator};
use crate::resync::Held;
use crate::txn::{RetryPolicy, TxError};
use crate::writer::WriteError;
use batcher::Batch;
pub use batcher::{DEFAULT_BATCH_MAX_AGE, DEFAULT_BATCH_MAX_OPS};
pub use decode::DecodedChunk;
pub use stats::Stats;
pub use users::{UsersArgs, UsersConfig};
pub use verify::{
    VerifyArgs, VerifyStats, DEFAULT_VERIFY_CACHE_REPOS, DEFAULT_VERIFY_COMMITS_REPLAY,
    DEFAULT_VERIFY_COMMITS_RUN,
};

/// Raw chunks queued ahead of the decoder (4 × 256 frames × ≤ 5 MiB worst case, ~3 KB typical).
const RAW_QUEUE_CHUNKS: usize = 4;
/// Decoded chunks queued ahead of the batcher.
const DECODED_QUEUE_CHUNKS: usize = 4;
/// Batches queued ahead of the writer: one being built while one is written.
const BATCH_QUEUE: usize = 1;

/// Writer lanes by default: two. One PostgreSQL backend applying a batch at a time is the
/// bottleneck; on the 2-core benchmark machine with nothing else running, two lanes replayed the
/// bench corpus at 26.3 k events/s against 21.4 k with one (medians of 4 interleaved runs; three
/// lanes 25.5 k), for ~6 % more PostgreSQL CPU (README, Performance). When other work held the
/// second core the two were within the noise. At live rates the cost is two more small commits
/// per batch.
pub const DEFAULT_WRITER_LANES: usize = 2;
/// Upper bound of `--writer-lanes` (each lane holds a connection of the pool).
pub const MAX_WRITER_LANES: usize = 16;

/// Settings of a run (plain values; the live handles are [`PipelineHandles`]).
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub batch_max_ops: usize,
    pub batch_max_age: Duration,
    pub max_frame_bytes: usize,
    /// Sync-spec limits each commit is held to when decoded (§3).
    pub limits: CommitLimits,
    /// The memory budget the queues, maps and caches share ([`crate::budget`]).
    pub budget: MemoryBudget,
    pub cursor: CursorKey,
    /// Retries and time limit of each batch's transaction (§6).
    pub retry: RetryPolicy,
    /// Users stage: pending-op maps and identity resolution (off by default).
    pub users: UsersConfig,
    /// Verify every `#commit` and `#sync` before writing it (§12); keys are resolved with
    /// `users.identity`'s PLC and network settings.
    pub verify_commits: bool,
    /// Repos whose head and key the verify stage caches.
    pub verify_cache_repos: usize,
    /// Writer lanes (§6): each batch's DIDs split over this many concurrent transactions.
    pub writer_lanes: usize,
}

impl PipelineConfig {
    pub fn new(cursor: CursorKey) -> Self {
        Self {
            batch_max_ops: DEFAULT_BATCH_MAX_OPS,
            batch_max_age: DEFAULT_BATCH_MAX_AGE,
            max_frame_bytes: crate::firehose::frame::DEFAULT_MAX_FRAME_BYTES,
            limits: CommitLimits::default(),
            budget: MemoryBudget::default(),
            cursor,
            retry: RetryPolicy::default(),
            users: UsersConfig::default(),
            verify_commits: false,
            verify_cache_repos: verify::DEFAULT_VERIFY_CACHE_REPOS,
            writer_lanes: DEFAULT_WRITER_LANES,
        }
    }
}

impl PipelineConfig {
    /// Sets the users stage, its identity caches bounded by this config's memory budget.
    pub fn set_users(&mut self, mut users: UsersConfig) {
        users.identity.cache_max_bytes = self.budget.identity_caches();
        self.users = users;
    }
}

/// Live handles one run uses and shares with its caller; not configuration, and not `Clone`.
#[derive(Debug, Default)]
pub struct PipelineHandles {
    /// Receives the durable cursor after every committed batch (the live client resumes from it).
    pub durable: Option<watch::Sender<Option<i64>>>,
    /// The user creator to share (one semaphore and cache with the re-resolution job). `None`:
    /// the users stage builds its own from [`UsersConfig`].
    pub creator: Option<UserCreator>,
    /// Live events held for repos in resync (§12), shared with the resync workers: the verify
    /// stage holds there, the writer keeps the durable cursor below what is held. `None`: no
    /// resync runs, events of repos awaiting one are left to it.
    pub held: Option<Arc<Held>>,
}

/// Where frames come from.
pub enum Input {
    /// Fixture files, in order.
    Files(Vec<PathBuf>),
    /// Live WebSocket messages.
    Live(mpsc::Receiver<Vec<u8>>),
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("reading {path}: {source}")]
    Fixture {
        path: String,
        #[source]
        source: fixture::FixtureError,
    },
    #[error("writing a batch failed; the cursor was not advanced: {0}")]
    Write(#[from] TxError<WriteError>),
    #[error("users stage: {0}")]
    Users(#[from] users::UsersError),
    #[error("verify stage: no database connection: {0}")]
    VerifyPool(deadpool_postgres::PoolError),
    #[error("verify stage: {0}")]
    VerifyDb(tokio_postgres::Error),
    #[error("verify stage: the identity resolver could not be built: {0}")]
    VerifyResolver(#[from] crate::identity::IdentityError),
    #[error("pipeline task {task} failed: {source}")]
    Task {
        task: &'static str,
        #[source]
        source: JoinError,
    },
}

/// Runs the pipeline until the input ends or `cancel` fires; everything read is written
/// before it returns (drain), and the cursor covers exactly what was written.
///
/// Dropping the returned future stops the stages at once, without a drain (a leader that
/// lost its lease stops writing this way): the async stage tasks are aborted, the file reader
/// ends at its next hand-off, and the writer abandons its transaction, which rolls back, and
/// starts no other. (User creations the users stage spawned are not tied to its task yet.)
pub async fn run(
    pool: Pool,
    cfg: PipelineConfig,
    handles: PipelineHandles,
    input: Input,
    cancel: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), PipelineError> {
    let creator = match handles.creator {
        Some(shared) => shared.is_enabled().then_some(shared),
        None => cfg.users.creator()?,
    };
    let budget = cfg.budget;
    budget.publish();
    let (raw_tx, raw_rx) =
        queue::channel::<Vec<RawFrame>>("raw", RAW_QUEUE_CHUNKS, budget.raw_queue());
    let (dec_tx, dec_rx) =
        queue::channel::<DecodedChunk>("decoded", DECODED_QUEUE_CHUNKS, budget.decoded_queue());
    let (batch_tx, batch_rx) = queue::channel::<Batch>("batches", BATCH_QUEUE, budget.batch());

    let source = match input {
        Input::Files(paths) => {
            let cancel = cancel.clone();
            let max = cfg.max_frame_bytes;
            // A decode job's worth: the raw queue holds `RAW_QUEUE_CHUNKS` of them.
            let chunk_bytes = budget.raw_queue() / RAW_QUEUE_CHUNKS;
            AbortOnDropHandle::new(tokio::task::spawn_blocking(move || {
                source::read_files(paths, max, chunk_bytes, raw_tx, cancel)
            }))
        }
        Input::Live(rx) => {
            AbortOnDropHandle::new(tokio::spawn(source::read_live(rx, raw_tx, cancel.clone())))
        }
    };
    // This run's own log-once set: another pipeline in the process logs its own bad frames.
    let logged = Arc::new(decode::LoggedReasons::default());
    let decoder = AbortOnDropHandle::new(tokio::spawn(decode::run(
        raw_rx,
        dec_tx,
        stats.clone(),
        cfg.limits,
        logged,
    )));
    let shared_resolver = creator.as_ref().and_then(|c| c.resolver()).cloned();
    let (users_rx, users) = users::spawn(
        dec_rx,
        &budget,
        pool.clone(),
        creator,
        &cfg.users,
        cancel.clone(),
        stats.clone(),
    )?;
    let users = AbortOnDropHandle::new(users);
    let (verified_rx, verifier) = if cfg.verify_commits {
        let resolver = match shared_resolver {
            Some(shared) => shared,
            None => Arc::new(Resolver::new(cfg.users.identity.clone())?),
        };
        let (tx, rx) = queue::channel::<DecodedChunk>(
            "verified",
            DECODED_QUEUE_CHUNKS,
            budget.verified_queue(),
        );
        let stage = verify::VerifyStage::new(
            pool.clone(),
            resolver,
            cfg.verify_cache_repos,
            stats.verify.clone(),
            handles.held.clone(),
        );
        let task = AbortOnDropHandle::new(tokio::spawn(stage.run(users_rx, tx)));
        (rx, Some(task))
    } else {
        (users_rx, None)
    };
    let batcher = AbortOnDropHandle::new(tokio::spawn(batcher::run(
        verified_rx,
        batch_tx,
        cfg.batch_max_ops,
        budget.batch(),
        cfg.batch_max_age,
    )));
    // Cancelled when this future is dropped: the writer (on a blocking thread, which
    // `AbortOnDropHandle` cannot stop) then abandons its transaction, which rolls back.
    let abort = CancellationToken::new();
    let _abort_on_drop = abort.clone().drop_guard();
    // The writer runs on its own blocking thread, driving its future with `block_on`: the
    // retrying transaction takes an async closure over a borrowed transaction, and rustc
    // cannot yet prove such futures `Send` for `tokio::spawn` (higher-ranked lifetime bug).
    // IO and timers still run on the runtime's workers.
    let writer = {
        let stage = write::WriteStage {
            pool,
            cursor: cfg.cursor.clone(),
            retry: cfg.retry.clone(),
            stats,
            lanes: cfg.writer_lanes,
            durable: handles.durable,
            held: handles.held,
            abort,
        };
        let rt = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || rt.block_on(stage.run(batch_rx)))
    };

    // The writer's result decides: if it fails, upstream stages stop when their channel closes.
    let write_result = writer.await.map_err(|source| PipelineError::Task {
        task: "writer",
        source,
    })?;
    if write_result.is_err() {
        cancel.cancel();
    }
    let joined = |task| move |source| PipelineError::Task { task, source };
    let source_result = source.await.map_err(joined("source"))?;
    let decode_result = decoder.await.map_err(joined("decoder"))?;
    users.await.map_err(joined("users stage"))?;
    let verify_result = match verifier {
        Some(task) => task.await.map_err(joined("verify stage"))?,
        None => Ok(()),
    };
    batcher.await.map_err(joined("batcher"))?;
    write_result?;
    verify_result?;
    source_result?;
    decode_result
}
