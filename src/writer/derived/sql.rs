//! The derived tables' SQL: what a removed row leaves for the folding ([`removed_rows`]), the
//! deleted account's notifications ([`purge`]), and the folded batch written
//! ([`write`]: notifications and feed items, then the aggregate deltas).

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use super::{Derived, Removed};
use crate::mapping::Table;
use crate::writer::{count, exec, Applied};

/// Reads the rows a `DELETE … RETURNING` removed into what derived tables need.
pub(crate) fn removed_rows(
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

/// Deletes the notifications the deleted account `did` received (its own records' derived
/// rows go through [`removed_rows`]).
pub(crate) async fn purge(
    tx: &Transaction<'_>,
    did: &str,
    applied: &mut Applied,
) -> Result<(), tokio_postgres::Error> {
    let n = exec(
        tx,
        "DELETE FROM notifications WHERE recipient_did = $1",
        &[&did],
    )
    .await?;
    count(&mut applied.deleted, "notifications", n as usize);
    Ok(())
}

/// Whether a notification or feed item [`write_rows`] inserts may already be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Existing {
    /// None can be (see [`write_rows`]): plain inserts; a stray row fails the transaction
    /// with a unique violation, a data error (§6), and the repo is repaired by a resync.
    Impossible,
    /// A stray row is kept (`ON CONFLICT DO NOTHING`): the repair paths, which must succeed
    /// on a database whose derived rows went wrong — the resync of one repo (also the
    /// fallback of a failed resync group) and `dead-letters retry`.
    Kept,
}

/// Writes the folded batch: removed records' notifications and feed items go, new ones are
/// inserted, aggregate deltas are added.
pub(crate) async fn write(
    tx: &Transaction<'_>,
    d: &Derived,
    applied: &mut Applied,
    existing: Existing,
) -> Result<(), tokio_postgres::Error> {
    write_rows(tx, d, applied, existing).await?;
    write_aggregates(tx, d, applied).await
}

/// Inserts notifications, but not to accounts deleted here. Their statuses are read once per
/// recipient (`$8`, distinct), not once per notification: a batch's ~3,000 notifications go
/// to a few hundred accounts (`cargo bench --bench replay`: 91,358 notifications, 747
/// recipients).
const INSERT_NOTIFICATIONS: &str = "INSERT INTO notifications (record_uri, reason, recipient_did, author_did, record_cid, subject_uri, created_at) \
    SELECT u.* FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::timestamptz[]) \
    AS u(record_uri, reason, recipient_did, author_did, record_cid, subject_uri, created_at) \
    WHERE u.recipient_did <> ALL (ARRAY(SELECT a.did FROM actors a WHERE a.did = ANY($8::text[]) AND a.status = 'deleted'))";
const INSERT_FEED_ITEMS: &str =
    "INSERT INTO feed_items (uri, post_uri, originator_did, type, sort_at) \
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[])";

/// `sql` (one of the inserts above) as `existing` requires.
fn insert_sql(sql: &'static str, existing: Existing) -> std::borrow::Cow<'static, str> {
    match existing {
        Existing::Impossible => sql.into(),
        Existing::Kept => format!("{sql} ON CONFLICT DO NOTHING").into(),
    }
}

/// [`write`] without the aggregates: notifications and feed items.
///
/// With [`Existing::Impossible`] (the batch writer, resync groups) their inserts carry no
/// `ON CONFLICT`: a notification or feed item is keyed by the record it
/// comes from, it is created only by the transaction whose `RETURNING` says it really inserted
/// that record (a record's uniqueness is arbitrated by its own table's `ON CONFLICT`), and it
/// is deleted in the transaction that removes the record (`removed_uris`, before these
/// inserts). So none can exist yet — the same invariant the resync's `COPY` of new repos
/// relies on. The arbiter check cost a third of these statements' index accesses
/// (`pg_stat_statements`, bench corpus: notifications 1.06 M → 0.70 M buffer accesses and
/// 369 k → 278 k WAL records; feed items 296 k → 186 k accesses). Were the invariant ever
/// broken, the batch would fail with a unique violation, a data error (§6): the event is set
/// aside and its repo resynced, nothing stops.
pub(crate) async fn write_rows(
    tx: &Transaction<'_>,
    d: &Derived,
    applied: &mut Applied,
    existing: Existing,
) -> Result<(), tokio_postgres::Error> {
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
        let at: Vec<DateTime<Utc>> = n.iter().map(|x| x.created_at).collect();
        let mut recipients = recipient.clone();
        recipients.sort_unstable();
        recipients.dedup();
        let rows = exec(
            tx,
            &insert_sql(INSERT_NOTIFICATIONS, existing),
            &[
                &record,
                &reason,
                &recipient,
                &author,
                &cid,
                &subject,
                &at,
                &recipients,
            ],
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
        let at: Vec<DateTime<Utc>> = f.iter().map(|x| x.sort_at).collect();
        let rows = exec(
            tx,
            &insert_sql(INSERT_FEED_ITEMS, existing),
            &[&uri, &post, &orig, &kind, &at],
        )
        .await?;
        count(&mut applied.inserted, "feed_items", rows as usize);
    }
    applied.timed("feed_items", t0);
    Ok(())
}

/// The aggregate deltas: one upsert per table, keys in order. Their rows are the ones
/// concurrent writers share most, so a transaction that can writes them last: their locks
/// are then held only until the commit.
pub(crate) async fn write_aggregates(
    tx: &Transaction<'_>,
    d: &Derived,
    applied: &mut Applied,
) -> Result<(), tokio_postgres::Error> {
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
