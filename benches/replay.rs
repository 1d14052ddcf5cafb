//! Release-mode benchmark (§ issue "Replay into PostgreSQL"): replays the bench corpus into a
//! fresh database and prints events/s, rows/s and peak RSS.
//!
//! `cargo bench --bench replay` — corpus from `BENCH_FRAMES` (default
//! `../shared/fixtures/firehose/bench.frames.zst`, decompressed once under `target/`),
//! database from `BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/atproto_ingest_bench`,
//! dropped and recreated).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use atproto_ingest::cursor::CursorKey;
use atproto_ingest::db::DbConfig;
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use tokio_util::sync::CancellationToken;

fn corpus() -> Option<PathBuf> {
    let src = std::env::var("BENCH_FRAMES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/fixtures/firehose/bench.frames.zst")
        });
    if !src.exists() {
        eprintln!("bench corpus {} not found; skipping", src.display());
        return None;
    }
    if src.extension().is_some_and(|e| e == "zst") {
        let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench.frames");
        if !out.exists() {
            eprintln!("decompressing {} → {}", src.display(), out.display());
            let mut dec = zstd::stream::read::Decoder::new(std::fs::File::open(&src).ok()?).ok()?;
            let tmp = out.with_extension("partial");
            let mut f = std::fs::File::create(&tmp).ok()?;
            std::io::copy(&mut dec, &mut f).ok()?;
            std::fs::rename(&tmp, &out).ok()?;
        }
        return Some(out);
    }
    Some(src)
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let Some(path) = corpus() else { return };
    let url = std::env::var("BENCH_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/atproto_ingest_bench".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let db = DbConfig::new(url.clone());
        let name = db.database().expect("database name");
        let mut admin = DbConfig::new(url.clone()).pg_config().expect("url");
        admin.dbname("postgres");
        let (client, conn) = admin.connect(tokio_postgres::NoTls).await.expect("connect");
        tokio::spawn(conn);
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .await
            .expect("drop bench database");
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let stats = Arc::new(Stats::default());
        let cfg = PipelineConfig::new(CursorKey {
            service: String::new(),
            fence: 0,
        });
        let started = Instant::now();
        atproto_ingest::replay::replay(&db, vec![path.clone()], cfg, CancellationToken::new(), stats.clone())
            .await
            .expect("replay");
        let secs = started.elapsed().as_secs_f64();
        let events = stats.events_written.load(Ordering::Relaxed);
        let rows = stats.rows_written();
        println!("{}", stats.summary());
        println!(
            "bench replay: {events} events, {rows} rows in {secs:.2}s = {:.0} events/s, {:.0} rows/s, {:.1} MB/s; peak RSS {:.1} MB",
            events as f64 / secs,
            rows as f64 / secs,
            size as f64 / secs / 1e6,
            peak_rss_mb()
        );
    });
}
