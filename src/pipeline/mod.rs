//! The ingest pipeline (§2): source → decode → batcher → writer, tasks joined by bounded
//! channels so a slow database slows the reader instead of growing memory. Fixture replay and
//! the live relay feed the same stages.

mod decode;
pub mod stats;
pub mod users;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::cursor::{self, CursorKey};
use crate::firehose::fixture::{self, FrameReader, RawFrame};
use crate::txn::{self, RetryPolicy, TxError};
use crate::writer::{self, Batch, WriteError};
pub use decode::DecodedChunk;
pub use stats::Stats;
pub use users::{UsersArgs, UsersConfig};

/// Ops per batch: §6 measured no gain past 5–10 k rows per batch, and smaller batches keep
/// transactions short.
pub const DEFAULT_BATCH_MAX_OPS: usize = 5_000;
/// A batch older than this is flushed even if small (bounds the lag at low traffic).
pub const DEFAULT_BATCH_MAX_AGE: Duration = Duration::from_millis(250);
/// Frames per decode job: large enough to amortise the hop to a blocking thread.
pub const DECODE_CHUNK_FRAMES: usize = 256;
/// Decode jobs in flight: one per core of the 2-core target machine.
pub const DECODE_PARALLELISM: usize = 2;
/// Raw chunks queued ahead of the decoder (4 × 256 frames × ≤ 5 MiB worst case, ~3 KB typical).
const RAW_QUEUE_CHUNKS: usize = 4;
/// Decoded chunks queued ahead of the batcher.
const DECODED_QUEUE_CHUNKS: usize = 4;
/// Batches queued ahead of the writer: one being built while one is written.
const BATCH_QUEUE: usize = 1;

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub batch_max_ops: usize,
    pub batch_max_age: Duration,
    pub max_frame_bytes: usize,
    pub cursor: CursorKey,
    /// Retries and time limit of each batch's transaction (§6).
    pub retry: RetryPolicy,
    /// Users stage: pending-op maps and identity resolution (off by default).
    pub users: UsersConfig,
}

impl PipelineConfig {
    pub fn new(cursor: CursorKey) -> Self {
        Self {
            batch_max_ops: DEFAULT_BATCH_MAX_OPS,
            batch_max_age: DEFAULT_BATCH_MAX_AGE,
            max_frame_bytes: crate::firehose::frame::DEFAULT_MAX_FRAME_BYTES,
            cursor,
            retry: RetryPolicy::default(),
            users: UsersConfig::default(),
        }
    }
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
    #[error("a pipeline task failed: {0}")]
    Task(String),
}

/// Runs the pipeline until the input ends or `cancel` fires; everything read is written
/// before it returns (drain), and the cursor covers exactly what was written.
/// `creator` is the users stage's (from [`UsersConfig::creator`]; `None`: pass-through);
/// `durable` receives the durable cursor after every committed batch (the live client
/// resumes from it).
///
/// Dropping the returned future aborts every stage at once (no drain): a leader that lost its
/// lease stops writing this way. An aborted transaction rolls back.
pub async fn run(
    pool: Pool,
    cfg: PipelineConfig,
    input: Input,
    creator: Option<crate::identity::UserCreator>,
    durable: Option<watch::Sender<Option<i64>>>,
    cancel: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), PipelineError> {
    let (raw_tx, raw_rx) = mpsc::channel::<Vec<RawFrame>>(RAW_QUEUE_CHUNKS);
    let (dec_tx, dec_rx) = mpsc::channel::<DecodedChunk>(DECODED_QUEUE_CHUNKS);
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(BATCH_QUEUE);

    let source = match input {
        Input::Files(paths) => {
            let cancel = cancel.clone();
            let max = cfg.max_frame_bytes;
            AbortOnDropHandle::new(tokio::task::spawn_blocking(move || {
                read_files(paths, max, raw_tx, cancel)
            }))
        }
        Input::Live(rx) => {
            AbortOnDropHandle::new(tokio::spawn(read_live(rx, raw_tx, cancel.clone())))
        }
    };
    let decoder = AbortOnDropHandle::new(tokio::spawn(decode_stage(raw_rx, dec_tx, stats.clone())));
    let (users_rx, users) = users::spawn(
        dec_rx,
        DECODED_QUEUE_CHUNKS,
        pool.clone(),
        creator,
        &cfg.users,
        cancel.clone(),
        stats.clone(),
    )?;
    let users = AbortOnDropHandle::new(users);
    let batcher = AbortOnDropHandle::new(tokio::spawn(batch_stage(
        users_rx,
        batch_tx,
        cfg.batch_max_ops,
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
        let (cursor, retry, rt) = (
            cfg.cursor.clone(),
            cfg.retry.clone(),
            tokio::runtime::Handle::current(),
        );
        tokio::task::spawn_blocking(move || {
            rt.block_on(write_stage(
                pool, batch_rx, cursor, retry, stats, durable, abort,
            ))
        })
    };

    // The writer's result decides: if it fails, upstream stages stop when their channel closes.
    let write_result = writer
        .await
        .map_err(|e| PipelineError::Task(e.to_string()))?;
    if write_result.is_err() {
        cancel.cancel();
    }
    let source_result = source
        .await
        .map_err(|e| PipelineError::Task(e.to_string()))?;
    decoder
        .await
        .map_err(|e| PipelineError::Task(e.to_string()))?;
    users
        .await
        .map_err(|e| PipelineError::Task(e.to_string()))?;
    batcher
        .await
        .map_err(|e| PipelineError::Task(e.to_string()))?;
    write_result?;
    source_result
}

fn read_files(
    paths: Vec<PathBuf>,
    max_frame_bytes: usize,
    tx: mpsc::Sender<Vec<RawFrame>>,
    cancel: CancellationToken,
) -> Result<(), PipelineError> {
    for path in paths {
        let fail = |source| PipelineError::Fixture {
            path: path.display().to_string(),
            source,
        };
        let reader = fixture::open(&path).map_err(|e| fail(e.into()))?;
        let mut chunk = Vec::with_capacity(DECODE_CHUNK_FRAMES);
        for frame in FrameReader::new(reader, max_frame_bytes) {
            if cancel.is_cancelled() {
                return Ok(());
            }
            match frame {
                Ok(f) => chunk.push(f),
                Err(e) => {
                    // The framing is lost: what was read so far is still written.
                    tracing::error!(path = %path.display(), error = %e, "fixture file ends badly; stopping this file");
                    metrics::counter!(crate::metrics::FRAMES_MALFORMED_TOTAL, "reason" => "truncated_file").increment(1);
                    break;
                }
            }
            if chunk.len() == DECODE_CHUNK_FRAMES {
                let full = std::mem::replace(&mut chunk, Vec::with_capacity(DECODE_CHUNK_FRAMES));
                if tx.blocking_send(full).is_err() {
                    return Ok(());
                }
            }
        }
        if !chunk.is_empty() && tx.blocking_send(chunk).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

async fn read_live(
    mut rx: mpsc::Receiver<Vec<u8>>,
    tx: mpsc::Sender<Vec<RawFrame>>,
    cancel: CancellationToken,
) -> Result<(), PipelineError> {
    let mut buf = Vec::with_capacity(DECODE_CHUNK_FRAMES);
    loop {
        let n = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            n = rx.recv_many(&mut buf, DECODE_CHUNK_FRAMES) => n,
        };
        if n == 0 {
            return Ok(());
        }
        let chunk = buf.drain(..).map(RawFrame::Message).collect();
        if tx.send(chunk).await.is_err() {
            return Ok(());
        }
    }
}

async fn decode_stage(
    raw_rx: mpsc::Receiver<Vec<RawFrame>>,
    dec_tx: mpsc::Sender<DecodedChunk>,
    stats: Arc<Stats>,
) {
    let chunks =
        futures_util::stream::unfold(
            raw_rx,
            |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
        );
    let mut decoded = std::pin::pin!(chunks
        .map(|chunk| tokio::task::spawn_blocking(move || decode::decode_chunk(chunk)))
        .buffered(DECODE_PARALLELISM));
    while let Some(res) = decoded.next().await {
        match res {
            Ok(chunk) => {
                stats.add_chunk(&chunk.counts);
                if dec_tx.send(chunk).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "decode job failed");
                return;
            }
        }
    }
}

async fn batch_stage(
    mut rx: mpsc::Receiver<DecodedChunk>,
    tx: mpsc::Sender<Batch>,
    max_ops: usize,
    max_age: Duration,
) {
    let mut batch = Batch::default();
    let mut ops = 0usize;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let next = match deadline {
            Some(d) => tokio::select! {
                c = rx.recv() => Some(c),
                _ = tokio::time::sleep_until(d) => None,
            },
            None => Some(rx.recv().await),
        };
        match next {
            Some(Some(chunk)) => {
                let mut events = chunk.events.into_iter();
                while let Some(ev) = events.next() {
                    ops += ev.weight();
                    batch.push(ev);
                    deadline.get_or_insert_with(|| tokio::time::Instant::now() + max_age);
                    if ops >= max_ops {
                        batch.watermark =
                            cursor::watermark_before(chunk.watermark, events.as_slice());
                        if tx.send(std::mem::take(&mut batch)).await.is_err() {
                            return;
                        }
                        ops = 0;
                        deadline = None;
                    }
                }
                batch.watermark = chunk.watermark.or(batch.watermark);
            }
            // Input ended: flush what is left.
            Some(None) => {
                if !batch.is_empty() {
                    let _ = tx.send(batch).await;
                }
                return;
            }
            // Age limit reached.
            None => {
                if !batch.is_empty() && tx.send(std::mem::take(&mut batch)).await.is_err() {
                    return;
                }
                ops = 0;
                deadline = None;
            }
        }
    }
}

async fn write_stage(
    pool: Pool,
    mut rx: mpsc::Receiver<Batch>,
    cursor: CursorKey,
    retry: RetryPolicy,
    stats: Arc<Stats>,
    durable: Option<watch::Sender<Option<i64>>>,
    // Retries are bounded by the policy; a batch in flight is finished or failed, never
    // abandoned half-way, unless the pipeline is dropped (lease lost): then it rolls back.
    abort: CancellationToken,
) -> Result<(), PipelineError> {
    while let Some(batch) = rx.recv().await {
        let started = std::time::Instant::now();
        let applied = txn::run_tx(&pool, &retry, &abort, async |tx| -> Result<_, WriteError> {
            writer::apply(tx, &batch, &cursor).await
        })
        .await
        .inspect_err(|e| {
            tracing::error!(error = %e, attempts = e.attempts(), "batch failed; stopping without advancing the cursor");
        })?;
        let flush = started.elapsed();
        stats.write_micros.fetch_add(
            flush.as_micros() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        stats.add_batch(&batch, &applied, flush);
        if let (Some(tx), Some(seq)) = (&durable, applied.cursor) {
            tx.send_replace(Some(seq));
        }
    }
    Ok(())
}
