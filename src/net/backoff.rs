//! Exponential backoff with full jitter, for reconnecting to Redis and MySQL.
//!
//! Pure arithmetic over an injected random source, so the schedule is unit-tested without sleeping.
//! Used by whichever thread lost its connection; each keeps its own [`Backoff`].

use std::time::Duration;

/// Delays that double from `base` up to `max`; each is drawn uniformly from `[delay/2, delay]` so
/// that many clients that failed together do not retry together.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            failures: 0,
        }
    }

    /// The ceiling of the next delay, before jitter.
    fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The next delay; `unit` is a random number in `[0, 1)`.
    pub(crate) fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// The next delay with thread-local randomness.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }

    /// Call after a success: the next failure starts from `base` again.
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }
}

/// The wait before a task's next attempt: `base` doubled for each attempt the task has used since
/// it was last queued (a requeue starts the count again), up to `max`, with `jitter` (in `[0, 1)`)
/// drawn when the attempt ended. Counted from the same base as the attempt budget: counted from
/// the absolute attempt number, a requeued task's first retry waited `base` x 2^n.
#[derive(Debug, Clone, Copy)]
pub struct RetryDelay {
    pub base: Duration,
    pub max: Duration,
    pub jitter: f64,
}

impl RetryDelay {
    /// The delay after the `used`-th attempt since the task was queued (1 for the first).
    pub(crate) fn after(&self, used: u32) -> Duration {
        let mut b = Backoff::new(self.base, self.max);
        b.failures = used.saturating_sub(1);
        b.next_with(self.jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_with_jitter_inside_bounds() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let top: Vec<u128> = (0..7).map(|_| b.next_with(1.0).as_millis()).collect();
        assert_eq!(top, [100, 200, 400, 800, 1600, 2000, 2000]);
        b.reset();
        assert_eq!(b.next_with(0.0), Duration::from_millis(50));
        assert_eq!(b.next_with(0.5), Duration::from_millis(150));
        assert_eq!(b.failures(), 2);
    }

    #[test]
    fn retry_delays_double_per_attempt_used() {
        let d = RetryDelay {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
            jitter: 1.0,
        };
        assert_eq!(d.after(1), Duration::from_secs(1));
        assert_eq!(d.after(2), Duration::from_secs(2));
        assert_eq!(d.after(3), Duration::from_secs(4));
        assert_eq!(d.after(0), Duration::from_secs(1));
        assert_eq!(d.after(40), Duration::from_secs(60));
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_secs(60));
        }
    }
}
