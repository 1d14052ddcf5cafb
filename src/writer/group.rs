//! Several verified repos written in one transaction (§12, grouped resyncs). A repo stored for
//! the first time (no rev and no record rows, checked under its actor row lock) cannot
//! conflict with anything: its records, notifications and feed items go in by binary `COPY`
//! ([`super::copy`]). A repo that has rows is diffed against them as [`super::apply_repo`]
//! does. The stored rows of the whole group are read in one statement, and the aggregate
//! deltas of every repo are folded in memory and upserted once per key, in key order.

use std::collections::HashSet;
use std::time::Instant;

use chrono::Utc;
use deadpool_postgres::Transaction;

use super::derived::{self, Derived, Notification};
use super::plan::{Change, Plan};
use super::repo::{self, RepoDiff};
use super::{copy, count, query, records, rows, Applied, WriteError};
use crate::mapping::{Row, Table};
use crate::sync::VerifiedRepo;

/// A repo's records decoded into rows as if none were stored, before any transaction (the
/// decoding is CPU work that need not hold locks).
#[derive(Debug)]
pub struct RepoRows {
    plan: Plan,
    diff: RepoDiff,
}

impl RepoRows {
    pub fn decode(repo: &VerifiedRepo<'_>) -> Self {
        let (plan, diff) = repo::create_plan(repo);
        Self { plan, diff }
    }
}

/// One repo of a group.
#[derive(Debug, Clone, Copy)]
pub struct GroupRepo<'r, 'a> {
    pub repo: &'r VerifiedRepo<'a>,
    pub rows: &'r RepoRows,
    /// Whether the actor row (locked by the caller) holds a rev: then the repo is diffed.
    pub has_rev: bool,
}

/// The aggregate deltas of a group, written by [`write_aggregates`] at the end of its
/// transaction.
#[derive(Debug, Default)]
pub struct Aggregates(Derived);

/// Makes the record rows of every repo of `repos` equal to its CAR, with derived tables
/// exact once the returned [`Aggregates`] are written ([`write_aggregates`], last in the
/// transaction). The caller holds their actor rows (locked in DID order) and stores the new
/// heads. Returns what changed per repo, in the order of `repos`.
pub async fn apply_repos(
    tx: &Transaction<'_>,
    repos: &[GroupRepo<'_, '_>],
) -> Result<(Applied, Vec<RepoDiff>, Aggregates), WriteError> {
    let mut applied = Applied::default();
    let t0 = Instant::now();
    let dids: Vec<String> = repos.iter().map(|g| g.repo.did.clone()).collect();
    let mut stored = repo::stored_cids(tx, &dids).await?;
    applied.timed("repo_read", t0);
    let mut changed = Plan::default();
    let mut fresh: Vec<&Plan> = Vec::new();
    let mut diffs = Vec::with_capacity(repos.len());
    for g in repos {
        let rows = stored.remove(&g.repo.did).unwrap_or_default();
        if !g.has_rev && rows.is_empty() {
            fresh.push(&g.rows.plan);
            add_stats(&mut applied, &g.rows.plan);
            diffs.push(g.rows.diff.clone());
            continue;
        }
        let (plan, diff) = repo::diff_plan(g.repo, rows);
        if let Some(plan) = plan {
            add_stats(&mut applied, &plan);
            changed.changes.extend(plan.changes);
        }
        diffs.push(diff);
    }
    // Repos with rows: deletes, replacements and inserts, as one batch would write them.
    let mut derived = Derived::default();
    if !changed.changes.is_empty() {
        records::write(tx, &changed, &mut derived, &mut applied).await?;
    }
    // Repos without: every row is new.
    let mut born = Derived::default();
    let now = Utc::now();
    for table in Table::ALL {
        let mut puts: Vec<&Row> = fresh
            .iter()
            .flat_map(|p| {
                p.changes
                    .range((table, String::new())..)
                    .take_while(move |((t, _), _)| *t == table)
                    .filter_map(|(_, c)| match c {
                        Change::Put { row, .. } => Some(&**row),
                        Change::Delete => None,
                    })
            })
            .collect();
        if puts.is_empty() {
            continue;
        }
        let t0 = Instant::now();
        puts.sort_unstable_by(|a, b| a.meta().uri.cmp(&b.meta().uri));
        let n = if copy::can_copy(table) {
            copy::rows(tx, table, &puts).await?
        } else {
            let ins = rows::insert(table, &puts);
            query(tx, &ins.sql, &ins.params()).await?.len() as u64
        };
        count(&mut applied.inserted, table.name(), n as usize);
        if table.has_derived() {
            for row in &puts {
                born.inserted(row, now);
            }
        }
        applied.timed(table.name(), t0);
    }
    // One upsert per aggregate table for the whole group, keys in order.
    derived.absorb_aggregates(&mut born);
    derived.prune();
    born.prune();
    derived::write_rows(tx, &derived, &mut applied, derived::Existing::Impossible).await?;
    copy_born(tx, &born, &mut applied).await?;
    Ok((applied, diffs, Aggregates(derived)))
}

/// Adds a group's aggregate deltas (one upsert per table, keys in order). Written last in
/// the transaction: these rows are the ones concurrent writers share, so their locks are held
/// only until the commit.
pub async fn write_aggregates(
    tx: &Transaction<'_>,
    aggregates: &Aggregates,
) -> Result<Applied, WriteError> {
    let mut applied = Applied::default();
    derived::write_aggregates(tx, &aggregates.0, &mut applied).await?;
    Ok(applied)
}

fn add_stats(applied: &mut Applied, plan: &Plan) {
    applied.merge(Applied {
        stats: plan.stats.clone(),
        ..Applied::default()
    });
}

/// The notifications and feed items of records stored for the first time; none to an
/// account deleted here (as the batch writer's `INSERT` skips them).
async fn copy_born(
    tx: &Transaction<'_>,
    born: &Derived,
    applied: &mut Applied,
) -> Result<(), tokio_postgres::Error> {
    let t0 = Instant::now();
    if !born.notifications.is_empty() {
        let mut recipients: Vec<&str> = born
            .notifications
            .iter()
            .map(|n| n.recipient.as_str())
            .collect();
        recipients.sort_unstable();
        recipients.dedup();
        let deleted: HashSet<String> = query(
            tx,
            "SELECT did FROM actors WHERE did = ANY($1) AND status = 'deleted'",
            &[&recipients],
        )
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
        let keep: Vec<&Notification> = born
            .notifications
            .iter()
            .filter(|n| !deleted.contains(&n.recipient))
            .collect();
        let n = copy::notifications(tx, &keep).await?;
        count(&mut applied.inserted, "notifications", n as usize);
    }
    applied.timed("notifications", t0);
    let t0 = Instant::now();
    let n = copy::feed_items(tx, &born.feed_items).await?;
    count(&mut applied.inserted, "feed_items", n as usize);
    applied.timed("feed_items", t0);
    Ok(())
}
