//! Loading what a chunk needs before it verifies (heads and signing keys), off the stage's
//! ordered path: [`Needs`] is decided when a chunk arrives ([`Cache::needs`]), [`load`] runs
//! as its own task while earlier chunks verify and finish, and [`Cache::apply`] folds the
//! result in when the chunk's turn comes, never over what the cache learned meanwhile.
//!
//! Key rotation: an `#identity` event makes its repo's key stale for the events after it.
//! A repo in the cache is marked at once ([`Repo::key_stale`], with the chunk of the
//! `#identity`); a repo not in the cache yet
//! may be in a load already under way, so it is remembered ([`Cache::rotated`]) until
//! every load issued before the `#identity` has been applied, and marked then. A stale key
//! is fetched again from the DID document (not from `actors`, which may predate the
//! rotation) by the next chunk that needs it.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::Arc;

use deadpool_postgres::Pool;
use futures_util::StreamExt;
use lru::LruCache;

use super::chain::Repo;
use super::{VerifyStage, KEY_FETCHES};
use crate::firehose::{Event, EventKind};
use crate::identity::Resolver;
use crate::metrics as m;
use crate::pipeline::PipelineError;
use crate::repos::{self, Head};
use crate::sync::PublicKey;

/// What one chunk needs loaded, decided in arrival order against the cache.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Needs {
    /// Repos the cache does not hold: their heads from `actors`.
    pub(super) heads: Vec<String>,
    /// Repos without a key: `actors.signing_key`, else the DID document.
    pub(super) keys: Vec<String>,
    /// Repos whose key may have rotated: the DID document, fetched again.
    pub(super) fresh: Vec<String>,
}

impl Needs {
    fn is_empty(&self) -> bool {
        self.heads.is_empty() && self.keys.is_empty() && self.fresh.is_empty()
    }
}

/// The result of [`load`].
#[derive(Debug, Default)]
pub(super) struct Loaded {
    heads: Vec<(String, Head)>,
    /// Heads asked for that `actors` does not have (repos new to us).
    absent: Vec<String>,
    keys: Vec<(String, Option<PublicKey>)>,
    fresh: Vec<(String, Option<PublicKey>)>,
}

/// The repos `events` verify against (readable commits and `#sync`s), sorted, once each.
pub(super) fn repos_of(events: &[Event]) -> Vec<String> {
    let mut set = HashSet::new();
    for ev in events {
        match &ev.kind {
            EventKind::Commit(c) if c.readable() => set.insert(c.repo.as_str()),
            EventKind::Sync(s) => set.insert(s.did.as_str()),
            _ => false,
        };
    }
    let mut v: Vec<String> = set.into_iter().map(str::to_owned).collect();
    v.sort_unstable();
    v
}

/// What the stage knows of repos: heads and keys by DID (a bounded LRU), and the
/// rotations that loads under way may not know of yet.
pub(super) struct Cache {
    pub(super) repos: LruCache<String, Repo>,
    /// Repos with an `#identity` in an arrived chunk (by that chunk's number) that were not
    /// in the cache then: a load under way may bring their old key in. Holds at most the
    /// `#identity` events of the chunks in flight.
    rotated: HashMap<String, u64>,
}

impl Cache {
    pub(super) fn new(repos: usize) -> Self {
        let cap = NonZeroUsize::new(repos.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            repos: LruCache::new(cap),
            rotated: HashMap::new(),
        }
    }

    /// Decides what chunk `seq` (events `events`, repos `dids`) needs loaded, then notes the
    /// chunk's `#identity` events: the keys of their repos are stale for later chunks.
    pub(super) fn needs(&mut self, seq: u64, events: &[Event], dids: &[String]) -> Needs {
        let mut needs = Needs::default();
        for did in dids {
            let rotated = self.rotated.contains_key(did);
            match self.repos.peek(did) {
                None => {
                    needs.heads.push(did.clone());
                    if rotated {
                        needs.fresh.push(did.clone());
                    } else {
                        needs.keys.push(did.clone());
                    }
                }
                Some(r) if r.key_stale.is_some() || rotated => needs.fresh.push(did.clone()),
                Some(r) if r.key.is_none() => needs.keys.push(did.clone()),
                Some(_) => {}
            }
        }
        for ev in events {
            if let EventKind::Identity(i) = &ev.kind {
                match self.repos.peek_mut(&i.did) {
                    Some(r) => r.key_stale = Some(seq),
                    None => {
                        self.rotated.insert(i.did.clone(), seq);
                    }
                }
            }
        }
        needs
    }

    /// Folds the load of chunk `seq` into the cache. A repo the cache holds by now keeps its
    /// head (the cache's is newer: an earlier chunk moved it on); a missing key is filled;
    /// a fresh key replaces the old one (and is no longer stale if it was fetched after the
    /// `#identity` that made it so: that is, for a later chunk).
    pub(super) fn apply(&mut self, seq: u64, loaded: Loaded) {
        for (did, head) in loaded.heads {
            if !self.repos.contains(&did) {
                self.repos.put(did, Repo::from_head(head));
            }
        }
        for did in loaded.absent {
            if !self.repos.contains(&did) {
                let repo = Repo {
                    synchronized: true,
                    ..Repo::default()
                };
                self.repos.put(did, repo);
            }
        }
        for (did, key) in loaded.keys {
            if let Some(r) = self.repos.peek_mut(&did) {
                if r.key.is_none() {
                    r.key = key;
                }
            }
        }
        for (did, key) in loaded.fresh {
            if let Some(r) = self.repos.peek_mut(&did) {
                r.key = key;
                if r.key_stale.is_some_and(|at| at < seq) {
                    r.key_stale = None;
                }
            }
        }
        // Rotations seen in this chunk or after it was issued: a repo this load brought in
        // may have been read before them, and is marked now. Rotations seen before: this
        // load was issued after them (and fetched the key afresh), and every load that could
        // predate them has been applied.
        let repos = &mut self.repos;
        self.rotated.retain(|did, at| match repos.peek_mut(did) {
            Some(r) => {
                if *at >= seq {
                    r.key_stale = r.key_stale.max(Some(*at));
                }
                false
            }
            None => *at > seq,
        });
    }
}

impl VerifyStage {
    /// Reads the heads of `dids` that the cache holds as not synchronized (a resync changes
    /// them under us) again from `actors`, keeping their keys. Rare: on the ordered path.
    pub(super) async fn reload_unsynchronized(
        &mut self,
        dids: &[String],
    ) -> Result<(), PipelineError> {
        let stale: Vec<String> = dids
            .iter()
            .filter(|d| self.cache.repos.peek(*d).is_some_and(|r| !r.synchronized))
            .cloned()
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        metrics::counter!(m::VERIFY_LOADS_TOTAL, "what" => "resync_heads").increment(1);
        let client = self.pool.get().await.map_err(PipelineError::VerifyPool)?;
        let heads = repos::heads(&**client, &stale)
            .await
            .map_err(PipelineError::VerifyDb)?;
        drop(client);
        let mut found = HashSet::new();
        for (did, head) in heads {
            if let Some(r) = self.cache.repos.peek_mut(&did) {
                let (key, key_stale) = (r.key.take(), r.key_stale);
                *r = Repo::from_head(head);
                r.key = key;
                r.key_stale = key_stale;
                found.insert(did);
            }
        }
        for did in stale.into_iter().filter(|d| !found.contains(d)) {
            if let Some(r) = self.cache.repos.peek_mut(&did) {
                r.rev = None;
                r.data = None;
                r.synchronized = true;
            }
        }
        Ok(())
    }
}

/// Loads `needs`: heads in one query, keys from `actors.signing_key` in one query, the rest
/// and every fresh key from DID documents, `KEY_FETCHES` at once. Runs as its own task.
pub(super) async fn load(
    pool: Pool,
    resolver: Arc<Resolver>,
    needs: Needs,
) -> Result<Loaded, PipelineError> {
    let mut loaded = Loaded::default();
    if needs.is_empty() {
        return Ok(loaded);
    }
    let Needs { heads, keys, fresh } = needs;
    let mut stored: HashMap<String, PublicKey> = HashMap::new();
    if !heads.is_empty() || !keys.is_empty() {
        let client = pool.get().await.map_err(PipelineError::VerifyPool)?;
        if !heads.is_empty() {
            metrics::counter!(m::VERIFY_LOADS_TOTAL, "what" => "heads").increment(1);
            loaded.heads = repos::heads(&**client, &heads)
                .await
                .map_err(PipelineError::VerifyDb)?;
            let found: HashSet<&str> = loaded.heads.iter().map(|(d, _)| d.as_str()).collect();
            loaded.absent = heads
                .iter()
                .filter(|d| !found.contains(d.as_str()))
                .cloned()
                .collect();
        }
        if !keys.is_empty() {
            metrics::counter!(m::VERIFY_LOADS_TOTAL, "what" => "keys").increment(1);
            let rows = client
                .query(
                    "SELECT did, signing_key FROM actors WHERE did = ANY($1) AND signing_key IS NOT NULL",
                    &[&keys],
                )
                .await
                .map_err(PipelineError::VerifyDb)?;
            for row in rows {
                let (Ok(did), Ok(key)) = (row.try_get::<_, String>(0), row.try_get::<_, String>(1))
                else {
                    continue;
                };
                if let Ok(key) = PublicKey::parse(&key) {
                    stored.insert(did, key);
                }
            }
        }
    }
    // Keys not stored, from DID documents (cached by the resolver); fresh ones fetched anew.
    let wanted = keys
        .into_iter()
        .filter(|d| !stored.contains_key(d))
        .map(|d| (d, false))
        .chain(fresh.into_iter().map(|d| (d, true)));
    let fetched: Vec<(String, bool, Option<PublicKey>)> =
        futures_util::stream::iter(wanted.map(|(did, fresh)| {
            let resolver = resolver.clone();
            async move {
                if fresh {
                    resolver.invalidate(&did);
                }
                metrics::counter!(m::VERIFY_LOADS_TOTAL, "what" => "did_document").increment(1);
                let key = fetch_key(&resolver, &did).await;
                (did, fresh, key)
            }
        }))
        .buffer_unordered(KEY_FETCHES)
        .collect()
        .await;
    loaded.keys = stored.into_iter().map(|(d, k)| (d, Some(k))).collect();
    for (did, fresh, key) in fetched {
        if fresh {
            loaded.fresh.push((did, key));
        } else {
            loaded.keys.push((did, key));
        }
    }
    Ok(loaded)
}

/// `did`'s signing key from its DID document (`None` when it cannot be had).
pub(super) async fn fetch_key(resolver: &Resolver, did: &str) -> Option<PublicKey> {
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

#[cfg(test)]
#[path = "load_tests.rs"]
mod tests;
