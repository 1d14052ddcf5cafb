//! Derived tables: `post_aggregates`, `profile_aggregates`, `notifications`, `feed_items`.
//! Built from the rows a batch really inserted (`RETURNING`) and really removed, so counters
//! move only when a row changed (§4) and replays leave them alone.
//!
//! The folding ([`Derived`]) is pure; the SQL that reads removed rows ([`removed_rows`]) and
//! writes the folded result ([`write`], [`purge`]) is at the end of this file.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

use super::{count, exec, Applied};
use crate::mapping::{uri_did, Row, Table};

/// A removed row's fields that derived tables depend on.
#[derive(Debug, Clone)]
pub enum Removed {
    Post {
        uri: String,
        did: String,
        parent: Option<String>,
        quote: Option<String>,
    },
    Like {
        uri: String,
        subject: String,
    },
    Repost {
        uri: String,
        subject: String,
    },
    Follow {
        uri: String,
        did: String,
        subject: String,
    },
}

/// Aggregate column indexes.
const LIKES: usize = 0;
const REPOSTS: usize = 1;
const REPLIES: usize = 2;
const QUOTES: usize = 3;
const FOLLOWERS: usize = 0;
const FOLLOWS: usize = 1;
const POSTS: usize = 2;

#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub record_uri: String,
    pub reason: &'static str,
    pub recipient: String,
    pub author: String,
    pub record_cid: String,
    pub subject_uri: Option<String>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FeedItem {
    pub uri: String,
    pub post_uri: String,
    pub originator: String,
    pub kind: &'static str,
    pub sort_at: DateTime<Utc>,
}

/// Everything the derived tables must absorb for one batch, folded in memory.
#[derive(Debug, Default)]
pub struct Derived {
    pub post_aggs: BTreeMap<String, [i64; 4]>,
    pub profile_aggs: BTreeMap<String, [i64; 3]>,
    /// Records whose notifications and feed items go (removed rows).
    pub removed_uris: Vec<String>,
    pub notifications: Vec<Notification>,
    pub feed_items: Vec<FeedItem>,
}

impl Derived {
    fn post(&mut self, uri: &str, col: usize, d: i64) {
        self.post_aggs.entry(uri.to_owned()).or_default()[col] += d;
    }

    fn profile(&mut self, did: &str, col: usize, d: i64) {
        self.profile_aggs.entry(did.to_owned()).or_default()[col] += d;
    }

    pub fn removed(&mut self, r: &Removed) {
        match r {
            Removed::Post {
                uri,
                did,
                parent,
                quote,
            } => {
                self.profile(did, POSTS, -1);
                if let Some(p) = parent {
                    self.post(p, REPLIES, -1);
                }
                if let Some(q) = quote {
                    self.post(q, QUOTES, -1);
                }
                self.removed_uris.push(uri.clone());
            }
            Removed::Like { uri, subject } => {
                self.post(subject, LIKES, -1);
                self.removed_uris.push(uri.clone());
            }
            Removed::Repost { uri, subject } => {
                self.post(subject, REPOSTS, -1);
                self.removed_uris.push(uri.clone());
            }
            Removed::Follow { uri, did, subject } => {
                self.profile(subject, FOLLOWERS, -1);
                self.profile(did, FOLLOWS, -1);
                self.removed_uris.push(uri.clone());
            }
        }
    }

    /// A row that was really inserted; `fallback_time` when the record has no createdAt.
    pub fn inserted(&mut self, row: &Row, fallback_time: DateTime<Utc>) {
        let m = row.meta();
        let at = m.created_at.unwrap_or(fallback_time);
        let mut notify = |reason: &'static str, recipient: Option<&str>, subject: Option<&str>| {
            if let Some(rcpt) = recipient.filter(|r| *r != m.did) {
                self.notifications.push(Notification {
                    record_uri: m.uri.clone(),
                    reason,
                    recipient: rcpt.to_owned(),
                    author: m.did.clone(),
                    record_cid: m.cid.clone(),
                    subject_uri: subject.map(str::to_owned),
                    created_at: at,
                });
            }
        };
        match row {
            Row::Post(p) => {
                if let Some(parent) = &p.reply_parent_uri {
                    notify("reply", uri_did(parent), Some(parent));
                }
                if let Some(q) = &p.quote_uri {
                    notify("quote", uri_did(q), Some(q));
                }
                for did in &p.mentions {
                    notify("mention", Some(did), None);
                }
                self.profile(&m.did, POSTS, 1);
                if let Some(parent) = &p.reply_parent_uri {
                    self.post(parent, REPLIES, 1);
                }
                if let Some(q) = &p.quote_uri {
                    self.post(q, QUOTES, 1);
                }
                self.feed_items.push(FeedItem {
                    uri: m.uri.clone(),
                    post_uri: m.uri.clone(),
                    originator: m.did.clone(),
                    kind: "post",
                    sort_at: at,
                });
            }
            Row::Like(l) => {
                notify("like", uri_did(&l.subject_uri), Some(&l.subject_uri));
                self.post(&l.subject_uri, LIKES, 1);
            }
            Row::Repost(r) => {
                notify("repost", uri_did(&r.subject_uri), Some(&r.subject_uri));
                self.post(&r.subject_uri, REPOSTS, 1);
                self.feed_items.push(FeedItem {
                    uri: m.uri.clone(),
                    post_uri: r.subject_uri.clone(),
                    originator: m.did.clone(),
                    kind: "repost",
                    sort_at: at,
                });
            }
            Row::Follow(f) => {
                notify("follow", Some(&f.subject_did), None);
                self.profile(&f.subject_did, FOLLOWERS, 1);
                self.profile(&m.did, FOLLOWS, 1);
            }
            _ => {}
        }
    }

    /// Adds `other`'s aggregate deltas to this one's (`other` keeps none).
    pub fn absorb_aggregates(&mut self, other: &mut Derived) {
        for (k, d) in std::mem::take(&mut other.post_aggs) {
            let e = self.post_aggs.entry(k).or_default();
            e.iter_mut().zip(d).for_each(|(x, y)| *x += y);
        }
        for (k, d) in std::mem::take(&mut other.profile_aggs) {
            let e = self.profile_aggs.entry(k).or_default();
            e.iter_mut().zip(d).for_each(|(x, y)| *x += y);
        }
    }

    /// Drops aggregate entries whose deltas cancelled out; sorts notifications and feed items
    /// by key and keeps one of each.
    pub fn prune(&mut self) {
        self.post_aggs.retain(|_, d| d.iter().any(|x| *x != 0));
        self.profile_aggs.retain(|_, d| d.iter().any(|x| *x != 0));
        self.notifications.sort_by(|a, b| {
            (&a.record_uri, a.reason, &a.recipient).cmp(&(&b.record_uri, b.reason, &b.recipient))
        });
        self.notifications.dedup_by(|a, b| {
            a.record_uri == b.record_uri && a.reason == b.reason && a.recipient == b.recipient
        });
        self.feed_items.sort_by(|a, b| a.uri.cmp(&b.uri));
        // One per record (a plan writes each record once); kept unique all the same, as the
        // insert has no conflict check.
        self.feed_items.dedup_by(|a, b| a.uri == b.uri);
        self.removed_uris.sort_unstable();
        self.removed_uris.dedup();
    }
}

/// Reads the rows a `DELETE … RETURNING` removed into what derived tables need.
pub(super) fn removed_rows(
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
pub(super) async fn purge(
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
pub(super) async fn write(
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
pub(super) async fn write_rows(
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
pub(super) async fn write_aggregates(
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

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_item(uri: &str) -> FeedItem {
        FeedItem {
            uri: uri.to_owned(),
            post_uri: uri.to_owned(),
            originator: "did:plc:a".to_owned(),
            kind: "post",
            sort_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    #[test]
    fn prune_keeps_one_derived_row_per_key_and_drops_cancelled_aggregates() {
        let mut d = Derived {
            feed_items: vec![
                feed_item("at://b"),
                feed_item("at://a"),
                feed_item("at://b"),
            ],
            ..Derived::default()
        };
        d.post("at://p", LIKES, 1);
        d.post("at://p", LIKES, -1);
        d.post("at://q", REPOSTS, 1);
        d.prune();
        let uris: Vec<&str> = d.feed_items.iter().map(|f| f.uri.as_str()).collect();
        assert_eq!(uris, ["at://a", "at://b"]);
        assert_eq!(d.post_aggs.keys().collect::<Vec<_>>(), ["at://q"]);
    }
}
