//! Why a resync failed: a bounded reason for metrics and `status`, and whether retrying with
//! backoff can help.

use crate::identity::IdentityError;
use crate::sync::VerifyError;
use crate::txn::TxError;
use crate::writer::WriteError;

/// Why one repo's resync failed.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    /// The DID document could not be resolved.
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    /// The DID document names no `#atproto_pds` service.
    #[error("the DID document names no PDS")]
    NoPds,
    /// The DID document has no usable `#atproto` signing key.
    #[error("no usable signing key: {0}")]
    NoSigningKey(String),
    /// The PDS answered an XRPC error for `getRepo` (`RepoNotFound`, `RepoDeactivated`, …).
    #[error("getRepo: {error} (HTTP {status}): {message}")]
    Xrpc {
        status: u16,
        error: String,
        message: String,
    },
    /// The PDS answered another HTTP status.
    #[error("getRepo: HTTP {0}")]
    Status(u16),
    /// The request failed (connection, TLS, reading the body).
    #[error("getRepo {url}: {reason}")]
    Http { url: String, reason: String },
    /// The network guard refused the PDS URL (private address, plain http, redirect).
    #[error("refused to fetch {url}: {reason}")]
    Refused { url: String, reason: String },
    /// No answer within the fetch timeout.
    #[error("getRepo timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The CAR is over the size cap.
    #[error("repo CAR larger than {0} bytes")]
    TooLarge(usize),
    /// The commit signature does not verify, even with a freshly resolved key.
    #[error("bad commit signature (also after refreshing the DID document)")]
    BadSignature,
    /// The CAR does not verify (blocks, MST, commit fields).
    #[error("repo CAR does not verify: {0}")]
    BadCar(VerifyError),
    /// The account is deleted here: its records stay purged.
    #[error("the account is deleted")]
    AccountDeleted,
    /// The CAR is older than the rev already applied (a stale PDS answer); try again later.
    #[error("the CAR's rev {car} is older than the stored rev {stored}")]
    Stale { car: String, stored: String },
    /// Writing the repo failed for good.
    #[error("writing the repo: {0}")]
    Write(#[from] TxError<WriteError>),
}

impl ResyncError {
    /// A bounded label (`result` of the resyncs counter).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Identity(e) if e.is_permanent() => "identity_not_found",
            Self::Identity(_) => "identity_error",
            Self::NoPds => "no_pds",
            Self::NoSigningKey(_) => "no_signing_key",
            Self::Xrpc { error, .. } => match error.as_str() {
                "RepoNotFound" => "repo_not_found",
                "RepoDeactivated" => "repo_deactivated",
                "RepoTakendown" => "repo_takendown",
                "RepoSuspended" => "repo_suspended",
                _ => "xrpc_error",
            },
            Self::Status(_) => "http_status",
            Self::Http { .. } => "http_error",
            Self::Refused { .. } => "refused",
            Self::Timeout(_) => "timeout",
            Self::TooLarge(_) => "too_large",
            Self::BadSignature => "bad_signature",
            Self::BadCar(_) => "bad_car",
            Self::AccountDeleted => "account_deleted",
            Self::Stale { .. } => "stale",
            Self::Write(e) if e.is_data_error() => "db_data_error",
            Self::Write(_) => "db_error",
        }
    }

    /// Whether retrying cannot help until something else changes (an account event, a new
    /// DID document): the repo leaves the queue, desynchronized, with this reason.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Identity(e) => e.is_permanent(),
            Self::Xrpc { error, .. } => matches!(
                error.as_str(),
                "RepoNotFound" | "RepoDeactivated" | "RepoTakendown" | "RepoSuspended"
            ),
            Self::NoPds
            | Self::NoSigningKey(_)
            | Self::TooLarge(_)
            | Self::BadSignature
            | Self::BadCar(_)
            | Self::AccountDeleted => true,
            // PostgreSQL refused what the repo holds (SQLSTATE class 22, 23 or 54: values the
            // sanitizer does not cover): the same CAR fails the same way, so fetching it again
            // every hour only costs the PDS and us. Other database errors are retried.
            Self::Write(e) => e.is_data_error(),
            Self::Status(_)
            | Self::Http { .. }
            | Self::Refused { .. }
            | Self::Timeout(_)
            | Self::Stale { .. } => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_error(sqlstate: &str) -> ResyncError {
        ResyncError::Write(TxError::Permanent {
            sqlstate: sqlstate.into(),
            attempts: 1,
            source: WriteError::Fenced {
                service: "s".into(),
                fence: 1,
            },
        })
    }

    #[test]
    fn a_repo_postgres_refuses_is_given_up_other_database_errors_are_retried() {
        for data in ["22P05", "23514", "54000"] {
            let e = write_error(data);
            assert!(e.is_permanent(), "{data}");
            assert_eq!(e.reason(), "db_data_error");
        }
        let e = write_error("42P01");
        assert!(!e.is_permanent());
        assert_eq!(e.reason(), "db_error");
        let timed_out = ResyncError::Write(TxError::TimedOut {
            limit: std::time::Duration::from_secs(1),
            attempts: 4,
        });
        assert!(!timed_out.is_permanent());
        assert_eq!(timed_out.reason(), "db_error");
    }
}
