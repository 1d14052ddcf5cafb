//! The live relay source (§3): a `subscribeRepos` WebSocket that forwards binary messages into a
//! bounded channel, reconnecting with backoff and resuming from the writer's durable cursor.
//!
//! The client does not decode frames (the pipeline does); it only peeks at each frame's header
//! and `seq` to react to relay errors and to notice a relay that skips or repeats seqs:
//!
//! - `#info OutdatedCursor`: the cursor is older than the relay's backfill window, so events
//!   between it and the first seq received are missing. Logged (WARN) and counted; ingestion
//!   continues (there is nothing to resume from).
//! - error `ConsumerTooSlow`: the relay dropped us; reconnect (with backoff) from the durable
//!   cursor. Nothing is lost: the cursor only covers what was committed.
//! - error `FutureCursor`: our cursor is ahead of the relay's head (relay reset or replaced, or a
//!   replica lagging behind). Logged as ERROR and counted, and the client keeps retrying *from the
//!   durable cursor* with capped backoff: dropping the cursor to live-tail would silently skip
//!   every event between the relay's head and our cursor, and a lagging replica catches up by
//!   itself. An operator decides whether the relay really was reset (see the README).
//! - any other error frame: logged, counted, reconnect from the durable cursor.
//! - seq going backwards or skipping ahead within a connection (or the first seq after the
//!   resume cursor not following it): counted in `atproto_ingest_relay_seq_gaps_total{kind}`
//!   (`backward`, `skip`, `outdated_cursor`) and logged (at most once per
//!   [`GAP_LOG_INTERVAL`] per kind). Frames are still forwarded: writes are idempotent.
//!
//! - a seq far beyond the last one ([`jumps::MAX_SEQ_JUMP`]): held until the next frame confirms
//!   it, a lone outlier dropped, so one corrupt seq cannot move the durable cursor for good.
//!
//! A message over the size limit ends the connection (tungstenite cannot skip it). Wherever it
//! comes in a session (first, after an `#info`, after other events), it follows the highest seq
//! received before it, or the resume cursor `c`: the next connection resumes from at least that
//! seq + 1, stepping over the oversized frame instead of looping on it.
//!
//! This file holds the settings and the reconnect loop (backoff from [`crate::retry`]);
//! [`session`] is one connection, [`gaps`] the seq continuity checks.

mod gaps;
mod jumps;
mod session;

use std::sync::atomic::AtomicI64;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::gaps::GapLog;
use self::session::{Session, SessionEnd};
use crate::metrics as m;
use crate::retry::{self, Backoff, Jitter};

/// The XRPC path of the firehose.
pub const SUBSCRIBE_REPOS_PATH: &str = "/xrpc/com.atproto.sync.subscribeRepos";
/// Default relay.
pub const DEFAULT_RELAY_URL: &str = "wss://bsky.network";
/// Default socket message limit, the §3 frame size limit (5 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = super::frame::DEFAULT_MAX_FRAME_BYTES;
/// A socket with no message and no pong for this long is dead (relays send steadily).
pub const DEFAULT_SILENCE_TIMEOUT: Duration = Duration::from_secs(30);
/// Ping often enough that a healthy but quiet relay answers well within the silence timeout.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(10);
/// TCP + TLS + WebSocket handshake limit.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// First reconnect delay.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_secs(1);
/// Reconnect delay cap (§3: ~30 s).
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that lasted this long was healthy: the backoff starts over.
pub const DEFAULT_HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// Seq gaps of one kind are logged at most this often (each one is counted).
pub const GAP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Relay client settings.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Relay base URL (`wss://host`, `ws://host:port`; `https`/`http` are mapped). Default
    /// [`DEFAULT_RELAY_URL`].
    pub relay_url: String,
    /// Largest WebSocket message accepted. Default [`DEFAULT_MAX_MESSAGE_BYTES`].
    pub max_message_bytes: usize,
    /// No message and no pong for this long: reconnect. Default [`DEFAULT_SILENCE_TIMEOUT`].
    pub silence_timeout: Duration,
    /// Ping interval. Default [`DEFAULT_PING_INTERVAL`].
    pub ping_interval: Duration,
    /// Handshake limit. Default [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// First reconnect delay. Default [`DEFAULT_BACKOFF_INITIAL`].
    pub backoff_initial: Duration,
    /// Reconnect delay cap. Default [`DEFAULT_BACKOFF_MAX`].
    pub backoff_max: Duration,
    /// Connected this long resets the backoff. Default [`DEFAULT_HEALTHY_AFTER`].
    pub healthy_after: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            relay_url: DEFAULT_RELAY_URL.to_owned(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            silence_timeout: DEFAULT_SILENCE_TIMEOUT,
            ping_interval: DEFAULT_PING_INTERVAL,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
            healthy_after: DEFAULT_HEALTHY_AFTER,
        }
    }
}

impl ClientConfig {
    /// The reconnect backoff: `backoff_initial` doubling to `backoff_max`, each delay drawn
    /// between half and all of that, attempts unbounded.
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.backoff_initial,
            max: self.backoff_max,
            jitter: Jitter::Half,
            max_attempts: None,
        }
    }
}

/// Relay client errors that end [`run`] (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid relay URL {url:?}: {why}")]
    InvalidUrl { url: String, why: &'static str },
}

/// Installs the ring rustls provider for the process; later calls are no-ops.
pub fn install_crypto_provider() {
    // Err means a provider is already installed, which is all we need.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// `{relay}/xrpc/com.atproto.sync.subscribeRepos[?cursor=N]`.
pub fn subscribe_url(relay_url: &str, cursor: Option<i64>) -> Result<String, ClientError> {
    let base = relay_url.trim_end_matches('/');
    let bad = |why| ClientError::InvalidUrl {
        url: relay_url.to_owned(),
        why,
    };
    let base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else if base.starts_with("wss://") || base.starts_with("ws://") {
        base.to_owned()
    } else {
        return Err(bad("scheme must be ws, wss, http or https"));
    };
    if base.contains('?') || base.contains('#') {
        return Err(bad("must not carry a query or fragment"));
    }
    Ok(match cursor {
        Some(c) => format!("{base}{SUBSCRIBE_REPOS_PATH}?cursor={c}"),
        None => format!("{base}{SUBSCRIBE_REPOS_PATH}"),
    })
}

/// Reads the relay until `cancel` fires or `out`'s receiver is gone, reconnecting on every
/// failure. The resume cursor is read from `cursor` on every (re)connect: `None` means "live
/// tail" (or, once frames were received, "just before the first frame received"), `Some(n)`
/// resumes after seq `n`. Messages are sent to `out` in order; a full channel
/// blocks reading (backpressure). A message over `max_message_bytes` is counted
/// (`atproto_ingest_relay_oversized_total`) and ends the connection; the next connection steps
/// over it (it follows the highest seq received, or the resume cursor; with neither there is
/// nothing to step past).
pub async fn run(
    cfg: ClientConfig,
    cursor: watch::Receiver<Option<i64>>,
    out: mpsc::Sender<Vec<u8>>,
    cancel: CancellationToken,
) -> Result<(), ClientError> {
    run_reporting(cfg, Arc::new(AtomicI64::new(-1)), cursor, out, cancel).await
}

/// [`run`], also raising `seen_seq` to the highest seq received (-1: none yet), which the
/// daemon's lag report reads.
pub async fn run_reporting(
    cfg: ClientConfig,
    seen_seq: Arc<AtomicI64>,
    cursor: watch::Receiver<Option<i64>>,
    out: mpsc::Sender<Vec<u8>>,
    cancel: CancellationToken,
) -> Result<(), ClientError> {
    install_crypto_provider();
    subscribe_url(&cfg.relay_url, None)?;
    Client {
        cfg,
        seen_seq,
        durable: cursor,
        out,
        cancel,
        skip_floor: None,
        first_seq: None,
        gaps: GapLog::default(),
    }
    .run()
    .await
}

/// The relay client: its settings and channels, and what it keeps across connections.
struct Client {
    cfg: ClientConfig,
    /// Highest seq received (-1: none yet).
    seen_seq: Arc<AtomicI64>,
    /// The writer's durable cursor.
    durable: watch::Receiver<Option<i64>>,
    out: mpsc::Sender<Vec<u8>>,
    cancel: CancellationToken,
    /// Lowest resume cursor allowed: raised past a frame the socket keeps refusing as oversized.
    skip_floor: Option<i64>,
    /// The first seq this client received, over all its connections.
    first_seq: Option<i64>,
    gaps: GapLog,
}

impl Client {
    /// Connects, runs a [`Session`], waits the backoff, and again, until stopped.
    async fn run(mut self) -> Result<(), ClientError> {
        metrics::gauge!(m::RELAY_CONNECTED).set(0.0);
        let mut retries = self.cfg.backoff().retries();
        loop {
            let resume = self.resume_cursor();
            let url = subscribe_url(&self.cfg.relay_url, resume)?;
            let started = Instant::now();
            let end = match Session::open(&mut self, &url, resume).await {
                Ok(session) => session.run().await,
                Err(end) => end,
            };
            metrics::gauge!(m::RELAY_CONNECTED).set(0.0);
            match end {
                SessionEnd::Stop => return Ok(()),
                SessionEnd::Ended {
                    why,
                    oversized_after,
                } => {
                    if let Some(c) = oversized_after {
                        // The frame after seq `c` is too big: step over seq c+1 (it is that
                        // frame, or absent). Nothing with a smaller seq is skipped.
                        let floor = c.saturating_add(1);
                        self.skip_floor = Some(self.skip_floor.map_or(floor, |f| f.max(floor)));
                    }
                    tracing::warn!(url = %url, reason = %why, connected_ms = started.elapsed().as_millis() as u64, "relay connection ended");
                }
            }
            if started.elapsed() >= self.cfg.healthy_after {
                retries.reset();
            }
            // Attempts are unbounded: there is always a next delay.
            let delay = retries.next_delay().unwrap_or(self.cfg.backoff_max);
            metrics::counter!(m::RECONNECTS_TOTAL).increment(1);
            tracing::info!(
                delay_ms = delay.as_millis() as u64,
                attempt = retries.failures(),
                "reconnecting to relay"
            );
            if retry::sleep(delay, &self.cancel).await.is_err() {
                return Ok(());
            }
        }
    }

    /// Where the next connection resumes: the durable cursor, raised past a refused frame.
    fn resume_cursor(&self) -> Option<i64> {
        // No durable cursor yet but frames were received: resume just before the first one, so
        // the frames between it and the live head are not skipped (re-received ones are
        // harmless, writes are idempotent).
        let durable = (*self.durable.borrow()).or(self.first_seq.map(|s| s.saturating_sub(1)));
        match (durable, self.skip_floor) {
            (Some(d), Some(f)) => Some(d.max(f)),
            (d, f) => d.or(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_urls() {
        let u = subscribe_url("wss://relay.example/", Some(42)).unwrap();
        assert_eq!(
            u,
            "wss://relay.example/xrpc/com.atproto.sync.subscribeRepos?cursor=42"
        );
        let u = subscribe_url("http://127.0.0.1:99", None).unwrap();
        assert_eq!(u, "ws://127.0.0.1:99/xrpc/com.atproto.sync.subscribeRepos");
        assert!(subscribe_url("ftp://x", None).is_err());
        assert!(subscribe_url("wss://x?a=1", None).is_err());
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let cfg = ClientConfig::default();
        for attempt in 0..40 {
            let d = cfg.backoff().delay(attempt + 1);
            let full = (cfg.backoff_initial * 2u32.pow(attempt.min(16))).min(cfg.backoff_max);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(cfg.backoff().delay(31) >= Duration::from_secs(15));
    }
}
