//! `inspect FILE`: decodes a fixture file and writes one JSON line per event; skipped frames
//! are logged once and counted, and a [`Tally`] of what was seen is returned for the summary.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;

use serde_json::{json, Map, Value};

use crate::firehose::fixture::{self, FixtureError, FrameReader, RawFrame};
use crate::firehose::frame::{self, FrameError, DEFAULT_MAX_FRAME_BYTES};
use crate::firehose::{Event, EventKind, OpRecord, RecordOp};
use crate::stats::Tally;

/// Event types `--type` selects (given with or without the leading `#`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EventType {
    #[value(alias = "#commit")]
    Commit,
    #[value(alias = "#identity")]
    Identity,
    #[value(alias = "#account")]
    Account,
    #[value(alias = "#sync")]
    Sync,
    #[value(alias = "#info")]
    Info,
    #[value(alias = "#error")]
    Error,
}

impl EventType {
    fn matches(self, kind: &EventKind) -> bool {
        matches!(
            (self, kind),
            (Self::Commit, EventKind::Commit(_))
                | (Self::Identity, EventKind::Identity(_))
                | (Self::Account, EventKind::Account(_))
                | (Self::Sync, EventKind::Sync(_))
                | (Self::Info, EventKind::Info { .. })
                | (Self::Error, EventKind::Error { .. })
        )
    }
}

/// Options of `inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectOptions {
    /// Fixture file: varint-length-prefixed subscribeRepos messages; `.zst` is decompressed.
    pub file: PathBuf,
    /// Start at the first event whose seq is at least N (every later event is printed).
    #[arg(long, value_name = "N")]
    pub seq: Option<i64>,
    /// Stop after N events have been printed.
    #[arg(long, value_name = "N")]
    pub limit: Option<u64>,
    /// Print only these event types (comma-separated or repeated):
    /// commit, identity, account, sync, info, error; a leading `#` is accepted.
    #[arg(long = "type", value_name = "T", value_enum, value_delimiter = ',')]
    pub types: Vec<EventType>,
    /// Frames longer than this many bytes are skipped unread (counted as `oversized`).
    #[arg(long, env = "MAX_FRAME_BYTES", value_name = "N", default_value_t = DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
}

impl InspectOptions {
    /// Options for `file` with every default (no filters, 5 MiB frame limit).
    pub fn new(file: impl Into<PathBuf>) -> Self {
        Self {
            file: file.into(),
            seq: None,
            limit: None,
            types: Vec::new(),
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
        }
    }
}

/// Why reading stopped.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum End {
    /// The whole file was read.
    #[default]
    Eof,
    /// `--limit` events were printed.
    Limit,
    /// The reader of our output went away (e.g. `| head`).
    OutputClosed,
    /// The file's framing broke (truncated or bad length); what came before was processed.
    Fixture(String),
}

/// What an inspect run saw: counts of the selected events, all frames and skips.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub tally: Tally,
    /// Events written to the output.
    pub printed: u64,
    pub end: End,
}

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("opening {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("writing output: {0}")]
    Output(io::Error),
}

/// Opens `opts.file` (through [`fixture::open`]) and inspects it.
pub fn inspect_file<W: Write>(opts: &InspectOptions, out: &mut W) -> Result<Summary, InspectError> {
    let reader = fixture::open(&opts.file).map_err(|source| InspectError::Open {
        path: opts.file.clone(),
        source,
    })?;
    inspect(reader, opts, out)
}

/// Decodes every frame of `input`, writing the selected events to `out` as JSON lines.
/// A closed output (broken pipe) ends the run normally with [`End::OutputClosed`].
pub(crate) fn inspect<R: BufRead, W: Write>(
    input: R,
    opts: &InspectOptions,
    out: &mut W,
) -> Result<Summary, InspectError> {
    let mut s = Summary::default();
    if opts.limit == Some(0) {
        s.end = End::Limit;
        return Ok(s);
    }
    let mut started = opts.seq.is_none();
    let mut line = Vec::with_capacity(4096);
    for (index, raw) in FrameReader::new(input, opts.max_frame_bytes).enumerate() {
        let msg = match raw {
            Ok(RawFrame::Message(m)) => m,
            Ok(RawFrame::Oversized { len }) => {
                s.tally.frames += 1;
                let e = FrameError::Oversized(len);
                tracing::warn!(index, reason = e.reason(), len, "skipped frame: {e}");
                s.tally.add_skipped(e.reason());
                continue;
            }
            Err(e) => {
                let e: FixtureError = e;
                tracing::error!(index, "fixture file unreadable from here: {e}");
                s.end = End::Fixture(e.to_string());
                break;
            }
        };
        s.tally.frames += 1;
        let decoded = match frame::decode(&msg) {
            Ok(d) => d,
            Err(e) => {
                match peek_seq(&msg) {
                    Some(seq) => {
                        tracing::warn!(index, seq, reason = e.reason(), "skipped frame: {e}")
                    }
                    None => tracing::warn!(index, reason = e.reason(), "skipped frame: {e}"),
                }
                s.tally.add_skipped(e.reason());
                continue;
            }
        };
        let ev = &decoded.event;
        if !started {
            // Info and error frames carry no seq (0): they never start the output.
            if ev.seq < opts.seq.unwrap_or(0) || ev.seq == 0 {
                continue;
            }
            started = true;
        }
        if !opts.types.is_empty() && !opts.types.iter().any(|t| t.matches(&ev.kind)) {
            continue;
        }
        s.tally.add_event(&decoded);
        line.clear();
        // Serialising JSON values into a Vec cannot fail (string keys, no I/O).
        if write_event_json(&mut line, ev).is_err() {
            continue;
        }
        line.push(b'\n');
        if let Err(e) = out.write_all(&line) {
            return closed_or_err(e, s);
        }
        s.printed += 1;
        if opts.limit.is_some_and(|l| s.printed >= l) {
            s.end = End::Limit;
            break;
        }
    }
    if let Err(e) = out.flush() {
        return closed_or_err(e, s);
    }
    Ok(s)
}

fn closed_or_err(e: io::Error, mut s: Summary) -> Result<Summary, InspectError> {
    if e.kind() == io::ErrorKind::BrokenPipe {
        s.end = End::OutputClosed;
        Ok(s)
    } else {
        Err(InspectError::Output(e))
    }
}

/// The `seq` of a frame that failed to decode, when its body still yields one.
fn peek_seq(msg: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Seq {
        seq: i64,
    }
    let hlen = crate::firehose::cbor::item_len(msg).ok()?;
    let body = msg.get(hlen..)?;
    let len = crate::firehose::cbor::item_len(body).ok()?;
    serde_ipld_dagcbor::from_slice::<Seq>(body.get(..len)?)
        .ok()
        .map(|s| s.seq)
}

/// One output line: `seq` and `type` first, then the event's fields in key order.
#[derive(serde::Serialize)]
struct Line<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<i64>,
    #[serde(rename = "type")]
    type_: &'static str,
    #[serde(flatten)]
    fields: &'a Map<String, Value>,
}

/// Writes the JSON line of one event (without the newline).
pub(crate) fn write_event_json<W: Write>(out: W, ev: &Event) -> serde_json::Result<()> {
    let fields = match event_json(ev) {
        Value::Object(mut m) => {
            m.remove("seq");
            m.remove("type");
            m
        }
        _ => Map::new(),
    };
    let line = Line {
        seq: (ev.seq != 0).then_some(ev.seq),
        type_: ev.kind.type_name(),
        fields: &fields,
    };
    serde_json::to_writer(out, &line)
}

/// The JSON form of one event: `seq` (absent for `#info` and error frames), `type`, and
/// the event's fields; commit ops carry their record, `invalid` or `unavailable`.
pub fn event_json(ev: &Event) -> Value {
    let mut m = Map::new();
    if ev.seq != 0 {
        m.insert("seq".into(), ev.seq.into());
    }
    m.insert("type".into(), ev.kind.type_name().into());
    match &ev.kind {
        EventKind::Commit(c) => {
            m.insert("repo".into(), c.repo.as_str().into());
            m.insert("time".into(), c.time.as_str().into());
            m.insert("rev".into(), c.rev.as_str().into());
            if let Some(since) = &c.since {
                m.insert("since".into(), since.as_str().into());
            }
            m.insert("commit".into(), c.commit.to_string().into());
            if c.too_big {
                m.insert("tooBig".into(), true.into());
            }
            let ops = c.ops.iter().map(op_json).collect();
            m.insert("ops".into(), Value::Array(ops));
        }
        EventKind::Identity(i) => {
            m.insert("did".into(), i.did.as_str().into());
            m.insert("time".into(), i.time.as_str().into());
            if let Some(h) = &i.handle {
                m.insert("handle".into(), h.as_str().into());
            }
        }
        EventKind::Account(a) => {
            m.insert("did".into(), a.did.as_str().into());
            m.insert("time".into(), a.time.as_str().into());
            m.insert("active".into(), a.active.into());
            if let Some(st) = &a.status {
                m.insert("status".into(), st.as_str().into());
            }
        }
        EventKind::Sync(y) => {
            m.insert("did".into(), y.did.as_str().into());
            m.insert("time".into(), y.time.as_str().into());
            m.insert("rev".into(), y.rev.as_str().into());
        }
        EventKind::Info { name, message } => {
            m.insert("name".into(), name.as_str().into());
            if let Some(msg) = message {
                m.insert("message".into(), msg.as_str().into());
            }
        }
        EventKind::Error { error, message } => {
            m.insert("error".into(), error.as_str().into());
            if let Some(msg) = message {
                m.insert("message".into(), msg.as_str().into());
            }
        }
    }
    Value::Object(m)
}

fn op_json(op: &RecordOp) -> Value {
    let mut m = Map::new();
    m.insert("action".into(), op.action.as_str().into());
    m.insert(
        "path".into(),
        format!("{}/{}", op.collection, op.rkey).into(),
    );
    m.insert(
        "cid".into(),
        op.cid.map_or(Value::Null, |c| c.to_string().into()),
    );
    if let Some(prev) = op.prev {
        m.insert("prev".into(), prev.to_string().into());
    }
    match &op.record {
        OpRecord::None => {}
        OpRecord::Known(k) => match serde_json::to_value(k.as_ref()) {
            Ok(Value::Object(mut rec)) => {
                rec.insert("$type".into(), op.collection.as_str().into());
                m.insert("record".into(), Value::Object(rec));
            }
            Ok(other) => {
                m.insert("record".into(), other);
            }
            Err(e) => {
                m.insert("record_error".into(), e.to_string().into());
            }
        },
        OpRecord::Generic(v) => {
            m.insert("record".into(), v.clone());
        }
        OpRecord::Invalid(r) => {
            m.insert(
                "invalid".into(),
                json!({ "kind": r.kind, "detail": r.detail }),
            );
        }
        OpRecord::Unavailable(u) => {
            m.insert("unavailable".into(), u.reason().into());
        }
        OpRecord::Superseded => {
            m.insert("superseded".into(), true.into());
        }
    }
    Value::Object(m)
}
