//! Release-mode benchmark (§ issue "Replay into PostgreSQL"): replays the bench corpus into a
//! fresh database and prints events/s, rows/s and peak RSS.
//!
//! `cargo bench --bench replay` — corpus from `BENCH_FRAMES` (default
//! `../shared/fixtures/firehose/bench.frames.zst`, decompressed once under `target/`),
//! database from `BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/atproto_ingest_bench`,
//! dropped and recreated).

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use atproto_ingest::cursor::CursorKey;
use atproto_ingest::db::DbConfig;
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use tokio_util::sync::CancellationToken;

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let Some(path) = common::corpus("BENCH_FRAMES", "bench.frames.zst") else {
        return;
    };
    let url = common::database_url();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        common::drop_database(&url).await;
        let db = DbConfig::new(url.clone());
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
            common::peak_rss_mb()
        );
    });
}
