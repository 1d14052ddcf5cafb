//! atproto-ingest: reads the AT Protocol firehose (`com.atproto.sync.subscribeRepos`) and
//! indexes it into PostgreSQL for an App View.
//!
//! Modules, in pipeline order:
//! - [`cli`]: the command line (clap), one variant per subcommand.
//! - [`firehose`]: fixture files, frame decoding, CAR blocks, typed records.
//! - [`inspect`]: `inspect FILE`, frames as JSON lines.
//! - [`stats`]: tallies of events, ops, invalid records and skipped frames.

pub mod cli;
pub mod firehose;
pub mod inspect;
pub mod stats;
