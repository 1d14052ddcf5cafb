//! The batch's `actors` SQL: a stub row for every DID the batch mentions, the state planning
//! starts from (last applied rev, status), and the actor changes the plan decided.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use super::plan::{ActorState, Plan};
use super::{exec, in_order};
use crate::repos;

/// Creates missing actors for `dids` (sorted: locks in key order), locks their rows and reads
/// their state.
pub(super) async fn read_state(
    tx: &Transaction<'_>,
    dids: &[String],
) -> Result<HashMap<String, ActorState>, tokio_postgres::Error> {
    if dids.is_empty() {
        return Ok(HashMap::new());
    }
    // Locked (in key order) before planning: a resync or backfill writing one of these repos
    // commits either before this read, and the plan skips what its CAR already holds, or
    // after this batch. Read unlocked, a rev planned from a row a resync was replacing would
    // be written over the CAR's newer one, moving the repo back. Both statements go in one
    // round trip, the stubs first.
    let mut done = in_order(
        tx,
        &[
            (
                "INSERT INTO actors (did) SELECT unnest($1::text[]) ON CONFLICT (did) DO NOTHING",
                &[&dids],
            ),
            (
                "SELECT did, rev, status FROM actors WHERE did = ANY($1) ORDER BY did FOR NO KEY UPDATE",
                &[&dids],
            ),
        ],
    )
    .await?;
    let rows = done.pop().unwrap_or_default();
    let mut state = HashMap::with_capacity(rows.len());
    for r in rows {
        state.insert(
            r.try_get::<_, String>(0)?,
            ActorState {
                rev: r.try_get(1)?,
                status: r.try_get(2)?,
            },
        );
    }
    Ok(state)
}

/// Applies the plan's actor changes (handle, status, rev, resync mark).
pub(super) async fn write(tx: &Transaction<'_>, plan: &Plan) -> Result<(), tokio_postgres::Error> {
    if plan.actors.is_empty() {
        return Ok(());
    }
    let dids: Vec<&str> = plan.actors.keys().map(String::as_str).collect();
    let handle: Vec<Option<&str>> = plan.actors.values().map(|a| a.handle.as_deref()).collect();
    let status: Vec<Option<&str>> = plan.actors.values().map(|a| a.status.as_deref()).collect();
    let rev: Vec<Option<&str>> = plan.actors.values().map(|a| a.rev.as_deref()).collect();
    let data: Vec<Option<&str>> = plan.actors.values().map(|a| a.data.as_deref()).collect();
    let commit: Vec<Option<&str>> = plan.actors.values().map(|a| a.commit.as_deref()).collect();
    let handle_time: Vec<Option<DateTime<Utc>>> =
        plan.actors.values().map(|a| a.handle_time).collect();
    // Only rows whose values really change are touched: a replay rewrites nothing. A new rev
    // brings its head (§12): the MST root is NULL when the commit was not verified. A handle
    // taken from an `#identity` event is unverified until resolution confirms it both ways
    // (§5): a new one is stored with `handle_valid = false`, an unchanged one keeps its flag;
    // and an event emitted before the identity's last resolution changes nothing (the
    // resolution, often the very refresh the event triggered, is the newer truth).
    exec(
        tx,
        "UPDATE actors a SET \
         handle = CASE WHEN u.handle IS NOT NULL AND (u.at IS NULL OR a.resolved_at IS NULL \
         OR a.resolved_at < u.at) THEN u.handle ELSE a.handle END, \
         handle_valid = CASE WHEN u.handle IS NOT NULL AND u.handle IS DISTINCT FROM a.handle \
         AND (u.at IS NULL OR a.resolved_at IS NULL OR a.resolved_at < u.at) \
         THEN false ELSE a.handle_valid END, \
         status = COALESCE(u.status, a.status), \
         rev = COALESCE(u.rev, a.rev), \
         repo_data = CASE WHEN u.rev IS NULL THEN a.repo_data ELSE u.data END, \
         repo_commit = CASE WHEN u.rev IS NULL THEN a.repo_commit ELSE u.commit END \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::timestamptz[]) AS u(did, handle, status, rev, data, commit, at) \
         WHERE a.did = u.did AND (a.handle IS DISTINCT FROM COALESCE(u.handle, a.handle) \
         OR a.status IS DISTINCT FROM COALESCE(u.status, a.status) \
         OR a.rev IS DISTINCT FROM COALESCE(u.rev, a.rev))",
        &[&dids, &handle, &status, &rev, &data, &commit, &handle_time],
    )
    .await?;
    // §3: a commit we could not read in full queues its repo for a resync.
    let marks: Vec<(String, &str)> = plan
        .actors
        .iter()
        .filter_map(|(did, a)| a.resync.map(|r| (did.clone(), r)))
        .collect();
    repos::desynchronize(&**tx, &marks).await?;
    Ok(())
}
