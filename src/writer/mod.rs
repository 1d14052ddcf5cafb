//! Writer: applies one batch of events in one transaction — record rows, derived tables,
//! actor state and the cursor together (§4, §6). Bulk statements only, keys in order.

mod derived;
pub mod plan;
mod rows;

use std::collections::{BTreeMap, HashMap};

use chrono::Utc;
use deadpool_postgres::Transaction;
use tokio_postgres::types::ToSql;

use crate::cursor::{self, CursorKey, WriteCursorError};
use crate::firehose::Event;
use crate::mapping::{Row, Table};
use derived::{Derived, Removed};
use plan::{ActorState, Change, Plan, PlanStats};

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

/// A run of consecutive events, applied atomically with the cursor.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<Event>,
    /// Highest seq among the events (the cursor after this batch), if any carries one.
    pub last_seq: Option<i64>,
    /// Low watermark from the users stage (§4): when set, the cursor written instead of
    /// `last_seq`, so it never passes an event still held in a pending-op map.
    pub watermark: Option<i64>,
}

impl Batch {
    pub fn push(&mut self, ev: Event) {
        if ev.seq > 0 {
            self.last_seq = Some(self.last_seq.map_or(ev.seq, |s| s.max(ev.seq)));
        }
        self.events.push(ev);
    }

    /// The cursor this batch writes ([`cursor::batch_cursor`]).
    pub fn cursor(&self) -> Option<i64> {
        cursor::batch_cursor(self.watermark, self.last_seq)
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Ops in the batch (the batch size that matters to the database).
    pub fn ops(&self) -> usize {
        self.events.iter().map(Event::weight).sum()
    }
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct Applied {
    pub stats: PlanStats,
    pub inserted: BTreeMap<&'static str, u64>,
    pub deleted: BTreeMap<&'static str, u64>,
    /// The cursor as stored after this batch (monotonic).
    pub cursor: Option<i64>,
    /// Time spent per table / statement group, in µs (where the database time goes).
    pub statement_micros: BTreeMap<&'static str, u64>,
}

impl Applied {
    fn timed(&mut self, what: &'static str, since: std::time::Instant) {
        *self.statement_micros.entry(what).or_default() += since.elapsed().as_micros() as u64;
    }
}

/// Applies `batch` inside `tx` (the caller commits, retries and times it).
pub async fn apply(
    tx: &Transaction<'_>,
    batch: &Batch,
    key: &CursorKey,
) -> Result<Applied, WriteError> {
    let dids = plan::dids_of(&batch.events);
    let t0 = std::time::Instant::now();
    let state = if dids.is_empty() {
        HashMap::new()
    } else {
        exec(
            tx,
            "INSERT INTO actors (did) SELECT unnest($1::text[]) ON CONFLICT (did) DO NOTHING",
            &[&dids],
        )
        .await?;
        let rows = query(
            tx,
            "SELECT did, rev, status FROM actors WHERE did = ANY($1)",
            &[&dids],
        )
        .await?;
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
        state
    };
    let mut applied = Applied::default();
    applied.timed("actors_read", t0);
    let plan = plan::build(&batch.events, state);
    let mut derived = Derived::default();
    for did in &plan.purges {
        purge(tx, did, &mut derived, &mut applied).await?;
    }
    // Actor status first: notifications to accounts deleted in this batch are not created.
    let t0 = std::time::Instant::now();
    write_actors(tx, &plan).await?;
    applied.timed("actors_write", t0);
    write_changes(tx, &plan, &mut derived, &mut applied).await?;
    derived.prune();
    write_derived(tx, &derived, &mut applied).await?;
    if let Some(seq) = batch.cursor() {
        let t0 = std::time::Instant::now();
        applied.cursor = Some(cursor::write(tx, key, seq).await?);
        applied.timed("cursor", t0);
    }
    applied.stats = plan.stats;
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

/// Reads the rows a DELETE returned into what derived tables need.
fn removed_rows(
    table: Table,
    rows: &[tokio_postgres::Row],
    derived: &mut Derived,
) -> Result<(), tokio_postgres::Error> {
    for r in rows {
        let uri: String = r.try_get(0)?;
        let removed = match table {
            Table::Posts => Removed::Post {
                uri,
                did: r.try_get(1)?,
                parent: r.try_get(2)?,
                quote: r.try_get(3)?,
            },
            Table::Likes => Removed::Like {
                uri,
                subject: r.try_get(2)?,
            },
            Table::Reposts => Removed::Repost {
                uri,
                subject: r.try_get(2)?,
            },
            Table::Follows => Removed::Follow {
                uri,
                did: r.try_get(1)?,
                subject: r.try_get(2)?,
            },
            _ => continue,
        };
        derived.removed(&removed);
    }
    Ok(())
}

fn count(map: &mut BTreeMap<&'static str, u64>, table: &'static str, n: usize) {
    if n > 0 {
        *map.entry(table).or_default() += n as u64;
    }
}

/// Deletes every record of a deleted account, and the notifications it received.
async fn purge(
    tx: &Transaction<'_>,
    did: &str,
    derived: &mut Derived,
    applied: &mut Applied,
) -> Result<(), WriteError> {
    // URIs sort bytewise ("C" collation): all of `at://did/…` lies in [at://did/, at://did0).
    let lo = format!("at://{did}/");
    let hi = format!("at://{did}0");
    for table in Table::ALL {
        let sql = format!(
            "DELETE FROM {} WHERE uri >= $1 AND uri < $2 RETURNING {}",
            table.name(),
            rows::removed_columns(table)
        );
        let rows = query(tx, &sql, &[&lo, &hi]).await?;
        count(&mut applied.deleted, table.name(), rows.len());
        removed_rows(table, &rows, derived)?;
    }
    let n = exec(
        tx,
        "DELETE FROM notifications WHERE recipient_did = $1",
        &[&did],
    )
    .await?;
    count(&mut applied.deleted, "notifications", n as usize);
    Ok(())
}

async fn write_changes(
    tx: &Transaction<'_>,
    plan: &Plan,
    derived: &mut Derived,
    applied: &mut Applied,
) -> Result<(), WriteError> {
    let now = Utc::now();
    for table in Table::ALL {
        let name = table.name();
        let t0 = std::time::Instant::now();
        let range = plan
            .changes
            .range((table, String::new())..)
            .take_while(|((t, _), _)| *t == table);
        let mut deletes: Vec<&str> = Vec::new();
        let mut replace: (Vec<&str>, Vec<&str>) = (Vec::new(), Vec::new());
        let mut puts: Vec<&Row> = Vec::new();
        for ((_, uri), change) in range {
            match change {
                Change::Delete => deletes.push(uri),
                Change::Put { row, replace: r } => {
                    if *r && table.has_derived() {
                        replace.0.push(uri);
                        replace.1.push(&row.meta().cid);
                    }
                    puts.push(row);
                }
            }
        }
        if !deletes.is_empty() {
            let sql = format!(
                "DELETE FROM {name} WHERE uri = ANY($1) RETURNING {}",
                rows::removed_columns(table)
            );
            let rows = query(tx, &sql, &[&deletes]).await?;
            count(&mut applied.deleted, name, rows.len());
            removed_rows(table, &rows, derived)?;
        }
        if !replace.0.is_empty() {
            let sql = format!(
                "DELETE FROM {name} t USING UNNEST($1::text[], $2::text[]) AS n(uri, cid) \
                 WHERE t.uri = n.uri AND t.cid <> n.cid RETURNING {}",
                rows::removed_columns(table)
                    .split(", ")
                    .map(|c| format!("t.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let rows = query(tx, &sql, &[&replace.0, &replace.1]).await?;
            count(&mut applied.deleted, name, rows.len());
            removed_rows(table, &rows, derived)?;
        }
        if !puts.is_empty() {
            let ins = rows::insert(table, &puts);
            let rows = query(tx, &ins.sql, &ins.params()).await?;
            count(&mut applied.inserted, name, rows.len());
            if table.has_derived() {
                let by_uri: HashMap<&str, &Row> =
                    puts.iter().map(|r| (r.meta().uri.as_str(), *r)).collect();
                for r in &rows {
                    let uri: &str = r.try_get(0)?;
                    if let Some(row) = by_uri.get(uri) {
                        derived.inserted(row, now);
                    }
                }
            }
        }
        applied.timed(name, t0);
    }
    Ok(())
}

async fn write_derived(
    tx: &Transaction<'_>,
    d: &Derived,
    applied: &mut Applied,
) -> Result<(), WriteError> {
    let t0 = std::time::Instant::now();
    if !d.removed_uris.is_empty() {
        let n = exec(
            tx,
            "DELETE FROM notifications WHERE record_uri = ANY($1)",
            &[&d.removed_uris],
        )
        .await?;
        count(&mut applied.deleted, "notifications", n as usize);
        let n = exec(
            tx,
            "DELETE FROM feed_items WHERE uri = ANY($1)",
            &[&d.removed_uris],
        )
        .await?;
        count(&mut applied.deleted, "feed_items", n as usize);
    }
    applied.timed("derived_deletes", t0);
    let t0 = std::time::Instant::now();
    if !d.notifications.is_empty() {
        let n = &d.notifications;
        let record: Vec<&str> = n.iter().map(|x| x.record_uri.as_str()).collect();
        let reason: Vec<&str> = n.iter().map(|x| x.reason).collect();
        let recipient: Vec<&str> = n.iter().map(|x| x.recipient.as_str()).collect();
        let author: Vec<&str> = n.iter().map(|x| x.author.as_str()).collect();
        let cid: Vec<&str> = n.iter().map(|x| x.record_cid.as_str()).collect();
        let subject: Vec<Option<&str>> = n.iter().map(|x| x.subject_uri.as_deref()).collect();
        let at: Vec<chrono::DateTime<Utc>> = n.iter().map(|x| x.created_at).collect();
        let rows = exec(
            tx,
            "INSERT INTO notifications (record_uri, reason, recipient_did, author_did, record_cid, subject_uri, created_at) \
             SELECT u.* FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[]) \
             AS u(record_uri, reason, recipient_did, author_did, record_cid, subject_uri, created_at) \
             WHERE NOT EXISTS (SELECT 1 FROM actors a WHERE a.did = u.recipient_did AND a.status = 'deleted') \
             ON CONFLICT DO NOTHING",
            &[&record, &reason, &recipient, &author, &cid, &subject, &at],
        )
        .await?;
        count(&mut applied.inserted, "notifications", rows as usize);
    }
    applied.timed("notifications", t0);
    let t0 = std::time::Instant::now();
    if !d.feed_items.is_empty() {
        let f = &d.feed_items;
        let uri: Vec<&str> = f.iter().map(|x| x.uri.as_str()).collect();
        let post: Vec<&str> = f.iter().map(|x| x.post_uri.as_str()).collect();
        let orig: Vec<&str> = f.iter().map(|x| x.originator.as_str()).collect();
        let kind: Vec<&str> = f.iter().map(|x| x.kind).collect();
        let at: Vec<chrono::DateTime<Utc>> = f.iter().map(|x| x.sort_at).collect();
        let rows = exec(
            tx,
            "INSERT INTO feed_items (uri, post_uri, originator_did, type, sort_at) \
             SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[]) \
             ON CONFLICT DO NOTHING",
            &[&uri, &post, &orig, &kind, &at],
        )
        .await?;
        count(&mut applied.inserted, "feed_items", rows as usize);
    }
    applied.timed("feed_items", t0);
    let t0 = std::time::Instant::now();
    if !d.post_aggs.is_empty() {
        let keys: Vec<&str> = d.post_aggs.keys().map(String::as_str).collect();
        let col = |i: usize| -> Vec<i64> { d.post_aggs.values().map(|v| v[i]).collect() };
        let (a, b, c, e) = (col(0), col(1), col(2), col(3));
        exec(
            tx,
            "INSERT INTO post_aggregates AS p (uri, like_count, repost_count, reply_count, quote_count) \
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[]) \
             ON CONFLICT (uri) DO UPDATE SET like_count = p.like_count + excluded.like_count, \
             repost_count = p.repost_count + excluded.repost_count, \
             reply_count = p.reply_count + excluded.reply_count, \
             quote_count = p.quote_count + excluded.quote_count",
            &[&keys, &a, &b, &c, &e],
        )
        .await?;
    }
    applied.timed("post_aggregates", t0);
    let t0 = std::time::Instant::now();
    if !d.profile_aggs.is_empty() {
        let keys: Vec<&str> = d.profile_aggs.keys().map(String::as_str).collect();
        let col = |i: usize| -> Vec<i64> { d.profile_aggs.values().map(|v| v[i]).collect() };
        let (a, b, c) = (col(0), col(1), col(2));
        exec(
            tx,
            "INSERT INTO profile_aggregates AS p (did, followers_count, follows_count, posts_count) \
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
             ON CONFLICT (did) DO UPDATE SET followers_count = p.followers_count + excluded.followers_count, \
             follows_count = p.follows_count + excluded.follows_count, \
             posts_count = p.posts_count + excluded.posts_count",
            &[&keys, &a, &b, &c],
        )
        .await?;
    }
    applied.timed("profile_aggregates", t0);
    Ok(())
}

async fn write_actors(tx: &Transaction<'_>, plan: &Plan) -> Result<(), WriteError> {
    if plan.actors.is_empty() {
        return Ok(());
    }
    let dids: Vec<&str> = plan.actors.keys().map(String::as_str).collect();
    let handle: Vec<Option<&str>> = plan.actors.values().map(|a| a.handle.as_deref()).collect();
    let status: Vec<Option<&str>> = plan.actors.values().map(|a| a.status.as_deref()).collect();
    let rev: Vec<Option<&str>> = plan.actors.values().map(|a| a.rev.as_deref()).collect();
    let resync: Vec<bool> = plan.actors.values().map(|a| a.needs_resync).collect();
    // Only rows whose values really change are touched: a replay rewrites nothing.
    exec(
        tx,
        "UPDATE actors a SET handle = COALESCE(u.handle, a.handle), status = COALESCE(u.status, a.status), \
         rev = COALESCE(u.rev, a.rev), needs_resync = a.needs_resync OR u.resync \
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[]) AS u(did, handle, status, rev, resync) \
         WHERE a.did = u.did AND (a.handle IS DISTINCT FROM COALESCE(u.handle, a.handle) \
         OR a.status IS DISTINCT FROM COALESCE(u.status, a.status) \
         OR a.rev IS DISTINCT FROM COALESCE(u.rev, a.rev) OR (u.resync AND NOT a.needs_resync))",
        &[&dids, &handle, &status, &rev, &resync],
    )
    .await?;
    Ok(())
}
