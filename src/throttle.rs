//! Failed-login throttling: after a few failures for a user name or from an address, logins
//! for it are refused for a time that doubles with each further failure (1 s, 2 s, 4 s, ...
//! up to 5 minutes). Success clears the user's and the address's record.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failures allowed before any delay.
const FREE_FAILURES: u32 = 3;
const MAX_DELAY: Duration = Duration::from_secs(300);
/// Records untouched for this long are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

#[derive(Default)]
pub struct LoginThrottle {
    /// Keyed by `user:NAME` or `addr:IP`. A std mutex: short in-memory sections only.
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

fn delay_after(failures: u32) -> Duration {
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    let doublings = (failures - FREE_FAILURES).min(16);
    Duration::from_secs(1u64 << doublings).min(MAX_DELAY)
}

impl LoginThrottle {
    /// `Err(wait)` when any of `keys` must wait before the next attempt.
    pub fn check(&self, keys: &[String], now: Instant) -> Result<(), Duration> {
        let failures = self.failures.lock().unwrap();
        let wait = keys
            .iter()
            .filter_map(|key| failures.get(key))
            .map(|(count, last)| (*last + delay_after(*count)).saturating_duration_since(now))
            .max()
            .unwrap_or(Duration::ZERO);
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait)
        }
    }

    pub fn failed(&self, keys: &[String], now: Instant) {
        let mut failures = self.failures.lock().unwrap();
        if failures.len() > 100_000 {
            failures.retain(|_, (_, last)| now.saturating_duration_since(*last) < FORGET_AFTER);
        }
        for key in keys {
            let entry = failures.entry(key.clone()).or_insert((0, now));
            *entry = (entry.0.saturating_add(1), now);
        }
    }

    pub fn succeeded(&self, keys: &[String]) {
        let mut failures = self.failures.lock().unwrap();
        for key in keys {
            failures.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_after_a_few_failures_and_success_clears() {
        let throttle = LoginThrottle::default();
        let keys = vec!["user:a".to_string(), "addr:127.0.0.1".to_string()];
        let t0 = Instant::now();
        for _ in 0..FREE_FAILURES - 1 {
            throttle.failed(&keys, t0);
            assert!(throttle.check(&keys, t0).is_ok());
        }
        throttle.failed(&keys, t0);
        assert_eq!(throttle.check(&keys, t0), Err(Duration::from_secs(1)));
        assert!(throttle.check(&keys, t0 + Duration::from_secs(1)).is_ok());
        throttle.failed(&keys, t0);
        assert_eq!(throttle.check(&keys, t0), Err(Duration::from_secs(2)));
        // Another user from another address is not affected.
        assert!(throttle.check(&["user:b".to_string()], t0).is_ok());
        throttle.succeeded(&keys);
        assert!(throttle.check(&keys, t0).is_ok());
    }

    #[test]
    fn delay_is_capped() {
        assert_eq!(delay_after(1000), MAX_DELAY);
    }
}
