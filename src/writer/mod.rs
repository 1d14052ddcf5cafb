//! Writer: applies one batch of events in one transaction — actor state, record rows, derived
//! tables and the cursor together (§4, §6). Bulk statements only, keys in order.
//!
//! [`apply`] is the order of a batch's statements; each group of statements lives in its own
//! file: [`plan`] (events → changes, pure), `actors` (stub actors, actor state), `records`
//! (record tables), `derived` (aggregates, notifications, feed items), the cursor in
//! [`crate::cursor`], and [`dead_letters`] (events set aside after a data error, §6). Whole
//! repos (resync, §12): `repo` (one repo, diffed) and `group` (several, new ones by `copy`).

mod actors;
mod copy;
pub mod dead_letters;
mod derived;
mod group;
pub mod plan;
mod records;
mod repo;
mod rows;

use std::collections::BTreeMap;
use std::time::Instant;

use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;

use crate::cursor::{self, CursorKey, WriteCursorError};
use crate::firehose::Event;
use derived::{Derived, Existing};
pub use group::{apply_repos, write_aggregates, Aggregates, GroupRepo, RepoRows};
use plan::{PlanStats, Revs};
pub use repo::{apply_repo, RepoDiff};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    // Not `transparent`: the retry logic walks `source()` to find the SQLSTATE.
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("fenced out: a newer leader (fence > {fence}) has written cursor {service:?}")]
    Fenced { service: String, fence: i64 },
}

impl From<WriteCursorError> for WriteError {
    fn from(e: WriteCursorError) -> Self {
        match e {
            WriteCursorError::Db(e) => Self::Postgres(e),
            WriteCursorError::Fenced { service, fence } => Self::Fenced { service, fence },
        }
    }
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct Applied {
    pub stats: PlanStats,
    pub inserted: BTreeMap<&'static str, u64>,
    pub deleted: BTreeMap<&'static str, u64>,
    /// The cursor as stored after this batch (monotonic); `None` when the batch carried none.
    pub cursor: Option<i64>,
    /// Time spent per table / statement group, in µs (where the database time goes).
    pub statement_micros: BTreeMap<&'static str, u64>,
    /// Accounts deleted by this batch (their rows purged), sorted: with writer lanes, the
    /// notifications another lane gave them concurrently are removed once all lanes commit
    /// ([`settle_lanes`]).
    pub purged: Vec<String>,
}

impl Applied {
    /// Adds what another transaction of the same batch did (a batch split by the safety net
    /// of §6); the cursor is the later one's.
    pub fn merge(&mut self, other: Applied) {
        let s = &mut self.stats;
        let o = other.stats;
        s.commits_applied += o.commits_applied;
        s.commits_already_applied += o.commits_already_applied;
        s.commits_of_deleted_accounts += o.commits_of_deleted_accounts;
        s.ops_applied += o.ops_applied;
        s.ops_superseded += o.ops_superseded;
        for (k, n) in o.invalid {
            *s.invalid.entry(k).or_default() += n;
        }
        for (k, n) in o.unavailable {
            *s.unavailable.entry(k).or_default() += n;
        }
        s.sanitized += o.sanitized;
        for (map, from) in [
            (&mut self.inserted, other.inserted),
            (&mut self.deleted, other.deleted),
            (&mut self.statement_micros, other.statement_micros),
        ] {
            for (k, n) in from {
                *map.entry(k).or_default() += n;
            }
        }
        self.cursor = other.cursor.or(self.cursor);
        self.purged.extend(other.purged);
        self.purged.sort_unstable();
        self.purged.dedup();
    }

    pub(crate) fn timed(&mut self, what: &'static str, since: Instant) {
        *self.statement_micros.entry(what).or_default() += since.elapsed().as_micros() as u64;
    }
}

/// Applies `events` inside `tx` (the caller commits, retries and times it) and stores
/// `cursor` under `key`'s fence. A batch without a cursor is fenced all the same: it commits
/// nothing once a newer fence has claimed `key.service`.
pub async fn apply(
    tx: &Transaction<'_>,
    events: &[Event],
    cursor: Option<i64>,
    key: &CursorKey,
) -> Result<Applied, WriteError> {
    let seq = cursor.unwrap_or(cursor::NO_CURSOR);
    let (mut applied, stored) = write_events(tx, events, Revs::Skip, Some((key, seq))).await?;
    // `NO_CURSOR` never moves the stored cursor (it only goes up) but takes the row lock and
    // checks the fence like any cursor write.
    applied.cursor = cursor.and(stored);
    Ok(applied)
}

/// Set first in every writing transaction. Each statement of the writer reads or deletes by
/// key (`uri = ANY($1)`, a DID's range), and only an index plan stays cheap as tables grow;
/// but without statistics (a database just loaded or backfilled, before autoanalyze has run,
/// or with autovacuum off) the planner guesses a large share of the table matches and scans
/// it all. Measured (`cargo bench --bench growth`, autovacuum off): from ~4 M rows on, the
/// notification delete scanned the whole table in every batch and events/s fell 3x.
/// Disabling sequential scans for the transaction keeps them on their indexes; a statement
/// with no usable index still scans.
pub(crate) const INDEXED_PLANS: &str = "SET LOCAL enable_seqscan = off";

/// Applies `events` (rows, derived tables, actors) without touching the cursor or its fence:
/// inside [`apply`], and for writers that hold no lease and follow no stream (backfill's
/// account statuses from `listRepos`, with [`Revs::Skip`]).
pub(crate) async fn apply_events(
    tx: &Transaction<'_>,
    events: &[Event],
    revs: Revs,
) -> Result<Applied, WriteError> {
    Ok(write_events(tx, events, revs, None).await?.0)
}

/// [`apply_events`], then the cursor `(key, seq)` when given, sent with the last statements
/// (same round trip); returns the cursor as stored. Three round trips for a batch's
/// statements, between its `BEGIN` and `COMMIT`: the actors' state, the actor and record
/// changes, the derived rows with the cursor (each group [`in_order`]; a group waits only for
/// the results its parameters are made from).
async fn write_events(
    tx: &Transaction<'_>,
    events: &[Event],
    revs: Revs,
    cursor: Option<(&CursorKey, i64)>,
) -> Result<(Applied, Option<i64>), WriteError> {
    let mut applied = Applied::default();
    if events.is_empty() {
        // The small transaction that stores a batch's cursor: one round trip.
        let t0 = Instant::now();
        let (set, stored) = futures_util::future::join(tx.batch_execute(INDEXED_PLANS), async {
            match cursor {
                Some((key, seq)) => cursor::write(tx, key, seq).await.map(Some),
                None => Ok(None),
            }
        })
        .await;
        set?;
        applied.timed("cursor", t0);
        return Ok((applied, stored?));
    }
    let t0 = Instant::now();
    // Sent first, so it applies to every statement after it (same round trip).
    let dids = plan::dids_of(events);
    let (set, state) = futures_util::future::join(
        tx.batch_execute(INDEXED_PLANS),
        actors::read_state(tx, &dids),
    )
    .await;
    let ((), state) = both(set, state)?;
    applied.timed("actors_read", t0);
    let plan = plan::build(events, state, revs);
    let mut derived = Derived::default();
    for did in &plan.purges {
        records::purge(tx, did, &mut derived, &mut applied).await?;
        derived::purge(tx, did, &mut applied).await?;
    }
    // Actor changes and record changes in one round trip: they do not depend on each other.
    // Actor status before the derived rows: notifications to accounts deleted in this batch
    // are not created.
    let t0 = Instant::now();
    let (actors, records) = futures_util::future::join(
        actors::write(tx, &plan),
        records::write(tx, &plan, &mut derived, &mut applied),
    )
    .await;
    both(actors, records)?;
    applied.timed("actors_records", t0);
    derived.prune();
    // `dead-letters retry` repairs: a stray derived row must not fail it again.
    let existing = match revs {
        Revs::Skip => Existing::Impossible,
        Revs::Reapply => Existing::Kept,
    };
    let t0 = Instant::now();
    let mut derived_applied = Applied::default();
    let (written, stored) = futures_util::future::join(
        derived::write(tx, &derived, &mut derived_applied, existing),
        async {
            match cursor {
                Some((key, seq)) => cursor::write(tx, key, seq).await.map(Some),
                None => Ok(None),
            }
        },
    )
    .await;
    let stored = match (written, stored) {
        (Ok(()), Ok(stored)) => stored,
        // The cursor's statement may have gone first (the derived rows' were not prepared
        // yet): then its error is the cause of theirs.
        (Err(e), Err(WriteCursorError::Db(c))) if aborted(&e) && !aborted(&c) => {
            return Err(WriteError::Postgres(c))
        }
        (Err(e), _) => return Err(e.into()),
        (Ok(()), Err(e)) => return Err(e.into()),
    };
    applied.merge(derived_applied);
    applied.timed("derived_cursor", t0);
    applied.stats = plan.stats;
    applied.purged = plan.purges;
    Ok((applied, stored))
}

/// Ends a batch written by several writer lanes (each lane's part already committed, without
/// a cursor): removes the notifications that accounts deleted in the batch (`purged`) received
/// from another lane's concurrent transaction, which could not see the deletion yet, then
/// stores `cursor` under `key`'s fence like [`apply`]. Idempotent.
pub async fn settle_lanes(
    tx: &Transaction<'_>,
    purged: &[String],
    cursor: Option<i64>,
    key: &CursorKey,
) -> Result<Applied, WriteError> {
    let mut applied = Applied::default();
    let t0 = Instant::now();
    for did in purged {
        derived::purge(tx, did, &mut applied).await?;
    }
    applied.timed("lanes_settle", t0);
    let settled = apply(tx, &[], cursor, key).await?;
    applied.merge(settled);
    Ok(applied)
}

async fn exec(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.execute(&stmt, params).await
}

async fn query(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.query(&stmt, params).await
}

/// Runs independent statement sequences of one transaction concurrently: tokio-postgres
/// pipelines them on the connection, so each step of all of them costs one round trip, not one
/// per statement. Their results come back in the order of `runs`. PostgreSQL executes the
/// statements one at a time in the order they were sent, so only sequences that do not depend
/// on each other's effects may go together (a sequence's own steps stay in order).
///
/// When one statement fails, PostgreSQL refuses every later one of the aborted transaction
/// with `25P02`: the error returned is the one that caused it, so the retry logic and the
/// dead-letter split (§6) classify the batch by its real SQLSTATE.
async fn pipelined<T, F>(runs: impl IntoIterator<Item = F>) -> Result<Vec<T>, tokio_postgres::Error>
where
    F: std::future::Future<Output = Result<T, tokio_postgres::Error>>,
{
    let mut done = Vec::new();
    let mut errors = Vec::new();
    for result in futures_util::future::join_all(runs).await {
        match result {
            Ok(v) => done.push(v),
            Err(e) => errors.push(e),
        }
    }
    let mut errors = errors.into_iter();
    match errors.next() {
        None => Ok(done),
        Some(first) => Err(cause(first, errors)),
    }
}

/// One statement to send: its SQL and its parameters.
type Sql<'a> = (&'a str, &'a [&'a (dyn ToSql + Sync)]);

/// Runs `statements` one after the other in one round trip: all are prepared first (those not
/// cached yet in one pipelined round trip), so they are then sent in this order, and
/// PostgreSQL executes them in the order sent. A later statement thus sees what an earlier
/// one did; none of them may take its parameters from an earlier result. Returns each
/// statement's rows, in order (see [`pipelined`] for the error returned).
async fn in_order(
    tx: &Transaction<'_>,
    statements: &[Sql<'_>],
) -> Result<Vec<Vec<tokio_postgres::Row>>, tokio_postgres::Error> {
    let prepared = prepare(tx, statements).await?;
    let sent = prepared.iter().zip(statements);
    pipelined(sent.map(|(stmt, (_, params))| tx.query(stmt, params))).await
}

/// [`in_order`] for statements without rows: returns how many rows each changed.
async fn execute_in_order(
    tx: &Transaction<'_>,
    statements: &[Sql<'_>],
) -> Result<Vec<u64>, tokio_postgres::Error> {
    let prepared = prepare(tx, statements).await?;
    let sent = prepared.iter().zip(statements);
    pipelined(sent.map(|(stmt, (_, params))| tx.execute(stmt, params))).await
}

/// The statements of `statements`, prepared (or taken from the connection's cache).
async fn prepare(
    tx: &Transaction<'_>,
    statements: &[Sql<'_>],
) -> Result<Vec<tokio_postgres::Statement>, tokio_postgres::Error> {
    pipelined(statements.iter().map(|(sql, _)| tx.prepare_cached(sql))).await
}

/// Two results of [`pipelined`] statement sequences (of different types), as one.
fn both<A, B>(
    a: Result<A, tokio_postgres::Error>,
    b: Result<B, tokio_postgres::Error>,
) -> Result<(A, B), tokio_postgres::Error> {
    match (a, b) {
        (Ok(a), Ok(b)) => Ok((a, b)),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(a), Err(b)) => Err(cause(a, [b])),
    }
}

/// A statement refused because an earlier one of its transaction failed (`25P02`).
fn aborted(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::IN_FAILED_SQL_TRANSACTION)
}

/// The error that aborted a transaction among those its pipelined statements got: the first
/// that is not `25P02` (refused because the transaction was already aborted).
fn cause(
    first: tokio_postgres::Error,
    rest: impl IntoIterator<Item = tokio_postgres::Error>,
) -> tokio_postgres::Error {
    if !aborted(&first) {
        return first;
    }
    rest.into_iter().find(|e| !aborted(e)).unwrap_or(first)
}

/// Adds `n` rows of `table` to a per-table count (zeros are not recorded).
fn count(map: &mut BTreeMap<&'static str, u64>, table: &'static str, n: usize) {
    if n > 0 {
        *map.entry(table).or_default() += n as u64;
    }
}
