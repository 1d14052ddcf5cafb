//! Release-mode benchmark (issue 11, "backfill records/s"): backfills the `bfbench` network
//! (298 repo CARs, ~39,500 records) from a stand-in relay/PLC/PDS into a fresh database and
//! prints repos, records/s and peak RSS.
//!
//! `cargo bench --bench backfill` — network from `BFBENCH_NETWORK` (default
//! `../shared/fixtures/firehose/bfbench.network`), database from `BENCH_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/atproto_ingest_bench`, dropped and recreated, dropped
//! again at the end), workers from `RESYNC_CONCURRENCY` (default 4), repos per group from
//! `RESYNC_GROUP_REPOS` (default 16; 1: one diffing transaction per repo). Also prints where
//! the workers' time went: per phase and per statement group, summed over the workers.

mod common;
#[path = "../tests/it/common/standin.rs"]
mod standin;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atproto_ingest::db::DbConfig;
use atproto_ingest::resync::backfill::{backfill_timed, BackfillConfig, Progress};
use atproto_ingest::resync::ResyncConfig;
use atproto_ingest::txn::RetryPolicy;
use tokio_util::sync::CancellationToken;

fn network() -> Option<PathBuf> {
    let dir = std::env::var("BFBENCH_NETWORK")
        .map(PathBuf::from)
        .unwrap_or_else(|_| common::shared("bfbench.network"));
    if !dir.join("repos.json").exists() {
        eprintln!("bench network {} not found; skipping", dir.display());
        return None;
    }
    Some(dir)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let Some(dir) = network() else { return };
    let url = common::database_url();
    let concurrency: usize = std::env::var("RESYNC_CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(4);
    let group_repos: usize = std::env::var("RESYNC_GROUP_REPOS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(atproto_ingest::resync::DEFAULT_GROUP_REPOS);
    let rt = common::runtime();
    rt.block_on(async move {
        let mut db = DbConfig::new(url.clone());
        db.pool_size = concurrency + 2;
        common::fresh_database(&url).await;
        atproto_ingest::db::prepare(&db).await.expect("create and migrate");
        let pool = atproto_ingest::db::connect(&db).await.expect("pool");

        let net = standin::StandIn::start(standin::Network::load(&dir)).await;
        let mut identity = net.identity_config();
        identity.resolve_identities = true;
        let cfg = BackfillConfig {
            relay_url: net.url().to_owned(),
            page_limit: 1000,
            identity,
            resync: ResyncConfig {
                concurrency,
                group_repos,
                poll_interval: Duration::from_millis(10),
                max_attempts: Some(1),
                ..ResyncConfig::default()
            },
            retry: RetryPolicy::default(),
        };
        let progress = Arc::new(Progress::default());
        let started = Instant::now();
        let (report, times) = backfill_timed(pool, cfg, progress.clone(), CancellationToken::new())
            .await
            .expect("backfill");
        let secs = started.elapsed().as_secs_f64();
        let records = progress.records.load(Ordering::Relaxed);
        println!(
            "backfill: {} repos listed, {} synchronized, {} inactive, {} failed; {records} records in {secs:.2} s = {:.0} records/s ({concurrency} workers, groups of {group_repos}); peak RSS {:.0} MB",
            report.listed,
            report.done,
            report.inactive,
            report.failed.len(),
            records as f64 / secs,
            common::peak_rss_mb(),
        );
        let mut times: Vec<_> = times.into_iter().collect();
        times.sort_by_key(|(_, us)| std::cmp::Reverse(*us));
        let line: Vec<String> = times
            .iter()
            .map(|(k, us)| format!("{k} {:.0} ms", *us as f64 / 1000.0))
            .collect();
        println!("  worker time: {}", line.join(", "));
        for (did, reason) in report.failed.iter().take(5) {
            println!("  failed {did}: {reason}");
        }
        common::drop_database(&url).await;
    });
}
