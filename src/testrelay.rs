//! An in-process relay for tests and development: a WebSocket server on `127.0.0.1:0` that serves
//! a fixture file's frames with `subscribeRepos` cursor semantics.
//!
//! - `?cursor=N`: frames with seq > N, in file order. Frames without a seq (`#info`, error frames,
//!   frames that do not decode) travel with the next frame that has one: they are sent when it is.
//!   Trailing seq-less frames are always sent.
//! - No cursor: every frame from the start of the file. (A real relay would live-tail; tests want
//!   the whole corpus.)
//! - After the last frame the connection stays open and idle, as a caught-up relay's would.
//! - Not simulated: `FutureCursor` / `OutdatedCursor` replies.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_util::sync::CancellationToken;

use crate::firehose::client::SUBSCRIBE_REPOS_PATH;
use crate::firehose::fixture::{self, FixtureError, FrameReader, RawFrame};

/// Largest frame loaded from a fixture: above the 5 MiB default limit, so oversized-frame tests
/// can serve one, but bounded so a corrupt length cannot exhaust memory.
const MAX_LOADED_FRAME_BYTES: usize = 64 * 1024 * 1024;

/// Test relay errors.
#[derive(Debug, thiserror::Error)]
pub enum TestRelayError {
    #[error("opening fixture: {0}")]
    Open(#[from] std::io::Error),
    #[error("reading fixture: {0}")]
    Fixture(#[from] FixtureError),
}

/// Test relay settings.
#[derive(Clone, Debug, Default)]
pub struct TestRelayConfig {
    /// Frames per second per connection; `None` sends as fast as the client reads.
    pub rate_limit: Option<u32>,
}

struct Frame {
    bytes: Bytes,
    /// The frame's own seq, or for a seq-less frame the seq of the next frame that has one.
    key: i64,
}

struct Shared {
    frames: Vec<Frame>,
    rate_limit: Option<u32>,
    served: AtomicU64,
    /// Cancelled (and replaced) by `drop_connections`; each connection watches a child.
    cut: Mutex<CancellationToken>,
    /// The cursor each accepted connection asked for, in order.
    cursors: Mutex<Vec<Option<i64>>>,
}

/// A running test relay. Dropping it without [`TestRelay::shutdown`] also stops it.
pub struct TestRelay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TestRelay {
    /// Loads a fixture file (`.zst` allowed) into memory and starts serving it.
    pub async fn from_file(path: &Path, cfg: TestRelayConfig) -> Result<Self, TestRelayError> {
        let reader = fixture::open(path)?;
        let mut frames = Vec::new();
        for f in FrameReader::new(reader, MAX_LOADED_FRAME_BYTES) {
            match f? {
                RawFrame::Message(m) => frames.push(m),
                RawFrame::Oversized { len } => {
                    tracing::warn!(len, path = %path.display(), "test relay skips a frame it cannot load");
                }
            }
        }
        Self::start(frames, cfg).await
    }

    /// Starts serving `frames` (whole WebSocket messages) on `127.0.0.1:0`.
    pub async fn start(frames: Vec<Vec<u8>>, cfg: TestRelayConfig) -> Result<Self, TestRelayError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            frames: keyed(frames),
            rate_limit: cfg.rate_limit.filter(|r| *r > 0),
            served: AtomicU64::new(0),
            cut: Mutex::new(CancellationToken::new()),
            cursors: Mutex::new(Vec::new()),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        tracing::debug!(%addr, frames = shared.frames.len(), "test relay listening");
        Ok(Self {
            addr,
            shared,
            stop,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT`, the value for `relay_url`.
    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Number of frames loaded.
    pub fn frame_count(&self) -> usize {
        self.shared.frames.len()
    }

    /// Frames sent so far, over all connections.
    pub fn served_count(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// The cursor each connection asked for, in order of acceptance.
    pub fn cursors_requested(&self) -> Vec<Option<i64>> {
        lock(&self.shared.cursors).clone()
    }

    /// Cuts every current connection at once (a relay restart); new connections are accepted.
    pub fn drop_connections(&self) {
        let old = std::mem::take(&mut *lock(&self.shared.cut));
        old.cancel();
    }

    /// Stops accepting and cuts every connection.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        self.drop_connections();
        // The accept loop ends on `stop`; a join error only means it panicked or was aborted.
        let _ = (&mut self.task).await;
    }
}

impl Drop for TestRelay {
    fn drop(&mut self) {
        self.stop.cancel();
        lock(&self.shared.cut).cancel();
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Gives every frame its cursor key (see the module docs).
fn keyed(frames: Vec<Vec<u8>>) -> Vec<Frame> {
    let seqs: Vec<Option<i64>> = frames
        .iter()
        .map(|m| {
            crate::firehose::frame::decode(m)
                .ok()
                .map(|d| d.event.seq)
                .filter(|s| *s > 0)
        })
        .collect();
    let mut next = i64::MAX;
    let mut keys = vec![0i64; frames.len()];
    for (i, s) in seqs.iter().enumerate().rev() {
        if let Some(s) = s {
            next = *s;
        }
        keys[i] = next;
    }
    frames
        .into_iter()
        .zip(keys)
        .map(|(m, key)| Frame {
            bytes: Bytes::from(m),
            key,
        })
        .collect()
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "test relay accept failed");
                    continue;
                }
            },
        };
        let cut = lock(&shared.cut).child_token();
        tokio::spawn(serve(stream, shared.clone(), cut));
    }
}

/// Parses `?cursor=N` from the request; `Err` for a wrong path or a bad cursor.
fn cursor_of(req: &Request) -> Result<Option<i64>, (StatusCode, &'static str)> {
    if req.uri().path() != SUBSCRIBE_REPOS_PATH {
        return Err((StatusCode::NOT_FOUND, "unknown path"));
    }
    let Some(query) = req.uri().query() else {
        return Ok(None);
    };
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("cursor=") {
            return v
                .parse()
                .map(Some)
                .map_err(|_| (StatusCode::BAD_REQUEST, "cursor is not an integer"));
        }
    }
    Ok(None)
}

// The handshake callback's error type is tungstenite's HTTP response; its size is not ours.
#[allow(clippy::result_large_err)]
async fn serve(stream: TcpStream, shared: Arc<Shared>, cut: CancellationToken) {
    let mut cursor = None;
    let callback = |req: &Request, resp: Response| match cursor_of(req) {
        Ok(c) => {
            cursor = c;
            Ok(resp)
        }
        Err((status, why)) => {
            let mut err = ErrorResponse::new(Some(why.to_owned()));
            *err.status_mut() = status;
            Err(err)
        }
    };
    let ws = match tokio_tungstenite::accept_hdr_async(stream, callback).await {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(error = %e, "test relay handshake failed");
            return;
        }
    };
    lock(&shared.cursors).push(cursor);
    let after = cursor.unwrap_or(i64::MIN);
    let frames = &shared.frames;
    let mut next = frames.iter().position(|f| f.key > after);
    let mut ticker = shared.rate_limit.map(|r| {
        let mut t = tokio::time::interval(Duration::from_secs(1) / r);
        // Burst keeps the average rate exact when the period is below the timer resolution.
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let (mut tx, mut rx) = ws.split();
    loop {
        let pending = next.is_some();
        tokio::select! {
            biased;
            _ = cut.cancelled() => return,
            m = rx.next() => match m {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
            _ = tick(ticker.as_mut()), if pending => {
                let Some(i) = next else { continue };
                let f = &frames[i];
                next = frames[i + 1..].iter().position(|f| f.key > after).map(|p| i + 1 + p);
                tokio::select! {
                    biased;
                    _ = cut.cancelled() => return,
                    r = tx.send(Message::Binary(f.bytes.clone())) => if r.is_err() { return },
                }
                shared.served.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

async fn tick(ticker: Option<&mut tokio::time::Interval>) {
    if let Some(t) = ticker {
        t.tick().await;
    }
}
