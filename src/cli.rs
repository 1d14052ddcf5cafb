//! Command-line interface: the clap definition of every subcommand and the global flags.
//! Each subcommand's options live with the module that runs it; adding one is one variant.

use clap::{Parser, Subcommand, ValueEnum};

use crate::inspect::InspectOptions;

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
        let Command::Inspect(o) = cli.command;
        assert_eq!(o.seq, Some(5));
        assert_eq!(o.limit, Some(3));
        assert_eq!(o.types.len(), 2);
        assert_eq!(o.max_frame_bytes, 100);
    }
}
