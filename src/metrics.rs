//! Metric names (one place, all `atproto_ingest_*`), each declared once with its kind, unit,
//! labels and help text; the descriptions are generated from that list. Also the Prometheus
//! recorder (`install`) whose handle `/metrics` renders.
//!
//! Naming: counters end in `_total`, units are in the name (`_seconds`, `_bytes`, `_ratio`),
//! labels are bounded (never a DID or URI). The unit test checks every declaration.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// What a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One declared metric.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Metric {
    pub(crate) name: &'static str,
    /// The Rust constant that holds `name` (what recording code names).
    pub(crate) ident: &'static str,
    pub(crate) kind: Kind,
    pub(crate) unit: Option<Unit>,
    /// Label names (their values are bounded sets); checked by the conventions test.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) labels: &'static [&'static str],
    /// The `# HELP` text.
    pub(crate) help: &'static str,
}

macro_rules! unit {
    () => {
        None
    };
    ($unit:ident) => {
        Some(Unit::$unit)
    };
}

/// `IDENT: Kind(Unit)[labels] = "name", "help";` → the `IDENT` const (its doc made of the kind,
/// labels and help, then any `///` lines of detail) and its entry in [`ALL`].
macro_rules! metrics {
    ($(
        $(#[doc = $doc:literal])*
        $vis:vis $ident:ident: $kind:ident $(($unit:ident))? [$($label:literal),*] =
            $name:literal, $help:literal;
    )*) => {
        $(
            #[doc = concat!(stringify!($kind), $(" `", $label, "`",)* ": ", $help)]
            #[doc = ""]
            $(#[doc = $doc])*
            $vis const $ident: &str = $name;
        )*

        /// Every metric, in declaration order.
        pub(crate) const ALL: &[Metric] = &[$(
            Metric {
                name: $ident,
                ident: stringify!($ident),
                kind: Kind::$kind,
                unit: unit!($($unit)?),
                labels: &[$($label),*],
                help: $help,
            },
        )*];
    };
}

metrics! {
    // --- Firehose input (§3) ---
    /// `type`: `#commit`, `#identity`, `#account`, `#sync`, `#info`, `error`.
    pub EVENTS_TOTAL: Counter["type"] =
        "atproto_ingest_events_total", "Firehose events decoded, by type.";
    /// `collection`: a known `app.bsky.*` NSID or `other` (see [`collection_label`]).
    pub OPS_TOTAL: Counter["action", "collection"] =
        "atproto_ingest_ops_total",
        "Record ops decoded, by action and collection (known app.bsky collections, else other).";
    pub FRAMES_MALFORMED_TOTAL: Counter["reason"] =
        "atproto_ingest_frames_malformed_total",
        "Frames skipped as malformed or oversized, by reason.";
    /// Records of a known collection that broke their lexicon; `collection` as in [`OPS_TOTAL`].
    pub INVALID_RECORDS_TOTAL: Counter["collection", "kind"] =
        "atproto_ingest_invalid_records_total",
        "Records failing lexicon checks (not stored), by collection and kind.";
    /// `reason`: `block_missing`, `block_cid_mismatch`, `op_without_cid`, `too_big`, `bad_path`.
    pub(crate) OPS_UNAVAILABLE_TOTAL: Counter["reason"] =
        "atproto_ingest_ops_unavailable_total",
        "Record ops skipped: record unreadable (block missing, CID mismatch, tooBig, ...), by reason.";
    pub(crate) COMMITS_TOO_BIG_TOTAL: Counter[] =
        "atproto_ingest_commits_too_big_total", "tooBig commits (repo needs a resync).";
    /// `reason`: `too_many_ops`, `blocks_too_large`, `record_too_large`, `records_too_large`.
    pub(crate) COMMITS_OVER_LIMIT_TOTAL: Counter["reason"] =
        "atproto_ingest_commits_over_limit_total",
        "Commits skipped for breaking a decode limit (repo needs a resync), by reason.";
    /// The run's per-collection tables keep at most `stats::MAX_COLLECTIONS` collections apart.
    pub(crate) STATS_COLLECTIONS_FOLDED_TOTAL: Counter[] =
        "atproto_ingest_stats_collections_folded_total",
        "Ops and invalid records of collections past the run tables' bound, counted under (other).";

    // --- Relay client (§3) ---
    pub(crate) RELAY_CONNECTED: Gauge[] =
        "atproto_ingest_relay_connected", "1 while connected to the relay.";
    /// After any end of a connection.
    pub RECONNECTS_TOTAL: Counter[] = "atproto_ingest_relay_reconnects_total", "Relay reconnects.";
    pub(crate) RELAY_SEQ: Gauge[] =
        "atproto_ingest_relay_seq", "Highest seq received from the relay.";
    pub(crate) RELAY_TEXT_MESSAGES_TOTAL: Counter[] =
        "atproto_ingest_relay_text_messages_total",
        "Text WebSocket messages from the relay (ignored).";
    /// The connection is restarted.
    pub(crate) RELAY_OVERSIZED_TOTAL: Counter[] =
        "atproto_ingest_relay_oversized_total", "Relay messages over the frame size limit.";
    /// `name`: `OutdatedCursor`, `other`.
    pub(crate) RELAY_INFO_TOTAL: Counter["name"] =
        "atproto_ingest_relay_info_total", "Relay #info frames, by name.";
    /// `error`: `FutureCursor`, `ConsumerTooSlow`, `other`.
    pub(crate) RELAY_ERRORS_TOTAL: Counter["error"] =
        "atproto_ingest_relay_errors_total", "Relay error frames, by error.";
    /// `kind`: `skip`, `backward`, `outdated_cursor`.
    pub(crate) RELAY_SEQ_GAPS_TOTAL: Counter["kind"] =
        "atproto_ingest_relay_seq_gaps_total", "Relay seq discontinuities, by kind.";
    /// `result`: `held` (a seq far beyond the last one), then `confirmed` or `dropped`.
    pub(crate) RELAY_SEQ_JUMPS_TOTAL: Counter["result"] =
        "atproto_ingest_relay_seq_jumps_total", "Relay seqs far beyond the last one, held until the next frame confirms them, by result.";

    // --- Progress and lag (§4, §9) ---
    pub CURSOR_SEQ: Gauge[] = "atproto_ingest_cursor_seq", "Durable cursor (last committed seq).";
    /// Refreshed at every scrape.
    pub LAG_SECONDS: Gauge(Seconds)[] =
        "atproto_ingest_lag_seconds", "Now minus the time of the last committed event.";
    pub(crate) LAG_EVENTS: Gauge[] =
        "atproto_ingest_lag_events", "Relay seq received minus the durable cursor.";

    // --- Memory budget (src/budget.rs) ---
    /// `share`: `total`, `raw_queue`, `decoded_queue`, `users_queue`, `verified_queue`, `batch`, `pending`,
    /// `live_queue`, `known_dids`, `identity_caches`.
    pub(crate) MEMORY_BUDGET_BYTES: Gauge(Bytes)["share"] =
        "atproto_ingest_memory_budget_bytes", "Memory budget and its share per bound.";
    /// `queue`: `raw`, `decoded`, `users`, `verified`, `batches`, `live` (sampled as the
    /// source drains it).
    pub(crate) QUEUE_BYTES: Gauge(Bytes)["queue"] =
        "atproto_ingest_queue_bytes", "Bytes queued between pipeline stages, by queue.";

    // --- Pending-op maps (§5) ---
    pub(crate) PENDING_DIDS: Gauge[] = "atproto_ingest_pending_dids", "DIDs in the pending-op map.";
    /// All DIDs together.
    pub(crate) PENDING_OPS: Gauge[] = "atproto_ingest_pending_ops", "Ops in the pending-op map.";
    /// Its bound: the pending share of the memory budget.
    pub(crate) PENDING_BYTES: Gauge(Bytes)[] =
        "atproto_ingest_pending_bytes", "Bytes held in the pending-op map.";
    /// Flushed with a stub user.
    pub(crate) PENDING_EVICTIONS_TOTAL: Counter[] =
        "atproto_ingest_pending_evictions_total", "DIDs evicted from the pending-op map.";
    /// Flushed with a stub user.
    pub(crate) PENDING_OVERFLOWS_TOTAL: Counter[] =
        "atproto_ingest_pending_overflows_total", "DIDs that hit the per-DID pending op bound.";

    // --- Users stage (§5) ---
    pub(crate) USERS_KNOWN_DIDS: Gauge[] =
        "atproto_ingest_users_known_dids", "DIDs in the known-DID set.";
    /// Its bound: the known-DID share of the memory budget.
    pub(crate) USERS_KNOWN_DIDS_BYTES: Gauge(Bytes)[] =
        "atproto_ingest_users_known_dids_bytes", "Bytes of the known-DID set.";
    /// Spawned tasks.
    pub(crate) USERS_TASKS_IN_FLIGHT: Gauge[] =
        "atproto_ingest_users_tasks_in_flight", "User creations and refreshes in flight.";
    /// `queue`: `done`, `schedule`.
    pub(crate) USERS_QUEUE_DEPTH: Gauge["queue"] =
        "atproto_ingest_users_queue_depth", "Users stage queue depth, by queue.";
    /// The cursor batches may write.
    pub(crate) USERS_WATERMARK_SEQ: Gauge[] =
        "atproto_ingest_users_watermark_seq", "Low watermark of the users stage.";
    /// `result`: `resolved`, `stub`, `known`, `error`.
    pub(crate) USERS_CREATED_TOTAL: Counter["result"] =
        "atproto_ingest_users_created_total", "Users created, by result.";
    /// `reason`: `evicted`, `overflow`, `shutdown`.
    pub(crate) USERS_STUB_RELEASES_TOTAL: Counter["reason"] =
        "atproto_ingest_users_stub_releases_total", "DIDs released early as stubs, by reason.";
    pub(crate) USERS_EVENTS_HELD_TOTAL: Counter[] =
        "atproto_ingest_users_events_held_total", "Events that waited in a pending-op map.";
    /// `mode`: `task`, `scheduled`.
    pub(crate) USERS_IDENTITY_REFRESHES_TOTAL: Counter["mode"] =
        "atproto_ingest_users_identity_refreshes_total", "#identity refreshes, by mode.";
    /// Of the users stage and the re-resolution job.
    pub(crate) USERS_DB_ERRORS_TOTAL: Counter["op"] =
        "atproto_ingest_users_db_errors_total", "Database errors of the users stage, by op.";
    pub(crate) RERESOLVE_RUNS_TOTAL: Counter[] =
        "atproto_ingest_reresolve_runs_total", "Identity re-resolution job runs.";
    /// `result`: `resolved`, `stub` (retried with backoff), `given_up` (tombstoned DID or
    /// unsupported method: marked, never retried by the job).
    pub(crate) RERESOLVE_ACTORS_TOTAL: Counter["result"] =
        "atproto_ingest_reresolve_actors_total", "Actors re-resolved by the job, by result.";

    // --- Identity resolution and user creation (§5) ---
    /// Lookups answered from the cache.
    pub(crate) IDENTITY_CACHE_HITS_TOTAL: Counter["cache"] =
        "atproto_ingest_identity_cache_hits_total", "Identity cache hits, by cache.";
    /// Lookups that had to resolve.
    pub(crate) IDENTITY_CACHE_MISSES_TOTAL: Counter["cache"] =
        "atproto_ingest_identity_cache_misses_total", "Identity cache misses, by cache.";
    pub(crate) IDENTITY_CACHE_ENTRIES: Gauge["cache"] =
        "atproto_ingest_identity_cache_entries", "Identity cache entries, by cache.";
    /// Bounded by the identity-cache share of the memory budget.
    pub(crate) IDENTITY_CACHE_BYTES: Gauge(Bytes)["cache"] =
        "atproto_ingest_identity_cache_bytes", "Identity cache bytes, by cache.";
    /// `result`: `ok` or an error kind.
    pub(crate) IDENTITY_RESOLUTIONS_TOTAL: Counter["result"] =
        "atproto_ingest_identity_resolutions_total", "Identity resolutions, by result.";
    /// DID document + handle check.
    pub(crate) IDENTITY_RESOLUTION_SECONDS: Histogram(Seconds)[] =
        "atproto_ingest_identity_resolution_seconds", "Identity resolution duration.";
    /// `valid`: `true`, `false`.
    pub(crate) IDENTITY_HANDLE_CHECKS_TOTAL: Counter["valid"] =
        "atproto_ingest_identity_handle_checks_total", "Handle verifications, by validity.";
    pub(crate) USER_CREATIONS_IN_FLIGHT: Gauge[] =
        "atproto_ingest_user_creations_in_flight", "User creations holding a permit.";
    pub(crate) USER_CREATIONS_WAITING: Gauge[] =
        "atproto_ingest_user_creations_waiting", "User creations waiting for a permit.";
    pub(crate) USER_CREATION_FAILURES_TOTAL: Counter["reason"] =
        "atproto_ingest_user_creation_failures_total",
        "User creations that ended as a stub, by reason.";
    pub(crate) USER_CREATION_WAIT_SECONDS: Histogram(Seconds)[] =
        "atproto_ingest_user_creation_wait_seconds", "Time a user creation waited for a permit.";

    // --- Writer (§6) ---
    pub BATCH_SIZE_EVENTS: Histogram(Count)[] =
        "atproto_ingest_batch_size_events", "Events per committed batch.";
    /// Non-commit events count as one.
    pub BATCH_SIZE_OPS: Histogram(Count)[] =
        "atproto_ingest_batch_size_ops", "Record ops per committed batch.";
    /// Retries included.
    pub BATCH_FLUSH_SECONDS: Histogram(Seconds)[] =
        "atproto_ingest_batch_flush_seconds", "Batch flush latency, first attempt to commit.";
    /// `op`: `insert`, `delete`.
    pub ROWS_WRITTEN_TOTAL: Counter["table", "op"] =
        "atproto_ingest_rows_written_total", "Rows really inserted or deleted, by table and op.";
    /// `sqlstate`: `40P01`, `40001`, `57014`, …, or `connection`, `pool`, `tx_timeout`.
    pub(crate) DB_RETRIES_TOTAL: Counter["sqlstate"] =
        "atproto_ingest_db_retries_total", "Transaction retries, by SQLSTATE or cause.";
    /// `reason`: `deadlock`, `serialization`, `statement_timeout`, `connection`, `pool`,
    /// `tx_timeout`, `data` (a data error: the batch is split, §6), `permanent`, `cancelled`.
    pub(crate) DB_TX_FAILURES_TOTAL: Counter["reason"] =
        "atproto_ingest_db_tx_failures_total", "Transactions that failed for good, by reason.";
    /// `kind`: `nul_text`, `nul_json`, `long_reference`, `time_out_of_range` (§6).
    pub SANITIZED_TOTAL: Counter["kind"] =
        "atproto_ingest_sanitized_total",
        "Values changed so PostgreSQL can store them (record stored sanitized), by kind.";
    /// `class`: the SQLSTATE class of the error (`22`, `23`, `54`).
    pub DEAD_LETTERS_TOTAL: Counter["class"] =
        "atproto_ingest_dead_letters_total",
        "Events set aside in dead_letters after a data error isolated them, by SQLSTATE class.";
    /// Query cancelled, rolled back.
    pub(crate) DB_TX_TIMEOUTS_TOTAL: Counter[] =
        "atproto_ingest_db_tx_timeouts_total",
        "Transaction attempts cancelled at the transaction timeout.";
    /// Begin to commit or rollback.
    pub(crate) DB_TX_SECONDS: Histogram(Seconds)["outcome"] =
        "atproto_ingest_db_tx_seconds", "Transaction attempt duration, by outcome.";

    // --- Pool monitor (§8) ---
    pub(crate) DB_POOL_SIZE: Gauge[] =
        "atproto_ingest_db_pool_size", "Connections open in the pool.";
    pub(crate) DB_POOL_MAX: Gauge[] = "atproto_ingest_db_pool_max", "Maximum pool size.";
    pub(crate) DB_POOL_IN_USE: Gauge[] =
        "atproto_ingest_db_pool_in_use", "Connections checked out.";
    pub(crate) DB_POOL_IDLE: Gauge[] = "atproto_ingest_db_pool_idle", "Connections idle.";
    pub(crate) DB_POOL_WAITING: Gauge[] =
        "atproto_ingest_db_pool_waiting", "Tasks waiting for a connection.";
    pub(crate) DB_POOL_UTILIZATION_RATIO: Gauge[] =
        "atproto_ingest_db_pool_utilization_ratio", "Pool in use / max, last sample.";
    /// `window`: the last `5` or `100` samples.
    pub(crate) DB_POOL_UTILIZATION_AVG_RATIO: Gauge["window"] =
        "atproto_ingest_db_pool_utilization_avg_ratio", "Pool in use / max, average over a window.";

    // --- Background jobs (§8) ---
    /// `outcome`: `ok`, `error`.
    pub(crate) JOB_RUNS_TOTAL: Counter["job", "outcome"] =
        "atproto_ingest_job_runs_total", "Background job runs, by job and outcome.";
    pub(crate) JOB_ROWS_DELETED_TOTAL: Counter["job"] =
        "atproto_ingest_job_rows_deleted_total", "Rows deleted by background jobs, by job.";
    pub(crate) JOB_SECONDS: Histogram(Seconds)["job"] =
        "atproto_ingest_job_seconds", "Background job run duration, by job.";

    // --- Commit verification (§12) ---
    pub(crate) COMMITS_VERIFIED_TOTAL: Counter[] =
        "atproto_ingest_commits_verified_total",
        "Commits and #sync events whose signature and MST proof verified.";
    /// `reason`: a verification failure (`bad_signature`, `op_not_proven`, …) or
    /// `key_unavailable`.
    pub(crate) COMMITS_REJECTED_TOTAL: Counter["reason"] =
        "atproto_ingest_commits_rejected_total",
        "Commits and #sync events rejected (nothing written), by reason.";
    /// `reason`: `chain_broken`, `sync_differs`, `key_unavailable`, `too_big`, decode limits, …
    pub(crate) REPOS_DESYNCHRONIZED_TOTAL: Counter["reason"] =
        "atproto_ingest_repos_desynchronized_total",
        "Repos marked desynchronized (a resync queued), by reason.";
    pub(crate) EVENTS_OF_DESYNCHRONIZED_REPOS_TOTAL: Counter[] =
        "atproto_ingest_events_of_desynchronized_repos_total",
        "Live commits not applied because their repo awaits a resync (the resync covers them).";
    pub(crate) VERIFY_CACHE_REPOS: Gauge[] =
        "atproto_ingest_verify_cache_repos", "Repos whose head and key the verifier holds.";
    pub(crate) VERIFY_CACHE_BYTES: Gauge(Bytes)[] =
        "atproto_ingest_verify_cache_bytes", "Estimated bytes of the verifier's repo cache.";
    /// `what`: `heads` and `keys` (one query per chunk that misses some), `did_document` (one
    /// per key fetched from a DID document), `resync_heads` (heads of repos in resync, read
    /// again on the ordered path).
    pub(crate) VERIFY_LOADS_TOTAL: Counter["what"] =
        "atproto_ingest_verify_loads_total",
        "Loads of the verify stage: queries of heads and keys, DID documents fetched.";

    // --- Leader election and fencing (§7) ---
    pub(crate) LEADER: Gauge[] = "atproto_ingest_leader", "1 while this instance is the leader.";
    pub(crate) LEADER_ACQUISITIONS_TOTAL: Counter[] =
        "atproto_ingest_leader_acquisitions_total", "Leader lease acquisitions.";
    /// Renewal failed or the key changed hands.
    pub(crate) LEADER_LOST_TOTAL: Counter[] =
        "atproto_ingest_leader_lost_total", "Leader leases lost.";
    pub(crate) FENCE_CLAIMS_REFUSED_TOTAL: Counter[] =
        "atproto_ingest_fence_claims_refused_total",
        "Fence claims refused (the database holds a newer fence).";
    pub(crate) FENCED_TOTAL: Counter[] =
        "atproto_ingest_fenced_total", "Terms ended by a newer leader's fence.";

    // --- Resync and backfill (§12, §13) ---
    /// `result`: `ok`, or a failure reason (`repo_not_found`, `bad_signature`, `timeout`, …).
    pub RESYNCS_TOTAL: Counter["result"] =
        "atproto_ingest_resyncs_total", "Repo resyncs finished, by result.";
    /// Fetch, verification and the transaction.
    pub(crate) RESYNC_SECONDS: Histogram(Seconds)[] =
        "atproto_ingest_resync_seconds", "Duration of one repo resync.";
    pub(crate) RESYNCS_IN_FLIGHT: Gauge[] =
        "atproto_ingest_resyncs_in_flight", "Repo resyncs running now.";
    pub(crate) RESYNC_GROUP_FALLBACKS_TOTAL: Counter[] =
        "atproto_ingest_resync_group_fallbacks_total",
        "Resync groups whose transaction failed, written again repo by repo.";
    /// `change`: `created`, `updated`, `deleted`, `unchanged`, `invalid`.
    pub RESYNC_RECORDS_TOTAL: Counter["change"] =
        "atproto_ingest_resync_records_total", "Records of resynced repos, by change.";
    /// Refreshed by the resync workers every few seconds.
    pub REPOS: Gauge["state"] =
        "atproto_ingest_repos", "Repos by sync state.";
    pub(crate) RESYNC_QUEUE: Gauge[] =
        "atproto_ingest_resync_queue", "Repos queued for a resync (due or backing off).";
    pub(crate) HELD_REPOS: Gauge[] =
        "atproto_ingest_held_repos", "Repos whose live events are held during a resync.";
    pub(crate) HELD_EVENTS: Gauge[] =
        "atproto_ingest_held_events", "Live events held for repos being resynced.";
    /// Estimated.
    pub(crate) HELD_BYTES: Gauge(Bytes)[] =
        "atproto_ingest_held_bytes", "Memory of the held live events.";
    /// The repo is resynced again.
    pub(crate) HELD_OVERFLOWS_TOTAL: Counter[] =
        "atproto_ingest_held_overflows_total", "Repos whose held events were dropped at a bound.";
    pub(crate) BACKFILL_PAGES_TOTAL: Counter[] =
        "atproto_ingest_backfill_pages_total", "listRepos pages read by backfill.";
    pub BACKFILL_REPOS_LISTED: Gauge[] =
        "atproto_ingest_backfill_repos_listed", "Repos listed so far by the running backfill.";
    /// `outcome`: `done`, `failed`, `inactive`, `pending`.
    pub BACKFILL_REPOS: Gauge["outcome"] =
        "atproto_ingest_backfill_repos", "Listed repos of the running backfill, by outcome.";
}

/// Every declared metric as `(name, constant, kind)` with kind `"counter"`, `"gauge"` or
/// `"histogram"`: for checks that alert rules and dashboards name only what the daemon exports.
pub fn declared() -> impl Iterator<Item = (&'static str, &'static str, &'static str)> {
    ALL.iter().map(|m| {
        let kind = match m.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        (m.name, m.ident, kind)
    })
}

/// The `collection` label of an NSID: known `app.bsky.*` collections by name, anything else
/// `other` (collection NSIDs are open-ended; a label per NSID would be unbounded).
pub fn collection_label(collection: &str) -> &'static str {
    crate::mapping::Table::for_collection(collection)
        .nsid()
        .unwrap_or("other")
}

/// Commit `time` (µs since the Unix epoch) of the last event committed; 0 until one is. One per
/// process, like the recorder it feeds: [`LAG_SECONDS`] is derived from it at every scrape, so
/// the lag keeps growing while the writer is stalled.
static LAST_EVENT_MICROS: AtomicI64 = AtomicI64::new(0);

/// Records the commit time of the last event just committed and updates [`LAG_SECONDS`].
pub(crate) fn set_last_event_time(t: chrono::DateTime<chrono::Utc>) {
    LAST_EVENT_MICROS.store(t.timestamp_micros(), Ordering::Relaxed);
    refresh_lag();
}

/// Sets [`LAG_SECONDS`] from the last committed event's time (no-op before the first one).
fn refresh_lag() {
    let t = LAST_EVENT_MICROS.load(Ordering::Relaxed);
    if t != 0 {
        let now = chrono::Utc::now().timestamp_micros();
        // A clock behind the relay's shows as zero lag rather than a negative one.
        metrics::gauge!(LAG_SECONDS).set(now.saturating_sub(t).max(0) as f64 / 1e6);
    }
}

/// The Prometheus text of `handle`, with the derived gauges refreshed first.
pub(crate) fn render(handle: &PrometheusHandle) -> String {
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
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

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
            describe_all();
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
pub(crate) async fn run_upkeep(handle: PrometheusHandle, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => handle.run_upkeep(),
        }
    }
}

/// Describes every metric of [`ALL`] to the installed recorder.
fn describe_all() {
    for m in ALL {
        match (m.kind, m.unit) {
            (Kind::Counter, None) => describe_counter!(m.name, m.help),
            (Kind::Counter, Some(u)) => describe_counter!(m.name, u, m.help),
            (Kind::Gauge, None) => describe_gauge!(m.name, m.help),
            (Kind::Gauge, Some(u)) => describe_gauge!(m.name, u, m.help),
            (Kind::Histogram, None) => describe_histogram!(m.name, m.help),
            (Kind::Histogram, Some(u)) => describe_histogram!(m.name, u, m.help),
        }
    }
}

#[cfg(test)]
mod tests;
