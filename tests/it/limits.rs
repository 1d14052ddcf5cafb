//! Commits over the sync spec's decode limits (§3), built from real frames of `small.frames`:
//! a commit of 1,000 create ops sharing one 900 KB record block (under a correct CID) is
//! skipped whole, counted by reason, and its repo desynchronized with that reason; every DID
//! still ends at its truth, and the cursor reaches the last seq. The binary replays a file
//! with many such commits within its memory budget (peak RSS read from `/proc`).

use std::collections::BTreeMap;
use std::sync::Arc;

use ipld_core::ipld::Ipld;
use tokio_util::sync::CancellationToken;

use crate::common::reframe::{write_fixture, Frame};
use crate::common::{self, fixture};
use atproto_ingest::cursor::CursorKey;
use atproto_ingest::firehose::fixture::{open, FrameReader, RawFrame};
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use atproto_ingest::replay::replay;

const LAST_SEQ: i64 = 2000;
const HOSTILE_OPS: usize = 1000;
const HOSTILE_RECORD_BYTES: usize = 900_000;

fn frames() -> Vec<Vec<u8>> {
    FrameReader::new(open(&fixture("small.frames")).unwrap(), usize::MAX)
        .map(|f| match f.unwrap() {
            RawFrame::Message(m) => m,
            RawFrame::Oversized { .. } => unreachable!(),
        })
        .collect()
}

fn is_commit(msg: &[u8]) -> bool {
    let f = Frame::parse(msg);
    serde_ipld_dagcbor::from_slice::<BTreeMap<String, Ipld>>(&f.header)
        .is_ok_and(|h| h.get("t") == Some(&Ipld::String("#commit".into())))
}

/// A copy of the real commit `msg` (which must have a create op) with `seq`, whose `ops`
/// alternate between `HOSTILE_OPS` creates all pointing at one block: the first create's
/// record padded to about `HOSTILE_RECORD_BYTES`, stored under its correct CID.
fn hostile_copy(msg: &[u8], seq: i64) -> Option<(String, Vec<u8>)> {
    sharing_copy(msg, seq, HOSTILE_OPS, HOSTILE_RECORD_BYTES)
}

/// A copy of the real commit `msg` with `seq` whose ops are `n` creates sharing one record
/// block: its first create's record padded by `pad` bytes, under its correct CID.
fn sharing_copy(msg: &[u8], seq: i64, n: usize, pad: usize) -> Option<(String, Vec<u8>)> {
    if !is_commit(msg) {
        return None;
    }
    let mut f = Frame::parse(msg);
    let ops = f.ops();
    let i = ops
        .iter()
        .position(|o| o.get("action") == Some(&Ipld::String("create".into())))?;
    let Some(Ipld::String(path)) = ops[i].get("path").cloned() else {
        return None;
    };
    let collection = path.split_once('/')?.0.to_owned();
    let mut record = f.record(i);
    record.insert("pad".into(), Ipld::String("x".repeat(pad)));
    let cid = f.set_record(i, record);
    let template = &ops[i];
    let hostile = (0..n)
        .map(|j| {
            let mut op = template.clone();
            op.insert(
                "path".into(),
                Ipld::String(format!("{collection}/hostile{j}")),
            );
            op.insert("cid".into(), Ipld::Link(cid));
            op
        })
        .collect();
    f.set_ops(hostile);
    f.set_seq(seq);
    let Some(Ipld::String(repo)) = f.body.get("repo").cloned() else {
        return None;
    };
    Some((repo, f.encode()))
}

/// `small.frames` with a hostile copy of each of the `n` commits from frame `from` on, all
/// inserted before frame `from` (so each comes before its original and its repo's rev has not
/// reached it yet), with the seq of the frame before them. Returns the hostile repos too.
fn with_hostile_commits(from: usize, n: usize) -> (Vec<Vec<u8>>, Vec<String>) {
    let mut all = frames();
    let seq = Frame::parse(&all[from - 1]).seq();
    let mut hostile = Vec::new();
    let mut repos = Vec::new();
    for msg in &all[from..] {
        if hostile.len() == n {
            break;
        }
        if let Some((repo, h)) = hostile_copy(msg, seq) {
            repos.push(repo);
            hostile.push(h);
        }
    }
    assert_eq!(hostile.len(), n, "not enough commits with a create op");
    all.splice(from..from, hostile);
    (all, repos)
}

/// Each limit on a real commit re-encoded: a shared block counts once per op, a record over
/// the record limit or a CAR over the `blocks` limit skips the commit, and within the limits
/// every op sharing the block gets the same decoded record.
#[test]
fn each_limit_skips_the_commit_with_its_reason() {
    use atproto_ingest::firehose::{decode_with, CommitLimits, EventKind, OpRecord, OverLimit};
    let all = frames();
    let msg = all
        .iter()
        .find(|m| sharing_copy(m, 1, 1, 1).is_some())
        .unwrap();
    let decode = |n: usize, pad: usize, limits: &CommitLimits| {
        let (_, f) = sharing_copy(msg, 1, n, pad).unwrap();
        match decode_with(&f, limits).unwrap().event.kind {
            EventKind::Commit(c) => c,
            other => panic!("{}", other.type_name()),
        }
    };
    let spec = CommitLimits::default();
    // Two ops share a 900 KB block: 1.8 MB counted, within the 2 MB limit.
    let c = decode(2, HOSTILE_RECORD_BYTES, &spec);
    assert_eq!(c.over_limit, None);
    assert_eq!(c.ops.len(), 2);
    assert!(c.ops.iter().all(|op| !matches!(
        op.record,
        OpRecord::Unavailable(_) | OpRecord::None | OpRecord::Superseded
    )));
    assert!(c.records_bytes > 2 * HOSTILE_RECORD_BYTES);
    // Three: 2.7 MB counted once per op.
    let c = decode(3, HOSTILE_RECORD_BYTES, &spec);
    assert_eq!(c.over_limit, Some(OverLimit::RecordsTooLarge));
    assert!(c.ops.is_empty() && c.blocks.is_empty());
    assert_eq!(
        decode(1, 1_100_000, &spec).over_limit,
        Some(OverLimit::RecordTooLarge)
    );
    let small_car = CommitLimits {
        max_blocks_bytes: 10_000,
        ..spec
    };
    assert_eq!(
        decode(1, 20_000, &small_car).over_limit,
        Some(OverLimit::BlocksTooLarge)
    );
    assert_eq!(
        decode(201, 10, &spec).over_limit,
        Some(OverLimit::TooManyOps)
    );
    assert_eq!(decode(200, 10, &spec).over_limit, None);
}

#[sqlx::test(migrations = false)]
async fn a_commit_over_the_op_limit_is_skipped_and_its_repo_desynchronized(pool: sqlx::PgPool) {
    let (frames, repos) = with_hostile_commits(700, 1);
    assert!(
        frames[700].len() > HOSTILE_RECORD_BYTES && frames[700].len() < 2_000_000,
        "one shared block, not 1,000 copies: {} bytes",
        frames[700].len()
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.frames");
    write_fixture(&path, &frames);

    let db = common::db_config(&pool);
    let stats = Arc::new(Stats::default());
    let cfg = PipelineConfig::new(CursorKey {
        service: String::new(),
        fence: 0,
    });
    let started = std::time::Instant::now();
    replay(
        &db,
        vec![path],
        cfg,
        CancellationToken::new(),
        stats.clone(),
    )
    .await
    .unwrap();
    eprintln!("{}\nin {:?}", stats.summary(), started.elapsed());
    assert_eq!(stats.over_limit("too_many_ops"), 1);
    assert_eq!(stats.skipped_total(), 0);

    let state: (String, Option<String>, bool) =
        sqlx::query_as("SELECT sync_state, sync_reason, needs_resync FROM actors WHERE did = $1")
            .bind(&repos[0])
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        state,
        ("desynchronized".into(), Some("too_many_ops".into()), true)
    );
    let queued: Option<String> =
        sqlx::query_scalar("SELECT reason FROM resync_queue WHERE did = $1")
            .bind(&repos[0])
            .fetch_optional(&pool)
            .await
            .unwrap();
    assert_eq!(queued.as_deref(), Some("too_many_ops"));
    // Nothing of the hostile commit was written; everything else is as in the truth.
    let hostile_rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM posts WHERE uri LIKE '%/hostile%') \
              + (SELECT count(*) FROM likes WHERE uri LIKE '%/hostile%') \
              + (SELECT count(*) FROM records WHERE uri LIKE '%/hostile%')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(hostile_rows, 0);
    common::assert_matches_truth(&pool, &common::truth("small")).await;
    let cursor = common::replay_cursor(&pool).await;
    assert_eq!(cursor, LAST_SEQ);
}

/// Peak RSS (`VmHWM`) of `atproto-ingest replay` on `small.frames` with `n` hostile commits in
/// a row, with `--memory-budget-mb budget_mb`: polled from `/proc/<pid>/status` until the
/// process exits (the hostile run sits mid-file, so the peak is passed well before the end).
fn replay_peak_rss(pool: &sqlx::PgPool, file: &std::path::Path, budget_mb: u64) -> u64 {
    use std::process::{Command, Stdio};
    let db = common::db_config(pool).url;
    let mut child = Command::new(env!("CARGO_BIN_EXE_atproto-ingest"))
        .args(["replay", file.to_str().unwrap(), "--database-url", &db])
        .args(["--memory-budget-mb", &budget_mb.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let status_path = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let status = loop {
        if let Ok(s) = std::fs::read_to_string(&status_path) {
            if let Some(kb) = s
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_kb = peak_kb.max(kb);
            }
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert!(status.success(), "replay exited with {status}");
    peak_kb * 1024
}

#[sqlx::test(migrations = false)]
async fn many_hostile_commits_replay_within_the_memory_budget(pool: sqlx::PgPool) {
    const HOSTILE: usize = 120;
    const BUDGET_MB: u64 = 128;
    let (frames, repos) = with_hostile_commits(1000, HOSTILE);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hostile.frames");
    write_fixture(&path, &frames);
    let size = std::fs::metadata(&path).unwrap().len();
    let started = std::time::Instant::now();
    let peak = {
        let (pool, path) = (pool.clone(), path.clone());
        tokio::task::spawn_blocking(move || replay_peak_rss(&pool, &path, BUDGET_MB))
            .await
            .unwrap()
    };
    eprintln!(
        "replay of {size} bytes ({HOSTILE} hostile commits of {HOSTILE_OPS} ops sharing a \
         {HOSTILE_RECORD_BYTES}-byte block) with --memory-budget-mb {BUDGET_MB}: peak RSS \
         {:.1} MB in {:?}",
        peak as f64 / 1e6,
        started.elapsed()
    );
    assert!(
        peak < BUDGET_MB * 1_000_000,
        "peak RSS {peak} over the budget"
    );
    let desynced: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM actors WHERE did = ANY($1) AND sync_reason = 'too_many_ops'",
    )
    .bind(&repos)
    .fetch_one(&pool)
    .await
    .unwrap();
    let distinct: std::collections::BTreeSet<&String> = repos.iter().collect();
    assert_eq!(desynced as usize, distinct.len());
    common::assert_matches_truth(&pool, &common::truth("small")).await;
}
