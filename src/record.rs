//! `record`: writes a live relay's messages to a fixture file, byte for byte, in the varint-framed
//! fixture format. Reconnects resume after the last seq written, so the file has no gaps or
//! duplicates across relay restarts.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

use crate::firehose::cbor;
use crate::firehose::client::{self, ClientConfig, ClientError};
use crate::firehose::fixture::FrameWriter;

/// Frames buffered between the socket and the file: enough to absorb a slow disk for a moment.
const RECORD_CHANNEL_CAPACITY: usize = 1024;
/// File write buffer; writes are small and sequential.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

/// Record errors.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("relay client task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// What to record; the CLI fills this in.
#[derive(Clone, Debug)]
pub struct RecordArgs {
    pub client: ClientConfig,
    /// Output fixture file (created or truncated).
    pub out_path: PathBuf,
    /// Resume after this seq; `None` starts wherever the relay starts (live tail).
    pub cursor: Option<i64>,
    /// Stop after this many frames.
    pub max_frames: Option<u64>,
    /// Stop after this long.
    pub max_duration: Option<Duration>,
}

/// [`record`] with its arguments in one struct.
pub async fn record_args(args: RecordArgs, cancel: CancellationToken) -> Result<u64, RecordError> {
    record(
        args.client,
        &args.out_path,
        args.cursor,
        args.max_frames,
        args.max_duration,
        cancel,
    )
    .await
}

/// `record` from the command line: SIGTERM/SIGINT stop recording; what was received is
/// written and the file flushed (then `Ok`).
pub(crate) async fn record_command(opts: &RecordOptions) -> Result<u64, RecordError> {
    let cancel = CancellationToken::new();
    let _signals = crate::signals::install(cancel.clone()).map_err(RecordError::Signals)?;
    let n = record_args(opts.to_args(), cancel).await?;
    tracing::info!(frames = n, file = %opts.out.display(), "recorded");
    Ok(n)
}

/// Records until `max_frames`, `max_duration`, `cancel`, or a permanent client error; returns
/// the number of frames written. The file is flushed on every clean stop.
pub async fn record(
    cfg: ClientConfig,
    out_path: &Path,
    cursor: Option<i64>,
    max_frames: Option<u64>,
    max_duration: Option<Duration>,
    cancel: CancellationToken,
) -> Result<u64, RecordError> {
    let io_err = |source| RecordError::Io {
        path: out_path.to_owned(),
        source,
    };
    // Checked before the file is created, so a bad URL leaves nothing behind.
    client::subscribe_url(&cfg.relay_url, cursor)?;
    let file = File::create(out_path).map_err(io_err)?;
    let mut writer = FrameWriter::new(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file));

    let (cursor_tx, cursor_rx) = watch::channel(cursor);
    let (tx, mut rx) = mpsc::channel(RECORD_CHANNEL_CAPACITY);
    let client_cancel = cancel.child_token();
    // Owned: dropping this future (or returning early) stops the client too.
    let client_task = AbortOnDropHandle::new(tokio::spawn(client::run(
        cfg,
        cursor_rx,
        tx,
        client_cancel.clone(),
    )));
    let deadline = max_duration.map(|d| Instant::now() + d);

    let mut written: u64 = 0;
    while max_frames.is_none_or(|m| written < m) {
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            _ = until(deadline) => break,
            m = rx.recv() => m,
        };
        // The client only stops on its own for a permanent error, reported below.
        let Some(msg) = msg else { break };
        // A small synchronous write into a large buffer: not worth a blocking-pool hop.
        writer.write_frame(&msg).map_err(io_err)?;
        written += 1;
        if let Some(seq) = peek_seq(&msg) {
            cursor_tx.send_replace(Some(seq));
        }
    }
    client_cancel.cancel();
    let client_result = client_task.await;
    writer.flush().map_err(io_err)?;
    tracing::info!(path = %out_path.display(), frames = written, "recording finished");
    client_result??;
    Ok(written)
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[derive(Deserialize)]
struct SeqOnly {
    #[serde(default)]
    seq: Option<i64>,
}

/// The `seq` of a subscribeRepos message without decoding the rest of the body; `None` for
/// frames without one (`#info`, error frames) or that do not parse.
fn peek_seq(msg: &[u8]) -> Option<i64> {
    let hlen = cbor::item_len(msg).ok()?;
    let s: SeqOnly = serde_ipld_dagcbor::from_slice(msg.get(hlen..)?).ok()?;
    s.seq.filter(|s| *s > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeks_seq_of_fixture_frames() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/firehose/small.frames");
        let reader = crate::firehose::fixture::open(&path).unwrap();
        let frames = crate::firehose::fixture::FrameReader::new(reader, 1 << 24);
        for (i, f) in frames.take(50).enumerate() {
            let crate::firehose::fixture::RawFrame::Message(m) = f.unwrap() else {
                panic!("oversized")
            };
            assert_eq!(peek_seq(&m), Some(i as i64 + 1));
        }
        assert_eq!(peek_seq(b""), None);
    }
}

/// Options of `record`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecordOptions {
    /// Relay base URL (`wss://host` or `ws://host:port`).
    #[arg(long, env = "RELAY_URL", value_name = "URL", default_value = client::DEFAULT_RELAY_URL)]
    pub relay_url: String,
    /// Output fixture file (created or truncated).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub out: PathBuf,
    /// Start after this seq (default: the relay's live tail).
    #[arg(long, value_name = "SEQ")]
    pub cursor: Option<i64>,
    /// Stop after this many frames.
    #[arg(long, value_name = "N")]
    pub max_frames: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub max_seconds: Option<u64>,
}

impl RecordOptions {
    pub fn to_args(&self) -> RecordArgs {
        RecordArgs {
            client: ClientConfig {
                relay_url: self.relay_url.clone(),
                ..ClientConfig::default()
            },
            out_path: self.out.clone(),
            cursor: self.cursor,
            max_frames: self.max_frames,
            max_duration: self.max_seconds.map(Duration::from_secs),
        }
    }
}
