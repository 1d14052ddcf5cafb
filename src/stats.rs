//! Tallies of decoded and skipped frames (events by type, ops by action and collection,
//! invalid and unavailable records, skipped frames by reason), printed as a closing summary.

use std::collections::BTreeMap;
use std::fmt;

use crate::firehose::frame::DecodedFrame;
use crate::firehose::{EventKind, OpRecord};

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
            *self
                .ops
                .entry((op.action.as_str(), op.collection.clone()))
                .or_default() += 1;
            match &op.record {
                OpRecord::Invalid(r) => {
                    *self
                        .invalid
                        .entry((op.collection.clone(), r.kind))
                        .or_default() += 1;
                }
                OpRecord::Unavailable(u) => *self.unavailable.entry(u.reason()).or_default() += 1,
                _ => {}
            }
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
        writeln!(f, "skipped frames by reason: {}", self.skipped_total())?;
        for (reason, n) in &self.skipped {
            writeln!(f, "  {reason:<20} {n:>9}")?;
        }
        Ok(())
    }
}
