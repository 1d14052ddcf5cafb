//! The first start of a relay with no stored cursor (§4): the live tail's first event seq `S`
//! becomes the durable cursor `S − 1` before any frame reaches the pipeline. Events read after
//! that are never skipped because this leader dies: its successor resumes at `S − 1`, even if no
//! batch of this term ever committed (users still being resolved, a kill within seconds).
//!
//! `run --start-cursor N` chooses the first start instead ([`start_point`]): with no stored
//! cursor, `N` is made durable at once and the term resumes after it; with a stored cursor the
//! flag is ignored (logged), so restarting with the flag still set never rewinds or skips.

use tokio::sync::mpsc;

use super::AppError;
use crate::cursor::{self, CursorKey};
use crate::firehose::frame;

/// Where a term resumes: the stored cursor if there is one (a `start_cursor` is then ignored
/// and logged), else `start_cursor`, made durable at once (fenced, never lowering a cursor a
/// newer leader wrote), else `None` (the live tail, anchored by [`forward`]).
pub(super) async fn start_point(
    pool: &deadpool_postgres::Pool,
    key: &CursorKey,
    stored: Option<i64>,
    start_cursor: Option<i64>,
) -> Result<Option<i64>, AppError> {
    match (stored, start_cursor) {
        (Some(seq), Some(n)) => {
            tracing::info!(
                service = %key.service,
                cursor = seq,
                start_cursor = n,
                "--start-cursor ignored: this relay has a stored cursor; resuming from it"
            );
            Ok(Some(seq))
        }
        (None, Some(n)) => {
            let at = cursor::anchor(pool, key, n).await?;
            tracing::info!(
                service = %key.service,
                start_cursor = n,
                cursor = at,
                "first start from --start-cursor: starting point made durable"
            );
            Ok(Some(at))
        }
        (stored, None) => Ok(stored),
    }
}

/// Forwards `rx` to `tx`, anchoring the cursor at the first event's seq − 1 before forwarding
/// that event. Frames without a seq (`#info`, error frames) pass through; a frame that does not
/// parse is passed on for the decoder to count and skip.
pub(super) async fn forward(
    pool: deadpool_postgres::Pool,
    key: CursorKey,
    mut rx: mpsc::Receiver<Vec<u8>>,
    tx: mpsc::Sender<Vec<u8>>,
) -> Result<(), AppError> {
    while let Some(msg) = rx.recv().await {
        if let Some(seq) = first_seq(&msg) {
            let at = (seq - 1).max(0);
            let stored = cursor::anchor(&pool, &key, at).await?;
            tracing::info!(
                service = %key.service,
                first_seq = seq,
                cursor = stored,
                "first start from the live tail: starting point made durable"
            );
            if tx.send(msg).await.is_err() {
                return Ok(());
            }
            break;
        }
        if tx.send(msg).await.is_err() {
            return Ok(());
        }
    }
    while let Some(msg) = rx.recv().await {
        if tx.send(msg).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// The seq of an event frame (`op = 1` with a body that carries one).
fn first_seq(msg: &[u8]) -> Option<i64> {
    let (header, offset) = frame::peek_header(msg).ok()?;
    if header.op != 1 {
        return None;
    }
    frame::peek_seq(msg.get(offset..)?).ok().filter(|s| *s > 0)
}
