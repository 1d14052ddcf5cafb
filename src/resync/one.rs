//! The resync of one repo: identity → `getRepo` → verification → one transaction that makes
//! the rows equal to the CAR, applies the held live events newer than it and stores the head.

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
use crate::writer::{self, RepoDiff, WriteError};

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

/// What the transaction found.
enum TxOutcome {
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
        let identity = self.resolver.resolve(did).await?;
        let endpoint = identity.pds_endpoint.clone().ok_or(ResyncError::NoPds)?;
        let car = self.pds.get_repo(&endpoint, did).await?;
        let key = signing_key(&identity)?;
        let (identity, repo) = match self.verify(&car, did, &key) {
            Err(ResyncError::BadSignature) => {
                // The account may have rotated its key since the document was cached.
                self.resolver.invalidate(did);
                let fresh = self.resolver.resolve(did).await?;
                let fresh_key = signing_key(&fresh)?;
                if fresh_key == key {
                    return Err(ResyncError::BadSignature);
                }
                let repo = self.verify(&car, did, &fresh_key)?;
                (fresh, repo)
            }
            Err(e) => return Err(e),
            Ok(repo) => (identity, repo),
        };
        let records = repo.records.len();
        let held: Vec<Event> = self
            .live
            .as_ref()
            .map(|l| l.held.snapshot(did))
            .unwrap_or_default();
        let fence = self.live.as_ref().map(|l| &l.fence);
        let outcome = run_tx(&self.pool, &self.cfg.retry, cancel, async |tx| {
            write_repo(tx, &identity, &repo, &held, fence).await
        })
        .await?;
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
        let held_applied = held.len() + self.release_held(did, held.len(), cancel).await?;
        debug!(did, rev = %repo.rev, records, ?diff, held_applied, "repo resynced");
        Ok(Resynced {
            rev: repo.rev,
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

/// The resync transaction (may run more than once: everything here is idempotent).
async fn write_repo(
    tx: &deadpool_postgres::Transaction<'_>,
    identity: &Identity,
    repo: &VerifiedRepo<'_>,
    held: &[Event],
    fence: Option<&CursorKey>,
) -> Result<TxOutcome, WriteError> {
    let did = repo.did.as_str();
    // Safe without waiting for the WAL flush: everything the resync does, its leaving the
    // queue included, is in this transaction, so a commit lost in a server crash leaves the
    // repo queued and it is simply resynced again; and any later synchronous commit (the
    // batch that moves the cursor past held events) flushes this one first.
    tx.batch_execute("SET LOCAL synchronous_commit = off")
        .await?;
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
        return Ok(TxOutcome::AccountDeleted);
    }
    if let Some(stored) = stored_rev.filter(|r| *r > repo.rev) {
        return Ok(TxOutcome::Stale(stored));
    }
    store_resolved(&**tx, identity).await?;
    let (_, diff) = writer::apply_repo(tx, repo).await?;
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
    Ok(TxOutcome::Done { diff, in_sync })
}
