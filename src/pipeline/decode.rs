//! Decode stage: chunks of raw frames are decoded on blocking threads, several chunks at
//! once, and handed on in their original order (so per-repo op order is kept). Bad frames
//! are skipped and counted; each reason is logged once per pipeline run ([`LoggedReasons`]).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;

use super::queue;
use super::stats::{ChunkCounts, Stats};
use super::PipelineError;
use crate::firehose::fixture::RawFrame;
use crate::firehose::frame::{self, FrameError};
use crate::firehose::{CommitLimits, Event, EventKind};

/// Decode jobs in flight: one per core of the 2-core target machine.
pub const DECODE_PARALLELISM: usize = 2;

/// A decoded chunk: the good events in order, plus counts.
#[derive(Debug, Default)]
pub struct DecodedChunk {
    pub events: Vec<Event>,
    pub counts: ChunkCounts,
    /// Low watermark set by the users stage (§4): every event with seq ≤ it has been
    /// forwarded. `None` when the stage is off (the batch's last seq is the cursor).
    pub watermark: Option<i64>,
}

/// The bad-frame reasons one pipeline run has logged: each kind of bad frame is logged once,
/// then only counted (§3). Bounded by construction: reasons are the fixed labels of
/// [`FrameError::reason`].
#[derive(Debug, Default)]
pub(crate) struct LoggedReasons(Mutex<HashSet<&'static str>>);

impl LoggedReasons {
    fn log_once(&self, reason: &'static str, err: &FrameError) {
        // A poisoned lock only means another decode job panicked while inserting a label.
        let mut logged = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if logged.insert(reason) {
            tracing::warn!(reason, error = %err, "skipping malformed frame (further frames with this reason are only counted)");
        }
    }

    /// Logs the first commit of a run skipped for `reason` (a limit of §3); later ones are
    /// only counted.
    fn log_over_limit_once(&self, reason: &'static str, seq: i64, did: &str) {
        let mut logged = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if logged.insert(reason) {
            tracing::warn!(reason, seq, did, "skipping a commit over a decode limit; its repo is marked for resync (further commits with this reason are only counted)");
        }
    }
}

/// Runs until the raw input ends or the next stage is gone. A decode job that panics is an
/// error: the stage stops there, and what was decoded before it is still written.
pub(super) async fn run(
    raw_rx: queue::Receiver<Vec<RawFrame>>,
    dec_tx: queue::Sender<DecodedChunk>,
    stats: Arc<Stats>,
    limits: CommitLimits,
    logged: Arc<LoggedReasons>,
) -> Result<(), PipelineError> {
    run_with(raw_rx, dec_tx, stats, move |frames| {
        decode_chunk(frames, &limits, &logged)
    })
    .await
}

async fn run_with<F>(
    raw_rx: queue::Receiver<Vec<RawFrame>>,
    dec_tx: queue::Sender<DecodedChunk>,
    stats: Arc<Stats>,
    decode: F,
) -> Result<(), PipelineError>
where
    F: Fn(Vec<RawFrame>) -> DecodedChunk + Clone + Send + 'static,
{
    let chunks =
        futures_util::stream::unfold(
            raw_rx,
            |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
        );
    let mut decoded = std::pin::pin!(chunks
        .map(|chunk| {
            let decode = decode.clone();
            tokio::task::spawn_blocking(move || decode(chunk))
        })
        .buffered(DECODE_PARALLELISM));
    while let Some(res) = decoded.next().await {
        let chunk = res.map_err(|source| PipelineError::Task {
            task: "decode job",
            source,
        })?;
        stats.add_chunk(&chunk.counts);
        if dec_tx.send(chunk).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Decodes `frames` holding commits to `limits`, skipping and counting bad ones (logged once
/// per reason in `logged`).
pub(crate) fn decode_chunk(
    frames: Vec<RawFrame>,
    limits: &CommitLimits,
    logged: &LoggedReasons,
) -> DecodedChunk {
    let started = std::time::Instant::now();
    let mut out = DecodedChunk {
        events: Vec::with_capacity(frames.len()),
        ..DecodedChunk::default()
    };
    for raw in frames {
        out.counts.tally.frames += 1;
        let result = match raw {
            RawFrame::Message(m) => frame::decode_with(&m, limits),
            RawFrame::Oversized { len } => Err(FrameError::Oversized(len)),
        };
        match result {
            Ok(d) => {
                out.counts.tally.add_event(&d);
                match &d.event.kind {
                    EventKind::Commit(c) if c.too_big => out.counts.too_big += 1,
                    EventKind::Commit(c) => {
                        if let Some(over) = c.over_limit {
                            logged.log_over_limit_once(over.reason(), d.event.seq, &c.repo);
                        }
                    }
                    EventKind::Info { name, message } => {
                        tracing::warn!(name = %name, message = ?message, "relay sent #info");
                    }
                    EventKind::Error { error, message } => {
                        tracing::warn!(error = %error, message = ?message, "relay sent an error frame");
                    }
                    _ => {}
                }
                out.events.push(d.event);
            }
            Err(e) => {
                let reason = e.reason();
                logged.log_once(reason, &e);
                out.counts.tally.add_skipped(reason);
            }
        }
    }
    out.counts.decode_micros = started.elapsed().as_micros() as u64;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Log output captured by a thread-local subscriber.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn oversized(n: usize) -> Vec<RawFrame> {
        (0..n)
            .map(|_| RawFrame::Oversized { len: 1 << 30 })
            .collect()
    }

    #[test]
    fn each_pipeline_logs_its_first_bad_frame_of_a_reason() {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        // Two pipelines in one process: each run owns its set.
        let (first, second) = (LoggedReasons::default(), LoggedReasons::default());
        let skipped = tracing::subscriber::with_default(subscriber, || {
            let a = decode_chunk(oversized(2), &CommitLimits::default(), &first);
            let a_again = decode_chunk(oversized(2), &CommitLimits::default(), &first);
            let b = decode_chunk(oversized(2), &CommitLimits::default(), &second);
            [a, a_again, b].map(|c| c.counts.tally.skipped_total())
        });
        assert_eq!(skipped, [2, 2, 2], "every bad frame is counted");
        let out = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        let logged: Vec<&str> = out
            .lines()
            .filter(|l| l.contains("skipping malformed frame"))
            .collect();
        assert_eq!(logged.len(), 2, "one line per pipeline and reason: {out}");
        assert!(logged.iter().all(|l| l.contains("reason=\"oversized\"")));
    }

    #[tokio::test]
    async fn a_panicking_decode_job_is_an_error_not_the_end_of_the_input() {
        let (raw_tx, raw_rx) = queue::channel("t", 4, 1 << 20);
        let (dec_tx, mut dec_rx) = queue::channel("t", 4, 1 << 20);
        for n in [1, 2, 1] {
            assert!(raw_tx.send(oversized(n)).await.is_ok());
        }
        drop(raw_tx);
        let logged = Arc::new(LoggedReasons::default());
        let result = run_with(raw_rx, dec_tx, Arc::new(Stats::default()), move |frames| {
            // Stands in for a decoder bug hit by one chunk.
            assert!(frames.len() < 2, "decoder bug");
            decode_chunk(frames, &CommitLimits::default(), &logged)
        })
        .await;
        let Err(PipelineError::Task { task, source }) = result else {
            panic!("a panic in a decode job must fail the stage: {result:?}");
        };
        assert_eq!(task, "decode job");
        assert!(source.is_panic());
        // The chunk before the panic was handed on; nothing after it.
        assert_eq!(dec_rx.recv().await.map(|c| c.counts.tally.frames), Some(1));
        assert!(dec_rx.recv().await.is_none());
    }
}
