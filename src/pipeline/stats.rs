//! Run-wide counters of the pipeline: what the `replay` summary prints and the progress bar
//! reads. The pipeline's Prometheus metrics are emitted here too, once per decoded chunk
//! ([`Stats::add_chunk`]) and once per committed batch ([`Stats::add_batch`]), never per row.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::batcher::Batch;
use crate::metrics as m;
use crate::writer::plan::PlanStats;
use crate::writer::Applied;

/// Counts of one decoded chunk, merged into [`Stats`] at once (one lock per chunk).
#[derive(Debug, Default)]
pub struct ChunkCounts {
    /// What the decoder saw: frames, events by type, ops, skipped frames (shared with `inspect`).
    pub tally: crate::stats::Tally,
    /// `tooBig` commits.
    pub too_big: u64,
    pub decode_micros: u64,
}

#[derive(Debug, Default)]
struct Tables {
    events: BTreeMap<&'static str, u64>,
    ops: BTreeMap<(&'static str, String), u64>,
    skipped: BTreeMap<&'static str, u64>,
    over_limit: BTreeMap<&'static str, u64>,
    invalid: BTreeMap<(String, &'static str), u64>,
    unavailable: BTreeMap<&'static str, u64>,
    inserted: BTreeMap<&'static str, u64>,
    deleted: BTreeMap<&'static str, u64>,
    statement_micros: BTreeMap<&'static str, u64>,
    /// The collections `ops` and `invalid` keep apart, bounded for the whole run.
    collections: crate::stats::CollectionKeys,
}

impl Tables {
    /// Counts `n` ops of `(action, collection)` and `invalid` records by collection, under a
    /// bounded set of collection keys (the rest fold into one, counted and metered).
    fn add_collection_counts<'a>(
        &mut self,
        ops: impl IntoIterator<Item = (&'a (&'static str, String), &'a u64)>,
        invalid: impl IntoIterator<Item = (&'a (String, &'static str), &'a u64)>,
    ) {
        let before = self.collections.folded;
        for ((action, coll), n) in ops {
            let key = self.collections.key(coll);
            *self.ops.entry((action, key)).or_default() += n;
        }
        for ((coll, kind), n) in invalid {
            let key = self.collections.key(coll);
            *self.invalid.entry((key, kind)).or_default() += n;
        }
        let folded = self.collections.folded - before;
        if folded > 0 {
            metrics::counter!(m::STATS_COLLECTIONS_FOLDED_TOTAL).increment(folded);
        }
    }
}

/// Shared by the stages of one run.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    pub frames: AtomicU64,
    pub events_written: AtomicU64,
    pub batches: AtomicU64,
    pub non_canonical: AtomicU64,
    pub commits_applied: AtomicU64,
    pub commits_already_applied: AtomicU64,
    pub ops_superseded: AtomicU64,
    /// Values changed so PostgreSQL can store them (§6), all kinds.
    pub sanitized: AtomicU64,
    /// Events set aside in `dead_letters` (§6).
    pub dead_letters: AtomicU64,
    /// Last seq committed with the cursor (-1 before the first batch).
    pub cursor: AtomicI64,
    /// `time` of the last event committed, µs since the Unix epoch (0 before the first one).
    pub last_event_micros: AtomicI64,
    /// Time spent decoding (summed over decode threads) and in batch transactions, in µs:
    /// where the time goes.
    pub decode_micros: AtomicU64,
    pub write_micros: AtomicU64,
    /// Counters of the users stage (pending-op maps, user creation).
    pub users: super::users::UsersStats,
    /// Counters of the verify stage (§12).
    pub verify: Arc<super::verify::VerifyStats>,
    tables: Mutex<Tables>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            frames: AtomicU64::new(0),
            events_written: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            non_canonical: AtomicU64::new(0),
            commits_applied: AtomicU64::new(0),
            commits_already_applied: AtomicU64::new(0),
            ops_superseded: AtomicU64::new(0),
            sanitized: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            cursor: AtomicI64::new(-1),
            last_event_micros: AtomicI64::new(0),
            decode_micros: AtomicU64::new(0),
            write_micros: AtomicU64::new(0),
            users: Default::default(),
            verify: Default::default(),
            tables: Mutex::new(Tables::default()),
        }
    }
}

fn add<K: Ord + Clone>(into: &mut BTreeMap<K, u64>, from: &BTreeMap<K, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

impl Stats {
    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A poisoned lock only means another thread panicked mid-update of counters.
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add_chunk(&self, c: &ChunkCounts) {
        let t = &c.tally;
        self.frames.fetch_add(t.frames, Ordering::Relaxed);
        self.non_canonical
            .fetch_add(t.non_canonical, Ordering::Relaxed);
        self.decode_micros
            .fetch_add(c.decode_micros, Ordering::Relaxed);
        for (ty, n) in &t.events_by_type {
            metrics::counter!(m::EVENTS_TOTAL, "type" => *ty).increment(*n);
        }
        for ((action, coll), n) in &t.ops {
            metrics::counter!(m::OPS_TOTAL, "action" => *action, "collection" => m::collection_label(coll))
                .increment(*n);
        }
        for (reason, n) in &t.skipped {
            metrics::counter!(m::FRAMES_MALFORMED_TOTAL, "reason" => *reason).increment(*n);
        }
        for (reason, n) in &t.over_limit {
            metrics::counter!(m::COMMITS_OVER_LIMIT_TOTAL, "reason" => *reason).increment(*n);
        }
        if c.too_big > 0 {
            metrics::counter!(m::COMMITS_TOO_BIG_TOTAL).increment(c.too_big);
        }
        if t.collections.folded > 0 {
            metrics::counter!(m::STATS_COLLECTIONS_FOLDED_TOTAL).increment(t.collections.folded);
        }
        let mut tables = self.tables();
        add(&mut tables.events, &t.events_by_type);
        tables.collections.folded += t.collections.folded;
        tables.add_collection_counts(&t.ops, std::iter::empty());
        add(&mut tables.skipped, &t.skipped);
        add(&mut tables.over_limit, &t.over_limit);
    }

    /// Merges a committed batch: `applied` is what its transaction did, `flush` the time from
    /// its first attempt to its commit.
    pub(crate) fn add_batch(&self, batch: &Batch, applied: &Applied, flush: Duration) {
        let events = batch.events.len();
        let cursor = applied.cursor.or(batch.cursor());
        metrics::histogram!(m::BATCH_SIZE_EVENTS).record(events as f64);
        metrics::histogram!(m::BATCH_SIZE_OPS).record(batch.ops() as f64);
        metrics::histogram!(m::BATCH_FLUSH_SECONDS).record(flush.as_secs_f64());
        if let Some(seq) = cursor {
            metrics::gauge!(m::CURSOR_SEQ).set(seq as f64);
        }
        // The newest event time of the batch (`#info` and error frames carry none). Unparseable times leave the lag as it was.
        // Writer lanes sort a batch by lane, so the newest is the highest seq, not the last.
        let last_time = batch
            .events
            .iter()
            .filter_map(|e| e.kind.time().map(|t| (e.seq, t)))
            .max_by_key(|(seq, _)| *seq)
            .map(|(_, t)| t);
        if let Some(t) = last_time.and_then(crate::mapping::parse_time) {
            self.last_event_micros
                .store(t.timestamp_micros(), Ordering::Relaxed);
            m::set_last_event_time(t);
        }
        for (table, n) in &applied.inserted {
            metrics::counter!(m::ROWS_WRITTEN_TOTAL, "table" => *table, "op" => "insert")
                .increment(*n);
        }
        for (table, n) in &applied.deleted {
            metrics::counter!(m::ROWS_WRITTEN_TOTAL, "table" => *table, "op" => "delete")
                .increment(*n);
        }
        for ((coll, kind), n) in &applied.stats.invalid {
            metrics::counter!(m::INVALID_RECORDS_TOTAL, "collection" => m::collection_label(coll), "kind" => *kind)
                .increment(*n);
        }
        for (reason, n) in &applied.stats.unavailable {
            metrics::counter!(m::OPS_UNAVAILABLE_TOTAL, "reason" => *reason).increment(*n);
        }
        for fix in crate::mapping::Fix::ALL {
            let n = applied.stats.sanitized.get(fix);
            if n > 0 {
                metrics::counter!(m::SANITIZED_TOTAL, "kind" => fix.label()).increment(n);
            }
        }
        self.sanitized
            .fetch_add(applied.stats.sanitized.total(), Ordering::Relaxed);
        self.events_written
            .fetch_add(events as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        let s: &PlanStats = &applied.stats;
        self.commits_applied
            .fetch_add(s.commits_applied, Ordering::Relaxed);
        self.commits_already_applied
            .fetch_add(s.commits_already_applied, Ordering::Relaxed);
        self.ops_superseded
            .fetch_add(s.ops_superseded, Ordering::Relaxed);
        if let Some(seq) = cursor {
            self.cursor.store(seq, Ordering::Relaxed);
        }
        let mut t = self.tables();
        t.add_collection_counts(std::iter::empty(), &s.invalid);
        for (k, n) in &s.unavailable {
            *t.unavailable.entry(k).or_default() += n;
        }
        add(&mut t.inserted, &applied.inserted);
        add(&mut t.deleted, &applied.deleted);
        add(&mut t.statement_micros, &applied.statement_micros);
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// Frames skipped for `reason`.
    pub fn skipped(&self, reason: &str) -> u64 {
        self.tables().skipped.get(reason).copied().unwrap_or(0)
    }

    /// Commits skipped for breaking a decode limit, for `reason`.
    pub fn over_limit(&self, reason: &str) -> u64 {
        self.tables().over_limit.get(reason).copied().unwrap_or(0)
    }

    pub fn skipped_total(&self) -> u64 {
        self.tables().skipped.values().sum()
    }

    /// Distinct collections the run's tables keep apart, and the counts folded into
    /// [`crate::stats::OTHER_COLLECTIONS`] past [`crate::stats::MAX_COLLECTIONS`].
    pub fn collections(&self) -> (usize, u64) {
        let t = self.tables();
        (t.collections.len(), t.collections.folded)
    }

    /// Records rejected by their lexicon, all collections.
    pub fn invalid_total(&self) -> u64 {
        self.tables().invalid.values().sum()
    }

    /// Ops that could not be read, by reason.
    pub fn unavailable(&self, reason: &str) -> u64 {
        self.tables().unavailable.get(reason).copied().unwrap_or(0)
    }

    /// Rows inserted plus rows deleted, all tables.
    pub fn rows_written(&self) -> u64 {
        let t = self.tables();
        t.inserted.values().sum::<u64>() + t.deleted.values().sum::<u64>()
    }

    /// The closing summary, one item per line.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let t = self.tables();
        let secs = self.elapsed().as_secs_f64();
        let events = self.events_written.load(Ordering::Relaxed);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "frames read: {}, events written: {events} in {} batches, elapsed {secs:.2}s ({:.0} events/s)",
            self.frames.load(Ordering::Relaxed),
            self.batches.load(Ordering::Relaxed),
            events as f64 / secs.max(1e-9)
        );
        let _ = writeln!(
            s,
            "commits applied: {}, already applied (skipped): {}, superseded ops: {}, non-canonical frames accepted: {}",
            self.commits_applied.load(Ordering::Relaxed),
            self.commits_already_applied.load(Ordering::Relaxed),
            self.ops_superseded.load(Ordering::Relaxed),
            self.non_canonical.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "values sanitized for PostgreSQL: {}, events set aside in dead_letters: {}",
            self.sanitized.load(Ordering::Relaxed),
            self.dead_letters.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            s,
            "time in decode (all threads): {:.2}s, in batch transactions: {:.2}s",
            self.decode_micros.load(Ordering::Relaxed) as f64 / 1e6,
            self.write_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let v = &self.verify;
        let verified = v.verified.load(Ordering::Relaxed);
        let rejected = v.rejected.load(Ordering::Relaxed);
        let desynchronized = v.desynchronized.load(Ordering::Relaxed);
        if verified + rejected + desynchronized > 0 {
            let by: Vec<String> = v
                .rejected_by_reason()
                .iter()
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            let _ = writeln!(
                s,
                "commits verified: {verified}, rejected: {rejected} ({}), repos desynchronized: {desynchronized}, commits left to resyncs: {}, events held for a running resync: {}",
                if by.is_empty() { "none".to_owned() } else { by.join(", ") },
                v.not_applied.load(Ordering::Relaxed),
                v.held.load(Ordering::Relaxed)
            );
        }
        let line = |s: &mut String, title: &str, items: Vec<String>| {
            let body = if items.is_empty() {
                "none".to_owned()
            } else {
                items.join(", ")
            };
            let _ = writeln!(s, "{title}: {body}");
        };
        line(
            &mut s,
            "events by type",
            t.events.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        );
        let mut by_coll: BTreeMap<&str, u64> = BTreeMap::new();
        for ((_, c), n) in &t.ops {
            *by_coll.entry(c).or_default() += n;
        }
        line(
            &mut s,
            "ops by collection",
            by_coll.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        );
        line(
            &mut s,
            "ops by action and collection",
            t.ops
                .iter()
                .map(|((a, c), v)| format!("{a} {c}={v}"))
                .collect(),
        );
        if t.collections.folded > 0 {
            let _ = writeln!(
                s,
                "ops and records of collections past the first {}, counted as {}: {}",
                crate::stats::MAX_COLLECTIONS,
                crate::stats::OTHER_COLLECTIONS,
                t.collections.folded
            );
        }
        line(
            &mut s,
            "frames skipped by reason",
            t.skipped.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        );
        line(
            &mut s,
            "commits over a decode limit (skipped, repo marked for resync)",
            t.over_limit
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        );
        line(
            &mut s,
            "ops unreadable by reason",
            t.unavailable
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        );
        line(
            &mut s,
            "invalid records (not stored)",
            t.invalid
                .iter()
                .map(|((c, k), v)| format!("{c} {k}={v}"))
                .collect(),
        );
        line(
            &mut s,
            "rows inserted by table",
            t.inserted.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        );
        line(
            &mut s,
            "time in statements (ms)",
            t.statement_micros
                .iter()
                .map(|(k, v)| format!("{k}={}", v / 1000))
                .collect(),
        );
        line(
            &mut s,
            "rows deleted by table",
            t.deleted.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        );
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Tally, MAX_COLLECTIONS, OTHER_COLLECTIONS};

    #[test]
    fn the_run_tables_stay_bounded_over_many_chunks() {
        let stats = Stats::default();
        for chunk in 0..4 {
            let mut tally = Tally::default();
            tally.add_event(&crate::stats::tests::commit_of(200, &format!("c{chunk}-")));
            stats.add_chunk(&ChunkCounts {
                tally,
                ..ChunkCounts::default()
            });
        }
        assert_eq!(
            stats.collections(),
            (MAX_COLLECTIONS, 800 - MAX_COLLECTIONS as u64)
        );
        let summary = stats.summary();
        assert!(
            summary.contains(&format!("counted as {OTHER_COLLECTIONS}: 544")),
            "{summary}"
        );
        assert!(
            summary.contains(&format!("{OTHER_COLLECTIONS}=544")),
            "{summary}"
        );
    }
}
