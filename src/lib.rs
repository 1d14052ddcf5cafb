//! atproto-ingest: reads the AT Protocol firehose (`com.atproto.sync.subscribeRepos`) and
//! indexes it into PostgreSQL for an App View.
//!
//! Modules, in pipeline order:
//! - [`firehose`]: fixture files, frame decoding, CAR blocks, typed records.

pub mod db;
pub mod firehose;
pub mod mapping;
pub mod pipeline;
pub mod replay;
pub mod writer;
