//! Verify stage (§12, `--verify-commits`): between the users stage and the batcher, every
//! `#commit` and `#sync` is checked before anything of it is written.
//!
//! For each chunk, in order:
//! 1. the heads (`rev`, `data`, sync state) and signing keys of the chunk's repos come from a
//!    bounded LRU cache, else from `actors`, else (keys only) from the DID document;
//! 2. every commit is verified on a blocking thread ([`crate::sync::verify_commit`]: CAR root,
//!    `did`/`rev`, signature, MST proof of every op by inversion to `prevData`), and every
//!    `#sync` by its signature;
//! 3. in seq order, each verified commit is checked against its repo's head: `since` must be
//!    the stored `rev` and `prevData` the stored `data` (a commit not newer than the head is a
//!    replay and passes on; the writer skips it). A commit that does not chain desynchronizes
//!    its repo; while a repo is not synchronized its live commits are not applied: the resync
//!    to come fetches the repo after them, so its CAR includes them. While a resync of the
//!    repo is running (`Held::begin` .. `finish`/`abandon`), every live event of the repo is
//!    held instead ([`Held`]): the CAR being fetched may miss it; the resync applies it after
//!    the CAR, and the writer keeps the durable cursor below the oldest held event.
//!
//! A commit that fails verification writes nothing and is counted by reason. On a bad
//! signature the DID document is fetched again once (the key may have rotated). A repo
//! whose key cannot be had is desynchronized (`key_unavailable`) rather than trusted.
//! Desynchronization marks are written at once (`repos::desynchronize`), before the cursor
//! can pass the event that caused them, so a crash never forgets them.

mod chain;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cid::Cid;
use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lru::LruCache;
use tokio::task::JoinHandle;

use super::{queue, DecodedChunk, PipelineError};
use crate::firehose::{Event, EventKind};
use crate::identity::Resolver;
use crate::metrics as m;
use crate::repos;
use crate::resync::Held;
use crate::sync::{verify_commit, verify_sync, PublicKey, VerifyError};
use chain::{continues, Continuity, Repo};

/// Repos whose head and key the stage remembers (~250 bytes each: ~25 MB at most). Far more
/// than the events in flight between this stage and the writer, so an evicted repo's head is
/// always already committed when it is read back from `actors`.
pub const DEFAULT_VERIFY_CACHE_REPOS: usize = 100_000;
/// Estimated bytes of one cache entry (DID, rev, two CIDs, key, LRU links).
const ENTRY_BYTES: usize = 256;
/// Chunks verifying at once (one per core of the 2-core target machine).
const VERIFY_DEPTH: usize = 2;
/// DID documents fetched at once for keys missing from the cache and `actors`.
const KEY_FETCHES: usize = 16;
/// Counted reason of a repo whose signing key could not be found.
pub const KEY_UNAVAILABLE: &str = "key_unavailable";
/// Counted reason of a commit that does not continue its repo's stored head.
pub const CHAIN_BROKEN: &str = "chain_broken";
/// Counted reason of a `#sync` whose commit is not the stored head.
pub const SYNC_DIFFERS: &str = "sync_differs";

/// `--verify-commits` default of `run`: the daemon trusts no relay.
pub const DEFAULT_VERIFY_COMMITS_RUN: bool = true;
/// `--verify-commits` default of `replay`: the bundled corpora other than `snap` come
/// without their signing keys.
pub const DEFAULT_VERIFY_COMMITS_REPLAY: bool = false;

/// Command-line flags of commit verification; `#[command(flatten)]` them into a subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct VerifyArgs {
    /// Verify every #commit (signature with the account's key, MST proof of every op,
    /// since/prevData against the stored head) and #sync before writing it; rejected commits
    /// write nothing, a broken chain queues a resync. Keys come from DID documents (see
    /// --plc-url). Default: on for `run`, off for `replay`.
    #[arg(
        long,
        env = "VERIFY_COMMITS",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub verify_commits: Option<bool>,
}

impl VerifyArgs {
    /// Whether to verify, with `default` when the flag is not given.
    pub fn enabled(&self, default: bool) -> bool {
        self.verify_commits.unwrap_or(default)
    }
}

/// Counters of the verify stage, for the run summary.
#[derive(Debug, Default)]
pub struct VerifyStats {
    pub verified: AtomicU64,
    pub rejected: AtomicU64,
    pub desynchronized: AtomicU64,
    /// Commits of repos awaiting a resync, not applied.
    pub not_applied: AtomicU64,
    /// Events held for a repo whose resync was running.
    pub held: AtomicU64,
    /// Rejections by reason (fixed labels of [`VerifyError::reason`] plus
    /// [`KEY_UNAVAILABLE`]: bounded).
    rejected_by: Mutex<BTreeMap<&'static str, u64>>,
}

impl VerifyStats {
    fn reject(&self, reason: &'static str) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
        *self
            .rejected_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_default() += 1;
        metrics::counter!(m::COMMITS_REJECTED_TOTAL, "reason" => reason).increment(1);
    }

    /// Rejections by reason so far.
    pub fn rejected_by_reason(&self) -> BTreeMap<&'static str, u64> {
        self.rejected_by
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The stage: owns its cache; one task.
pub(super) struct VerifyStage {
    pool: Pool,
    /// Where live events of repos in resync wait (shared with the resync workers).
    held: Option<Arc<Held>>,
    resolver: Arc<Resolver>,
    repos: LruCache<String, Repo>,
    stats: Arc<VerifyStats>,
}

/// A chunk verified on a blocking thread: its events (taken out of it) and their checks.
struct Verifying {
    chunk: DecodedChunk,
    events: Vec<Event>,
    checks: Vec<Check>,
}

/// The result of verifying one event on the blocking thread.
enum Check {
    /// Not a commit or `#sync`, or a `tooBig` commit (the writer marks those).
    Pass,
    Ok {
        data: Cid,
    },
    Failed(VerifyError),
    NoKey,
}

impl VerifyStage {
    pub(super) fn new(
        pool: Pool,
        resolver: Arc<Resolver>,
        cache_repos: usize,
        stats: Arc<VerifyStats>,
        held: Option<Arc<Held>>,
    ) -> Self {
        let cap = NonZeroUsize::new(cache_repos.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            pool,
            held,
            resolver,
            repos: LruCache::new(cap),
            stats,
        }
    }

    /// Runs until the input ends or the next stage is gone.
    pub(super) async fn run(
        mut self,
        mut rx: queue::Receiver<DecodedChunk>,
        tx: queue::Sender<DecodedChunk>,
    ) -> Result<(), PipelineError> {
        // Up to `VERIFY_DEPTH` chunks verify at once on blocking threads while the next one's
        // heads and keys load; they are finished (continuity, marks) and handed on in order.
        let mut inflight: VecDeque<JoinHandle<Verifying>> = VecDeque::new();
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                done = async {
                    match inflight.front_mut() {
                        Some(job) => job.await,
                        None => std::future::pending().await,
                    }
                }, if !inflight.is_empty() => {
                    inflight.pop_front();
                    let verifying = done.map_err(|source| PipelineError::Task {
                        task: "verify job",
                        source,
                    })?;
                    let chunk = self.finish(verifying).await?;
                    metrics::gauge!(m::VERIFY_CACHE_REPOS).set(self.repos.len() as f64);
                    metrics::gauge!(m::VERIFY_CACHE_BYTES)
                        .set((self.repos.len() * ENTRY_BYTES) as f64);
                    if tx.send(chunk).await.is_err() {
                        return Ok(());
                    }
                }
                next = rx.recv(), if open && inflight.len() < VERIFY_DEPTH => match next {
                    Some(chunk) => inflight.push_back(self.start(chunk).await?),
                    None => open = false,
                },
                else => return Ok(()),
            }
        }
    }

    /// Loads the heads and keys `chunk` needs and starts verifying it on a blocking thread.
    async fn start(
        &mut self,
        mut chunk: DecodedChunk,
    ) -> Result<JoinHandle<Verifying>, PipelineError> {
        let dids: Vec<String> = {
            let mut set = HashSet::new();
            for ev in &chunk.events {
                match &ev.kind {
                    EventKind::Commit(c) if c.readable() => set.insert(c.repo.clone()),
                    EventKind::Sync(s) => set.insert(s.did.clone()),
                    _ => false,
                };
            }
            let mut v: Vec<String> = set.into_iter().collect();
            v.sort_unstable();
            v
        };
        self.load(&dids).await?;
        let keys: HashMap<String, PublicKey> = dids
            .iter()
            .filter_map(|d| {
                let key = self.repos.peek(d)?.key.clone()?;
                Some((d.clone(), key))
            })
            .collect();
        let events = std::mem::take(&mut chunk.events);
        Ok(tokio::task::spawn_blocking(move || {
            let checks: Vec<Check> = events.iter().map(|ev| check(ev, &keys)).collect();
            Verifying {
                chunk,
                events,
                checks,
            }
        }))
    }

    /// Walks a verified chunk in seq order: rechecks bad signatures, checks continuity,
    /// writes the desynchronization marks, and returns what goes on.
    async fn finish(&mut self, verifying: Verifying) -> Result<DecodedChunk, PipelineError> {
        let Verifying {
            mut chunk,
            events,
            checks,
        } = verifying;
        let mut marks: Vec<(String, &'static str)> = Vec::new();
        let mut out = Vec::with_capacity(events.len());
        for (mut ev, check) in events.into_iter().zip(checks) {
            let check = match check {
                Check::Failed(VerifyError::BadSignature) => self.recheck(&ev).await,
                other => other,
            };
            let data = match check {
                Check::Pass => {
                    // #identity: the signing key may have changed.
                    if let EventKind::Identity(i) = &ev.kind {
                        if let Some(r) = self.repos.get_mut(&i.did) {
                            r.key = None;
                        }
                    }
                    if let Some(ev) = self.hold_if_resyncing(ev) {
                        out.push(ev);
                    }
                    continue;
                }
                Check::NoKey => {
                    self.stats.reject(KEY_UNAVAILABLE);
                    if let Some(did) = ev.kind.did() {
                        let did = did.to_owned();
                        self.desync(&did, KEY_UNAVAILABLE, &mut marks);
                    }
                    continue;
                }
                Check::Failed(e) => {
                    tracing::debug!(seq = ev.seq, error = %e, "commit rejected");
                    self.stats.reject(e.reason());
                    continue;
                }
                Check::Ok { data } => data,
            };
            self.verified();
            if let EventKind::Commit(c) = &mut ev.kind {
                c.data = Some(data);
            }
            let Some(mut ev) = self.hold_if_resyncing(ev) else {
                continue;
            };
            match &mut ev.kind {
                EventKind::Commit(c) => {
                    let repo = self.repos.get_or_insert_mut(c.repo.clone(), Repo::default);
                    match continues(repo, c, data) {
                        Continuity::Applies | Continuity::Replayed => out.push(ev),
                        Continuity::AwaitsResync => {
                            self.stats.not_applied.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!(m::EVENTS_OF_DESYNCHRONIZED_REPOS_TOTAL).increment(1);
                        }
                        Continuity::Broken => {
                            let did = c.repo.clone();
                            self.stats.not_applied.fetch_add(1, Ordering::Relaxed);
                            self.desync(&did, CHAIN_BROKEN, &mut marks);
                        }
                    }
                }
                EventKind::Sync(s) => {
                    let repo = self.repos.get_or_insert_mut(s.did.clone(), Repo::default);
                    let same = repo.data == Some(data) && repo.rev.as_deref() == Some(&s.rev);
                    let older = repo.rev.as_deref().is_some_and(|r| s.rev.as_str() < r);
                    if !same && !older {
                        let did = s.did.clone();
                        self.desync(&did, SYNC_DIFFERS, &mut marks);
                    }
                    out.push(ev);
                }
                _ => out.push(ev),
            }
        }
        if !marks.is_empty() {
            let client = self.pool.get().await.map_err(PipelineError::VerifyPool)?;
            repos::desynchronize(&**client, &marks)
                .await
                .map_err(PipelineError::VerifyDb)?;
        }
        chunk.events = out;
        Ok(chunk)
    }

    /// Holds `ev` when its repo's resync is running (the CAR being fetched may not contain
    /// it); the resync applies it afterwards. Returns the event when it is not held.
    fn hold_if_resyncing(&mut self, ev: Event) -> Option<Event> {
        let (Some(held), Some(did)) = (self.held.as_ref(), ev.kind.did()) else {
            return Some(ev);
        };
        if !held.is_holding(did) {
            return Some(ev);
        }
        // Its head changes under the resync: read it again from `actors` afterwards.
        if let Some(r) = self.repos.get_mut(did) {
            r.synchronized = false;
        }
        self.stats.held.fetch_add(1, Ordering::Relaxed);
        if held.push(ev).is_err() {
            // Past the store's bound: the repo is resynced again once this resync is done.
            self.stats.not_applied.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    fn verified(&self) {
        self.stats.verified.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::COMMITS_VERIFIED_TOTAL).increment(1);
    }

    /// Marks `did` desynchronized (written before the chunk is handed on).
    fn desync(&mut self, did: &str, reason: &'static str, marks: &mut Vec<(String, &'static str)>) {
        if let Some(r) = self.repos.get_mut(did) {
            if !r.synchronized {
                return;
            }
            r.synchronized = false;
        }
        self.stats.desynchronized.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::REPOS_DESYNCHRONIZED_TOTAL, "reason" => reason).increment(1);
        tracing::info!(did, reason, "repo desynchronized; resync queued");
        marks.push((did.to_owned(), reason));
    }

    /// Fills the cache for `dids`: heads of repos not cached or not synchronized (their state
    /// changes under resyncs) from `actors`, then keys from `actors.signing_key` and, for the
    /// rest, from DID documents.
    async fn load(&mut self, dids: &[String]) -> Result<(), PipelineError> {
        let stale: Vec<String> = dids
            .iter()
            .filter(|d| self.repos.peek(*d).is_none_or(|r| !r.synchronized))
            .cloned()
            .collect();
        let need_key: Vec<String> = dids
            .iter()
            .filter(|d| self.repos.peek(*d).is_none_or(|r| r.key.is_none()))
            .cloned()
            .collect();
        if stale.is_empty() && need_key.is_empty() {
            return Ok(());
        }
        let client = self.pool.get().await.map_err(PipelineError::VerifyPool)?;
        if !stale.is_empty() {
            let heads = repos::heads(&**client, &stale)
                .await
                .map_err(PipelineError::VerifyDb)?;
            let mut found: HashSet<String> = HashSet::new();
            for (did, head) in heads {
                let key = self.repos.peek(&did).and_then(|r| r.key.clone());
                let mut repo = Repo::from_head(head);
                repo.key = key;
                found.insert(did.clone());
                self.repos.put(did, repo);
            }
            for did in stale.into_iter().filter(|d| !found.contains(d)) {
                self.repos.put(
                    did,
                    Repo {
                        synchronized: true,
                        ..Repo::default()
                    },
                );
            }
        }
        if need_key.is_empty() {
            return Ok(());
        }
        let rows = client
            .query(
                "SELECT did, signing_key FROM actors WHERE did = ANY($1) AND signing_key IS NOT NULL",
                &[&need_key],
            )
            .await
            .map_err(PipelineError::VerifyDb)?;
        drop(client);
        let mut missing: HashSet<String> = need_key.into_iter().collect();
        for row in rows {
            let (Ok(did), Ok(key)) = (row.try_get::<_, String>(0), row.try_get::<_, String>(1))
            else {
                continue;
            };
            if let (Ok(key), Some(repo)) = (PublicKey::parse(&key), self.repos.get_mut(&did)) {
                repo.key = Some(key);
                missing.remove(&did);
            }
        }
        let resolver = self.resolver.clone();
        let fetched: Vec<(String, Option<PublicKey>)> =
            futures_util::stream::iter(missing.into_iter().map(|did| {
                let resolver = resolver.clone();
                async move {
                    let key = fetch_key(&resolver, &did).await;
                    (did, key)
                }
            }))
            .buffer_unordered(KEY_FETCHES)
            .collect()
            .await;
        for (did, key) in fetched {
            if let Some(repo) = self.repos.get_mut(&did) {
                repo.key = key;
            }
        }
        Ok(())
    }

    /// A bad signature: the key may have rotated. Fetches the DID document again (once) and
    /// verifies with the new key if it differs.
    async fn recheck(&mut self, ev: &Event) -> Check {
        let Some(did) = ev.kind.did() else {
            return Check::Failed(VerifyError::BadSignature);
        };
        self.resolver.invalidate(did);
        let fresh = fetch_key(&self.resolver, did).await;
        let old = self.repos.peek(did).and_then(|r| r.key.clone());
        let Some(key) = fresh.filter(|k| Some(k) != old.as_ref()) else {
            return Check::Failed(VerifyError::BadSignature);
        };
        if let Some(repo) = self.repos.get_mut(did) {
            repo.key = Some(key.clone());
        }
        let keys = HashMap::from([(did.to_owned(), key)]);
        check(ev, &keys)
    }
}

async fn fetch_key(resolver: &Resolver, did: &str) -> Option<PublicKey> {
    match resolver.resolve_did(did).await {
        Ok(doc) => doc
            .signing_key
            .as_deref()
            .and_then(|k| PublicKey::parse(k).ok()),
        Err(e) => {
            tracing::debug!(did, error = %e, "no signing key");
            None
        }
    }
}

/// Verifies one event with its repo's key (pure; runs on a blocking thread).
fn check(ev: &Event, keys: &HashMap<String, PublicKey>) -> Check {
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
