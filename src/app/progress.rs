//! The leader's progress report: every [`PROGRESS_INTERVAL`] the relay seq seen, the durable
//! cursor and the lag go to `/readyz`, the lag gauge, systemd's status line and Redis (where
//! `status` reads them).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::http::Health;
use crate::leader::Elector;
use crate::metrics as m;
use crate::notify;

use super::AppError;

/// How often the leader reports relay seq and cursor to Redis (for `status` and the lag gauge).
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// A progress report outlives this many intervals, then `status` shows no lag.
const PROGRESS_TTL_INTERVALS: u32 = 10;

/// Reports until `cancel`; never fails (a report Redis refuses is logged at debug level).
pub(super) async fn report(
    elector: Arc<Elector>,
    seen: Arc<AtomicI64>,
    cursor: watch::Receiver<Option<i64>>,
    health: Arc<Health>,
    service: String,
    fence: i64,
    cancel: CancellationToken,
) -> Result<(), AppError> {
    let mut tick = tokio::time::interval(PROGRESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        let relay_seq = seen.load(Ordering::Relaxed);
        let durable = *cursor.borrow();
        if let Some(c) = durable {
            health.set_cursor(c);
        }
        let lag = match (relay_seq, durable) {
            (r, Some(c)) if r > 0 => Some((r - c).max(0)),
            _ => None,
        };
        if let Some(l) = lag {
            metrics::gauge!(m::LAG_EVENTS).set(l as f64);
        }
        notify::status(&match (durable, lag) {
            (Some(c), Some(l)) => format!("leader (fence {fence}), cursor {c}, lag {l} events"),
            (Some(c), None) => format!("leader (fence {fence}), cursor {c}"),
            _ => format!("leader (fence {fence}), no cursor yet"),
        });
        let json = serde_json::json!({
            "service": service,
            "fence": fence,
            "relay_seq": (relay_seq > 0).then_some(relay_seq),
            "cursor": durable,
            "lag_events": lag,
            "at": chrono::Utc::now().to_rfc3339(),
        })
        .to_string();
        if let Err(e) = elector
            .publish_progress(&json, PROGRESS_INTERVAL * PROGRESS_TTL_INTERVALS)
            .await
        {
            tracing::debug!(error = %e, "progress report to Redis failed");
        }
    }
}
