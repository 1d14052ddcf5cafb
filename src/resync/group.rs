//! Grouped resyncs (§12): a worker's claimed repos are fetched and verified one after the
//! other and decoded into rows outside any transaction, then written in **one** transaction
//! that locks their actor rows in DID order (the live writer's order, so neither deadlocks
//! the other) and gives each repo its own outcome (done, stale, account deleted). Repos
//! stored for the first time are written by `COPY` ([`writer::apply_repos`]). A group whose
//! transaction fails is written again repo by repo, each in its own diffing transaction.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::one::{write_repo, Fetched, TxOutcome};
use super::{ResyncError, Resynced, Resyncer};
use crate::cursor::{self, CursorKey};
use crate::firehose::Event;
use crate::identity::{store_resolved_many, Identity};
use crate::repos::{self, Claim};
use crate::sync::VerifiedRepo;
use crate::txn::run_tx;
use crate::writer::{self, Applied, GroupRepo, RepoRows, WriteError};

/// A group stops fetching after this long: its claims last [`repos::CLAIM_LEASE`] (10 min),
/// and the repos not fetched yet go back to the queue rather than outlive their claim.
const FETCH_BUDGET: Duration = Duration::from_secs(60);
/// A group stops fetching once its CARs hold this many bytes (~20,000 records): the
/// transaction, the rows in memory and the work redone when it fails stay bounded.
const MAX_GROUP_CAR_BYTES: usize = 8 * 1024 * 1024;

/// A verified repo of a group, ready to be written.
struct Ready<'a> {
    claim: &'a Claim,
    identity: Identity,
    repo: VerifiedRepo<'a>,
    rows: RepoRows,
    held: Vec<Event>,
}

impl Resyncer {
    /// Resyncs the claimed repos `claims` (sorted by DID) as a group and records each one's
    /// outcome; claims it had no time or room to fetch are freed (due again at once).
    pub(super) async fn resync_group(&self, claims: &[Claim], cancel: &CancellationToken) {
        let started = Instant::now();
        let mut fetched: Vec<(&Claim, Fetched)> = Vec::with_capacity(claims.len());
        let mut bytes = 0;
        let mut unfetched = Vec::new();
        for claim in claims {
            if started.elapsed() >= FETCH_BUDGET || bytes >= MAX_GROUP_CAR_BYTES {
                unfetched.push(claim.did.clone());
                continue;
            }
            self.begin(claim);
            let t0 = Instant::now();
            let result = self.fetch(&claim.did).await;
            self.stats.add_time("fetch", t0);
            match result {
                Ok(f) => {
                    bytes += f.car.len();
                    fetched.push((claim, f));
                }
                Err(e) => self.end(claim, started, Err(e)).await,
            }
        }
        if !unfetched.is_empty() {
            super::worker::free_claims(self, &unfetched).await;
        }
        let mut ready = Vec::with_capacity(fetched.len());
        for (claim, f) in &fetched {
            let t0 = Instant::now();
            let verified = self.verified(f).await;
            self.stats.add_time("verify", t0);
            match verified {
                Ok((identity, repo)) => {
                    let t0 = Instant::now();
                    let rows = RepoRows::decode(&repo);
                    self.stats.add_time("decode", t0);
                    ready.push(Ready {
                        claim,
                        identity,
                        rows,
                        held: self.held_snapshot(&repo.did),
                        repo,
                    });
                }
                Err(e) => self.end(claim, started, Err(e)).await,
            }
        }
        if ready.is_empty() {
            return;
        }
        let fence = self.live.as_ref().map(|l| &l.fence);
        let t0 = Instant::now();
        let written = run_tx(&self.pool, &self.cfg.retry, cancel, async |tx| {
            write_group(tx, &ready, fence).await
        })
        .await;
        self.stats.add_time("write_tx", t0);
        let outcomes = match written {
            Ok((outcomes, applied)) => {
                self.stats.add_statements(&applied.statement_micros);
                outcomes.into_iter().map(Ok).collect()
            }
            Err(e) => {
                warn!(repos = ready.len(), error = %e, "resync group failed; writing its repos one by one");
                metrics::counter!(crate::metrics::RESYNC_GROUP_FALLBACKS_TOTAL).increment(1);
                let fallback = Instant::now();
                let mut each = Vec::with_capacity(ready.len());
                for r in &ready {
                    let t0 = Instant::now();
                    let one = run_tx(&self.pool, &self.cfg.retry, cancel, async |tx| {
                        write_repo(tx, &r.identity, &r.repo, &r.held, fence).await
                    })
                    .await;
                    self.stats.add_time("write_tx", t0);
                    each.push(one.map(|(o, _)| o).map_err(ResyncError::from));
                }
                self.stats.add_time("group_fallback", fallback);
                each
            }
        };
        for (r, outcome) in ready.iter().zip(outcomes) {
            let result = match outcome {
                Ok(o) => self.finish(&r.repo, r.held.len(), o, cancel).await,
                Err(e) => Err(e),
            };
            self.end(r.claim, started, result).await;
        }
    }

    /// A repo of a group starts: its live events are held from now on.
    fn begin(&self, claim: &Claim) {
        metrics::gauge!(crate::metrics::RESYNCS_IN_FLIGHT).increment(1.0);
        if let Some(live) = &self.live {
            live.held.begin(&claim.did);
        }
    }

    /// A repo of a group ends: a failure releases its held events; the outcome is recorded.
    async fn end(&self, claim: &Claim, started: Instant, result: Result<Resynced, ResyncError>) {
        if let (Err(_), Some(live)) = (&result, &self.live) {
            live.held.abandon(&claim.did);
        }
        metrics::gauge!(crate::metrics::RESYNCS_IN_FLIGHT).decrement(1.0);
        metrics::histogram!(crate::metrics::RESYNC_SECONDS).record(started.elapsed().as_secs_f64());
        self.record(claim, result).await;
    }
}

/// The group's transaction (may run more than once: everything here is idempotent). Returns
/// each repo's outcome, in the order of `ready`.
async fn write_group(
    tx: &deadpool_postgres::Transaction<'_>,
    ready: &[Ready<'_>],
    fence: Option<&CursorKey>,
) -> Result<(Vec<TxOutcome>, Applied), WriteError> {
    super::one::begin_resync_tx(tx).await?;
    let t0 = Instant::now();
    let mut dids: Vec<&str> = ready.iter().map(|r| r.repo.did.as_str()).collect();
    dids.sort_unstable();
    tx.execute(
        "INSERT INTO actors (did) SELECT unnest($1::text[]) ON CONFLICT (did) DO NOTHING",
        &[&dids],
    )
    .await?;
    // The actor rows are the repos' locks, taken in DID order like the live writer's.
    let rows = tx
        .query(
            "SELECT did, status, rev FROM actors WHERE did = ANY($1) ORDER BY did FOR UPDATE",
            &[&dids],
        )
        .await?;
    let mut state: HashMap<String, (String, Option<String>)> = HashMap::new();
    for row in rows {
        state.insert(row.try_get(0)?, (row.try_get(1)?, row.try_get(2)?));
    }
    let mut outcomes: Vec<Option<TxOutcome>> = Vec::with_capacity(ready.len());
    let mut write: Vec<GroupRepo<'_, '_>> = Vec::new();
    let mut identities = Vec::new();
    for r in ready {
        let (status, rev) = state.remove(&r.repo.did).unwrap_or_default();
        if status == "deleted" {
            outcomes.push(Some(TxOutcome::AccountDeleted));
        } else if let Some(stored) = rev.as_ref().filter(|s| **s > r.repo.rev) {
            outcomes.push(Some(TxOutcome::Stale(stored.clone())));
        } else {
            identities.push(&r.identity);
            outcomes.push(None);
            write.push(GroupRepo {
                repo: &r.repo,
                rows: &r.rows,
                has_rev: rev.is_some(),
            });
        }
    }
    store_resolved_many(&**tx, &identities).await?;
    let mut applied = Applied::default();
    applied.timed("group_lock", t0);
    let (written, diffs, aggregates) = writer::apply_repos(tx, &write).await?;
    applied.merge(written);
    let t0 = Instant::now();
    let heads: Vec<(&str, &str, String, String)> = write
        .iter()
        .map(|g| {
            let repo = g.repo;
            (
                repo.did.as_str(),
                repo.rev.as_str(),
                repo.data.to_string(),
                repo.commit_cid.to_string(),
            )
        })
        .collect();
    let mut in_sync = repos::resynced_many(&**tx, &heads).await?.into_iter();
    let mut diffs = diffs.into_iter();
    let mut done = Vec::with_capacity(ready.len());
    for (r, outcome) in ready.iter().zip(outcomes) {
        if let Some(o) = outcome {
            done.push(o);
            continue;
        }
        done.push(TxOutcome::Done {
            diff: diffs.next().unwrap_or_default(),
            in_sync: in_sync.next().unwrap_or(false),
        });
        // The held events newer than the CAR; the planner skips those at or below its rev.
        if let (Some(key), false) = (fence, r.held.is_empty()) {
            writer::apply(tx, &r.held, None, key).await?;
        }
    }
    if let Some(key) = fence {
        cursor::write(tx, key, cursor::NO_CURSOR).await?;
    }
    applied.timed("group_heads", t0);
    // Last: the rows other writers share most, locked only until the commit.
    applied.merge(writer::write_aggregates(tx, &aggregates).await?);
    Ok((done, applied))
}
