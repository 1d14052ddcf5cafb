//! `atproto-ingest backfill`: flags, the progress bar and the closing report.

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use super::backfill::{self, BackfillConfig, BackfillError, Progress, Report};
use super::ResyncArgs;
use crate::config::{check, ConfigError, DbArgs};
use crate::db::{self, DbError};
use crate::pipeline::UsersArgs;

/// Options of `backfill`.
#[derive(Debug, Clone, clap::Args)]
pub struct BackfillOptions {
    /// The relay (or PDS) whose repos are enumerated with `com.atproto.sync.listRepos`
    /// (`ws(s)://` is taken as `http(s)://`).
    #[arg(long, env = "RELAY_URL", value_name = "URL", default_value = crate::firehose::client::DEFAULT_RELAY_URL, hide_env_values = true)]
    pub relay_url: String,
    /// Repos asked for per listRepos page.
    #[arg(long, env = "BACKFILL_PAGE_LIMIT", value_name = "N", default_value_t = backfill::DEFAULT_PAGE_LIMIT)]
    pub backfill_page_limit: usize,
    /// Failed attempts (with backoff: 1 min, 2 min, …) after which a repo is given up and
    /// listed at the end with its reason.
    #[arg(long, env = "BACKFILL_MAX_ATTEMPTS", value_name = "N", default_value_t = backfill::DEFAULT_MAX_ATTEMPTS)]
    pub backfill_max_attempts: u32,
    #[command(flatten)]
    pub db: DbArgs,
    /// Identity resolution (`--plc-url`, `--allow-private-network`, timeouts).
    #[command(flatten)]
    pub users: UsersArgs,
    #[command(flatten)]
    pub resync: ResyncArgs,
    /// No progress bar (it is also off when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
}

/// Why `backfill` failed.
#[derive(Debug, thiserror::Error)]
pub enum BackfillCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Users(#[from] crate::pipeline::users::UsersError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Backfill(#[from] BackfillError),
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

impl BackfillOptions {
    /// The validated backfill settings.
    pub fn config(&self) -> Result<BackfillConfig, BackfillCommandError> {
        check(
            (1..=1000).contains(&self.backfill_page_limit),
            "--backfill-page-limit",
            "BACKFILL_PAGE_LIMIT",
            "must be between 1 and 1000",
            self.backfill_page_limit,
        )?;
        check(
            self.backfill_max_attempts >= 1,
            "--backfill-max-attempts",
            "BACKFILL_MAX_ATTEMPTS",
            "must be at least 1",
            self.backfill_max_attempts,
        )?;
        let url = backfill::http_base(&self.relay_url);
        check(
            url.starts_with("http://") || url.starts_with("https://"),
            "--relay-url",
            "RELAY_URL",
            "must be a ws(s):// or http(s):// URL",
            &self.relay_url,
        )?;
        let retry = self.db.retry_policy()?;
        let mut resync = self.resync.to_config(&retry)?;
        resync.max_attempts = Some(self.backfill_max_attempts);
        let mut identity = self.users.to_config(true)?.identity;
        identity.resolve_identities = true;
        Ok(BackfillConfig {
            relay_url: self.relay_url.clone(),
            page_limit: self.backfill_page_limit,
            identity,
            resync,
            retry,
        })
    }
}

/// `backfill` from the command line: SIGTERM/SIGINT stop it (run it again to resume); the
/// repos given up are printed at the end.
pub(crate) async fn backfill_command(opts: &BackfillOptions) -> Result<(), BackfillCommandError> {
    let cfg = opts.config()?;
    let db_cfg = opts.db.db_config()?;
    db::prepare(&db_cfg).await?;
    let pool = db::connect(&db_cfg).await?;
    let cancel = CancellationToken::new();
    let _signals =
        crate::signals::install(cancel.clone()).map_err(BackfillCommandError::Signals)?;
    let progress = Arc::new(Progress::default());
    let done = CancellationToken::new();
    let bar = {
        let p = progress.clone();
        let started = Instant::now();
        crate::progress::spawn_with(done.clone(), !opts.no_progress, move || {
            message(&p, started)
        })
    };
    let result = backfill::backfill(pool, cfg, progress.clone(), cancel).await;
    done.cancel();
    let _ = bar.await;
    let report = result?;
    // Best effort: stderr going away is no reason to fail.
    let _ = write!(std::io::stderr(), "{}", summary(&report));
    Ok(())
}

fn message(p: &Progress, started: Instant) -> String {
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    let records = p.records.load(Ordering::Relaxed);
    format!(
        "repos {}/{} done ({} failed, {} inactive), {records} records ({:.0} records/s)",
        p.done.load(Ordering::Relaxed),
        p.listed.load(Ordering::Relaxed),
        p.failed.load(Ordering::Relaxed),
        p.inactive.load(Ordering::Relaxed),
        records as f64 / secs,
    )
}

/// The closing report: counts, then one line per repo given up.
pub fn summary(r: &Report) -> String {
    let mut out = format!(
        "backfill finished: {} repos listed, {} synchronized, {} inactive, {} failed\n",
        r.listed,
        r.done,
        r.inactive,
        r.failed.len()
    );
    for (did, reason) in &r.failed {
        out.push_str(&format!("  failed {did}: {reason}\n"));
    }
    out
}
