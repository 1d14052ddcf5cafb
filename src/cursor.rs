//! The durable cursor (design §4, §7): everything about `firehose_cursor` and the rule that
//! decides which seq a batch may write.
//!
//! - **Claim** ([`claim_fence`]): a new leader records its fencing token before reading anything;
//!   the row lock of that statement is the serialisation point between leaders, and the seq it
//!   returns is where the new term resumes.
//! - **Write** ([`write`]): each batch stores its cursor in its own transaction, only if no newer
//!   fence has written, and never moves it back.
//! - **Low watermark** ([`watermark_before`], [`batch_cursor`]): the cursor a batch writes never
//!   passes an event that is not durable yet, e.g. one still held in a pending-op map.
//! - **Read** ([`cursors`]): every row, for `status`.

use deadpool_postgres::{Pool, Transaction};

use crate::db::DbError;
use crate::firehose::event::Event;

/// `firehose_cursor.seq` of a row whose fence is claimed but which covers no event yet.
pub const NO_CURSOR: i64 = -1;

/// Where the cursor goes and with which fencing token.
#[derive(Debug, Clone)]
pub struct CursorKey {
    /// `firehose_cursor.service`: the relay host for `run`, `replay` for fixtures.
    pub service: String,
    /// Fencing token of the lease holder (0 when there is no election, e.g. replay).
    pub fence: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("claiming fence {fence} in firehose_cursor for {service}: {source}")]
    Claim {
        service: String,
        fence: i64,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("reading firehose_cursor: {0}")]
    Read(#[source] tokio_postgres::Error),
}

/// One row of `firehose_cursor`, as `status` shows it.
#[derive(Debug, Clone)]
pub struct CursorRow {
    pub service: String,
    /// `None` for [`NO_CURSOR`].
    pub seq: Option<i64>,
    pub fence: i64,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// All rows of `firehose_cursor`.
pub async fn cursors(pool: &Pool) -> Result<Vec<CursorRow>, CursorError> {
    let client = pool.get().await.map_err(DbError::from)?;
    let rows = client
        .query(
            "SELECT service, seq, fence, updated_at FROM firehose_cursor ORDER BY service",
            &[],
        )
        .await
        .map_err(CursorError::Read)?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let seq: i64 = r.try_get(1).map_err(CursorError::Read)?;
        out.push(CursorRow {
            service: r.try_get(0).map_err(CursorError::Read)?,
            seq: stored_seq(seq),
            fence: r.try_get(2).map_err(CursorError::Read)?,
            updated_at: r.try_get(3).map_err(CursorError::Read)?,
        });
    }
    Ok(out)
}

/// A stored seq as a resume point: `None` for [`NO_CURSOR`]. `0` is one: "from the oldest
/// event the relay still has".
fn stored_seq(seq: i64) -> Option<i64> {
    (seq >= 0).then_some(seq)
}

/// Outcome of claiming a fence.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Ours; resume after this seq (`None`: no cursor yet, live tail).
    Claimed(Option<i64>),
    /// The database already holds this fence or a larger one.
    Behind { db_fence: i64 },
}

/// Records `fence` as the newest in `firehose_cursor` for `service`, unless a fence at least as
/// large is there. Returns the durable cursor read under the same row lock.
pub async fn claim_fence(pool: &Pool, service: &str, fence: i64) -> Result<Claim, CursorError> {
    let claim_err = |source| CursorError::Claim {
        service: service.to_owned(),
        fence,
        source,
    };
    let client = pool.get().await.map_err(DbError::from)?;
    let row = client
        .query_opt(
            "INSERT INTO firehose_cursor AS c (service, seq, fence) VALUES ($1, $2, $3) \
             ON CONFLICT (service) DO UPDATE SET fence = excluded.fence \
             WHERE c.fence < excluded.fence RETURNING seq",
            &[&service, &NO_CURSOR, &fence],
        )
        .await
        .map_err(claim_err)?;
    if let Some(r) = row {
        let seq: i64 = r.try_get(0).map_err(claim_err)?;
        return Ok(Claim::Claimed(stored_seq(seq)));
    }
    let db_fence: i64 = client
        .query_one(
            "SELECT fence FROM firehose_cursor WHERE service = $1",
            &[&service],
        )
        .await
        .and_then(|r| r.try_get(0))
        .map_err(CursorError::Read)?;
    Ok(Claim::Behind { db_fence })
}

/// Why a cursor write did not happen.
#[derive(Debug, thiserror::Error)]
pub enum WriteCursorError {
    #[error(transparent)]
    Db(#[from] tokio_postgres::Error),
    /// A newer leader's fence has written: this writer must stop (§7).
    #[error("fenced out: a newer leader than fence {fence} has written the cursor for {service}")]
    Fenced { service: String, fence: i64 },
}

/// Writes the cursor inside the batch's transaction unless a newer fencing token already has.
/// Returns the cursor as stored, which never moves back.
pub async fn write(
    tx: &Transaction<'_>,
    key: &CursorKey,
    seq: i64,
) -> Result<i64, WriteCursorError> {
    // Never moves back: after a reconnect the relay re-sends events the pipeline may already
    // hold, and a batch of those must not lower a cursor whose events are all durable.
    let stmt = tx
        .prepare_cached(
            "INSERT INTO firehose_cursor AS c (service, seq, fence, updated_at) VALUES ($1, $2, $3, now()) \
             ON CONFLICT (service) DO UPDATE SET seq = GREATEST(c.seq, excluded.seq), fence = excluded.fence, \
             updated_at = now() WHERE c.fence <= excluded.fence RETURNING seq",
        )
        .await?;
    let rows = tx.query(&stmt, &[&key.service, &seq, &key.fence]).await?;
    match rows.first() {
        Some(row) => Ok(row.try_get(0)?),
        None => Err(WriteCursorError::Fenced {
            service: key.service.clone(),
            fence: key.fence,
        }),
    }
}

/// Makes `seq` the durable cursor at once, in its own transaction, fenced like a batch (and,
/// like a batch, never lowering it). A leader that starts without a stored cursor anchors its
/// starting point this way before any event reaches the pipeline, so a successor resumes
/// exactly there even if no batch ever committed (§4).
pub async fn anchor(pool: &Pool, key: &CursorKey, seq: i64) -> Result<i64, AnchorError> {
    let mut client = pool.get().await.map_err(DbError::from)?;
    let tx = client.transaction().await?;
    let stored = write(&tx, key, seq).await?;
    tx.commit().await?;
    Ok(stored)
}

/// Why [`anchor`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("anchoring the cursor: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error(transparent)]
    Write(#[from] WriteCursorError),
}

/// The cursor a batch writes: the users stage's low watermark when it set one (events still
/// pending stay above it), else the highest seq in the batch.
pub fn batch_cursor(watermark: Option<i64>, last_seq: Option<i64>) -> Option<i64> {
    watermark.or(last_seq)
}

/// The watermark of a batch cut inside a chunk: the chunk's events not batched yet (`rest`)
/// must stay above the cursor. `None` when the chunk carries none (users stage off).
pub(crate) fn watermark_before(chunk_watermark: Option<i64>, rest: &[Event]) -> Option<i64> {
    chunk_watermark.map(|w| {
        rest.iter()
            .filter(|e| e.seq > 0)
            .map(|e| e.seq - 1)
            .fold(w, i64::min)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i64) -> Event {
        Event::info_at(seq)
    }

    #[test]
    fn a_cut_inside_a_chunk_keeps_unbatched_events_above_the_cursor() {
        assert_eq!(watermark_before(None, &[ev(5)]), None);
        assert_eq!(watermark_before(Some(10), &[]), Some(10));
        assert_eq!(watermark_before(Some(10), &[ev(8), ev(3), ev(0)]), Some(2));
        assert_eq!(watermark_before(Some(1), &[ev(8)]), Some(1));
    }

    #[test]
    fn the_watermark_wins_over_the_last_seq_and_no_cursor_is_not_a_resume_point() {
        assert_eq!(batch_cursor(Some(3), Some(9)), Some(3));
        assert_eq!(batch_cursor(None, Some(9)), Some(9));
        assert_eq!(batch_cursor(None, None), None);
        assert_eq!(stored_seq(NO_CURSOR), None);
        assert_eq!(stored_seq(0), Some(0));
        assert_eq!(stored_seq(7), Some(7));
    }
}
