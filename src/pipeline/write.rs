//! Write stage: each batch in its own retrying transaction ([`txn::run_tx`] around
//! [`writer::apply`]), the cursor committed with its rows; after each commit, the durable
//! cursor is published to whoever resumes from it (the live client).
//!
//! The safety net of §6 ([`write_isolating`]): a batch that fails with a data error
//! ([`TxError::is_data_error`]) is split in halves, recursively, until each failing event is
//! alone; that event goes to `dead_letters`, everything else is written, then the batch's
//! cursor. The pipeline never stops because of what one event contains.
//!
//! **Writer lanes** ([`write_lanes`], `--writer-lanes N`, §6): with N > 1 a batch is split by
//! DID into N parts (a DID always goes to the same lane, so its events keep their order), each
//! written by [`write_isolating`] in its own transaction on its own connection, concurrently
//! and without a cursor (each still checks the fence). Once every part has committed, one
//! small transaction ([`writer::settle_lanes`]) stores the batch's cursor: the durable cursor
//! is thus the minimum of what all lanes hold. A crash between the parts and the cursor
//! replays the batch, and a part already committed is skipped by the rev check (§4). Shared
//! aggregate rows are upserted in key order by every lane; a deadlock (40P01) is retried by
//! [`txn::run_tx`].

use crate::resync::Held;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::batcher::Batch;
use super::{PipelineError, Stats};
use crate::cursor::{self, CursorKey};
use crate::firehose::Event;
use crate::metrics as m;
use crate::txn::{self, RetryPolicy, TxError};
use crate::writer::{self, dead_letters, Applied, WriteError};

/// What the write stage needs besides its input.
pub(super) struct WriteStage {
    pub pool: Pool,
    pub cursor: CursorKey,
    pub retry: RetryPolicy,
    pub stats: Arc<Stats>,
    /// Writer lanes (§6): 1 writes each batch in one transaction with its cursor.
    pub lanes: usize,
    /// Receives the durable cursor after every committed batch.
    pub durable: Option<watch::Sender<Option<i64>>>,
    /// Live events held for repos in resync: the cursor stays below the oldest (§12).
    pub held: Option<Arc<Held>>,
    /// Fires when the pipeline is dropped (lease lost): the transaction in flight is
    /// abandoned and rolls back, and no further batch is started. Retries are bounded by the
    /// policy; otherwise a batch in flight is finished or failed, never abandoned half-way.
    pub abort: CancellationToken,
}

impl WriteStage {
    /// Writes batches until the input ends, a batch fails for good, or `abort` fires.
    pub(super) async fn run(
        self,
        mut rx: super::queue::Receiver<Batch>,
    ) -> Result<(), PipelineError> {
        let Self {
            pool,
            cursor,
            retry,
            stats,
            lanes,
            durable,
            held,
            abort,
        } = self;
        loop {
            let mut batch = tokio::select! {
                biased;
                _ = abort.cancelled() => return Ok(()),
                b = rx.recv() => match b {
                    Some(b) => b,
                    None => return Ok(()),
                },
            };
            let started = std::time::Instant::now();
            let batch_cursor = below_held(batch.cursor(), held.as_deref());
            let write = async {
                if lanes > 1 {
                    write_lanes(
                        &pool,
                        &retry,
                        &abort,
                        &mut batch,
                        batch_cursor,
                        &cursor,
                        lanes,
                    )
                    .await
                } else {
                    let events = &batch.events;
                    write_isolating(&pool, &retry, &abort, events, batch_cursor, &cursor).await
                }
            };
            let (applied, dead) = tokio::select! {
                biased;
                // Dropping the transaction before its commit rolls it back.
                _ = abort.cancelled() => return Ok(()),
                r = write => r.inspect_err(|e| {
                    tracing::error!(error = %e, attempts = e.attempts(), "batch failed; stopping without advancing the cursor");
                })?,
            };
            stats.dead_letters.fetch_add(dead, Ordering::Relaxed);
            let flush = started.elapsed();
            stats
                .write_micros
                .fetch_add(flush.as_micros() as u64, Ordering::Relaxed);
            stats.add_batch(&batch, &applied, flush);
            if let (Some(tx), Some(seq)) = (&durable, applied.cursor) {
                tx.send_replace(Some(seq));
            }
        }
    }
}

/// The batch's cursor, kept below the oldest event held for a repo in resync (§12): such an
/// event is written by the resync, not by a batch, and must be read again after a crash.
fn below_held(cursor: Option<i64>, held: Option<&Held>) -> Option<i64> {
    match (cursor, held.and_then(Held::min_seq)) {
        (Some(c), Some(oldest)) => Some(c.min(oldest - 1)),
        (c, _) => c,
    }
}

/// Writes `events` and then `cursor` like one batch; on a data error, splits them until each
/// failing event is alone and sets it aside in `dead_letters` (see the module docs). Returns
/// what was applied and how many events were set aside. Sub-batches are written in seq order
/// without a cursor (each still checks the fence); the cursor follows once all are durable, so
/// a crash in between replays the batch, and every write is idempotent (§4).
pub(crate) async fn write_isolating(
    pool: &Pool,
    policy: &RetryPolicy,
    abort: &CancellationToken,
    events: &[Event],
    cursor: Option<i64>,
    key: &CursorKey,
) -> Result<(Applied, u64), TxError<WriteError>> {
    let write = async |part: &[Event], cursor: Option<i64>| {
        txn::run_tx(pool, policy, abort, async |tx| -> Result<_, WriteError> {
            writer::apply(tx, part, cursor, key).await
        })
        .await
    };
    let first = match write(events, cursor).await {
        Ok(applied) => return Ok((applied, 0)),
        Err(e) if e.is_data_error() => e,
        Err(e) => return Err(e),
    };
    tracing::warn!(
        events = events.len(),
        sqlstate = first.sqlstate().unwrap_or_default(),
        error = %dead_letters::error_text(&first),
        "batch failed with a data error; splitting it to set the offending events aside"
    );
    let mut applied = Applied::default();
    let mut dead = 0;
    // Ranges still to write, the next one on top; with the error when that exact range is
    // already known to fail.
    let mut todo = vec![(0..events.len(), Some(first))];
    while let Some((range, failed)) = todo.pop() {
        let error = match failed {
            Some(e) => e,
            None => match write(&events[range.clone()], None).await {
                Ok(a) => {
                    applied.merge(a);
                    continue;
                }
                Err(e) if e.is_data_error() => e,
                Err(e) => return Err(e),
            },
        };
        if range.len() > 1 {
            let mid = range.start + range.len() / 2;
            todo.push((mid..range.end, None));
            todo.push((range.start..mid, None));
            continue;
        }
        let ev = &events[range.start];
        set_aside(pool, policy, abort, key, ev, &error).await?;
        dead += 1;
    }
    applied.merge(write(&[], cursor).await?);
    Ok((applied, dead))
}

/// The lane of an event: a hash of its DID modulo `lanes` (events without a DID: lane 0).
pub(crate) fn lane_of(ev: &Event, lanes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    match ev.kind.did() {
        Some(did) if lanes > 1 => {
            // SipHash with fixed keys: the same DID maps to the same lane in every run.
            let mut h = std::hash::DefaultHasher::new();
            did.hash(&mut h);
            (h.finish() % lanes as u64) as usize
        }
        _ => 0,
    }
}

/// Writes `batch` and then `cursor` through `lanes` writer lanes (see the module docs): its
/// events are sorted by lane (stable: each DID's events stay in seq order), each lane's run is
/// written concurrently by [`write_isolating`] without a cursor, then [`writer::settle_lanes`] stores
/// the cursor once all have committed. If any lane fails, the others are dropped (their
/// transaction in flight rolls back) and the cursor stays where it was.
pub(crate) async fn write_lanes(
    pool: &Pool,
    policy: &RetryPolicy,
    abort: &CancellationToken,
    batch: &mut Batch,
    cursor: Option<i64>,
    key: &CursorKey,
    lanes: usize,
) -> Result<(Applied, u64), TxError<WriteError>> {
    // Stable: each lane's events stay in seq order.
    batch.events.sort_by_cached_key(|e| lane_of(e, lanes));
    let parts: Vec<&[Event]> = batch
        .events
        .chunk_by(|a, b| lane_of(a, lanes) == lane_of(b, lanes))
        .collect();
    let written = futures_util::future::try_join_all(
        parts
            .into_iter()
            .map(|part| write_isolating(pool, policy, abort, part, None, key)),
    )
    .await?;
    let mut applied = Applied::default();
    let mut dead = 0;
    for (a, d) in written {
        applied.merge(a);
        dead += d;
    }
    let purged = std::mem::take(&mut applied.purged);
    let settled = txn::run_tx(pool, policy, abort, async |tx| -> Result<_, WriteError> {
        writer::settle_lanes(tx, &purged, cursor, key).await
    })
    .await?;
    applied.merge(settled);
    Ok((applied, dead))
}

/// Stores `ev` in `dead_letters` (fenced like a batch) and counts it.
async fn set_aside(
    pool: &Pool,
    policy: &RetryPolicy,
    abort: &CancellationToken,
    key: &CursorKey,
    ev: &Event,
    error: &TxError<WriteError>,
) -> Result<(), TxError<WriteError>> {
    let sqlstate = error.sqlstate().unwrap_or_default();
    let text = dead_letters::error_text(error);
    tracing::error!(
        seq = ev.seq,
        did = ev.kind.did().unwrap_or_default(),
        sqlstate,
        error = %text,
        "event set aside in dead_letters: PostgreSQL refused it; the rest of its batch is written"
    );
    let store = async |with_event: bool| {
        txn::run_tx(pool, policy, abort, async |tx| -> Result<_, WriteError> {
            let changed =
                dead_letters::insert(tx, &key.service, ev, sqlstate, &text, with_event).await?;
            cursor::write(tx, key, cursor::NO_CURSOR).await?;
            Ok(changed)
        })
        .await
    };
    let desynchronized = match store(true).await {
        Ok(changed) => changed,
        Err(e) if e.is_data_error() => {
            tracing::warn!(seq = ev.seq, error = %dead_letters::error_text(&e), "the event's JSON was refused too; its dead letter keeps no event");
            store(false).await?
        }
        Err(e) => return Err(e),
    };
    let class = sqlstate.get(..2).unwrap_or("none").to_owned();
    metrics::counter!(m::DEAD_LETTERS_TOTAL, "class" => class).increment(1);
    if desynchronized {
        metrics::counter!(m::REPOS_DESYNCHRONIZED_TOTAL, "reason" => dead_letters::DEAD_LETTER)
            .increment(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firehose::event::Identity;
    use crate::firehose::{Event, EventKind};
    use crate::resync::HeldLimits;

    fn identity(did: &str, seq: i64) -> Event {
        Event {
            seq,
            kind: EventKind::Identity(Identity {
                did: did.to_owned(),
                handle: None,
                time: String::new(),
            }),
        }
    }

    #[test]
    fn a_did_always_has_the_same_lane_and_the_dids_spread_over_all_lanes() {
        let dids: Vec<String> = (0..200).map(|i| format!("did:plc:{i:024}")).collect();
        let mut used = [0usize; 4];
        for did in &dids {
            let lane = lane_of(&identity(did, 1), 4);
            assert_eq!(lane, lane_of(&identity(did, 99), 4));
            used[lane] += 1;
        }
        assert!(used.iter().all(|&n| n > 20), "{used:?}");
        assert_eq!(lane_of(&Event::info_at(5), 4), 0);
        assert_eq!(lane_of(&identity("did:plc:x", 1), 1), 0);
    }

    #[test]
    fn the_cursor_stays_below_the_oldest_held_event() {
        let held = Held::new(HeldLimits::default());
        assert_eq!(below_held(Some(10), None), Some(10));
        assert_eq!(below_held(Some(10), Some(&held)), Some(10));
        held.push(Event {
            seq: 7,
            kind: EventKind::Info {
                name: String::new(),
                message: None,
            },
        })
        .unwrap_err();
        held.begin("did:plc:a");
        held.push(Event {
            seq: 7,
            kind: EventKind::Account(crate::firehose::event::Account {
                did: "did:plc:a".into(),
                active: true,
                status: None,
                time: String::new(),
            }),
        })
        .unwrap();
        assert_eq!(below_held(Some(10), Some(&held)), Some(6));
        assert_eq!(below_held(Some(5), Some(&held)), Some(5));
        assert_eq!(below_held(None, Some(&held)), None);
    }
}
