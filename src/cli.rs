//! Command-line interface: the clap definition of every subcommand and the global flags.
//! Each subcommand's options live with the module that runs it; adding one is one variant.

use clap::{Parser, Subcommand, ValueEnum};

use crate::inspect::InspectOptions;
use crate::record::RecordOptions;
use crate::replay::{MigrateOptions, ReplayOptions};

/// AT Protocol firehose indexer: subscribeRepos → PostgreSQL for an App View.
#[derive(Debug, Parser)]
#[command(name = "atproto-ingest", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format on stderr: `human` (default) or `json` (one object per line).
    /// Verbosity follows `RUST_LOG` (default `info`).
    #[arg(
        long,
        env = "LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Human,
        global = true
    )]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// JSON objects, one per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Decode a fixture file and print its events as JSON lines on stdout; skipped frames
    /// are logged and counted, and a summary is printed on stderr at the end.
    Inspect(InspectOptions),
    /// Replay fixture files into PostgreSQL through the same pipeline as the live relay
    /// (creates the database and applies migrations first). Replays are idempotent: running
    /// one again, or resuming an interrupted one, leaves the same database.
    Replay(ReplayOptions),
    /// Create the database if needed and apply the migrations, then exit.
    Migrate(MigrateOptions),
    /// Record a live relay's messages to a fixture file (the format `replay` reads).
    Record(RecordOptions),
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_inspect_flags() {
        let cli = Cli::try_parse_from([
            "atproto-ingest",
            "inspect",
            "f.frames",
            "--seq",
            "5",
            "--limit",
            "3",
            "--type",
            "#commit,identity",
            "--max-frame-bytes",
            "100",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(cli.log_format, LogFormat::Json);
        let Command::Inspect(o) = cli.command else {
            panic!("not inspect")
        };
        assert_eq!(o.seq, Some(5));
        assert_eq!(o.limit, Some(3));
        assert_eq!(o.types.len(), 2);
        assert_eq!(o.max_frame_bytes, 100);
    }

    #[test]
    fn parses_replay_flags() {
        let cli = Cli::try_parse_from([
            "atproto-ingest",
            "replay",
            "a.frames",
            "b.frames",
            "--batch-max-ops",
            "10",
        ])
        .unwrap();
        let Command::Replay(o) = cli.command else {
            panic!("not replay")
        };
        assert_eq!(o.files.len(), 2);
        assert_eq!(o.batch.batch_max_ops, 10);
        assert!(o.configs().is_ok());
    }
}
