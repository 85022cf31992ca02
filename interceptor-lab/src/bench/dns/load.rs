//! The DNS benchmark's client: sequential A queries on one connected UDP socket, as glibc's stub
//! resolver sends them, bounded by a query count and a time limit (and a 1 s timeout per
//! query). Latency is from `send` to the matching reply, kept in nanoseconds.

use std::{
    net::{SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use serde::Serialize;

/// What to ask.
#[derive(Clone, Debug)]
pub enum Query {
    /// The same name every time.
    Fixed(String),
    /// `qN.<domain>` with a new N every time: never in a cache.
    Fresh(String),
}

/// One run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadResult {
    pub answered: u64,
    /// Timeouts, socket errors and replies that were not NOERROR with an answer.
    pub errors: u64,
    pub qps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

/// Per-query timeout: a lost datagram costs this much, once.
const TIMEOUT: Duration = Duration::from_secs(1);

/// Asks `server` up to `queries` times within `limit`. Runs in the caller's network namespace.
pub(super) fn run(server: SocketAddr, query: &Query, queries: u64, limit: Duration) -> LoadResult {
    let mut result = LoadResult::default();
    let sock = match bind_connected(server) {
        Ok(sock) => sock,
        Err(_) => {
            result.errors = 1;
            return result;
        }
    };
    let mut latencies: Vec<u32> = Vec::with_capacity(usize::try_from(queries).unwrap_or(0));
    let mut buf = [0u8; 1500];
    let start = Instant::now();
    for i in 0..queries {
        if start.elapsed() >= limit {
            break;
        }
        let id = (i & 0xffff) as u16;
        let name = match query {
            Query::Fixed(name) => name.clone(),
            Query::Fresh(domain) => format!("q{i}.{domain}"),
        };
        let packet = encode(id, &name);
        let sent = Instant::now();
        if sock.send(&packet).is_err() {
            result.errors += 1;
            continue;
        }
        // Skip stale replies (a late answer to an earlier, timed-out query).
        let mut ok = false;
        for _ in 0..4 {
            match sock.recv(&mut buf) {
                Ok(n) if n >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id => {
                    // RCODE 0 and at least one answer.
                    ok = buf[3] & 0x0f == 0 && u16::from_be_bytes([buf[6], buf[7]]) > 0;
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        if ok {
            // Nanoseconds: the paths differ by about a microsecond.
            let ns = sent.elapsed().as_nanos();
            latencies.push(u32::try_from(ns).unwrap_or(u32::MAX));
            result.answered += 1;
        } else {
            result.errors += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if elapsed > 0.0 {
        result.qps = result.answered as f64 / elapsed;
    }
    latencies.sort_unstable();
    result.p50_us = percentile(&latencies, 0.50) / 1000.0;
    result.p99_us = percentile(&latencies, 0.99) / 1000.0;
    result
}

fn bind_connected(server: SocketAddr) -> std::io::Result<UdpSocket> {
    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(local)?;
    sock.connect(server)?;
    sock.set_read_timeout(Some(TIMEOUT))?;
    Ok(sock)
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let at = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[at.min(sorted.len() - 1)])
}

/// A recursion-desired A query for `name`.
fn encode(id: u16, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 18);
    out.extend(id.to_be_bytes());
    out.extend([1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(u8::try_from(label.len()).unwrap_or(63).min(63));
        out.extend(&label.as_bytes()[..label.len().min(63)]);
    }
    out.extend([0, 0, 1, 0, 1]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_a_query() {
        let q = encode(0x1234, "a.bc");
        assert_eq!(
            q,
            [
                0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 2, b'b', b'c', 0, 0, 1, 0, 1
            ]
        );
    }

    #[test]
    fn percentiles_of_sorted_samples() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
