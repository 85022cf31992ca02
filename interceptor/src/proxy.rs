//! The sidecar proxy: the part Envoy plays in Istio. Outbound on 127.0.0.1:15001 (and [::1]),
//! inbound on 15006; both recover the original destination with `SO_ORIGINAL_DST`, so the proxy
//! works the same under eBPF and iptables interception.

pub mod forward;
pub mod inbound;
pub mod metrics;
pub mod outbound;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use serde::Serialize;

/// Where the proxy listens and how it connects upstream.
#[derive(Clone, Debug, Serialize)]
pub struct ProxyConfig {
    /// Outbound capture listener (Istio: 127.0.0.1:15001).
    pub outbound: SocketAddr,
    /// IPv6 outbound capture listener ([::1]:15001); skipped when the pod has no IPv6.
    pub outbound_v6: Option<SocketAddr>,
    /// Inbound capture listener (Istio: 0.0.0.0:15006; `[::]` takes IPv4 too).
    pub inbound: SocketAddr,
    /// Prometheus endpoint (15090, `/stats/prometheus`).
    pub metrics: SocketAddr,
    /// Health endpoint (15021, `/healthz/ready`).
    pub health: SocketAddr,
    /// Source of the inbound hop to the app (Istio's InboundPassthroughClusterIpv4).
    pub passthrough_v4: Ipv4Addr,
    /// Same for IPv6 (Istio: `::6`).
    pub passthrough_v6: Ipv6Addr,
    #[serde(with = "humantime_secs")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_secs")]
    pub drain_timeout: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            outbound: SocketAddr::from((Ipv4Addr::LOCALHOST, 15001)),
            outbound_v6: Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 15001))),
            inbound: SocketAddr::from((Ipv6Addr::UNSPECIFIED, 15006)),
            metrics: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15090)),
            health: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15021)),
            passthrough_v4: Ipv4Addr::new(127, 0, 0, 6),
            passthrough_v6: Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6),
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
        }
    }
}

impl ProxyConfig {
    /// Ports of the proxy itself: a connection whose original destination is one of these on
    /// this host would loop back into the proxy.
    pub fn own_ports(&self) -> [u16; 4] {
        [
            self.outbound.port(),
            self.inbound.port(),
            self.metrics.port(),
            self.health.port(),
        ]
    }

    /// The passthrough source for a destination of this family.
    pub fn passthrough_for(&self, dst: &SocketAddr) -> IpAddr {
        match dst.ip() {
            IpAddr::V4(_) => IpAddr::V4(self.passthrough_v4),
            IpAddr::V6(_) => IpAddr::V6(self.passthrough_v6),
        }
    }
}

mod humantime_secs {
    use std::time::Duration;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs_f64()))
    }
}
