//! Why a commit, a `#sync` event or a repo CAR failed verification, with a bounded reason
//! label for metrics (`commits_rejected_total{reason}`).

use cid::Cid;

/// Why an atproto signing key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not a did:key: {0:?}")]
    NotDidKey(String),
    #[error("multibase: {0}")]
    Multibase(String),
    #[error("multibase key is not base58btc")]
    NotBase58,
    #[error("unsupported key type or multicodec prefix")]
    Unsupported,
    #[error("not a point on the curve")]
    BadPoint,
}

/// Why a commit (or repo CAR) did not verify. [`VerifyError::reason`] is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("CAR: {0}")]
    BadCar(String),
    #[error("CAR of {0} bytes is over the size cap")]
    TooLarge(usize),
    /// The CAR's only root (if it has exactly one) is not the event's `commit`.
    #[error("the CAR's root {car:?} is not the event's commit")]
    RootMismatch { car: Option<Cid> },
    #[error("block {0} is not in the CAR")]
    MissingBlock(Cid),
    #[error("block {0} does not hash to its CID")]
    BlockMismatch(Cid),
    #[error("commit block: {0}")]
    BadCommit(String),
    #[error("commit {field} does not match the event")]
    CommitMismatch { field: &'static str },
    #[error("signature does not verify with the account's key")]
    BadSignature,
    #[error("MST node: {0}")]
    BadMst(String),
    #[error("MST deeper than the depth cap")]
    TooDeep,
    #[error("op {path}: {why}")]
    BadOp { path: String, why: &'static str },
    #[error("op {0} is not proven by the signed MST")]
    OpNotProven(String),
    /// Inverting the ops gave `computed`, not the event's `prevData`.
    #[error("inverted tree root {computed} is not the event's prevData")]
    PrevDataMismatch { computed: Cid },
    #[error("commit carries no prevData: it cannot be verified inductively")]
    NoPrevData,
    #[error("tooBig commit: it carries no blocks")]
    TooBig,
    #[error("record key {0:?} is not collection/rkey")]
    BadRecordKey(String),
}

impl VerifyError {
    /// The bounded label of `commits_rejected_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BadCar(_) => "bad_car",
            Self::TooLarge(_) => "too_large",
            Self::RootMismatch { .. } => "root_mismatch",
            Self::MissingBlock(_) => "missing_block",
            Self::BlockMismatch(_) => "block_mismatch",
            Self::BadCommit(_) => "bad_commit",
            Self::CommitMismatch { .. } => "commit_mismatch",
            Self::BadSignature => "bad_signature",
            Self::BadMst(_) => "bad_mst",
            Self::TooDeep => "too_deep",
            Self::BadOp { .. } => "bad_op",
            Self::OpNotProven(_) => "op_not_proven",
            Self::PrevDataMismatch { .. } => "prev_data_mismatch",
            Self::NoPrevData => "no_prev_data",
            Self::TooBig => "too_big",
            Self::BadRecordKey(_) => "bad_record_key",
        }
    }

    /// Every reason label, for pre-registering metrics.
    pub const REASONS: &'static [&'static str] = &[
        "bad_car",
        "too_large",
        "root_mismatch",
        "missing_block",
        "block_mismatch",
        "bad_commit",
        "commit_mismatch",
        "bad_signature",
        "bad_mst",
        "too_deep",
        "bad_op",
        "op_not_proven",
        "prev_data_mismatch",
        "no_prev_data",
        "too_big",
        "bad_record_key",
    ];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed_once() {
        let samples = [
            VerifyError::BadCar(String::new()),
            VerifyError::TooLarge(1),
            VerifyError::RootMismatch { car: None },
            VerifyError::MissingBlock(Cid::default()),
            VerifyError::BlockMismatch(Cid::default()),
            VerifyError::BadCommit(String::new()),
            VerifyError::CommitMismatch { field: "did" },
            VerifyError::BadSignature,
            VerifyError::BadMst(String::new()),
            VerifyError::TooDeep,
            VerifyError::BadOp {
                path: String::new(),
                why: "",
            },
            VerifyError::OpNotProven(String::new()),
            VerifyError::PrevDataMismatch {
                computed: Cid::default(),
            },
            VerifyError::NoPrevData,
            VerifyError::TooBig,
            VerifyError::BadRecordKey(String::new()),
        ];
        let reasons: Vec<_> = samples.iter().map(VerifyError::reason).collect();
        assert_eq!(reasons, VerifyError::REASONS);
    }
}
