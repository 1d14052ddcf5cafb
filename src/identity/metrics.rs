//! Metric names of identity resolution and user creation (labels are bounded).

/// Counter `{cache}`: cache lookups answered from the cache.
pub const CACHE_HITS: &str = "atproto_ingest_identity_cache_hits_total";
/// Counter `{cache}`: cache lookups that had to resolve.
pub const CACHE_MISSES: &str = "atproto_ingest_identity_cache_misses_total";
/// Gauge `{cache}`: entries held by a cache.
pub const CACHE_ENTRIES: &str = "atproto_ingest_identity_cache_entries";
/// Counter `{result}`: identity resolutions by outcome (`ok` or an error kind).
pub const RESOLUTIONS: &str = "atproto_ingest_identity_resolutions_total";
/// Histogram: duration of one identity resolution (DID document + handle check).
pub const RESOLUTION_SECONDS: &str = "atproto_ingest_identity_resolution_seconds";
/// Counter `{valid}`: handle verifications by outcome (`true` / `false`).
pub const HANDLE_CHECKS: &str = "atproto_ingest_identity_handle_checks_total";
/// Gauge: user creations holding a semaphore permit.
pub const CREATIONS_IN_FLIGHT: &str = "atproto_ingest_user_creations_in_flight";
/// Gauge: user creations waiting for a permit.
pub const CREATIONS_WAITING: &str = "atproto_ingest_user_creations_waiting";
/// Counter `{reason}`: user creations that ended as a stub.
pub const CREATION_FAILURES: &str = "atproto_ingest_user_creation_failures_total";
/// Histogram: time a user creation waited for a permit.
pub const CREATION_WAIT_SECONDS: &str = "atproto_ingest_user_creation_wait_seconds";

/// `cache` label of the DID → document cache.
pub const CACHE_DID_DOC: &str = "did_doc";
/// `cache` label of the handle → DID cache.
pub const CACHE_HANDLE: &str = "handle";

/// Increments a gauge for as long as it lives (decrements on drop, also on cancellation).
pub(crate) struct GaugeGuard(&'static str);

impl GaugeGuard {
    pub(crate) fn new(name: &'static str) -> Self {
        metrics::gauge!(name).increment(1.0);
        Self(name)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        metrics::gauge!(self.0).decrement(1.0);
    }
}
