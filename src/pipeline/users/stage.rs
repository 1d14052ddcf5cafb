//! The users stage's loop: routes each event (known DID through, new DID held while its user
//! is created), releases held events in order when a creation finishes or a map bound is hit,
//! and forwards them with the low watermark. It owns every creation task it starts: they live
//! in its [`JoinSet`], so dropping the stage aborts them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use deadpool_postgres::Pool;
use lru::LruCache;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::create::{create_user, Done, Outcome};
use crate::firehose::{Event, EventKind};
use crate::identity::UserCreator;
use crate::metrics as m;
use crate::pending::{DidOps, PendingOps, PushOutcome};
use crate::pipeline::queue;
use crate::pipeline::{DecodedChunk, Stats};

/// Background `#identity` refreshes in flight; beyond it refreshes are scheduled in the DB.
const MAX_REFRESHES: usize = 1_000;

/// A spawned creation or refresh.
struct Flight {
    generation: u64,
    abort: AbortHandle,
    refresh: bool,
}

pub(super) struct Stage {
    pool: Pool,
    creator: UserCreator,
    pending: PendingOps<Event>,
    known: KnownDids,
    in_flight: HashMap<String, Flight>,
    /// Every creation and refresh task started (bounded by the pending map's DIDs plus
    /// [`MAX_REFRESHES`]); finished ones are reaped each turn of the loop, the rest are
    /// aborted when the stage is dropped.
    tasks: JoinSet<()>,
    refreshes: usize,
    next_gen: u64,
    done_tx: mpsc::Sender<Done>,
    db_permits: Arc<Semaphore>,
    sched_tx: mpsc::Sender<String>,
    to_schedule: Vec<String>,
    /// Highest seq received.
    max_seen: Option<i64>,
    /// Events to forward, in order.
    out: Vec<Event>,
    stats: Arc<Stats>,
}

/// What [`Stage::new`] needs: the live handles and the channels of the stage.
pub(super) struct Parts {
    pub(super) pool: Pool,
    pub(super) creator: UserCreator,
    pub(super) pending: PendingOps<Event>,
    pub(super) known: KnownDids,
    pub(super) done_tx: mpsc::Sender<Done>,
    pub(super) db_permits: Arc<Semaphore>,
    pub(super) sched_tx: mpsc::Sender<String>,
    pub(super) stats: Arc<Stats>,
}

impl Stage {
    pub(super) fn new(p: Parts) -> Self {
        Self {
            pool: p.pool,
            creator: p.creator,
            pending: p.pending,
            known: p.known,
            in_flight: HashMap::new(),
            tasks: JoinSet::new(),
            refreshes: 0,
            next_gen: 0,
            done_tx: p.done_tx,
            db_permits: p.db_permits,
            sched_tx: p.sched_tx,
            to_schedule: Vec::new(),
            max_seen: None,
            out: Vec::new(),
            stats: p.stats,
        }
    }

    pub(super) async fn run(
        mut self,
        mut rx: queue::Receiver<DecodedChunk>,
        mut done_rx: mpsc::Receiver<Done>,
        tx: queue::Sender<DecodedChunk>,
        cancel: CancellationToken,
    ) {
        loop {
            tokio::select! {
                biased;
                Some(done) = done_rx.recv() => self.finish(done),
                chunk = rx.recv() => match chunk {
                    Some(chunk) => self.accept(chunk),
                    None => break,
                },
            }
            self.reap();
            if !self.flush(&tx).await {
                return self.abort_all();
            }
        }
        // Input ended. Draining: wait for the creations (each bounded by the resolution
        // timeout) unless we are told to stop, then release the rest as stubs.
        while !self.in_flight.is_empty() {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    self.release_all_stubs();
                    self.abort_all();
                }
                Some(done) = done_rx.recv() => self.finish(done),
            }
            self.reap();
            if !self.flush(&tx).await {
                return self.abort_all();
            }
        }
        self.release_all_stubs();
        let _ = self.flush(&tx).await;
    }

    /// Routes one decoded chunk: known DIDs through, new ones held while created.
    fn accept(&mut self, chunk: DecodedChunk) {
        for ev in chunk.events {
            if ev.seq > 0 {
                self.max_seen = Some(self.max_seen.map_or(ev.seq, |m| m.max(ev.seq)));
            }
            // Events without a DID, or without a seq to order them by, are not held.
            let did = match ev.kind.did() {
                Some(did) if ev.seq > 0 => did.to_owned(),
                _ => {
                    self.out.push(ev);
                    continue;
                }
            };
            if let EventKind::Identity(i) = &ev.kind {
                self.on_identity(&did, i.handle.as_deref());
            }
            if self.pending.contains(&did) {
                self.hold(did, ev);
            } else if self.known.get(&did).is_some() {
                self.out.push(ev);
            } else {
                self.hold(did.clone(), ev);
                self.start(did, false);
            }
        }
        self.publish();
    }

    fn hold(&mut self, did: String, ev: Event) {
        let seq = ev.seq;
        self.stats.users.events_held.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::USERS_EVENTS_HELD_TOTAL).increment(1);
        match self.pending.push(&did, seq, ev) {
            PushOutcome::Held => {}
            PushOutcome::Overflow { did, ops } => {
                self.stats.users.overflows.fetch_add(1, Ordering::Relaxed);
                self.release_stub(did, ops, "overflow");
            }
            PushOutcome::Evicted { did, ops } => {
                self.stats.users.evictions.fetch_add(1, Ordering::Relaxed);
                self.release_stub(did, ops, "evicted");
            }
        }
    }

    /// Releases `did`'s events now; its user is a stub resolved later.
    fn release_stub(&mut self, did: String, ops: DidOps<Event>, reason: &'static str) {
        metrics::counter!(m::USERS_STUB_RELEASES_TOTAL, "reason" => reason).increment(1);
        if let Some(f) = self.in_flight.remove(&did) {
            f.abort.abort();
            if f.refresh {
                self.refreshes = self.refreshes.saturating_sub(1);
            }
        }
        self.out.extend(ops.into_iter().map(|(_, ev)| ev));
        self.mark_known(did.clone());
        self.to_schedule.push(did);
    }

    fn release_all_stubs(&mut self) {
        for (did, ops) in self.pending.drain() {
            self.stats
                .users
                .shutdown_releases
                .fetch_add(1, Ordering::Relaxed);
            self.release_stub(did, ops, "shutdown");
        }
        self.publish();
    }

    fn abort_all(&mut self) {
        self.in_flight.clear();
        self.tasks.abort_all();
        self.refreshes = 0;
        metrics::gauge!(m::USERS_TASKS_IN_FLIGHT).set(0.0);
    }

    /// Collects the tasks that ended; a panic is logged (its DID's events are released as a
    /// stub when the map's bounds or the drain reach them).
    fn reap(&mut self) {
        while let Some(ended) = self.tasks.try_join_next() {
            if let Err(e) = ended {
                if e.is_panic() {
                    tracing::error!(error = %e, "a user creation task panicked");
                }
            }
        }
    }

    /// `#identity`: forget cached resolutions and refresh a known actor in the background.
    fn on_identity(&mut self, did: &str, handle: Option<&str>) {
        if let Some(resolver) = self.creator.resolver() {
            resolver.invalidate(did);
            if let Some(h) = handle {
                resolver.invalidate_handle(h);
            }
        }
        // A DID being created resolves afresh; an unknown one will be created.
        if self.in_flight.contains_key(did) || !self.known.contains(did) {
            return;
        }
        self.stats.users.refreshes.fetch_add(1, Ordering::Relaxed);
        if self.refreshes < MAX_REFRESHES {
            metrics::counter!(m::USERS_IDENTITY_REFRESHES_TOTAL, "mode" => "task").increment(1);
            self.start(did.to_owned(), true);
        } else {
            metrics::counter!(m::USERS_IDENTITY_REFRESHES_TOTAL, "mode" => "scheduled")
                .increment(1);
            self.to_schedule.push(did.to_owned());
        }
    }

    /// Spawns the creation (or, with `refresh`, the re-resolution) of `did`'s user into the
    /// stage's task set.
    fn start(&mut self, did: String, refresh: bool) {
        self.next_gen += 1;
        let generation = self.next_gen;
        let abort = self.tasks.spawn(create_user(
            self.pool.clone(),
            self.creator.clone(),
            self.db_permits.clone(),
            did.clone(),
            refresh,
            generation,
            self.done_tx.clone(),
        ));
        if refresh {
            self.refreshes += 1;
        }
        let flight = Flight {
            generation,
            abort,
            refresh,
        };
        // A refresh still running for a DID that must now be created is superseded.
        if let Some(old) = self.in_flight.insert(did, flight) {
            old.abort.abort();
            if old.refresh {
                self.refreshes = self.refreshes.saturating_sub(1);
            }
        }
        metrics::gauge!(m::USERS_TASKS_IN_FLIGHT).set(self.in_flight.len() as f64);
    }

    /// A creation finished: the DID is known and its events go on, in order.
    fn finish(&mut self, done: Done) {
        let refresh = match self.in_flight.get(&done.did) {
            Some(f) if f.generation == done.generation => f.refresh,
            // Cancelled after it finished (evicted meanwhile): already released.
            _ => return,
        };
        self.in_flight.remove(&done.did);
        metrics::gauge!(m::USERS_TASKS_IN_FLIGHT).set(self.in_flight.len() as f64);
        if refresh {
            // A known actor's `#identity` refresh: nothing was held for it.
            self.refreshes = self.refreshes.saturating_sub(1);
            tracing::debug!(did = %done.did, outcome = ?done.outcome, "identity refreshed");
            if matches!(done.outcome, Outcome::DbError) {
                self.to_schedule.push(done.did);
            }
            return;
        }
        let users = &self.stats.users;
        let label = match done.outcome {
            Outcome::Known => {
                users.known_in_db.fetch_add(1, Ordering::Relaxed);
                "known"
            }
            Outcome::Resolved => {
                users.resolved.fetch_add(1, Ordering::Relaxed);
                "resolved"
            }
            Outcome::Stub => {
                users.stubs.fetch_add(1, Ordering::Relaxed);
                "stub"
            }
            Outcome::DbError => {
                users.db_errors.fetch_add(1, Ordering::Relaxed);
                "error"
            }
        };
        metrics::counter!(m::USERS_CREATED_TOTAL, "result" => label).increment(1);
        if matches!(done.outcome, Outcome::DbError) {
            self.to_schedule.push(done.did.clone());
        }
        if let Some(ops) = self.pending.take(&done.did) {
            self.out.extend(ops.into_iter().map(|(_, ev)| ev));
        }
        self.mark_known(done.did);
        self.publish();
    }

    fn mark_known(&mut self, did: String) {
        self.known.put(did);
    }

    /// Highest S such that every event received with seq ≤ S has been forwarded.
    fn watermark(&self) -> Option<i64> {
        let max = self.max_seen?;
        Some(match self.pending.min_pending_seq() {
            Some(min) => (min - 1).min(max),
            None => max,
        })
    }

    fn publish(&self) {
        let users = &self.stats.users;
        users
            .pending_dids
            .store(self.pending.dids() as u64, Ordering::Relaxed);
        users.min_pending_seq.store(
            self.pending.min_pending_seq().unwrap_or(-1),
            Ordering::Relaxed,
        );
    }

    /// Sends what is ready downstream with the watermark; false when downstream is gone.
    async fn flush(&mut self, tx: &queue::Sender<DecodedChunk>) -> bool {
        metrics::gauge!(m::USERS_QUEUE_DEPTH, "queue" => "done").set(depth(&self.done_tx));
        metrics::gauge!(m::USERS_QUEUE_DEPTH, "queue" => "schedule").set(depth(&self.sched_tx));
        for did in self.to_schedule.drain(..) {
            if self.sched_tx.send(did).await.is_err() {
                tracing::error!("stub scheduling task is gone");
                break;
            }
        }
        if self.out.is_empty() {
            return true;
        }
        let watermark = self.watermark();
        if let Some(w) = watermark {
            self.stats.users.watermark.store(w, Ordering::Relaxed);
            metrics::gauge!(m::USERS_WATERMARK_SEQ).set(w as f64);
        }
        let chunk = DecodedChunk {
            events: std::mem::take(&mut self.out),
            watermark,
            ..DecodedChunk::default()
        };
        tx.send(chunk).await.is_ok()
    }
}

/// What one DID of the known-DID set costs besides its bytes (the `String`, the LRU node and
/// its hash slot).
const KNOWN_DID_OVERHEAD_BYTES: usize = 96;

/// DIDs known to have an actor row: an LRU set bounded in entries and in bytes (a `did:web`
/// may be long), with its gauges.
pub(super) struct KnownDids {
    lru: LruCache<String, ()>,
    bytes: usize,
    max_bytes: usize,
}

impl KnownDids {
    pub(super) fn new(max_dids: std::num::NonZeroUsize, max_bytes: usize) -> Self {
        Self {
            lru: LruCache::new(max_dids),
            bytes: 0,
            max_bytes,
        }
    }

    fn weight(did: &str) -> usize {
        did.len() + KNOWN_DID_OVERHEAD_BYTES
    }

    /// Whether `did` is known (marks it recently used).
    pub(super) fn get(&mut self, did: &str) -> Option<&()> {
        self.lru.get(did)
    }

    pub(super) fn contains(&self, did: &str) -> bool {
        self.lru.contains(did)
    }

    /// Remembers `did`, forgetting the least recently used DIDs past either bound.
    pub(super) fn put(&mut self, did: String) {
        let weight = Self::weight(&did);
        match self.lru.push(did, ()) {
            // Already known: nothing changes.
            Some((old, ())) if self.lru.contains(&old) => {}
            Some((evicted, ())) => {
                self.bytes = self.bytes.saturating_sub(Self::weight(&evicted)) + weight;
            }
            None => self.bytes += weight,
        }
        while self.bytes > self.max_bytes {
            let Some((evicted, ())) = self.lru.pop_lru() else {
                break;
            };
            self.bytes = self.bytes.saturating_sub(Self::weight(&evicted));
        }
        metrics::gauge!(m::USERS_KNOWN_DIDS).set(self.lru.len() as f64);
        metrics::gauge!(m::USERS_KNOWN_DIDS_BYTES).set(self.bytes as f64);
    }
}

/// Items waiting in a bounded channel, for its gauge.
fn depth<T>(s: &mpsc::Sender<T>) -> f64 {
    s.max_capacity().saturating_sub(s.capacity()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dids_are_bounded_in_entries_and_bytes() {
        let max = std::num::NonZeroUsize::new(3).unwrap();
        let w = KnownDids::weight("did:plc:aaaa");
        let mut k = KnownDids::new(max, 2 * w);
        k.put("did:plc:aaaa".into());
        k.put("did:plc:aaaa".into());
        assert_eq!(k.bytes, w);
        k.put("did:plc:bbbb".into());
        k.put("did:plc:cccc".into());
        // The byte bound holds two: the least recently used went.
        assert_eq!(k.bytes, 2 * w);
        assert!(!k.contains("did:plc:aaaa") && k.contains("did:plc:cccc"));
        let mut k = KnownDids::new(max, usize::MAX);
        for d in [
            "did:plc:aaaa",
            "did:plc:bbbb",
            "did:plc:cccc",
            "did:plc:dddd",
        ] {
            k.put(d.into());
        }
        assert_eq!((k.lru.len(), k.bytes), (3, 3 * w));
    }
}
