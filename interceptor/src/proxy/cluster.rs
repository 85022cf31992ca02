//! Clusters: where routed requests go. A static cluster has endpoints, a load-balancing policy
//! and outlier detection; an original-destination cluster (Istio's `PassthroughCluster` outbound,
//! `inbound|port||` inbound) goes to the address the client asked for. Each cluster owns a pool
//! of keep-alive upstream connections (`pool.rs`, per worker thread and endpoint) and
//! its statistics (`/clusters`).

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{Either, Full, Limited};
use interceptor_common::config::{PASSTHROUGH_V4, PASSTHROUGH_V6};
use serde::Serialize;
use tokio::{
    net::{TcpSocket, TcpStream},
    time::Instant,
};

use super::{
    balancer,
    config::{
        ClusterConfig, Config, DEFAULT_IDLE_TIMEOUT, Dur, LbPolicy, OutlierConfig, UpstreamProtocol,
    },
    h1::DownstreamBody,
    outlier::Health,
    pool::Pool,
    replay::ReplayBody,
};
use crate::socket;

/// A request body on its way upstream: buffered (replayable, so retriable), streaming, or
/// streaming while kept for a retry (no content-length to judge it by).
pub type UpstreamBody = Either<Full<Bytes>, Either<Limited<DownstreamBody>, ReplayBody>>;

/// Settings that come from the command line rather than the file.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Data-plane worker threads (one upstream pool each).
    pub workers: usize,
    pub connect_timeout: Duration,
    pub passthrough_v4: Ipv4Addr,
    pub passthrough_v6: Ipv6Addr,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            workers: 1,
            connect_timeout: Duration::from_secs(10),
            passthrough_v4: Ipv4Addr::from(PASSTHROUGH_V4),
            passthrough_v6: Ipv6Addr::from(PASSTHROUGH_V6),
        }
    }
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks this thread as data-plane worker `index` (its requests use pool `index`).
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

/// How a cluster's pool connects.
struct PoolSettings {
    workers: usize,
    connect_timeout: Duration,
    idle_timeout: Duration,
    bind: Option<(Ipv4Addr, Ipv6Addr)>,
}

#[derive(Debug)]
pub enum Kind {
    Static(Vec<Arc<Endpoint>>),
    OriginalDst,
    /// Stands in where validation guarantees a cluster exists: answers 503.
    Blackhole,
}

#[derive(Debug)]
pub struct Cluster {
    pub name: String,
    pub kind: Kind,
    lb: LbPolicy,
    rr: AtomicUsize,
    pub outlier: OutlierConfig,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    /// The upstream protocol (`auto`: the port's declared one, else the downstream's).
    pub protocol: UpstreamProtocol,
    /// One connection pool per data-plane worker: a request uses its own worker's pool, so the
    /// upstream connection task runs on the same thread as the downstream one.
    pools: Vec<Arc<Pool>>,
    pub stats: ClusterStats,
    /// The config it was built from: an unchanged cluster survives a reload with its pool,
    /// ejections and stats.
    source: Option<ClusterConfig>,
}

#[derive(Debug, Default, Serialize)]
pub struct ClusterStats {
    pub rq_total: AtomicU64,
    pub rq_error: AtomicU64,
    pub rq_retry: AtomicU64,
    pub rq_timeout: AtomicU64,
    pub cx_connect_fail: AtomicU64,
    pub ejections: AtomicU64,
}

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as a URI authority (the pool key), made once.
    pub authority: http::uri::Authority,
    active: AtomicU64,
    pub rq_total: AtomicU64,
    pub rq_error: AtomicU64,
    pub health: Health,
}

/// Counts an in-flight request on an endpoint until dropped (least-request uses it).
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Endpoint {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            authority: http::uri::Authority::try_from(addr.to_string().as_str())
                .unwrap_or_else(|_| http::uri::Authority::from_static("invalid")),
            active: AtomicU64::new(0),
            rq_total: AtomicU64::new(0),
            rq_error: AtomicU64::new(0),
            health: Health::default(),
        }
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn start(&self) -> InFlight<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.rq_total.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.active)
    }

    pub fn is_ejected(&self, now: Instant) -> bool {
        self.health.is_ejected(now)
    }

    /// Records an attempt's result for outlier detection; true when it ejected the endpoint.
    pub fn record(
        &self,
        success: bool,
        outlier: &OutlierConfig,
        ejected_now: usize,
        total: usize,
        now: Instant,
    ) -> bool {
        if !success {
            self.rq_error.fetch_add(1, Ordering::Relaxed);
        }
        self.health
            .record(success, outlier, ejected_now, total, now)
    }
}

impl Cluster {
    fn new(
        name: String,
        kind: Kind,
        lb: LbPolicy,
        outlier: OutlierConfig,
        pool: PoolSettings,
        source: Option<ClusterConfig>,
    ) -> Self {
        let protocol = source
            .as_ref()
            .map_or(UpstreamProtocol::Auto, |c| c.protocol);
        let connect_timeout = pool.connect_timeout;
        let pools = (0..pool.workers.max(1))
            .map(|_| Pool::new(connect_timeout, pool.idle_timeout, pool.bind))
            .collect();
        Self {
            name,
            kind,
            lb,
            rr: AtomicUsize::new(0),
            outlier,
            connect_timeout,
            idle_timeout: pool.idle_timeout,
            protocol,
            pools,
            stats: ClusterStats::default(),
            source,
        }
    }

    /// This worker's connection pool (none for a blackhole).
    pub fn pool(&self) -> Option<&Arc<Pool>> {
        if self.pools.is_empty() {
            return None;
        }
        let worker = WORKER.with(std::cell::Cell::get);
        self.pools.get(worker % self.pools.len())
    }

    /// Idle upstream connections over every worker's pool.
    pub fn idle_connections(&self) -> usize {
        self.pools.iter().map(|p| p.idle_connections()).sum()
    }

    /// Open upstream HTTP/2 connections over every worker's pool.
    pub fn h2_connections(&self) -> usize {
        self.pools.iter().map(|p| p.h2_connections()).sum()
    }

    /// Streams counted open on upstream HTTP/2 connections over every worker's pool.
    pub fn h2_streams(&self) -> usize {
        self.pools.iter().map(|p| p.h2_streams()).sum()
    }

    pub fn from_config(c: &ClusterConfig, workers: usize) -> Self {
        Self::new(
            c.name.clone(),
            Kind::Static(
                c.endpoints
                    .iter()
                    .map(|a| Arc::new(Endpoint::new(*a)))
                    .collect(),
            ),
            c.lb_policy,
            c.outlier_detection.clone(),
            PoolSettings {
                workers,
                connect_timeout: c.connect_timeout.0,
                idle_timeout: c.idle_timeout.0,
                bind: None,
            },
            Some(c.clone()),
        )
    }

    /// An original-destination cluster; `bind` = connect from these sources (inbound:
    /// 127.0.0.6 / ::6).
    pub fn original_dst(
        workers: usize,
        name: &str,
        connect_timeout: Duration,
        idle_timeout: Duration,
        bind: Option<(Ipv4Addr, Ipv6Addr)>,
    ) -> Self {
        Self::new(
            name.to_owned(),
            Kind::OriginalDst,
            LbPolicy::RoundRobin,
            OutlierConfig {
                consecutive_errors: 0,
                ..OutlierConfig::default()
            },
            PoolSettings {
                workers,
                connect_timeout,
                idle_timeout,
                bind,
            },
            None,
        )
    }

    pub fn blackhole() -> Self {
        Self {
            name: "blackhole".into(),
            kind: Kind::Blackhole,
            lb: LbPolicy::RoundRobin,
            rr: AtomicUsize::new(0),
            outlier: OutlierConfig::default(),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::ZERO,
            protocol: UpstreamProtocol::Auto,
            pools: Vec::new(),
            stats: ClusterStats::default(),
            source: None,
        }
    }

    /// Picks the endpoint for an attempt. `orig_dst` serves original-destination clusters.
    pub fn pick(&self, orig_dst: SocketAddr, avoid: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        match &self.kind {
            Kind::Static(eps) => balancer::pick(self.lb, eps, &self.rr, avoid, Instant::now()),
            Kind::OriginalDst => Some(Arc::new(Endpoint::new(orig_dst))),
            Kind::Blackhole => None,
        }
    }

    /// Records an attempt's result on `endpoint` (outlier detection, stats).
    pub fn record(&self, endpoint: &Endpoint, success: bool) {
        let Kind::Static(eps) = &self.kind else {
            if !success {
                self.stats.rq_error.fetch_add(1, Ordering::Relaxed);
            }
            return;
        };
        if success {
            // Only resets the failure streak: no clock, no scan.
            endpoint.health.succeeded();
            return;
        }
        self.stats.rq_error.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let ejected = eps.iter().filter(|e| e.is_ejected(now)).count();
        if endpoint.record(false, &self.outlier, ejected, eps.len(), now) {
            self.stats.ejections.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(cluster = %self.name, endpoint = %endpoint.addr, "endpoint ejected by outlier detection");
        }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        match &self.kind {
            Kind::Static(eps) => eps,
            _ => &[],
        }
    }

    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Static(_) => "static",
            Kind::OriginalDst => "original_dst",
            Kind::Blackhole => "blackhole",
        }
    }
}

/// Every cluster of one config generation.
#[derive(Debug)]
pub struct ClusterSet {
    pub by_name: HashMap<String, Arc<Cluster>>,
    pub outbound_passthrough: Arc<Cluster>,
    pub inbound_passthrough: Arc<Cluster>,
}

pub const OUTBOUND_PASSTHROUGH: &str = "PassthroughCluster";
pub const INBOUND_PASSTHROUGH: &str = "InboundPassthroughCluster";

impl ClusterSet {
    /// Builds the clusters of `config`, reusing those of `previous` whose definition did not
    /// change (their connections, ejections and stats carry over).
    pub fn build(config: &Config, previous: Option<&ClusterSet>, settings: &Settings) -> Self {
        let mut by_name = HashMap::new();
        for c in &config.clusters {
            let reused = previous
                .and_then(|p| p.by_name.get(&c.name))
                .filter(|old| old.source.as_ref() == Some(c))
                .cloned();
            let cluster =
                reused.unwrap_or_else(|| Arc::new(Cluster::from_config(c, settings.workers)));
            by_name.insert(c.name.clone(), cluster);
        }
        let resolve = |d: Option<Dur>, default: Duration| d.map_or(default, |d| d.0);
        let out = &config.outbound.passthrough;
        // A passthrough cluster is kept (with its pooled connections) only while its timeouts
        // are unchanged: its pools were built with them.
        let same = |c: &Arc<Cluster>, connect: Duration, idle: Duration| {
            c.connect_timeout == connect && c.idle_timeout == idle
        };
        let (out_connect, out_idle) = (
            resolve(out.connect_timeout, settings.connect_timeout),
            resolve(out.idle_timeout, DEFAULT_IDLE_TIMEOUT.0),
        );
        let outbound_passthrough = previous
            .map(|p| p.outbound_passthrough.clone())
            .filter(|c| same(c, out_connect, out_idle))
            .unwrap_or_else(|| {
                Arc::new(Cluster::original_dst(
                    settings.workers,
                    OUTBOUND_PASSTHROUGH,
                    out_connect,
                    out_idle,
                    None,
                ))
            });
        let inb = &config.inbound.cluster;
        let (in_connect, in_idle) = (
            resolve(inb.connect_timeout, settings.connect_timeout),
            resolve(inb.idle_timeout, DEFAULT_IDLE_TIMEOUT.0),
        );
        let inbound_passthrough = previous
            .map(|p| p.inbound_passthrough.clone())
            .filter(|c| same(c, in_connect, in_idle))
            .unwrap_or_else(|| {
                Arc::new(Cluster::original_dst(
                    settings.workers,
                    INBOUND_PASSTHROUGH,
                    in_connect,
                    in_idle,
                    Some((settings.passthrough_v4, settings.passthrough_v6)),
                ))
            });
        Self {
            by_name,
            outbound_passthrough,
            inbound_passthrough,
        }
    }
}

/// Connects to `dst`, from `src` when given (port chosen at connect time).
///
/// No fallback to the default source when `src` cannot be bound: the passthrough source is
/// what keeps the hop to the app from being captured again, and from the pod's own address
/// the proxy's connection would come straight back to its inbound listener, forever.
pub async fn connect(src: Option<IpAddr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    if let Some(src) = src {
        let _ = socket::set_bind_address_no_port(&sock);
        sock.bind(SocketAddr::new(src, 0)).map_err(|err| {
            io::Error::new(
                err.kind(),
                format!(
                    "cannot bind the passthrough source {src} ({err}): it must be on the pod's \
                     loopback (the agent adds ::6 when it enables a pod with IPv6)"
                ),
            )
        })?;
    }
    sock.connect(dst).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(yaml: &str, previous: Option<&ClusterSet>) -> ClusterSet {
        let config = Config::parse("t.yaml", yaml).expect("valid config");
        ClusterSet::build(&config, previous, &Settings::default())
    }

    #[test]
    fn passthrough_clusters_survive_a_reload_only_with_the_same_timeouts() {
        let first = build("", None);
        let same = build("", Some(&first));
        assert!(Arc::ptr_eq(
            &first.outbound_passthrough,
            &same.outbound_passthrough
        ));
        assert!(Arc::ptr_eq(
            &first.inbound_passthrough,
            &same.inbound_passthrough
        ));

        let idle = build(
            "outbound: {passthrough: {idle_timeout: 5s}}\ninbound: {idle_timeout: 7s}",
            Some(&same),
        );
        assert!(!Arc::ptr_eq(
            &same.outbound_passthrough,
            &idle.outbound_passthrough
        ));
        assert!(!Arc::ptr_eq(
            &same.inbound_passthrough,
            &idle.inbound_passthrough
        ));
        assert_eq!(
            idle.outbound_passthrough.idle_timeout,
            Duration::from_secs(5)
        );
        assert_eq!(
            idle.inbound_passthrough.idle_timeout,
            Duration::from_secs(7)
        );
    }
}
