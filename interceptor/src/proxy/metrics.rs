//! The proxy's Prometheus metrics (served on 15090 `/stats/prometheus`).

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

/// The `grpc_status` label of a `grpc-status` value: a known code, `none` or `invalid`
/// (bounded, whatever the upstream sends).
pub fn grpc_status_label(status: &str) -> &str {
    match status.parse::<u8>() {
        Ok(code) if code <= 16 => status,
        _ if status == "none" => "none",
        _ => "invalid",
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Direction {
    Inbound,
    Outbound,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Flow {
    /// Bytes the downstream client sent, forwarded upstream.
    Sent,
    /// Bytes the upstream answered, forwarded to the client.
    Received,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Refusal {
    /// No original destination (the connection was not redirected).
    NoOriginalDst,
    /// The original destination is the proxy itself.
    Loop,
    /// Connecting upstream failed or timed out.
    ConnectFailed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BytesLabels {
    pub direction: Direction,
    pub flow: Flow,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub direction: Direction,
    pub reason: Refusal,
}

/// An HTTP request's labels: which way, which cluster, which status (the proxy's own replies
/// included: 400, 404, 413, 431, 503, 504).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub direction: Direction,
    pub cluster: String,
    pub code: u16,
}

/// A gRPC call's labels: its `grpc-status` (`none` when the response carried none).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrpcLabels {
    pub direction: Direction,
    pub cluster: String,
    pub grpc_status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub direction: Direction,
    pub cluster: String,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Protocol {
    Http1,
    Http2,
    Tcp,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProtocolLabels {
    pub direction: Direction,
    pub protocol: Protocol,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum ReloadResult {
    Applied,
    Rejected,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~26 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 19))
}

#[derive(Clone)]
pub struct ProxyMetrics {
    pub connections: Family<DirectionLabels, Counter>,
    pub active: Family<DirectionLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub refused: Family<RefusalLabels, Counter>,
    pub detected: Family<ProtocolLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub grpc: Family<GrpcLabels, Counter>,
    pub listener_overflow: Family<DirectionLabels, Counter>,
    pub duration: Family<ClusterLabels, Histogram, fn() -> Histogram>,
    pub retries: Family<ClusterLabels, Counter>,
    pub reloads: Family<ReloadLabels, Counter>,
    pub active_requests: Family<DirectionLabels, Gauge>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self {
            connections: Family::default(),
            active: Family::default(),
            bytes: Family::default(),
            refused: Family::default(),
            detected: Family::default(),
            requests: Family::default(),
            grpc: Family::default(),
            listener_overflow: Family::default(),
            duration: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            reloads: Family::default(),
            active_requests: Family::default(),
        }
    }
}

impl ProxyMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        let r = registry.sub_registry_with_prefix("interceptor_proxy");
        r.register(
            "connections",
            "Connections accepted, by direction",
            m.connections.clone(),
        );
        r.register(
            "active_connections",
            "Connections open now, by direction",
            m.active.clone(),
        );
        r.register(
            "bytes",
            "Bytes forwarded, by direction and flow",
            m.bytes.clone(),
        );
        r.register(
            "refused_connections",
            "Connections closed without forwarding, by reason",
            m.refused.clone(),
        );
        r.register(
            "detected_connections",
            "Connections by the protocol detection found",
            m.detected.clone(),
        );
        r.register(
            "requests",
            "HTTP requests answered, by direction, cluster and response code",
            m.requests.clone(),
        );
        r.register(
            "grpc_requests",
            "gRPC calls answered, by direction, cluster and grpc-status",
            m.grpc.clone(),
        );
        r.register(
            "listener_overflow",
            "Connections closed at accept because the listener had max_connections_per_listener open",
            m.listener_overflow.clone(),
        );
        r.register_with_unit(
            "request_duration",
            "HTTP request latency, first byte in to response head out, retries included",
            Unit::Seconds,
            m.duration.clone(),
        );
        r.register(
            "retries",
            "HTTP request attempts beyond the first, by cluster",
            m.retries.clone(),
        );
        r.register(
            "config_reloads",
            "Config reloads, applied or rejected (the old config stays)",
            m.reloads.clone(),
        );
        r.register(
            "active_requests",
            "HTTP requests in flight, by direction",
            m.active_requests.clone(),
        );
        m
    }

    pub fn detected(&self, direction: Direction, protocol: Protocol) {
        self.detected
            .get_or_create(&ProtocolLabels {
                direction,
                protocol,
            })
            .inc();
    }

    /// Records one answered request.
    pub fn request(&self, direction: Direction, cluster: &str, code: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                cluster: cluster.to_owned(),
                code,
            })
            .inc();
        self.duration
            .get_or_create(&ClusterLabels {
                direction,
                cluster: cluster.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// The handles of one request series (to record many requests without lookups).
    pub fn series(&self, direction: Direction, cluster: &str, code: u16) -> (Counter, Histogram) {
        let requests = self
            .requests
            .get_or_create(&RequestLabels {
                direction,
                cluster: cluster.to_owned(),
                code,
            })
            .clone();
        let duration = self
            .duration
            .get_or_create(&ClusterLabels {
                direction,
                cluster: cluster.to_owned(),
            })
            .clone();
        (requests, duration)
    }

    /// Records a gRPC call's status (a known code, `none` or `invalid`: bounded).
    pub fn grpc(&self, direction: Direction, cluster: &str, status: &str) {
        self.grpc_series(direction, cluster, status).inc();
    }

    /// The counter of one gRPC status series (to count many calls without lookups).
    pub fn grpc_series(&self, direction: Direction, cluster: &str, status: &str) -> Counter {
        let status = grpc_status_label(status);
        self.grpc
            .get_or_create(&GrpcLabels {
                direction,
                cluster: cluster.to_owned(),
                grpc_status: status.to_owned(),
            })
            .clone()
    }

    pub fn retry(&self, direction: Direction, cluster: &str) {
        self.retries
            .get_or_create(&ClusterLabels {
                direction,
                cluster: cluster.to_owned(),
            })
            .inc();
    }

    pub fn reload(&self, result: ReloadResult) {
        self.reloads.get_or_create(&ReloadLabels { result }).inc();
    }

    pub fn refuse(&self, direction: Direction, reason: Refusal) {
        self.refused
            .get_or_create(&RefusalLabels { direction, reason })
            .inc();
    }

    /// Counts a connection as open until the guard drops.
    pub fn open(&self, direction: Direction) -> ActiveGuard {
        let labels = DirectionLabels { direction };
        self.connections.get_or_create(&labels).inc();
        let gauge = self.active.get_or_create(&labels).clone();
        gauge.inc();
        ActiveGuard(gauge)
    }

    pub fn add_bytes(&self, direction: Direction, sent: u64, received: u64) {
        self.bytes
            .get_or_create(&BytesLabels {
                direction,
                flow: Flow::Sent,
            })
            .inc_by(sent);
        self.bytes
            .get_or_create(&BytesLabels {
                direction,
                flow: Flow::Received,
            })
            .inc_by(received);
    }
}

/// Decrements a gauge (active connections or requests) on drop, however they end.
pub struct ActiveGuard(pub Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum DnsTransport {
    Udp,
    Tcp,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum DnsResult {
    /// A name of the mesh, answered by the proxy.
    Local,
    /// Asked upstream and answered.
    Forwarded,
    /// Answered from the cache of forwarded answers.
    Cached,
    /// Upstream failed or timed out: SERVFAIL.
    Failed,
    /// Not a DNS query (FORMERR, or dropped without a header).
    Malformed,
    /// Dropped: too many queries in flight.
    Dropped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub transport: DnsTransport,
    pub result: DnsResult,
}

/// The DNS proxy's metrics (`interceptor_proxy_dns_queries_total{transport, result}`).
#[derive(Clone, Default)]
pub struct DnsMetrics {
    pub queries: Family<DnsLabels, Counter>,
}

impl DnsMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry
            .sub_registry_with_prefix("interceptor_proxy_dns")
            .register(
                "queries",
                "DNS queries, by transport and result (local, forwarded, cached, failed, \
                 malformed, dropped)",
                m.queries.clone(),
            );
        m
    }

    pub fn query(&self, transport: DnsTransport, result: DnsResult) {
        self.queries
            .get_or_create(&DnsLabels { transport, result })
            .inc();
    }
}
