//! Release-mode benchmark (§ issues "Replay into PostgreSQL", "Throughput"): replays the bench
//! corpus into a fresh database and prints events/s, rows/s, peak RSS, the CPU split between
//! this process and the PostgreSQL server, and the time per statement group.
//!
//! `cargo bench --bench replay` — corpus from `BENCH_FRAMES` (default
//! `../shared/fixtures/firehose/bench.frames.zst`, decompressed once under `target/`),
//! database from `BENCH_DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/atproto_ingest_bench`,
//! dropped and recreated before each run). `BENCH_WRITER_LANES` (default `1,2,1,2,1,2`): the
//! writer lanes of each run (`N`, or `NxOPS` for batches of OPS ops), in order — runs interleaved A B A B so that the other load of a
//! shared machine falls on both; the medians per lane count close the output. Each run is a
//! fresh child process (this benchmark again), so its peak RSS and CPU are its own.
//!
//! The PostgreSQL CPU is the whole server's (postmaster, backends, WAL writer, checkpointer),
//! read from `/proc` when the server runs on this machine; other databases' load on the same
//! server counts too.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use atproto_ingest::cursor::CursorKey;
use atproto_ingest::db::DbConfig;
use atproto_ingest::pipeline::{PipelineConfig, Stats};
use tokio_util::sync::CancellationToken;

/// Set in the environment of a child process: run once with this many writer lanes.
const CHILD_LANES: &str = "BENCH_CHILD_WRITER_LANES";
/// Prefix of the child's last line: its numbers, space-separated.
const RESULT: &str = "BENCH-RESULT";

/// One run's numbers.
struct Run {
    events_per_sec: f64,
    rows_per_sec: f64,
    rss_mb: f64,
    ours_cpu: f64,
    pg_cpu: f64,
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let Some(path) = common::corpus("BENCH_FRAMES", "bench.frames.zst") else {
        return;
    };
    let url = common::database_url();
    let rt = common::runtime();
    // A child: one run, its numbers on the last line (a fresh process: its own peak RSS).
    if let Ok(n) = std::env::var(CHILD_LANES) {
        // `N` or `NxOPS`: N writer lanes, batches of OPS ops.
        let (lanes, ops) = n.split_once('x').unwrap_or((&n, ""));
        let lanes = lanes.parse().expect("lanes");
        let ops = ops
            .parse()
            .unwrap_or(atproto_ingest::pipeline::DEFAULT_BATCH_MAX_OPS);
        let run = rt.block_on(async move {
            let postmaster = common::postmaster_pid(&url).await;
            run_once(&url, &path, lanes, ops, postmaster.as_deref()).await
        });
        println!(
            "{RESULT} {} {} {} {} {}",
            run.events_per_sec, run.rows_per_sec, run.rss_mb, run.ours_cpu, run.pg_cpu
        );
        return;
    }
    let lanes: Vec<String> = std::env::var("BENCH_WRITER_LANES")
        .unwrap_or_else(|_| "1,2,1,2,1,2".into())
        .split(',')
        .map(|n| n.trim().to_owned())
        .collect();
    if rt.block_on(common::postmaster_pid(&url)).is_none() {
        eprintln!("PostgreSQL is not on this machine (or its data directory is not readable): no PostgreSQL CPU");
    }
    let exe = std::env::current_exe().expect("this benchmark's path");
    let mut runs: BTreeMap<&str, Vec<Run>> = BTreeMap::new();
    for (i, n) in lanes.iter().enumerate() {
        let out = std::process::Command::new(&exe)
            .env(CHILD_LANES, n)
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("benchmark run");
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(result) = text.lines().find_map(|l| l.strip_prefix(RESULT)) else {
            panic!("run {} (writer lanes {n}) failed: {text}", i + 1);
        };
        print!(
            "{}",
            text.lines()
                .filter(|l| !l.starts_with(RESULT))
                .map(|l| format!("{l}\n"))
                .collect::<String>()
        );
        let v: Vec<f64> = result
            .split_whitespace()
            .map(|x| x.parse().expect("number"))
            .collect();
        let run = Run {
            events_per_sec: v[0],
            rows_per_sec: v[1],
            rss_mb: v[2],
            ours_cpu: v[3],
            pg_cpu: v[4],
        };
        println!(
            "run {}: writer lanes {n}: {:.0} events/s, {:.0} rows/s, peak RSS {:.1} MB, CPU ours {:.2}s, PostgreSQL {:.2}s",
            i + 1,
            run.events_per_sec,
            run.rows_per_sec,
            run.rss_mb,
            run.ours_cpu,
            run.pg_cpu
        );
        runs.entry(n.as_str()).or_default().push(run);
    }
    for (n, rs) in &runs {
        let med = |f: fn(&Run) -> f64| common::median(rs.iter().map(f).collect());
        println!(
            "median of {} runs, writer lanes {n}: {:.0} events/s, {:.0} rows/s, peak RSS {:.1} MB, CPU ours {:.2}s, PostgreSQL {:.2}s",
            rs.len(),
            med(|r| r.events_per_sec),
            med(|r| r.rows_per_sec),
            med(|r| r.rss_mb),
            med(|r| r.ours_cpu),
            med(|r| r.pg_cpu)
        );
    }
}

async fn run_once(
    url: &str,
    path: &std::path::Path,
    lanes: usize,
    batch_max_ops: usize,
    postmaster: Option<&str>,
) -> Run {
    common::fresh_database(url).await;
    // Creates the database and runs the migrations outside the measured time.
    let db = DbConfig::new(url.to_owned());
    atproto_ingest::db::prepare(&db)
        .await
        .expect("bench database");
    let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let stats = Arc::new(Stats::default());
    let mut cfg = PipelineConfig::new(CursorKey {
        service: String::new(),
        fence: 0,
    });
    cfg.writer_lanes = lanes;
    cfg.batch_max_ops = batch_max_ops;
    let pg0 = postmaster.map(common::pg_cpu_secs);
    let ours0 = common::self_cpu_secs();
    let started = Instant::now();
    atproto_ingest::replay::replay(
        &db,
        vec![path.to_owned()],
        cfg,
        CancellationToken::new(),
        stats.clone(),
    )
    .await
    .expect("replay");
    let secs = started.elapsed().as_secs_f64();
    let ours_cpu = common::self_cpu_secs() - ours0;
    let pg_cpu = postmaster.map_or(0.0, common::pg_cpu_secs) - pg0.unwrap_or(0.0);
    let events = stats.events_written.load(Ordering::Relaxed);
    let rows = stats.rows_written();
    println!("{}", stats.summary());
    let run = Run {
        events_per_sec: events as f64 / secs,
        rows_per_sec: rows as f64 / secs,
        rss_mb: common::peak_rss_mb(),
        ours_cpu,
        pg_cpu,
    };
    println!(
        "bench replay: {events} events, {rows} rows in {secs:.2}s = {:.0} events/s, {:.0} rows/s, {:.1} MB/s; peak RSS {:.1} MB; CPU: ours {ours_cpu:.2}s, PostgreSQL {pg_cpu:.2}s",
        run.events_per_sec,
        run.rows_per_sec,
        size as f64 / secs / 1e6,
        run.rss_mb,
    );
    run
}
