//! Repo sync state (§12): per repo, the last applied commit (`actors.rev`, `repo_data`,
//! `repo_commit`) and its sync state, with the reason and time of its last change, plus the
//! queue of repos waiting for a resync with their backoff. The one home of this SQL: the
//! decode limits, the verifier, the resync workers and backfill all go through here.
//!
//! States: `synchronized` (live commits apply on top of what is stored), `desynchronized`
//! (something was missed or rejected; a resync is queued), `resyncing` (a worker holds it).

use std::time::Duration;

use tokio_postgres::GenericClient;

pub const SYNCHRONIZED: &str = "synchronized";
pub const DESYNCHRONIZED: &str = "desynchronized";
pub const RESYNCING: &str = "resyncing";
/// The states, in the order metrics and `status` list them.
pub const STATES: [&str; 3] = [SYNCHRONIZED, DESYNCHRONIZED, RESYNCING];

/// First retry of a failed resync; doubled per failure up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_secs(60);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60 * 60);
/// How long a claim lasts: a worker that dies mid-resync frees the repo after this.
pub const CLAIM_LEASE: Duration = Duration::from_secs(10 * 60);

/// The wait after the `attempts`-th failed resync: 1 min doubling to 1 h.
pub fn backoff(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(16);
    MIN_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

/// What is stored of one repo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Head {
    pub rev: Option<String>,
    /// MST root (`data` CID) of the commit at `rev`.
    pub data: Option<String>,
    pub commit: Option<String>,
    pub state: String,
}

/// The stored heads of `dids` (those without an actor row are absent).
pub async fn heads<C: GenericClient>(
    client: &C,
    dids: &[String],
) -> Result<Vec<(String, Head)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT did, rev, repo_data, repo_commit, sync_state FROM actors WHERE did = ANY($1)",
            &[&dids],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get(0)?,
                Head {
                    rev: r.try_get(1)?,
                    data: r.try_get(2)?,
                    commit: r.try_get(3)?,
                    state: r.try_get(4)?,
                },
            ))
        })
        .collect()
}

/// Marks each `(did, reason)` desynchronized and queues a resync for it (an actor row is
/// created when missing). A repo already queued keeps its backoff; one being resynced is
/// marked again so the worker's result does not clear the new break. Sorted by DID inside:
/// row locks are taken in key order. Returns the repos whose state changed.
pub async fn desynchronize<C: GenericClient>(
    client: &C,
    marks: &[(String, &str)],
) -> Result<u64, tokio_postgres::Error> {
    if marks.is_empty() {
        return Ok(0);
    }
    let mut sorted: Vec<(&str, &str)> = marks.iter().map(|(d, r)| (d.as_str(), *r)).collect();
    // Stable by DID: the first reason given for a repo is the one kept.
    sorted.sort_by_key(|(did, _)| *did);
    sorted.dedup_by(|a, b| a.0 == b.0);
    let (dids, reasons): (Vec<&str>, Vec<&str>) = sorted.into_iter().unzip();
    let changed = client
        .execute(
            "INSERT INTO actors AS a (did, needs_resync, sync_state, sync_reason, sync_changed_at) \
             SELECT did, true, 'desynchronized', reason, now() \
             FROM UNNEST($1::text[], $2::text[]) AS u(did, reason) \
             ON CONFLICT (did) DO UPDATE SET needs_resync = true, sync_state = 'desynchronized', \
             sync_reason = EXCLUDED.sync_reason, sync_changed_at = now() \
             WHERE a.sync_state <> 'desynchronized'",
            &[&dids, &reasons],
        )
        .await?;
    client
        .execute(
            "INSERT INTO resync_queue (did, reason) \
             SELECT did, reason FROM UNNEST($1::text[], $2::text[]) AS u(did, reason) \
             ON CONFLICT (did) DO NOTHING",
            &[&dids, &reasons],
        )
        .await?;
    Ok(changed)
}

/// A repo a resync worker has claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub did: String,
    pub reason: String,
    /// Attempts including this one.
    pub attempts: u32,
}

/// Claims up to `limit` repos whose resync is due, oldest first, and marks them `resyncing`.
/// A claim pushes the repo's next attempt [`CLAIM_LEASE`] ahead, so a crashed worker's repo
/// comes back on its own.
pub async fn claim_due<C: GenericClient>(
    client: &C,
    limit: i64,
) -> Result<Vec<Claim>, tokio_postgres::Error> {
    let lease = CLAIM_LEASE.as_secs_f64();
    let rows = client
        .query(
            "WITH due AS (SELECT did FROM resync_queue WHERE next_attempt_at <= now() \
               ORDER BY next_attempt_at, did LIMIT $1 FOR UPDATE SKIP LOCKED), \
             claimed AS (UPDATE resync_queue q SET attempts = q.attempts + 1, \
               next_attempt_at = now() + make_interval(secs => $2) \
               FROM due WHERE q.did = due.did RETURNING q.did, q.reason, q.attempts), \
             marked AS (UPDATE actors a SET sync_state = 'resyncing', sync_changed_at = now() \
               FROM claimed WHERE a.did = claimed.did) \
             SELECT did, reason, attempts FROM claimed ORDER BY did",
            &[&limit, &lease],
        )
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Claim {
                did: r.try_get(0)?,
                reason: r.try_get(1)?,
                attempts: r.try_get::<_, i32>(2)?.max(0) as u32,
            })
        })
        .collect()
}

/// A finished resync (inside the transaction that made the repo's rows equal to its CAR):
/// the repo is synchronized at `head` and leaves the queue. Returns false when the repo was
/// desynchronized again meanwhile (a newer break): it stays queued for another resync.
pub async fn resynced<C: GenericClient>(
    client: &C,
    did: &str,
    rev: &str,
    data: &str,
    commit: &str,
) -> Result<bool, tokio_postgres::Error> {
    let n = client
        .execute(
            "UPDATE actors SET rev = $2, repo_data = $3, repo_commit = $4, needs_resync = false, \
             sync_state = 'synchronized', sync_reason = NULL, sync_changed_at = now() \
             WHERE did = $1 AND sync_state = 'resyncing'",
            &[&did, &rev, &data, &commit],
        )
        .await?;
    if n == 0 {
        // Still record how far the CAR took the repo; the queued resync starts over.
        client
            .execute(
                "UPDATE actors SET rev = $2, repo_data = $3, repo_commit = $4 WHERE did = $1",
                &[&did, &rev, &data, &commit],
            )
            .await?;
        return Ok(false);
    }
    client
        .execute("DELETE FROM resync_queue WHERE did = $1", &[&did])
        .await?;
    Ok(true)
}

/// [`resynced`] for several repos in one statement (a resync group, whose actor rows the
/// caller holds): `heads` are `(did, rev, data, commit)`. Returns, in the order of `heads`,
/// whether each repo left the queue (false: desynchronized again meanwhile, still queued).
pub async fn resynced_many<C: GenericClient>(
    client: &C,
    heads: &[(&str, &str, String, String)],
) -> Result<Vec<bool>, tokio_postgres::Error> {
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    let did: Vec<&str> = heads.iter().map(|h| h.0).collect();
    let rev: Vec<&str> = heads.iter().map(|h| h.1).collect();
    let data: Vec<&str> = heads.iter().map(|h| h.2.as_str()).collect();
    let commit: Vec<&str> = heads.iter().map(|h| h.3.as_str()).collect();
    // `old` and the UPDATE see the same snapshot of rows this transaction has locked.
    let rows = client
        .query(
            "WITH old AS (SELECT did, sync_state = 'resyncing' AS claimed FROM actors \
               WHERE did = ANY($1)), \
             upd AS (UPDATE actors a SET rev = u.rev, repo_data = u.data, \
               repo_commit = u.commit, \
               needs_resync = CASE WHEN old.claimed THEN false ELSE a.needs_resync END, \
               sync_state = CASE WHEN old.claimed THEN 'synchronized' ELSE a.sync_state END, \
               sync_reason = CASE WHEN old.claimed THEN NULL ELSE a.sync_reason END, \
               sync_changed_at = CASE WHEN old.claimed THEN now() ELSE a.sync_changed_at END \
               FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) \
                 AS u(did, rev, data, commit) JOIN old ON old.did = u.did \
               WHERE a.did = u.did), \
             del AS (DELETE FROM resync_queue q USING old WHERE q.did = old.did AND old.claimed) \
             SELECT did, claimed FROM old",
            &[&did, &rev, &data, &commit],
        )
        .await?;
    let mut claimed = std::collections::HashMap::with_capacity(rows.len());
    for r in rows {
        claimed.insert(r.try_get::<_, String>(0)?, r.try_get::<_, bool>(1)?);
    }
    Ok(did
        .iter()
        .map(|d| claimed.get(*d).copied().unwrap_or(false))
        .collect())
}

/// A failed resync attempt: the repo is desynchronized again and retried after
/// [`backoff`]`(attempts)`, with `error` kept for `status` and the logs.
pub async fn resync_failed<C: GenericClient>(
    client: &C,
    claim: &Claim,
    error: &str,
) -> Result<(), tokio_postgres::Error> {
    let wait = backoff(claim.attempts).as_secs_f64();
    client
        .execute(
            "UPDATE resync_queue SET next_attempt_at = now() + make_interval(secs => $2), \
             last_error = $3 WHERE did = $1",
            &[&claim.did, &wait, &error],
        )
        .await?;
    client
        .execute(
            "UPDATE actors SET sync_state = 'desynchronized', sync_changed_at = now() \
             WHERE did = $1 AND sync_state = 'resyncing'",
            &[&claim.did],
        )
        .await?;
    Ok(())
}

/// A resync that cannot succeed until something else changes (repo not found, account
/// deleted, bad signature with a fresh key…): the repo leaves the queue and stays
/// `desynchronized` with `reason` as its sync reason (shown by `status`, listed by backfill).
/// A later break or backfill queues it again.
pub async fn resync_gave_up<C: GenericClient>(
    client: &C,
    did: &str,
    reason: &str,
) -> Result<(), tokio_postgres::Error> {
    client
        .execute("DELETE FROM resync_queue WHERE did = $1", &[&did])
        .await?;
    client
        .execute(
            "UPDATE actors SET sync_state = 'desynchronized', needs_resync = true, \
             sync_reason = $2, sync_changed_at = now() WHERE did = $1",
            &[&did, &reason],
        )
        .await?;
    Ok(())
}

/// Frees the claims of `dids` (a worker stopping before it finished them), or every claim
/// when `dids` is `None` (a new leader's or backfill's workers starting: whoever held them
/// is gone). They are due at once; the attempt they used does not count.
pub async fn release_claims<C: GenericClient>(
    client: &C,
    dids: Option<&[String]>,
) -> Result<u64, tokio_postgres::Error> {
    let all = dids.is_none();
    let dids: Vec<String> = dids.map(<[String]>::to_vec).unwrap_or_default();
    let n = client
        .execute(
            "WITH freed AS (UPDATE actors SET sync_state = 'desynchronized', \
               sync_changed_at = now() \
               WHERE sync_state = 'resyncing' AND ($1 OR did = ANY($2)) RETURNING did) \
             UPDATE resync_queue q SET next_attempt_at = now(), \
               attempts = GREATEST(q.attempts - 1, 0) FROM freed WHERE q.did = freed.did",
            &[&all, &dids],
        )
        .await?;
    Ok(n)
}

/// Repos per sync state (every state present, zeros included) and the queue's length.
pub async fn counts<C: GenericClient>(
    client: &C,
) -> Result<(Vec<(&'static str, i64)>, i64), tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT sync_state, count(*) FROM actors GROUP BY sync_state",
            &[],
        )
        .await?;
    let mut out: Vec<(&'static str, i64)> = STATES.iter().map(|s| (*s, 0)).collect();
    for r in rows {
        let state: String = r.try_get(0)?;
        let n: i64 = r.try_get(1)?;
        if let Some(slot) = out.iter_mut().find(|(s, _)| *s == state) {
            slot.1 = n;
        }
    }
    let queued: i64 = client
        .query_one("SELECT count(*) FROM resync_queue", &[])
        .await?
        .try_get(0)?;
    Ok((out, queued))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_minute_to_an_hour() {
        let mins: Vec<u64> = (1..=9).map(|a| backoff(a).as_secs() / 60).collect();
        assert_eq!(mins, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(0), MIN_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }
}
