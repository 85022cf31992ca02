//! The proxy's Prometheus metrics (served on 15090 `/stats/prometheus`).

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

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

#[derive(Clone, Default)]
pub struct ProxyMetrics {
    pub connections: Family<DirectionLabels, Counter>,
    pub active: Family<DirectionLabels, Gauge>,
    pub bytes: Family<BytesLabels, Counter>,
    pub refused: Family<RefusalLabels, Counter>,
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
        m
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

/// Decrements the active-connections gauge on drop, however the connection ends.
pub struct ActiveGuard(Gauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
