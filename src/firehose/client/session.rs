//! One relay connection (as a connection handler in tokio's mini-redis): [`Session::open`] does
//! the handshake, [`Session::run`] forwards binary messages until the socket fails, goes silent,
//! sends an error frame, or the client is cancelled. Each frame's header and `seq` are peeked
//! with the decoder's own parser ([`frame::peek_header`]) to react to relay `#info` and errors
//! and to check seq continuity; decoding is the pipeline's job.

use std::sync::atomic::Ordering;

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::gaps::SeqCheck;
use super::jumps::JumpGuard;
use super::Client;
use crate::firehose::frame::{self, ErrorBody, InfoBody};
use crate::metrics as m;

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a session ended.
pub(super) enum SessionEnd {
    /// Cancelled, or the receiver is gone: stop for good.
    Stop,
    /// The connection failed or ended; reconnect.
    Ended {
        why: String,
        /// A message over the size limit came right after this seq (the highest received in
        /// the session, else the resume cursor).
        oversized_after: Option<i64>,
    },
}

fn ended(why: impl ToString) -> SessionEnd {
    SessionEnd::Ended {
        why: why.to_string(),
        oversized_after: None,
    }
}

/// One connection to the relay, resumed after `resume`.
pub(super) struct Session<'a> {
    client: &'a mut Client,
    ws: Socket,
    resume: Option<i64>,
    seqs: SeqCheck,
    jumps: JumpGuard,
    /// Messages received so far.
    received: u64,
    /// The highest seq received in this session (an oversized message after it is stepped
    /// over on reconnect).
    max_seq: Option<i64>,
    /// Last message, pong, or end of a wait on the full output channel.
    last_heard: Instant,
}

impl<'a> Session<'a> {
    /// Connects to `url` (the subscription URL for `resume`), within the handshake limit.
    pub(super) async fn open(
        client: &'a mut Client,
        url: &str,
        resume: Option<i64>,
    ) -> Result<Self, SessionEnd> {
        let cfg = &client.cfg;
        let ws_cfg = WebSocketConfig::default()
            .max_message_size(Some(cfg.max_message_bytes))
            .max_frame_size(Some(cfg.max_message_bytes));
        let connect = tokio_tungstenite::connect_async_with_config(url, Some(ws_cfg), true);
        let ws = tokio::select! {
            _ = client.cancel.cancelled() => return Err(SessionEnd::Stop),
            r = tokio::time::timeout(cfg.connect_timeout, connect) => match r {
                Ok(Ok((ws, _resp))) => ws,
                Ok(Err(e)) => return Err(ended(format!("connect: {e}"))),
                Err(_) => return Err(ended("connect timed out")),
            },
        };
        metrics::gauge!(m::RELAY_CONNECTED).set(1.0);
        tracing::info!(url = %url, "connected to relay");
        Ok(Self {
            client,
            ws,
            resume,
            seqs: SeqCheck::new(resume),
            jumps: JumpGuard::new(resume),
            received: 0,
            max_seq: None,
            last_heard: Instant::now(),
        })
    }

    /// Forwards messages until the connection fails, goes silent or is cancelled.
    pub(super) async fn run(mut self) -> SessionEnd {
        let interval = self.client.cfg.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        loop {
            let silent_until = self.last_heard + self.client.cfg.silence_timeout;
            let msg = tokio::select! {
                biased;
                _ = self.client.cancel.cancelled() => return SessionEnd::Stop,
                _ = tokio::time::sleep_until(silent_until) => return ended("relay silent"),
                _ = ping.tick() => {
                    if let Err(e) = self.ws.send(Message::Ping(Vec::new().into())).await {
                        return ended(format!("ping: {e}"));
                    }
                    continue;
                }
                m = self.ws.next() => m,
            };
            self.last_heard = Instant::now();
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
                        after = self.received,
                        "relay message over the size limit; reconnecting"
                    );
                    return SessionEnd::Ended {
                        why: format!("message of {size} bytes over the {max_size}-byte limit"),
                        oversized_after: self.max_seq.or(self.resume),
                    };
                }
                Some(Err(e)) => return ended(format!("read: {e}")),
            };
            self.received += 1;
            let release = match peek(&data) {
                Peeked::Seq(seq) => {
                    self.max_seq = Some(self.max_seq.map_or(seq, |m| m.max(seq)));
                    self.jumps.admit(seq, data.into())
                }
                Peeked::Info(info) => {
                    self.on_info(info);
                    [Some((0, data.into())), None]
                }
                // The relay closes after an error frame; do not wait for it.
                Peeked::Error(e) => {
                    return ended(format!("relay error {}", on_error(e, self.resume)))
                }
                Peeked::Other => [Some((0, data.into())), None],
            };
            for (seq, frame) in release.into_iter().flatten() {
                if seq > 0 {
                    self.on_seq(seq);
                }
                if let Some(end) = self.forward(frame).await {
                    return end;
                }
            }
        }
    }

    fn on_seq(&mut self, seq: i64) {
        let client = &mut *self.client;
        if let Some(gap) = self.seqs.observe(seq) {
            client.gaps.record(gap);
        }
        client.first_seq.get_or_insert(seq);
        client.seen_seq.fetch_max(seq, Ordering::Relaxed);
        metrics::gauge!(m::RELAY_SEQ).set(seq as f64);
        // Lag behind the relay in events: what was received but is not yet durable.
        if let Some(c) = *client.durable.borrow() {
            metrics::gauge!(m::LAG_EVENTS).set(seq.saturating_sub(c).max(0) as f64);
        }
    }

    fn on_info(&mut self, InfoBody { name, message }: InfoBody) {
        let outdated = name == "OutdatedCursor";
        let label = if outdated { "OutdatedCursor" } else { "other" };
        metrics::counter!(m::RELAY_INFO_TOTAL, "name" => label).increment(1);
        if outdated {
            self.seqs.outdated_cursor();
            tracing::warn!(cursor = ?self.resume, message = ?message, "relay #info OutdatedCursor: our cursor is older than the relay's backfill window; events before the next seq received may be missing");
        } else {
            tracing::info!(name = %name, message = ?message, "relay #info");
        }
    }

    /// Sends a frame on, waiting while the channel is full; `Some(Stop)` when the client must stop.
    async fn forward(&mut self, data: Vec<u8>) -> Option<SessionEnd> {
        tokio::select! {
            biased;
            _ = self.client.cancel.cancelled() => return Some(SessionEnd::Stop),
            r = self.client.out.send(data) => if r.is_err() {
                tracing::info!("frame receiver closed; relay client stopping");
                return Some(SessionEnd::Stop);
            },
        }
        // Time blocked on a full channel is not relay silence.
        self.last_heard = Instant::now();
        None
    }
}

/// Counts and logs a relay error frame; returns its name.
fn on_error(ErrorBody { error, message }: ErrorBody, resume: Option<i64>) -> String {
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
    error
}

/// What the client needs from a frame: its seq, or the relay's #info / error.
#[derive(Debug, PartialEq)]
enum Peeked {
    Seq(i64),
    Info(InfoBody),
    Error(ErrorBody),
    /// Undecodable, or no seq: the pipeline decides what it is.
    Other,
}

/// Reads the header and the few body fields the client acts on (the rest is skipped unread).
fn peek(msg: &[u8]) -> Peeked {
    let Ok((header, at)) = frame::peek_header(msg) else {
        return Peeked::Other;
    };
    let body = &msg[at..];
    match (header.op, header.t) {
        (-1, _) => frame::body(body).map_or(Peeked::Other, Peeked::Error),
        (1, Some("#info")) => frame::body(body).map_or(Peeked::Other, Peeked::Info),
        (1, Some(_)) => match frame::peek_seq(body) {
            Ok(seq) if seq > 0 => Peeked::Seq(seq),
            _ => Peeked::Other,
        },
        _ => Peeked::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            Peeked::Error(ErrorBody {
                error: "FutureCursor".into(),
                message: None
            })
        );
        let m = frame(
            &H { op: 1, t: "#info" },
            &I {
                name: "OutdatedCursor",
            },
        );
        assert!(
            matches!(peek(&m), Peeked::Info(InfoBody { name, .. }) if name == "OutdatedCursor")
        );
        assert_eq!(peek(b"\xff\x00"), Peeked::Other);
        assert_eq!(peek(&[]), Peeked::Other);
    }
}
