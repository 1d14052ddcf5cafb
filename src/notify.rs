//! systemd integration (§9, `Type=notify`): readiness, status text, stopping, and the watchdog
//! ping. Every call is a no-op when the process does not run under systemd (`NOTIFY_SOCKET`
//! unset), so the same binary runs in a terminal and in tests.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Tells systemd start-up is finished (`READY=1`): `systemctl start` returns now.
pub fn ready() {
    send(&[NotifyState::Ready], "READY");
}

/// Tells systemd we are shutting down (`STOPPING=1`).
pub fn stopping() {
    send(&[NotifyState::Stopping], "STOPPING");
}

/// One line shown by `systemctl status` (e.g. `leader, cursor 123456`).
pub fn status(text: &str) {
    send(&[NotifyState::Status(text)], "STATUS");
}

/// Half the watchdog timeout systemd asked for (`WATCHDOG_USEC`), or `None` when the watchdog
/// is off or meant for another process. Pinging at half the limit tolerates one late tick.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec) / 2)
    } else {
        None
    }
}

/// Pings the watchdog (`WATCHDOG=1`) every [`watchdog_interval`] until `cancel`; returns at
/// once when the watchdog is off. The ping comes from a reactor task, so a stalled runtime
/// stops it and systemd restarts the service.
pub async fn run_watchdog(cancel: CancellationToken) {
    let Some(every) = watchdog_interval() else {
        return;
    };
    tracing::debug!(
        interval_ms = every.as_millis() as u64,
        "systemd watchdog enabled"
    );
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => send(&[NotifyState::Watchdog], "WATCHDOG"),
        }
    }
}

fn send(state: &[NotifyState<'_>], what: &'static str) {
    // Ok(()) without NOTIFY_SOCKET; an error means systemd asked for notifications and we
    // could not deliver them: worth a warning, not worth stopping for.
    if let Err(e) = sd_notify::notify(false, state) {
        tracing::warn!(error = %e, state = what, "systemd notification failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_ops_outside_systemd() {
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            return;
        }
        ready();
        status("test");
        stopping();
        assert_eq!(watchdog_interval(), None);
        // Returns at once without a watchdog.
        tokio::time::timeout(
            Duration::from_secs(1),
            run_watchdog(CancellationToken::new()),
        )
        .await
        .unwrap_or_else(|_| panic!("run_watchdog should return at once"));
    }
}
