//! Integration tests, one binary (linked once): real PostgreSQL and Redis, a fresh database
//! (`#[sqlx::test]`) and Redis key prefix per test, servers on 127.0.0.1 port 0.
//!
//! Tests that read exact values from the process-global metrics recorder live in their own
//! binaries (`tests/metrics_scrape.rs`, `tests/pool_monitor.rs`): in-process daemons here
//! also record into it.

mod common;
mod live_common;
mod tls_common;

mod backfill;
mod backfill_group;
mod decode_fixtures;
mod decode_props;
mod deploy;
mod failover;
mod hostile_data;
mod http;
mod identity;
mod jobs;
mod leader;
mod limits;
mod live;
mod malformed;
mod netguard;
mod plans;
mod process;
mod relay_client;
mod relay_sanity;
mod replay;
mod repos;
mod resync;
mod stray_rows;
mod sync_verify;
mod takeover;
mod tls;
mod txn;
mod users;
mod verify;
mod verify_loads;
