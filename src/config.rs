//! Flags shared by several subcommands (database, batching), with env fallbacks, validated
//! once into typed configs. A bad value fails start-up with one line naming the flag, its env
//! variable and the value.

use std::time::Duration;

use crate::budget::{self, MemoryBudget};
use crate::cursor::CursorKey;
use crate::db::{self, DbConfig};
use crate::firehose::frame::DEFAULT_MAX_FRAME_BYTES;
use crate::firehose::limits::{self, CommitLimits};
use crate::pipeline::{self, PipelineConfig};
use crate::txn::{self, RetryPolicy};

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {flag} (env {env}) {problem}, got {value:?}")]
pub struct ConfigError {
    pub flag: &'static str,
    pub env: &'static str,
    pub problem: &'static str,
    pub value: String,
}

/// `Err(ConfigError)` naming `flag`/`env` unless `ok`.
pub(crate) fn check(
    ok: bool,
    flag: &'static str,
    env: &'static str,
    problem: &'static str,
    value: impl ToString,
) -> Result<(), ConfigError> {
    if ok {
        Ok(())
    } else {
        Err(ConfigError {
            flag,
            env,
            problem,
            value: value.to_string(),
        })
    }
}

/// PostgreSQL settings.
#[derive(Debug, Clone, clap::Args)]
pub struct DbArgs {
    /// PostgreSQL URL. The default is a local database, created on first use.
    #[arg(long, env = "DATABASE_URL", value_name = "URL", default_value = db::DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "DB_POOL_SIZE", value_name = "N", default_value_t = db::DEFAULT_POOL_SIZE)]
    pub db_pool_size: usize,
    /// `statement_timeout` set on every connection, in milliseconds.
    #[arg(long, env = "STATEMENT_TIMEOUT_MS", value_name = "MS", default_value_t = db::DEFAULT_STATEMENT_TIMEOUT.as_millis() as u64)]
    pub statement_timeout_ms: u64,
    /// Longest a task waits for a free connection, in milliseconds.
    #[arg(long, env = "DB_POOL_WAIT_MS", value_name = "MS", default_value_t = db::DEFAULT_POOL_WAIT.as_millis() as u64)]
    pub db_pool_wait_ms: u64,
    /// Limit on one batch transaction (statements + commit), in milliseconds. Also the
    /// connections' `idle_in_transaction_session_timeout`: a paused process's open transaction
    /// is ended by the server after this long, so its locks cannot block a new leader.
    #[arg(long, env = "TX_TIMEOUT_MS", value_name = "MS", default_value_t = txn::DEFAULT_TX_TIMEOUT.as_millis() as u64)]
    pub tx_timeout_ms: u64,
    /// Retries of a batch after a deadlock, serialization failure, timeout or lost
    /// connection (backoff 100, 200, 400 ms … with jitter); then the pipeline stops without
    /// advancing the cursor.
    #[arg(long, env = "DB_MAX_RETRIES", value_name = "N", default_value_t = txn::DEFAULT_MAX_RETRIES)]
    pub db_max_retries: u32,
}

impl DbArgs {
    pub fn db_config(&self) -> Result<DbConfig, ConfigError> {
        let cfg = DbConfig {
            url: self.database_url.clone(),
            pool_size: self.db_pool_size,
            statement_timeout: Duration::from_millis(self.statement_timeout_ms),
            pool_wait: Duration::from_millis(self.db_pool_wait_ms),
            // A transaction idle past its whole limit is abandoned: free its locks.
            idle_in_transaction_timeout: Duration::from_millis(self.tx_timeout_ms.max(1)),
        };
        check(
            cfg.pg_config().is_ok(),
            "--database-url",
            "DATABASE_URL",
            "is not a PostgreSQL URL (postgres://user@host:port/database)",
            db::redact_url(&self.database_url),
        )?;
        check(
            self.db_pool_size >= 1,
            "--db-pool-size",
            "DB_POOL_SIZE",
            "must be at least 1",
            self.db_pool_size,
        )?;
        check(
            self.statement_timeout_ms >= 1,
            "--statement-timeout-ms",
            "STATEMENT_TIMEOUT_MS",
            "must be at least 1",
            self.statement_timeout_ms,
        )?;
        check(
            self.db_pool_wait_ms >= 1,
            "--db-pool-wait-ms",
            "DB_POOL_WAIT_MS",
            "must be at least 1",
            self.db_pool_wait_ms,
        )?;
        Ok(cfg)
    }

    pub fn retry_policy(&self) -> Result<RetryPolicy, ConfigError> {
        check(
            self.tx_timeout_ms >= 1,
            "--tx-timeout-ms",
            "TX_TIMEOUT_MS",
            "must be at least 1",
            self.tx_timeout_ms,
        )?;
        check(
            self.db_max_retries <= 20,
            "--db-max-retries",
            "DB_MAX_RETRIES",
            "must be at most 20",
            self.db_max_retries,
        )?;
        Ok(RetryPolicy {
            max_retries: self.db_max_retries,
            tx_timeout: Duration::from_millis(self.tx_timeout_ms),
            ..RetryPolicy::default()
        })
    }
}

/// Batching and frame limits.
#[derive(Debug, Clone, clap::Args)]
pub struct BatchArgs {
    /// Flush a batch once it holds this many ops (rows to write).
    #[arg(long, env = "BATCH_MAX_OPS", value_name = "N", default_value_t = pipeline::DEFAULT_BATCH_MAX_OPS)]
    pub batch_max_ops: usize,
    /// Flush a batch once its first event is this old, in milliseconds.
    #[arg(long, env = "BATCH_MAX_AGE_MS", value_name = "MS", default_value_t = pipeline::DEFAULT_BATCH_MAX_AGE.as_millis() as u64)]
    pub batch_max_age_ms: u64,
    /// Frames longer than this are skipped and counted (`frames_malformed_total{reason="oversized"}`).
    #[arg(long, env = "MAX_FRAME_BYTES", value_name = "N", default_value_t = DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// A commit with more ops than this is skipped whole, counted
    /// (`commits_over_limit_total{reason="too_many_ops"}`) and its repo marked for resync.
    #[arg(long, env = "MAX_COMMIT_OPS", value_name = "N", default_value_t = limits::DEFAULT_MAX_COMMIT_OPS)]
    pub max_commit_ops: usize,
    /// A commit whose `blocks` is longer than this, or whose ops' records add up to more
    /// (counted once per op), is skipped the same way (`blocks_too_large`, `records_too_large`).
    #[arg(long, env = "MAX_COMMIT_BLOCKS_BYTES", value_name = "N", default_value_t = limits::DEFAULT_MAX_COMMIT_BLOCKS_BYTES)]
    pub max_commit_blocks_bytes: usize,
    /// A commit with a record block longer than this is skipped the same way
    /// (`record_too_large`).
    #[arg(long, env = "MAX_RECORD_BYTES", value_name = "N", default_value_t = limits::DEFAULT_MAX_RECORD_BYTES)]
    pub max_record_bytes: usize,
    /// Memory budget in MB (10^6 bytes, at least 64): every queue, the pending-op map and
    /// the caches are bounded in bytes by a fixed share of it (see the README). Set the
    /// systemd unit's `MemoryHigh`/`MemoryMax` to match.
    #[arg(long, env = "MEMORY_BUDGET_MB", value_name = "MB", default_value_t = budget::DEFAULT_MEMORY_BUDGET_MB)]
    pub memory_budget_mb: u64,
}

impl BatchArgs {
    /// A pipeline config with these limits (the caller sets the cursor key and users stage).
    pub fn pipeline_config(&self, db: &DbArgs) -> Result<PipelineConfig, ConfigError> {
        check(
            self.batch_max_ops >= 1,
            "--batch-max-ops",
            "BATCH_MAX_OPS",
            "must be at least 1",
            self.batch_max_ops,
        )?;
        check(
            self.batch_max_age_ms >= 1,
            "--batch-max-age-ms",
            "BATCH_MAX_AGE_MS",
            "must be at least 1",
            self.batch_max_age_ms,
        )?;
        check(
            self.max_frame_bytes >= 1024,
            "--max-frame-bytes",
            "MAX_FRAME_BYTES",
            "must be at least 1024",
            self.max_frame_bytes,
        )?;
        for (v, flag, env) in [
            (self.max_commit_ops, "--max-commit-ops", "MAX_COMMIT_OPS"),
            (
                self.max_commit_blocks_bytes,
                "--max-commit-blocks-bytes",
                "MAX_COMMIT_BLOCKS_BYTES",
            ),
            (
                self.max_record_bytes,
                "--max-record-bytes",
                "MAX_RECORD_BYTES",
            ),
        ] {
            check(v >= 1, flag, env, "must be at least 1", v)?;
        }
        check(
            self.memory_budget_mb >= budget::MIN_MEMORY_BUDGET_MB,
            "--memory-budget-mb",
            "MEMORY_BUDGET_MB",
            "must be at least 64",
            self.memory_budget_mb,
        )?;
        let mut cfg = PipelineConfig::new(CursorKey {
            service: String::new(),
            fence: 0,
        });
        cfg.batch_max_ops = self.batch_max_ops;
        cfg.batch_max_age = Duration::from_millis(self.batch_max_age_ms);
        cfg.max_frame_bytes = self.max_frame_bytes;
        cfg.limits = CommitLimits {
            max_ops: self.max_commit_ops,
            max_blocks_bytes: self.max_commit_blocks_bytes,
            max_record_bytes: self.max_record_bytes,
        };
        cfg.budget = MemoryBudget::from_mb(self.memory_budget_mb);
        cfg.retry = db.retry_policy()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        db: DbArgs,
        #[command(flatten)]
        batch: BatchArgs,
    }

    #[test]
    fn bad_values_are_named() {
        let t = T::try_parse_from(["t", "--db-pool-size", "0"]).unwrap();
        let e = t.db.db_config().unwrap_err().to_string();
        assert!(
            e.contains("--db-pool-size") && e.contains("DB_POOL_SIZE") && e.contains("\"0\""),
            "{e}"
        );
        let t = T::try_parse_from(["t", "--database-url", "nope://"]).unwrap();
        assert!(t
            .db
            .db_config()
            .unwrap_err()
            .to_string()
            .contains("DATABASE_URL"));
        let t = T::try_parse_from(["t", "--batch-max-ops", "0"]).unwrap();
        assert!(t
            .batch
            .pipeline_config(&t.db)
            .unwrap_err()
            .to_string()
            .contains("BATCH_MAX_OPS"));
        let t = T::try_parse_from(["t", "--max-commit-ops", "0"]).unwrap();
        assert!(t
            .batch
            .pipeline_config(&t.db)
            .unwrap_err()
            .to_string()
            .contains("MAX_COMMIT_OPS"));
        let t = T::try_parse_from(["t", "--memory-budget-mb", "10"]).unwrap();
        assert!(t
            .batch
            .pipeline_config(&t.db)
            .unwrap_err()
            .to_string()
            .contains("MEMORY_BUDGET_MB"));
        let t = T::try_parse_from(["t", "--max-record-bytes", "10"]).unwrap();
        assert_eq!(
            t.batch
                .pipeline_config(&t.db)
                .unwrap()
                .limits
                .max_record_bytes,
            10
        );
        let t = T::try_parse_from(["t"]).unwrap();
        assert!(t.db.db_config().is_ok() && t.batch.pipeline_config(&t.db).is_ok());
        assert_eq!(
            t.batch.pipeline_config(&t.db).unwrap().limits,
            CommitLimits::default()
        );
    }
}
