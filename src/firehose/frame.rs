//! One subscribeRepos message → one typed [`Event`], or a [`FrameError`] naming why the frame
//! was skipped. The header `{op, t}` is decoded first, then the body by `t`.

use cid::Cid;
use serde::Deserialize;

use std::collections::HashMap;

use super::car::Car;
use super::cbor::{self, WalkError};
use super::event::{
    Account, Action, Commit, Event, EventKind, Identity, OpRecord, RecordOp, Sync, Unavailable,
};
use super::limits::{BlockCache, CommitLimits};
use super::syntax::{is_nsid, is_record_key};

/// Default frame size limit (§3): 5 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: usize = 5 * 1024 * 1024;

/// Why a frame was skipped. `reason()` is the bounded label of `frames_malformed_total`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("frame of {0} bytes exceeds the frame size limit")]
    Oversized(u64),
    #[error("header: {0}")]
    Header(String),
    #[error("non-canonical CBOR: {0}")]
    NonCanonical(String),
    #[error("frame has a header but no body")]
    BodyMissing,
    #[error("body: {0}")]
    Body(String),
    #[error("data after the body")]
    TrailingData,
    #[error("unknown header op {0}")]
    UnknownOp(i64),
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    #[error("commit blocks: {0}")]
    Car(String),
    #[error("event DID {0:?} is not a DID")]
    BadDid(String),
    #[error("rev {0:?} is not a TID")]
    BadRev(String),
    #[error("rev {0:?} is more than 5 minutes in the future")]
    FutureRev(String),
}

impl FrameError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Oversized(_) => "oversized",
            Self::Header(_) => "bad_header",
            Self::NonCanonical(_) => "non_canonical",
            Self::BodyMissing => "body_missing",
            Self::Body(_) => "bad_body",
            Self::TrailingData => "trailing_data",
            Self::UnknownOp(_) => "unknown_op",
            Self::UnknownType(_) => "unknown_type",
            Self::Car(_) => "bad_car",
            Self::BadDid(_) => "bad_did",
            Self::BadRev(_) => "bad_rev",
            Self::FutureRev(_) => "future_rev",
        }
    }
}

/// A decoded frame plus facts about how it was encoded.
#[derive(Debug)]
pub struct DecodedFrame {
    pub event: Event,
    /// The body's top-level keys were not in DAG-CBOR order (accepted, counted).
    pub non_canonical: bool,
}

/// A frame's header: `op` 1 (message, `t` its type) or -1 (error).
#[derive(Debug, Deserialize)]
pub(crate) struct Header<'a> {
    pub(crate) op: i64,
    #[serde(borrow, default)]
    pub(crate) t: Option<&'a str>,
}

/// Reads a frame's header; returns it and where the body starts. The one header parser: the
/// decoder and the relay client's peek both use it.
#[inline]
pub(crate) fn peek_header(msg: &[u8]) -> Result<(Header<'_>, usize), FrameError> {
    let hlen = cbor::item_len(msg).map_err(|e| walk_error("header", e))?;
    let header = serde_ipld_dagcbor::from_slice(&msg[..hlen])
        .map_err(|e| FrameError::Header(e.to_string()))?;
    Ok((header, hlen))
}

/// A message body read for its `seq` alone; every other field is skipped unread.
#[derive(Deserialize)]
struct SeqBody {
    seq: i64,
}

/// The `seq` of an `op` 1 message body, without decoding the rest of it.
pub(crate) fn peek_seq(bytes: &[u8]) -> Result<i64, FrameError> {
    body::<SeqBody>(bytes).map(|b| b.seq)
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CommitBody<'a> {
    seq: i64,
    #[serde(default)]
    too_big: bool,
    repo: String,
    commit: Cid,
    rev: String,
    #[serde(default)]
    since: Option<String>,
    #[serde(with = "serde_bytes", borrow)]
    blocks: &'a [u8],
    ops: Vec<WireOp<'a>>,
    time: String,
    #[serde(default)]
    prev_data: Option<Cid>,
}

#[derive(Deserialize)]
struct WireOp<'a> {
    action: &'a str,
    path: &'a str,
    cid: Option<Cid>,
    #[serde(default)]
    prev: Option<Cid>,
}

#[derive(Deserialize)]
struct IdentityBody {
    seq: i64,
    did: String,
    time: String,
    #[serde(default)]
    handle: Option<String>,
}

#[derive(Deserialize)]
struct AccountBody {
    seq: i64,
    did: String,
    time: String,
    active: bool,
    #[serde(default)]
    status: Option<String>,
}

#[derive(Deserialize)]
struct SyncBody<'a> {
    seq: i64,
    did: String,
    rev: String,
    time: String,
    #[serde(with = "serde_bytes", borrow, default)]
    blocks: &'a [u8],
}

/// The body of an `#info` message.
#[derive(Debug, PartialEq, Deserialize)]
pub(crate) struct InfoBody {
    pub(crate) name: String,
    #[serde(default)]
    pub(crate) message: Option<String>,
}

/// The body of an error frame (`op` -1).
#[derive(Debug, PartialEq, Deserialize)]
pub(crate) struct ErrorBody {
    pub(crate) error: String,
    #[serde(default)]
    pub(crate) message: Option<String>,
}

fn walk_error(part: &str, e: WalkError) -> FrameError {
    match (part, e) {
        (_, WalkError::Indefinite) => {
            FrameError::NonCanonical(format!("indefinite-length item in {part}"))
        }
        ("header", e) => FrameError::Header(format!("{e:?}")),
        (_, e) => FrameError::Body(format!("{e:?}")),
    }
}

/// Decodes a whole message body as `T` (data after it is an error).
pub(crate) fn body<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, FrameError> {
    serde_ipld_dagcbor::from_slice(bytes).map_err(|e| match e {
        serde_ipld_dagcbor::DecodeError::TrailingData => FrameError::TrailingData,
        serde_ipld_dagcbor::DecodeError::IndefiniteSize => {
            FrameError::NonCanonical("indefinite-length item in body".into())
        }
        e => FrameError::Body(e.to_string()),
    })
}

/// Decodes one WebSocket binary message, holding commits to the sync spec's default limits.
pub fn decode(msg: &[u8]) -> Result<DecodedFrame, FrameError> {
    decode_with(msg, &CommitLimits::default())
}

/// Decodes one WebSocket binary message; a commit over `limits` comes out without ops or
/// blocks, carrying the limit it broke ([`Commit::over_limit`]).
pub fn decode_with(msg: &[u8], limits: &CommitLimits) -> Result<DecodedFrame, FrameError> {
    if msg.is_empty() {
        return Err(FrameError::Empty);
    }
    let (header, hlen) = peek_header(msg)?;
    let rest = &msg[hlen..];
    if rest.is_empty() {
        return Err(FrameError::BodyMissing);
    }
    let non_canonical = !cbor::map_keys_canonical(rest);
    let event = match header.op {
        -1 => {
            let b: ErrorBody = body(rest)?;
            Event {
                seq: 0,
                kind: EventKind::Error {
                    error: b.error,
                    message: b.message,
                },
            }
        }
        1 => match header.t {
            Some("#commit") => decode_commit(body(rest)?, limits)?,
            Some("#identity") => {
                let b: IdentityBody = body(rest)?;
                Event {
                    seq: b.seq,
                    kind: EventKind::Identity(Identity {
                        did: b.did,
                        handle: b.handle,
                        time: b.time,
                    }),
                }
            }
            Some("#account") => {
                let b: AccountBody = body(rest)?;
                Event {
                    seq: b.seq,
                    kind: EventKind::Account(Account {
                        did: b.did,
                        active: b.active,
                        status: b.status,
                        time: b.time,
                    }),
                }
            }
            Some("#sync") => {
                let b: SyncBody = body(rest)?;
                Event {
                    seq: b.seq,
                    kind: EventKind::Sync(Sync {
                        did: b.did,
                        rev: b.rev,
                        time: b.time,
                        blocks: b.blocks.to_vec(),
                    }),
                }
            }
            Some("#info") => {
                let b: InfoBody = body(rest)?;
                Event {
                    seq: 0,
                    kind: EventKind::Info {
                        name: b.name,
                        message: b.message,
                    },
                }
            }
            Some(t) => return Err(FrameError::UnknownType(t.to_owned())),
            None => return Err(FrameError::Header("message without t".into())),
        },
        op => return Err(FrameError::UnknownOp(op)),
    };
    super::sanity::check(&event, super::sanity::now_micros())?;
    Ok(DecodedFrame {
        event,
        non_canonical,
    })
}

fn decode_commit(b: CommitBody<'_>, limits: &CommitLimits) -> Result<Event, FrameError> {
    let car = Car::parse(b.blocks).map_err(|e| FrameError::Car(e.to_string()))?;
    // The last op on each path: an earlier op on the same path has no lasting effect.
    let last_on_path: HashMap<&str, usize> = b
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| (op.path, i))
        .collect();
    let over = limits.check_body(b.ops.len(), b.blocks.len()).err();
    // A commit over a limit is not read any further.
    let wire_ops: &[WireOp<'_>] = if over.is_some() { &[] } else { &b.ops };
    let mut parsed = Vec::with_capacity(wire_ops.len());
    for (i, op) in wire_ops.iter().enumerate() {
        let action = match op.action {
            "create" => Action::Create,
            "update" => Action::Update,
            "delete" => Action::Delete,
            other => return Err(FrameError::Body(format!("unknown op action {other:?}"))),
        };
        let (collection, rkey) = op.path.split_once('/').unwrap_or((op.path, ""));
        let record = if !is_nsid(collection) || !is_record_key(rkey) {
            Some(OpRecord::Unavailable(Unavailable::BadPath))
        } else if action == Action::Delete {
            Some(OpRecord::None)
        } else if last_on_path.get(op.path) != Some(&i) {
            Some(OpRecord::Superseded)
        } else if b.too_big {
            Some(OpRecord::Unavailable(Unavailable::TooBig))
        } else if op.cid.is_none() {
            Some(OpRecord::Unavailable(Unavailable::NoCid))
        } else {
            // Read below, once every op's block size is known to be within the limits.
            None
        };
        parsed.push((op, action, collection, rkey, record));
    }
    // Each op's record block counts once per op, before any of them is hashed.
    let sizes = parsed
        .iter()
        .filter(|(.., record)| record.is_none())
        .filter_map(|(op, ..)| {
            op.cid
                .as_ref()
                .and_then(|cid| car.get(cid))
                .map(<[u8]>::len)
        });
    let (over, records_bytes) = match over.map_or_else(|| limits.check_records(sizes), Err) {
        Ok(total) => (None, total),
        Err(o) => (Some(o), 0),
    };
    let mut ops = Vec::new();
    if over.is_none() {
        let mut cache = BlockCache::new(&car);
        ops = Vec::with_capacity(parsed.len());
        for (op, action, collection, rkey, record) in parsed {
            let record = match (record, &op.cid) {
                (Some(r), _) => r,
                (None, Some(cid)) => cache.record(cid, collection, rkey),
                (None, None) => OpRecord::Unavailable(Unavailable::NoCid),
            };
            ops.push(RecordOp {
                action,
                collection: collection.to_owned(),
                rkey: rkey.to_owned(),
                cid: op.cid,
                prev: op.prev,
                record,
            });
        }
    }
    Ok(Event {
        seq: b.seq,
        kind: EventKind::Commit(Commit {
            repo: b.repo,
            rev: b.rev,
            since: b.since,
            commit: b.commit,
            prev_data: b.prev_data,
            time: b.time,
            too_big: b.too_big,
            ops,
            // A skipped commit keeps nothing of its CAR.
            blocks: if over.is_some() {
                Vec::new()
            } else {
                b.blocks.to_vec()
            },
            over_limit: over,
            records_bytes,
            data: None,
        }),
    })
}
