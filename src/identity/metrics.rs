//! Label values of the identity metrics and a gauge guard (metric names live in
//! [`crate::metrics`]).

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
