//! The typed events the decoder produces and the rest of the pipeline consumes.

use cid::Cid;

use super::limits::OverLimit;
use super::record::{KnownRecord, Rejection};

/// One decoded firehose message.
#[derive(Debug, Clone)]
pub struct Event {
    /// Relay sequence number (0 for frames that carry none: `#info`, error frames).
    pub seq: i64,
    pub kind: EventKind,
}

impl Event {
    /// What the event weighs in a batch: a commit's op count (at least 1), else 1.
    pub fn weight(&self) -> usize {
        match &self.kind {
            EventKind::Commit(c) => c.ops.len().max(1),
            _ => 1,
        }
    }
}

// Commits are most of the traffic, so boxing them would cost an allocation on the common path
// for no gain: events move through channels inside `Vec`s, never by the million on the stack.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum EventKind {
    Commit(Commit),
    Identity(Identity),
    Account(Account),
    Sync(Sync),
    /// `#info`, e.g. `OutdatedCursor`.
    Info {
        name: String,
        message: Option<String>,
    },
    /// An error frame (`op = -1`), e.g. `FutureCursor`, `ConsumerTooSlow`.
    Error {
        error: String,
        message: Option<String>,
    },
}

#[cfg(test)]
impl Event {
    /// An `#info` event at `seq`: the smallest event, for unit tests of seq bookkeeping.
    pub(crate) fn info_at(seq: i64) -> Self {
        Self {
            seq,
            kind: EventKind::Info {
                name: "x".into(),
                message: None,
            },
        }
    }

    /// A `#commit` of `repo` at `rev` with no ops, no blocks and no chain fields: the base
    /// of unit tests' commits (struct update syntax sets what a test needs).
    pub(crate) fn bare_commit(repo: &str, rev: &str) -> Commit {
        Commit {
            repo: repo.into(),
            rev: rev.into(),
            since: None,
            commit: cid::Cid::default(),
            prev_data: None,
            time: String::new(),
            too_big: false,
            ops: Vec::new(),
            blocks: Vec::new(),
            over_limit: None,
            records_bytes: 0,
            data: None,
        }
    }
}

impl EventKind {
    /// The frame type as on the wire (`#commit`, …) or `error`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Commit(_) => "#commit",
            Self::Identity(_) => "#identity",
            Self::Account(_) => "#account",
            Self::Sync(_) => "#sync",
            Self::Info { .. } => "#info",
            Self::Error { .. } => "error",
        }
    }

    /// The event's `time` (RFC 3339, when the relay/PDS emitted it), if it carries one.
    pub fn time(&self) -> Option<&str> {
        match self {
            Self::Commit(c) => Some(&c.time),
            Self::Identity(i) => Some(&i.time),
            Self::Account(a) => Some(&a.time),
            Self::Sync(s) => Some(&s.time),
            Self::Info { .. } | Self::Error { .. } => None,
        }
    }

    /// The repo (DID) the event concerns, if any.
    pub fn did(&self) -> Option<&str> {
        match self {
            Self::Commit(c) => Some(&c.repo),
            Self::Identity(i) => Some(&i.did),
            Self::Account(a) => Some(&a.did),
            Self::Sync(s) => Some(&s.did),
            Self::Info { .. } | Self::Error { .. } => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Commit {
    pub repo: String,
    pub rev: String,
    pub since: Option<String>,
    pub commit: Cid,
    pub prev_data: Option<Cid>,
    pub time: String,
    pub too_big: bool,
    pub ops: Vec<RecordOp>,
    /// The CAR slice as received (signed commit, MST nodes, records), for Sync 1.1
    /// verification ([`crate::sync::verify_commit`]); empty for `tooBig` commits.
    pub blocks: Vec<u8>,
    /// The commit broke a decode limit (ops, `blocks` or record bytes): it carries no ops and
    /// no blocks, and its repo needs a resync for this reason.
    pub over_limit: Option<OverLimit>,
    /// DAG-CBOR bytes of the records the ops hold, counted once per op: what the decoded
    /// records weigh in memory is estimated from it (the pipeline's byte bounds).
    pub records_bytes: usize,
    /// MST root (`data`) of the signed commit, set by the verify stage once the commit is
    /// verified (§12); `None` when verification is off. Stored as the repo's head.
    pub data: Option<Cid>,
}

impl Commit {
    /// Whether the commit carries its blocks: not `tooBig` and within the decode limits (a
    /// commit that is neither passes unverified; its repo is marked for resync).
    pub fn readable(&self) -> bool {
        !self.too_big && self.over_limit.is_none()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Create,
    Update,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
        }
    }
}

/// One repo op of a commit, with its record resolved from the commit's blocks.
#[derive(Debug, Clone)]
pub struct RecordOp {
    pub action: Action,
    pub collection: String,
    pub rkey: String,
    pub cid: Option<Cid>,
    pub prev: Option<Cid>,
    pub record: OpRecord,
}

impl RecordOp {
    /// The record's `at://did/collection/rkey` URI.
    pub fn uri(&self, did: &str) -> String {
        format!("at://{did}/{}/{}", self.collection, self.rkey)
    }
}

/// What an op's record turned out to be.
#[derive(Debug, Clone)]
pub enum OpRecord {
    /// A delete: no record.
    None,
    /// A known `app.bsky` record, decoded and lexicon-checked.
    Known(Box<KnownRecord>),
    /// A record of another collection, as its JSON form.
    Generic(serde_json::Value),
    /// The record is present but breaks its lexicon; not stored.
    Invalid(Rejection),
    /// The record could not be used at all.
    Unavailable(Unavailable),
    /// A later op of the same commit writes the same path: this one has no lasting effect
    /// (the PDS leaves the intermediate block out of the CAR).
    Superseded,
}

/// Why an op's record could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// The block is not in the commit's CAR.
    BlockMissing,
    /// The block's bytes do not hash to its CID.
    BlockMismatch,
    /// A create/update op without a CID.
    NoCid,
    /// The commit was `tooBig`: it carries no blocks; the repo needs a resync.
    TooBig,
    /// The op's path is not `collection/rkey` with a valid NSID and record key.
    BadPath,
}

impl Unavailable {
    pub fn reason(self) -> &'static str {
        match self {
            Self::BlockMissing => "block_missing",
            Self::BlockMismatch => "block_cid_mismatch",
            Self::NoCid => "op_without_cid",
            Self::TooBig => "too_big",
            Self::BadPath => "bad_path",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Identity {
    pub did: String,
    pub handle: Option<String>,
    pub time: String,
}

#[derive(Debug, Clone)]
pub struct Account {
    pub did: String,
    pub active: bool,
    /// `deactivated`, `takendown`, `suspended`, `deleted`, … when not active.
    pub status: Option<String>,
    pub time: String,
}

impl Account {
    /// The status to store: `active` when active, else the given status
    /// (`deactivated` when the relay gives none).
    pub fn effective_status(&self) -> &str {
        if self.active {
            "active"
        } else {
            self.status.as_deref().unwrap_or("deactivated")
        }
    }
}

#[derive(Debug, Clone)]
pub struct Sync {
    pub did: String,
    pub rev: String,
    pub time: String,
    /// CAR slice holding the signed commit alone ([`crate::sync::verify_sync`]).
    pub blocks: Vec<u8>,
}
