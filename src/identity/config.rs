//! Identity resolution settings, each with its default.

use std::time::Duration;

use super::IdentityError;
use crate::retry::{Backoff, Jitter};

/// PLC directory of the public network.
pub const DEFAULT_PLC_URL: &str = "https://plc.directory";
/// Where a `did:web` document lives; `{host}` is the DID's host.
pub const DEFAULT_DID_WEB_URL_TEMPLATE: &str = "https://{host}/.well-known/did.json";
/// Where a handle's HTTPS proof lives; `{handle}` is the handle.
pub const DEFAULT_HANDLE_HTTP_URL_TEMPLATE: &str = "https://{handle}/.well-known/atproto-did";
/// Concurrent resolutions: enough to keep up with new users, few enough not to hammer PLC.
pub const DEFAULT_CONCURRENCY: usize = 10;
/// Per-resolution timeout: a slow PDS must not hold a permit for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// DID documents change rarely, and `#identity` events invalidate them.
pub const DEFAULT_DOC_TTL: Duration = Duration::from_secs(3600);
/// ~100k documents of a few hundred bytes: tens of MiB at most.
pub const DEFAULT_DOC_CACHE_SIZE: usize = 100_000;
/// Verified handle → DID mappings, same lifetime as documents.
pub const DEFAULT_HANDLE_TTL: Duration = Duration::from_secs(3600);
/// Handles that did not resolve are retried sooner than verified ones expire.
pub const DEFAULT_HANDLE_NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// Same order as the document cache (one handle per DID).
pub const DEFAULT_HANDLE_CACHE_SIZE: usize = 100_000;
/// First retry of a failed resolution.
pub const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(60);
/// Retries never wait longer than a day.
pub const DEFAULT_RETRY_CAP: Duration = Duration::from_secs(24 * 3600);
/// DID documents are small; anything larger is not one.
pub const MAX_DOC_BYTES: usize = 64 * 1024;
/// An `atproto-did` body is one DID.
pub const MAX_HANDLE_BODY_BYTES: usize = 2 * 1024;

/// How identities are resolved. `Default` gives the production settings.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// Off: users are created at once as stubs, without any network (offline replay).
    pub resolve_identities: bool,
    /// PLC directory base URL (default [`DEFAULT_PLC_URL`]); `did:plc` resolves at `{plc_url}/{did}`.
    pub plc_url: String,
    /// URL of a `did:web` document, `{host}` replaced (default [`DEFAULT_DID_WEB_URL_TEMPLATE`]).
    pub did_web_url_template: String,
    /// URL of a handle's `atproto-did`, `{handle}` replaced
    /// (default [`DEFAULT_HANDLE_HTTP_URL_TEMPLATE`]).
    pub handle_http_url_template: String,
    /// Look handles up by DNS TXT `_atproto.<handle>` before HTTPS (default on).
    pub dns_txt: bool,
    /// Concurrent resolutions (semaphore permits, default [`DEFAULT_CONCURRENCY`]).
    pub concurrency: usize,
    /// Timeout of one resolution (default [`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
    /// DID document cache lifetime (default [`DEFAULT_DOC_TTL`]).
    pub doc_ttl: Duration,
    /// DID document cache bound (default [`DEFAULT_DOC_CACHE_SIZE`]).
    pub doc_cache_size: usize,
    /// Handle → DID cache lifetime (default [`DEFAULT_HANDLE_TTL`]).
    pub handle_ttl: Duration,
    /// Lifetime of a cached "handle does not resolve" (default [`DEFAULT_HANDLE_NEGATIVE_TTL`]).
    pub handle_negative_ttl: Duration,
    /// Handle → DID cache bound (default [`DEFAULT_HANDLE_CACHE_SIZE`]).
    pub handle_cache_size: usize,
    /// Bytes both caches hold together (¾ documents, ¼ handles); default: the identity-cache
    /// share of the default memory budget ([`crate::budget`]).
    pub cache_max_bytes: usize,
    /// First retry delay after a failure (default [`DEFAULT_RETRY_BASE`]), doubling.
    pub retry_base: Duration,
    /// Longest retry delay (default [`DEFAULT_RETRY_CAP`]).
    pub retry_cap: Duration,
    /// Let DID documents, handles and PDS endpoints point at loopback, private, link-local or
    /// multicast addresses, over plain http and across redirects to other hosts (tests, labs).
    /// Off by default: such hosts are chosen by whoever controls an account. The PLC directory
    /// and literal hosts of the URL templates are the operator's and always allowed.
    pub allow_private_network: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            resolve_identities: true,
            plc_url: DEFAULT_PLC_URL.to_owned(),
            did_web_url_template: DEFAULT_DID_WEB_URL_TEMPLATE.to_owned(),
            handle_http_url_template: DEFAULT_HANDLE_HTTP_URL_TEMPLATE.to_owned(),
            dns_txt: true,
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
            doc_ttl: DEFAULT_DOC_TTL,
            doc_cache_size: DEFAULT_DOC_CACHE_SIZE,
            handle_ttl: DEFAULT_HANDLE_TTL,
            handle_negative_ttl: DEFAULT_HANDLE_NEGATIVE_TTL,
            handle_cache_size: DEFAULT_HANDLE_CACHE_SIZE,
            cache_max_bytes: crate::budget::MemoryBudget::default().identity_caches(),
            retry_base: DEFAULT_RETRY_BASE,
            retry_cap: DEFAULT_RETRY_CAP,
            allow_private_network: false,
        }
    }
}

impl IdentityConfig {
    /// Delay before retry number `failures` (1 = first failure): base · 2^(failures-1), capped.
    pub fn retry_delay(&self, failures: u32) -> Duration {
        self.retry_backoff().delay(failures)
    }

    /// Delay before resolving again after `error`, the `failures`-th in a row: the backoff, or
    /// at once the longest delay ([`IdentityError::is_permanent`]: the answer will not change
    /// without a new event, and an `#identity` event refreshes a known actor anyway).
    pub fn retry_delay_after(&self, error: &IdentityError, failures: u32) -> Duration {
        if error.is_permanent() {
            self.retry_cap
        } else {
            self.retry_delay(failures)
        }
    }

    /// The re-resolution schedule as the crate's one [`Backoff`]: no jitter (the delay is
    /// written to `actors.next_resolve_at`), no bound on attempts (an unresolved actor is tried
    /// again at least every `retry_cap`).
    pub(crate) fn retry_backoff(&self) -> Backoff {
        Backoff {
            initial: self.retry_base,
            max: self.retry_cap,
            jitter: Jitter::None,
            max_attempts: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delay_doubles_and_caps() {
        let c = IdentityConfig::default();
        assert_eq!(c.retry_delay(0), DEFAULT_RETRY_BASE);
        assert_eq!(c.retry_delay(1), DEFAULT_RETRY_BASE);
        assert_eq!(c.retry_delay(2), DEFAULT_RETRY_BASE * 2);
        assert_eq!(c.retry_delay(5), DEFAULT_RETRY_BASE * 16);
        assert_eq!(c.retry_delay(12), DEFAULT_RETRY_CAP);
        assert_eq!(c.retry_delay(u32::MAX), DEFAULT_RETRY_CAP);
    }

    #[test]
    fn permanent_errors_wait_the_longest_delay() {
        let c = IdentityConfig::default();
        let not_found = IdentityError::NotFound {
            did: "did:plc:gone".into(),
            status: 410,
        };
        assert_eq!(c.retry_delay_after(&not_found, 1), DEFAULT_RETRY_CAP);
        let timeout = IdentityError::Timeout(Duration::from_secs(5));
        assert_eq!(c.retry_delay_after(&timeout, 1), DEFAULT_RETRY_BASE);
        assert_eq!(c.retry_delay_after(&timeout, 3), DEFAULT_RETRY_BASE * 4);
    }
}
