//! `replay`: fixture files through the same pipeline as the live relay, into PostgreSQL.
//!
//! Replays are idempotent: a commit whose rev is not newer than its repo's last applied rev is
//! skipped, and every write is `ON CONFLICT`-safe, so replaying a file again — or resuming an
//! interrupted replay from the start — leaves the database as one clean replay would.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::cursor::CursorKey;
use crate::db::{self, DbConfig, DbError};
use crate::pipeline::users::{UsersError, DEFAULT_RESOLVE_IDENTITIES_REPLAY};
use crate::pipeline::{self, Input, PipelineConfig, PipelineError, PipelineHandles, Stats};
use crate::resync::{run_workers, Held, Live, ResyncArgs, ResyncConfig, Resyncer};

/// `firehose_cursor.service` of fixture replays (the live relay uses its host name).
pub const REPLAY_SERVICE: &str = "replay";

/// Why a replay (or `migrate`) failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Users(#[from] UsersError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("fixture file {0} cannot be read: {1}")]
    File(String, #[source] std::io::Error),
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

/// Creates the database if needed, applies migrations, then replays `files` in order.
/// `stats` is updated as the replay goes (progress bars read it).
pub async fn replay(
    db_cfg: &DbConfig,
    files: Vec<PathBuf>,
    cfg: PipelineConfig,
    cancel: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), ReplayError> {
    replay_with_resync(db_cfg, files, cfg, None, cancel, stats).await
}

/// [`replay`], with resync workers when `resync` is given: repos desynchronized by the replay
/// (damaged commits, broken chains) are resynced from their PDS (resolved with
/// `cfg.users.identity`) while it runs, and the replay returns only once no resync it started
/// is left (repos backing off after a failure stay queued).
pub async fn replay_with_resync(
    db_cfg: &DbConfig,
    files: Vec<PathBuf>,
    mut cfg: PipelineConfig,
    resync: Option<ResyncConfig>,
    cancel: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), ReplayError> {
    for f in &files {
        std::fs::metadata(f).map_err(|e| ReplayError::File(f.display().to_string(), e))?;
    }
    let creator = cfg.users.creator()?;
    db::prepare(db_cfg).await?;
    let pool = db::connect(db_cfg).await?;
    cfg.cursor = CursorKey {
        service: REPLAY_SERVICE.to_owned(),
        fence: 0,
    };
    let resolver = creator.as_ref().and_then(|c| c.resolver().cloned());
    let held = resync.as_ref().map(|r| Arc::new(Held::new(r.held)));
    let workers = match (resync, &held) {
        (Some(rcfg), Some(held)) => {
            let live = Live {
                fence: cfg.cursor.clone(),
                held: held.clone(),
            };
            let resyncer = Resyncer::new(
                pool.clone(),
                rcfg,
                &cfg.users.identity,
                resolver,
                Some(live),
            )
            .map_err(UsersError::from)?;
            let finish = CancellationToken::new();
            let run = tokio::spawn(run_workers(
                Arc::new(resyncer),
                finish.clone(),
                cancel.clone(),
            ));
            Some((finish, run))
        }
        _ => None,
    };
    let handles = PipelineHandles {
        durable: None,
        creator,
        held,
    };
    let result = pipeline::run(pool, cfg, handles, Input::Files(files), cancel, stats).await;
    if let Some((finish, run)) = workers {
        finish.cancel();
        // The workers log their own failures; a panic there is no reason to fail the replay.
        let _ = run.await;
    }
    result?;
    Ok(())
}

/// `replay` from the command line: SIGTERM/SIGINT stop reading, what was read is still written
/// and committed (then `Ok`); a progress bar on a terminal, a summary on stderr at the end.
pub(crate) async fn replay_command(opts: &ReplayOptions) -> Result<(), ReplayError> {
    let (db, cfg) = opts.configs()?;
    let cancel = CancellationToken::new();
    let _signals = crate::signals::install(cancel.clone()).map_err(ReplayError::Signals)?;
    let stats = Arc::new(Stats::default());
    let done = CancellationToken::new();
    let bar = crate::progress::spawn(stats.clone(), done.clone(), !opts.no_progress);
    let resync = match opts.resync {
        true => Some(opts.resync_args.to_config(&cfg.retry)?),
        false => None,
    };
    let result =
        replay_with_resync(&db, opts.files.clone(), cfg, resync, cancel, stats.clone()).await;
    done.cancel();
    // The bar only draws; its end (or panic) changes nothing about the replay.
    let _ = bar.await;
    if stats.frames.load(Ordering::Relaxed) > 0 {
        // Best effort: stderr going away is no reason to fail.
        let _ = write!(std::io::stderr(), "{}", stats.summary());
    }
    result
}

/// Options of `replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayOptions {
    /// Fixture files (varint-length-prefixed subscribeRepos messages; `.zst` is decompressed),
    /// replayed in order.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    #[command(flatten)]
    pub db: crate::config::DbArgs,
    #[command(flatten)]
    pub batch: crate::config::BatchArgs,
    #[command(flatten)]
    pub users: crate::pipeline::UsersArgs,
    #[command(flatten)]
    pub verify: crate::pipeline::VerifyArgs,
    /// Resync repos the replay finds out of sync (damaged commits, broken chains) from their
    /// PDS while it runs (identity from `--plc-url`); the replay ends once those resyncs have.
    #[arg(
        long,
        env = "RESYNC",
        num_args = 0..=1,
        default_value_t = false,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub resync: bool,
    #[command(flatten)]
    pub resync_args: ResyncArgs,
    /// No progress bar (it is also off when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl ReplayOptions {
    /// Validated database and pipeline configs.
    pub fn configs(&self) -> Result<(DbConfig, PipelineConfig), ReplayError> {
        let db = self.db.db_config()?;
        let mut cfg = self.batch.pipeline_config(&self.db)?;
        cfg.set_users(self.users.to_config(DEFAULT_RESOLVE_IDENTITIES_REPLAY)?);
        cfg.verify_commits = self
            .verify
            .enabled(crate::pipeline::DEFAULT_VERIFY_COMMITS_REPLAY);
        Ok((db, cfg))
    }
}

/// Options of `migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateOptions {
    #[command(flatten)]
    pub db: crate::config::DbArgs,
}

/// `migrate` from the command line: creates the database if needed and applies migrations.
pub(crate) async fn migrate_command(opts: &MigrateOptions) -> Result<(), ReplayError> {
    let db = opts.db.db_config()?;
    db::prepare(&db).await?;
    tracing::info!(database = %db::redact_url(&db.url), "migrations applied");
    Ok(())
}
