//! Relay input that is legal CBOR but not sane (§3): event DIDs and `rev`s that are not
//! identifiers, a `rev` an hour in the future, and a seq far beyond the others. Each hostile
//! frame is a re-encoded copy of a real `small.frames` frame, inserted before the genuine one:
//! the hostile copies are skipped (counted by reason) or dropped, and the end state equals the
//! truth, replayed from a file and served live by the test relay.
use crate::common::reframe::Frame;
use crate::{common, live_common};

use std::sync::Arc;
use std::time::Duration;

use atproto_ingest::app;
use atproto_ingest::cursor::CursorKey;
use atproto_ingest::firehose::fixture::{open, FrameReader, RawFrame};
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use atproto_ingest::replay::replay;
use atproto_ingest::testrelay::{TestRelay, TestRelayConfig};
use atrium_api::types::string::Tid;
use atrium_api::types::LimitedU32;
use ipld_core::ipld::Ipld;
use live_common::{app_config, cursor, service, wait_cursor, LAST_SEQ};
use tokio_util::sync::CancellationToken;

fn small_frames() -> Vec<Vec<u8>> {
    FrameReader::new(open(&common::fixture("small.frames")).unwrap(), usize::MAX)
        .map(|f| match f.unwrap() {
            RawFrame::Message(m) => m,
            RawFrame::Oversized { .. } => unreachable!("small.frames has no big frame"),
        })
        .collect()
}

/// The header's `t` of a frame.
fn type_of(msg: &[u8]) -> &'static str {
    atproto_ingest::firehose::decode(msg)
        .unwrap()
        .event
        .kind
        .type_name()
}

/// Index of the `n`-th frame of type `t` (from 0).
fn nth(frames: &[Vec<u8>], t: &str, n: usize) -> usize {
    frames
        .iter()
        .enumerate()
        .filter(|(_, f)| type_of(f) == t)
        .nth(n)
        .unwrap()
        .0
}

/// A copy of `frames[i]` with `field` set to `value`.
fn with_field(frames: &[Vec<u8>], i: usize, field: &str, value: &str) -> Vec<u8> {
    let mut f = Frame::parse(&frames[i]);
    f.body.insert(field.into(), Ipld::String(value.into()));
    f.encode()
}

/// A TID for an hour from now.
fn rev_in_an_hour() -> String {
    let t = chrono::Utc::now() + chrono::Duration::hours(1);
    Tid::from_datetime(LimitedU32::MIN, t).as_str().to_owned()
}

/// `small.frames` with five hostile copies, each right before its genuine frame (same seq).
/// Applied, any of them would break the truth: a bogus actor and its records, or a rev that
/// makes every later commit of the repo look already applied.
fn hostile_corpus() -> Vec<Vec<u8>> {
    let frames = small_frames();
    let (c1, c2, c3) = (
        nth(&frames, "#commit", 10),
        nth(&frames, "#commit", 20),
        nth(&frames, "#commit", 30),
    );
    let (id, acct) = (nth(&frames, "#identity", 2), nth(&frames, "#account", 2));
    let mut hostile = [
        (c1, with_field(&frames, c1, "repo", "did:plc:not a did")),
        (c2, with_field(&frames, c2, "rev", "2024-01-01T00:00")),
        (c3, with_field(&frames, c3, "rev", &rev_in_an_hour())),
        (id, with_field(&frames, id, "did", "plc:no-scheme")),
        (acct, with_field(&frames, acct, "did", "did:Bad:x")),
    ];
    hostile.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    let mut corpus = frames;
    for (i, f) in hostile {
        corpus.insert(i, f);
    }
    corpus
}

#[sqlx::test(migrations = false)]
async fn bad_dids_bad_revs_and_future_revs_are_skipped_and_counted(pool: sqlx::PgPool) {
    let corpus = hostile_corpus();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.frames");
    common::reframe::write_fixture(&path, &corpus);

    let stats = Arc::new(Stats::default());
    replay(
        &common::db_config(&pool),
        vec![path],
        PipelineConfig::new(CursorKey {
            service: String::new(),
            fence: 0,
        }),
        CancellationToken::new(),
        stats.clone(),
    )
    .await
    .unwrap();
    assert_eq!(stats.skipped("bad_did"), 3, "{}", stats.summary());
    assert_eq!(stats.skipped("bad_rev"), 1);
    assert_eq!(stats.skipped("future_rev"), 1);
    assert_eq!(stats.skipped_total(), 5);
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    common::assert_aggregates_consistent(&pool).await;
}

#[sqlx::test(migrations = false)]
async fn live_hostile_frames_and_a_lone_seq_far_ahead_leave_the_truth_and_the_cursor(
    pool: sqlx::PgPool,
) {
    // The hostile copies above, and a copy of seq 1000 renumbered a billion ahead, served
    // right after the genuine seq 1000.
    let genuine = small_frames()[999].clone();
    let mut far = Frame::parse(&genuine);
    assert_eq!(far.seq(), 1000);
    far.set_seq(1_000_000_000);
    let mut frames = hostile_corpus();
    let at = frames.iter().position(|f| *f == genuine).unwrap();
    frames.insert(at + 1, far.encode());
    let relay = TestRelay::start(frames, TestRelayConfig::default())
        .await
        .unwrap();
    let prefix = live_common::prefix("seq-jump");
    let mut cfg = app_config(&pool, &relay, &prefix);
    cfg.start_cursor = Some(0);
    let shutdown = CancellationToken::new();
    let run = tokio::spawn(app::run(cfg, shutdown.clone()));
    let svc = service(&relay);
    wait_cursor(&pool, &svc, LAST_SEQ, Duration::from_secs(60)).await;
    // The last frames are written: nothing is left that could move the cursor further.
    tokio::time::sleep(Duration::from_millis(200)).await;
    shutdown.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(
        cursor(&pool, &svc).await.map(|(seq, _)| seq),
        Some(LAST_SEQ),
        "the cursor ends at the last genuine seq, not at the outlier"
    );
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    common::assert_aggregates_consistent(&pool).await;
    live_common::cleanup(&prefix).await;
}
