//! Metric names (one place, all `atproto_ingest_*`), their descriptions, and the Prometheus
//! recorder (`install`) whose handle `/metrics` renders.
//!
//! Naming: counters end in `_total`, units are in the name (`_seconds`, `_bytes`, `_ratio`),
//! labels are bounded (never a DID or URI).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

// --- Firehose input (§3) ---
/// Events received, by `type` (`commit`, `identity`, `account`, `sync`, `info`, `error`, `unknown`).
pub const EVENTS_TOTAL: &str = "atproto_ingest_events_total";
/// Record ops decoded, by `action` (`create`/`update`/`delete`) and `collection` (known NSIDs, else `other`).
pub const OPS_TOTAL: &str = "atproto_ingest_ops_total";
/// Frames skipped as malformed or oversized, by `reason`.
pub const FRAMES_MALFORMED_TOTAL: &str = "atproto_ingest_frames_malformed_total";
/// Records of a known collection that failed lexicon checks, by `collection`.
pub const RECORDS_INVALID_TOTAL: &str = "atproto_ingest_records_invalid_total";
/// Record ops skipped because their block was missing or did not hash to its CID.
pub const BLOCKS_MISMATCHED_TOTAL: &str = "atproto_ingest_blocks_mismatched_total";
/// `tooBig` commits seen (the repo is marked for resync).
pub const COMMITS_TOO_BIG_TOTAL: &str = "atproto_ingest_commits_too_big_total";
/// Relay reconnect attempts, by `reason`.
pub const RECONNECTS_TOTAL: &str = "atproto_ingest_reconnects_total";
/// Seconds between an event's commit time and now, at the time it was applied.
pub const LAG_SECONDS: &str = "atproto_ingest_lag_seconds";
/// Events between the last seq received and the durable cursor.
pub const LAG_SEQ: &str = "atproto_ingest_lag_seq";
/// Durable cursor: the last seq committed with its rows.
pub const CURSOR_SEQ: &str = "atproto_ingest_cursor_seq";

// --- Pending-op maps and users (§5) ---
/// DIDs waiting in the pending-op map.
pub const PENDING_DIDS: &str = "atproto_ingest_pending_dids";
/// Ops waiting in the pending-op map (all DIDs).
pub const PENDING_OPS: &str = "atproto_ingest_pending_ops";
/// DIDs evicted from the pending map at its bound (flushed with a stub user).
pub const PENDING_EVICTIONS_TOTAL: &str = "atproto_ingest_pending_evictions_total";
/// DIDs that hit the per-DID op bound (flushed with a stub user).
pub const PENDING_OVERFLOWS_TOTAL: &str = "atproto_ingest_pending_overflows_total";
/// Identity resolutions, by `outcome` (`ok`, `failed`, `timeout`, `cached`).
pub const IDENTITY_RESOLUTIONS_TOTAL: &str = "atproto_ingest_identity_resolutions_total";

// --- Writer (§6) ---
/// Rows per flushed batch.
pub const BATCH_ROWS: &str = "atproto_ingest_batch_rows";
/// Seconds from a batch's flush start to its commit.
pub const BATCH_FLUSH_SECONDS: &str = "atproto_ingest_batch_flush_seconds";
/// Rows written, by `table`.
pub const ROWS_WRITTEN_TOTAL: &str = "atproto_ingest_rows_written_total";
/// Transaction retries, by `sqlstate` (`40P01`, `40001`, `57014`, …, or `connection`, `pool`, `tx_timeout`).
pub const DB_RETRIES_TOTAL: &str = "atproto_ingest_db_retries_total";
/// Transactions that failed for good, by `reason` (`deadlock`, `serialization`, `statement_timeout`, `connection`, `pool`, `tx_timeout`, `permanent`, `cancelled`).
pub const DB_TX_FAILURES_TOTAL: &str = "atproto_ingest_db_tx_failures_total";
/// Transaction attempts that ran past the transaction timeout (query cancelled, rolled back).
pub const DB_TX_TIMEOUTS_TOTAL: &str = "atproto_ingest_db_tx_timeouts_total";
/// Seconds per transaction attempt (begin to commit or rollback), by `outcome`.
pub const DB_TX_SECONDS: &str = "atproto_ingest_db_tx_seconds";

// --- Pool monitor (§8) ---
/// Connections open in the pool.
pub const DB_POOL_SIZE: &str = "atproto_ingest_db_pool_size";
/// Maximum connections the pool may open.
pub const DB_POOL_MAX: &str = "atproto_ingest_db_pool_max";
/// Connections checked out.
pub const DB_POOL_IN_USE: &str = "atproto_ingest_db_pool_in_use";
/// Connections open and idle.
pub const DB_POOL_IDLE: &str = "atproto_ingest_db_pool_idle";
/// Tasks waiting for a connection.
pub const DB_POOL_WAITING: &str = "atproto_ingest_db_pool_waiting";
/// In use / max, last sample.
pub const DB_POOL_UTILIZATION_RATIO: &str = "atproto_ingest_db_pool_utilization_ratio";
/// In use / max, averaged over the last `window` samples (`5`, `100`).
pub const DB_POOL_UTILIZATION_AVG_RATIO: &str = "atproto_ingest_db_pool_utilization_avg_ratio";

// --- Background jobs (§8) ---
/// Job runs, by `job` and `outcome` (`ok`, `error`).
pub const JOB_RUNS_TOTAL: &str = "atproto_ingest_job_runs_total";
/// Rows removed by jobs, by `job`.
pub const JOB_ROWS_DELETED_TOTAL: &str = "atproto_ingest_job_rows_deleted_total";
/// Seconds per job run, by `job`.
pub const JOB_SECONDS: &str = "atproto_ingest_job_seconds";

// --- Leader election and lifecycle (§7, §8) ---
/// 1 while this instance holds the lease, else 0.
pub const LEADER: &str = "atproto_ingest_leader";
/// Lease acquisitions and losses, by `event` (`acquired`, `lost`, `released`).
pub const LEADER_TRANSITIONS_TOTAL: &str = "atproto_ingest_leader_transitions_total";
/// Seconds a stage spent blocked on a full downstream channel, by `stage`.
pub const STAGE_BLOCKED_SECONDS_TOTAL: &str = "atproto_ingest_stage_blocked_seconds_total";

/// Latency buckets (seconds): 1 ms … 30 s covers a statement up to the statement timeout.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Batch-size buckets (rows): batches past 5–10 k rows gain nothing (§6), so 25 k is the top.
const ROWS_BUCKETS: &[f64] = &[
    1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 25000.0,
];
/// How often histogram buckets are drained; the exporter docs ask for periodic upkeep.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the global `metrics` recorder (once per process; later
/// calls return the same handle) and describes every metric.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = builder().build_recorder();
            let handle = recorder.handle();
            if let Err(e) = metrics::set_global_recorder(recorder) {
                // Another recorder was installed first: /metrics renders, but stays empty.
                tracing::warn!(error = %e, "a metrics recorder was already installed");
            }
            describe();
            handle
        })
        .clone()
}

fn builder() -> PrometheusBuilder {
    let with_buckets = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(BATCH_ROWS.to_owned()), ROWS_BUCKETS));
    // Only an empty bucket list fails, and ours are non-empty constants; summaries otherwise.
    with_buckets.unwrap_or_else(|e| {
        tracing::warn!(error = %e, "histogram buckets rejected; exporting summaries");
        PrometheusBuilder::new()
    })
}

/// Runs `handle.run_upkeep()` every [`UPKEEP_INTERVAL`] until `cancel`.
pub async fn run_upkeep(handle: PrometheusHandle, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

fn describe() {
    let counters: &[(&'static str, &'static str)] = &[
        (EVENTS_TOTAL, "Firehose events received, by type."),
        (OPS_TOTAL, "Record ops decoded, by action and collection."),
        (
            FRAMES_MALFORMED_TOTAL,
            "Frames skipped as malformed or oversized, by reason.",
        ),
        (
            RECORDS_INVALID_TOTAL,
            "Records failing lexicon checks, by collection.",
        ),
        (
            BLOCKS_MISMATCHED_TOTAL,
            "Record ops skipped: block missing or CID mismatch.",
        ),
        (
            COMMITS_TOO_BIG_TOTAL,
            "tooBig commits (repo marked for resync).",
        ),
        (RECONNECTS_TOTAL, "Relay reconnect attempts, by reason."),
        (
            PENDING_EVICTIONS_TOTAL,
            "DIDs evicted from the pending-op map.",
        ),
        (
            PENDING_OVERFLOWS_TOTAL,
            "DIDs that hit the per-DID pending op bound.",
        ),
        (
            IDENTITY_RESOLUTIONS_TOTAL,
            "Identity resolutions, by outcome.",
        ),
        (ROWS_WRITTEN_TOTAL, "Rows written, by table."),
        (
            DB_RETRIES_TOTAL,
            "Transaction retries, by SQLSTATE or cause.",
        ),
        (
            DB_TX_FAILURES_TOTAL,
            "Transactions that failed for good, by reason.",
        ),
        (
            DB_TX_TIMEOUTS_TOTAL,
            "Transaction attempts cancelled at the transaction timeout.",
        ),
        (JOB_RUNS_TOTAL, "Background job runs, by job and outcome."),
        (
            JOB_ROWS_DELETED_TOTAL,
            "Rows deleted by background jobs, by job.",
        ),
        (
            LEADER_TRANSITIONS_TOTAL,
            "Leader lease transitions, by event.",
        ),
    ];
    for (name, help) in counters {
        describe_counter!(*name, *help);
    }
    describe_counter!(
        STAGE_BLOCKED_SECONDS_TOTAL,
        Unit::Seconds,
        "Seconds a stage was blocked on a full channel."
    );
    let gauges: &[(&'static str, &'static str)] = &[
        (LAG_SEQ, "Events received but not yet durable."),
        (CURSOR_SEQ, "Durable cursor (last committed seq)."),
        (PENDING_DIDS, "DIDs in the pending-op map."),
        (PENDING_OPS, "Ops in the pending-op map."),
        (DB_POOL_SIZE, "Connections open in the pool."),
        (DB_POOL_MAX, "Maximum pool size."),
        (DB_POOL_IN_USE, "Connections checked out."),
        (DB_POOL_IDLE, "Connections idle."),
        (DB_POOL_WAITING, "Tasks waiting for a connection."),
        (DB_POOL_UTILIZATION_RATIO, "Pool in use / max, last sample."),
        (
            DB_POOL_UTILIZATION_AVG_RATIO,
            "Pool in use / max, average over a window.",
        ),
        (LEADER, "1 while this instance is the leader."),
    ];
    for (name, help) in gauges {
        describe_gauge!(*name, *help);
    }
    describe_gauge!(LAG_SECONDS, Unit::Seconds, "Commit time to apply time.");
    describe_histogram!(BATCH_ROWS, Unit::Count, "Rows per flushed batch.");
    for (name, help) in [
        (BATCH_FLUSH_SECONDS, "Batch flush latency."),
        (DB_TX_SECONDS, "Transaction attempt duration, by outcome."),
        (JOB_SECONDS, "Background job run duration, by job."),
    ] {
        describe_histogram!(name, Unit::Seconds, help);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_twice_and_render() {
        let a = install();
        let b = install();
        metrics::counter!(DB_RETRIES_TOTAL, "sqlstate" => "40P01").increment(1);
        metrics::histogram!(DB_TX_SECONDS, "outcome" => "commit").record(0.02);
        let text = b.render();
        assert!(
            text.contains("atproto_ingest_db_retries_total{sqlstate=\"40P01\"}"),
            "{text}"
        );
        assert!(
            text.contains("atproto_ingest_db_tx_seconds_bucket"),
            "{text}"
        );
        drop(a);
    }

    #[test]
    fn names_follow_conventions() {
        for n in [
            EVENTS_TOTAL,
            DB_POOL_SIZE,
            JOB_SECONDS,
            LAG_SECONDS,
            CURSOR_SEQ,
        ] {
            assert!(n.starts_with("atproto_ingest_"), "{n}");
        }
    }
}
