//! The first start of a relay with no stored cursor (§4): the live tail's first event seq `S`
//! becomes the durable cursor `S − 1` before any frame reaches the pipeline. Events read after
//! that are never skipped because this leader dies: its successor resumes at `S − 1`, even if no
//! batch of this term ever committed (users still being resolved, a kill within seconds).

use tokio::sync::mpsc;

use super::AppError;
use crate::cursor::{self, CursorKey};
use crate::firehose::frame;

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
