//! `dead_letters` (§6): events the write stage set aside because PostgreSQL refused what they
//! contain, and their re-application after a fix (`dead-letters retry`).
//!
//! Each row holds the event as sanitized JSON ([`event_json`]: U+0000 removed, so jsonb takes
//! it), enough to rebuild it ([`event_from_json`]) and apply it again through the writer.

use chrono::{DateTime, Utc};
use deadpool_postgres::{Pool, Transaction};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::plan::Revs;
use super::{apply_events, exec, WriteError};
use crate::db::DbError;
use crate::firehose::{Event, EventKind};
use crate::mapping::sanitize::MAX_INDEXED_BYTES;
use crate::mapping::Fixes;
use crate::repos;
use crate::txn::{self, RetryPolicy, TxError};

mod event_json;
pub(crate) use event_json::{event_from_json, event_json};

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
