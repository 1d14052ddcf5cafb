//! Write stage: each batch in its own retrying transaction ([`txn::run_tx`] around
//! [`writer::apply`]), the cursor committed with its rows; after each commit, the durable
//! cursor is published to whoever resumes from it (the live client).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::batcher::Batch;
use super::{PipelineError, Stats};
use crate::cursor::CursorKey;
use crate::txn::{self, RetryPolicy};
use crate::writer::{self, WriteError};

/// What the write stage needs besides its input.
pub(super) struct WriteStage {
    pub pool: Pool,
    pub cursor: CursorKey,
    pub retry: RetryPolicy,
    pub stats: Arc<Stats>,
    /// Receives the durable cursor after every committed batch.
    pub durable: Option<watch::Sender<Option<i64>>>,
    /// Fires when the pipeline is dropped (lease lost): the transaction in flight is
    /// abandoned and rolls back, and no further batch is started. Retries are bounded by the
    /// policy; otherwise a batch in flight is finished or failed, never abandoned half-way.
    pub abort: CancellationToken,
}

impl WriteStage {
    /// Writes batches until the input ends, a batch fails for good, or `abort` fires.
    pub(super) async fn run(
        self,
        mut rx: super::queue::Receiver<Batch>,
    ) -> Result<(), PipelineError> {
        let Self {
            pool,
            cursor,
            retry,
            stats,
            durable,
            abort,
        } = self;
        loop {
            let batch = tokio::select! {
                biased;
                _ = abort.cancelled() => return Ok(()),
                b = rx.recv() => match b {
                    Some(b) => b,
                    None => return Ok(()),
                },
            };
            let started = std::time::Instant::now();
            let write = txn::run_tx(&pool, &retry, &abort, async |tx| -> Result<_, WriteError> {
                writer::apply(tx, &batch.events, batch.cursor(), &cursor).await
            });
            let applied = tokio::select! {
                biased;
                // Dropping the transaction before its commit rolls it back.
                _ = abort.cancelled() => return Ok(()),
                r = write => r.inspect_err(|e| {
                    tracing::error!(error = %e, attempts = e.attempts(), "batch failed; stopping without advancing the cursor");
                })?,
            };
            let flush = started.elapsed();
            stats
                .write_micros
                .fetch_add(flush.as_micros() as u64, Ordering::Relaxed);
            stats.add_batch(&batch, &applied, flush);
            if let (Some(tx), Some(seq)) = (&durable, applied.cursor) {
                tx.send_replace(Some(seq));
            }
        }
    }
}
