//! Pool monitor against a real pool of 10: WARNING at 8 in use, CRITICAL with waiters,
//! gauges, the 100-sample ring buffer and the sampling loop.

#[path = "it/common/mod.rs"]
mod common;
use common::deadpool;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atproto_ingest::metrics;
use atproto_ingest::pool_monitor::{PoolMonitor, Report, Severity, SAMPLE_HISTORY};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// The pool gauges live in the process-wide recorder and both tests set them (pools of 10 and
/// of 4): run one at a time, or a render of one test can show the other's sample.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Samples with a subscriber that writes log lines to a buffer; returns both.
fn sample_logged(mon: &PoolMonitor) -> (Report, String) {
    let buf = Buf::default();
    let writer = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let report = tracing::subscriber::with_default(sub, || mon.sample_now());
    let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (report, text)
}

#[sqlx::test(migrations = "./migrations")]
async fn warns_at_80_and_is_critical_with_waiters(pg: PgPool) {
    let _serial = SERIAL.lock().await;
    let handle = metrics::install();
    let pool = deadpool(&pg, 10).await;
    let mon = PoolMonitor::new(pool.clone(), Duration::from_secs(60));

    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(pool.get().await.unwrap());
    }
    let (r, log) = sample_logged(&mon);
    assert_eq!(r.severity, Severity::Warning);
    assert_eq!(
        (r.sample.in_use, r.sample.max_size, r.sample.waiting),
        (8, 10, 0)
    );
    assert!((r.sample.utilization - 0.8).abs() < 1e-9);
    assert!(log.contains("WARN"), "{log}");
    assert!(
        log.contains("pool utilization WARNING: 8/10 connections in use (80.0%), 0 tasks waiting"),
        "{log}"
    );
    assert!(log.contains("in_use=8") && log.contains("max=10"), "{log}");
    let text = handle.render();
    assert!(text.contains("atproto_ingest_db_pool_in_use 8"), "{text}");
    assert!(text.contains("atproto_ingest_db_pool_max 10"), "{text}");
    assert!(
        text.contains("atproto_ingest_db_pool_utilization_ratio 0.8"),
        "{text}"
    );

    for _ in 0..2 {
        held.push(pool.get().await.unwrap());
    }
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let p = pool.clone();
            tokio::spawn(async move { p.get().await.map(drop) })
        })
        .collect();
    for _ in 0..200 {
        if pool.status().waiting == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (r, log) = sample_logged(&mon);
    assert_eq!(r.severity, Severity::Critical);
    assert_eq!(
        (r.sample.in_use, r.sample.idle, r.sample.waiting),
        (10, 0, 3)
    );
    assert!(log.contains("ERROR"), "{log}");
    assert!(
        log.contains("pool utilization CRITICAL: 10/10 connections in use (100.0%), 3 tasks waiting for a connection; avg 5 samples 90%"),
        "{log}"
    );
    let text = handle.render();
    assert!(text.contains("atproto_ingest_db_pool_waiting 3"), "{text}");
    assert!(
        text.contains("atproto_ingest_db_pool_utilization_avg_ratio{window=\"5\"} 0.9"),
        "{text}"
    );

    drop(held);
    for w in waiters {
        w.await.unwrap().unwrap();
    }
    let (r, _) = sample_logged(&mon);
    assert_eq!((r.severity, r.sample.in_use), (Severity::Ok, 0));
    pool.close();
}

#[sqlx::test(migrations = "./migrations")]
async fn keeps_the_last_100_samples_and_runs_on_an_interval(pg: PgPool) {
    let _serial = SERIAL.lock().await;
    let pool = deadpool(&pg, 4).await;
    let mon = Arc::new(PoolMonitor::new(pool.clone(), Duration::from_millis(20)));
    for _ in 0..105 {
        mon.sample_now();
    }
    assert_eq!(mon.samples().len(), SAMPLE_HISTORY);
    assert_eq!(mon.average_utilization(5), 0.0);

    let cancel = CancellationToken::new();
    let task = {
        let (mon, cancel) = (mon.clone(), cancel.clone());
        tokio::spawn(async move { mon.run(cancel).await })
    };
    let held = pool.get().await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    cancel.cancel();
    task.await.unwrap();
    let last = mon.samples().last().copied().unwrap();
    assert_eq!(
        last.in_use, 1,
        "the loop sampled while a connection was held"
    );
    assert!(mon.average_utilization(3) > 0.0);
    drop(held);
    pool.close();
}
