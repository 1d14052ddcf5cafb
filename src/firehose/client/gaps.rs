//! Seq continuity of the relay stream: [`SeqCheck`] classifies each seq against the previous one
//! of the same connection (or the resume cursor), [`GapLog`] counts every gap in
//! `atproto_ingest_relay_seq_gaps_total{kind}` and logs each kind at most once per
//! [`GAP_LOG_INTERVAL`]. Gaps are only reported: frames are still forwarded (writes are
//! idempotent).

use std::collections::HashMap;

use tokio::time::Instant;

use super::GAP_LOG_INTERVAL;
use crate::metrics as m;

/// How a seq broke continuity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum GapKind {
    /// Not above the previous seq (relay reset, or a replica behind the one before).
    Backward,
    /// Seqs skipped right after a `#info OutdatedCursor` (expected: the relay said so).
    OutdatedCursor,
    /// Seqs skipped without warning.
    Skip,
}

impl GapKind {
    /// The `kind` label of the gaps counter.
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Backward => "backward",
            Self::OutdatedCursor => "outdated_cursor",
            Self::Skip => "skip",
        }
    }
}

/// A seq that broke continuity: `seq` arrived after `previous`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Gap {
    pub(super) kind: GapKind,
    pub(super) previous: i64,
    pub(super) seq: i64,
}

/// The seq continuity of one connection.
#[derive(Debug)]
pub(super) struct SeqCheck {
    /// The last seq received, or the resume cursor before the first one.
    last: Option<i64>,
    /// A `#info OutdatedCursor` arrived since the last seq.
    outdated: bool,
}

impl SeqCheck {
    /// A connection resumed after `resume` (`None`: live tail, the first seq is not checked).
    pub(super) fn new(resume: Option<i64>) -> Self {
        Self {
            last: resume,
            outdated: false,
        }
    }

    /// The relay said our cursor is older than its backfill window: the next skip is expected.
    pub(super) fn outdated_cursor(&mut self) {
        self.outdated = true;
    }

    /// Takes the next seq; the gap it makes, if any.
    pub(super) fn observe(&mut self, seq: i64) -> Option<Gap> {
        let gap = self.last.and_then(|previous| {
            let kind = if seq <= previous {
                GapKind::Backward
            } else if seq > previous.saturating_add(1) && self.outdated {
                GapKind::OutdatedCursor
            } else if seq > previous.saturating_add(1) {
                GapKind::Skip
            } else {
                return None;
            };
            Some(Gap {
                kind,
                previous,
                seq,
            })
        });
        self.outdated = false;
        self.last = Some(seq);
        gap
    }
}

/// Counts seq gaps and logs each kind at most once per [`GAP_LOG_INTERVAL`]. One per client,
/// kept across its connections; at most one entry per [`GapKind`].
#[derive(Debug, Default)]
pub(super) struct GapLog {
    /// Per kind: when it was last logged, and how many were counted but not logged since.
    last_logged: HashMap<GapKind, (Instant, u64)>,
}

impl GapLog {
    /// Counts `gap`, and logs it unless its kind was logged less than an interval ago.
    pub(super) fn record(&mut self, gap: Gap) {
        let Gap {
            kind,
            previous,
            seq,
        } = gap;
        let label = kind.label();
        metrics::counter!(m::RELAY_SEQ_GAPS_TOTAL, "kind" => label).increment(1);
        let now = Instant::now();
        if let Some((at, suppressed)) = self.last_logged.get_mut(&kind) {
            if now.duration_since(*at) < GAP_LOG_INTERVAL {
                *suppressed += 1;
                return;
            }
        }
        let suppressed = self
            .last_logged
            .insert(kind, (now, 0))
            .map_or(0, |(_, suppressed)| suppressed);
        if kind == GapKind::Backward {
            tracing::error!(kind = label, previous, seq, suppressed, "relay seq went backwards (relay reset?); frames are still applied (writes are idempotent)");
        } else {
            let missing = seq.saturating_sub(previous).saturating_sub(1);
            tracing::warn!(
                kind = label,
                previous,
                seq,
                missing,
                suppressed,
                "relay skipped seqs"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kinds(resume: Option<i64>, steps: &[Result<i64, ()>]) -> Vec<Option<GapKind>> {
        let mut check = SeqCheck::new(resume);
        steps
            .iter()
            .filter_map(|s| match s {
                Ok(seq) => Some(check.observe(*seq).map(|g| g.kind)),
                Err(()) => {
                    check.outdated_cursor();
                    None
                }
            })
            .collect()
    }

    #[test]
    fn classifies_seqs_against_the_previous_one() {
        use GapKind::*;
        // Live tail: the first seq is not checked.
        assert_eq!(
            kinds(None, &[Ok(50), Ok(51), Ok(53), Ok(52), Ok(52)]),
            vec![None, None, Some(Skip), Some(Backward), Some(Backward)]
        );
        // Resumed after 10: 11 follows it, 13 skips 12.
        assert_eq!(kinds(Some(10), &[Ok(11)]), vec![None]);
        assert_eq!(kinds(Some(10), &[Ok(13)]), vec![Some(Skip)]);
        // After #info OutdatedCursor the skip is expected, and only the next one.
        assert_eq!(
            kinds(Some(10), &[Err(()), Ok(500), Ok(502)]),
            vec![Some(OutdatedCursor), Some(Skip)]
        );
    }

    #[test]
    fn gaps_carry_the_previous_seq() {
        let mut check = SeqCheck::new(Some(7));
        assert_eq!(
            check.observe(5),
            Some(Gap {
                kind: GapKind::Backward,
                previous: 7,
                seq: 5
            })
        );
        assert_eq!(check.observe(6), None);
    }

    #[tokio::test(start_paused = true)]
    async fn logs_each_kind_at_most_once_per_interval() {
        let mut log = GapLog::default();
        let gap = |kind| Gap {
            kind,
            previous: 1,
            seq: 5,
        };
        log.record(gap(GapKind::Skip));
        log.record(gap(GapKind::Skip));
        log.record(gap(GapKind::Backward));
        assert_eq!(
            log.last_logged[&GapKind::Skip].1,
            1,
            "second skip suppressed"
        );
        assert_eq!(log.last_logged[&GapKind::Backward].1, 0, "other kinds log");
        tokio::time::advance(GAP_LOG_INTERVAL).await;
        log.record(gap(GapKind::Skip));
        assert_eq!(log.last_logged[&GapKind::Skip].1, 0, "logged again");
        assert_eq!(log.last_logged.len(), 2);
    }
}
