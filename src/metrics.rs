//! Metric names (one place, all `atproto_ingest_*`), their descriptions, and the Prometheus
//! recorder (`install`) whose handle `/metrics` renders.
//!
//! Naming: counters end in `_total`, units are in the name (`_seconds`, `_bytes`, `_ratio`),
//! labels are bounded (never a DID or URI).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

// --- Firehose input (§3) ---
/// Counter `{type}`: events decoded (`#commit`, `#identity`, `#account`, `#sync`, `#info`, `error`).
pub const EVENTS_TOTAL: &str = "atproto_ingest_events_total";
/// Counter `{action, collection}`: record ops decoded; `collection` is a known `app.bsky.*`
/// NSID or `other` (see [`collection_label`]).
pub const OPS_TOTAL: &str = "atproto_ingest_ops_total";
/// Counter `{reason}`: frames skipped as malformed or oversized.
pub const FRAMES_MALFORMED_TOTAL: &str = "atproto_ingest_frames_malformed_total";
/// Counter `{collection, kind}`: records of a known collection that broke their lexicon (not stored).
pub const INVALID_RECORDS_TOTAL: &str = "atproto_ingest_invalid_records_total";
/// Counter `{reason}`: record ops skipped because their record could not be read
/// (`block_missing`, `block_cid_mismatch`, `op_without_cid`, `too_big`, `bad_path`).
pub const OPS_UNAVAILABLE_TOTAL: &str = "atproto_ingest_ops_unavailable_total";
/// Counter: `tooBig` commits seen (the repo needs a resync).
pub const COMMITS_TOO_BIG_TOTAL: &str = "atproto_ingest_commits_too_big_total";

// --- Relay client (§3) ---
/// Gauge: 1 while connected to the relay, else 0.
pub const RELAY_CONNECTED: &str = "atproto_ingest_relay_connected";
/// Counter: relay reconnects (after any end of a connection).
pub const RECONNECTS_TOTAL: &str = "atproto_ingest_relay_reconnects_total";
/// Gauge: highest seq received from the relay.
pub const RELAY_SEQ: &str = "atproto_ingest_relay_seq";
/// Counter: text WebSocket messages ignored.
pub const RELAY_TEXT_MESSAGES_TOTAL: &str = "atproto_ingest_relay_text_messages_total";
/// Counter: relay messages over the frame size limit (the connection is restarted).
pub const RELAY_OVERSIZED_TOTAL: &str = "atproto_ingest_relay_oversized_total";
/// Counter `{name}`: `#info` frames (`OutdatedCursor`, `other`).
pub const RELAY_INFO_TOTAL: &str = "atproto_ingest_relay_info_total";
/// Counter `{error}`: error frames (`FutureCursor`, `ConsumerTooSlow`, `other`).
pub const RELAY_ERRORS_TOTAL: &str = "atproto_ingest_relay_errors_total";
/// Counter `{kind}`: seq discontinuities (`skip`, `backward`, `outdated_cursor`).
pub const RELAY_SEQ_GAPS_TOTAL: &str = "atproto_ingest_relay_seq_gaps_total";

// --- Progress and lag (§4, §9) ---
/// Gauge: durable cursor, the last seq committed with its rows.
pub const CURSOR_SEQ: &str = "atproto_ingest_cursor_seq";
/// Gauge: now minus the `time` of the last event committed (refreshed at every scrape).
pub const LAG_SECONDS: &str = "atproto_ingest_lag_seconds";
/// Gauge: highest relay seq received minus the durable cursor.
pub const LAG_EVENTS: &str = "atproto_ingest_lag_events";

// --- Pending-op maps (§5) ---
/// Gauge: DIDs waiting in the pending-op map.
pub const PENDING_DIDS: &str = "atproto_ingest_pending_dids";
/// Gauge: ops waiting in the pending-op map (all DIDs).
pub const PENDING_OPS: &str = "atproto_ingest_pending_ops";
/// Counter: DIDs evicted from the pending map at its bound (flushed with a stub user).
pub const PENDING_EVICTIONS_TOTAL: &str = "atproto_ingest_pending_evictions_total";
/// Counter: DIDs that hit the per-DID op bound (flushed with a stub user).
pub const PENDING_OVERFLOWS_TOTAL: &str = "atproto_ingest_pending_overflows_total";

// --- Users stage (§5) ---
/// Gauge: DIDs in the known-DID set.
pub const USERS_KNOWN_DIDS: &str = "atproto_ingest_users_known_dids";
/// Gauge: user creations and refreshes in flight (spawned tasks).
pub const USERS_TASKS_IN_FLIGHT: &str = "atproto_ingest_users_tasks_in_flight";
/// Gauge `{queue}`: items waiting in the stage's own queues (`done`, `schedule`).
pub const USERS_QUEUE_DEPTH: &str = "atproto_ingest_users_queue_depth";
/// Gauge: low watermark of the users stage (the cursor batches may write).
pub const USERS_WATERMARK_SEQ: &str = "atproto_ingest_users_watermark_seq";
/// Counter `{result}`: users created (`resolved`, `stub`, `known`, `error`).
pub const USERS_CREATED_TOTAL: &str = "atproto_ingest_users_created_total";
/// Counter `{reason}`: DIDs released early as stubs (`evicted`, `overflow`, `shutdown`).
pub const USERS_STUB_RELEASES_TOTAL: &str = "atproto_ingest_users_stub_releases_total";
/// Counter: events that waited in a pending-op map.
pub const USERS_EVENTS_HELD_TOTAL: &str = "atproto_ingest_users_events_held_total";
/// Counter `{mode}`: `#identity` refreshes (`task` or `scheduled`).
pub const USERS_IDENTITY_REFRESHES_TOTAL: &str = "atproto_ingest_users_identity_refreshes_total";
/// Counter `{op}`: database errors of the users stage and re-resolution job.
pub const USERS_DB_ERRORS_TOTAL: &str = "atproto_ingest_users_db_errors_total";
/// Counter: re-resolution job runs.
pub const RERESOLVE_RUNS_TOTAL: &str = "atproto_ingest_reresolve_runs_total";
/// Counter `{result}`: actors re-resolved by the job (`resolved`, `stub`).
pub const RERESOLVE_ACTORS_TOTAL: &str = "atproto_ingest_reresolve_actors_total";

// --- Identity resolution and user creation (§5) ---
/// Counter `{cache}`: cache lookups answered from the cache.
pub const IDENTITY_CACHE_HITS_TOTAL: &str = "atproto_ingest_identity_cache_hits_total";
/// Counter `{cache}`: cache lookups that had to resolve.
pub const IDENTITY_CACHE_MISSES_TOTAL: &str = "atproto_ingest_identity_cache_misses_total";
/// Gauge `{cache}`: entries held by a cache.
pub const IDENTITY_CACHE_ENTRIES: &str = "atproto_ingest_identity_cache_entries";
/// Counter `{result}`: identity resolutions by outcome (`ok` or an error kind).
pub const IDENTITY_RESOLUTIONS_TOTAL: &str = "atproto_ingest_identity_resolutions_total";
/// Histogram: duration of one identity resolution (DID document + handle check).
pub const IDENTITY_RESOLUTION_SECONDS: &str = "atproto_ingest_identity_resolution_seconds";
/// Counter `{valid}`: handle verifications by outcome (`true` / `false`).
pub const IDENTITY_HANDLE_CHECKS_TOTAL: &str = "atproto_ingest_identity_handle_checks_total";
/// Gauge: user creations holding a semaphore permit.
pub const USER_CREATIONS_IN_FLIGHT: &str = "atproto_ingest_user_creations_in_flight";
/// Gauge: user creations waiting for a permit.
pub const USER_CREATIONS_WAITING: &str = "atproto_ingest_user_creations_waiting";
/// Counter `{reason}`: user creations that ended as a stub.
pub const USER_CREATION_FAILURES_TOTAL: &str = "atproto_ingest_user_creation_failures_total";
/// Histogram: time a user creation waited for a permit.
pub const USER_CREATION_WAIT_SECONDS: &str = "atproto_ingest_user_creation_wait_seconds";

// --- Writer (§6) ---
/// Histogram: events per committed batch.
pub const BATCH_SIZE_EVENTS: &str = "atproto_ingest_batch_size_events";
/// Histogram: record ops per committed batch (non-commit events count as one).
pub const BATCH_SIZE_OPS: &str = "atproto_ingest_batch_size_ops";
/// Histogram: seconds from a batch's first attempt to its commit (retries included).
pub const BATCH_FLUSH_SECONDS: &str = "atproto_ingest_batch_flush_seconds";
/// Counter `{table, op}`: rows really inserted (`op="insert"`) or deleted (`op="delete"`).
pub const ROWS_WRITTEN_TOTAL: &str = "atproto_ingest_rows_written_total";
/// Counter `{sqlstate}`: transaction retries (`40P01`, `40001`, `57014`, …, or `connection`, `pool`, `tx_timeout`).
pub const DB_RETRIES_TOTAL: &str = "atproto_ingest_db_retries_total";
/// Counter `{reason}`: transactions that failed for good (`deadlock`, `serialization`,
/// `statement_timeout`, `connection`, `pool`, `tx_timeout`, `permanent`, `cancelled`).
pub const DB_TX_FAILURES_TOTAL: &str = "atproto_ingest_db_tx_failures_total";
/// Counter: transaction attempts that ran past the transaction timeout (query cancelled, rolled back).
pub const DB_TX_TIMEOUTS_TOTAL: &str = "atproto_ingest_db_tx_timeouts_total";
/// Histogram `{outcome}`: seconds per transaction attempt (begin to commit or rollback).
pub const DB_TX_SECONDS: &str = "atproto_ingest_db_tx_seconds";

// --- Pool monitor (§8) ---
/// Gauge: connections open in the pool.
pub const DB_POOL_SIZE: &str = "atproto_ingest_db_pool_size";
/// Gauge: maximum connections the pool may open.
pub const DB_POOL_MAX: &str = "atproto_ingest_db_pool_max";
/// Gauge: connections checked out.
pub const DB_POOL_IN_USE: &str = "atproto_ingest_db_pool_in_use";
/// Gauge: connections open and idle.
pub const DB_POOL_IDLE: &str = "atproto_ingest_db_pool_idle";
/// Gauge: tasks waiting for a connection.
pub const DB_POOL_WAITING: &str = "atproto_ingest_db_pool_waiting";
/// Gauge: in use / max, last sample.
pub const DB_POOL_UTILIZATION_RATIO: &str = "atproto_ingest_db_pool_utilization_ratio";
/// Gauge `{window}`: in use / max, averaged over the last `window` samples (`5`, `100`).
pub const DB_POOL_UTILIZATION_AVG_RATIO: &str = "atproto_ingest_db_pool_utilization_avg_ratio";

// --- Background jobs (§8) ---
/// Counter `{job, outcome}`: job runs (`ok`, `error`).
pub const JOB_RUNS_TOTAL: &str = "atproto_ingest_job_runs_total";
/// Counter `{job}`: rows removed by jobs.
pub const JOB_ROWS_DELETED_TOTAL: &str = "atproto_ingest_job_rows_deleted_total";
/// Histogram `{job}`: seconds per job run.
pub const JOB_SECONDS: &str = "atproto_ingest_job_seconds";

// --- Leader election and fencing (§7) ---
/// Gauge: 1 while this instance holds the lease, else 0.
pub const LEADER: &str = "atproto_ingest_leader";
/// Counter: lease acquisitions.
pub const LEADER_ACQUISITIONS_TOTAL: &str = "atproto_ingest_leader_acquisitions_total";
/// Counter: leases lost (renewal failed or the key changed hands).
pub const LEADER_LOST_TOTAL: &str = "atproto_ingest_leader_lost_total";
/// Counter: fence claims refused because the database holds a newer fence.
pub const FENCE_CLAIMS_REFUSED_TOTAL: &str = "atproto_ingest_fence_claims_refused_total";
/// Counter: terms ended because a newer leader fenced this one out.
pub const FENCED_TOTAL: &str = "atproto_ingest_fenced_total";

/// The `collection` label of an NSID: known `app.bsky.*` collections by name, anything else
/// `other` (collection NSIDs are open-ended; a label per NSID would be unbounded).
pub fn collection_label(collection: &str) -> &'static str {
    crate::firehose::record::KNOWN_COLLECTIONS
        .iter()
        .find(|k| **k == collection)
        .copied()
        .unwrap_or("other")
}

/// Commit `time` (µs since the Unix epoch) of the last event committed; 0 until one is. One per
/// process, like the recorder it feeds: [`LAG_SECONDS`] is derived from it at every scrape, so
/// the lag keeps growing while the writer is stalled.
static LAST_EVENT_MICROS: AtomicI64 = AtomicI64::new(0);

/// Records the commit time of the last event just committed and updates [`LAG_SECONDS`].
pub fn set_last_event_time(t: chrono::DateTime<chrono::Utc>) {
    LAST_EVENT_MICROS.store(t.timestamp_micros(), Ordering::Relaxed);
    refresh_lag();
}

/// Sets [`LAG_SECONDS`] from the last committed event's time (no-op before the first one).
pub fn refresh_lag() {
    let t = LAST_EVENT_MICROS.load(Ordering::Relaxed);
    if t != 0 {
        let now = chrono::Utc::now().timestamp_micros();
        // A clock behind the relay's shows as zero lag rather than a negative one.
        metrics::gauge!(LAG_SECONDS).set(now.saturating_sub(t).max(0) as f64 / 1e6);
    }
}

/// The Prometheus text of `handle`, with the derived gauges refreshed first.
pub fn render(handle: &PrometheusHandle) -> String {
    refresh_lag();
    handle.render()
}

/// Latency buckets (seconds): 1 ms … 30 s covers a statement up to the statement timeout.
const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Batch-size buckets (events, ops): batches past 5–10 k rows gain nothing (§6), so 25 k is the top.
const BATCH_SIZE_BUCKETS: &[f64] = &[
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
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Prefix("atproto_ingest_batch_size_".to_owned()),
                BATCH_SIZE_BUCKETS,
            )
        });
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
        (EVENTS_TOTAL, "Firehose events decoded, by type."),
        (
            OPS_TOTAL,
            "Record ops decoded, by action and collection (known app.bsky collections, else other).",
        ),
        (
            FRAMES_MALFORMED_TOTAL,
            "Frames skipped as malformed or oversized, by reason.",
        ),
        (
            INVALID_RECORDS_TOTAL,
            "Records failing lexicon checks (not stored), by collection and kind.",
        ),
        (
            OPS_UNAVAILABLE_TOTAL,
            "Record ops skipped: record unreadable (block missing, CID mismatch, tooBig, ...), by reason.",
        ),
        (
            COMMITS_TOO_BIG_TOTAL,
            "tooBig commits (repo needs a resync).",
        ),
        (RECONNECTS_TOTAL, "Relay reconnects."),
        (
            RELAY_TEXT_MESSAGES_TOTAL,
            "Text WebSocket messages from the relay (ignored).",
        ),
        (
            RELAY_OVERSIZED_TOTAL,
            "Relay messages over the frame size limit.",
        ),
        (RELAY_INFO_TOTAL, "Relay #info frames, by name."),
        (RELAY_ERRORS_TOTAL, "Relay error frames, by error."),
        (
            RELAY_SEQ_GAPS_TOTAL,
            "Relay seq discontinuities, by kind.",
        ),
        (
            PENDING_EVICTIONS_TOTAL,
            "DIDs evicted from the pending-op map.",
        ),
        (
            PENDING_OVERFLOWS_TOTAL,
            "DIDs that hit the per-DID pending op bound.",
        ),
        (USERS_CREATED_TOTAL, "Users created, by result."),
        (
            USERS_STUB_RELEASES_TOTAL,
            "DIDs released early as stubs, by reason.",
        ),
        (
            USERS_EVENTS_HELD_TOTAL,
            "Events that waited in a pending-op map.",
        ),
        (
            USERS_IDENTITY_REFRESHES_TOTAL,
            "#identity refreshes, by mode.",
        ),
        (
            USERS_DB_ERRORS_TOTAL,
            "Database errors of the users stage, by op.",
        ),
        (RERESOLVE_RUNS_TOTAL, "Identity re-resolution job runs."),
        (
            RERESOLVE_ACTORS_TOTAL,
            "Actors re-resolved by the job, by result.",
        ),
        (
            IDENTITY_CACHE_HITS_TOTAL,
            "Identity cache hits, by cache.",
        ),
        (
            IDENTITY_CACHE_MISSES_TOTAL,
            "Identity cache misses, by cache.",
        ),
        (
            IDENTITY_RESOLUTIONS_TOTAL,
            "Identity resolutions, by result.",
        ),
        (
            IDENTITY_HANDLE_CHECKS_TOTAL,
            "Handle verifications, by validity.",
        ),
        (
            USER_CREATION_FAILURES_TOTAL,
            "User creations that ended as a stub, by reason.",
        ),
        (
            ROWS_WRITTEN_TOTAL,
            "Rows really inserted or deleted, by table and op.",
        ),
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
        (LEADER_ACQUISITIONS_TOTAL, "Leader lease acquisitions."),
        (LEADER_LOST_TOTAL, "Leader leases lost."),
        (
            FENCE_CLAIMS_REFUSED_TOTAL,
            "Fence claims refused (the database holds a newer fence).",
        ),
        (FENCED_TOTAL, "Terms ended by a newer leader's fence."),
    ];
    for (name, help) in counters {
        describe_counter!(*name, *help);
    }
    let gauges: &[(&'static str, &'static str)] = &[
        (RELAY_CONNECTED, "1 while connected to the relay."),
        (RELAY_SEQ, "Highest seq received from the relay."),
        (CURSOR_SEQ, "Durable cursor (last committed seq)."),
        (LAG_EVENTS, "Relay seq received minus the durable cursor."),
        (PENDING_DIDS, "DIDs in the pending-op map."),
        (PENDING_OPS, "Ops in the pending-op map."),
        (USERS_KNOWN_DIDS, "DIDs in the known-DID set."),
        (
            USERS_TASKS_IN_FLIGHT,
            "User creations and refreshes in flight.",
        ),
        (USERS_QUEUE_DEPTH, "Users stage queue depth, by queue."),
        (USERS_WATERMARK_SEQ, "Low watermark of the users stage."),
        (IDENTITY_CACHE_ENTRIES, "Identity cache entries, by cache."),
        (USER_CREATIONS_IN_FLIGHT, "User creations holding a permit."),
        (
            USER_CREATIONS_WAITING,
            "User creations waiting for a permit.",
        ),
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
    describe_gauge!(
        LAG_SECONDS,
        Unit::Seconds,
        "Now minus the time of the last committed event."
    );
    for (name, help) in [
        (BATCH_SIZE_EVENTS, "Events per committed batch."),
        (BATCH_SIZE_OPS, "Record ops per committed batch."),
    ] {
        describe_histogram!(name, Unit::Count, help);
    }
    for (name, help) in [
        (
            BATCH_FLUSH_SECONDS,
            "Batch flush latency, first attempt to commit.",
        ),
        (DB_TX_SECONDS, "Transaction attempt duration, by outcome."),
        (JOB_SECONDS, "Background job run duration, by job."),
        (IDENTITY_RESOLUTION_SECONDS, "Identity resolution duration."),
        (
            USER_CREATION_WAIT_SECONDS,
            "Time a user creation waited for a permit.",
        ),
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

    /// Every name constant: prefixed, unique, counters end in `_total`, and described.
    #[test]
    fn names_follow_conventions() {
        let src = include_str!("metrics.rs");
        let describe = &src[src.find("fn describe()").unwrap()..src.find("#[cfg(test)]").unwrap()];
        let mut seen = std::collections::HashSet::new();
        let mut n = 0;
        let mut first_doc: Option<&str> = None;
        for line in src.lines() {
            if let Some(d) = line.strip_prefix("/// ") {
                first_doc.get_or_insert(d);
                continue;
            }
            let this_doc = first_doc.take().unwrap_or("");
            let Some(rest) = line.strip_prefix("pub const ") else {
                continue;
            };
            let Some((ident, value)) = rest.split_once(": &str = \"") else {
                continue;
            };
            let value = value.trim_end_matches("\";");
            n += 1;
            assert!(value.starts_with("atproto_ingest_"), "{value}");
            assert!(seen.insert(value), "duplicate {value}");
            assert!(describe.contains(ident), "{ident} is not described");
            if this_doc.starts_with("Counter") {
                assert!(value.ends_with("_total"), "counter {value}");
            } else {
                assert!(!value.ends_with("_total"), "non-counter {value}");
            }
        }
        assert!(n > 50, "found only {n} names");
    }

    #[test]
    fn collection_labels_are_bounded() {
        assert_eq!(collection_label("app.bsky.feed.like"), "app.bsky.feed.like");
        assert_eq!(collection_label("com.example.status"), "other");
        assert_eq!(collection_label("app.bsky.feed.nope"), "other");
    }
}
