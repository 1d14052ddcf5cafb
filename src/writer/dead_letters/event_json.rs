//! A dead letter's event as sanitized JSON ([`event_json`]) and back ([`event_from_json`]):
//! what `dead_letters.record` keeps and what `dead-letters retry` applies again.

use serde_json::{json, Value};

use crate::firehose::event::{Account, Commit, Identity, Unavailable};
use crate::firehose::limits::OverLimit;
use crate::firehose::record::Rejection;
use crate::firehose::{Action, Event, EventKind, OpRecord, RecordOp};
use crate::mapping::{self, Fixes};

/// The event as JSON, U+0000 removed: what `dead_letters.record` keeps.
pub(crate) fn event_json(ev: &Event) -> Value {
    let mut v = match &ev.kind {
        EventKind::Commit(c) => json!({
            "type": "#commit",
            "repo": c.repo,
            "rev": c.rev,
            "since": c.since,
            "commit": c.commit.to_string(),
            "prevData": c.prev_data.map(|d| d.to_string()),
            "data": c.data.map(|d| d.to_string()),
            "tooBig": c.too_big,
            "overLimit": c.over_limit.map(OverLimit::reason),
            "time": c.time,
            "ops": c.ops.iter().map(op_json).collect::<Vec<_>>(),
        }),
        EventKind::Identity(i) => json!({
            "type": "#identity", "did": i.did, "handle": i.handle, "time": i.time,
        }),
        EventKind::Account(a) => json!({
            "type": "#account", "did": a.did, "active": a.active, "status": a.status, "time": a.time,
        }),
        other => json!({ "type": other.type_name() }),
    };
    Fixes::default().json(&mut v);
    v
}

fn op_json(op: &RecordOp) -> Value {
    let (state, record) = match &op.record {
        OpRecord::None => ("none", Value::Null),
        OpRecord::Known(k) => match serde_json::to_value(k) {
            Ok(v) => ("record", v),
            Err(e) => ("unserializable", Value::String(e.to_string())),
        },
        OpRecord::Generic(v) => ("record", v.clone()),
        OpRecord::Invalid(r) => ("invalid", Value::String(r.kind.to_owned())),
        OpRecord::Unavailable(u) => ("unavailable", Value::String(u.reason().to_owned())),
        OpRecord::Superseded => ("superseded", Value::Null),
    };
    json!({
        "action": op.action.as_str(),
        "collection": op.collection,
        "rkey": op.rkey,
        "cid": op.cid.map(|c| c.to_string()),
        "prev": op.prev.map(|c| c.to_string()),
        "state": state,
        "record": record,
    })
}

/// Rebuilds an event from [`event_json`]; known records are decoded and lexicon-checked
/// again, so a record a fix now rejects is counted as invalid instead of stored.
pub(crate) fn event_from_json(seq: i64, v: &Value) -> Result<Event, String> {
    let s = |k: &str| v[k].as_str().map(str::to_owned).ok_or(format!("no {k}"));
    let opt = |k: &str| v[k].as_str().map(str::to_owned);
    let kind = match v["type"].as_str() {
        Some("#commit") => {
            let ops = v["ops"]
                .as_array()
                .ok_or("no ops")?
                .iter()
                .map(op_from_json)
                .collect::<Result<Vec<_>, _>>()?;
            EventKind::Commit(Commit {
                repo: s("repo")?,
                rev: s("rev")?,
                since: opt("since"),
                commit: cid(&s("commit")?)?,
                prev_data: opt("prevData").as_deref().map(cid).transpose()?,
                data: opt("data").as_deref().map(cid).transpose()?,
                time: s("time")?,
                too_big: v["tooBig"].as_bool().unwrap_or(false),
                over_limit: opt("overLimit").as_deref().map(over_limit).transpose()?,
                // Only the pipeline's byte bounds read it; a retry does not go through them.
                records_bytes: 0,
                ops,
                blocks: Vec::new(),
            })
        }
        Some("#identity") => EventKind::Identity(Identity {
            did: s("did")?,
            handle: opt("handle"),
            time: s("time")?,
        }),
        Some("#account") => EventKind::Account(Account {
            did: s("did")?,
            active: v["active"].as_bool().ok_or("no active")?,
            status: opt("status"),
            time: s("time")?,
        }),
        Some(other) => EventKind::Info {
            name: other.to_owned(),
            message: None,
        },
        None => return Err("no type".into()),
    };
    Ok(Event { seq, kind })
}

fn op_from_json(v: &Value) -> Result<RecordOp, String> {
    let s = |k: &str| v[k].as_str().ok_or(format!("op without {k}"));
    let collection = s("collection")?.to_owned();
    let rkey = s("rkey")?.to_owned();
    let action = match s("action")? {
        "create" => Action::Create,
        "update" => Action::Update,
        "delete" => Action::Delete,
        other => return Err(format!("unknown action {other:?}")),
    };
    let record = match s("state")? {
        "none" => OpRecord::None,
        "record" => match mapping::known_from_json(&collection, &rkey, &v["record"]) {
            Some(Ok(k)) => OpRecord::Known(Box::new(k)),
            Some(Err(r)) => OpRecord::Invalid(r),
            None => OpRecord::Generic(v["record"].clone()),
        },
        "invalid" => OpRecord::Invalid(Rejection::new("dead_letter", "invalid when set aside")),
        "unavailable" => {
            let reason = s("record")?;
            let u = [
                Unavailable::BlockMissing,
                Unavailable::BlockMismatch,
                Unavailable::NoCid,
                Unavailable::TooBig,
                Unavailable::BadPath,
            ]
            .into_iter()
            .find(|u| u.reason() == reason)
            .ok_or(format!("unknown reason {reason:?}"))?;
            OpRecord::Unavailable(u)
        }
        "superseded" => OpRecord::Superseded,
        other => return Err(format!("op state {other:?}")),
    };
    Ok(RecordOp {
        action,
        collection,
        rkey,
        cid: v["cid"].as_str().map(cid).transpose()?,
        prev: v["prev"].as_str().map(cid).transpose()?,
        record,
    })
}

fn over_limit(reason: &str) -> Result<OverLimit, String> {
    [
        OverLimit::TooManyOps,
        OverLimit::BlocksTooLarge,
        OverLimit::RecordTooLarge,
        OverLimit::RecordsTooLarge,
    ]
    .into_iter()
    .find(|o| o.reason() == reason)
    .ok_or(format!("unknown limit {reason:?}"))
}

fn cid(s: &str) -> Result<cid::Cid, String> {
    cid::Cid::try_from(s).map_err(|e| format!("cid {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::firehose::fixture::{self, FrameReader, RawFrame};
    use crate::firehose::frame::{self, DEFAULT_MAX_FRAME_BYTES};
    use crate::writer::plan;
    use crate::writer::plan::Revs;

    /// Every event of `small.frames` comes back from its stored JSON planning exactly the same
    /// rows and actor changes: what `retry` applies is what the stream would have.
    #[test]
    fn stored_events_rebuild_to_the_same_plan() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/firehose/small.frames"
        );
        let reader = fixture::open(std::path::Path::new(path)).unwrap();
        let mut commits = 0;
        for raw in FrameReader::new(reader, DEFAULT_MAX_FRAME_BYTES) {
            let RawFrame::Message(msg) = raw.unwrap() else {
                continue;
            };
            let ev = frame::decode(&msg).unwrap().event;
            commits += usize::from(matches!(ev.kind, EventKind::Commit(_)));
            let stored = event_json(&ev);
            let back = event_from_json(ev.seq, &stored).unwrap();
            let want = plan::build(std::slice::from_ref(&ev), HashMap::new(), Revs::Skip);
            let got = plan::build(&[back], HashMap::new(), Revs::Skip);
            assert_eq!(got.changes, want.changes, "seq {}: {stored}", ev.seq);
            assert_eq!(got.actors, want.actors, "seq {}", ev.seq);
            assert_eq!(got.purges, want.purges, "seq {}", ev.seq);
        }
        assert!(commits > 1000, "{commits}");
    }

    #[test]
    fn stored_json_has_no_nul_and_bad_json_is_refused() {
        let ev = Event {
            seq: 9,
            kind: EventKind::Identity(Identity {
                did: "did:plc:a\0".into(),
                handle: Some("h\0.test".into()),
                time: "2024-01-01T00:00:00Z".into(),
            }),
        };
        let v = event_json(&ev);
        assert!(!v.to_string().contains("\\u0000"), "{v}");
        let back = event_from_json(9, &v).unwrap();
        let EventKind::Identity(i) = back.kind else {
            panic!("not identity")
        };
        assert_eq!(
            (i.did.as_str(), i.handle.as_deref()),
            ("did:plc:a", Some("h.test"))
        );
        assert!(event_from_json(1, &json!({})).is_err());
        assert!(event_from_json(1, &json!({"type": "#commit", "repo": "did:plc:a"})).is_err());
        let bad_op = json!({"type": "#commit", "repo": "did:plc:a", "rev": "r", "commit": "x",
            "time": "t", "ops": [{"action": "explode"}]});
        assert!(event_from_json(1, &bad_op).is_err());
    }
}
