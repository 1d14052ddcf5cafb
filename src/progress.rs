//! Progress bars: `replay` (frames read, events written and events/s, from the pipeline's
//! shared counters) and `backfill` (repos done/total, records/s). Drawn on stderr only when it
//! is a terminal.

use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use crate::pipeline::Stats;

/// Redraw period: often enough to look live, rarely enough to cost nothing.
const TICK: Duration = Duration::from_millis(200);

/// Spawns the progress task; it ends (clearing the bar) when `done` fires.
pub fn spawn(
    stats: Arc<Stats>,
    done: CancellationToken,
    enabled: bool,
) -> tokio::task::JoinHandle<()> {
    spawn_with(done, enabled, move || {
        let secs = stats.elapsed().as_secs_f64().max(1e-3);
        let events = stats.events_written.load(Ordering::Relaxed);
        format!(
            "{} frames read, {events} events written ({:.0} events/s), cursor {}",
            stats.frames.load(Ordering::Relaxed),
            events as f64 / secs,
            stats.cursor.load(Ordering::Relaxed)
        )
    })
}

/// A spinner line redrawn every tick with `message()` (the one home of progress drawing:
/// `replay`, `backfill`), until `done` fires.
pub fn spawn_with(
    done: CancellationToken,
    enabled: bool,
    message: impl Fn() -> String + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !enabled || !std::io::stderr().is_terminal() {
            done.cancelled().await;
            return;
        }
        let bar = ProgressBar::new_spinner();
        let style = ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        bar.set_style(style);
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = done.cancelled() => break,
                _ = tick.tick() => {}
            }
            bar.set_message(message());
            bar.tick();
        }
        bar.finish_and_clear();
    })
}
