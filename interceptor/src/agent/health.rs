//! The agent's HTTP endpoints on the shared endpoint server (`http_server`): `/healthz/ready`
//! (200 once the datapath is pinned and, with `--kube`, the first complete list is applied),
//! `/healthz/live`, and OpenMetrics on `/metrics` (also `/stats/prometheus`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
};

use prometheus_client::{metrics::gauge::Gauge, registry::Registry as MetricsRegistry};
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::Error;
use crate::http_server;

/// Whether the agent is ready, as the probe and the `interceptor_agent_ready` gauge say.
#[derive(Clone)]
pub(super) struct Readiness {
    ready: Arc<AtomicBool>,
    gauge: Gauge<i64, AtomicI64>,
}

impl Readiness {
    pub(super) fn new(registry: &mut MetricsRegistry) -> Self {
        let gauge = Gauge::default();
        registry.register("ready", "Whether the agent is ready", gauge.clone());
        Self {
            ready: Arc::new(AtomicBool::new(false)),
            gauge,
        }
    }

    pub(super) fn get(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub(super) fn set(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.gauge.set(i64::from(ready));
    }
}

/// Serves the endpoints, bound before anything else so a port conflict fails the start.
pub(super) async fn serve(
    addr: SocketAddr,
    ready: Readiness,
    registry: Arc<MetricsRegistry>,
    stop: CancellationToken,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Health { addr, source })?;
    let handler: http_server::Handler = Arc::new(move |req| match req.uri().path() {
        "/healthz/ready" if ready.get() => http_server::text(http::StatusCode::OK, "ready\n"),
        "/healthz/ready" => http_server::text(
            http::StatusCode::SERVICE_UNAVAILABLE,
            "not ready: datapath or first Kubernetes list pending\n",
        ),
        "/healthz/live" => http_server::text(http::StatusCode::OK, "live\n"),
        "/metrics" | "/stats/prometheus" => http_server::openmetrics(&registry),
        _ => http_server::text(http::StatusCode::NOT_FOUND, "not found\n"),
    });
    info!(%addr, "serving /healthz/ready");
    tokio::spawn(http_server::serve(listener, handler, stop));
    Ok(())
}
