//! Retrying, time-limited transactions (§6): [`run_tx`] runs a body in a transaction, retries
//! it on transient failures with backoff, and cancels it when it runs past its time limit.
//!
//! What is retried (at most [`RetryPolicy::max_retries`] times, backoff 100/200/400 ms ± 20 %):
//! - `40P01` deadlock and `40001` serialization failure;
//! - `57014` query cancelled — i.e. a statement that ran past `statement_timeout` (or a cancel
//!   by an operator): a slow statement is usually lock or I/O contention, so it is treated like
//!   a transient error and fails for good after the retries;
//! - lost connections (closed socket, I/O error, SQLSTATE class `08`, `57P01`–`57P03`, `53300`)
//!   and transient pool checkout failures (wait/create timeouts, server unreachable);
//! - the transaction timeout ([`RetryPolicy::tx_timeout`], body + commit): the running query is
//!   cancelled on the server, the connection is discarded (so a late cancel can never hit the
//!   next user of that connection; the server rolls back), and the attempt counts as one
//!   retryable failure. Set [`RetryPolicy::retry_on_timeout`] to `false` to fail at once.
//!
//! Everything else (constraint violations, syntax errors, …) fails on the first attempt. Of
//! those, a *data error* ([`TxError::is_data_error`]: SQLSTATE class `22`, `23` or `54`) is
//! caused by what the batch contains, not by the database: the write stage then splits the
//! batch to set the offending event aside (§6) instead of stopping. The
//! loop and the backoff are the crate's one retry helper, [`crate::retry`]; this module only
//! sorts failures into transient and permanent.
//! A connection lost *during COMMIT* leaves the outcome unknown; the retry re-runs the body,
//! which is safe because writer bodies are idempotent (§4).
//!
//! Cancellation stops waiting (pool checkout, backoff) but never interrupts a running
//! transaction, which `tx_timeout` bounds: pass a token that fires at the drain deadline.

use std::error::Error as StdError;
use std::time::{Duration, Instant};

use deadpool_postgres::{Object, Pool, PoolError, Transaction};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::retry::{self, Backoff, Jitter, RetryError};

/// Retries after the first attempt (§6: "at most 3 retries").
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// First backoff; doubles per retry: 100, 200, 400 ms (§6).
pub const DEFAULT_BASE_DELAY: Duration = Duration::from_millis(100);
/// Whole-transaction limit (§6 default 10 s).
pub const DEFAULT_TX_TIMEOUT: Duration = Duration::from_secs(10);
/// ± fraction of each backoff drawn at random, so colliding writers do not retry in lockstep.
pub const JITTER_FRACTION: f64 = 0.2;
/// How long sending a cancel request for a timed-out query may take.
const CANCEL_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How [`run_tx`] retries and times out.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub base_delay: Duration,
    pub tx_timeout: Duration,
    /// Whether a transaction that hit `tx_timeout` is retried (default `true`).
    pub retry_on_timeout: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: DEFAULT_MAX_RETRIES,
            base_delay: DEFAULT_BASE_DELAY,
            tx_timeout: DEFAULT_TX_TIMEOUT,
            retry_on_timeout: true,
        }
    }
}

impl RetryPolicy {
    /// Backoff before retry number `retry` (1-based): `base · 2^(retry-1)` ± [`JITTER_FRACTION`].
    pub fn delay(&self, retry: u32) -> Duration {
        self.backoff().delay(retry)
    }

    /// This policy as the crate's one [`Backoff`]: `max_retries + 1` attempts, no cap within
    /// them (the exponent stops growing at 2^16).
    pub(crate) fn backoff(&self) -> Backoff {
        Backoff {
            initial: self.base_delay,
            max: self.base_delay.saturating_mul(1 << 16),
            jitter: Jitter::Spread(JITTER_FRACTION),
            max_attempts: Some(self.max_retries.saturating_add(1)),
        }
    }
}

/// Why a transaction failed for good. `E` is the body's error type.
#[derive(Debug, thiserror::Error)]
pub enum TxError<E: StdError + 'static> {
    #[error("transaction gave up after {attempts} attempts: {reason} (SQLSTATE {sqlstate}) on each retry; last error: {source}")]
    RetriesExhausted {
        reason: &'static str,
        sqlstate: String,
        attempts: u32,
        #[source]
        source: E,
    },
    #[error("transaction failed with a permanent error (SQLSTATE {sqlstate}) on attempt {attempts}, not retried: {source}")]
    Permanent {
        sqlstate: String,
        attempts: u32,
        #[source]
        source: E,
    },
    #[error("transaction exceeded its {limit:?} time limit (attempt {attempts}); query cancelled and rolled back")]
    TimedOut { limit: Duration, attempts: u32 },
    #[error("no database connection after {attempts} attempts: {source}")]
    Pool {
        attempts: u32,
        #[source]
        source: PoolError,
    },
    #[error("transaction abandoned after {attempts} attempts: shutting down")]
    Cancelled { attempts: u32 },
}

impl<E: StdError + 'static> TxError<E> {
    /// Attempts made, the first one included.
    pub fn attempts(&self) -> u32 {
        match self {
            Self::RetriesExhausted { attempts, .. }
            | Self::Permanent { attempts, .. }
            | Self::TimedOut { attempts, .. }
            | Self::Pool { attempts, .. }
            | Self::Cancelled { attempts } => *attempts,
        }
    }

    /// Whether the transaction failed because of the data it wrote ([`is_data_sqlstate`]):
    /// never retried as it is, never a reason to stop the pipeline (§6).
    pub fn is_data_error(&self) -> bool {
        matches!(self, Self::Permanent { .. }) && self.sqlstate().is_some_and(is_data_sqlstate)
    }

    /// The SQLSTATE of the last database error, if there was one.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            Self::RetriesExhausted { sqlstate, .. } | Self::Permanent { sqlstate, .. } => {
                Some(sqlstate.as_str()).filter(|s| *s != NO_SQLSTATE)
            }
            _ => None,
        }
    }
}

const NO_SQLSTATE: &str = "none";

/// One failed attempt.
enum Failure<E> {
    Body(E),
    Pool(PoolError),
    Timeout,
    Cancelled,
}

/// Runs `body` in a transaction and commits, retrying per `policy` (see the module docs).
///
/// The body may run many statements; it may run more than once, so it must be idempotent and
/// must not keep state from a failed attempt. Its error type needs `From<tokio_postgres::Error>`;
/// the database error is found through `Error::source` (so wrap it with `#[from]`, not
/// `#[error(transparent)]`).
pub async fn run_tx<T, E, F>(
    pool: &Pool,
    policy: &RetryPolicy,
    cancel: &CancellationToken,
    mut body: F,
) -> Result<T, TxError<E>>
where
    F: AsyncFnMut(&Transaction<'_>) -> Result<T, E>,
    E: StdError + From<tokio_postgres::Error> + 'static,
{
    let backoff = policy.backoff();
    let result = retry::retry(
        &backoff,
        cancel,
        async |attempts| match attempt(pool, policy, cancel, &mut body).await {
            Ok(v) => Ok(v),
            Err(f) => Err(classify(f, attempts, policy)),
        },
        |f| !f.retryable,
        |f, attempts, delay| {
            tracing::warn!(
                attempt = attempts,
                max_retries = policy.max_retries,
                cause = %f.label,
                delay_ms = delay.as_millis() as u64,
                error = %f.error,
                "transaction failed with a transient error; retrying"
            );
            metrics::counter!(m::DB_RETRIES_TOTAL, "sqlstate" => f.label.clone()).increment(1);
        },
    )
    .await;
    match result {
        Ok(v) => Ok(v),
        Err(RetryError::Permanent { error: f, .. } | RetryError::Exhausted { error: f, .. }) => {
            Err(fail(reason_of(&f.error), f.error))
        }
        Err(RetryError::Cancelled { attempts, .. }) => {
            Err(fail("cancelled", TxError::Cancelled { attempts }))
        }
    }
}

/// A failed attempt as the retry loop sees it: the error it would end with, whether it may be
/// retried, and the `sqlstate` label of the retries counter.
struct Failed<E: StdError + 'static> {
    error: TxError<E>,
    retryable: bool,
    label: String,
}

/// Sorts one failure into permanent or transient (see the module docs).
fn classify<E: StdError + 'static>(
    failure: Failure<E>,
    attempts: u32,
    policy: &RetryPolicy,
) -> Failed<E> {
    let (retryable, label, error) = match failure {
        Failure::Cancelled => (
            false,
            "cancelled".to_owned(),
            TxError::Cancelled { attempts },
        ),
        Failure::Timeout => {
            m_counter(m::DB_TX_TIMEOUTS_TOTAL);
            let e = TxError::TimedOut {
                limit: policy.tx_timeout,
                attempts,
            };
            (policy.retry_on_timeout, "tx_timeout".to_owned(), e)
        }
        Failure::Pool(source) => (
            pool_error_is_transient(&source),
            "pool".to_owned(),
            TxError::Pool { attempts, source },
        ),
        Failure::Body(source) => {
            let pg = find_pg_error(&source);
            let sqlstate = pg
                .and_then(|e| e.code())
                .map_or(NO_SQLSTATE, |c| c.code())
                .to_owned();
            match pg.and_then(transient_reason) {
                Some(reason) => {
                    let label = match sqlstate.as_str() {
                        NO_SQLSTATE => "connection".to_owned(),
                        s => s.to_owned(),
                    };
                    let e = TxError::RetriesExhausted {
                        reason,
                        sqlstate,
                        attempts,
                        source,
                    };
                    (true, label, e)
                }
                None => {
                    let e = TxError::Permanent {
                        sqlstate,
                        attempts,
                        source,
                    };
                    (false, "permanent".to_owned(), e)
                }
            }
        }
    };
    Failed {
        error,
        retryable,
        label,
    }
}

async fn attempt<T, E, F>(
    pool: &Pool,
    policy: &RetryPolicy,
    cancel: &CancellationToken,
    body: &mut F,
) -> Result<T, Failure<E>>
where
    F: AsyncFnMut(&Transaction<'_>) -> Result<T, E>,
    E: From<tokio_postgres::Error>,
{
    let mut client = tokio::select! {
        _ = cancel.cancelled() => return Err(Failure::Cancelled),
        c = pool.get() => c.map_err(Failure::Pool)?,
    };
    let cancel_token = client.cancel_token();
    let started = Instant::now();
    let run = async {
        let tx = client.transaction().await.map_err(E::from)?;
        let value = body(&tx).await?;
        tx.commit().await.map_err(E::from)?;
        Ok::<T, E>(value)
    };
    let result = tokio::time::timeout(policy.tx_timeout, run).await;
    let outcome = match &result {
        Ok(Ok(_)) => "commit",
        Ok(Err(_)) => "rollback",
        Err(_) => "timeout",
    };
    metrics::histogram!(m::DB_TX_SECONDS, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure::Body(e)),
        Err(_elapsed) => {
            // The dropped transaction queued a ROLLBACK behind the running query: cancel the
            // query, then close the connection so the cancel cannot reach a later user of it.
            match tokio::time::timeout(CANCEL_REQUEST_TIMEOUT, cancel_token.cancel_query(NoTls))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "could not cancel a timed-out query"),
                Err(_) => tracing::warn!("cancel request for a timed-out query timed out"),
            }
            drop(Object::take(client));
            Err(Failure::Timeout)
        }
    }
}

fn fail<E: StdError + 'static>(reason: &'static str, e: TxError<E>) -> TxError<E> {
    metrics::counter!(m::DB_TX_FAILURES_TOTAL, "reason" => reason).increment(1);
    e
}

fn m_counter(name: &'static str) {
    metrics::counter!(name).increment(1);
}

fn reason_of<E: StdError + 'static>(e: &TxError<E>) -> &'static str {
    match e {
        TxError::RetriesExhausted { reason, .. } => reason,
        TxError::Permanent { .. } if e.is_data_error() => "data",
        TxError::Permanent { .. } => "permanent",
        TxError::TimedOut { .. } => "tx_timeout",
        TxError::Pool { .. } => "pool",
        TxError::Cancelled { .. } => "cancelled",
    }
}

/// The first `tokio_postgres::Error` in `e`'s source chain (`e` itself included).
pub fn find_pg_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a tokio_postgres::Error> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(pg) = c.downcast_ref::<tokio_postgres::Error>() {
            return Some(pg);
        }
        cur = c.source();
    }
    None
}

/// SQLSTATE classes of errors a batch's data causes: `22` data exception (U+0000 in text, a
/// value out of range, …), `23` integrity constraint violation (the writer's statements expect
/// none: every insert is `ON CONFLICT`), `54` program limit exceeded (an index row too large).
pub const DATA_ERROR_CLASSES: [&str; 3] = ["22", "23", "54"];

/// Whether `sqlstate` is in one of the [`DATA_ERROR_CLASSES`].
pub fn is_data_sqlstate(sqlstate: &str) -> bool {
    DATA_ERROR_CLASSES
        .iter()
        .any(|class| sqlstate.len() == 5 && sqlstate.starts_with(class))
}

/// `Some(reason)` when the error is worth retrying, with the reason used in metrics and logs.
pub fn transient_reason(e: &tokio_postgres::Error) -> Option<&'static str> {
    let Some(code) = e.code() else {
        // No SQLSTATE: closed socket, I/O error, or a protocol-level failure.
        return (e.is_closed() || has_io_source(e)).then_some("connection");
    };
    if *code == SqlState::T_R_DEADLOCK_DETECTED {
        Some("deadlock")
    } else if *code == SqlState::T_R_SERIALIZATION_FAILURE {
        Some("serialization")
    } else if *code == SqlState::QUERY_CANCELED {
        Some("statement_timeout")
    } else if is_connection_state(code) {
        Some("connection")
    } else {
        None
    }
}

/// Class 08 (connection exception), server shutdown/start-up, too many connections.
fn is_connection_state(code: &SqlState) -> bool {
    code.code().starts_with("08")
        || *code == SqlState::ADMIN_SHUTDOWN
        || *code == SqlState::CRASH_SHUTDOWN
        || *code == SqlState::CANNOT_CONNECT_NOW
        || *code == SqlState::TOO_MANY_CONNECTIONS
}

fn has_io_source(e: &tokio_postgres::Error) -> bool {
    let mut cur = e.source();
    while let Some(c) = cur {
        if c.is::<std::io::Error>() {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Wait/create timeouts and an unreachable server are transient; a closed pool, bad
/// credentials or a missing database are not.
pub fn pool_error_is_transient(e: &PoolError) -> bool {
    match e {
        PoolError::Timeout(_) => true,
        PoolError::Backend(pg) => match pg.code() {
            None => true,
            Some(code) => is_connection_state(code),
        },
        PoolError::Closed | PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter() {
        let p = RetryPolicy::default();
        for (retry, ms) in [(1, 100.0), (2, 200.0), (3, 400.0)] {
            for _ in 0..50 {
                let d = p.delay(retry).as_secs_f64() * 1000.0;
                assert!(
                    d >= ms * 0.8 - 0.001 && d <= ms * 1.2 + 0.001,
                    "{retry}: {d}"
                );
            }
        }
    }

    #[test]
    fn data_errors_are_classes_22_23_54() {
        for s in [
            "22021", "22P05", "22008", "23514", "23505", "54000", "54001",
        ] {
            assert!(is_data_sqlstate(s), "{s}");
        }
        for s in [
            "40P01", "40001", "57014", "08006", "42P01", "XX000", "22", "",
        ] {
            assert!(!is_data_sqlstate(s), "{s}");
        }
    }

    #[test]
    fn defaults_match_the_design() {
        let p = RetryPolicy::default();
        assert_eq!(p.max_retries, 3);
        assert_eq!(p.tx_timeout, Duration::from_secs(10));
        assert!(pool_error_is_transient(&PoolError::Timeout(
            deadpool_postgres::TimeoutType::Wait
        )));
        assert!(!pool_error_is_transient(&PoolError::Closed));
    }
}
