//! Verify stage (§12, `--verify-commits`): between the users stage and the batcher, every
//! `#commit` and `#sync` is checked before anything of it is written.
//!
//! For each chunk, in order:
//! 1. the heads (`rev`, `data`, sync state) and signing keys of the chunk's repos come from a
//!    bounded LRU cache, else from `actors`, else (keys only) from the DID document. What is
//!    missing is loaded as soon as the chunk arrives, by a task of its own, while earlier
//!    chunks verify ([`load`]): the ordered path never waits on a query or a DID document
//!    that only some repos need;
//! 2. every commit is verified on the blocking pool, the chunk split in one part per core
//!    ([`check`]; [`crate::sync::verify_commit`]: CAR root, `did`/`rev`, signature, MST proof
//!    of every op by inversion to `prevData`), and every `#sync` by its signature;
//! 3. in seq order, each verified commit is checked against its repo's head: `since` must be
//!    the stored `rev` and `prevData` the stored `data` (a commit not newer than the head is a
//!    replay and passes on; the writer skips it). A commit that does not chain desynchronizes
//!    its repo; while a repo is not synchronized its live commits are not applied: the resync
//!    to come fetches the repo after them, so its CAR includes them. While a resync of the
//!    repo is running (`Held::begin` .. `finish`/`abandon`), every live event of the repo is
//!    held instead ([`Held`]): the CAR being fetched may miss it; the resync applies it after
//!    the CAR, and the writer keeps the durable cursor below the oldest held event.
//!
//! A commit that fails verification writes nothing and is counted by reason. An `#identity`
//! event makes its repo's key stale: the next chunk that needs it fetches the DID document
//! again. On a bad signature the DID document is fetched again once (the key may have
//! rotated). A repo
//! whose key cannot be had is desynchronized (`key_unavailable`) rather than trusted.
//! Desynchronization marks are written at once (`repos::desynchronize`), before the cursor
//! can pass the event that caused them, so a crash never forgets them.

mod chain;
mod check;
mod load;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use deadpool_postgres::Pool;
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

use super::{queue, DecodedChunk, PipelineError};
use crate::firehose::{Event, EventKind};
use crate::identity::Resolver;
use crate::metrics as m;
use crate::repos;
use crate::resync::Held;
use crate::sync::VerifyError;
use chain::{continues, Continuity, Repo};
use check::{Check, Verifying};
use load::{Cache, Loaded};

/// Repos whose head and key the stage remembers (~250 bytes each: ~25 MB at most). Far more
/// than the events in flight between this stage and the writer, so an evicted repo's head is
/// always already committed when it is read back from `actors`.
pub const DEFAULT_VERIFY_CACHE_REPOS: usize = 100_000;
/// Estimated bytes of one cache entry (DID, rev, two CIDs, key, LRU links).
const ENTRY_BYTES: usize = 256;
/// Chunks verifying at once (each split in one part per core): while one is being finished
/// (continuity, marks) and handed on, the next ones keep the cores busy.
const VERIFY_DEPTH: usize = 2;
/// Chunks whose heads and keys load ahead of their verification (a query and a few DID
/// documents each: two keep a slow load from ever holding the verification up).
const LOAD_AHEAD: usize = 2;
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
    cache: Cache,
    /// Number of the next chunk to arrive.
    next_chunk: u64,
    /// Parts a chunk is verified in (the cores).
    parts: usize,
    stats: Arc<VerifyStats>,
}

/// A chunk whose heads and keys are loading.
struct Loading {
    /// The chunk's number in arrival order.
    number: u64,
    chunk: DecodedChunk,
    /// The repos its events verify against.
    dids: Vec<String>,
    /// Aborted if the stage stops first.
    load: AbortOnDropHandle<Result<Loaded, PipelineError>>,
}

impl VerifyStage {
    pub(super) fn new(
        pool: Pool,
        resolver: Arc<Resolver>,
        cache_repos: usize,
        stats: Arc<VerifyStats>,
        held: Option<Arc<Held>>,
    ) -> Self {
        Self {
            pool,
            held,
            resolver,
            cache: Cache::new(cache_repos),
            next_chunk: 0,
            parts: std::thread::available_parallelism().map_or(1, |n| n.get()),
            stats,
        }
    }

    /// Runs until the input ends or the next stage is gone.
    pub(super) async fn run(
        mut self,
        mut rx: queue::Receiver<DecodedChunk>,
        tx: queue::Sender<DecodedChunk>,
    ) -> Result<(), PipelineError> {
        // Each chunk goes through three queues in order: its load runs as soon as it arrives
        // (up to `LOAD_AHEAD` chunks), it verifies on the blocking pool (up to `VERIFY_DEPTH`
        // chunks), then it is finished (continuity, marks) and handed on. Finishing comes
        // first, then starting verification, then taking a new chunk.
        let mut loading: VecDeque<Loading> = VecDeque::new();
        let mut verifying: VecDeque<JoinHandle<Result<Verifying, PipelineError>>> = VecDeque::new();
        let mut open = true;
        loop {
            tokio::select! {
                biased;
                done = async {
                    match verifying.front_mut() {
                        Some(job) => job.await,
                        None => std::future::pending().await,
                    }
                }, if !verifying.is_empty() => {
                    verifying.pop_front();
                    let verified = done.map_err(|source| PipelineError::Task {
                        task: "verify job",
                        source,
                    })??;
                    let chunk = self.finish(verified).await?;
                    metrics::gauge!(m::VERIFY_CACHE_REPOS).set(self.cache.repos.len() as f64);
                    metrics::gauge!(m::VERIFY_CACHE_BYTES)
                        .set((self.cache.repos.len() * ENTRY_BYTES) as f64);
                    if tx.send(chunk).await.is_err() {
                        return Ok(());
                    }
                }
                loaded = async {
                    match loading.front_mut() {
                        Some(l) => (&mut l.load).await,
                        None => std::future::pending().await,
                    }
                }, if !loading.is_empty() && verifying.len() < VERIFY_DEPTH => {
                    let Some(next) = loading.pop_front() else {
                        continue;
                    };
                    let loaded = loaded.map_err(|source| PipelineError::Task {
                        task: "verify load",
                        source,
                    })??;
                    verifying.push_back(self.start(next, loaded).await?);
                }
                next = rx.recv(), if open && loading.len() < LOAD_AHEAD => match next {
                    Some(chunk) => loading.push_back(self.arrive(chunk)),
                    None => open = false,
                },
                else => return Ok(()),
            }
        }
    }

    /// Decides what `chunk` needs and starts loading it.
    fn arrive(&mut self, chunk: DecodedChunk) -> Loading {
        let number = self.next_chunk;
        self.next_chunk += 1;
        let dids = load::repos_of(&chunk.events);
        let needs = self.cache.needs(number, &chunk.events, &dids);
        let load = AbortOnDropHandle::new(tokio::spawn(load::load(
            self.pool.clone(),
            self.resolver.clone(),
            needs,
        )));
        Loading {
            number,
            chunk,
            dids,
            load,
        }
    }

    /// Folds a chunk's load into the cache and starts verifying it.
    async fn start(
        &mut self,
        next: Loading,
        loaded: Loaded,
    ) -> Result<JoinHandle<Result<Verifying, PipelineError>>, PipelineError> {
        let Loading {
            number,
            chunk,
            dids,
            ..
        } = next;
        self.cache.apply(number, loaded);
        self.reload_unsynchronized(&dids).await?;
        let keys: HashMap<String, _> = dids
            .iter()
            .filter_map(|d| {
                let key = self.cache.repos.peek(d)?.key.clone()?;
                Some((d.clone(), key))
            })
            .collect();
        Ok(check::spawn(chunk, keys, self.parts))
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
                    // An #identity made its repo's key stale when its chunk arrived.
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
                    let repo = self
                        .cache
                        .repos
                        .get_or_insert_mut(c.repo.clone(), Repo::default);
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
                    let repo = self
                        .cache
                        .repos
                        .get_or_insert_mut(s.did.clone(), Repo::default);
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
        if let Some(r) = self.cache.repos.get_mut(did) {
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
        if let Some(r) = self.cache.repos.get_mut(did) {
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

    /// A bad signature: the key may have rotated. Fetches the DID document again (once) and
    /// verifies with the new key if it differs.
    async fn recheck(&mut self, ev: &Event) -> Check {
        let Some(did) = ev.kind.did() else {
            return Check::Failed(VerifyError::BadSignature);
        };
        self.resolver.invalidate(did);
        let fresh = load::fetch_key(&self.resolver, did).await;
        let old = self.cache.repos.peek(did).and_then(|r| r.key.clone());
        let Some(key) = fresh.filter(|k| Some(k) != old.as_ref()) else {
            return Check::Failed(VerifyError::BadSignature);
        };
        if let Some(repo) = self.cache.repos.get_mut(did) {
            repo.key = Some(key.clone());
        }
        let keys = HashMap::from([(did.to_owned(), key)]);
        check::check(ev, &keys)
    }
}
