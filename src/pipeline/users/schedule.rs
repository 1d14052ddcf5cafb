//! Stub scheduling: DIDs released as stubs (evicted, overflowing, drained, or a creation whose
//! store failed) get a resolution scheduled in `actors` for the re-resolution job. One task per
//! users stage, fed by a bounded queue; it ends when the stage drops its sender.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::sync::mpsc;

use super::UsersError;
use crate::identity::store;
use crate::metrics as m;
use crate::pipeline::Stats;

/// DIDs queued for stub scheduling (the stage parks when it is full).
pub(super) const SCHEDULE_QUEUE: usize = 1024;
/// DIDs taken per wake-up by the scheduling task.
const SCHEDULE_BATCH: usize = 256;

/// Schedules the resolution of the stub users sent on `rx` until the sender is dropped.
pub(super) async fn schedule_task(pool: Pool, mut rx: mpsc::Receiver<String>, stats: Arc<Stats>) {
    let mut buf = Vec::with_capacity(SCHEDULE_BATCH);
    while rx.recv_many(&mut buf, SCHEDULE_BATCH).await > 0 {
        buf.sort_unstable();
        buf.dedup();
        if let Err(e) = schedule(&pool, &buf).await {
            stats.users.db_errors.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(m::USERS_DB_ERRORS_TOTAL, "op" => "schedule").increment(1);
            tracing::warn!(error = %e, dids = buf.len(), "scheduling stub users for resolution failed; they resolve when next seen");
        }
        buf.clear();
    }
}

async fn schedule(pool: &Pool, dids: &[String]) -> Result<(), UsersError> {
    let client = pool.get().await?;
    Ok(store::schedule(&client, dids).await?)
}
