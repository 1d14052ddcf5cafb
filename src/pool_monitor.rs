//! Pool monitor (§8): samples the runtime pool every interval, keeps the last
//! [`SAMPLE_HISTORY`] samples, exports gauges, and logs WARNING / CRITICAL lines an on-call
//! engineer can act on without reading the code.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// §8: sample once a minute unless configured otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
/// §8: the last 100 samples (100 minutes at the default interval).
pub const SAMPLE_HISTORY: usize = 100;
/// Short average window: the last 5 samples show a trend without one spike dominating.
pub const SHORT_WINDOW: usize = 5;
/// Utilization at which we log a WARNING (§8).
pub const WARNING_RATIO: f64 = 0.80;
/// Utilization at which we log a CRITICAL line (§8).
pub const CRITICAL_RATIO: f64 = 0.95;

/// One reading of `pool.status()`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub at: Instant,
    pub size: usize,
    pub max_size: usize,
    pub in_use: usize,
    pub idle: usize,
    pub waiting: usize,
    /// `in_use / max_size`, 0 when `max_size` is 0.
    pub utilization: f64,
}

/// How worried to be about a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Ok,
    Warning,
    Critical,
}

impl Severity {
    pub fn of(utilization: f64) -> Self {
        if utilization >= CRITICAL_RATIO {
            Self::Critical
        } else if utilization >= WARNING_RATIO {
            Self::Warning
        } else {
            Self::Ok
        }
    }
}

/// A sample with its classification and the averages after it was recorded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Report {
    pub sample: Sample,
    pub severity: Severity,
    pub avg_short: f64,
    pub avg_long: f64,
}

/// Samples a pool; share it behind an `Arc` to read history from elsewhere.
pub struct PoolMonitor {
    pool: Pool,
    interval: Duration,
    samples: Mutex<VecDeque<Sample>>,
}

impl PoolMonitor {
    pub fn new(pool: Pool, interval: Duration) -> Self {
        Self {
            pool,
            interval,
            samples: Mutex::new(VecDeque::with_capacity(SAMPLE_HISTORY)),
        }
    }

    /// Takes one sample now: records it, sets the gauges, logs at WARNING/CRITICAL.
    pub fn sample_now(&self) -> Report {
        let st = self.pool.status();
        let in_use = st.size.saturating_sub(st.available);
        let sample = Sample {
            at: Instant::now(),
            size: st.size,
            max_size: st.max_size,
            in_use,
            idle: st.available,
            waiting: st.waiting,
            utilization: ratio(in_use, st.max_size),
        };
        let (avg_short, avg_long) = {
            let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
            if samples.len() == SAMPLE_HISTORY {
                samples.pop_front();
            }
            samples.push_back(sample);
            (
                average(&samples, SHORT_WINDOW),
                average(&samples, SAMPLE_HISTORY),
            )
        };
        let report = Report {
            sample,
            severity: Severity::of(sample.utilization),
            avg_short,
            avg_long,
        };
        export(&report);
        log(&report);
        report
    }

    /// The recorded samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.iter().copied().collect()
    }

    /// Mean utilization of the last `window` samples (0 when there are none).
    pub fn average_utilization(&self, window: usize) -> f64 {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        average(&samples, window)
    }

    /// Samples every interval until `cancel` (a missed tick is skipped, not bunched up).
    pub async fn run(&self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => { self.sample_now(); }
            }
        }
    }
}

fn ratio(n: usize, d: usize) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

fn average(samples: &VecDeque<Sample>, window: usize) -> f64 {
    let n = samples.len().min(window);
    if n == 0 {
        return 0.0;
    }
    samples
        .iter()
        .rev()
        .take(n)
        .map(|s| s.utilization)
        .sum::<f64>()
        / n as f64
}

fn export(r: &Report) {
    let s = &r.sample;
    metrics::gauge!(m::DB_POOL_SIZE).set(s.size as f64);
    metrics::gauge!(m::DB_POOL_MAX).set(s.max_size as f64);
    metrics::gauge!(m::DB_POOL_IN_USE).set(s.in_use as f64);
    metrics::gauge!(m::DB_POOL_IDLE).set(s.idle as f64);
    metrics::gauge!(m::DB_POOL_WAITING).set(s.waiting as f64);
    metrics::gauge!(m::DB_POOL_UTILIZATION_RATIO).set(s.utilization);
    metrics::gauge!(m::DB_POOL_UTILIZATION_AVG_RATIO, "window" => "5").set(r.avg_short);
    metrics::gauge!(m::DB_POOL_UTILIZATION_AVG_RATIO, "window" => "100").set(r.avg_long);
}

fn log(r: &Report) {
    let s = &r.sample;
    let pct = s.utilization * 100.0;
    let (short, long) = (r.avg_short * 100.0, r.avg_long * 100.0);
    match r.severity {
        Severity::Ok => tracing::debug!(
            in_use = s.in_use, max = s.max_size, idle = s.idle, waiting = s.waiting,
            "pool utilization {pct:.1}%"
        ),
        Severity::Warning => tracing::warn!(
            in_use = s.in_use, max = s.max_size, idle = s.idle, waiting = s.waiting,
            utilization_pct = pct, avg5_pct = short, avg100_pct = long,
            "pool utilization WARNING: {}/{} connections in use ({pct:.1}%), {} tasks waiting for a connection; avg 5 samples {short:.0}%, avg 100 samples {long:.0}%. \
             Sustained, this slows ingestion: check for slow queries (pg_stat_activity) or raise DB_POOL_SIZE",
            s.in_use, s.max_size, s.waiting
        ),
        Severity::Critical => tracing::error!(
            in_use = s.in_use, max = s.max_size, idle = s.idle, waiting = s.waiting,
            utilization_pct = pct, avg5_pct = short, avg100_pct = long,
            "pool utilization CRITICAL: {}/{} connections in use ({pct:.1}%), {} tasks waiting for a connection; avg 5 samples {short:.0}%, avg 100 samples {long:.0}%. \
             Writers are queueing for connections: check pg_stat_activity for long or blocked queries, then DB_POOL_SIZE vs max_connections",
            s.in_use, s.max_size, s.waiting
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        assert_eq!(Severity::of(0.79), Severity::Ok);
        assert_eq!(Severity::of(0.80), Severity::Warning);
        assert_eq!(Severity::of(0.949), Severity::Warning);
        assert_eq!(Severity::of(0.95), Severity::Critical);
        assert_eq!(ratio(3, 0), 0.0);
    }
}
