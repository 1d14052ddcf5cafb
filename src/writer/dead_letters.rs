//! `dead_letters` (§6): events the write stage set aside because PostgreSQL refused what they
//! contain, and their re-application after a fix (`dead-letters retry`).
//!
//! Each row holds the event as sanitized JSON ([`event_json`]: U+0000 removed, so jsonb takes
//! it), enough to rebuild it ([`event_from_json`]) and apply it again through the writer.

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::plan::Revs;
use super::{apply_events, exec, WriteError};
use crate::db::DbError;
use crate::firehose::event::{Account, Commit, Identity, Unavailable};
use crate::firehose::limits::OverLimit;
use crate::firehose::record::Rejection;
use crate::firehose::{Action, Event, EventKind, OpRecord, RecordOp};
use crate::mapping::sanitize::MAX_INDEXED_BYTES;
use crate::mapping::{self, Fixes};
use crate::repos;
use crate::txn::{self, RetryPolicy, TxError};

/// Longest error text kept (PostgreSQL's messages are short; this bounds the odd one).
const MAX_ERROR_BYTES: usize = 2000;
/// `sqlstate` of a dead letter whose stored event could not be rebuilt.
const NOT_REBUILT: &str = "none";

/// One row of `dead_letters`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    pub id: i64,
    /// `firehose_cursor.service` of the run that set it aside.
    pub service: String,
    pub seq: i64,
    pub did: Option<String>,
    /// The first op's record URI and collection (a commit's other ops are in `record`).
    pub uri: Option<String>,
    pub collection: Option<String>,
    pub sqlstate: String,
    pub error: String,
    /// The event as sanitized JSON ([`event_json`]).
    pub record: Option<Value>,
    /// Times it was tried: 1 when set aside, +1 per failed retry.
    pub attempts: i32,
    pub failed_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("reading dead_letters: {0}")]
    Read(#[from] tokio_postgres::Error),
    #[error("re-applying dead letter {id}: {source}")]
    Retry {
        id: i64,
        #[source]
        source: TxError<WriteError>,
    },
}

/// What `dead-letters retry` did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RetryReport {
    /// Applied and removed from `dead_letters`.
    pub applied: u64,
    /// Still failing; kept with the new error.
    pub failed: u64,
}

/// `sync_reason` of a repo desynchronized because one of its events was set aside.
pub const DEAD_LETTER: &str = "dead_letter";

/// Sets `ev` aside inside `tx`, with the error that isolated it, and marks its repo
/// desynchronized with a resync queued (§12: what is stored of it is incomplete). Setting the
/// same event aside again (a replay) updates its row. Returns whether the repo's state changed.
/// `with_event: false` leaves `record` NULL: the fallback when even the sanitized JSON is
/// refused (e.g. nesting deeper than PostgreSQL parses).
/// A DID that is itself unstorable (U+0000, over the index limit) is not marked: there is no
/// such repo to resync.
pub(crate) async fn insert(
    tx: &Transaction<'_>,
    service: &str,
    ev: &Event,
    sqlstate: &str,
    error: &str,
    with_event: bool,
) -> Result<bool, tokio_postgres::Error> {
    let mut f = Fixes::default();
    let mut did = ev.kind.did().map(str::to_owned);
    let first = match &ev.kind {
        EventKind::Commit(c) => c
            .ops
            .first()
            .map(|op| (op.uri(&c.repo), op.collection.clone())),
        _ => None,
    };
    let (mut uri, mut collection) = first.unzip();
    for s in [&mut did, &mut uri, &mut collection] {
        f.opt_text(s);
    }
    let mut error = error.to_owned();
    f.text(&mut error);
    truncate(&mut error, MAX_ERROR_BYTES);
    let record = with_event.then(|| event_json(ev));
    exec(
        tx,
        "INSERT INTO dead_letters AS d (service, seq, did, uri, collection, sqlstate, error, record) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
         ON CONFLICT (service, seq) DO UPDATE SET sqlstate = excluded.sqlstate, \
         error = excluded.error, record = excluded.record, failed_at = now()",
        &[&service, &ev.seq, &did, &uri, &collection, &sqlstate, &error, &record],
    )
    .await?;
    let repo = ev
        .kind
        .did()
        .filter(|d| !d.contains('\0') && d.len() <= MAX_INDEXED_BYTES);
    let changed = match repo {
        Some(did) => repos::desynchronize(&**tx, &[(did.to_owned(), DEAD_LETTER)]).await?,
        None => 0,
    };
    Ok(changed > 0)
}

/// Dead letters in `id` order: all of them, or the one with `id`; at most `limit`.
pub async fn list(
    pool: &Pool,
    id: Option<i64>,
    limit: i64,
) -> Result<Vec<DeadLetter>, DeadLetterError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let rows = client
        .query(
            "SELECT id, service, seq, did, uri, collection, sqlstate, error, record, attempts, failed_at \
             FROM dead_letters WHERE $1::int8 IS NULL OR id = $1 ORDER BY id LIMIT $2",
            &[&id, &limit],
        )
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        out.push(DeadLetter {
            id: r.try_get(0)?,
            service: r.try_get(1)?,
            seq: r.try_get(2)?,
            did: r.try_get(3)?,
            uri: r.try_get(4)?,
            collection: r.try_get(5)?,
            sqlstate: r.try_get(6)?,
            error: r.try_get(7)?,
            record: r.try_get(8)?,
            attempts: r.try_get(9)?,
            failed_at: r.try_get(10)?,
        });
    }
    Ok(out)
}

/// Re-applies dead letters (all, or the one with `id`) through the writer, each in its own
/// transaction: one that now succeeds is removed in that same transaction; one that fails
/// with a data error again stays, with the new error. Its commit is applied even though its
/// repo's rev has moved past it (later commits of the repo were written meanwhile), and the
/// rev is left where it is. Any other error stops the retry.
pub async fn retry(
    pool: &Pool,
    policy: &RetryPolicy,
    cancel: &CancellationToken,
    id: Option<i64>,
) -> Result<RetryReport, DeadLetterError> {
    let mut report = RetryReport::default();
    // One page at a time: a row that fails again stays, so pages go by id.
    let mut after = 0i64;
    loop {
        let client = pool.get().await.map_err(DbError::from)?;
        let rows = client
            .query(
                "SELECT id, seq, record FROM dead_letters \
                 WHERE id > $1 AND ($2::int8 IS NULL OR id = $2) ORDER BY id LIMIT 100",
                &[&after, &id],
            )
            .await?;
        drop(client);
        let Some(last) = rows.last() else {
            return Ok(report);
        };
        after = last.try_get(0)?;
        for r in rows {
            let id: i64 = r.try_get(0)?;
            let seq: i64 = r.try_get(1)?;
            let record: Option<Value> = r.try_get(2)?;
            let event = record
                .as_ref()
                .ok_or_else(|| "no event stored".to_owned())
                .and_then(|v| event_from_json(seq, v));
            let event = match event {
                Ok(e) => e,
                Err(why) => {
                    let msg = format!("cannot rebuild the event: {why}");
                    failed_again(pool, id, NOT_REBUILT, &msg).await?;
                    report.failed += 1;
                    continue;
                }
            };
            let events = [event];
            let result = txn::run_tx(pool, policy, cancel, async |tx| -> Result<_, WriteError> {
                apply_events(tx, &events, Revs::Reapply).await?;
                exec(tx, "DELETE FROM dead_letters WHERE id = $1", &[&id]).await?;
                Ok(())
            })
            .await;
            match result {
                Ok(()) => report.applied += 1,
                Err(e) if e.is_data_error() => {
                    let sqlstate = e.sqlstate().unwrap_or(NOT_REBUILT).to_owned();
                    failed_again(pool, id, &sqlstate, &error_text(&e)).await?;
                    report.failed += 1;
                }
                Err(source) => return Err(DeadLetterError::Retry { id, source }),
            }
        }
    }
}

async fn failed_again(
    pool: &Pool,
    id: i64,
    sqlstate: &str,
    error: &str,
) -> Result<(), DeadLetterError> {
    let mut error = error.replace('\0', "");
    truncate(&mut error, MAX_ERROR_BYTES);
    let client = pool.get().await.map_err(DbError::from)?;
    client
        .execute(
            "UPDATE dead_letters SET sqlstate = $2, error = $3, attempts = attempts + 1, \
             failed_at = now() WHERE id = $1",
            &[&id, &sqlstate, &error],
        )
        .await?;
    Ok(())
}

/// The database's own words for a failed transaction: message, detail and constraint.
pub(crate) fn error_text<E: std::error::Error + 'static>(e: &TxError<E>) -> String {
    match txn::find_pg_error(e).and_then(|pg| pg.as_db_error()) {
        Some(db) => {
            let mut s = db.message().to_owned();
            if let Some(d) = db.detail() {
                s.push_str(" (");
                s.push_str(d);
                s.push(')');
            }
            if let Some(c) = db.constraint() {
                s.push_str(" [constraint ");
                s.push_str(c);
                s.push(']');
            }
            s
        }
        None => e.to_string(),
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

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
