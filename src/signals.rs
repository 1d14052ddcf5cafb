//! SIGTERM / SIGINT for every long-running subcommand (`run`, `replay`, `record`): the first one
//! starts a graceful stop (cancels the token the command was given: stop reading, write and
//! commit what was read, exit 0); a second one exits at once with [`SECOND_SIGNAL_EXIT_CODE`],
//! for an operator who does not want to wait.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

/// Exit code after a second signal: 128 + SIGINT, what shells report for an interrupted job.
pub const SECOND_SIGNAL_EXIT_CODE: i32 = 130;

/// Installs the handlers now (so a signal during start-up is not fatal by default) and returns
/// the task that watches them; dropping it uninstalls nothing but stops the watching.
pub fn install(shutdown: CancellationToken) -> std::io::Result<AbortOnDropHandle<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(AbortOnDropHandle::new(tokio::spawn(async move {
        let first = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = first,
            "stopping gracefully: finishing what was read (send the signal again to exit at once)"
        );
        shutdown.cancel();
        let second = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::error!(
            signal = second,
            "second signal during shutdown: exiting at once (the durable cursor stays consistent)"
        );
        std::process::exit(SECOND_SIGNAL_EXIT_CODE);
    })))
}
