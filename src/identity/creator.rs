//! User creation: identity resolution under a semaphore, with a timeout per resolution;
//! failures give a stub user and a retry time with exponential backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tracing::debug;

use super::metrics::GaugeGuard;
use super::{Identity, IdentityConfig, IdentityError, Resolver};
use crate::metrics::{
    USER_CREATIONS_IN_FLIGHT as CREATIONS_IN_FLIGHT, USER_CREATIONS_WAITING as CREATIONS_WAITING,
    USER_CREATION_FAILURES_TOTAL as CREATION_FAILURES,
    USER_CREATION_WAIT_SECONDS as CREATION_WAIT_SECONDS,
};

/// Why a user was created as a stub.
#[derive(Debug)]
pub enum StubReason {
    /// Identity resolution is switched off (offline replay): no retry is scheduled.
    Disabled,
    /// Resolution failed or timed out.
    Failed(IdentityError),
}

/// Outcome of creating one user.
#[derive(Debug)]
pub enum Creation {
    /// The identity resolved: write it with [`super::store_resolved`].
    Resolved(Identity),
    /// Create the user as a stub (identity unresolved); resolve again after `retry_after`.
    Stub {
        /// The DID.
        did: String,
        /// Why.
        reason: StubReason,
        /// Consecutive failures including this one (0 when disabled).
        failures: u32,
        /// When to try again (`None` when resolution is disabled).
        retry_after: Option<Duration>,
    },
}

impl Creation {
    /// The DID this creation is about.
    pub fn did(&self) -> &str {
        match self {
            Self::Resolved(identity) => &identity.did,
            Self::Stub { did, .. } => did,
        }
    }

    /// Whether the user is created without a resolved identity.
    pub fn is_stub(&self) -> bool {
        matches!(self, Self::Stub { .. })
    }

    /// A stub whose identity will never resolve ([`IdentityError::is_final`]): not retried.
    pub fn is_given_up(&self) -> bool {
        matches!(
            self,
            Self::Stub {
                reason: StubReason::Failed(e),
                ..
            } if e.is_final()
        )
    }
}

/// Creates users: at most `concurrency` resolutions at once, waiting callers park on the
/// semaphore (no busy-waiting). Cheap to clone; clones share the permits and caches.
#[derive(Clone)]
pub struct UserCreator {
    resolver: Option<Arc<Resolver>>,
    permits: Arc<Semaphore>,
    config: Arc<IdentityConfig>,
}

impl std::fmt::Debug for UserCreator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserCreator")
            .field("enabled", &self.resolver.is_some())
            .field("concurrency", &self.config.concurrency)
            .field("available_permits", &self.permits.available_permits())
            .finish()
    }
}

impl UserCreator {
    /// A creator for `config`. With `resolve_identities` off, no client or resolver is built.
    pub fn new(config: IdentityConfig) -> Result<Self, IdentityError> {
        let resolver = if config.resolve_identities {
            Some(Arc::new(Resolver::new(config.clone())?))
        } else {
            None
        };
        Ok(Self {
            resolver,
            permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
            config: Arc::new(config),
        })
    }

    /// The shared resolver (`None` when resolution is switched off), e.g. to
    /// [`Resolver::invalidate`] on `#identity` events.
    pub fn resolver(&self) -> Option<&Arc<Resolver>> {
        self.resolver.as_ref()
    }

    /// Whether identities are resolved (off: every creation is a [`StubReason::Disabled`] stub).
    pub fn is_enabled(&self) -> bool {
        self.resolver.is_some()
    }

    /// Semaphore permits in total: the most resolutions at once.
    pub fn concurrency(&self) -> usize {
        self.config.concurrency.max(1)
    }

    /// Permits free right now.
    pub fn available_permits(&self) -> usize {
        self.permits.available_permits()
    }

    /// Stops handing out permits: waiting and later creations end at once as stubs.
    pub fn close(&self) {
        self.permits.close();
    }

    /// Resolves `did`'s identity; `prior_failures` is the actor's `resolve_failures` so far.
    /// Never fails: an identity that cannot be resolved gives a stub with a retry time.
    /// Spawns nothing: dropping the future (its task aborted) cancels the resolution in
    /// flight and gives its permit back, so the caller's task owns the whole resolution.
    pub async fn create(&self, did: &str, prior_failures: u32) -> Creation {
        let Some(resolver) = &self.resolver else {
            return Creation::Stub {
                did: did.to_owned(),
                reason: StubReason::Disabled,
                failures: 0,
                retry_after: None,
            };
        };
        let waiting = GaugeGuard::new(CREATIONS_WAITING);
        let started = Instant::now();
        let permit = self.permits.acquire().await;
        drop(waiting);
        metrics::histogram!(CREATION_WAIT_SECONDS).record(started.elapsed().as_secs_f64());
        let result = match permit {
            Ok(_permit) => {
                let _in_flight = GaugeGuard::new(CREATIONS_IN_FLIGHT);
                resolver.resolve(did).await
            }
            Err(_closed) => Err(IdentityError::ShuttingDown),
        };
        match result {
            Ok(identity) => Creation::Resolved(identity),
            Err(error) => {
                metrics::counter!(CREATION_FAILURES, "reason" => error.kind()).increment(1);
                let failures = prior_failures.saturating_add(1);
                let retry_after = self.config.retry_delay_after(&error, failures);
                debug!(did, %error, failures, ?retry_after, "identity unresolved: stub user");
                Creation::Stub {
                    did: did.to_owned(),
                    reason: StubReason::Failed(error),
                    failures,
                    retry_after: Some(retry_after),
                }
            }
        }
    }
}
