//! The resync of one repo: identity → `getRepo` → verification → one transaction that makes
//! the rows equal to the CAR, applies the held live events newer than it and stores the head.

use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::held::Finish;
use super::{ResyncError, Resyncer};
use crate::cursor::{self, CursorKey};
use crate::firehose::Event;
use crate::identity::{store_resolved, Identity};
use crate::repos;
use crate::sync::{verify_repo_car, PublicKey, VerifiedRepo, VerifyError};
use crate::txn::run_tx;
use crate::writer::{self, Applied, RepoDiff, WriteError};

/// A finished resync.
#[derive(Debug)]
pub struct Resynced {
    pub rev: String,
    pub diff: RepoDiff,
    /// Records in the CAR.
    pub records: usize,
    /// Held live events handed to the writer after the CAR (older ones it skips).
    pub held_applied: usize,
    /// False when the repo was desynchronized again meanwhile (it stays queued).
    pub in_sync: bool,
}

/// A downloaded repo CAR, not verified yet, and the identity it was fetched with.
pub(super) struct Fetched {
    pub(super) did: String,
    pub(super) identity: Identity,
    pub(super) car: Vec<u8>,
}

/// What the transaction found, per repo.
pub(super) enum TxOutcome {
    Done { diff: RepoDiff, in_sync: bool },
    AccountDeleted,
    Stale(String),
}

impl Resyncer {
    /// Resynchronizes `did` now (the caller holds its claim).
    pub async fn resync(
        &self,
        did: &str,
        cancel: &CancellationToken,
    ) -> Result<Resynced, ResyncError> {
        // Live events of the repo are held from now on (the CAR may miss them); a failed
        // attempt releases them, its next attempt fetching a newer CAR.
        if let Some(live) = &self.live {
            live.held.begin(did);
        }
        let result = self.fetch_and_write(did, cancel).await;
        if let (Err(_), Some(live)) = (&result, &self.live) {
            live.held.abandon(did);
        }
        result
    }

    async fn fetch_and_write(
        &self,
        did: &str,
        cancel: &CancellationToken,
    ) -> Result<Resynced, ResyncError> {
        let t0 = Instant::now();
        let fetched = self.fetch(did).await?;
        self.stats.add_time("fetch", t0);
        let t0 = Instant::now();
        let (identity, repo) = self.verified(&fetched).await?;
        self.stats.add_time("verify", t0);
        let held: Vec<Event> = self.held_snapshot(did);
        let fence = self.live.as_ref().map(|l| &l.fence);
        let t0 = Instant::now();
        let outcome = run_tx(&self.pool, &self.cfg.retry, cancel, async |tx| {
            write_repo(tx, &identity, &repo, &held, fence).await
        })
        .await;
        self.stats.add_time("write_tx", t0);
        let (outcome, applied) = outcome?;
        self.stats.add_statements(&applied.statement_micros);
        self.finish(&repo, held.len(), outcome, cancel).await
    }

    /// Resolves `did`'s identity and downloads its repo CAR.
    pub(super) async fn fetch(&self, did: &str) -> Result<Fetched, ResyncError> {
        let identity = self.resolver.resolve(did).await?;
        let endpoint = identity.pds_endpoint.clone().ok_or(ResyncError::NoPds)?;
        let car = self.pds.get_repo(&endpoint, did).await?;
        Ok(Fetched {
            did: did.to_owned(),
            identity,
            car,
        })
    }

    /// Verifies a fetched CAR; a bad signature resolves the identity once more and, with a
    /// new key, verifies again. Returns the identity whose key verified it.
    pub(super) async fn verified<'a>(
        &self,
        fetched: &'a Fetched,
    ) -> Result<(Identity, VerifiedRepo<'a>), ResyncError> {
        let Fetched { did, identity, car } = fetched;
        let key = signing_key(identity)?;
        match self.verify(car, did, &key) {
            Err(ResyncError::BadSignature) => {
                // The account may have rotated its key since the document was cached.
                self.resolver.invalidate(did);
                let fresh = self.resolver.resolve(did).await?;
                let fresh_key = signing_key(&fresh)?;
                if fresh_key == key {
                    return Err(ResyncError::BadSignature);
                }
                let repo = self.verify(car, did, &fresh_key)?;
                Ok((fresh, repo))
            }
            Err(e) => Err(e),
            Ok(repo) => Ok((identity.clone(), repo)),
        }
    }

    /// The live events held for `did` so far (none without a pipeline).
    pub(super) fn held_snapshot(&self, did: &str) -> Vec<Event> {
        self.live
            .as_ref()
            .map(|l| l.held.snapshot(did))
            .unwrap_or_default()
    }

    /// After the transaction that wrote `repo` (with `held` events) committed: its outcome,
    /// the late held events applied and the repo released.
    pub(super) async fn finish(
        &self,
        repo: &VerifiedRepo<'_>,
        held: usize,
        outcome: TxOutcome,
        cancel: &CancellationToken,
    ) -> Result<Resynced, ResyncError> {
        let did = repo.did.as_str();
        let (diff, in_sync) = match outcome {
            TxOutcome::Done { diff, in_sync } => (diff, in_sync),
            TxOutcome::AccountDeleted => return Err(ResyncError::AccountDeleted),
            TxOutcome::Stale(stored) => {
                return Err(ResyncError::Stale {
                    car: repo.rev.clone(),
                    stored,
                })
            }
        };
        let held_applied = held + self.release_held(did, held, cancel).await?;
        let records = repo.records.len();
        debug!(did, rev = %repo.rev, records, ?diff, held_applied, "repo resynced");
        Ok(Resynced {
            rev: repo.rev.clone(),
            diff,
            records,
            held_applied,
            in_sync,
        })
    }

    fn verify<'a>(
        &self,
        car: &'a [u8],
        did: &str,
        key: &PublicKey,
    ) -> Result<VerifiedRepo<'a>, ResyncError> {
        verify_repo_car(car, did, key, self.cfg.max_car_bytes).map_err(|e| match e {
            VerifyError::BadSignature => ResyncError::BadSignature,
            VerifyError::TooLarge(_) => ResyncError::TooLarge(self.cfg.max_car_bytes),
            e => ResyncError::BadCar(e),
        })
    }

    /// After the resync committed: applies what was held meanwhile, until nothing is, and
    /// releases the repo. Returns the late events applied.
    async fn release_held(
        &self,
        did: &str,
        mut applied: usize,
        cancel: &CancellationToken,
    ) -> Result<usize, ResyncError> {
        let Some(live) = &self.live else {
            return Ok(0);
        };
        let mut late = 0;
        loop {
            match live.held.finish(did, applied) {
                Finish::Done => return Ok(late),
                Finish::Overflowed => {
                    info!(
                        did,
                        "held events overflowed during the resync: resyncing again"
                    );
                    let marks = [(did.to_owned(), "held_overflow")];
                    run_tx(&self.pool, &self.cfg.retry, cancel, async |tx| {
                        repos::desynchronize(&**tx, &marks)
                            .await
                            .map_err(WriteError::from)
                    })
                    .await?;
                    return Ok(late);
                }
                Finish::More(events) => {
                    run_tx(&self.pool, &self.cfg.retry, cancel, async |tx| {
                        writer::apply(tx, &events, None, &live.fence).await
                    })
                    .await?;
                    applied = events.len();
                    late += applied;
                }
            }
        }
    }
}

fn signing_key(identity: &Identity) -> Result<PublicKey, ResyncError> {
    let key = identity
        .signing_key
        .as_deref()
        .ok_or_else(|| ResyncError::NoSigningKey("the DID document has none".into()))?;
    PublicKey::parse(key).map_err(|e| ResyncError::NoSigningKey(e.to_string()))
}

/// The resync transaction of one repo (may run more than once: everything here is
/// idempotent); the diffing path, also the fallback of a group that failed.
pub(super) async fn write_repo(
    tx: &deadpool_postgres::Transaction<'_>,
    identity: &Identity,
    repo: &VerifiedRepo<'_>,
    held: &[Event],
    fence: Option<&CursorKey>,
) -> Result<(TxOutcome, Applied), WriteError> {
    let did = repo.did.as_str();
    begin_resync_tx(tx).await?;
    let insert = tx
        .prepare_cached("INSERT INTO actors (did) VALUES ($1) ON CONFLICT (did) DO NOTHING")
        .await?;
    tx.execute(&insert, &[&did]).await?;
    // The actor row is the repo's lock: the live writer and other resyncs wait on it.
    let lock = tx
        .prepare_cached("SELECT status, rev FROM actors WHERE did = $1 FOR UPDATE")
        .await?;
    let row = tx.query_one(&lock, &[&did]).await?;
    let status: String = row.try_get(0)?;
    let stored_rev: Option<String> = row.try_get(1)?;
    if status == "deleted" {
        return Ok((TxOutcome::AccountDeleted, Applied::default()));
    }
    if let Some(stored) = stored_rev.filter(|r| *r > repo.rev) {
        return Ok((TxOutcome::Stale(stored), Applied::default()));
    }
    store_resolved(&**tx, identity).await?;
    let (applied, diff) = writer::apply_repo(tx, repo).await?;
    let in_sync = repos::resynced(
        &**tx,
        did,
        &repo.rev,
        &repo.data.to_string(),
        &repo.commit_cid.to_string(),
    )
    .await?;
    match fence {
        // The held events newer than the CAR; the planner skips those at or below its rev.
        Some(key) if !held.is_empty() => {
            writer::apply(tx, held, None, key).await?;
        }
        Some(key) => {
            cursor::write(tx, key, cursor::NO_CURSOR).await?;
        }
        None => {}
    }
    Ok((TxOutcome::Done { diff, in_sync }, applied))
}

/// What every resync transaction (one repo here, a group in `group.rs`) sets first: the
/// writer's index-only plans, and asynchronous commit. The latter is safe: everything the
/// resync does, its leaving the queue included, is in this transaction, so a commit lost in a
/// server crash leaves the repo queued and it is simply resynced again; and any later
/// synchronous commit (the batch that moves the cursor past held events) flushes this one
/// first.
pub(super) async fn begin_resync_tx(
    tx: &deadpool_postgres::Transaction<'_>,
) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute(&format!(
        "SET LOCAL synchronous_commit = off; {}",
        crate::writer::INDEXED_PLANS
    ))
    .await
}
