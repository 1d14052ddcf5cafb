//! `replay`: fixture files through the same pipeline as the live relay, into PostgreSQL.
//!
//! Replays are idempotent: a commit whose rev is not newer than its repo's last applied rev is
//! skipped, and every write is `ON CONFLICT`-safe, so replaying a file again — or resuming an
//! interrupted replay from the start — leaves the database as one clean replay would.

use std::path::PathBuf;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::cursor::CursorKey;
use crate::db::{self, DbConfig, DbError};
use crate::pipeline::{self, Input, PipelineConfig, PipelineError, PipelineHandles, Stats};

/// `firehose_cursor.service` of fixture replays (the live relay uses its host name).
pub const REPLAY_SERVICE: &str = "replay";

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("fixture file {0} cannot be read: {1}")]
    File(String, std::io::Error),
}

/// Creates the database if needed, applies migrations, then replays `files` in order.
/// `stats` is updated as the replay goes (progress bars read it).
pub async fn replay(
    db_cfg: &DbConfig,
    files: Vec<PathBuf>,
    mut cfg: PipelineConfig,
    cancel: CancellationToken,
    stats: Arc<Stats>,
) -> Result<(), ReplayError> {
    for f in &files {
        std::fs::metadata(f).map_err(|e| ReplayError::File(f.display().to_string(), e))?;
    }
    db::ensure_database(db_cfg).await?;
    db::migrate(db_cfg).await?;
    let pool = db::connect(db_cfg).await?;
    cfg.cursor = CursorKey {
        service: REPLAY_SERVICE.to_owned(),
        fence: 0,
    };
    let handles = PipelineHandles::default();
    pipeline::run(pool, cfg, handles, Input::Files(files), cancel, stats).await?;
    Ok(())
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
    /// No progress bar (it is also off when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

impl ReplayOptions {
    /// Validated database and pipeline configs.
    pub fn configs(&self) -> Result<(DbConfig, PipelineConfig), String> {
        let db = self.db.db_config().map_err(|e| e.to_string())?;
        let mut cfg = self
            .batch
            .pipeline_config(&self.db)
            .map_err(|e| e.to_string())?;
        cfg.users = self
            .users
            .to_config(crate::pipeline::users::DEFAULT_RESOLVE_IDENTITIES_REPLAY)
            .map_err(|e| e.to_string())?;
        Ok((db, cfg))
    }
}

/// Options of `migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateOptions {
    #[command(flatten)]
    pub db: crate::config::DbArgs,
}

/// Creates the database if needed and applies migrations.
pub async fn migrate(db_cfg: &DbConfig) -> Result<(), DbError> {
    db::ensure_database(db_cfg).await?;
    db::migrate(db_cfg).await
}
