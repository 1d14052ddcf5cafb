//! Feed generators, threadgates and postgates.

use atrium_api::app::bsky::feed::{generator, postgate, threadgate};

use super::columns::{json, opt_text, text, Col, Val};
use super::{Fixes, Meta};

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FeedGeneratorRow {
    pub(crate) meta: Meta,
    pub(crate) feed_did: String,
    pub(crate) display_name: String,
    pub(crate) description: Option<String>,
}

/// The columns of [`FeedGeneratorRow::values`].
pub(crate) const GENERATOR: &[Col] = &[
    Col::text("feed_did"),
    Col::text("display_name"),
    Col::text("description"),
];

impl FeedGeneratorRow {
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        self.meta.sanitize(f);
        f.reference(&mut self.feed_did);
        f.text(&mut self.display_name);
        f.opt_text(&mut self.description);
    }

    pub(crate) fn values(&self) -> Vec<Val<'_>> {
        vec![
            text(&self.feed_did),
            text(&self.display_name),
            opt_text(&self.description),
        ]
    }
}

/// `threadgates` (rules = `allow`) and `postgates` (rules = `embeddingRules`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GateRow {
    pub(crate) meta: Meta,
    pub(crate) post_uri: String,
    pub(crate) rules: Option<serde_json::Value>,
}

/// The columns of [`GateRow::values`] in `threadgates`.
pub(crate) const THREADGATE: &[Col] = &[Col::text("post_uri"), Col::json("allow")];
/// The columns of [`GateRow::values`] in `postgates`.
pub(crate) const POSTGATE: &[Col] = &[Col::text("post_uri"), Col::json("rules")];

impl GateRow {
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        self.meta.sanitize(f);
        f.reference(&mut self.post_uri);
        f.opt_json(&mut self.rules);
    }

    pub(crate) fn values(&self) -> Vec<Val<'_>> {
        vec![text(&self.post_uri), json(&self.rules)]
    }
}

pub(crate) fn generator(meta: Meta, g: &generator::RecordData) -> FeedGeneratorRow {
    FeedGeneratorRow {
        meta,
        feed_did: g.did.as_str().to_owned(),
        display_name: g.display_name.clone(),
        description: g.description.clone(),
    }
}

pub(crate) fn threadgate(meta: Meta, t: &threadgate::RecordData) -> GateRow {
    GateRow {
        meta,
        post_uri: t.post.clone(),
        rules: t.allow.as_ref().and_then(super::json),
    }
}

pub(crate) fn postgate(meta: Meta, p: &postgate::RecordData) -> GateRow {
    GateRow {
        meta,
        post_uri: p.post.clone(),
        rules: p.embedding_rules.as_ref().and_then(super::json),
    }
}
