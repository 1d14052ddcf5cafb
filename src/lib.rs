//! atproto-ingest: reads the AT Protocol firehose (`com.atproto.sync.subscribeRepos`) and
//! indexes it into PostgreSQL for an App View.
//!
//! Modules, in pipeline order:
//! - [`firehose`]: fixture files, frame decoding, CAR blocks, typed records.
//! - [`pending`]: bounded LRU pending-op maps for ops of users not created yet.
//! - [`identity`]: DID/handle resolution with caches; user creation under a semaphore.

pub mod db;
pub mod firehose;
pub mod identity;
pub mod mapping;
pub mod pending;
pub mod pipeline;
pub mod replay;
pub mod writer;
