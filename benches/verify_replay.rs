//! Release-mode benchmark of commit verification end to end (§12): replays the signed
//! benchmark corpus (`bfbench.frames`, 45,000 frames of 300 accounts) into a fresh database
//! with `--verify-commits` off and on, alternating (off, on, off, on, …), and prints events/s
//! of each run, the CPU-seconds it took (this process and the PostgreSQL server apart), and
//! the medians: the on/off throughput ratio, and whether verification's extra CPU still fits
//! the cores the machine has in the time the target ratio allows. Signing keys come from a stand-in PLC directory
//! on 127.0.0.1 serving `bfbench.network/did-docs.json` (the same server the tests use).
//!
//! `cargo bench --bench verify_replay [-- ROUNDS]` (default 2 rounds of off+on); the corpus
//! from `BENCH_VERIFY_FRAMES` (default `../shared/fixtures/firehose/bfbench.frames.zst`,
//! decompressed once under `target/`), the network from `BENCH_VERIFY_NETWORK` (default
//! `../shared/fixtures/firehose/bfbench.network`), the database from `BENCH_DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/atproto_ingest_bench`, dropped and recreated
//! before each run), the writer lanes from `BENCH_WRITER_LANES` (default: the daemon's).

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
    let lanes = common::writer_lanes();
    let rt = common::runtime();
    rt.block_on(async move {
        let net = standin::StandIn::start(standin::Network::load(&network)).await;
        let postmaster = common::postmaster_pid(&url).await;
        if postmaster.is_none() {
            println!("(PostgreSQL is not local: its CPU is not measured)");
        }
        let mut results: Vec<Run> = Vec::new();
        for _ in 0..rounds {
            for verify in [false, true] {
                common::fresh_database(&url).await;
                let mut cfg = common::replay_config();
                cfg.verify_commits = verify;
                cfg.writer_lanes = lanes;
                cfg.users.identity = net.identity_config();
                cfg.users.identity.resolve_identities = false;
                let pg0 = postmaster.as_deref().map(common::pg_cpu_secs);
                let ours0 = common::self_cpu_secs();
                let (stats, secs) =
                    common::timed_replay(&DbConfig::new(url.clone()), vec![path.clone()], cfg)
                        .await;
                let ours = common::self_cpu_secs() - ours0;
                let pg = postmaster.as_deref().map_or(0.0, common::pg_cpu_secs) - pg0.unwrap_or(0.0);
                let events = stats.events_written.load(Ordering::Relaxed);
                let v = &stats.verify;
                println!(
                    "verify={verify:5}: {events} events in {secs:.2}s = {:.0} events/s, CPU ours {ours:.2}s + PostgreSQL {pg:.2}s (verified {}, rejected {}, desynchronized {})",
                    events as f64 / secs,
                    v.verified.load(Ordering::Relaxed),
                    v.rejected.load(Ordering::Relaxed),
                    v.desynchronized.load(Ordering::Relaxed),
                );
                results.push(Run {
                    verify,
                    rate: events as f64 / secs,
                    secs,
                    ours,
                    pg,
                });
            }
        }
        report(&results);
    });
}

/// One replay's throughput, wall time and CPU-seconds.
struct Run {
    verify: bool,
    rate: f64,
    secs: f64,
    ours: f64,
    pg: f64,
}

/// The on/off throughput ratio the verification work aims at (issue 11).
const TARGET_RATIO: f64 = 0.75;

/// Prints the medians of the off and on runs and the CPU budget of the target ratio.
fn report(results: &[Run]) {
    let med = |on: bool, f: fn(&Run) -> f64| {
        common::median(results.iter().filter(|r| r.verify == on).map(f).collect())
    };
    let (off, on) = (med(false, |r| r.rate), med(true, |r| r.rate));
    let (off_secs, on_secs) = (med(false, |r| r.secs), med(true, |r| r.secs));
    let cpu = |on: bool| (med(on, |r| r.ours), med(on, |r| r.pg));
    let ((off_ours, off_pg), (on_ours, on_pg)) = (cpu(false), cpu(true));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    println!(
        "median: off {off:.0} events/s in {off_secs:.2}s (CPU ours {off_ours:.2}s + PostgreSQL {off_pg:.2}s), on {on:.0} events/s in {on_secs:.2}s (CPU ours {on_ours:.2}s + PostgreSQL {on_pg:.2}s): on/off = {:.2}",
        on / off.max(f64::MIN_POSITIVE)
    );
    // At the target ratio the on run may last off/TARGET_RATIO; its CPU must fit in that.
    let allowed = off_secs / TARGET_RATIO;
    println!(
        "CPU budget of on/off >= {TARGET_RATIO}: {cores:.0} cores x {allowed:.2}s = {:.2} CPU-s; the on run used {:.2} CPU-s ({:.0} % of {cores:.0} cores during its {on_secs:.2}s)",
        cores * allowed,
        on_ours + on_pg,
        (on_ours + on_pg) / (cores * on_secs.max(f64::MIN_POSITIVE)) * 100.0
    );
}
