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
//! A message over the size limit ends the connection (tungstenite cannot skip it); if it was the first message after cursor `c`, the
//! next connection resumes from at least `c + 1`, stepping over it instead of looping on it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

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
    /// Highest seq received so far (-1: none yet); read by whoever reports the lag.
    pub seen_seq: Arc<AtomicI64>,
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
            seen_seq: Arc::new(AtomicI64::new(-1)),
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
/// (`atproto_ingest_relay_oversized_total`) and ends the connection; it is stepped over when it
/// is the first message after a cursor (with no cursor there is nothing to step past).
pub async fn run(
    cfg: ClientConfig,
    cursor: watch::Receiver<Option<i64>>,
    out: mpsc::Sender<Vec<u8>>,
    cancel: CancellationToken,
) -> Result<(), ClientError> {
    install_crypto_provider();
    subscribe_url(&cfg.relay_url, None)?;
    metrics::gauge!(m::RELAY_CONNECTED).set(0.0);
    let mut attempt: u32 = 0;
    // Lowest resume cursor allowed: raised past a frame the socket keeps refusing as oversized.
    let mut skip_floor: Option<i64> = None;
    let mut gaps = GapLog::default();
    // The first seq this client received, over all its connections.
    let mut first_seq: Option<i64> = None;
    loop {
        // No durable cursor yet but frames were received: resume just before the first one, so
        // the frames between it and the live head are not skipped (re-received ones are
        // harmless, writes are idempotent).
        let durable = (*cursor.borrow()).or(first_seq.map(|s| s.saturating_sub(1)));
        let resume = match (durable, skip_floor) {
            (Some(d), Some(f)) => Some(d.max(f)),
            (d, f) => d.or(f),
        };
        let url = subscribe_url(&cfg.relay_url, resume)?;
        let started = Instant::now();
        let end = session(
            &cfg,
            &url,
            resume,
            &out,
            &cancel,
            &mut gaps,
            &mut first_seq,
            &cursor,
        )
        .await;
        metrics::gauge!(m::RELAY_CONNECTED).set(0.0);
        match end {
            SessionEnd::Stop => return Ok(()),
            SessionEnd::Ended {
                why,
                first_oversized,
            } => {
                if first_oversized {
                    if let Some(c) = resume {
                        // The first frame after `c` is too big: step over seq c+1 (it is that
                        // frame, or absent). Nothing with a smaller seq is skipped.
                        skip_floor = Some(c.saturating_add(1));
                    }
                }
                tracing::warn!(url = %url, reason = %why, connected_ms = started.elapsed().as_millis() as u64, "relay connection ended");
            }
        }
        if started.elapsed() >= cfg.healthy_after {
            attempt = 0;
        }
        let delay = backoff_delay(&cfg, attempt);
        attempt = attempt.saturating_add(1);
        metrics::counter!(m::RECONNECTS_TOTAL).increment(1);
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            attempt,
            "reconnecting to relay"
        );
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Exponential delay from `backoff_initial`, capped, with jitter in [delay/2, delay].
fn backoff_delay(cfg: &ClientConfig, attempt: u32) -> Duration {
    let exp = cfg
        .backoff_initial
        .saturating_mul(2u32.saturating_pow(attempt.min(16)));
    let capped = exp.min(cfg.backoff_max);
    let half = capped / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

enum SessionEnd {
    /// Cancelled, or the receiver is gone: stop for good.
    Stop,
    /// The connection failed or ended; reconnect.
    Ended {
        why: String,
        /// The first message of the session was over the size limit.
        first_oversized: bool,
    },
}

fn ended(why: impl ToString) -> SessionEnd {
    SessionEnd::Ended {
        why: why.to_string(),
        first_oversized: false,
    }
}

/// One connection: handshake, then forward messages until it fails, goes silent or is cancelled.
#[allow(clippy::too_many_arguments)] // one connection's state, passed by reference from `run`
async fn session(
    cfg: &ClientConfig,
    url: &str,
    resume: Option<i64>,
    out: &mpsc::Sender<Vec<u8>>,
    cancel: &CancellationToken,
    gaps: &mut GapLog,
    first_seq: &mut Option<i64>,
    durable: &watch::Receiver<Option<i64>>,
) -> SessionEnd {
    let ws_cfg = WebSocketConfig::default()
        .max_message_size(Some(cfg.max_message_bytes))
        .max_frame_size(Some(cfg.max_message_bytes));
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(ws_cfg), true);
    let mut ws = tokio::select! {
        _ = cancel.cancelled() => return SessionEnd::Stop,
        r = tokio::time::timeout(cfg.connect_timeout, connect) => match r {
            Ok(Ok((ws, _resp))) => ws,
            Ok(Err(e)) => return ended(format!("connect: {e}")),
            Err(_) => return ended("connect timed out"),
        },
    };
    metrics::gauge!(m::RELAY_CONNECTED).set(1.0);
    tracing::info!(url = %url, "connected to relay");
    let mut ping = tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
    let mut last_heard = Instant::now();
    let mut received: u64 = 0;
    let mut last_seq = resume;
    let mut outdated = false;
    let mut relay_error: Option<String> = None;
    loop {
        let silent_until = last_heard + cfg.silence_timeout;
        let msg = tokio::select! {
            biased;
            _ = cancel.cancelled() => return SessionEnd::Stop,
            _ = tokio::time::sleep_until(silent_until) => return ended("relay silent"),
            _ = ping.tick() => {
                if let Err(e) = ws.send(Message::Ping(Vec::new().into())).await {
                    return ended(format!("ping: {e}"));
                }
                continue;
            }
            m = ws.next() => m,
        };
        last_heard = Instant::now();
        let data = match msg {
            None => return ended("relay closed the stream"),
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(Message::Close(f))) => return ended(format!("relay closed: {f:?}")),
            Some(Ok(Message::Text(_))) => {
                metrics::counter!(m::RELAY_TEXT_MESSAGES_TOTAL).increment(1);
                continue;
            }
            Some(Ok(_)) => continue, // ping (answered by tungstenite), pong, raw frame
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                metrics::counter!(m::RELAY_OVERSIZED_TOTAL).increment(1);
                tracing::warn!(
                    size,
                    max_size,
                    after = received,
                    "relay message over the size limit; reconnecting"
                );
                return SessionEnd::Ended {
                    why: format!("message of {size} bytes over the {max_size}-byte limit"),
                    first_oversized: received == 0,
                };
            }
            Some(Err(e)) => return ended(format!("read: {e}")),
        };
        received += 1;
        match peek(&data) {
            Peeked::Seq(seq) => {
                if let Some(last) = last_seq {
                    let kind = if seq <= last {
                        Some("backward")
                    } else if seq > last + 1 && outdated {
                        Some("outdated_cursor")
                    } else if seq > last + 1 {
                        Some("skip")
                    } else {
                        None
                    };
                    if let Some(kind) = kind {
                        gaps.record(kind, last, seq);
                    }
                }
                outdated = false;
                last_seq = Some(seq);
                first_seq.get_or_insert(seq);
                cfg.seen_seq.fetch_max(seq, Ordering::Relaxed);
                metrics::gauge!(m::RELAY_SEQ).set(seq as f64);
                // Lag behind the relay in events: what was received but is not yet durable.
                if let Some(c) = *durable.borrow() {
                    metrics::gauge!(m::LAG_EVENTS).set(seq.saturating_sub(c).max(0) as f64);
                }
            }
            Peeked::Info { name, message } => {
                let label = if name == "OutdatedCursor" {
                    "OutdatedCursor"
                } else {
                    "other"
                };
                metrics::counter!(m::RELAY_INFO_TOTAL, "name" => label).increment(1);
                if name == "OutdatedCursor" {
                    outdated = true;
                    tracing::warn!(cursor = ?resume, message = ?message, "relay #info OutdatedCursor: our cursor is older than the relay's backfill window; events before the next seq received may be missing");
                } else {
                    tracing::info!(name = %name, message = ?message, "relay #info");
                }
            }
            Peeked::Error { error, message } => {
                let label = match error.as_str() {
                    "FutureCursor" => "FutureCursor",
                    "ConsumerTooSlow" => "ConsumerTooSlow",
                    _ => "other",
                };
                metrics::counter!(m::RELAY_ERRORS_TOTAL, "error" => label).increment(1);
                match label {
                    "FutureCursor" => {
                        tracing::error!(cursor = ?resume, message = ?message, "relay error FutureCursor: our durable cursor is ahead of the relay's head (relay reset, a different relay, or a lagging replica); retrying from the durable cursor, NOT skipping ahead. Operator action may be needed (see README)")
                    }
                    "ConsumerTooSlow" => {
                        tracing::warn!(cursor = ?resume, message = ?message, "relay error ConsumerTooSlow: the relay dropped us; reconnecting from the durable cursor")
                    }
                    _ => {
                        tracing::warn!(error = %error, message = ?message, "relay error frame; reconnecting from the durable cursor")
                    }
                }
                relay_error = Some(error);
            }
            Peeked::Other => {}
        }
        if let Some(error) = relay_error.take() {
            // The relay closes after an error frame; do not wait for it.
            return ended(format!("relay error {error}"));
        }
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return SessionEnd::Stop,
            r = out.send(data.into()) => if r.is_err() {
                tracing::info!("frame receiver closed; relay client stopping");
                return SessionEnd::Stop;
            },
        }
        // Time blocked on a full channel is not relay silence.
        last_heard = Instant::now();
    }
}

/// What the client needs from a frame: its seq, or the relay's #info / error.
#[derive(Debug, PartialEq)]
enum Peeked {
    Seq(i64),
    Info {
        name: String,
        message: Option<String>,
    },
    Error {
        error: String,
        message: Option<String>,
    },
    /// Undecodable, or no seq: the pipeline decides what it is.
    Other,
}

#[derive(Deserialize)]
struct PeekHeader<'a> {
    op: i64,
    #[serde(borrow, default)]
    t: Option<&'a str>,
}

#[derive(Deserialize)]
struct PeekSeq {
    seq: i64,
}

#[derive(Deserialize)]
struct PeekInfo {
    name: String,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize)]
struct PeekError {
    error: String,
    #[serde(default)]
    message: Option<String>,
}

/// Reads the header and the few body fields the client acts on (the rest is skipped unread).
fn peek(msg: &[u8]) -> Peeked {
    let Ok(hlen) = super::cbor::item_len(msg) else {
        return Peeked::Other;
    };
    let Ok(header) = serde_ipld_dagcbor::from_slice::<PeekHeader>(&msg[..hlen]) else {
        return Peeked::Other;
    };
    let body = &msg[hlen..];
    match (header.op, header.t) {
        (-1, _) => match serde_ipld_dagcbor::from_slice::<PeekError>(body) {
            Ok(e) => Peeked::Error {
                error: e.error,
                message: e.message,
            },
            Err(_) => Peeked::Other,
        },
        (1, Some("#info")) => match serde_ipld_dagcbor::from_slice::<PeekInfo>(body) {
            Ok(i) => Peeked::Info {
                name: i.name,
                message: i.message,
            },
            Err(_) => Peeked::Other,
        },
        (1, Some(_)) => match serde_ipld_dagcbor::from_slice::<PeekSeq>(body) {
            Ok(s) if s.seq > 0 => Peeked::Seq(s.seq),
            _ => Peeked::Other,
        },
        _ => Peeked::Other,
    }
}

/// Counts seq gaps and logs each kind at most once per [`GAP_LOG_INTERVAL`].
#[derive(Default)]
struct GapLog {
    last_logged: std::collections::HashMap<&'static str, (Instant, u64)>,
}

impl GapLog {
    fn record(&mut self, kind: &'static str, last: i64, seq: i64) {
        metrics::counter!(m::RELAY_SEQ_GAPS_TOTAL, "kind" => kind).increment(1);
        let now = Instant::now();
        let entry = self.last_logged.entry(kind);
        let (at, suppressed) = entry.or_insert((now - GAP_LOG_INTERVAL * 2, 0));
        if now.duration_since(*at) >= GAP_LOG_INTERVAL {
            let missing = seq.saturating_sub(last).saturating_sub(1);
            if kind == "backward" {
                tracing::error!(kind, previous = last, seq, suppressed = *suppressed, "relay seq went backwards (relay reset?); frames are still applied (writes are idempotent)");
            } else {
                tracing::warn!(
                    kind,
                    previous = last,
                    seq,
                    missing,
                    suppressed = *suppressed,
                    "relay skipped seqs"
                );
            }
            *at = now;
            *suppressed = 0;
        } else {
            *suppressed += 1;
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
    fn peeks_seq_info_and_errors() {
        fn frame(header: &impl serde::Serialize, body: &impl serde::Serialize) -> Vec<u8> {
            let mut v = serde_ipld_dagcbor::to_vec(header).unwrap();
            v.extend(serde_ipld_dagcbor::to_vec(body).unwrap());
            v
        }
        #[derive(serde::Serialize)]
        struct H<'a> {
            op: i64,
            t: &'a str,
        }
        #[derive(serde::Serialize)]
        struct B<'a> {
            seq: i64,
            did: &'a str,
        }
        #[derive(serde::Serialize)]
        struct E<'a> {
            error: &'a str,
        }
        #[derive(serde::Serialize)]
        struct I<'a> {
            name: &'a str,
        }
        let m = frame(
            &H {
                op: 1,
                t: "#identity",
            },
            &B {
                seq: 7,
                did: "did:plc:x",
            },
        );
        assert_eq!(peek(&m), Peeked::Seq(7));
        let m = frame(
            &H { op: -1, t: "" },
            &E {
                error: "FutureCursor",
            },
        );
        assert_eq!(
            peek(&m),
            Peeked::Error {
                error: "FutureCursor".into(),
                message: None
            }
        );
        let m = frame(
            &H { op: 1, t: "#info" },
            &I {
                name: "OutdatedCursor",
            },
        );
        assert!(matches!(peek(&m), Peeked::Info { name, .. } if name == "OutdatedCursor"));
        assert_eq!(peek(b"\xff\x00"), Peeked::Other);
        assert_eq!(peek(&[]), Peeked::Other);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let cfg = ClientConfig::default();
        for attempt in 0..40 {
            let d = backoff_delay(&cfg, attempt);
            let full = (cfg.backoff_initial * 2u32.pow(attempt.min(16))).min(cfg.backoff_max);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(backoff_delay(&cfg, 30) >= Duration::from_secs(15));
    }
}
