//! atproto-ingest: reads the AT Protocol firehose (`com.atproto.sync.subscribeRepos`) and
//! indexes it into PostgreSQL for an App View.
//!
//! Modules, in pipeline order:
//! - [`firehose`]: fixture files, frame decoding, CAR blocks, typed records.
//! - [`db`]: the runtime pool, migrations; [`txn`]: retrying, time-limited transactions.
//!
//! Operations:
//! - [`pool_monitor`]: pool utilization samples, warnings, gauges.
//! - [`jobs`]: leader-only cleanup of expired sessions and OAuth states.
//! - [`metrics`]: metric names and the Prometheus recorder; [`http`]: `/metrics`, `/healthz`,
//!   `/readyz`; [`notify`]: systemd readiness and watchdog.

pub mod db;
pub mod firehose;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod notify;
pub mod pool_monitor;
pub mod txn;
