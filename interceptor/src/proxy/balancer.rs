//! Endpoint selection: round robin or least request (power of two choices, Envoy's default for
//! LEAST_REQUEST), over the endpoints outlier detection has not ejected, avoiding the ones a
//! retry already tried (`previous_hosts`). When every endpoint is ejected all of them are used
//! again (Envoy's panic mode): a cluster never refuses traffic for being unhealthy.

use std::{
    cell::Cell,
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::time::Instant;

use super::{cluster::Endpoint, config::LbPolicy};

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    // RandomState is seeded from the OS: a different stream per thread and process.
    let mut h = RandomState::new().build_hasher();
    h.write_u64(0x5eed);
    h.finish() | 1
}

/// A fast non-cryptographic random number (xorshift64*), for load balancing, weighted splits,
/// jitter and request ids.
pub fn random_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// Uniform in [0, 1).
pub fn random_f64() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Picks an endpoint. `avoid` holds the endpoints earlier attempts of this request used.
pub fn pick(
    policy: LbPolicy,
    endpoints: &[Arc<Endpoint>],
    rr: &AtomicUsize,
    avoid: &[SocketAddr],
    now: Instant,
) -> Option<Arc<Endpoint>> {
    if endpoints.is_empty() {
        return None;
    }
    let any_ejected = endpoints.iter().any(|e| e.is_ejected(now));
    if !any_ejected && avoid.is_empty() {
        return Some(choose(policy, endpoints, rr).clone());
    }
    let healthy: Vec<Arc<Endpoint>> = endpoints
        .iter()
        .filter(|e| !e.is_ejected(now))
        .cloned()
        .collect();
    let pool = if healthy.is_empty() {
        endpoints.to_vec()
    } else {
        healthy
    };
    let fresh: Vec<Arc<Endpoint>> = pool
        .iter()
        .filter(|e| !avoid.contains(&e.addr))
        .cloned()
        .collect();
    let set = if fresh.is_empty() { pool } else { fresh };
    Some(choose(policy, &set, rr).clone())
}

fn choose<'a>(policy: LbPolicy, set: &'a [Arc<Endpoint>], rr: &AtomicUsize) -> &'a Arc<Endpoint> {
    let n = set.len();
    match policy {
        LbPolicy::RoundRobin => &set[rr.fetch_add(1, Ordering::Relaxed) % n],
        LbPolicy::LeastRequest if n == 1 => &set[0],
        LbPolicy::LeastRequest => {
            let a = (random_u64() % n as u64) as usize;
            let mut b = (random_u64() % (n as u64 - 1)) as usize;
            if b >= a {
                b += 1;
            }
            if set[b].active() < set[a].active() {
                &set[b]
            } else {
                &set[a]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::proxy::config::OutlierConfig;

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        (1..=n)
            .map(|p| Arc::new(Endpoint::new(SocketAddr::from(([127, 0, 0, 1], p)))))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_cycles_and_skips_ejected_and_tried_endpoints() {
        let eps = endpoints(3);
        let rr = AtomicUsize::new(0);
        let now = Instant::now();
        let ports: Vec<u16> = (0..6)
            .map(|_| {
                pick(LbPolicy::RoundRobin, &eps, &rr, &[], now)
                    .expect("ep")
                    .addr
                    .port()
            })
            .collect();
        assert_eq!(ports, [1, 2, 3, 1, 2, 3]);
        let outlier = OutlierConfig {
            consecutive_errors: 1,
            max_ejection_percent: 100,
            ..OutlierConfig::default()
        };
        eps[1].record(false, &outlier, 0, 3, now);
        assert!(eps[1].is_ejected(now));
        for _ in 0..4 {
            let p = pick(LbPolicy::RoundRobin, &eps, &rr, &[], now).expect("ep");
            assert_ne!(p.addr.port(), 2);
        }
        let avoid = [eps[0].addr];
        for _ in 0..4 {
            let p = pick(LbPolicy::RoundRobin, &eps, &rr, &avoid, now).expect("ep");
            assert_eq!(p.addr.port(), 3, "only 3 is neither ejected nor tried");
        }
        // The ejection ends by itself.
        let later = now + Duration::from_secs(31);
        assert!(!eps[1].is_ejected(later));
    }

    #[tokio::test(start_paused = true)]
    async fn panic_mode_when_everything_is_ejected() {
        let eps = endpoints(2);
        let rr = AtomicUsize::new(0);
        let now = Instant::now();
        let outlier = OutlierConfig {
            consecutive_errors: 1,
            max_ejection_percent: 100,
            ..OutlierConfig::default()
        };
        eps[0].record(false, &outlier, 0, 2, now);
        eps[1].record(false, &outlier, 1, 2, now);
        assert!(eps.iter().all(|e| e.is_ejected(now)));
        assert!(pick(LbPolicy::RoundRobin, &eps, &rr, &[], now).is_some());
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let eps = endpoints(2);
        let rr = AtomicUsize::new(0);
        let busy = eps[0].start();
        let now = Instant::now();
        for _ in 0..20 {
            let p = pick(LbPolicy::LeastRequest, &eps, &rr, &[], now).expect("ep");
            assert_eq!(p.addr.port(), 2);
        }
        drop(busy);
    }

    #[test]
    fn random_is_uniform_enough() {
        let n = 10_000;
        let below_half = (0..n).filter(|_| random_f64() < 0.5).count();
        assert!((4_500..5_500).contains(&below_half), "{below_half}");
    }
}
