//! Errors of identity resolution.

/// Why a DID or handle could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Not a syntactically valid DID.
    #[error("invalid DID `{0}`")]
    InvalidDid(String),
    /// A DID method other than `plc` and `web`, or a `did:web` with a path.
    #[error("unsupported DID `{0}`: only did:plc and host-level did:web are resolved")]
    UnsupportedDid(String),
    /// The request could not be sent or its body not read.
    #[error("request to {url} failed: {source}")]
    Http {
        /// The URL requested.
        url: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered with an unexpected status.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The URL requested.
        url: String,
        /// The HTTP status code.
        status: u16,
    },
    /// The DID is unknown to its directory (404) or tombstoned (410).
    #[error("DID `{did}` not found (HTTP {status})")]
    NotFound {
        /// The DID.
        did: String,
        /// 404 or 410.
        status: u16,
    },
    /// The response body exceeded its size limit.
    #[error("{url}: response larger than {limit} bytes")]
    TooLarge {
        /// The URL requested.
        url: String,
        /// The limit in bytes.
        limit: usize,
    },
    /// The DID document is not a well-formed document.
    #[error("malformed DID document for `{did}`: {reason}")]
    Malformed {
        /// The DID resolved.
        did: String,
        /// What was wrong.
        reason: String,
    },
    /// The document describes another DID.
    #[error("DID document id `{found}` does not match the DID `{expected}`")]
    IdMismatch {
        /// The DID resolved.
        expected: String,
        /// The document's `id`.
        found: String,
    },
    /// DNS lookup failed (other than "no such record").
    #[error("DNS lookup of {name} failed: {reason}")]
    Dns {
        /// The name looked up.
        name: String,
        /// Resolver message.
        reason: String,
    },
    /// The DNS resolver could not be set up.
    #[error("DNS resolver setup failed: {0}")]
    DnsSetup(String),
    /// The HTTP client could not be built.
    #[error("HTTP client setup failed: {0}")]
    Client(#[source] reqwest::Error),
    /// User creation was shut down while this resolution waited for a permit.
    #[error("user creation is shutting down")]
    ShuttingDown,
    /// The whole resolution took longer than its timeout.
    #[error("identity resolution timed out after {0:?}")]
    Timeout(std::time::Duration),
    /// The URL, an address it resolved to, or a redirect is outside what may be fetched
    /// (see `netguard`; `--allow-private-network` lifts it).
    #[error("refused to fetch {url}: {reason}")]
    Refused {
        /// The URL requested.
        url: String,
        /// What the network guard refused.
        reason: String,
    },
}

impl IdentityError {
    /// A bounded label for metrics (`result` label of the resolutions counter).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidDid(_) | Self::UnsupportedDid(_) => "invalid_did",
            Self::Http { .. } | Self::Client(_) => "http_error",
            Self::Status { .. } => "http_status",
            Self::NotFound { .. } => "not_found",
            Self::TooLarge { .. } | Self::Malformed { .. } | Self::IdMismatch { .. } => "malformed",
            Self::Dns { .. } | Self::DnsSetup(_) => "dns_error",
            Self::Timeout(_) => "timeout",
            Self::ShuttingDown => "shutting_down",
            Self::Refused { .. } => "refused",
        }
    }

    /// Whether retrying is pointless for good: a DID that is not a DID, of a method we do
    /// not resolve, or tombstoned in its directory (HTTP 410). The actor is marked and the
    /// re-resolution job never tries it again; only a new `#identity` event for it does.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::InvalidDid(_) | Self::UnsupportedDid(_) | Self::NotFound { status: 410, .. }
        )
    }

    /// Whether retrying soon is pointless (the answer will not change without a new event).
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::InvalidDid(_)
                | Self::UnsupportedDid(_)
                | Self::NotFound { .. }
                | Self::Refused { .. }
        )
    }
}
