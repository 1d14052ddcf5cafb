//! Decode stage: chunks of raw frames are decoded on blocking threads, several chunks at
//! once, and handed on in their original order (so per-repo op order is kept).

use std::collections::HashSet;
use std::sync::Mutex;

use crate::firehose::fixture::RawFrame;
use crate::firehose::frame::{self, FrameError};
use crate::firehose::{Event, EventKind};

use super::stats::ChunkCounts;

/// A decoded chunk: the good events in order, plus counts.
#[derive(Debug, Default)]
pub struct DecodedChunk {
    pub events: Vec<Event>,
    pub counts: ChunkCounts,
    /// Low watermark set by the users stage (§4): every event with seq ≤ it has been
    /// forwarded. `None` when the stage is off (the batch's last seq is the cursor).
    pub watermark: Option<i64>,
}

/// Reasons already logged: each kind of bad frame is logged once, then only counted (§3).
static LOGGED: Mutex<Option<HashSet<&'static str>>> = Mutex::new(None);

fn log_once(reason: &'static str, err: &FrameError) {
    let mut guard = LOGGED.lock().unwrap_or_else(|e| e.into_inner());
    if guard.get_or_insert_with(HashSet::new).insert(reason) {
        tracing::warn!(reason, error = %err, "skipping malformed frame (further frames with this reason are only counted)");
    }
}

pub fn decode_chunk(frames: Vec<RawFrame>) -> DecodedChunk {
    let started = std::time::Instant::now();
    let mut out = DecodedChunk {
        events: Vec::with_capacity(frames.len()),
        ..DecodedChunk::default()
    };
    for raw in frames {
        out.counts.tally.frames += 1;
        let result = match raw {
            RawFrame::Message(m) => frame::decode(&m),
            RawFrame::Oversized { len } => Err(FrameError::Oversized(len)),
        };
        match result {
            Ok(d) => {
                out.counts.tally.add_event(&d);
                match &d.event.kind {
                    EventKind::Commit(c) if c.too_big => out.counts.too_big += 1,
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
                log_once(reason, &e);
                out.counts.tally.add_skipped(reason);
            }
        }
    }
    out.counts.decode_micros = started.elapsed().as_micros() as u64;
    out
}
