//! The derived tables' SQL: what a removed row leaves for the folding ([`removed_rows`]), the
//! deleted account's notifications ([`purge`]), and the folded batch written
//! ([`write`]: notifications and feed items, then the aggregate deltas).

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use super::{Derived, Removed};
use crate::mapping::Table;
use crate::writer::{count, exec, Applied};
use std::borrow::Cow;
use tokio_postgres::types::ToSql;

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
/// inserted, aggregate deltas are added — every statement in one round trip
/// ([`crate::writer::in_order`]), the aggregates last.
pub(crate) async fn write(
    tx: &Transaction<'_>,
    d: &Derived,
    applied: &mut Applied,
    existing: Existing,
) -> Result<(), tokio_postgres::Error> {
    let t0 = std::time::Instant::now();
    let (rows, aggregates) = (RowColumns::of(d), AggregateColumns::of(d));
    let mut statements = rows.statements(d, existing);
    statements.extend(aggregates.statements());
    run(tx, statements, applied).await?;
    applied.timed("derived", t0);
    Ok(())
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
fn insert_sql(sql: &'static str, existing: Existing) -> Cow<'static, str> {
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
    let columns = RowColumns::of(d);
    run(tx, columns.statements(d, existing), applied).await?;
    applied.timed("derived_rows", t0);
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
    run(tx, AggregateColumns::of(d).statements(), applied).await?;
    applied.timed("aggregates", t0);
    Ok(())
}

const UPSERT_POST_AGGREGATES: &str =
    "INSERT INTO post_aggregates AS p (uri, like_count, repost_count, reply_count, quote_count) \
    SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::int8[]) \
    ON CONFLICT (uri) DO UPDATE SET like_count = p.like_count + excluded.like_count, \
    repost_count = p.repost_count + excluded.repost_count, \
    reply_count = p.reply_count + excluded.reply_count, \
    quote_count = p.quote_count + excluded.quote_count";
const UPSERT_PROFILE_AGGREGATES: &str = "INSERT INTO profile_aggregates AS p (did, followers_count, follows_count, posts_count) \
    SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[]) \
    ON CONFLICT (did) DO UPDATE SET followers_count = p.followers_count + excluded.followers_count, \
    follows_count = p.follows_count + excluded.follows_count, \
    posts_count = p.posts_count + excluded.posts_count";

/// One statement of a derived write: the table its rows count for (`None`: not counted),
/// whether it deletes, its SQL and its parameters.
struct Statement<'c> {
    counts: Option<(&'static str, bool)>,
    sql: Cow<'static, str>,
    params: Vec<&'c (dyn ToSql + Sync)>,
}

/// The parameter columns of a folded batch's notification and feed-item statements.
struct RowColumns<'d> {
    notifications: [Vec<&'d str>; 5],
    subjects: Vec<Option<&'d str>>,
    notified_at: Vec<DateTime<Utc>>,
    /// Distinct recipients: their statuses are read once each.
    recipients: Vec<&'d str>,
    feed_items: [Vec<&'d str>; 4],
    sort_at: Vec<DateTime<Utc>>,
}

/// The parameter columns of a folded batch's aggregate upserts.
struct AggregateColumns<'d> {
    post_keys: Vec<&'d str>,
    post_counts: [Vec<i64>; 4],
    profile_keys: Vec<&'d str>,
    profile_counts: [Vec<i64>; 3],
}

impl<'d> RowColumns<'d> {
    fn of(d: &'d Derived) -> Self {
        let n = &d.notifications;
        let notifications: [Vec<&str>; 5] = [
            n.iter().map(|x| x.record_uri.as_str()).collect(),
            n.iter().map(|x| x.reason).collect(),
            n.iter().map(|x| x.recipient.as_str()).collect(),
            n.iter().map(|x| x.author.as_str()).collect(),
            n.iter().map(|x| x.record_cid.as_str()).collect(),
        ];
        let mut recipients = notifications[2].clone();
        recipients.sort_unstable();
        recipients.dedup();
        let f = &d.feed_items;
        RowColumns {
            subjects: n.iter().map(|x| x.subject_uri.as_deref()).collect(),
            notified_at: n.iter().map(|x| x.created_at).collect(),
            notifications,
            recipients,
            feed_items: [
                f.iter().map(|x| x.uri.as_str()).collect(),
                f.iter().map(|x| x.post_uri.as_str()).collect(),
                f.iter().map(|x| x.originator.as_str()).collect(),
                f.iter().map(|x| x.kind).collect(),
            ],
            sort_at: f.iter().map(|x| x.sort_at).collect(),
        }
    }

    /// Removed records' notifications and feed items, then the new ones (in this order: a
    /// replaced record's rows go before its new ones are inserted).
    fn statements(&'d self, d: &'d Derived, existing: Existing) -> Vec<Statement<'d>> {
        let mut out = Vec::new();
        if !d.removed_uris.is_empty() {
            out.push(Statement {
                counts: Some(("notifications", true)),
                sql: "DELETE FROM notifications WHERE record_uri = ANY($1)".into(),
                params: vec![&d.removed_uris],
            });
            out.push(Statement {
                counts: Some(("feed_items", true)),
                sql: "DELETE FROM feed_items WHERE uri = ANY($1)".into(),
                params: vec![&d.removed_uris],
            });
        }
        if !d.notifications.is_empty() {
            let [record, reason, recipient, author, cid] = &self.notifications;
            out.push(Statement {
                counts: Some(("notifications", false)),
                sql: insert_sql(INSERT_NOTIFICATIONS, existing),
                params: vec![
                    record,
                    reason,
                    recipient,
                    author,
                    cid,
                    &self.subjects,
                    &self.notified_at,
                    &self.recipients,
                ],
            });
        }
        if !d.feed_items.is_empty() {
            let [uri, post, originator, kind] = &self.feed_items;
            out.push(Statement {
                counts: Some(("feed_items", false)),
                sql: insert_sql(INSERT_FEED_ITEMS, existing),
                params: vec![uri, post, originator, kind, &self.sort_at],
            });
        }
        out
    }
}

impl<'d> AggregateColumns<'d> {
    fn of(d: &'d Derived) -> Self {
        AggregateColumns {
            post_keys: d.post_aggs.keys().map(String::as_str).collect(),
            post_counts: std::array::from_fn(|i| d.post_aggs.values().map(|v| v[i]).collect()),
            profile_keys: d.profile_aggs.keys().map(String::as_str).collect(),
            profile_counts: std::array::from_fn(|i| {
                d.profile_aggs.values().map(|v| v[i]).collect()
            }),
        }
    }

    /// The aggregate upserts, keys in order.
    fn statements(&'d self) -> Vec<Statement<'d>> {
        let post = (!self.post_keys.is_empty())
            .then(|| upsert(UPSERT_POST_AGGREGATES, &self.post_keys, &self.post_counts));
        let profile = (!self.profile_keys.is_empty()).then(|| {
            upsert(
                UPSERT_PROFILE_AGGREGATES,
                &self.profile_keys,
                &self.profile_counts,
            )
        });
        post.into_iter().chain(profile).collect()
    }
}

/// The upsert `sql` of an aggregate table's deltas: its keys, then one column per counter.
fn upsert<'c>(
    sql: &'static str,
    keys: &'c (dyn ToSql + Sync),
    counts: &'c [Vec<i64>],
) -> Statement<'c> {
    let mut params = vec![keys];
    params.extend(counts.iter().map(|c| c as &(dyn ToSql + Sync)));
    Statement {
        counts: None,
        sql: sql.into(),
        params,
    }
}

/// Runs `statements` in one round trip, in order, and counts their rows.
async fn run(
    tx: &Transaction<'_>,
    statements: Vec<Statement<'_>>,
    applied: &mut Applied,
) -> Result<(), tokio_postgres::Error> {
    let sent: Vec<(&str, &[&(dyn ToSql + Sync)])> = statements
        .iter()
        .map(|s| (s.sql.as_ref(), s.params.as_slice()))
        .collect();
    let done = crate::writer::execute_in_order(tx, &sent).await?;
    for (s, n) in statements.iter().zip(done) {
        match s.counts {
            Some((table, true)) => count(&mut applied.deleted, table, n as usize),
            Some((table, false)) => count(&mut applied.inserted, table, n as usize),
            None => {}
        }
    }
    Ok(())
}
