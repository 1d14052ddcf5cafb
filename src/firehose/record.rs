//! Record blocks → typed records. Collections of the registry ([`crate::mapping`]) decode
//! through atrium-api's record types and are checked against the lexicon constraints the App
//! View relies on; every other collection becomes its atproto JSON form.

use atrium_api::app::bsky::feed;
use base64::Engine;
use ipld_core::ipld::Ipld;

use super::cbor::{self, TopLevel};
use crate::mapping;

pub use crate::mapping::KnownRecord;

/// Why a record was rejected: a short, bounded `kind` (for metrics) and a detail for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub kind: &'static str,
    pub(crate) detail: String,
}

impl Rejection {
    pub(crate) fn new(kind: &'static str, detail: impl Into<String>) -> Self {
        Self {
            kind,
            detail: detail.into(),
        }
    }
}

/// The outcome of decoding one record block.
#[derive(Debug, Clone)]
pub(crate) enum Decoded {
    Known(Box<KnownRecord>),
    Generic(serde_json::Value),
}

/// Decodes a record block of `collection` with record key `rkey`.
pub(crate) fn decode(collection: &str, rkey: &str, block: &[u8]) -> Result<Decoded, Rejection> {
    match cbor::map_type(block) {
        Ok(TopLevel::NotMap) => {
            return Err(Rejection::new("not_a_map", "record is not a CBOR map"))
        }
        Ok(TopLevel::Map { type_: None }) => {
            return Err(Rejection::new("no_type", "record has no $type string"))
        }
        Ok(TopLevel::Map { type_: Some(t) })
            if t != collection && mapping::is_known(collection) =>
        {
            return Err(Rejection::new(
                "type_mismatch",
                format!("$type {t} in {collection}"),
            ))
        }
        Ok(TopLevel::Map { .. }) => {}
        Err(e) => return Err(Rejection::new("bad_cbor", format!("{e:?}"))),
    }
    match mapping::decode_known(collection, rkey, block) {
        Some(known) => Ok(Decoded::Known(Box::new(known?))),
        None => {
            let ipld: Ipld = serde_ipld_dagcbor::from_slice(block)
                .map_err(|e| Rejection::new("bad_cbor", e.to_string()))?;
            super::datamodel::check(&ipld).map_err(|e| Rejection::new("data_model", e.0))?;
            Ok(Decoded::Generic(ipld_to_json(&ipld)))
        }
    }
}

/// The atproto JSON form of a DAG-CBOR value: links as `{"$link"}`, bytes as `{"$bytes"}`.
pub(crate) fn ipld_to_json(v: &Ipld) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Ipld::Null => Value::Null,
        Ipld::Bool(b) => Value::Bool(*b),
        Ipld::Integer(i) => {
            if let Ok(x) = i64::try_from(*i) {
                Value::from(x)
            } else if let Ok(x) = u64::try_from(*i) {
                Value::from(x)
            } else {
                Value::String(i.to_string())
            }
        }
        Ipld::Float(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        Ipld::String(s) => Value::String(s.clone()),
        Ipld::Bytes(b) => serde_json::json!({
            "$bytes": base64::engine::general_purpose::STANDARD_NO_PAD.encode(b)
        }),
        Ipld::List(l) => Value::Array(l.iter().map(ipld_to_json).collect()),
        Ipld::Map(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), ipld_to_json(v)))
                .collect(),
        ),
        Ipld::Link(c) => serde_json::json!({ "$link": c.to_string() }),
    }
}

/// The URI of the record a post quotes (`embed.record` or `embed.recordWithMedia`).
pub(crate) fn quoted_uri(p: &feed::post::RecordData) -> Option<&str> {
    use atrium_api::types::Union;
    use feed::post::RecordEmbedRefs as E;
    match p.embed.as_ref()? {
        Union::Refs(E::AppBskyEmbedRecordMain(r)) => Some(&r.record.uri),
        Union::Refs(E::AppBskyEmbedRecordWithMediaMain(r)) => Some(&r.record.record.uri),
        _ => None,
    }
}

/// DIDs mentioned in a post's facets.
pub(crate) fn mentioned_dids(p: &feed::post::RecordData) -> impl Iterator<Item = &str> {
    use atrium_api::app::bsky::richtext::facet::MainFeaturesItem as F;
    use atrium_api::types::Union;
    p.facets
        .iter()
        .flatten()
        .flat_map(|f| f.features.iter())
        .filter_map(|feat| match feat {
            Union::Refs(F::Mention(m)) => Some(m.did.as_str()),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cbor(v: &serde_json::Value) -> Vec<u8> {
        serde_ipld_dagcbor::to_vec(v).unwrap()
    }

    #[test]
    fn decodes_a_like() {
        let like = json!({
            "$type": "app.bsky.feed.like",
            "createdAt": "2024-01-01T00:00:00.000Z",
            "subject": {"uri": "at://did:plc:abc/app.bsky.feed.post/3k", "cid": "bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454"}
        });
        assert!(matches!(
            decode("app.bsky.feed.like", "3k", &cbor(&like)),
            Ok(Decoded::Known(k)) if matches!(*k, KnownRecord::Like(_))
        ));
    }

    #[test]
    fn rejects_lexicon_violations() {
        let cases = [
            (
                "app.bsky.feed.post",
                "3k",
                json!({"$type": "app.bsky.feed.post", "text": 5, "createdAt": "2024-01-01T00:00:00Z"}),
                "schema",
            ),
            (
                "app.bsky.feed.post",
                "3k",
                json!({"$type": "app.bsky.feed.post", "text": "x"}),
                "schema",
            ),
            (
                "app.bsky.feed.post",
                "3k",
                json!({"$type": "app.bsky.feed.post", "text": "x", "createdAt": "yesterday"}),
                "schema",
            ),
            (
                "app.bsky.feed.post",
                "3k",
                json!({"$type": "app.bsky.feed.post", "text": "é".repeat(1600), "createdAt": "2024-01-01T00:00:00Z"}),
                "too_long",
            ),
            (
                "app.bsky.feed.post",
                "3k",
                json!({"$type": "app.bsky.feed.post", "text": "a".repeat(301), "createdAt": "2024-01-01T00:00:00Z"}),
                "too_long",
            ),
            (
                "app.bsky.feed.like",
                "3k",
                json!({"$type": "app.bsky.feed.like", "createdAt": "2024-01-01T00:00:00Z", "subject": {"uri": "at://did:plc:abc/app.bsky.feed.post/3k"}}),
                "schema",
            ),
            (
                "app.bsky.feed.like",
                "3k",
                json!({"$type": "app.bsky.feed.like", "createdAt": "2024-01-01T00:00:00Z", "subject": "at://did:plc:abc/app.bsky.feed.post/3k"}),
                "schema",
            ),
            (
                "app.bsky.feed.repost",
                "3k",
                json!({"$type": "app.bsky.feed.repost", "createdAt": "2024-01-01T00:00:00Z", "subject": {"uri": "https://x", "cid": "bafyreie5cvv4h45feadgeuwhbcutmh6t2ceseocckahdoe6uat64zmz454"}}),
                "bad_at_uri",
            ),
            (
                "app.bsky.graph.follow",
                "3k",
                json!({"$type": "app.bsky.graph.follow", "createdAt": "2024-01-01T00:00:00Z", "subject": "alice"}),
                "schema",
            ),
            (
                "app.bsky.graph.block",
                "3k",
                json!({"$type": "app.bsky.graph.block", "createdAt": "2024-01-01T00:00:00Z", "subject": 12}),
                "schema",
            ),
            (
                "app.bsky.graph.list",
                "3k",
                json!({"$type": "app.bsky.graph.list", "createdAt": "2024-01-01T00:00:00Z", "purpose": "app.bsky.graph.defs#curatelist"}),
                "schema",
            ),
            (
                "app.bsky.actor.profile",
                "other",
                json!({"$type": "app.bsky.actor.profile"}),
                "bad_rkey",
            ),
            (
                "app.bsky.feed.like",
                "3k",
                json!({"$type": "app.bsky.feed.post"}),
                "type_mismatch",
            ),
            ("com.example.x", "3k", json!({"a": 1}), "no_type"),
        ];
        for (collection, rkey, value, kind) in cases {
            match decode(collection, rkey, &cbor(&value)) {
                Err(r) => assert_eq!(r.kind, kind, "{value}: {r:?}"),
                Ok(d) => panic!("{value} accepted as {d:?}"),
            }
        }
        let arr = serde_ipld_dagcbor::to_vec(&vec![1, 2]).unwrap();
        assert_eq!(
            decode("app.bsky.feed.like", "3k", &arr).unwrap_err().kind,
            "not_a_map"
        );
    }

    #[test]
    fn generic_records_become_json() {
        let v = json!({"$type": "com.example.status", "text": "hi", "n": 3});
        match decode("com.example.status", "self", &cbor(&v)) {
            Ok(Decoded::Generic(j)) => assert_eq!(j, v),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn generic_records_outside_the_data_model_are_rejected() {
        let v = json!({"$type": "com.example.status", "score": 1.5});
        assert_eq!(
            decode("com.example.status", "x", &cbor(&v))
                .unwrap_err()
                .kind,
            "data_model"
        );
        let v = json!({"$type": "com.example.status", "inner": {"$type": 7}});
        assert_eq!(
            decode("com.example.status", "x", &cbor(&v))
                .unwrap_err()
                .kind,
            "data_model"
        );
    }

    /// The interop data-model fixtures: CBOR decodes to the given JSON form and hashes to the CID.
    #[test]
    fn interop_data_model_fixtures() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/interop/data-model/data-model-fixtures.json"
        );
        let fixtures: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(!fixtures.is_empty());
        for f in fixtures {
            let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(f["cbor_base64"].as_str().unwrap().trim_end_matches('='))
                .unwrap();
            let ipld: Ipld = serde_ipld_dagcbor::from_slice(&bytes).unwrap();
            assert_eq!(ipld_to_json(&ipld), f["json"]);
            let cid: cid::Cid = f["cid"].as_str().unwrap().parse().unwrap();
            assert!(crate::firehose::car::verify(&cid, &bytes));
            // Re-encoding gives the same canonical bytes.
            assert_eq!(serde_ipld_dagcbor::to_vec(&ipld).unwrap(), bytes);
        }
    }
}
