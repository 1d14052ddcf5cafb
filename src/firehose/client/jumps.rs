//! Seq jumps (§3): one frame whose seq lies far beyond the last one must not move the durable
//! cursor for good (`GREATEST` never lowers it, so a single corrupt seq would make every
//! later resume ask the relay for a future cursor). Such a frame is held, not forwarded, until
//! the next frame with a seq decides:
//!
//! - the next seq is above it: the relay really moved on (an `OutdatedCursor` skip, a relay
//!   catching up after an outage); the held frame and the next are forwarded, in order;
//! - the next seq is not: the jump was a lone outlier; it is dropped, counted
//!   (`atproto_ingest_relay_seq_jumps_total{result="dropped"}`) and logged, and the stream goes
//!   on from the seq before it. Its repo, if the event was genuine, is repaired by the chain
//!   checks of §12 at its next commit.
//!
//! A connection that ends while a frame is held forgets it: the next one resumes from the
//! durable cursor, which is below it, so nothing is lost. At most one frame is held.

use crate::metrics as m;

/// A seq more than this far beyond the last one is held until confirmed: about half an hour
/// of the whole network's events, far above any gap a healthy relay leaves between two frames.
pub const MAX_SEQ_JUMP: i64 = 1_000_000;

/// What to forward now, in order: up to two frames with their seqs.
pub(super) type Release = [Option<(i64, Vec<u8>)>; 2];

/// The jump check of one connection.
#[derive(Debug)]
pub(super) struct JumpGuard {
    /// The last seq forwarded, or the resume cursor before the first one.
    last: Option<i64>,
    /// A frame whose seq jumped, waiting for the next seq to confirm it.
    held: Option<(i64, Vec<u8>)>,
}

impl JumpGuard {
    /// A connection resumed after `resume` (`None`: live tail, the first seq sets the base).
    pub(super) fn new(resume: Option<i64>) -> Self {
        Self {
            last: resume,
            held: None,
        }
    }

    /// Takes the next frame with a seq; returns what to forward now.
    pub(super) fn admit(&mut self, seq: i64, frame: Vec<u8>) -> Release {
        if let Some((held_seq, held)) = self.held.take() {
            if seq > held_seq {
                metrics::counter!(m::RELAY_SEQ_JUMPS_TOTAL, "result" => "confirmed").increment(1);
                tracing::warn!(
                    previous = ?self.last,
                    seq = held_seq,
                    next = seq,
                    "relay seq jumped far ahead and the next frame confirmed it; going on from there"
                );
                self.last = Some(seq);
                return [Some((held_seq, held)), Some((seq, frame))];
            }
            metrics::counter!(m::RELAY_SEQ_JUMPS_TOTAL, "result" => "dropped").increment(1);
            tracing::warn!(
                previous = ?self.last,
                seq = held_seq,
                next = seq,
                "relay sent one frame with a seq far ahead of the others; dropped it, the cursor does not move there"
            );
        }
        match self.last {
            Some(last) if seq > last.saturating_add(MAX_SEQ_JUMP) => {
                metrics::counter!(m::RELAY_SEQ_JUMPS_TOTAL, "result" => "held").increment(1);
                self.held = Some((seq, frame));
                [None, None]
            }
            _ => {
                self.last = Some(seq);
                [Some((seq, frame)), None]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(r: Release) -> Vec<i64> {
        r.into_iter().flatten().map(|(s, _)| s).collect()
    }

    #[test]
    fn a_lone_far_seq_is_dropped_and_a_confirmed_one_goes_on() {
        let far = 10 + MAX_SEQ_JUMP + 1;
        let mut g = JumpGuard::new(Some(10));
        assert_eq!(seqs(g.admit(11, vec![])), [11]);
        assert_eq!(
            seqs(g.admit(11 + MAX_SEQ_JUMP, vec![])),
            [11 + MAX_SEQ_JUMP]
        );
        let mut g = JumpGuard::new(Some(10));
        assert_eq!(seqs(g.admit(far, vec![])), Vec::<i64>::new(), "held");
        assert_eq!(seqs(g.admit(11, vec![])), [11], "outlier dropped");
        assert_eq!(seqs(g.admit(12, vec![])), [12]);
        assert_eq!(
            seqs(g.admit(far + 5, vec![])),
            Vec::<i64>::new(),
            "held again"
        );
        assert_eq!(
            seqs(g.admit(far + 6, vec![])),
            [far + 5, far + 6],
            "confirmed"
        );
        assert_eq!(seqs(g.admit(far + 7, vec![])), [far + 7]);
        // Two outliers in a row: the second is judged against the seq before the first.
        let mut g = JumpGuard::new(Some(10));
        assert!(seqs(g.admit(far + 1, vec![])).is_empty());
        assert!(
            seqs(g.admit(far, vec![])).is_empty(),
            "first dropped, second held"
        );
        assert_eq!(seqs(g.admit(11, vec![])), [11]);
        // Live tail: the first seq is the base.
        let mut g = JumpGuard::new(None);
        assert_eq!(seqs(g.admit(far, vec![])), [far]);
    }
}
