//! Command-line interface: the clap definition of every subcommand and the global flags, and
//! [`Command::execute`], which hands each subcommand to the module that runs it (on an async
//! runtime when it needs one). Each subcommand's options live with that module; adding one is
//! one variant here.

use std::future::Future;
use std::io::{self, Write};
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::app::{self, AppError, RunOptions};
use crate::dead_letters::{self, DeadLettersCmdError, DeadLettersOptions};
use crate::inspect::{self, End, InspectError, InspectOptions};
use crate::record::{self, RecordError, RecordOptions};
use crate::replay::{self, MigrateOptions, ReplayError, ReplayOptions};
use crate::resync::command::{self, BackfillCommandError, BackfillOptions};
use crate::status::{self, StatusError, StatusOptions};

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
    /// The daemon: competes for the Redis leader lease; the leader streams the relay into
    /// PostgreSQL, a standby waits to take over. Serves /metrics, /healthz, /readyz.
    /// SIGTERM/SIGINT: drain, commit, release the lease, exit 0 (a second signal exits at once).
    Run(Box<RunOptions>),
    /// Enumerate a relay's repos (com.atproto.sync.listRepos) and resync every one not yet
    /// synchronized from its PDS (getRepo, verified); resumes where a killed backfill stopped.
    /// Exits 0 once every listed repo is synchronized, inactive or given up (listed at the end).
    Backfill(Box<BackfillOptions>),
    /// Print the durable cursors and the leader lease (holder, fence, progress, lag), then exit.
    Status(StatusOptions),
    /// List the events set aside in `dead_letters` because PostgreSQL refused them, or apply
    /// them again after a fix (`retry --id N` or `retry --all`).
    DeadLetters(DeadLettersOptions),
}

/// Why a subcommand failed; each variant is one subcommand's own error.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] io::Error),
    #[error(transparent)]
    Run(#[from] AppError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error(transparent)]
    Backfill(#[from] BackfillCommandError),
    #[error(transparent)]
    Status(#[from] StatusError),
    #[error(transparent)]
    DeadLetters(#[from] DeadLettersCmdError),
    #[error("inspect {path}: {source}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: InspectError,
    },
    /// `inspect` printed what it could, then the file ended badly.
    #[error("stopped early: {0}")]
    InspectStoppedEarly(String),
}

impl Command {
    /// Runs the subcommand to its end. `run`, `replay` and `record` stop gracefully on
    /// SIGTERM/SIGINT and then return `Ok`.
    pub fn execute(self) -> Result<(), CommandError> {
        match self {
            Command::Inspect(opts) => inspect(&opts),
            Command::Replay(opts) => block_on(replay::replay_command(&opts)),
            Command::Migrate(opts) => block_on(replay::migrate_command(&opts)),
            Command::Record(opts) => block_on(record::record_command(&opts)).map(drop),
            Command::Run(opts) => block_on(app::run_command(&opts)),
            Command::Backfill(opts) => block_on(command::backfill_command(&opts)),
            Command::Status(opts) => {
                block_on(status::status_command(&opts, &mut io::stdout().lock()))
            }
            Command::DeadLetters(opts) => block_on(dead_letters::dead_letters_command(
                &opts,
                &mut io::stdout().lock(),
            )),
        }
    }
}

/// Runs `fut` on a new multi-threaded runtime.
fn block_on<T, E>(fut: impl Future<Output = Result<T, E>>) -> Result<T, CommandError>
where
    CommandError: From<E>,
{
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CommandError::Runtime)?;
    Ok(rt.block_on(fut)?)
}

/// `inspect`: events as JSON lines on stdout, the summary on stderr.
fn inspect(opts: &InspectOptions) -> Result<(), CommandError> {
    let mut out = io::BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let summary =
        inspect::inspect_file(opts, &mut out).map_err(|source| CommandError::Inspect {
            path: opts.file.clone(),
            source,
        })?;
    // Best effort: stderr going away is no reason to fail.
    let _ = write!(io::stderr(), "{}", summary.tally);
    match summary.end {
        End::Fixture(e) => Err(CommandError::InspectStoppedEarly(e)),
        End::Eof | End::Limit | End::OutputClosed => Ok(()),
    }
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

    #[test]
    fn parses_run_and_status_flags() {
        let cli = Cli::try_parse_from([
            "atproto-ingest",
            "run",
            "--relay-url",
            "ws://127.0.0.1:1",
            "--leader-ttl-ms",
            "900",
            "--http-addr",
            "127.0.0.1:0",
            "--resolve-identities=false",
        ])
        .unwrap();
        let Command::Run(o) = cli.command else {
            panic!("not run")
        };
        let cfg = o.to_config().unwrap();
        assert_eq!(cfg.leader.ttl, std::time::Duration::from_millis(900));
        assert_eq!(
            cfg.leader.poll_interval,
            std::time::Duration::from_millis(300)
        );
        assert_eq!(cfg.http_addr.map(|a| a.port()), Some(0));
        assert!(!cfg.pipeline.users.enabled());
        let cli = Cli::try_parse_from(["atproto-ingest", "status", "--json"]).unwrap();
        assert!(matches!(cli.command, Command::Status(ref s) if s.json));
    }

    #[test]
    fn run_rejects_bad_values_naming_flag_and_env() {
        for (flag, value, env) in [
            ("--leader-ttl-ms", "10", "LEADER_TTL_MS"),
            ("--drain-limit-ms", "0", "DRAIN_LIMIT_MS"),
            ("--http-addr", "localhost", "HTTP_ADDR"),
            ("--relay-url", "ftp://x", "RELAY_URL"),
            ("--redis-url", "nope://u:secret@h", "REDIS_URL"),
            ("--cleanup-batch", "0", "CLEANUP_BATCH"),
            (
                "--pool-monitor-interval-ms",
                "0",
                "POOL_MONITOR_INTERVAL_MS",
            ),
            ("--leader-key-prefix", "", "LEADER_KEY_PREFIX"),
        ] {
            let cli = Cli::try_parse_from(["atproto-ingest", "run", flag, value]).unwrap();
            let Command::Run(o) = cli.command else {
                panic!("not run")
            };
            let e = o.to_config().unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains(env), "{flag}: {e}");
            assert!(!e.contains("secret"), "password leaked: {e}");
        }
    }

    #[test]
    fn run_debug_redacts_passwords() {
        let cli = Cli::try_parse_from([
            "atproto-ingest",
            "run",
            "--database-url",
            "postgres://u:pgsecret@h/db",
            "--redis-url",
            "redis://:redissecret@h:6379",
        ])
        .unwrap();
        let Command::Run(o) = cli.command else {
            panic!("not run")
        };
        let dbg = format!("{o:?} {:?}", o.to_config().unwrap());
        assert!(
            !dbg.contains("pgsecret") && !dbg.contains("redissecret"),
            "{dbg}"
        );
    }

    #[test]
    fn parses_dead_letters_flags() {
        let cli =
            Cli::try_parse_from(["atproto-ingest", "dead-letters", "retry", "--id", "3"]).unwrap();
        let Command::DeadLetters(o) = cli.command else {
            panic!("not dead-letters")
        };
        assert!(matches!(
            o.action,
            dead_letters::DeadLettersAction::Retry {
                id: Some(3),
                all: false,
                ..
            }
        ));
        for bad in [
            &["dead-letters", "retry"][..],
            &["dead-letters", "retry", "--id", "3", "--all"],
        ] {
            let args = std::iter::once("atproto-ingest").chain(bad.iter().copied());
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from([
            "atproto-ingest",
            "dead-letters",
            "list",
            "--json",
            "--database-url",
            "postgres://u:pgsecret@h/db",
        ])
        .unwrap();
        let Command::DeadLetters(o) = cli.command else {
            panic!("not dead-letters")
        };
        assert!(!format!("{o:?}").contains("pgsecret"), "{o:?}");
        assert!(matches!(
            o.action,
            dead_letters::DeadLettersAction::List {
                json: true,
                limit: 100,
                id: None,
                ..
            }
        ));
    }

    /// Every variable in `systemd/env.example` is one the daemon reads (a misspelt name would
    /// be silently ignored in production).
    #[test]
    fn env_example_names_real_variables() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").expect("run subcommand");
        let mut known: Vec<String> = run
            .get_arguments()
            .chain(cmd.get_arguments())
            .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
            .collect();
        known.push("RUST_LOG".into()); // read by the tracing filter, not by clap
        let text = include_str!("../systemd/env.example");
        let names: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            .collect();
        assert!(names.len() > 10, "{names:?}");
        for name in names {
            assert!(
                known.iter().any(|k| k == name),
                "env.example sets {name}, which nothing reads"
            );
        }
    }
}
