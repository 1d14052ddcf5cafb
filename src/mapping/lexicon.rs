//! Lexicon constraints the serde record types do not enforce (string lengths, AT-URI formats,
//! record keys), one check per collection; the registry names which applies to which.

use atrium_api::app::bsky::{actor, feed, graph};
use unicode_segmentation::UnicodeSegmentation;

use crate::firehose::record::{quoted_uri, Rejection};
use crate::firehose::syntax::is_at_uri;

/// The signature of every check: the typed record and its record key.
pub(crate) type Check<R> = fn(&R, &str) -> Result<(), Rejection>;

/// A string limit from the lexicon: UTF-8 bytes and graphemes.
fn within(field: &str, s: &str, max_bytes: usize, max_graphemes: usize) -> Result<(), Rejection> {
    if s.len() > max_bytes {
        return Err(Rejection::new(
            "too_long",
            format!("{field}: {} bytes > {max_bytes}", s.len()),
        ));
    }
    // A string of n bytes has at most n graphemes: count only when it could matter.
    if s.len() > max_graphemes && s.graphemes(true).count() > max_graphemes {
        return Err(Rejection::new(
            "too_long",
            format!("{field}: more than {max_graphemes} graphemes"),
        ));
    }
    Ok(())
}

fn at_uri(field: &str, s: &str) -> Result<(), Rejection> {
    if is_at_uri(s) {
        Ok(())
    } else {
        Err(Rejection::new("bad_at_uri", format!("{field}: {s:?}")))
    }
}

fn non_empty(field: &str, s: &str) -> Result<(), Rejection> {
    if s.is_empty() {
        Err(Rejection::new("empty", format!("{field} is empty")))
    } else {
        Ok(())
    }
}

/// Collections whose typed decode already checks everything.
pub(crate) fn none<R>(_: &R, _: &str) -> Result<(), Rejection> {
    Ok(())
}

pub(crate) fn post(p: &feed::post::RecordData, _: &str) -> Result<(), Rejection> {
    within("text", &p.text, 3000, 300)?;
    if let Some(reply) = &p.reply {
        at_uri("reply.root", &reply.root.uri)?;
        at_uri("reply.parent", &reply.parent.uri)?;
    }
    if let Some(langs) = &p.langs {
        if langs.len() > 3 {
            return Err(Rejection::new("too_many", "langs: more than 3"));
        }
    }
    if let Some(tags) = &p.tags {
        if tags.len() > 8 {
            return Err(Rejection::new("too_many", "tags: more than 8"));
        }
    }
    if let Some(quoted) = quoted_uri(p) {
        at_uri("embed.record", quoted)?;
    }
    Ok(())
}

pub(crate) fn like(l: &feed::like::RecordData, _: &str) -> Result<(), Rejection> {
    at_uri("subject.uri", &l.subject.uri)
}

pub(crate) fn repost(r: &feed::repost::RecordData, _: &str) -> Result<(), Rejection> {
    at_uri("subject.uri", &r.subject.uri)
}

pub(crate) fn profile(p: &actor::profile::RecordData, rkey: &str) -> Result<(), Rejection> {
    if rkey != "self" {
        return Err(Rejection::new(
            "bad_rkey",
            format!("profile rkey {rkey:?} is not self"),
        ));
    }
    if let Some(n) = &p.display_name {
        within("displayName", n, 640, 64)?;
    }
    if let Some(d) = &p.description {
        within("description", d, 2560, 256)?;
    }
    Ok(())
}

pub(crate) fn list(l: &graph::list::RecordData, _: &str) -> Result<(), Rejection> {
    non_empty("name", &l.name)?;
    within("name", &l.name, 64, 64)?;
    if let Some(d) = &l.description {
        within("description", d, 3000, 300)?;
    }
    Ok(())
}

pub(crate) fn list_item(i: &graph::listitem::RecordData, _: &str) -> Result<(), Rejection> {
    at_uri("list", &i.list)
}

pub(crate) fn generator(g: &feed::generator::RecordData, _: &str) -> Result<(), Rejection> {
    within("displayName", &g.display_name, 240, 24)?;
    if let Some(d) = &g.description {
        within("description", d, 3000, 300)?;
    }
    Ok(())
}

pub(crate) fn starter_pack(s: &graph::starterpack::RecordData, _: &str) -> Result<(), Rejection> {
    non_empty("name", &s.name)?;
    within("name", &s.name, 500, 50)?;
    at_uri("list", &s.list)
}

pub(crate) fn threadgate(t: &feed::threadgate::RecordData, _: &str) -> Result<(), Rejection> {
    at_uri("post", &t.post)
}

pub(crate) fn postgate(p: &feed::postgate::RecordData, _: &str) -> Result<(), Rejection> {
    at_uri("post", &p.post)
}
