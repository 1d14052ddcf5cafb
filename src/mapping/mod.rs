//! Record → row mapping: pure functions, one file per family of collections. The writer turns
//! these rows into bulk SQL; nothing here touches the database.

mod feed;
mod graph;
mod interactions;
mod posts;
mod profile;

use chrono::{DateTime, Utc};

use crate::firehose::record::KnownRecord;
use crate::firehose::syntax::split_at_uri;

pub use feed::{FeedGeneratorRow, GateRow};
pub use graph::{ListItemRow, ListRow, StarterPackRow};
pub use interactions::{SubjectDidRow, SubjectRefRow};
pub use posts::PostRow;
pub use profile::ProfileRow;

/// The tables records land in. `Records` holds every collection without a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Posts,
    Likes,
    Reposts,
    Follows,
    Blocks,
    Lists,
    ListItems,
    FeedGenerators,
    StarterPacks,
    Threadgates,
    Postgates,
    Profiles,
    Records,
}

impl Table {
    pub const ALL: [Table; 13] = [
        Table::Posts,
        Table::Likes,
        Table::Reposts,
        Table::Follows,
        Table::Blocks,
        Table::Lists,
        Table::ListItems,
        Table::FeedGenerators,
        Table::StarterPacks,
        Table::Threadgates,
        Table::Postgates,
        Table::Profiles,
        Table::Records,
    ];

    pub fn for_collection(collection: &str) -> Table {
        match collection {
            "app.bsky.feed.post" => Table::Posts,
            "app.bsky.feed.like" => Table::Likes,
            "app.bsky.feed.repost" => Table::Reposts,
            "app.bsky.graph.follow" => Table::Follows,
            "app.bsky.graph.block" => Table::Blocks,
            "app.bsky.graph.list" => Table::Lists,
            "app.bsky.graph.listitem" => Table::ListItems,
            "app.bsky.feed.generator" => Table::FeedGenerators,
            "app.bsky.graph.starterpack" => Table::StarterPacks,
            "app.bsky.feed.threadgate" => Table::Threadgates,
            "app.bsky.feed.postgate" => Table::Postgates,
            "app.bsky.actor.profile" => Table::Profiles,
            _ => Table::Records,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Table::Posts => "posts",
            Table::Likes => "likes",
            Table::Reposts => "reposts",
            Table::Follows => "follows",
            Table::Blocks => "blocks",
            Table::Lists => "lists",
            Table::ListItems => "list_items",
            Table::FeedGenerators => "feed_generators",
            Table::StarterPacks => "starter_packs",
            Table::Threadgates => "threadgates",
            Table::Postgates => "postgates",
            Table::Profiles => "profiles",
            Table::Records => "records",
        }
    }

    /// Tables whose rows feed the derived tables (aggregates, notifications, feed items):
    /// an update there is applied as delete-old + insert-new so derived rows follow.
    pub fn has_derived(self) -> bool {
        matches!(
            self,
            Table::Posts | Table::Likes | Table::Reposts | Table::Follows
        )
    }
}

/// What every row carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    pub uri: String,
    pub cid: String,
    pub did: String,
    pub created_at: Option<DateTime<Utc>>,
}

/// One record as the row(s) of its table.
// Posts dominate both size and count; boxing them would add an allocation per post for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    Post(PostRow),
    Like(SubjectRefRow),
    Repost(SubjectRefRow),
    Follow(SubjectDidRow),
    Block(SubjectDidRow),
    List(ListRow),
    ListItem(ListItemRow),
    FeedGenerator(FeedGeneratorRow),
    StarterPack(StarterPackRow),
    Threadgate(GateRow),
    Postgate(GateRow),
    Profile(ProfileRow),
    Generic {
        meta: Meta,
        collection: String,
        rkey: String,
        value: serde_json::Value,
    },
}

impl Row {
    pub fn meta(&self) -> &Meta {
        match self {
            Row::Post(r) => &r.meta,
            Row::Like(r) | Row::Repost(r) => &r.meta,
            Row::Follow(r) | Row::Block(r) => &r.meta,
            Row::List(r) => &r.meta,
            Row::ListItem(r) => &r.meta,
            Row::FeedGenerator(r) => &r.meta,
            Row::StarterPack(r) => &r.meta,
            Row::Threadgate(r) | Row::Postgate(r) => &r.meta,
            Row::Profile(r) => &r.meta,
            Row::Generic { meta, .. } => meta,
        }
    }
}

/// Where a commit op comes from: for columns like `commit_seq`.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub did: &'a str,
    pub seq: i64,
    pub time: Option<DateTime<Utc>>,
}

/// Maps a known record to its row.
pub fn known(origin: Origin<'_>, uri: String, cid: String, record: &KnownRecord) -> Row {
    let meta = |created: Option<DateTime<Utc>>| Meta {
        uri: uri.clone(),
        cid: cid.clone(),
        did: origin.did.to_owned(),
        created_at: created,
    };
    match record {
        KnownRecord::Post(p) => Row::Post(posts::map(meta(Some(utc(&p.created_at))), origin, p)),
        KnownRecord::Like(l) => Row::Like(interactions::subject_ref(
            meta(Some(utc(&l.created_at))),
            &l.subject,
        )),
        KnownRecord::Repost(r) => Row::Repost(interactions::subject_ref(
            meta(Some(utc(&r.created_at))),
            &r.subject,
        )),
        KnownRecord::Follow(f) => Row::Follow(SubjectDidRow {
            meta: meta(Some(utc(&f.created_at))),
            subject_did: f.subject.as_str().to_owned(),
        }),
        KnownRecord::Block(b) => Row::Block(SubjectDidRow {
            meta: meta(Some(utc(&b.created_at))),
            subject_did: b.subject.as_str().to_owned(),
        }),
        KnownRecord::Profile(p) => {
            Row::Profile(profile::map(meta(p.created_at.as_ref().map(utc)), p))
        }
        KnownRecord::List(l) => Row::List(graph::list(meta(Some(utc(&l.created_at))), l)),
        KnownRecord::ListItem(i) => {
            Row::ListItem(graph::list_item(meta(Some(utc(&i.created_at))), i))
        }
        KnownRecord::StarterPack(s) => {
            Row::StarterPack(graph::starter_pack(meta(Some(utc(&s.created_at))), s))
        }
        KnownRecord::FeedGenerator(g) => {
            Row::FeedGenerator(feed::generator(meta(Some(utc(&g.created_at))), g))
        }
        KnownRecord::Threadgate(t) => {
            Row::Threadgate(feed::threadgate(meta(Some(utc(&t.created_at))), t))
        }
        KnownRecord::Postgate(p) => {
            Row::Postgate(feed::postgate(meta(Some(utc(&p.created_at))), p))
        }
    }
}

fn utc(dt: &atrium_api::types::string::Datetime) -> DateTime<Utc> {
    dt.as_ref().with_timezone(&Utc)
}

/// Parses an RFC 3339 time (the `time` of firehose events).
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The DID in an AT-URI's authority, if it is one (notifications go to DIDs, not handles).
pub fn uri_did(uri: &str) -> Option<&str> {
    split_at_uri(uri)
        .map(|(authority, _, _)| authority)
        .filter(|a| a.starts_with("did:"))
}

/// Serializes a value to JSON for a jsonb column; `None` if it cannot be represented.
fn json<T: serde::Serialize>(v: &T) -> Option<serde_json::Value> {
    serde_json::to_value(v).ok()
}
