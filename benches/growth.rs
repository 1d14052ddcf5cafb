//! Release-mode benchmark (issue "Throughput": cost as the database grows): replays the bench
//! corpus, then copies of it whose repo DIDs are rewritten (records, blocks and CIDs stay
//! valid; only the `repo`/`did` fields and the seqs change), all into one database, and prints
//! each copy's events/s against the rows the database held before it.
//!
//! `cargo bench --bench growth` — corpus from `BENCH_FRAMES` (as `replay`), database from
//! `BENCH_DATABASE_URL` (dropped and recreated first), `BENCH_GROWTH_COPIES` copies in all
//! (default 9: ~2 M rows before the last; 48 reach ~10 M), `BENCH_WRITER_LANES` (default: the daemon's),
//! `BENCH_GROWTH_CONTROL_EVERY=N`: every N-th copy is also replayed into an empty database at
//! once, so load from outside the benchmark shows in both numbers and cancels in their ratio. Each
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

/// Server-side counters read around each copy: WAL written, checkpoints, and blocks read
/// from outside PostgreSQL's buffer cache (the OS cache or disk) against blocks found in it.
#[derive(Clone, Copy)]
struct Server {
    wal_bytes: f64,
    checkpoints: i64,
    blks_read: i64,
    blks_hit: i64,
}

async fn server(db: &DbConfig) -> Server {
    let pool = atproto_ingest::db::connect(db).await.expect("connect");
    let client = pool.get().await.expect("connection");
    // Backends flush their statistics at most once a second.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let row = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::float8, \
                    (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter), \
                    blks_read, blks_hit \
             FROM pg_stat_database WHERE datname = current_database()",
            &[],
        )
        .await
        .expect("server counters");
    Server {
        wal_bytes: row.get(0),
        checkpoints: row.get(1),
        blks_read: row.get(2),
        blks_hit: row.get(3),
    }
}

fn main() {
    let Some(path) = common::corpus("BENCH_FRAMES", "bench.frames.zst") else {
        return;
    };
    let copies: usize = std::env::var("BENCH_GROWTH_COPIES")
        .map(|v| v.parse().expect("BENCH_GROWTH_COPIES"))
        .unwrap_or(9);
    assert!(copies < 1024, "at most 1023 copies keep the DIDs distinct");
    let lanes = common::writer_lanes();
    let control_every: usize = std::env::var("BENCH_GROWTH_CONTROL_EVERY")
        .map(|v| v.parse().expect("BENCH_GROWTH_CONTROL_EVERY"))
        .unwrap_or(0);
    let url = common::database_url();
    let rt = common::runtime();
    rt.block_on(async move {
        common::fresh_database(&url).await;
        let db = DbConfig::new(url.clone());
        atproto_ingest::db::prepare(&db).await.expect("bench database");
        for k in 0..copies {
            let file = if k == 0 {
                path.clone()
            } else {
                copy(&path, k, 1 << 32)
            };
            let before = rows_in(&db).await;
            let s0 = server(&db).await;
            let mut cfg = common::replay_config();
            cfg.writer_lanes = lanes;
            let (stats, secs) = common::timed_replay(&db, vec![file.clone()], cfg).await;
            let events = stats.events_written.load(Ordering::Relaxed);
            println!(
                "growth: copy {k}: {before} rows before, {events} events in {secs:.2}s = {:.0} events/s, {:.0} rows/s (writer lanes {lanes})",
                events as f64 / secs,
                stats.rows_written() as f64 / secs,
            );
            let s1 = server(&db).await;
            let (read, hit) = (s1.blks_read - s0.blks_read, s1.blks_hit - s0.blks_hit);
            println!(
                "growth: copy {k}: WAL {:.0} MB ({:.0} bytes/row), {} checkpoints, {read} blocks read outside shared_buffers ({:.1} % of {} accessed)",
                (s1.wal_bytes - s0.wal_bytes) / 1e6,
                (s1.wal_bytes - s0.wal_bytes) / stats.rows_written().max(1) as f64,
                s1.checkpoints - s0.checkpoints,
                100.0 * read as f64 / (read + hit).max(1) as f64,
                read + hit,
            );
            if control_every > 0 && k % control_every == 0 {
                // The same copy into an empty database right after: the machine's load at
                // this moment, without the rows (its ratio to the copy is what size costs).
                let control_url = format!("{url}_control");
                common::fresh_database(&control_url).await;
                let control = DbConfig::new(control_url.clone());
                atproto_ingest::db::prepare(&control).await.expect("control database");
                let mut cfg = common::replay_config();
                cfg.writer_lanes = lanes;
                let (cstats, csecs) = common::timed_replay(&control, vec![file.clone()], cfg).await;
                let cevents = cstats.events_written.load(Ordering::Relaxed) as f64 / csecs;
                println!(
                    "growth: copy {k}: control into an empty database {cevents:.0} events/s; with {before} rows before: {:.2} of it",
                    events as f64 / secs / cevents,
                );
                common::drop_database(&control_url).await;
            }
            if k > 0 {
                // A copy is as large as the corpus: keep one on disk at a time.
                let _ = std::fs::remove_file(&file);
            }
        }
        println!("growth: {} rows at the end", rows_in(&db).await);
    });
}
