//! Live events held back for repos that are being resynchronized (§12).
//!
//! While a repo is `desynchronized` or `resyncing`, applying its live commits on top of rows
//! that are wrong would only spread the damage, and dropping them would lose what the CAR
//! fetched a moment ago does not hold yet. The pipeline pushes such events here instead
//! ([`Held::push`]); the resync of the repo applies, right after the CAR in the same
//! transaction, the held events whose `rev` is newer than the CAR's (older ones are already in
//! it) and then releases the repo ([`Held::finish`]).
//!
//! Bounded in events and bytes, in total and per repo. Past a bound the repo's held events are
//! dropped, later ones for it are refused until its next resync, and that resync leaves it
//! `desynchronized` so it is fetched again (what was dropped is in the newer CAR).
//!
//! Contract for the pipeline: hold every event of a DID for which [`Held::is_holding`] is true
//! even if the database already says `synchronized` (the resync may have committed but not yet
//! applied what arrived meanwhile), and keep the durable cursor below [`Held::min_seq`].

use std::collections::HashMap;
use std::sync::Mutex;

use crate::budget::Weigh;
use crate::firehose::Event;
use crate::metrics as m;

/// Default total bound in events: a few minutes of a busy relay's traffic for repos in resync.
pub const DEFAULT_MAX_EVENTS: usize = 100_000;
/// Default total bound in bytes (as the pipeline's queues weigh events, [`Weigh`]).
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
/// Default bound per repo: one very active account cannot take the whole store.
pub const DEFAULT_MAX_EVENTS_PER_REPO: usize = 10_000;

/// The store's bounds.
#[derive(Debug, Clone, Copy)]
pub struct HeldLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub max_events_per_repo: usize,
}

impl Default for HeldLimits {
    fn default() -> Self {
        Self {
            max_events: DEFAULT_MAX_EVENTS,
            max_bytes: DEFAULT_MAX_BYTES,
            max_events_per_repo: DEFAULT_MAX_EVENTS_PER_REPO,
        }
    }
}

/// The event was not held: a bound was reached. The repo's held events were dropped; it is
/// resynchronized again after its current resync.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("held events over their bound: the repo's held events were dropped")]
pub struct Overflow;

#[derive(Debug, Default)]
struct Repo {
    events: Vec<Event>,
    bytes: usize,
    /// A bound was hit: events were dropped, the next resync is not enough.
    overflowed: bool,
}

#[derive(Debug, Default)]
struct Inner {
    repos: HashMap<String, Repo>,
    events: usize,
    bytes: usize,
}

/// What the resync of a repo does once its transaction committed.
#[derive(Debug)]
pub enum Finish {
    /// Nothing more was held: the repo is released, live events apply directly again.
    Done,
    /// Events arrived meanwhile: apply them, then call [`Held::finish`] again.
    More(Vec<Event>),
    /// Events were dropped: the repo must be resynchronized again (it is released).
    Overflowed,
}

/// The held-event store; share it as `Arc<Held>`.
#[derive(Debug, Default)]
pub struct Held {
    limits: HeldLimits,
    inner: Mutex<Inner>,
}

impl Held {
    pub fn new(limits: HeldLimits) -> Self {
        Self {
            limits,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds `event` (of a repo that is not synchronized) until the repo's resync applies it.
    /// Events without a DID are refused as overflow would be: they are never held.
    pub fn push(&self, event: Event) -> Result<(), Overflow> {
        let Some(did) = event.kind.did().map(str::to_owned) else {
            return Err(Overflow);
        };
        let size = event.bytes();
        let mut inner = self.lock();
        let inner = &mut *inner;
        let repo = inner.repos.entry(did).or_default();
        let over = repo.overflowed
            || repo.events.len() + 1 > self.limits.max_events_per_repo
            || inner.events + 1 > self.limits.max_events
            || inner.bytes + size > self.limits.max_bytes;
        if over {
            if !repo.overflowed {
                metrics::counter!(m::HELD_OVERFLOWS_TOTAL).increment(1);
            }
            inner.events -= repo.events.len();
            inner.bytes -= repo.bytes;
            repo.events = Vec::new();
            repo.bytes = 0;
            repo.overflowed = true;
            publish(inner);
            return Err(Overflow);
        }
        repo.events.push(event);
        repo.bytes += size;
        inner.events += 1;
        inner.bytes += size;
        publish(inner);
        Ok(())
    }

    /// A resync of `did` starts (before its `getRepo`): from now on the pipeline holds the
    /// repo's live events, which the CAR about to be fetched may not contain yet.
    pub fn begin(&self, did: &str) {
        let mut inner = self.lock();
        inner.repos.entry(did.to_owned()).or_default();
        publish(&inner);
    }

    /// The resync of `did` failed: its held events are dropped and the repo released. Nothing
    /// is lost: the repo stays desynchronized, and its next resync fetches a CAR made after
    /// every event dropped here. Releasing lets the durable cursor move on while the repo
    /// backs off (up to an hour).
    pub fn abandon(&self, did: &str) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        if let Some(repo) = inner.repos.remove(did) {
            inner.events -= repo.events.len();
            inner.bytes -= repo.bytes;
        }
        publish(inner);
    }

    /// Whether events of `did` are being held (the pipeline must hold its next ones too).
    pub fn is_holding(&self, did: &str) -> bool {
        self.lock().repos.contains_key(did)
    }

    /// The lowest seq held: the durable cursor must stay below it.
    pub fn min_seq(&self) -> Option<i64> {
        let inner = self.lock();
        inner
            .repos
            .values()
            .flat_map(|r| r.events.iter().map(|e| e.seq))
            .min()
    }

    /// A copy of `did`'s held events, in arrival order (the resync applies them; they stay
    /// here until [`Held::finish`] so a failed transaction loses nothing).
    pub fn snapshot(&self, did: &str) -> Vec<Event> {
        self.lock()
            .repos
            .get(did)
            .map(|r| r.events.clone())
            .unwrap_or_default()
    }

    /// After a committed resync that applied the first `applied` held events of `did`: drops
    /// them and either releases the repo or hands back what arrived meanwhile.
    pub fn finish(&self, did: &str, applied: usize) -> Finish {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(repo) = inner.repos.get_mut(did) else {
            return Finish::Done;
        };
        let n = applied.min(repo.events.len());
        let dropped: usize = repo.events.drain(..n).map(|e| e.bytes()).sum();
        repo.bytes -= dropped;
        inner.events -= n;
        inner.bytes -= dropped;
        let out = if repo.overflowed {
            inner.events -= repo.events.len();
            inner.bytes -= repo.bytes;
            inner.repos.remove(did);
            Finish::Overflowed
        } else if repo.events.is_empty() {
            inner.repos.remove(did);
            Finish::Done
        } else {
            Finish::More(repo.events.clone())
        };
        publish(inner);
        out
    }

    /// (repos, events, bytes) held now.
    pub fn sizes(&self) -> (usize, usize, usize) {
        let inner = self.lock();
        (inner.repos.len(), inner.events, inner.bytes)
    }
}

fn publish(inner: &Inner) {
    metrics::gauge!(m::HELD_REPOS).set(inner.repos.len() as f64);
    metrics::gauge!(m::HELD_EVENTS).set(inner.events as f64);
    metrics::gauge!(m::HELD_BYTES).set(inner.bytes as f64);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firehose::event::Identity;
    use crate::firehose::EventKind;

    fn ev(seq: i64, did: &str) -> Event {
        Event {
            seq,
            kind: EventKind::Identity(Identity {
                did: did.into(),
                handle: None,
                time: String::new(),
            }),
        }
    }

    #[test]
    fn a_running_resync_holds_and_a_failed_one_releases() {
        let held = Held::new(HeldLimits::default());
        assert!(!held.is_holding("did:plc:a"));
        held.begin("did:plc:a");
        assert!(
            held.is_holding("did:plc:a"),
            "held from the start of the resync"
        );
        assert_eq!(held.min_seq(), None, "nothing held yet: the cursor is free");
        held.push(ev(3, "did:plc:a")).unwrap();
        held.push(ev(4, "did:plc:b")).unwrap();
        assert_eq!(held.min_seq(), Some(3));
        held.abandon("did:plc:a");
        assert!(!held.is_holding("did:plc:a"));
        assert_eq!(held.min_seq(), Some(4));
        assert_eq!(held.sizes().1, 1);
        held.abandon("did:plc:never");
        assert_eq!(held.sizes().0, 1);
    }

    #[test]
    fn holds_until_finished_and_hands_back_late_events() {
        let held = Held::default();
        held.push(ev(5, "did:plc:a")).unwrap();
        held.push(ev(7, "did:plc:b")).unwrap();
        assert!(held.is_holding("did:plc:a"));
        assert_eq!(held.min_seq(), Some(5));
        let snap = held.snapshot("did:plc:a");
        assert_eq!(snap.len(), 1);
        held.push(ev(9, "did:plc:a")).unwrap();
        match held.finish("did:plc:a", snap.len()) {
            Finish::More(more) => assert_eq!(more.iter().map(|e| e.seq).collect::<Vec<_>>(), [9]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(held.finish("did:plc:a", 1), Finish::Done));
        assert!(!held.is_holding("did:plc:a"));
        assert_eq!(held.min_seq(), Some(7));
        assert_eq!(held.sizes().1, 1);
    }

    #[test]
    fn past_a_bound_the_repo_is_dropped_and_resynced_again() {
        let held = Held::new(HeldLimits {
            max_events: 3,
            max_bytes: usize::MAX,
            max_events_per_repo: 2,
        });
        held.push(ev(1, "did:plc:a")).unwrap();
        held.push(ev(2, "did:plc:a")).unwrap();
        assert_eq!(held.push(ev(3, "did:plc:a")), Err(Overflow));
        // Refused until its resync finishes, even under the bound.
        assert_eq!(held.push(ev(4, "did:plc:a")), Err(Overflow));
        assert_eq!(held.sizes(), (1, 0, 0));
        held.push(ev(5, "did:plc:b")).unwrap();
        assert!(matches!(held.finish("did:plc:a", 0), Finish::Overflowed));
        assert!(!held.is_holding("did:plc:a"));
        held.push(ev(6, "did:plc:a")).unwrap();
        assert_eq!(held.sizes().1, 2);
        // The total bound.
        held.push(ev(7, "did:plc:c")).unwrap();
        assert_eq!(held.push(ev(8, "did:plc:c")), Err(Overflow));
        let (_, events, bytes) = held.sizes();
        assert_eq!(events, 2);
        assert!(bytes > 0);
    }
}
