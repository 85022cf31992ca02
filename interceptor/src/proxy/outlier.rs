//! Outlier detection per endpoint: `consecutive_errors` failures in a row (no connection, a
//! broken connection, a 5xx) eject it for `base_ejection_time` × the times it was ejected
//! (capped), unless that would put more than `max_ejection_percent` of the cluster out — one
//! endpoint may always go. The ejection ends by itself when its time is up: no timer task.

use std::sync::{
    Mutex,
    atomic::{AtomicBool, AtomicU32, Ordering},
};

use tokio::time::Instant;

use super::config::OutlierConfig;

#[derive(Debug, Default)]
pub struct Health {
    consecutive_failures: AtomicU32,
    /// Fast path: false while not ejected (checked on every pick).
    ejected: AtomicBool,
    state: Mutex<Ejection>,
}

#[derive(Debug, Default)]
struct Ejection {
    until: Option<Instant>,
    times: u32,
}

impl Health {
    pub fn is_ejected(&self, now: Instant) -> bool {
        if !self.ejected.load(Ordering::Relaxed) {
            return false;
        }
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        match s.until {
            Some(until) if now < until => true,
            _ => {
                s.until = None;
                self.ejected.store(false, Ordering::Relaxed);
                false
            }
        }
    }

    /// A success ends a failure streak.
    pub fn succeeded(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    pub fn times_ejected(&self) -> u32 {
        self.state.lock().map(|s| s.times).unwrap_or(0)
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Records an attempt's result. `ejected_now`/`total` describe the cluster, for the
    /// max-ejection-percent rule. Returns true when this call ejected the endpoint.
    pub fn record(
        &self,
        success: bool,
        config: &OutlierConfig,
        ejected_now: usize,
        total: usize,
        now: Instant,
    ) -> bool {
        if success {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            return false;
        }
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if config.consecutive_errors == 0 || failures < config.consecutive_errors {
            return false;
        }
        let allowed = ejected_now == 0
            || (ejected_now + 1) * 100 <= config.max_ejection_percent as usize * total;
        if !allowed || self.is_ejected(now) {
            return false;
        }
        let Ok(mut s) = self.state.lock() else {
            return false;
        };
        s.times += 1;
        let time = config
            .base_ejection_time
            .0
            .saturating_mul(s.times)
            .min(config.max_ejection_time.0.max(config.base_ejection_time.0));
        s.until = Some(now + time);
        self.ejected.store(true, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proxy::config::Dur;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_errors: 3,
            base_ejection_time: Dur::secs(10),
            max_ejection_time: Dur::secs(25),
            max_ejection_percent: 50,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_for_growing_times() {
        let h = Health::default();
        let now = Instant::now();
        assert!(!h.record(false, &cfg(), 0, 4, now));
        assert!(!h.record(false, &cfg(), 0, 4, now));
        // A success in between starts the count again.
        h.record(true, &cfg(), 0, 4, now);
        assert!(!h.record(false, &cfg(), 0, 4, now));
        assert!(!h.record(false, &cfg(), 0, 4, now));
        assert!(h.record(false, &cfg(), 0, 4, now));
        assert!(h.is_ejected(now + Duration::from_secs(9)));
        assert!(!h.is_ejected(now + Duration::from_secs(10)));
        let later = now + Duration::from_secs(10);
        for _ in 0..3 {
            h.record(false, &cfg(), 0, 4, later);
        }
        assert_eq!(h.times_ejected(), 2);
        assert!(h.is_ejected(later + Duration::from_secs(19)));
        assert!(!h.is_ejected(later + Duration::from_secs(20)));
        let much_later = later + Duration::from_secs(20);
        for _ in 0..3 {
            h.record(false, &cfg(), 0, 4, much_later);
        }
        // 3 × 10 s capped at 25 s.
        assert!(!h.is_ejected(much_later + Duration::from_secs(25)));
    }

    #[tokio::test(start_paused = true)]
    async fn max_ejection_percent_keeps_endpoints_in() {
        let h = Health::default();
        let now = Instant::now();
        // 2 of 4 already out: a third would be 75% > 50%.
        for _ in 0..3 {
            assert!(!h.record(false, &cfg(), 2, 4, now));
        }
        assert!(!h.is_ejected(now));
        // 1 of 4 out: a second is 50%, allowed.
        assert!(h.record(false, &cfg(), 1, 4, now));
    }
}
