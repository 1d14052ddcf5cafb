//! Feed generators, threadgates and postgates.

use atrium_api::app::bsky::feed::{generator, postgate, threadgate};

use super::{json, Meta};

#[derive(Debug, Clone, PartialEq)]
pub struct FeedGeneratorRow {
    pub meta: Meta,
    pub feed_did: String,
    pub display_name: String,
    pub description: Option<String>,
}

/// `threadgates` (rules = `allow`) and `postgates` (rules = `embeddingRules`).
#[derive(Debug, Clone, PartialEq)]
pub struct GateRow {
    pub meta: Meta,
    pub post_uri: String,
    pub rules: Option<serde_json::Value>,
}

pub fn generator(meta: Meta, g: &generator::RecordData) -> FeedGeneratorRow {
    FeedGeneratorRow {
        meta,
        feed_did: g.did.as_str().to_owned(),
        display_name: g.display_name.clone(),
        description: g.description.clone(),
    }
}

pub fn threadgate(meta: Meta, t: &threadgate::RecordData) -> GateRow {
    GateRow {
        meta,
        post_uri: t.post.clone(),
        rules: t.allow.as_ref().and_then(json),
    }
}

pub fn postgate(meta: Meta, p: &postgate::RecordData) -> GateRow {
    GateRow {
        meta,
        post_uri: p.post.clone(),
        rules: p.embedding_rules.as_ref().and_then(json),
    }
}
