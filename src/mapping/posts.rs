//! `app.bsky.feed.post` → `posts` row (+ what notifications and feed items need).

use atrium_api::app::bsky::feed::post::RecordData;

use super::columns::{json as json_val, opt_text, text, Col, Val};
use super::{json, Fixes, Meta, Origin};
use crate::firehose::record::{mentioned_dids, quoted_uri};

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PostRow {
    pub(crate) meta: Meta,
    pub(crate) text: String,
    pub(crate) reply_root_uri: Option<String>,
    pub(crate) reply_root_cid: Option<String>,
    pub(crate) reply_parent_uri: Option<String>,
    pub(crate) reply_parent_cid: Option<String>,
    pub(crate) quote_uri: Option<String>,
    pub(crate) quote_cid: Option<String>,
    pub(crate) embed: Option<serde_json::Value>,
    /// Comma-joined language tags (BCP-47 tags contain no commas).
    pub(crate) langs: Option<String>,
    pub(crate) facets: Option<serde_json::Value>,
    pub(crate) commit_seq: i64,
    pub(crate) commit_time: Option<chrono::DateTime<chrono::Utc>>,
    /// Mentioned DIDs (for notifications; not a column).
    pub(crate) mentions: Vec<String>,
}

pub(crate) fn map(meta: Meta, origin: Origin<'_>, p: &RecordData) -> PostRow {
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

/// The columns of [`PostRow::values`].
pub(crate) const COLUMNS: &[Col] = &[
    Col::text("text"),
    Col::text("reply_root_uri"),
    Col::text("reply_root_cid"),
    Col::text("reply_parent_uri"),
    Col::text("reply_parent_cid"),
    Col::text("quote_uri"),
    Col::text("quote_cid"),
    Col::json("embed"),
    Col::text("langs").select("string_to_array(u.langs, ',')"),
    Col::json("facets"),
    Col::int8("commit_seq"),
    Col::ts("commit_time"),
];

impl PostRow {
    pub(crate) fn sanitize(&mut self, f: &mut Fixes) {
        self.meta.sanitize(f);
        f.text(&mut self.text);
        f.opt_reference(&mut self.reply_root_uri);
        f.opt_text(&mut self.reply_root_cid);
        f.opt_reference(&mut self.reply_parent_uri);
        f.opt_text(&mut self.reply_parent_cid);
        f.opt_reference(&mut self.quote_uri);
        f.opt_text(&mut self.quote_cid);
        f.opt_json(&mut self.embed);
        f.opt_text(&mut self.langs);
        f.opt_json(&mut self.facets);
        f.time(&mut self.commit_time);
        for did in &mut self.mentions {
            f.reference(did);
        }
    }

    pub(crate) fn values(&self) -> Vec<Val<'_>> {
        vec![
            text(&self.text),
            opt_text(&self.reply_root_uri),
            opt_text(&self.reply_root_cid),
            opt_text(&self.reply_parent_uri),
            opt_text(&self.reply_parent_cid),
            opt_text(&self.quote_uri),
            opt_text(&self.quote_cid),
            json_val(&self.embed),
            opt_text(&self.langs),
            json_val(&self.facets),
            Val::I(Some(self.commit_seq)),
            Val::D(self.commit_time),
        ]
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
