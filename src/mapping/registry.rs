//! The collection registry: every collection with a table of its own, and all its facts, in
//! one list. The decoder, the mapping, the writer and the metric labels read this list; adding
//! a collection is one entry here plus a migration (README, "Adding a collection").
//!
//! From the list, `collections!` generates [`KnownRecord`] (typed records), [`Table`] (the
//! tables, in write order, `Records` last for every other collection), [`Row`] (one row per
//! record), [`decode_known`] and [`known`] (record → row).

use atrium_api::app::bsky::{actor, feed, graph};
use chrono::{DateTime, Utc};

use super::columns::{Col, Val};
use super::feed::{self as feeds, FeedGeneratorRow, GateRow};
use super::graph::{self as graphs, ListItemRow, ListRow, StarterPackRow};
use super::interactions::{self, SubjectDidRow, SubjectRefRow};
use super::lexicon::{self, Check};
use super::posts::{self, PostRow};
use super::profile::{self, ProfileRow};
use super::{Fixes, GenericRow, Meta, Origin};
use crate::firehose::record::Rejection;
use serde::Deserialize;

type Datetime = atrium_api::types::string::Datetime;

/// One entry per collection; see the invocation below for what each field means.
macro_rules! collections {
    ($(
        $variant:ident / $table:ident {
            nsid: $nsid:literal,
            table: $name:literal,
            record: $record:ty,
            check: $check:expr,
            created_at: $created:expr,
            row: $row:ty,
            map: $map:expr,
            columns: $columns:expr,
            key: $key:literal,
            derived: $derived:expr $(,)?
        }
    )*) => {
        /// A record of a collection this indexer has a table for.
        #[derive(Debug, Clone, serde::Serialize)]
        #[serde(untagged)]
        pub enum KnownRecord {
            $($variant($record),)*
        }

        /// The tables records land in. `Records` holds every collection without a table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub(crate) enum Table {
            $($table,)*
            Records,
        }

        /// One record as the row of its table.
        // Posts dominate both size and count; boxing them would add an allocation per post.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug, Clone, PartialEq)]
        pub(crate) enum Row {
            $($variant($row),)*
            Generic(GenericRow),
        }

        impl Table {
            /// Every table, in write order.
            pub(crate) const ALL: [Table; [$($name),*].len() + 1] =
                [$(Table::$table,)* Table::Records];

            pub(crate) fn for_collection(collection: &str) -> Table {
                match collection {
                    $($nsid => Table::$table,)*
                    _ => Table::Records,
                }
            }

            pub(crate) fn name(self) -> &'static str {
                match self {
                    $(Table::$table => $name,)*
                    Table::Records => "records",
                }
            }

            /// The collection whose records this table holds (`None` for `records`).
            pub(crate) fn nsid(self) -> Option<&'static str> {
                match self {
                    $(Table::$table => Some($nsid),)*
                    Table::Records => None,
                }
            }

            /// The columns after the common `uri, cid, did, created_at`, in the order of the
            /// values of this table's rows.
            pub(crate) fn columns(self) -> &'static [Col] {
                match self {
                    $(Table::$table => $columns,)*
                    Table::Records => GenericRow::COLUMNS,
                }
            }

            /// The conflict key of an upsert.
            pub(crate) fn key(self) -> &'static str {
                match self {
                    $(Table::$table => $key,)*
                    Table::Records => "uri",
                }
            }

            /// Columns a removed row returns so the derived tables can follow; `None` when
            /// this table feeds none of them.
            fn derived(self) -> Option<&'static str> {
                match self {
                    $(Table::$table => $derived,)*
                    Table::Records => None,
                }
            }
        }

        impl Row {
            pub(crate) fn meta(&self) -> &Meta {
                match self {
                    $(Row::$variant(r) => &r.meta,)*
                    Row::Generic(r) => &r.meta,
                }
            }

            #[cfg(test)]
            pub(crate) fn table(&self) -> Table {
                match self {
                    $(Row::$variant(_) => Table::$table,)*
                    Row::Generic(_) => Table::Records,
                }
            }

            /// Makes every value storable (§6, [`super::sanitize`]), counting the changes.
            pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
                match self {
                    $(Row::$variant(r) => r.sanitize(f),)*
                    Row::Generic(r) => r.sanitize(f),
                }
            }

            /// The values of [`Table::columns`] of this row's table.
            pub(crate) fn values(&self) -> Vec<Val<'_>> {
                match self {
                    $(Row::$variant(r) => r.values(),)*
                    Row::Generic(r) => r.values(),
                }
            }
        }

        /// Decodes a record block of a registered collection into its typed record and checks
        /// its lexicon constraints; `None` for every other collection.
        pub(crate) fn decode_known(
            collection: &str,
            rkey: &str,
            block: &[u8],
        ) -> Option<Result<KnownRecord, Rejection>> {
            match collection {
                $($nsid => Some(typed::<$record>(block).and_then(|r| {
                    let check: Check<$record> = $check;
                    check(&r, rkey)?;
                    Ok(KnownRecord::$variant(r))
                })),)*
                _ => None,
            }
        }

        /// A known record from its JSON form (as `dead_letters` keeps it), lexicon-checked
        /// again; `None` for every other collection.
        pub(crate) fn known_from_json(
            collection: &str,
            rkey: &str,
            value: &serde_json::Value,
        ) -> Option<Result<KnownRecord, Rejection>> {
            match collection {
                $($nsid => Some(
                    <$record>::deserialize(value)
                        .map_err(|e| Rejection::new("schema", e.to_string()))
                        .and_then(|r| {
                            let check: Check<$record> = $check;
                            check(&r, rkey)?;
                            Ok(KnownRecord::$variant(r))
                        }),
                ),)*
                _ => None,
            }
        }

        /// Maps a known record to its row.
        pub(crate) fn known(
            origin: Origin<'_>,
            uri: String,
            cid: String,
            record: &KnownRecord,
        ) -> Row {
            match record {
                $(KnownRecord::$variant(r) => {
                    let created: fn(&$record) -> Option<&Datetime> = $created;
                    let map: fn(Meta, Origin<'_>, &$record) -> $row = $map;
                    let meta = Meta {
                        uri,
                        cid,
                        did: origin.did.to_owned(),
                        created_at: created(r).map(utc),
                    };
                    Row::$variant(map(meta, origin, r))
                })*
            }
        }
    };
}

// Fields of an entry:
// - `Variant / Table`: the names of its `KnownRecord` and `Row` variant, and of its `Table`;
// - `nsid`, `table`: the collection and its SQL table (in the migrations);
// - `record`: atrium-api's record type, decoded from DAG-CBOR; `check`: the lexicon checks
//   serde does not do (`lexicon::none` for none);
// - `created_at`: the record's `createdAt`, if it has one;
// - `row`, `map`: the row type and record → row; `columns`: the table's columns after the
//   common four, in the order of the row type's `values()`;
// - `key`: the upsert conflict key (`uri`, or `did` for one record per account);
// - `derived`: for tables the derived tables follow (`writer/derived/`), the columns a
//   removed row returns; `None` otherwise.
collections! {
    Post / Posts {
        nsid: "app.bsky.feed.post",
        table: "posts",
        record: feed::post::RecordData,
        check: lexicon::post,
        created_at: |r| Some(&r.created_at),
        row: PostRow,
        map: posts::map,
        columns: posts::COLUMNS,
        key: "uri",
        derived: Some("uri, did, reply_parent_uri, quote_uri"),
    }
    Like / Likes {
        nsid: "app.bsky.feed.like",
        table: "likes",
        record: feed::like::RecordData,
        check: lexicon::like,
        created_at: |r| Some(&r.created_at),
        row: SubjectRefRow,
        map: |m, _, r| interactions::subject_ref(m, &r.subject),
        columns: interactions::SUBJECT_REF,
        key: "uri",
        derived: Some("uri, did, subject_uri"),
    }
    Repost / Reposts {
        nsid: "app.bsky.feed.repost",
        table: "reposts",
        record: feed::repost::RecordData,
        check: lexicon::repost,
        created_at: |r| Some(&r.created_at),
        row: SubjectRefRow,
        map: |m, _, r| interactions::subject_ref(m, &r.subject),
        columns: interactions::SUBJECT_REF,
        key: "uri",
        derived: Some("uri, did, subject_uri"),
    }
    Follow / Follows {
        nsid: "app.bsky.graph.follow",
        table: "follows",
        record: graph::follow::RecordData,
        check: lexicon::none,
        created_at: |r| Some(&r.created_at),
        row: SubjectDidRow,
        map: |m, _, r| interactions::subject_did(m, &r.subject),
        columns: interactions::SUBJECT_DID,
        key: "uri",
        derived: Some("uri, did, subject_did"),
    }
    Block / Blocks {
        nsid: "app.bsky.graph.block",
        table: "blocks",
        record: graph::block::RecordData,
        check: lexicon::none,
        created_at: |r| Some(&r.created_at),
        row: SubjectDidRow,
        map: |m, _, r| interactions::subject_did(m, &r.subject),
        columns: interactions::SUBJECT_DID,
        key: "uri",
        derived: None,
    }
    List / Lists {
        nsid: "app.bsky.graph.list",
        table: "lists",
        record: graph::list::RecordData,
        check: lexicon::list,
        created_at: |r| Some(&r.created_at),
        row: ListRow,
        map: |m, _, r| graphs::list(m, r),
        columns: graphs::LIST,
        key: "uri",
        derived: None,
    }
    ListItem / ListItems {
        nsid: "app.bsky.graph.listitem",
        table: "list_items",
        record: graph::listitem::RecordData,
        check: lexicon::list_item,
        created_at: |r| Some(&r.created_at),
        row: ListItemRow,
        map: |m, _, r| graphs::list_item(m, r),
        columns: graphs::LIST_ITEM,
        key: "uri",
        derived: None,
    }
    FeedGenerator / FeedGenerators {
        nsid: "app.bsky.feed.generator",
        table: "feed_generators",
        record: feed::generator::RecordData,
        check: lexicon::generator,
        created_at: |r| Some(&r.created_at),
        row: FeedGeneratorRow,
        map: |m, _, r| feeds::generator(m, r),
        columns: feeds::GENERATOR,
        key: "uri",
        derived: None,
    }
    StarterPack / StarterPacks {
        nsid: "app.bsky.graph.starterpack",
        table: "starter_packs",
        record: graph::starterpack::RecordData,
        check: lexicon::starter_pack,
        created_at: |r| Some(&r.created_at),
        row: StarterPackRow,
        map: |m, _, r| graphs::starter_pack(m, r),
        columns: graphs::STARTER_PACK,
        key: "uri",
        derived: None,
    }
    Threadgate / Threadgates {
        nsid: "app.bsky.feed.threadgate",
        table: "threadgates",
        record: feed::threadgate::RecordData,
        check: lexicon::threadgate,
        created_at: |r| Some(&r.created_at),
        row: GateRow,
        map: |m, _, r| feeds::threadgate(m, r),
        columns: feeds::THREADGATE,
        key: "uri",
        derived: None,
    }
    Postgate / Postgates {
        nsid: "app.bsky.feed.postgate",
        table: "postgates",
        record: feed::postgate::RecordData,
        check: lexicon::postgate,
        created_at: |r| Some(&r.created_at),
        row: GateRow,
        map: |m, _, r| feeds::postgate(m, r),
        columns: feeds::POSTGATE,
        key: "uri",
        derived: None,
    }
    Profile / Profiles {
        nsid: "app.bsky.actor.profile",
        table: "profiles",
        record: actor::profile::RecordData,
        check: lexicon::profile,
        created_at: |r| r.created_at.as_ref(),
        row: ProfileRow,
        map: |m, _, r| profile::map(m, r),
        columns: profile::COLUMNS,
        key: "did",
        derived: None,
    }
}

impl Table {
    /// Tables whose rows feed the derived tables (aggregates, notifications, feed items):
    /// an update there is applied as delete-old + insert-new so derived rows follow.
    pub(crate) fn has_derived(self) -> bool {
        self.derived().is_some()
    }

    /// Columns a removed row must return so derived tables can follow.
    pub(crate) fn removed_columns(self) -> &'static str {
        self.derived().unwrap_or("uri")
    }
}

/// Whether `collection` has a table (and typed decoding, and lexicon checks).
pub(crate) fn is_known(collection: &str) -> bool {
    Table::for_collection(collection) != Table::Records
}

fn typed<T: serde::de::DeserializeOwned>(block: &[u8]) -> Result<T, Rejection> {
    serde_ipld_dagcbor::from_slice(block).map_err(|e| Rejection::new("schema", e.to_string()))
}

fn utc(dt: &Datetime) -> DateTime<Utc> {
    dt.as_ref().with_timezone(&Utc)
}

#[cfg(test)]
#[path = "registry_tests.rs"]
mod tests;
