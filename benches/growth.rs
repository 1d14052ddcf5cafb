//! Release-mode benchmark (issue "Throughput": cost as the database grows): replays the bench
//! corpus, then copies of it whose repo DIDs are rewritten (records, blocks and CIDs stay
//! valid; only the `repo`/`did` fields and the seqs change), all into one database, and prints
//! each copy's events/s against the rows the database held before it.
//!
//! `cargo bench --bench growth` — corpus from `BENCH_FRAMES` (as `replay`), database from
//! `BENCH_DATABASE_URL` (dropped and recreated first), `BENCH_GROWTH_COPIES` copies in all
//! (default 9: ~2 M rows before the last; 48 reach ~10 M), `BENCH_WRITER_LANES` (default 1). Each
//! copy is written under `target/growth/` just before its replay and removed after it.

mod common;
#[allow(dead_code)]
#[path = "../tests/it/common/reframe.rs"]
mod reframe;

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use atproto_ingest::db::DbConfig;
use atproto_ingest::firehose::fixture::{self, FrameReader, FrameWriter, RawFrame};
use ipld_core::ipld::Ipld;

/// base32 alphabet of `did:plc` identifiers.
const PLC: &[u8] = b"abcdefghijklmnopqrstuvwxyz234567";

/// `did` as copy `k` of it: a `did:plc` whose first two identifier characters are shifted by
/// `k % 32` and `k / 32` (0 < k < 1024 never maps a DID to itself, and two copies never map
/// one DID to the same one); other methods unchanged.
fn rewrite_did(did: &str, k: usize) -> String {
    let shift = |c: u8, by: usize| PLC.iter().position(|&p| p == c).map(|i| PLC[(i + by) % 32]);
    match did.strip_prefix("did:plc:") {
        Some(id) if id.len() == 24 && id.is_ascii() => {
            let b = id.as_bytes();
            match (shift(b[0], k % 32), shift(b[1], k / 32)) {
                (Some(c0), Some(c1)) => format!("did:plc:{}{}{}", c0 as char, c1 as char, &id[2..]),
                _ => did.to_owned(),
            }
        }
        _ => did.to_owned(),
    }
}

/// Copy `k` of the corpus at `src` (seqs moved up by `k · seq_span`), written once.
fn copy(src: &Path, k: usize, seq_span: i64) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/growth");
    std::fs::create_dir_all(&dir).expect("target/growth");
    let out = dir.join(format!("copy-{k}.frames"));
    if out.exists() {
        return out;
    }
    let tmp = out.with_extension("partial");
    let mut w = FrameWriter::new(BufWriter::new(std::fs::File::create(&tmp).expect("copy")));
    let reader = FrameReader::new(fixture::open(src).expect("corpus"), usize::MAX);
    for frame in reader {
        let Ok(RawFrame::Message(msg)) = frame else {
            continue;
        };
        let mut f = reframe::Frame::parse(&msg);
        for key in ["repo", "did"] {
            if let Some(Ipld::String(did)) = f.body.get_mut(key) {
                *did = rewrite_did(did, k);
            }
        }
        if let Some(Ipld::Integer(seq)) = f.body.get("seq") {
            let seq = *seq as i64;
            f.set_seq(seq + k as i64 * seq_span);
        }
        w.write_frame(&f.encode()).expect("write copy");
    }
    w.flush().expect("flush copy");
    std::fs::rename(&tmp, &out).expect("rename copy");
    out
}

/// Rows in all tables of the database, counted exactly.
async fn rows_in(db: &DbConfig) -> i64 {
    let pool = atproto_ingest::db::connect(db).await.expect("connect");
    let client = pool.get().await.expect("connection");
    let tables = client
        .query(
            "SELECT quote_ident(relname) FROM pg_stat_user_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .expect("tables");
    let mut total = 0;
    for t in tables {
        let name: String = t.get(0);
        let n: i64 = client
            .query_one(&format!("SELECT count(*) FROM {name}"), &[])
            .await
            .expect("count")
            .get(0);
        total += n;
    }
    total
}

fn main() {
    let Some(path) = common::corpus("BENCH_FRAMES", "bench.frames.zst") else {
        return;
    };
    let copies: usize = std::env::var("BENCH_GROWTH_COPIES")
        .map(|v| v.parse().expect("BENCH_GROWTH_COPIES"))
        .unwrap_or(9);
    assert!(copies < 1024, "at most 1023 copies keep the DIDs distinct");
    let lanes: usize = std::env::var("BENCH_WRITER_LANES")
        .map(|v| v.parse().expect("BENCH_WRITER_LANES"))
        .unwrap_or(1);
    let url = common::database_url();
    let rt = common::runtime();
    rt.block_on(async move {
        common::drop_database(&url).await;
        let db = DbConfig::new(url.clone());
        atproto_ingest::db::prepare(&db).await.expect("bench database");
        for k in 0..copies {
            let file = if k == 0 {
                path.clone()
            } else {
                copy(&path, k, 1 << 32)
            };
            let before = rows_in(&db).await;
            let mut cfg = common::replay_config();
            cfg.writer_lanes = lanes;
            let (stats, secs) = common::timed_replay(&db, vec![file.clone()], cfg).await;
            let events = stats.events_written.load(Ordering::Relaxed);
            println!(
                "growth: copy {k}: {before} rows before, {events} events in {secs:.2}s = {:.0} events/s, {:.0} rows/s (writer lanes {lanes})",
                events as f64 / secs,
                stats.rows_written() as f64 / secs,
            );
            if k > 0 {
                // A copy is as large as the corpus: keep one on disk at a time.
                let _ = std::fs::remove_file(&file);
            }
        }
        println!("growth: {} rows at the end", rows_in(&db).await);
    });
}
