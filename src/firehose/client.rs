//! The live relay source (§3): a `subscribeRepos` WebSocket that forwards binary messages into a
//! bounded channel, reconnecting with backoff and resuming from the writer's durable cursor.
//!
//! The client does not decode frames (the pipeline does). A message over the size limit ends the
//! connection (tungstenite cannot skip it); if it was the first message after cursor `c`, the
//! next connection resumes from at least `c + 1`, stepping over it instead of looping on it.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

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
/// tail", `Some(n)` resumes after seq `n`. Messages are sent to `out` in order; a full channel
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
    metrics::gauge!("atproto_ingest_relay_connected").set(0.0);
    let mut attempt: u32 = 0;
    // Lowest resume cursor allowed: raised past a frame the socket keeps refusing as oversized.
    let mut skip_floor: Option<i64> = None;
    loop {
        let durable = *cursor.borrow();
        let resume = match (durable, skip_floor) {
            (Some(d), Some(f)) => Some(d.max(f)),
            (d, f) => d.or(f),
        };
        let url = subscribe_url(&cfg.relay_url, resume)?;
        let started = Instant::now();
        let end = session(&cfg, &url, &out, &cancel).await;
        metrics::gauge!("atproto_ingest_relay_connected").set(0.0);
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
        metrics::counter!("atproto_ingest_relay_reconnects_total").increment(1);
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
async fn session(
    cfg: &ClientConfig,
    url: &str,
    out: &mpsc::Sender<Vec<u8>>,
    cancel: &CancellationToken,
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
    metrics::gauge!("atproto_ingest_relay_connected").set(1.0);
    tracing::info!(url = %url, "connected to relay");
    let mut ping = tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
    let mut last_heard = Instant::now();
    let mut received: u64 = 0;
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
                metrics::counter!("atproto_ingest_relay_text_messages_total").increment(1);
                continue;
            }
            Some(Ok(_)) => continue, // ping (answered by tungstenite), pong, raw frame
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                metrics::counter!("atproto_ingest_relay_oversized_total").increment(1);
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
            let d = backoff_delay(&cfg, attempt);
            let full = (cfg.backoff_initial * 2u32.pow(attempt.min(16))).min(cfg.backoff_max);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(backoff_delay(&cfg, 30) >= Duration::from_secs(15));
    }
}
