//! The sidecar proxy: the part Envoy plays in Istio. Outbound on 127.0.0.1:15001 (and [::1]),
//! inbound on 15006; both recover the original destination with `SO_ORIGINAL_DST`, so the proxy
//! works the same under eBPF and iptables interception. HTTP/1.1 and h2c are routed (`route`,
//! `cluster`, `retry`), everything else is passed through as TCP (`tcp`).
//!
//! - [`runtime`]: the composition root: binds every listener, runs the workers, drains.
//! - [`config`]: the YAML file; [`snapshot`]: one compiled generation of it, swapped on reload
//!   ([`reload`]).
//! - [`outbound`], [`inbound`]: the two capture listeners; [`dispatch`]: detection → HTTP or TCP.
//! - [`detect`], [`io`]: first-bytes protocol detection and the replaying, counting stream.
//! - [`http`]: serving and forwarding requests ([`h1`]: HTTP/1 connections that hold no
//!   buffers between requests; [`drain`]: the per-worker drain signal); [`route`]: virtual hosts and routes;
//!   [`cluster`], [`balancer`], [`outlier`], [`pool`]: upstreams; [`retry`]: Envoy's retry
//!   policy.
//! - [`admin`] (15000), [`metrics`] (15090), [`dns`]: the DNS proxy (15053).

pub mod admin;
pub mod balancer;
pub mod cluster;
pub mod config;
pub mod detect;
pub mod dispatch;
pub mod dns;
pub mod drain;
pub mod h1;
pub mod http;
pub mod inbound;
pub mod io;
pub mod metrics;
pub mod orig_dst;
pub mod outbound;
pub mod outlier;
pub mod pool;
pub mod reload;
pub mod replay;
pub mod retry;
pub mod route;
pub mod runtime;
pub mod snapshot;
pub mod tcp;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use interceptor_common::config::{PASSTHROUGH_V4, PASSTHROUGH_V6};
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
    /// Admin endpoint (127.0.0.1:15000: `/config_dump`, `/clusters`, `/stats`, `/ready`).
    pub admin: SocketAddr,
    /// The routing config file (`--config`); none = every destination is passed through.
    pub config_file: Option<PathBuf>,
    /// How often the config file is checked for changes (SIGHUP reloads at once).
    #[serde(with = "humantime_secs")]
    pub config_poll: Duration,
    /// Data-plane threads, each with its own event loop and upstream pools (thread per core,
    /// as Envoy's workers): a connection and its upstream requests never cross threads.
    pub workers: usize,
    /// Source of the inbound hop to the app (Istio's InboundPassthroughClusterIpv4).
    pub passthrough_v4: Ipv4Addr,
    /// Same for IPv6 (Istio: `::6`).
    pub passthrough_v6: Ipv6Addr,
    #[serde(with = "humantime_secs")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_secs")]
    pub drain_timeout: Duration,
    /// The DNS proxy (15053); off unless `listen` is set.
    pub dns: dns::DnsSettings,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            outbound: SocketAddr::from((Ipv4Addr::LOCALHOST, 15001)),
            outbound_v6: Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 15001))),
            inbound: SocketAddr::from((Ipv6Addr::UNSPECIFIED, 15006)),
            metrics: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15090)),
            health: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 15021)),
            admin: SocketAddr::from((Ipv4Addr::LOCALHOST, 15000)),
            config_file: None,
            config_poll: Duration::from_secs(1),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            passthrough_v4: Ipv4Addr::from(PASSTHROUGH_V4),
            passthrough_v6: Ipv6Addr::from(PASSTHROUGH_V6),
            connect_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(5),
            dns: dns::DnsSettings::default(),
        }
    }
}

impl ProxyConfig {
    /// Ports of the proxy itself: a connection whose original destination is one of these on
    /// this host would loop back into the proxy.
    pub fn own_ports(&self) -> [u16; 5] {
        [
            self.outbound.port(),
            self.inbound.port(),
            self.metrics.port(),
            self.health.port(),
            self.admin.port(),
        ]
    }

    /// The settings clusters take from the command line.
    pub fn cluster_settings(&self) -> cluster::Settings {
        cluster::Settings {
            workers: self.workers.max(1),
            connect_timeout: self.connect_timeout,
            passthrough_v4: self.passthrough_v4,
            passthrough_v6: self.passthrough_v6,
        }
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

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs_f64()))
    }
}
