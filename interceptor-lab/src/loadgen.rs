//! An HTTP/1.1 load generator (hyper 1.x client) for benchmarks and load tests: a fixed number
//! of workers, each with one keep-alive connection (or a new connection per request), sending
//! `GET`s until the request budget is spent or the time limit passes — whichever comes first, so
//! a run always stops by itself. Every request's latency goes into a log-linear histogram
//! (~1.6% resolution) for p50/p90/p99/p99.9; status codes and errors are counted.
//!
//! ```no_run
//! # async fn f() {
//! use std::time::Duration;
//! use interceptor_lab::loadgen::{LoadSpec, Mode, run};
//! let result = run(LoadSpec::new(
//!     "127.0.0.1:8080".parse().unwrap(), "reviews", "/", 16, 100_000,
//!     Duration::from_secs(10), Mode::KeepAlive,
//! )).await;
//! println!("{} req/s, p99 {} µs", result.requests_per_second, result.latency_us.p99);
//! # }
//! ```

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One connection per worker, reused for every request.
    KeepAlive,
    /// A new TCP connection for every request (`Connection: close`).
    ConnectionPerRequest,
}

/// What to send.
#[derive(Clone, Debug, Serialize)]
pub struct LoadSpec {
    pub target: SocketAddr,
    pub host: String,
    pub path: String,
    pub concurrency: usize,
    /// Total requests (all workers together).
    pub requests: u64,
    /// The run stops after this even if requests are left.
    #[serde(serialize_with = "secs")]
    pub time_limit: Duration,
    pub mode: Mode,
    /// A request taking longer counts as an error (`timeout`).
    #[serde(serialize_with = "secs")]
    pub request_timeout: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl LoadSpec {
    pub fn new(
        target: SocketAddr,
        host: &str,
        path: &str,
        concurrency: usize,
        requests: u64,
        time_limit: Duration,
        mode: Mode,
    ) -> Self {
        Self {
            target,
            host: host.to_owned(),
            path: path.to_owned(),
            concurrency: concurrency.max(1),
            requests,
            time_limit,
            mode,
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// Latency percentiles, microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct LoadResult {
    pub spec: LoadSpec,
    /// Requests that got a response (any status).
    pub responses: u64,
    /// Responses with a 2xx status.
    pub ok: u64,
    /// Requests without a response (connect failure, reset, timeout).
    pub errors: u64,
    pub status_codes: BTreeMap<u16, u64>,
    pub error_kinds: BTreeMap<String, u64>,
    pub elapsed_seconds: f64,
    pub requests_per_second: f64,
    /// Latency of requests that got a response.
    pub latency_us: Percentiles,
    /// Whether the time limit (not the request budget) ended the run.
    pub hit_time_limit: bool,
}

/// Runs the load and returns what happened. Never panics on network errors: they are counted.
pub async fn run(spec: LoadSpec) -> LoadResult {
    let issued = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + spec.time_limit;
    let workers: Vec<_> = (0..spec.concurrency)
        .map(|_| tokio::spawn(worker(spec.clone(), issued.clone(), deadline)))
        .collect();
    let mut total = WorkerResult::default();
    for w in workers {
        if let Ok(r) = w.await {
            total.merge(r);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let responses = total.status_codes.values().sum();
    LoadResult {
        ok: total
            .status_codes
            .iter()
            .filter(|(s, _)| (200..300).contains(*s))
            .map(|(_, n)| n)
            .sum(),
        responses,
        errors: total.error_kinds.values().sum(),
        status_codes: total.status_codes,
        error_kinds: total.error_kinds,
        elapsed_seconds: elapsed,
        requests_per_second: if elapsed > 0.0 {
            responses as f64 / elapsed
        } else {
            0.0
        },
        latency_us: total.histogram.percentiles(),
        hit_time_limit: issued.load(Ordering::Relaxed) < spec.requests,
        spec,
    }
}

#[derive(Default)]
struct WorkerResult {
    histogram: Histogram,
    status_codes: BTreeMap<u16, u64>,
    error_kinds: BTreeMap<String, u64>,
}

impl WorkerResult {
    fn merge(&mut self, other: WorkerResult) {
        self.histogram.merge(&other.histogram);
        for (k, v) in other.status_codes {
            *self.status_codes.entry(k).or_default() += v;
        }
        for (k, v) in other.error_kinds {
            *self.error_kinds.entry(k).or_default() += v;
        }
    }

    fn error(&mut self, kind: &str) {
        *self.error_kinds.entry(kind.to_owned()).or_default() += 1;
    }
}

type Sender = http1::SendRequest<Empty<Bytes>>;

async fn connect(target: SocketAddr) -> Result<Sender, &'static str> {
    let stream = TcpStream::connect(target).await.map_err(|_| "connect")?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|_| "handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn worker(spec: LoadSpec, issued: Arc<AtomicU64>, deadline: Instant) -> WorkerResult {
    let mut result = WorkerResult::default();
    let mut sender: Option<Sender> = None;
    loop {
        if Instant::now() >= deadline || issued.fetch_add(1, Ordering::Relaxed) >= spec.requests {
            return result;
        }
        let started = Instant::now();
        let outcome = tokio::time::timeout(spec.request_timeout, async {
            let mut s = match sender.take() {
                Some(s) if spec.mode == Mode::KeepAlive && !s.is_closed() => s,
                _ => connect(spec.target).await?,
            };
            s.ready().await.map_err(|_| "closed")?;
            let mut req = Request::get(spec.path.as_str()).header(header::HOST, spec.host.as_str());
            if spec.mode == Mode::ConnectionPerRequest {
                req = req.header(header::CONNECTION, "close");
            }
            let req = req.body(Empty::new()).map_err(|_| "request")?;
            let resp = s.send_request(req).await.map_err(|_| "reset")?;
            let status = resp.status().as_u16();
            resp.into_body().collect().await.map_err(|_| "body")?;
            Ok::<_, &'static str>((status, s))
        })
        .await;
        match outcome {
            Ok(Ok((status, s))) => {
                result.histogram.record(started.elapsed());
                *result.status_codes.entry(status).or_default() += 1;
                if spec.mode == Mode::KeepAlive {
                    sender = Some(s);
                }
            }
            Ok(Err(kind)) => result.error(kind),
            Err(_) => result.error("timeout"),
        }
    }
}

/// Log-linear latency histogram over nanoseconds: exact below 128 ns, then 64 sub-buckets per
/// power of two (≤ 1.6% relative error), up to u64::MAX. 30 KiB, merged by adding.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_ns: u128,
    max_ns: u64,
}

const SUB: u32 = 64;
const BUCKETS: usize = 128 + (64 - 7) * SUB as usize;

impl Default for Histogram {
    fn default() -> Self {
        Self {
            counts: vec![0; BUCKETS],
            total: 0,
            sum_ns: 0,
            max_ns: 0,
        }
    }
}

impl Histogram {
    fn index(ns: u64) -> usize {
        if ns < 128 {
            return ns as usize;
        }
        let exp = 63 - ns.leading_zeros(); // >= 7
        let mantissa = (ns >> (exp - 6)) as usize; // 64..=127
        128 + (exp as usize - 7) * SUB as usize + (mantissa - 64)
    }

    /// The smallest value of a bucket's range.
    fn lower_bound(index: usize) -> u64 {
        if index < 128 {
            return index as u64;
        }
        let exp = (index - 128) / SUB as usize + 7;
        let mantissa = ((index - 128) % SUB as usize + 64) as u64;
        mantissa << (exp - 6)
    }

    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[Self::index(ns)] += 1;
        self.total += 1;
        self.sum_ns += u128::from(ns);
        self.max_ns = self.max_ns.max(ns);
    }

    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.sum_ns += other.sum_ns;
        self.max_ns = self.max_ns.max(other.max_ns);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1), in nanoseconds (the bucket's lower bound).
    pub fn quantile_ns(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Self::lower_bound(i).min(self.max_ns);
            }
        }
        self.max_ns
    }

    pub fn percentiles(&self) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            p50: us(self.quantile_ns(0.5)),
            p90: us(self.quantile_ns(0.9)),
            p99: us(self.quantile_ns(0.99)),
            p999: us(self.quantile_ns(0.999)),
            max: us(self.max_ns),
            mean: if self.total == 0 {
                0.0
            } else {
                (self.sum_ns / u128::from(self.total)) as f64 / 1000.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_trip_within_resolution() {
        for ns in [
            0u64,
            1,
            127,
            128,
            129,
            1_000,
            65_535,
            1_000_000,
            123_456_789,
            u64::MAX / 3,
        ] {
            let lb = Histogram::lower_bound(Histogram::index(ns));
            assert!(lb <= ns, "{ns}: {lb}");
            assert!((ns - lb) as f64 <= ns as f64 / 64.0 + 1.0, "{ns}: {lb}");
        }
        assert!(Histogram::index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let p = h.percentiles();
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.02;
        assert!(close(p.p50, 500.0), "{p:?}");
        assert!(close(p.p90, 900.0), "{p:?}");
        assert!(close(p.p99, 990.0), "{p:?}");
        assert!(close(p.max, 1000.0), "{p:?}");
        assert!(close(p.mean, 500.5), "{p:?}");
        let mut other = Histogram::default();
        other.record(Duration::from_secs(1));
        h.merge(&other);
        assert_eq!(h.count(), 1001);
        assert!(close(h.percentiles().max, 1_000_000.0));
    }

    #[tokio::test]
    async fn a_refused_target_counts_errors_and_stops_on_its_budget() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let r = run(LoadSpec::new(
            addr,
            "x",
            "/",
            2,
            10,
            Duration::from_secs(10),
            Mode::KeepAlive,
        ))
        .await;
        assert_eq!(r.responses, 0);
        assert_eq!(r.errors, 10);
        assert_eq!(r.error_kinds.get("connect"), Some(&10));
        assert!(!r.hit_time_limit);
    }
}
