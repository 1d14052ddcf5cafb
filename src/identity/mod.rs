//! Identity resolution (§5): DID documents (`did:plc`, `did:web`), handle verification
//! (DNS TXT, HTTPS), TTL/LRU caches, and user creation under a semaphore.
//!
//! - [`Resolver`]: DID → [`DidDocument`] → handle checked back → [`Identity`], cached.
//! - [`UserCreator`]: runs [`Resolver::resolve`] under a semaphore with a timeout; failure or
//!   timeout gives a [`Creation::Stub`] with a backoff retry time.
//! - `store`: the `actors` SQL of user creation and re-resolution ([`store_resolved`] /
//!   [`store_failure`] write an outcome).

mod cache;
pub mod config;
mod creator;
mod doc;
mod error;
pub(crate) mod fetch;
mod handle;
pub mod metrics;
pub(crate) mod netguard;
mod resolver;
pub(crate) mod store;

pub use cache::TtlCache;
pub use config::IdentityConfig;
pub use creator::{Creation, StubReason, UserCreator};
pub use doc::DidDocument;
pub use error::IdentityError;
pub use resolver::{Identity, Resolver};
pub use store::{store_failure, store_resolved, store_resolved_many};
