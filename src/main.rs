//! The `atproto-ingest` binary: parses the command line, sets up logging and hands over to
//! the library.

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use atproto_ingest::cli::{Cli, Command, LogFormat};
use atproto_ingest::inspect::{self, End};
use atproto_ingest::pipeline::Stats;
use atproto_ingest::replay::ReplayOptions;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Replay(opts) => runtime()?.block_on(replay(opts)),
        Command::Migrate(opts) => runtime()?.block_on(async move {
            let db = opts.db.db_config()?;
            atproto_ingest::replay::migrate(&db).await?;
            tracing::info!(database = %atproto_ingest::db::redact_url(&db.url), "migrations applied");
            Ok(ExitCode::SUCCESS)
        }),
        Command::Record(opts) => runtime()?.block_on(async move {
            let cancel = CancellationToken::new();
            let on_signal = cancel.clone();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                on_signal.cancel();
            });
            let n = atproto_ingest::record::record_args(opts.to_args(), cancel).await?;
            tracing::info!(frames = n, file = %opts.out.display(), "recorded");
            Ok(ExitCode::SUCCESS)
        }),
        Command::Run(opts) => runtime()?.block_on(async move {
            atproto_ingest::app::run_command(&opts).await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Status(opts) => runtime()?.block_on(async move {
            atproto_ingest::status::status_command(&opts, &mut io::stdout().lock()).await?;
            Ok(ExitCode::SUCCESS)
        }),
        Command::Inspect(opts) => {
            let mut out = io::BufWriter::with_capacity(1 << 16, io::stdout().lock());
            let summary = inspect::inspect_file(&opts, &mut out)
                .with_context(|| format!("inspect {}", opts.file.display()))?;
            // Best effort: stderr going away is no reason to fail.
            let _ = write!(io::stderr(), "{}", summary.tally);
            Ok(match summary.end {
                End::Fixture(e) => {
                    tracing::error!("stopped early: {e}");
                    ExitCode::FAILURE
                }
                End::Eof | End::Limit | End::OutputClosed => ExitCode::SUCCESS,
            })
        }
    }
}

/// `replay`: Ctrl-C / SIGTERM stop reading; what was read is still written (drain).
async fn replay(opts: ReplayOptions) -> anyhow::Result<ExitCode> {
    let (db, cfg) = opts.configs().map_err(anyhow::Error::msg)?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        tracing::warn!("interrupted: finishing what was read, then stopping");
        on_signal.cancel();
    });
    let stats = Arc::new(Stats::default());
    let done = CancellationToken::new();
    let bar = atproto_ingest::progress::spawn(stats.clone(), done.clone(), !opts.no_progress);
    let result =
        atproto_ingest::replay::replay(&db, opts.files.clone(), cfg, cancel, stats.clone()).await;
    done.cancel();
    let _ = bar.await;
    if stats.frames.load(std::sync::atomic::Ordering::Relaxed) > 0 {
        let _ = write!(io::stderr(), "{}", stats.summary());
    }
    result?;
    Ok(ExitCode::SUCCESS)
}
