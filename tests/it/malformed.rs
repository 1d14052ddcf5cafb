//! Bad input: every inserted frame of `malformed.frames` is classified as expected, the
//! genuine frames decode exactly as in `small.frames`, and `inspect` runs in-process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use atproto_ingest::firehose::fixture::{self, FrameReader, RawFrame};
use atproto_ingest::firehose::frame::{self, FrameError, DEFAULT_MAX_FRAME_BYTES};
use atproto_ingest::inspect::{self, End, EventType, InspectOptions};

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/firehose")
        .join(name)
}

/// How we must treat each kind of inserted frame.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Skipped, counted under this `FrameError::reason()`.
    Skipped(&'static str),
    /// Decoded as an error event (`op = -1`).
    ErrorEvent,
    /// Decoded as an `#info` event.
    InfoEvent,
    /// Decoded; exactly one op's record is unavailable for this reason.
    OpUnavailable(&'static str),
    /// Decoded; exactly one op's record is invalid with this rejection kind.
    OpInvalid(&'static str),
    /// Decoded and accepted, flagged `non_canonical`.
    NonCanonicalAccepted,
}

/// `malformed.json` kind → our treatment, written out explicitly.
fn expected(kind: &str) -> Expect {
    use Expect::*;
    match kind {
        "truncated-header" => Skipped("bad_header"),
        "truncated-frame" => Skipped("bad_body"),
        "trailing-garbage" => Skipped("trailing_data"),
        "flipped-header-bytes" => Skipped("bad_header"),
        "unknown-type" => Skipped("unknown_type"),
        "error-frame" => ErrorEvent,
        "car-truncated" => Skipped("bad_car"),
        "car-missing-record-block" => OpUnavailable("block_missing"),
        "block-cid-mismatch" => OpUnavailable("block_cid_mismatch"),
        "record-is-array" => OpInvalid("not_a_map"),
        "oversized-6mb" => Skipped("oversized"),
        "non-canonical-indefinite-map" => Skipped("non_canonical"),
        "non-canonical-key-order" => NonCanonicalAccepted,
        "info-outdated-cursor" => InfoEvent,
        "empty" => Skipped("empty"),
        "header-only" => Skipped("body_missing"),
        "unknown-op" => Skipped("unknown_op"),
        other => panic!("malformed.json has a kind this test does not know: {other}"),
    }
}

/// index → kind of the inserted frames.
fn inserted() -> BTreeMap<usize, String> {
    let text = std::fs::read_to_string(fixture_path("malformed.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["inserted_frames_list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["index"].as_u64().unwrap() as usize,
                f["kind"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The decoded form of each frame of a file: Ok(JSON line) or Err(skip reason).
fn decode_all(name: &str) -> Vec<(Result<serde_json::Value, &'static str>, bool)> {
    let reader = fixture::open(&fixture_path(name)).unwrap();
    FrameReader::new(reader, DEFAULT_MAX_FRAME_BYTES)
        .map(|raw| match raw.unwrap() {
            RawFrame::Oversized { len } => (Err(FrameError::Oversized(len).reason()), false),
            RawFrame::Message(m) => match frame::decode(&m) {
                Ok(d) => (Ok(inspect::event_json(&d.event)), d.non_canonical),
                Err(e) => (Err(e.reason()), false),
            },
        })
        .collect()
}

fn op_problems(line: &serde_json::Value) -> Vec<String> {
    line["ops"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|op| {
            op.get("unavailable")
                .and_then(|u| u.as_str().map(|u| format!("unavailable:{u}")))
                .or_else(|| {
                    op.get("invalid")
                        .map(|i| format!("invalid:{}", i["kind"].as_str().unwrap_or("?")))
                })
        })
        .collect()
}

#[test]
fn malformed_frames_are_classified_and_genuine_ones_match_small() {
    let inserted = inserted();
    assert_eq!(inserted.len(), 17);
    let malformed = decode_all("malformed.frames");
    assert_eq!(malformed.len(), 167);
    let small = decode_all("small.frames");

    let mut genuine = 0;
    for (index, (decoded, non_canonical)) in malformed.iter().enumerate() {
        let Some(kind) = inserted.get(&index) else {
            // Genuine frame: identical to the next frame of small.frames, field by field.
            let (want, _) = &small[genuine];
            assert_eq!(decoded, want, "genuine frame {index} (small #{genuine})");
            assert!(
                !non_canonical,
                "genuine frame {index} flagged non-canonical"
            );
            genuine += 1;
            continue;
        };
        let exp = expected(kind);
        match (exp, decoded) {
            (Expect::Skipped(reason), Err(got)) => assert_eq!(*got, reason, "{index} {kind}"),
            (Expect::ErrorEvent, Ok(v)) => {
                assert_eq!(v["type"], "error", "{index} {kind}");
                assert_eq!(v["error"], "FutureCursor");
            }
            (Expect::InfoEvent, Ok(v)) => {
                assert_eq!(v["type"], "#info", "{index} {kind}");
                assert_eq!(v["name"], "OutdatedCursor");
            }
            (Expect::OpUnavailable(r), Ok(v)) => {
                assert_eq!(
                    op_problems(v),
                    [format!("unavailable:{r}")],
                    "{index} {kind}"
                )
            }
            (Expect::OpInvalid(r), Ok(v)) => {
                assert_eq!(op_problems(v), [format!("invalid:{r}")], "{index} {kind}")
            }
            (Expect::NonCanonicalAccepted, Ok(v)) => {
                assert!(non_canonical, "{index} {kind} not flagged");
                assert_eq!(v["type"], "#commit");
                // Same content as the genuine frame that follows it.
                assert_eq!(Some(v), malformed[index + 1].0.as_ref().ok());
            }
            (exp, got) => panic!("frame {index} ({kind}): expected {exp:?}, got {got:?}"),
        }
    }
    assert_eq!(genuine, 150);
}

#[test]
fn inspect_counts_malformed_frames_by_reason() {
    let mut out = Vec::new();
    let s = inspect::inspect_file(
        &InspectOptions::new(fixture_path("malformed.frames")),
        &mut out,
    )
    .unwrap();
    assert_eq!(s.end, End::Eof);
    assert_eq!(s.tally.frames, 167);
    let mut want = BTreeMap::new();
    for kind in inserted().values() {
        if let Expect::Skipped(r) = expected(kind) {
            *want.entry(r).or_insert(0u64) += 1;
        }
    }
    assert_eq!(s.tally.skipped, want);
    assert_eq!(s.tally.skipped_total(), 11);
    // 150 genuine + error + info + 3 commits with a bad op + the non-canonical commit.
    assert_eq!(s.printed, 156);
    assert_eq!(s.tally.events_by_type.get("error"), Some(&1));
    assert_eq!(s.tally.events_by_type.get("#info"), Some(&1));
    assert_eq!(s.tally.non_canonical, 1);
    assert_eq!(s.tally.unavailable.get("block_missing"), Some(&1));
    assert_eq!(s.tally.unavailable.get("block_cid_mismatch"), Some(&1));
    assert_eq!(
        s.tally
            .invalid
            .get(&("app.bsky.feed.like".to_owned(), "not_a_map")),
        Some(&1)
    );
    assert_eq!(lines(&out).len(), 156);
}

fn lines(out: &[u8]) -> Vec<serde_json::Value> {
    std::str::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn run(opts: InspectOptions) -> (inspect::Summary, Vec<serde_json::Value>) {
    let mut out = Vec::new();
    let s = inspect::inspect_file(&opts, &mut out).unwrap();
    (s, lines(&out))
}

#[test]
fn inspect_small_totals_match_manifest() {
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("small.manifest.json")).unwrap(),
    )
    .unwrap();
    let (s, out) = run(InspectOptions::new(fixture_path("small.frames")));
    assert_eq!(s.end, End::Eof);
    assert_eq!(s.printed, 2000);
    assert_eq!(out.len(), 2000);
    assert_eq!(s.tally.skipped_total(), 0);
    for (ty, n) in m["event_types"].as_object().unwrap() {
        let got = s.tally.events_by_type.get(ty.as_str()).copied();
        assert_eq!(got.unwrap_or(0), n.as_u64().unwrap(), "{ty}");
    }
    let ops: u64 = s.tally.ops.values().sum();
    assert_eq!(ops, m["commit_ops"]["total"].as_u64().unwrap());
    assert_eq!(s.tally.invalid.values().sum::<u64>(), 6);
    // Lines start with seq and type, in seq order.
    let seqs: Vec<i64> = out.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=2000).collect::<Vec<_>>());
    // Typed records carry their $type; every op has action, path and cid.
    let post = out
        .iter()
        .flat_map(|l| l["ops"].as_array().into_iter().flatten())
        .find(|op| {
            op["path"]
                .as_str()
                .unwrap()
                .starts_with("app.bsky.feed.post/")
        })
        .unwrap();
    assert_eq!(post["action"], "create");
    assert_eq!(post["record"]["$type"], "app.bsky.feed.post");
    assert!(post["cid"].is_string());
}

#[test]
fn inspect_limit_type_and_seq() {
    let path = fixture_path("small.frames");
    let (s, out) = run(InspectOptions {
        limit: Some(5),
        ..InspectOptions::new(&path)
    });
    assert_eq!((s.end, s.printed, out.len()), (End::Limit, 5, 5));

    let (s, out) = run(InspectOptions {
        types: vec![EventType::Identity],
        ..InspectOptions::new(&path)
    });
    assert_eq!(out.len(), 44);
    assert!(out
        .iter()
        .all(|l| l["type"] == "#identity" && l["did"].is_string()));
    assert_eq!(s.tally.events_by_type.len(), 1);

    let (_, out) = run(InspectOptions {
        seq: Some(1990),
        ..InspectOptions::new(&path)
    });
    let seqs: Vec<i64> = out.iter().map(|l| l["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1990..=2000).collect::<Vec<_>>());

    let (s, out) = run(InspectOptions {
        seq: Some(100),
        limit: Some(3),
        types: vec![EventType::Commit, EventType::Sync],
        ..InspectOptions::new(&path)
    });
    assert_eq!(s.end, End::Limit);
    assert_eq!(out.len(), 3);
    assert!(out.iter().all(|l| l["seq"].as_i64().unwrap() >= 100));
    assert!(out
        .iter()
        .all(|l| l["type"] == "#commit" || l["type"] == "#sync"));
}

#[test]
fn inspect_tiny_frame_limit_skips_everything_as_oversized() {
    let (s, out) = run(InspectOptions {
        max_frame_bytes: 10,
        limit: Some(1),
        ..InspectOptions::new(fixture_path("small.frames"))
    });
    assert!(out.is_empty());
    assert_eq!(s.tally.skipped.get("oversized"), Some(&2000));
}

/// A writer whose reader has gone away, like stdout piped into `head`.
struct ClosedPipe;

impl std::io::Write for ClosedPipe {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn inspect_ends_quietly_on_broken_pipe() {
    let opts = InspectOptions::new(fixture_path("small.frames"));
    let s = inspect::inspect_file(&opts, &mut ClosedPipe).unwrap();
    assert_eq!(s.end, End::OutputClosed);
    assert_eq!(s.printed, 0);
}

#[test]
fn inspect_missing_file_is_an_error() {
    let opts = InspectOptions::new(fixture_path("no-such.frames"));
    assert!(inspect::inspect_file(&opts, &mut Vec::new()).is_err());
}

#[test]
fn error_frame_events_have_no_seq() {
    let (_, out) = run(InspectOptions {
        types: vec![EventType::Error, EventType::Info],
        ..InspectOptions::new(fixture_path("malformed.frames"))
    });
    assert_eq!(out.len(), 2);
    assert!(out.iter().all(|l| l.get("seq").is_none()));
}
