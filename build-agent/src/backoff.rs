//! Reconnect delays: exponential with full jitter.
//!
//! Pure arithmetic with the randomness passed in, so tests drive it without sleeping.
//! Full jitter (a uniform delay between zero and the exponential ceiling) keeps a fleet of
//! agents from reconnecting in lockstep after a coordinator restart.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    /// A connection that stayed up this long resets the backoff.
    stable_after: Duration,
    failures: u32,
}

/// The shortest delay, so a run of zero draws cannot spin.
const FLOOR: Duration = Duration::from_millis(100);

impl Default for Backoff {
    fn default() -> Self {
        Self::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            Duration::from_secs(30),
        )
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, stable_after: Duration) -> Self {
        Self {
            base,
            cap,
            stable_after,
            failures: 0,
        }
    }

    /// The ceiling of the next delay: base * 2^failures, capped.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before the next attempt. `unit` is a uniform random number in [0, 1).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let delay = self.ceiling().mul_f64(unit.clamp(0.0, 1.0)).max(FLOOR);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Records how long the last connection stayed up; a stable one resets the backoff.
    pub fn connection_ended(&mut self, uptime: Duration) {
        if uptime >= self.stable_after {
            self.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_from_one_second_to_the_cap() {
        let mut backoff = Backoff::default();
        let ceilings: Vec<u64> = (0..9)
            .map(|_| {
                let ceiling = backoff.ceiling().as_secs();
                backoff.next_delay(0.5);
                ceiling
            })
            .collect();
        assert_eq!(ceilings, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    }

    #[test]
    fn delays_are_full_jitter_below_the_ceiling() {
        let mut backoff = Backoff::default();
        for _ in 0..6 {
            backoff.next_delay(0.0);
        }
        assert_eq!(backoff.clone().next_delay(0.999).as_millis(), 59_940);
        assert_eq!(backoff.clone().next_delay(0.5), Duration::from_secs(30));
        assert_eq!(backoff.next_delay(0.0), FLOOR);
    }

    #[test]
    fn only_a_stable_connection_resets() {
        let mut backoff = Backoff::default();
        for _ in 0..4 {
            backoff.next_delay(0.5);
        }
        backoff.connection_ended(Duration::from_secs(5));
        assert_eq!(backoff.ceiling(), Duration::from_secs(16));
        backoff.connection_ended(Duration::from_secs(31));
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
    }
}
