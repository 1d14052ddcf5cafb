//! Collections with a table of their own: the registry of their facts ([`registry`]), their
//! lexicon checks, and record → row mapping (pure functions, one file per family of
//! collections) with each table's columns. The writer turns rows into bulk SQL; nothing here
//! touches the database.

mod columns;
mod feed;
mod graph;
mod interactions;
mod lexicon;
mod posts;
mod profile;
mod registry;
pub mod sanitize;

use chrono::{DateTime, Utc};

use crate::firehose::syntax::split_at_uri;

pub(crate) use columns::{Col, Ty, Val, META};

#[cfg(test)]
pub(crate) use interactions::SubjectDidRow;
pub use registry::KnownRecord;
pub(crate) use registry::{decode_known, is_known, known, known_from_json, Row, Table};
pub use sanitize::{Fix, Fixes};

/// What every row carries.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Meta {
    pub(crate) uri: String,
    pub(crate) cid: String,
    pub(crate) did: String,
    pub(crate) created_at: Option<DateTime<Utc>>,
}

/// A record of a collection without a table of its own, as its JSON form (`records`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GenericRow {
    pub(crate) meta: Meta,
    pub(crate) collection: String,
    pub(crate) rkey: String,
    pub(crate) value: serde_json::Value,
}

impl GenericRow {
    /// The columns of [`GenericRow::values`].
    pub(crate) const COLUMNS: &[Col] = &[
        Col::text("collection"),
        Col::text("rkey"),
        Col::json("value"),
    ];

    /// §6: the raw JSON is kept (jsonb is not indexed), without U+0000.
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        self.meta.sanitize(f);
        f.json(&mut self.value);
    }

    pub(crate) fn values(&self) -> Vec<Val<'_>> {
        vec![
            columns::text(&self.collection),
            columns::text(&self.rkey),
            Val::J(Some(&self.value)),
        ]
    }
}

/// Where a commit op comes from: for columns like `commit_seq`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Origin<'a> {
    pub(crate) did: &'a str,
    pub(crate) seq: i64,
    pub(crate) time: Option<DateTime<Utc>>,
}

/// Parses an RFC 3339 time (the `time` of firehose events).
pub(crate) fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The DID in an AT-URI's authority, if it is one (notifications go to DIDs, not handles).
pub(crate) fn uri_did(uri: &str) -> Option<&str> {
    split_at_uri(uri)
        .map(|(authority, _, _)| authority)
        .filter(|a| a.starts_with("did:"))
}

/// Serializes a value to JSON for a jsonb column; `None` if it cannot be represented.
fn json<T: serde::Serialize>(v: &T) -> Option<serde_json::Value> {
    serde_json::to_value(v).ok()
}
