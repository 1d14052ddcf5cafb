//! Identity resolution with caches: DID → document, then the claimed handle back to the DID.

use std::time::Instant;

use tracing::debug;

use super::cache::TtlCache;
use super::config::MAX_DOC_BYTES;
use super::fetch::{did_document_url, get_bounded};
use super::handle::HandleResolver;
use super::metrics::{CACHE_DID_DOC, CACHE_HANDLE};
use super::netguard::NetPolicy;
use super::{DidDocument, IdentityConfig, IdentityError};
use crate::metrics::{
    IDENTITY_HANDLE_CHECKS_TOTAL as HANDLE_CHECKS, IDENTITY_RESOLUTIONS_TOTAL as RESOLUTIONS,
    IDENTITY_RESOLUTION_SECONDS as RESOLUTION_SECONDS,
};

/// A resolved identity, ready to be written to `actors`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The DID.
    pub did: String,
    /// The handle the document claims (kept even when it does not verify).
    pub handle: Option<String>,
    /// Whether the handle resolves back to the DID (App View convention: store the claimed
    /// handle, flagged invalid, rather than dropping it).
    pub handle_valid: bool,
    /// The account's PDS.
    pub pds_endpoint: Option<String>,
    /// The `#atproto` signing key (multibase).
    pub signing_key: Option<String>,
}

/// Resolves DIDs and handles over HTTP(S)/DNS, caching both directions.
pub struct Resolver {
    config: IdentityConfig,
    client: reqwest::Client,
    policy: NetPolicy,
    handles: HandleResolver,
    docs: TtlCache<String, DidDocument>,
    handle_dids: TtlCache<String, Option<String>>,
}

impl Resolver {
    /// A resolver for `config` (builds the HTTP client and, if enabled, the DNS resolver).
    pub fn new(config: IdentityConfig) -> Result<Self, IdentityError> {
        let policy = NetPolicy::for_config(&config);
        // `resolve` enforces `config.timeout` over the whole resolution.
        let client = policy.client(config.timeout)?;
        Ok(Self {
            policy,
            handles: HandleResolver::new(&config)?,
            // The two caches share the byte bound: documents weigh most.
            docs: TtlCache::new(
                config.doc_cache_size,
                config.cache_max_bytes / 4 * 3,
                CACHE_DID_DOC,
            ),
            handle_dids: TtlCache::new(
                config.handle_cache_size,
                config.cache_max_bytes / 4,
                CACHE_HANDLE,
            ),
            config,
            client,
        })
    }

    /// The settings in force.
    pub fn config(&self) -> &IdentityConfig {
        &self.config
    }

    /// Resolves `did` and verifies its handle, within the configured timeout.
    /// Counts the outcome and records its duration.
    pub async fn resolve(&self, did: &str) -> Result<Identity, IdentityError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.config.timeout, self.resolve_inner(did)).await
        {
            Ok(r) => r,
            Err(_) => Err(IdentityError::Timeout(self.config.timeout)),
        };
        metrics::histogram!(RESOLUTION_SECONDS).record(started.elapsed().as_secs_f64());
        let label = result.as_ref().map_or_else(IdentityError::kind, |_| "ok");
        metrics::counter!(RESOLUTIONS, "result" => label).increment(1);
        result
    }

    async fn resolve_inner(&self, did: &str) -> Result<Identity, IdentityError> {
        let doc = self.resolve_did(did).await?;
        let handle_valid = match &doc.handle {
            Some(handle) => self.resolve_handle(handle).await.as_deref() == Some(did),
            None => false,
        };
        if doc.handle.is_some() {
            let valid = if handle_valid { "true" } else { "false" };
            metrics::counter!(HANDLE_CHECKS, "valid" => valid).increment(1);
        }
        Ok(Identity {
            did: doc.did,
            handle: doc.handle,
            handle_valid,
            pds_endpoint: doc.pds_endpoint,
            signing_key: doc.signing_key,
        })
    }

    /// `did`'s document, from the cache or its directory / host (no timeout of its own
    /// beyond the HTTP client's).
    pub async fn resolve_did(&self, did: &str) -> Result<DidDocument, IdentityError> {
        let key = did.to_owned();
        if let Some(doc) = self.docs.get(&key) {
            return Ok(doc);
        }
        let url = did_document_url(&self.config, did)?;
        let body = get_bounded(&self.client, &self.policy, &url, did, MAX_DOC_BYTES).await?;
        let doc = DidDocument::parse(did, &body)?;
        self.docs.insert(key, doc.clone(), self.config.doc_ttl);
        Ok(doc)
    }

    /// The DID `handle` points to, from the cache, DNS or HTTPS; `None` if it points nowhere
    /// (failures are cached for the shorter negative TTL).
    pub async fn resolve_handle(&self, handle: &str) -> Option<String> {
        let key = handle.to_ascii_lowercase();
        if let Some(found) = self.handle_dids.get(&key) {
            return found;
        }
        let found = match self
            .handles
            .resolve(&self.client, &self.policy, &self.config, &key)
            .await
        {
            Ok(found) => found,
            Err(error) => {
                debug!(handle = %key, %error, "handle did not resolve");
                None
            }
        };
        let ttl = if found.is_some() {
            self.config.handle_ttl
        } else {
            self.config.handle_negative_ttl
        };
        self.handle_dids.insert(key, found.clone(), ttl);
        found
    }

    /// Forgets `did`'s document and the handle it claimed (on `#identity` events), so the next
    /// resolution asks again.
    pub fn invalidate(&self, did: &str) {
        if let Some(doc) = self.docs.remove(&did.to_owned()) {
            if let Some(handle) = doc.handle {
                self.handle_dids.remove(&handle);
            }
        }
    }

    /// Forgets a handle's DID (e.g. an `#identity` event naming a new handle).
    pub fn invalidate_handle(&self, handle: &str) {
        self.handle_dids.remove(&handle.to_ascii_lowercase());
    }

    /// Entries in the (DID document, handle) caches.
    pub fn cache_sizes(&self) -> (usize, usize) {
        (self.docs.len(), self.handle_dids.len())
    }
}
