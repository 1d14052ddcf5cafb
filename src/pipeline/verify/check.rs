//! Verifying a chunk's events on the blocking pool. A chunk is split into parts verified at
//! once (one per core), so that a single chunk in flight (the first, the last, a quiet
//! firehose) still uses every core; the results are joined back in event order.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::task::JoinHandle;

use super::DecodedChunk;
use crate::firehose::{Event, EventKind};
use crate::pipeline::PipelineError;
use crate::sync::{verify_commit, verify_sync, PublicKey, VerifyError};

/// Fewest events worth a part of their own (a few ms of work: less is not worth a thread).
const MIN_PART_EVENTS: usize = 64;

/// The result of verifying one event on a blocking thread.
pub(super) enum Check {
    /// Not a commit or `#sync`, or a `tooBig` commit (the writer marks those).
    Pass,
    Ok {
        data: cid::Cid,
    },
    Failed(VerifyError),
    NoKey,
}

/// A verified chunk: its events (taken out of it) and their checks, in order.
pub(super) struct Verifying {
    pub(super) chunk: DecodedChunk,
    pub(super) events: Vec<Event>,
    pub(super) checks: Vec<Check>,
}

/// Verifies `chunk`'s events with `keys` in up to `parts` blocking jobs at once.
pub(super) fn spawn(
    mut chunk: DecodedChunk,
    keys: HashMap<String, PublicKey>,
    parts: usize,
) -> JoinHandle<Result<Verifying, PipelineError>> {
    let events = std::mem::take(&mut chunk.events);
    let keys = Arc::new(keys);
    let size = events.len().div_ceil(parts.max(1)).max(MIN_PART_EVENTS);
    let mut jobs = Vec::with_capacity(parts);
    let mut rest = events.into_iter();
    loop {
        let part: Vec<Event> = rest.by_ref().take(size).collect();
        if part.is_empty() {
            break;
        }
        let keys = keys.clone();
        jobs.push(tokio::task::spawn_blocking(move || {
            let checks: Vec<Check> = part.iter().map(|ev| check(ev, &keys)).collect();
            (part, checks)
        }));
    }
    tokio::spawn(async move {
        let mut events = Vec::new();
        let mut checks = Vec::new();
        for job in jobs {
            let (part, part_checks) = job.await.map_err(|source| PipelineError::Task {
                task: "verify job",
                source,
            })?;
            events.extend(part);
            checks.extend(part_checks);
        }
        Ok(Verifying {
            chunk,
            events,
            checks,
        })
    })
}

/// Verifies one event with its repo's key (pure; runs on a blocking thread).
pub(super) fn check(ev: &Event, keys: &HashMap<String, PublicKey>) -> Check {
    match &ev.kind {
        EventKind::Commit(c) if c.readable() => match keys.get(&c.repo) {
            None => Check::NoKey,
            Some(key) => match verify_commit(c, key) {
                Ok(v) => Check::Ok { data: v.data },
                Err(e) => Check::Failed(e),
            },
        },
        EventKind::Sync(s) => match keys.get(&s.did) {
            None => Check::NoKey,
            Some(key) => match verify_sync(s, key) {
                Ok(v) => Check::Ok { data: v.data },
                Err(e) => Check::Failed(e),
            },
        },
        _ => Check::Pass,
    }
}
