//! The resync worker pool: at most `concurrency` groups of up to `group_repos` repos at once,
//! claimed from the queue as slots free up (a group per free slot, the claims shared out
//! evenly); each repo's result is written back (done, backoff, or given up with a reason).
//! Also refreshes the repos-by-state gauges.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ResyncError, Resynced, Resyncer};
use crate::metrics as m;
use crate::repos::{self, Claim};

/// How often the repos-by-state gauges are refreshed: one `GROUP BY` over all of `actors`,
/// too heavy to run at every poll on a network-sized table.
const GAUGE_PERIOD: Duration = Duration::from_secs(30);

/// Runs the workers until `cancel` fires (in-flight resyncs are aborted, their claims freed),
/// or — once `finish` fires — until no repo is due and none is in flight. Claims left by a
/// previous holder (a crashed leader, a killed backfill) are freed first. Database errors are
/// logged and retried after the poll interval: the workers never stop the process.
pub async fn run_workers(
    resyncer: Arc<Resyncer>,
    finish: CancellationToken,
    cancel: CancellationToken,
) {
    let cfg = resyncer.cfg.clone();
    match resyncer.pool.get().await {
        Ok(client) => match repos::release_claims(&**client, None).await {
            Ok(0) => {}
            Ok(n) => info!(repos = n, "freed resync claims left by a previous run"),
            Err(e) => warn!(error = %e, "freeing stale resync claims failed"),
        },
        Err(e) => warn!(error = %e, "freeing stale resync claims: no connection"),
    }
    let mut inflight: JoinSet<()> = JoinSet::new();
    let mut dids: HashMap<tokio::task::Id, Vec<String>> = HashMap::new();
    let mut gauges_at: Option<Instant> = None;
    loop {
        if cancel.is_cancelled() {
            break;
        }
        if gauges_at.is_none_or(|t| t.elapsed() >= GAUGE_PERIOD) {
            refresh_gauges(&resyncer).await;
            gauges_at = Some(Instant::now());
        }
        let free = cfg.concurrency.saturating_sub(inflight.len());
        let mut claimed = 0;
        if free > 0 {
            // Up to a group per free worker, shared out evenly: a short queue still keeps
            // every worker busy.
            match claim(&resyncer, free * cfg.group_repos.max(1)).await {
                Ok(claims) => {
                    claimed = claims.len();
                    let per_group = claims.len().div_ceil(free).max(1);
                    let mut claims = claims.into_iter().peekable();
                    while claims.peek().is_some() {
                        let group: Vec<_> = claims.by_ref().take(per_group).collect();
                        let group_dids: Vec<String> = group.iter().map(|c| c.did.clone()).collect();
                        let r = resyncer.clone();
                        let token = cancel.clone();
                        // On a blocking thread driving its own future, as the batch writer
                        // does: rustc cannot prove the retrying transaction's async closure
                        // `Send` for `spawn` (higher-ranked lifetime bug). IO still runs on
                        // the runtime; cancelling drops the resync (its transaction rolls back).
                        let rt = tokio::runtime::Handle::current();
                        let handle = inflight.spawn_blocking(move || {
                            rt.block_on(async move {
                                tokio::select! {
                                    _ = token.cancelled() => {}
                                    _ = r.resync_claims(group, &token) => {}
                                }
                            })
                        });
                        dids.insert(handle.id(), group_dids);
                    }
                }
                Err(e) => warn!(error = %e, "claiming due resyncs failed; retrying"),
            }
        }
        if inflight.is_empty() && claimed == 0 {
            resyncer.stats.idle.notify_one();
        }
        if inflight.is_empty() && claimed == 0 && finish.is_cancelled() {
            break;
        }
        // Fewer claims than free slots: nothing more is due, wait for the poll. All slots
        // taken: wait for one to end. Either way a finished resync wakes the loop.
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(ended) = inflight.join_next_with_id(), if !inflight.is_empty() => {
                let id = match &ended {
                    Ok((id, ())) => *id,
                    Err(e) => e.id(),
                };
                if let (Some(group), Err(e)) = (dids.remove(&id), ended) {
                    warn!(repos = ?group, error = %e, "resync task panicked");
                    free_claims(&resyncer, &group).await;
                }
            }
            _ = tokio::time::sleep(cfg.poll_interval) => {}
            _ = finish.cancelled(), if !finish.is_cancelled() => {}
        }
    }
    inflight.abort_all();
    while inflight.join_next().await.is_some() {}
    let left: Vec<String> = dids.into_values().flatten().collect();
    if !left.is_empty() {
        free_claims(&resyncer, &left).await;
    }
    refresh_gauges(&resyncer).await;
}

async fn claim(resyncer: &Resyncer, n: usize) -> Result<Vec<Claim>, String> {
    let client = resyncer.pool.get().await.map_err(|e| e.to_string())?;
    repos::claim_due(&**client, n as i64)
        .await
        .map_err(|e| e.to_string())
}

pub(super) async fn free_claims(resyncer: &Resyncer, dids: &[String]) {
    let result = match resyncer.pool.get().await {
        Ok(client) => repos::release_claims(&**client, Some(dids))
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = result {
        warn!(error = %e, repos = dids.len(), "freeing resync claims failed; they expire with their lease");
    }
}

async fn refresh_gauges(resyncer: &Resyncer) {
    let Ok(client) = resyncer.pool.get().await else {
        return;
    };
    if let Ok((states, queued)) = repos::counts(&**client).await {
        for (state, n) in states {
            metrics::gauge!(m::REPOS, "state" => state).set(n as f64);
        }
        metrics::gauge!(m::RESYNC_QUEUE).set(queued as f64);
    }
}

impl Resyncer {
    /// Resyncs claimed repos (sorted by DID): one by one with groups of 1, else as a group.
    async fn resync_claims(&self, claims: Vec<Claim>, cancel: &CancellationToken) {
        if self.cfg.group_repos > 1 {
            return self.resync_group(&claims, cancel).await;
        }
        for claim in claims {
            self.resync_claim(claim, cancel).await;
        }
    }

    /// Resyncs a claimed repo and records the outcome (done, backoff, or given up).
    async fn resync_claim(&self, claim: Claim, cancel: &CancellationToken) {
        let started = Instant::now();
        metrics::gauge!(m::RESYNCS_IN_FLIGHT).increment(1.0);
        let result = self.resync(&claim.did, cancel).await;
        metrics::gauge!(m::RESYNCS_IN_FLIGHT).decrement(1.0);
        metrics::histogram!(m::RESYNC_SECONDS).record(started.elapsed().as_secs_f64());
        self.record(&claim, result).await;
    }

    /// Records a resync's outcome: done, backoff, or given up.
    pub(super) async fn record(&self, claim: &Claim, result: Result<Resynced, ResyncError>) {
        match result {
            Ok(done) => self.count_done(&done),
            Err(e) => self.record_failure(claim, &e).await,
        }
    }

    fn count_done(&self, done: &Resynced) {
        metrics::counter!(m::RESYNCS_TOTAL, "result" => "ok").increment(1);
        let d = &done.diff;
        for (change, n) in [
            ("created", d.created),
            ("updated", d.updated),
            ("deleted", d.deleted),
            ("unchanged", d.unchanged),
            ("invalid", d.invalid),
        ] {
            if n > 0 {
                metrics::counter!(m::RESYNC_RECORDS_TOTAL, "change" => change).increment(n);
            }
        }
        self.stats.resynced.fetch_add(1, Ordering::Relaxed);
        self.stats
            .records_written
            .fetch_add(d.created + d.updated + d.deleted, Ordering::Relaxed);
        self.stats
            .records_seen
            .fetch_add(done.records as u64, Ordering::Relaxed);
    }

    async fn record_failure(&self, claim: &Claim, e: &ResyncError) {
        let reason = e.reason();
        metrics::counter!(m::RESYNCS_TOTAL, "result" => reason).increment(1);
        let exhausted = self.cfg.max_attempts.is_some_and(|m| claim.attempts >= m);
        let give_up = e.is_permanent() || exhausted;
        let text = format!("{reason}: {e}");
        if give_up {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            warn!(did = %claim.did, attempts = claim.attempts, error = %e, "resync failed for good; the repo stays desynchronized");
        } else {
            warn!(did = %claim.did, attempts = claim.attempts, error = %e, retry_in_s = repos::backoff(claim.attempts).as_secs(), "resync failed; backing off");
        }
        let result = match self.pool.get().await {
            Ok(client) if give_up => repos::resync_gave_up(&**client, &claim.did, &text)
                .await
                .map_err(|e| e.to_string()),
            Ok(client) => repos::resync_failed(&**client, claim, &text)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(db) = result {
            warn!(did = %claim.did, error = %db, "recording a failed resync failed; its claim expires with its lease");
        }
    }
}
