//! The one retry policy of the crate: exponential backoff with jitter, bounded attempts, waits
//! that end at once on cancellation, and permanent errors that are never retried (after neon's
//! `libs/utils/src/backoff.rs`). Its three users:
//! - the relay client: reconnects, 1 s → 30 s, attempts unbounded, the count reset after a
//!   healthy connection ([`Retries::reset`], [`sleep`]);
//! - [`crate::txn`]: transactions, 100/200/400 ms ± 20 %, at most 3 retries, permanent and
//!   transient SQLSTATEs told apart ([`retry`]);
//! - identity re-resolution: the delay after the n-th consecutive failure ([`Backoff::delay`]),
//!   stored in `actors.next_resolve_at` rather than slept on.
//!
//! Why not `backon` (it was a dependency, now removed): its jitter only *adds* 0–100 % of the
//! delay, which cannot express the ± 20 % of §6 (the 100/200/400 ms steps must stay recognisable)
//! nor the client's "between half and all of the delay" that never exceeds the 30 s cap; its
//! sleeper cannot end the retry on cancellation, only cut a wait short and run the operation once
//! more; and identity needs the n-th delay as a pure function of a failure count kept in the
//! database, not an iterator. What remains is ~100 lines with no dependency beyond tokio.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Largest exponent used: `initial · 2^31` is past any sensible cap (and keeps `1 << n` in u32).
const MAX_EXPONENT: u32 = 31;

/// How a delay is randomised, so that many clients failing together do not retry in lockstep.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Jitter {
    /// Exactly the exponential delay (a schedule written to the database).
    None,
    /// Uniform in `[d/2, d]` ("equal jitter"): never longer than the cap.
    Half,
    /// Uniform in `[d·(1−f), d·(1+f)]` with `f` clamped to `[0, 1]`: keeps the steps recognisable.
    Spread(f64),
}

/// Delays `initial · 2^(n−1)` before retry `n`, capped at `max`, jittered; at most
/// `max_attempts` attempts in all (the first included; `None`: unbounded).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Backoff {
    pub(crate) initial: Duration,
    pub(crate) max: Duration,
    pub(crate) jitter: Jitter,
    pub(crate) max_attempts: Option<u32>,
}

impl Backoff {
    /// The delay before retry `retry` (1-based; 0 counts as 1) without jitter.
    pub(crate) fn exponential(&self, retry: u32) -> Duration {
        let exp = retry.saturating_sub(1).min(MAX_EXPONENT);
        self.initial
            .checked_mul(1u32 << exp)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// The delay before retry `retry` (1-based), jitter applied.
    pub(crate) fn delay(&self, retry: u32) -> Duration {
        let d = self.exponential(retry);
        match self.jitter {
            Jitter::None => d,
            Jitter::Half => {
                let half = d / 2;
                half + half.mul_f64(rand::random::<f64>())
            }
            Jitter::Spread(f) => {
                let f = if f.is_finite() {
                    f.clamp(0.0, 1.0)
                } else {
                    0.0
                };
                let k = rand::random_range(-f..=f);
                Duration::try_from_secs_f64(d.as_secs_f64() * (1.0 + k)).unwrap_or(d)
            }
        }
    }

    /// A fresh count of consecutive failures under this policy.
    pub(crate) fn retries(&self) -> Retries {
        Retries {
            policy: self.clone(),
            failures: 0,
        }
    }
}

/// Consecutive failures under a [`Backoff`], for loops that are not a plain [`retry`].
#[derive(Debug, Clone)]
pub(crate) struct Retries {
    policy: Backoff,
    failures: u32,
}

impl Retries {
    /// Counts one more failure; the delay before the next attempt, or `None` when the failed
    /// attempt was the last one allowed.
    pub(crate) fn next_delay(&mut self) -> Option<Duration> {
        self.failures = self.failures.saturating_add(1);
        match self.policy.max_attempts {
            Some(max) if self.failures >= max => None,
            _ => Some(self.policy.delay(self.failures)),
        }
    }

    /// Consecutive failures so far.
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Starts over from the first delay (after a success, or a connection that stayed healthy).
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The wait was cut short by cancellation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled while waiting to retry")]
pub(crate) struct Cancelled;

/// Waits `delay`, or less if `cancel` fires first (checked first: a cancelled token never waits).
pub(crate) async fn sleep(delay: Duration, cancel: &CancellationToken) -> Result<(), Cancelled> {
    tokio::select! {
        biased;
        _ = cancel.cancelled() => Err(Cancelled),
        _ = tokio::time::sleep(delay) => Ok(()),
    }
}

/// Why [`retry`] gave up; each variant carries the last error and the attempts made.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RetryError<E> {
    #[error("permanent error on attempt {attempts}: {error}")]
    Permanent { error: E, attempts: u32 },
    #[error("gave up after {attempts} attempts: {error}")]
    Exhausted { error: E, attempts: u32 },
    #[error("cancelled after {attempts} attempts; last error: {error}")]
    Cancelled { error: E, attempts: u32 },
}

/// Runs `op(attempt)` (attempt 1, 2, …) until it succeeds, fails with an error `is_permanent`
/// accepts, uses up `policy.max_attempts`, or `cancel` fires during a wait. `notify(error,
/// attempt, delay)` runs before each wait (log and count the retry there).
///
/// Cancellation ends a wait at once but never interrupts a running attempt: an operation that
/// must stop early watches the token itself (and reports that as a permanent error).
pub(crate) async fn retry<T, E>(
    policy: &Backoff,
    cancel: &CancellationToken,
    mut op: impl AsyncFnMut(u32) -> Result<T, E>,
    is_permanent: impl Fn(&E) -> bool,
    mut notify: impl FnMut(&E, u32, Duration),
) -> Result<T, RetryError<E>> {
    let mut retries = policy.retries();
    loop {
        let attempts = retries.failures().saturating_add(1);
        let error = match op(attempts).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if is_permanent(&error) {
            return Err(RetryError::Permanent { error, attempts });
        }
        let Some(delay) = retries.next_delay() else {
            return Err(RetryError::Exhausted { error, attempts });
        };
        notify(&error, attempts, delay);
        if sleep(delay, cancel).await.is_err() {
            return Err(RetryError::Cancelled { error, attempts });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[derive(Debug, PartialEq)]
    enum E {
        Transient,
        Permanent,
    }

    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{self:?}")
        }
    }

    fn policy(max_attempts: Option<u32>) -> Backoff {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
            jitter: Jitter::None,
            max_attempts,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delays_follow_the_policy() {
        let cancel = CancellationToken::new();
        let start = Instant::now();
        let mut calls = Vec::new();
        let mut notified = Vec::new();
        let r = retry(
            &policy(None),
            &cancel,
            async |n| {
                calls.push((n, start.elapsed()));
                if n < 5 {
                    Err(E::Transient)
                } else {
                    Ok(n)
                }
            },
            |e| *e == E::Permanent,
            |_, n, d| notified.push((n, d)),
        )
        .await;
        assert_eq!(r.ok(), Some(5));
        let ms = Duration::from_millis;
        // 100, 200, then capped at 350: attempts at 0, 100, 300, 650, 1000 ms.
        assert_eq!(
            calls,
            vec![
                (1, ms(0)),
                (2, ms(100)),
                (3, ms(300)),
                (4, ms(650)),
                (5, ms(1000))
            ]
        );
        assert_eq!(
            notified,
            vec![(1, ms(100)), (2, ms(200)), (3, ms(350)), (4, ms(350))]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_stops_at_once() {
        let start = Instant::now();
        let mut calls = 0;
        let r = retry(
            &policy(None),
            &CancellationToken::new(),
            async |_| {
                calls += 1;
                Err::<(), _>(E::Permanent)
            },
            |e| *e == E::Permanent,
            |_, _, _| panic!("a permanent error is not retried"),
        )
        .await;
        assert!(matches!(
            r,
            Err(RetryError::Permanent {
                error: E::Permanent,
                attempts: 1
            })
        ));
        assert_eq!(calls, 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_bounded() {
        let start = Instant::now();
        let mut calls = 0;
        let r = retry(
            &policy(Some(3)),
            &CancellationToken::new(),
            async |_| {
                calls += 1;
                Err::<(), _>(E::Transient)
            },
            |e| *e == E::Permanent,
            |_, _, _| {},
        )
        .await;
        assert!(matches!(
            r,
            Err(RetryError::Exhausted {
                error: E::Transient,
                attempts: 3
            })
        ));
        assert_eq!(calls, 3);
        // Two waits (100 + 200 ms), none after the last attempt.
        assert_eq!(start.elapsed(), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_ends_the_wait_at_once() {
        let cancel = CancellationToken::new();
        let policy = Backoff {
            initial: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
            ..policy(None)
        };
        let start = Instant::now();
        let canceller = {
            let cancel = cancel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                cancel.cancel();
            })
        };
        let mut calls = 0;
        let r = retry(
            &policy,
            &cancel,
            async |_| {
                calls += 1;
                Err::<(), _>(E::Transient)
            },
            |e| *e == E::Permanent,
            |_, _, _| {},
        )
        .await;
        assert!(matches!(
            r,
            Err(RetryError::Cancelled {
                error: E::Transient,
                attempts: 1
            })
        ));
        assert_eq!(calls, 1);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        canceller.await.unwrap();
        // An already cancelled token does not wait at all.
        let start = Instant::now();
        assert_eq!(
            sleep(Duration::from_secs(60), &cancel).await,
            Err(Cancelled)
        );
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[test]
    fn jitter_stays_in_its_range() {
        let half = Backoff {
            jitter: Jitter::Half,
            ..policy(None)
        };
        let spread = Backoff {
            jitter: Jitter::Spread(0.2),
            max: Duration::MAX,
            ..policy(None)
        };
        for retry in 1..40 {
            let full = half.exponential(retry);
            let d = half.delay(retry);
            assert!(d >= full / 2 && d <= full, "{retry}: {d:?} vs {full:?}");
            let full = spread.exponential(retry).as_secs_f64();
            let d = spread.delay(retry).as_secs_f64();
            assert!(
                d >= full * 0.8 - 1e-9 && d <= full * 1.2 + 1e-6 * full,
                "{retry}: {d} vs {full}"
            );
        }
        assert_eq!(policy(None).exponential(0), Duration::from_millis(100));
        assert_eq!(
            policy(None).exponential(u32::MAX),
            Duration::from_millis(350)
        );
    }

    #[test]
    fn reset_starts_over() {
        let mut r = policy(Some(2)).retries();
        assert_eq!(r.next_delay(), Some(Duration::from_millis(100)));
        assert_eq!(r.next_delay(), None);
        r.reset();
        assert_eq!(r.failures(), 0);
        assert_eq!(r.next_delay(), Some(Duration::from_millis(100)));
    }
}
