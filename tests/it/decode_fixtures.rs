//! Decodes the bundled fixtures end to end and checks the counts against their manifests.

use std::collections::BTreeMap;
use std::path::Path;

use atproto_ingest::firehose::fixture::{self, FrameReader, RawFrame};
use atproto_ingest::firehose::frame::{self, FrameError, DEFAULT_MAX_FRAME_BYTES};
use atproto_ingest::firehose::{EventKind, OpRecord};

fn fixture_path(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/firehose")
        .join(name)
}

#[derive(Default, Debug)]
struct Tally {
    events: BTreeMap<String, u64>,
    ops: BTreeMap<(String, String), u64>,
    skipped: Vec<(usize, &'static str)>,
    op_problems: Vec<(usize, String)>,
    non_canonical: Vec<usize>,
    decoded: u64,
}

fn tally(name: &str) -> Tally {
    let reader = fixture::open(&fixture_path(name)).unwrap();
    let mut t = Tally::default();
    for (i, raw) in FrameReader::new(reader, DEFAULT_MAX_FRAME_BYTES).enumerate() {
        let msg = match raw.unwrap() {
            RawFrame::Message(m) => m,
            RawFrame::Oversized { len } => {
                t.skipped.push((i, FrameError::Oversized(len).reason()));
                continue;
            }
        };
        match frame::decode(&msg) {
            Err(e) => t.skipped.push((i, e.reason())),
            Ok(d) => {
                t.decoded += 1;
                if d.non_canonical {
                    t.non_canonical.push(i);
                }
                *t.events
                    .entry(d.event.kind.type_name().to_owned())
                    .or_default() += 1;
                if let EventKind::Commit(c) = &d.event.kind {
                    for op in &c.ops {
                        *t.ops
                            .entry((op.action.as_str().to_owned(), op.collection.clone()))
                            .or_default() += 1;
                        match &op.record {
                            OpRecord::Unavailable(u) => {
                                t.op_problems.push((i, u.reason().to_owned()))
                            }
                            OpRecord::Invalid(r) => {
                                t.op_problems.push((i, format!("invalid:{}", r.kind)))
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
    }
    t
}

fn manifest(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture_path(name)).unwrap()).unwrap()
}

#[test]
fn small_counts_match_manifest() {
    let t = tally("small.frames");
    let m = manifest("small.manifest.json");
    assert!(t.skipped.is_empty(), "{:?}", t.skipped);
    assert_eq!(t.decoded, m["frame_count"].as_u64().unwrap());
    for (ty, n) in m["event_types"].as_object().unwrap() {
        assert_eq!(
            t.events.get(ty).copied().unwrap_or(0),
            n.as_u64().unwrap(),
            "{ty}"
        );
    }
    let mut expected = BTreeMap::new();
    for (action, by_coll) in m["commit_ops"]["by_action_and_collection"]
        .as_object()
        .unwrap()
    {
        for (coll, n) in by_coll.as_object().unwrap() {
            expected.insert((action.clone(), coll.clone()), n.as_u64().unwrap());
        }
    }
    assert_eq!(t.ops, expected);
    // The only records that fail are the ones the generator wrote with validate:false.
    let invalid: Vec<_> = t
        .op_problems
        .iter()
        .filter(|p| p.1.starts_with("invalid"))
        .collect();
    assert_eq!(invalid.len(), 6, "{:?}", t.op_problems);
    assert!(
        t.op_problems.iter().all(|p| p.1.starts_with("invalid")),
        "{:?}",
        t.op_problems
    );
}
