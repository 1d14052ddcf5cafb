//! atproto-ingest: reads the AT Protocol firehose (`com.atproto.sync.subscribeRepos`) and
//! indexes it into PostgreSQL for an App View.
//!
//! ```text
//! relay WebSocket ──frames──▶ decode ──events──▶ users ──▶ batcher ──▶ writer
//!  (or fixture file)         (CBOR+CAR,        (pending-op   (size or   (one Postgres tx per batch:
//!                             CID checks)        maps, user    age)       rows, derived tables,
//!                                                creation)                cursor)
//! ```
//!
//! `§N` in comments cites section N of `docs/design.md`, the contract this code is written
//! against (the cursor rule, fencing, the schema contract, who owns what).
//!
//! Modules, in pipeline order:
//! - [`firehose`]: fixture files, the live relay client, frame decoding, CAR blocks, typed records.
//! - [`pipeline`]: the stages and bounded channels between them; run statistics.
//! - [`pending`]: bounded LRU pending-op maps for ops of users not created yet.
//! - [`identity`]: DID/handle resolution with caches; user creation under a semaphore.
//! - [`mapping`]: record → row, pure functions.
//! - [`sync`]: Sync 1.1 verification: signing keys, commit signatures, MST proofs of
//!   `#commit` ops, `#sync` events and full repo CARs (pure; used by tests, benches, fuzz).
//! - [`writer`]: batch planning (collapse, idempotency) and bulk SQL in one transaction.
//! - [`cursor`]: the durable cursor: fence claim, cursor writes, the low-watermark rule.
//! - [`repos`]: repo sync state and the resync queue (§12); [`resync`]: the resync workers
//!   (`getRepo`, verification, the repo made equal to its CAR), held live events, and
//!   `backfill` (§13).
//! - [`db`]: the PostgreSQL pool, migrations, database creation; [`txn`]: retrying,
//!   time-limited transactions.
//! - [`replay`]: fixture files through the pipeline.
//! - [`record`]: live relay → fixture file.
//! - [`leader`]: Redis lease, renewal, fencing token.
//! - [`testrelay`]: an in-process relay serving fixture frames, for tests and development.
//!
//! Operating surface:
//! - [`cli`]: the command line (clap), one variant per subcommand.
//! - [`inspect`]: `inspect FILE`, frames as JSON lines; [`stats`]: its tallies.
//! - [`app`]: `run`, the daemon (leader election, live pipeline, operations tasks);
//!   [`tasks`]: the named-task registry every long-lived task is spawned through;
//!   [`signals`]: SIGTERM/SIGINT for `run`, `replay` and `record`; [`status`]: cursors and
//!   lease for operators; [`dead_letters`]: `dead-letters list|retry`, the events PostgreSQL
//!   refused (§6).
//!
//! Operations:
//! - [`pool_monitor`]: pool utilization samples, warnings, gauges.
//! - [`jobs`]: leader-only cleanup of expired sessions and OAuth states.
//! - [`metrics`]: metric names and the Prometheus recorder; [`http`]: `/metrics`, `/healthz`,
//!   `/readyz`; [`notify`]: systemd readiness and watchdog.
//! - [`tls`]: TLS to PostgreSQL (`sslmode`) and Redis (`rediss://`).

pub mod app;
pub mod budget;
pub mod cli;
pub mod config;
pub mod cursor;
pub mod db;
pub mod dead_letters;
pub mod firehose;
pub mod http;
pub mod identity;
pub mod inspect;
pub mod jobs;
pub mod leader;
pub mod mapping;
pub mod metrics;
pub mod notify;
pub mod pending;
pub mod pipeline;
pub mod pool_monitor;
pub mod progress;
pub mod record;
pub mod replay;
pub mod repos;
pub mod resync;
mod retry;
pub mod signals;
pub mod stats;
pub mod status;
pub mod sync;
pub mod tasks;
pub mod testrelay;
pub mod tls;
pub mod txn;
pub mod writer;
