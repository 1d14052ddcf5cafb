//! Release-mode benchmark of commit verification end to end (§12): replays the signed
//! benchmark corpus (`bfbench.frames`, 45,000 frames of 300 accounts) into a fresh database
//! with `--verify-commits` off and on, alternating (off, on, off, on, …), and prints events/s
//! of each run and the cost of verification. Signing keys come from a stand-in PLC directory
//! on 127.0.0.1 serving `bfbench.network/did-docs.json` (the same server the tests use).
//!
//! `cargo bench --bench verify_replay [-- ROUNDS]` (default 2 rounds of off+on); the corpus
//! from `BENCH_VERIFY_FRAMES` (default `../shared/fixtures/firehose/bfbench.frames.zst`,
//! decompressed once under `target/`), the network from `BENCH_VERIFY_NETWORK` (default
//! `../shared/fixtures/firehose/bfbench.network`), the database from `BENCH_DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/atproto_ingest_bench`, dropped and recreated
//! before each run).

mod common;
#[path = "../tests/it/common/standin.rs"]
mod standin;

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use atproto_ingest::db::DbConfig;

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    let Some(path) = common::corpus("BENCH_VERIFY_FRAMES", "bfbench.frames.zst") else {
        return;
    };
    let network = std::env::var("BENCH_VERIFY_NETWORK")
        .map(PathBuf::from)
        .unwrap_or_else(|_| common::shared("bfbench.network"));
    let url = common::database_url();
    let rt = common::runtime();
    rt.block_on(async move {
        let net = standin::StandIn::start(standin::Network::load(&network)).await;
        let mut results: Vec<(bool, f64)> = Vec::new();
        for _ in 0..rounds {
            for verify in [false, true] {
                common::drop_database(&url).await;
                let mut cfg = common::replay_config();
                cfg.verify_commits = verify;
                cfg.users.identity = net.identity_config();
                cfg.users.identity.resolve_identities = false;
                let (stats, secs) =
                    common::timed_replay(&DbConfig::new(url.clone()), vec![path.clone()], cfg)
                        .await;
                let events = stats.events_written.load(Ordering::Relaxed);
                let v = &stats.verify;
                println!(
                    "verify={verify:5}: {events} events in {secs:.2}s = {:.0} events/s (verified {}, rejected {}, desynchronized {})",
                    events as f64 / secs,
                    v.verified.load(Ordering::Relaxed),
                    v.rejected.load(Ordering::Relaxed),
                    v.desynchronized.load(Ordering::Relaxed),
                );
                results.push((verify, events as f64 / secs));
            }
        }
        let mean = |on: bool| {
            let v: Vec<f64> = results.iter().filter(|r| r.0 == on).map(|r| r.1).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        let (off, on) = (mean(false), mean(true));
        println!(
            "mean: off {off:.0} events/s, on {on:.0} events/s: verification costs {:.1} % of replay throughput",
            (1.0 - on / off) * 100.0
        );
    });
}
