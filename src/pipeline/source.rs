//! Source stage: raw frames from fixture files or the live relay, handed on in chunks of
//! [`DECODE_CHUNK_FRAMES`] or `chunk_bytes` (a decode job's worth). Stops when cancelled or when the decode
//! stage is gone; what was handed on before is still written.

use std::path::PathBuf;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::queue::{self, Weigh};
use super::PipelineError;
use crate::firehose::fixture::{self, FrameReader, RawFrame};

/// Frames per decode job: large enough to amortise the hop to a blocking thread.
pub const DECODE_CHUNK_FRAMES: usize = 256;

/// Reads `paths` in order (on a blocking thread). A file whose framing breaks is counted and
/// ends there; the next file is read.
pub(super) fn read_files(
    paths: Vec<PathBuf>,
    max_frame_bytes: usize,
    chunk_bytes: usize,
    tx: queue::Sender<Vec<RawFrame>>,
    cancel: CancellationToken,
) -> Result<(), PipelineError> {
    for path in paths {
        let fail = |source| PipelineError::Fixture {
            path: path.display().to_string(),
            source,
        };
        let reader = fixture::open(&path).map_err(|e| fail(e.into()))?;
        let mut chunk = Vec::with_capacity(DECODE_CHUNK_FRAMES);
        let mut bytes = 0usize;
        for frame in FrameReader::new(reader, max_frame_bytes) {
            if cancel.is_cancelled() {
                return Ok(());
            }
            match frame {
                Ok(f) => {
                    bytes += f.bytes();
                    chunk.push(f);
                }
                Err(e) => {
                    // The framing is lost: what was read so far is still written.
                    tracing::error!(path = %path.display(), error = %e, "fixture file ends badly; stopping this file");
                    metrics::counter!(crate::metrics::FRAMES_MALFORMED_TOTAL, "reason" => "truncated_file").increment(1);
                    break;
                }
            }
            if chunk.len() == DECODE_CHUNK_FRAMES || bytes >= chunk_bytes {
                bytes = 0;
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

/// Forwards live WebSocket messages, as many as are queued (up to a chunk) at a time.
pub(super) async fn read_live(
    mut rx: mpsc::Receiver<Vec<u8>>,
    tx: queue::Sender<Vec<RawFrame>>,
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
        let chunk: Vec<RawFrame> = buf.drain(..).map(RawFrame::Message).collect();
        // What the live queue held a moment ago (it is bounded by count × frame limit).
        metrics::gauge!(crate::metrics::QUEUE_BYTES, "queue" => "live").set(chunk.bytes() as f64);
        if tx.send(chunk).await.is_err() {
            return Ok(());
        }
    }
}
