//! Tallies of decoded and skipped frames (events by type, ops by action and collection,
//! invalid and unavailable records, skipped frames by reason), printed as a closing summary.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::firehose::frame::DecodedFrame;
use crate::firehose::{EventKind, OpRecord};

/// Most distinct collections a tally keeps apart: a stream of ever new NSIDs must not grow the
/// run's tables for ever. Far above the few dozen collections the network really uses.
pub const MAX_COLLECTIONS: usize = 256;
/// The key under which collections past [`MAX_COLLECTIONS`] are counted (not an NSID).
pub const OTHER_COLLECTIONS: &str = "(other)";
/// Longest collection kept as a key: the longest NSID. An op with a bad path may name a
/// "collection" of megabytes; it is folded, so the tables stay within
/// `MAX_COLLECTIONS × MAX_COLLECTION_BYTES` (~81 KB) of keys.
const MAX_COLLECTION_BYTES: usize = 317;

/// The collections a tally keeps apart: the first [`MAX_COLLECTIONS`] seen; the rest are
/// folded into [`OTHER_COLLECTIONS`], each fold counted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CollectionKeys {
    admitted: BTreeSet<String>,
    /// Counts folded into [`OTHER_COLLECTIONS`].
    pub folded: u64,
}

impl CollectionKeys {
    /// The key to count `collection` under: itself, or [`OTHER_COLLECTIONS`] once the table is
    /// full (counted in `folded`). Already-folded counts pass as they are.
    pub(crate) fn key(&mut self, collection: &str) -> String {
        if collection == OTHER_COLLECTIONS || self.admitted.contains(collection) {
            return collection.to_owned();
        }
        if self.admitted.len() < MAX_COLLECTIONS && collection.len() <= MAX_COLLECTION_BYTES {
            self.admitted.insert(collection.to_owned());
            return collection.to_owned();
        }
        self.folded += 1;
        OTHER_COLLECTIONS.to_owned()
    }

    /// Distinct collections kept apart.
    pub fn len(&self) -> usize {
        self.admitted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.admitted.is_empty()
    }
}

/// Counts of what a run over a frame stream saw.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally {
    /// Frames read from the input (decoded or skipped).
    pub frames: u64,
    /// Events counted, by wire type (`#commit`, …, `error`).
    pub events_by_type: BTreeMap<&'static str, u64>,
    /// Commit ops, by (action, collection).
    pub ops: BTreeMap<(&'static str, String), u64>,
    /// Records present but breaking their lexicon, by (collection, rejection kind).
    pub invalid: BTreeMap<(String, &'static str), u64>,
    /// Records that could not be read, by reason (`block_missing`, …).
    pub unavailable: BTreeMap<&'static str, u64>,
    /// Frames skipped, by `FrameError::reason()`.
    pub skipped: BTreeMap<&'static str, u64>,
    /// Commits skipped for breaking a decode limit, by `OverLimit::reason()`.
    pub over_limit: BTreeMap<&'static str, u64>,
    /// Frames accepted although their body was not canonical DAG-CBOR.
    pub non_canonical: u64,
    /// The collections `ops` and `invalid` keep apart (bounded).
    pub collections: CollectionKeys,
}

impl Tally {
    /// Counts one decoded frame's event, ops and records.
    pub(crate) fn add_event(&mut self, frame: &DecodedFrame) {
        if frame.non_canonical {
            self.non_canonical += 1;
        }
        let kind = &frame.event.kind;
        *self.events_by_type.entry(kind.type_name()).or_default() += 1;
        let EventKind::Commit(c) = kind else {
            return;
        };
        if let Some(over) = c.over_limit {
            *self.over_limit.entry(over.reason()).or_default() += 1;
        }
        for op in &c.ops {
            let collection = self.collections.key(&op.collection);
            match &op.record {
                OpRecord::Invalid(r) => {
                    *self
                        .invalid
                        .entry((collection.clone(), r.kind))
                        .or_default() += 1;
                }
                OpRecord::Unavailable(u) => *self.unavailable.entry(u.reason()).or_default() += 1,
                _ => {}
            }
            *self
                .ops
                .entry((op.action.as_str(), collection))
                .or_default() += 1;
        }
    }

    /// Counts one skipped frame.
    pub(crate) fn add_skipped(&mut self, reason: &'static str) {
        *self.skipped.entry(reason).or_default() += 1;
    }

    /// Total events counted.
    pub(crate) fn events(&self) -> u64 {
        self.events_by_type.values().sum()
    }

    /// Total frames skipped.
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}

impl fmt::Display for Tally {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "frames read: {} (skipped {}, non-canonical accepted {})",
            self.frames,
            self.skipped_total(),
            self.non_canonical
        )?;
        writeln!(f, "events: {}", self.events())?;
        for (t, n) in &self.events_by_type {
            writeln!(f, "  {t:<10} {n:>9}")?;
        }
        let total_ops: u64 = self.ops.values().sum();
        writeln!(f, "ops by action and collection: {total_ops}")?;
        for ((action, coll), n) in &self.ops {
            writeln!(f, "  {action:<6} {coll:<40} {n:>9}")?;
        }
        let invalid: u64 = self.invalid.values().sum();
        writeln!(f, "invalid records by collection: {invalid}")?;
        for ((coll, kind), n) in &self.invalid {
            writeln!(f, "  {coll:<40} {kind:<14} {n:>6}")?;
        }
        let unavailable: u64 = self.unavailable.values().sum();
        writeln!(f, "unavailable records by reason: {unavailable}")?;
        for (reason, n) in &self.unavailable {
            writeln!(f, "  {reason:<20} {n:>9}")?;
        }
        let over_limit: u64 = self.over_limit.values().sum();
        writeln!(f, "commits over a decode limit by reason: {over_limit}")?;
        for (reason, n) in &self.over_limit {
            writeln!(f, "  {reason:<20} {n:>9}")?;
        }
        if self.collections.folded > 0 {
            writeln!(
                f,
                "ops of collections past the first {MAX_COLLECTIONS}, counted as {OTHER_COLLECTIONS}: {}",
                self.collections.folded
            )?;
        }
        writeln!(f, "skipped frames by reason: {}", self.skipped_total())?;
        for (reason, n) in &self.skipped {
            writeln!(f, "  {reason:<20} {n:>9}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::firehose::frame::DecodedFrame;

    /// A real commit of `small.frames` whose op is repeated under `n` distinct collections.
    pub(crate) fn commit_of(n: usize, prefix: &str) -> DecodedFrame {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/firehose/small.frames"
        );
        let reader = crate::firehose::fixture::open(std::path::Path::new(path)).unwrap();
        let mut d = crate::firehose::fixture::FrameReader::new(reader, 1 << 20)
            .filter_map(|f| match f.unwrap() {
                crate::firehose::fixture::RawFrame::Message(m) => crate::firehose::decode(&m).ok(),
                _ => None,
            })
            .find(|d| matches!(&d.event.kind, EventKind::Commit(c) if !c.ops.is_empty()))
            .unwrap();
        let EventKind::Commit(c) = &mut d.event.kind else {
            unreachable!()
        };
        let op = c.ops[0].clone();
        c.ops = (0..n)
            .map(|i| {
                let mut o = op.clone();
                o.collection = format!("com.example.{prefix}{i}");
                o
            })
            .collect();
        d
    }

    #[test]
    fn a_stream_of_new_collections_is_folded_past_the_bound() {
        let mut t = Tally::default();
        t.add_event(&commit_of(MAX_COLLECTIONS + 50, "a"));
        t.add_event(&commit_of(10, "a"));
        assert_eq!(t.collections.len(), MAX_COLLECTIONS);
        assert_eq!(
            t.ops.len(),
            MAX_COLLECTIONS + 1,
            "the first ones and (other)"
        );
        assert_eq!(t.collections.folded, 50);
        let other: u64 = t
            .ops
            .iter()
            .filter(|((_, c), _)| c == OTHER_COLLECTIONS)
            .map(|(_, n)| n)
            .sum();
        assert_eq!(other, 50);
        assert_eq!(t.ops.values().sum::<u64>(), MAX_COLLECTIONS as u64 + 60);
        // A "collection" longer than any NSID is never a key.
        let mut keys = CollectionKeys::default();
        assert_eq!(keys.key(&"x".repeat(10_000)), OTHER_COLLECTIONS);
        assert_eq!((keys.len(), keys.folded), (0, 1));
    }
}
