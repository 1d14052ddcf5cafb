//! The `atproto-ingest` binary: parses the command line, sets up logging and hands over to
//! the library.

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tracing_subscriber::EnvFilter;

use atproto_ingest::cli::{Cli, Command, LogFormat};
use atproto_ingest::inspect::{self, End};

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

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
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
