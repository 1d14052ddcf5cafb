//! atproto-ingest: reads the AT Protocol firehose (`com.atproto.sync.subscribeRepos`) and
//! indexes it into PostgreSQL for an App View.
//!
//! Modules, in pipeline order:
//! - [`firehose`]: fixture files, frame decoding, CAR blocks, typed records, the live relay client.
//! - [`record`]: live relay → fixture file.
//! - [`testrelay`]: an in-process relay serving fixture frames, for tests and development.
//! - [`leader`]: Redis lease, renewal, fencing token.

pub mod firehose;
pub mod leader;
pub mod record;
pub mod testrelay;
