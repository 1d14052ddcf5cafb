//! `app.bsky.feed.post` → `posts` row (+ what notifications and feed items need).

use atrium_api::app::bsky::feed::post::RecordData;

use super::{json, Meta, Origin};
use crate::firehose::record::{mentioned_dids, quoted_uri};

#[derive(Debug, Clone, PartialEq)]
pub struct PostRow {
    pub meta: Meta,
    pub text: String,
    pub reply_root_uri: Option<String>,
    pub reply_root_cid: Option<String>,
    pub reply_parent_uri: Option<String>,
    pub reply_parent_cid: Option<String>,
    pub quote_uri: Option<String>,
    pub quote_cid: Option<String>,
    pub embed: Option<serde_json::Value>,
    /// Comma-joined language tags (BCP-47 tags contain no commas).
    pub langs: Option<String>,
    pub facets: Option<serde_json::Value>,
    pub commit_seq: i64,
    pub commit_time: Option<chrono::DateTime<chrono::Utc>>,
    /// Mentioned DIDs (for notifications; not a column).
    pub mentions: Vec<String>,
}

pub fn map(meta: Meta, origin: Origin<'_>, p: &RecordData) -> PostRow {
    let quote_cid = p.embed.as_ref().and_then(|_| quoted_cid(p));
    let mut mentions: Vec<String> = mentioned_dids(p).map(str::to_owned).collect();
    mentions.sort();
    mentions.dedup();
    PostRow {
        text: p.text.clone(),
        reply_root_uri: p.reply.as_ref().map(|r| r.root.uri.clone()),
        reply_root_cid: p.reply.as_ref().map(|r| r.root.cid.as_ref().to_string()),
        reply_parent_uri: p.reply.as_ref().map(|r| r.parent.uri.clone()),
        reply_parent_cid: p.reply.as_ref().map(|r| r.parent.cid.as_ref().to_string()),
        quote_uri: quoted_uri(p).map(str::to_owned),
        quote_cid,
        embed: p.embed.as_ref().and_then(json),
        langs: p.langs.as_ref().map(|l| {
            l.iter()
                .map(|t| t.as_ref().as_str().to_owned())
                .collect::<Vec<_>>()
                .join(",")
        }),
        facets: p.facets.as_ref().and_then(json),
        commit_seq: origin.seq,
        commit_time: origin.time,
        mentions,
        meta,
    }
}

fn quoted_cid(p: &RecordData) -> Option<String> {
    use atrium_api::app::bsky::feed::post::RecordEmbedRefs as E;
    use atrium_api::types::Union;
    match p.embed.as_ref()? {
        Union::Refs(E::AppBskyEmbedRecordMain(r)) => Some(r.record.cid.as_ref().to_string()),
        Union::Refs(E::AppBskyEmbedRecordWithMediaMain(r)) => {
            Some(r.record.record.cid.as_ref().to_string())
        }
        _ => None,
    }
}
