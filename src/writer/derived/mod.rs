//! Derived tables: `post_aggregates`, `profile_aggregates`, `notifications`, `feed_items`.
//! Built from the rows a batch really inserted (`RETURNING`) and really removed, so counters
//! move only when a row changed (§4) and replays leave them alone.
//!
//! The folding ([`Derived`]) is pure; the SQL that reads removed rows ([`removed_rows`]) and
//! writes the folded result ([`write`], [`purge`]) is in `sql`.

mod sql;

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use crate::mapping::{uri_did, Row};
pub(crate) use sql::Existing;
pub(super) use sql::{purge, removed_rows, write, write_aggregates, write_rows};

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
