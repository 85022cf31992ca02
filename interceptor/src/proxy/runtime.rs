//! The proxy's composition root: binds every listener, builds metrics and servers, and runs them
//! until shutdown, then drains. `Bound` reports the bound addresses (tests bind port 0).
//!
//! Threads: this one (the control plane: accept, admin, metrics, health, reload, signals) and
//! `workers` data-plane threads, each a current-thread runtime that owns the connections handed
//! to it and its own upstream pools.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use prometheus_client::registry::Registry;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    http_server::{self, Handler, text},
    proxy::{
        ProxyConfig, admin,
        config::ConfigError,
        dispatch::Shared,
        dns,
        drain::Drain,
        inbound,
        metrics::{DnsMetrics, ProxyMetrics},
        orig_dst::{FromSocket, OrigDstAddr},
        outbound, reload,
        snapshot::ConfigSource,
    },
};

#[derive(Debug, thiserror::Error)]
#[error("binding {what} on {addr}: {source}")]
pub struct BindError {
    what: &'static str,
    addr: SocketAddr,
    #[source]
    source: io::Error,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("invalid config: {0}")]
    Config(#[from] ConfigError),
}

/// Every listener of the proxy, bound and ready to serve.
pub struct Bound {
    pub config: Arc<ProxyConfig>,
    pub outbound: SocketAddr,
    pub outbound_v6: Option<SocketAddr>,
    pub inbound: SocketAddr,
    pub metrics: SocketAddr,
    pub health: SocketAddr,
    pub admin: SocketAddr,
    /// The DNS proxy's addresses (UDP and TCP on each), if it runs.
    pub dns: Vec<SocketAddr>,
    /// The routing config (reloadable).
    pub source: ConfigSource,
    /// Where captured connections were going; the socket's answer unless replaced.
    orig_dst: Arc<dyn OrigDstAddr>,
    listeners: Listeners,
}

struct Listeners {
    outbound: TcpListener,
    outbound_v6: Option<TcpListener>,
    inbound: TcpListener,
    metrics: TcpListener,
    health: TcpListener,
    admin: TcpListener,
    dns: Option<dns::Listeners>,
}

fn listen(addr: SocketAddr, what: &'static str) -> Result<TcpListener, BindError> {
    let err = |source| BindError { what, addr, source };
    let sock =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]` also takes IPv4, like Envoy's 0.0.0.0 listeners do for both families.
        sock.set_only_v6(false).map_err(err)?;
    }
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(1024).map_err(err)?;
    TcpListener::from_std(sock.into()).map_err(err)
}

impl Bound {
    /// Loads the config file (if any) and binds every listener.
    pub fn bind(config: ProxyConfig) -> Result<Self, Error> {
        let source = ConfigSource::load(config.config_file.clone(), config.cluster_settings())?;
        let outbound = listen(config.outbound, "the outbound listener")?;
        let outbound_v6 = match config.outbound_v6 {
            Some(addr) => match listen(addr, "the IPv6 outbound listener") {
                Ok(l) => Some(l),
                Err(err) => {
                    debug!(%err, "no IPv6 outbound listener (IPv6 off in this pod?)");
                    None
                }
            },
            None => None,
        };
        let inbound = match listen(config.inbound, "the inbound listener") {
            Ok(l) => l,
            // A pod without IPv6 cannot bind `[::]`: fall back to IPv4 only.
            Err(err) if config.inbound.is_ipv6() && config.inbound.ip().is_unspecified() => {
                debug!(%err, "no dual-stack inbound listener; using 0.0.0.0");
                listen(
                    SocketAddr::from(([0, 0, 0, 0], config.inbound.port())),
                    "the inbound listener",
                )?
            }
            Err(err) => return Err(err.into()),
        };
        let metrics = listen(config.metrics, "the metrics endpoint")?;
        let health = listen(config.health, "the health endpoint")?;
        let admin = listen(config.admin, "the admin endpoint")?;
        let dns = dns::bind(&config.dns).map_err(|(addr, source)| BindError {
            what: "the DNS proxy",
            addr,
            source,
        })?;
        let addr = |l: &TcpListener| l.local_addr().unwrap_or(config.outbound);
        Ok(Self {
            outbound: addr(&outbound),
            outbound_v6: outbound_v6.as_ref().map(addr),
            inbound: addr(&inbound),
            metrics: addr(&metrics),
            health: addr(&health),
            admin: addr(&admin),
            dns: dns.as_ref().map(|d| d.addrs.clone()).unwrap_or_default(),
            config: Arc::new(config),
            source,
            orig_dst: Arc::new(FromSocket),
            listeners: Listeners {
                outbound,
                outbound_v6,
                inbound,
                metrics,
                health,
                admin,
                dns,
            },
        })
    }

    /// Answers original destinations with `orig_dst` instead of asking the socket: for
    /// benchmarks and tests that run the proxy without interception.
    pub fn with_orig_dst(mut self, orig_dst: Arc<dyn OrigDstAddr>) -> Self {
        self.orig_dst = orig_dst;
        self
    }

    /// Serves until `shutdown` resolves, then stops accepting and gives open connections up to
    /// the drain timeout to finish.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        self.run_with(shutdown, Registry::default()).await;
    }

    /// Like `run`, with metrics registered in `registry` (tests read it).
    pub async fn run_with(self, shutdown: impl Future<Output = ()>, mut registry: Registry) {
        let metrics = ProxyMetrics::new(&mut registry);
        let dns_metrics = DnsMetrics::new(&mut registry);
        let registry = Arc::new(registry);
        let stop = CancellationToken::new();
        let drain = CancellationToken::new();
        let conns = TaskTracker::new();
        let ready = Arc::new(AtomicBool::new(true));
        let Listeners {
            outbound,
            outbound_v6,
            inbound,
            metrics: metrics_listener,
            health,
            admin: admin_listener,
            dns: dns_listeners,
        } = self.listeners;

        // The data plane: `workers` threads, each with a current-thread runtime. This thread
        // accepts and hands connections out round robin; from then on a connection, its
        // upstream pool and their tasks stay on one worker (no cross-thread wakeups per request,
        // and an even spread even with few long-lived connections).
        let workers = self.config.workers.max(1);
        let mut worker_done = Vec::new();
        let mut handoff = Vec::new();
        for index in 0..workers {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
            let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
            // Each worker has its own drain signal, set off by the shared token.
            let shared = Arc::new(Shared {
                config: self.config.clone(),
                source: self.source.clone(),
                orig_dst: self.orig_dst.clone(),
                metrics: metrics.clone(),
                drain: Drain::new(),
            });
            let (conns, drain) = (conns.clone(), drain.clone());
            let drain_timeout = self.config.drain_timeout;
            let spawned = std::thread::Builder::new()
                .name(format!("proxy-worker-{index}"))
                .spawn(move || {
                    crate::proxy::cluster::set_worker(index);
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(err) => {
                            warn!(%err, index, "cannot start a proxy worker");
                            return;
                        }
                    };
                    let worker_drain = shared.drain.clone();
                    rt.spawn(async move {
                        drain.cancelled().await;
                        worker_drain.trigger();
                    });
                    rt.block_on(worker(rx, shared, conns.clone()));
                    // In-flight connections get the drain deadline, then the runtime drops them.
                    rt.block_on(async {
                        let _ = tokio::time::timeout(drain_timeout, conns.wait()).await;
                    });
                    drop(rt);
                    let _ = done.send(());
                });
            match spawned {
                Ok(_) => {
                    handoff.push(tx);
                    worker_done.push(done_rx);
                }
                Err(err) => warn!(%err, index, "cannot start a proxy worker thread"),
            }
        }
        let handoff = Arc::new(Handoff {
            workers: handoff,
            next: std::sync::atomic::AtomicUsize::new(0),
        });
        let mut accept_loops = Vec::new();
        for (listener, kind) in std::iter::once((outbound, Kind::Outbound))
            .chain(outbound_v6.map(|l| (l, Kind::Outbound)))
            .chain(std::iter::once((inbound, Kind::Inbound)))
        {
            accept_loops.push(tokio::spawn(accept(
                listener,
                kind,
                stop.clone(),
                handoff.clone(),
                Admission {
                    open: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
                    source: self.source.clone(),
                    metrics: metrics.clone(),
                    last_log: None,
                },
            )));
        }
        drop(handoff);
        let dns_server = dns_listeners.map(|listeners| {
            let proxy = Arc::new(dns::DnsProxy::new(
                self.source.clone(),
                &self.config.dns,
                self.dns.clone(),
                dns_metrics,
            ));
            tokio::spawn(proxy.serve(listeners, self.orig_dst.clone(), stop.clone()))
        });
        let reloader = tokio::spawn(reload::watch(
            self.source.clone(),
            metrics.clone(),
            self.config.config_poll,
            stop.clone(),
        ));
        let prometheus: Handler = {
            let registry = registry.clone();
            Arc::new(move |req| match req.uri().path() {
                "/stats/prometheus" | "/metrics" => http_server::openmetrics(&registry),
                _ => text(http::StatusCode::NOT_FOUND, "try /stats/prometheus\n"),
            })
        };
        let readiness: Handler = {
            let ready = ready.clone();
            Arc::new(move |req| match req.uri().path() {
                "/healthz/ready" | "/ready" if ready.load(Ordering::Relaxed) => {
                    text(http::StatusCode::OK, "ready\n")
                }
                "/healthz/ready" | "/ready" => {
                    text(http::StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                }
                _ => text(http::StatusCode::NOT_FOUND, "try /healthz/ready\n"),
            })
        };
        // Endpoints outlive the drain (readiness reports it); stopped at the very end.
        let endpoints_stop = CancellationToken::new();
        let admin = admin::handler(
            self.config.clone(),
            self.source.clone(),
            registry.clone(),
            ready.clone(),
        );
        let endpoints = [
            tokio::spawn(http_server::serve(
                admin_listener,
                admin,
                endpoints_stop.clone(),
            )),
            tokio::spawn(http_server::serve(
                metrics_listener,
                prometheus,
                endpoints_stop.clone(),
            )),
            tokio::spawn(http_server::serve(
                health,
                readiness,
                endpoints_stop.clone(),
            )),
        ];
        info!(
            outbound = %self.outbound,
            inbound = %self.inbound,
            metrics = %self.metrics,
            health = %self.health,
            admin = %self.admin,
            dns = ?self.dns,
            config = ?self.config.config_file,
            "proxy ready"
        );

        shutdown.await;
        ready.store(false, Ordering::Relaxed);
        stop.cancel();
        for l in accept_loops {
            let _ = l.await;
        }
        let _ = reloader.await;
        if let Some(dns) = dns_server {
            let _ = dns.await;
        }
        // HTTP connections finish their in-flight requests and close; TCP ones get the deadline.
        drain.cancel();
        conns.close();
        let open = conns.len();
        if open > 0 {
            info!(open, timeout = ?self.config.drain_timeout, "draining connections");
        }
        if tokio::time::timeout(self.config.drain_timeout, conns.wait())
            .await
            .is_err()
        {
            warn!(
                open = conns.len(),
                "drain timeout: closing the remaining connections"
            );
        }
        // Workers finish within their own drain deadline (a connection handed over just
        // before the stop may start it late): wait for them, a little beyond it.
        let deadline =
            tokio::time::Instant::now() + self.config.drain_timeout + Duration::from_secs(1);
        for done in worker_done {
            let _ = tokio::time::timeout_at(deadline, done).await;
        }
        endpoints_stop.cancel();
        for e in endpoints {
            let _ = e.await;
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Outbound,
    Inbound,
}

/// An accepted connection on its way to a worker, with its place in the listener's count.
type Accepted = (std::net::TcpStream, SocketAddr, Kind, Slot);

/// One open connection of a listener, counted until dropped.
struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A listener's cap on open connections (`limits.max_connections_per_listener`).
struct Admission {
    open: Arc<std::sync::atomic::AtomicUsize>,
    source: ConfigSource,
    metrics: ProxyMetrics,
    last_log: Option<tokio::time::Instant>,
}

impl Admission {
    /// A slot for a new connection, or `None` (counted, logged at most once a second) when
    /// the listener is full.
    fn admit(&mut self, kind: Kind, peer: SocketAddr) -> Option<Slot> {
        let cap = self
            .source
            .snapshot()
            .config
            .limits
            .max_connections_per_listener as usize;
        let open = self.open.fetch_add(1, Ordering::AcqRel);
        let slot = Slot(self.open.clone());
        if cap == 0 || open < cap {
            return Some(slot);
        }
        let direction = match kind {
            Kind::Outbound => crate::proxy::metrics::Direction::Outbound,
            Kind::Inbound => crate::proxy::metrics::Direction::Inbound,
        };
        self.metrics
            .listener_overflow
            .get_or_create(&crate::proxy::metrics::DirectionLabels { direction })
            .inc();
        let now = tokio::time::Instant::now();
        if self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_log = Some(now);
            warn!(
                %peer, open, cap, ?direction,
                "listener at max_connections_per_listener: closing new connections until some \
                 end (raise limits.max_connections_per_listener if this load is expected)"
            );
        }
        None
    }
}

struct Handoff {
    workers: Vec<tokio::sync::mpsc::UnboundedSender<Accepted>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Handoff {
    fn send(&self, accepted: Accepted) {
        let n = self.workers.len();
        if n == 0 {
            return;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % n;
        if self.workers[i].send(accepted).is_err() {
            warn!(worker = i, "a proxy worker is gone; connection dropped");
        }
    }
}

/// One data-plane worker: serves the connections handed to it until the acceptors stop.
async fn worker(
    mut accepted: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
    shared: Arc<Shared>,
    conns: TaskTracker,
) {
    while let Some((stream, peer, kind, slot)) = accepted.recv().await {
        let stream = match TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(err) => {
                warn!(%err, %peer, "a worker cannot take a connection");
                continue;
            }
        };
        let shared = shared.clone();
        match kind {
            Kind::Outbound => conns.spawn(
                async move {
                    outbound::handle(stream, peer, shared).await;
                    drop(slot);
                }
                .instrument(info_span!("outbound", %peer)),
            ),
            Kind::Inbound => conns.spawn(
                async move {
                    inbound::handle(stream, peer, shared).await;
                    drop(slot);
                }
                .instrument(info_span!("inbound", %peer)),
            ),
        };
    }
}

async fn accept(
    listener: TcpListener,
    kind: Kind,
    stop: CancellationToken,
    handoff: Arc<Handoff>,
    mut admission: Admission,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            (stream, peer) = crate::socket::accept_with_backoff(&listener) => {
                let Some(slot) = admission.admit(kind, peer) else {
                    drop(stream);
                    continue;
                };
                match stream.into_std() {
                    Ok(stream) => handoff.send((stream, peer, kind, slot)),
                    Err(err) => warn!(%err, %peer, "cannot hand a connection to a worker"),
                }
            }
        }
    }
}
