//! What happens to an accepted connection once its original destination is known: protocol
//! detection (or the protocol the config declares for the port), then HTTP routing or TCP
//! passthrough.

use std::{net::SocketAddr, sync::Arc};

use bytes::BytesMut;
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    ProxyConfig,
    config::Protocol as Declared,
    detect::{self, Protocol},
    drain::Drain,
    h1,
    http::{self, ConnCtx},
    io::DownstreamIo,
    metrics::{self, Direction, ProxyMetrics},
    orig_dst::OrigDstAddr,
    snapshot::ConfigSource,
    tcp,
};

/// Everything the connection handlers share.
#[derive(Clone)]
pub struct Shared {
    pub config: Arc<ProxyConfig>,
    pub source: ConfigSource,
    pub metrics: ProxyMetrics,
    /// Where captured connections were going (the socket's answer, in a pod).
    pub orig_dst: Arc<dyn OrigDstAddr>,
    /// This worker's drain signal (SIGTERM): HTTP connections finish their requests and close.
    pub drain: Drain,
}

pub async fn dispatch(
    mut stream: TcpStream,
    peer: SocketAddr,
    orig_dst: SocketAddr,
    direction: Direction,
    shared: &Shared,
) {
    let _ = stream.set_nodelay(true);
    let snapshot = shared.source.snapshot();
    let limits = snapshot.config.limits.clone();
    let declared = match direction {
        Direction::Outbound => snapshot
            .listeners
            .get(&orig_dst.port())
            .map_or(Declared::Auto, |l| l.protocol),
        Direction::Inbound => snapshot.config.inbound.protocol_of(orig_dst.port()),
    };
    let tcp_idle = match direction {
        Direction::Outbound => snapshot
            .config
            .outbound
            .listeners
            .iter()
            .find(|l| l.port == orig_dst.port())
            .and_then(|l| l.tcp_idle_timeout),
        Direction::Inbound => snapshot.config.inbound.idle_timeout_of(orig_dst.port()),
    }
    .unwrap_or(limits.tcp_idle_timeout)
    .nonzero();
    let detected = match declared {
        Declared::Tcp => Ok((Protocol::Tcp, BytesMut::new())),
        Declared::Auto => {
            detect::detect(&mut stream, limits.protocol_detection_timeout.nonzero()).await
        }
        // Declared HTTP of any kind (Istio's http, http2, grpc…).
        _ => detect::detect(&mut stream, limits.header_read_timeout.nonzero())
            .await
            // Declared HTTP: whatever arrives is parsed as HTTP/1 (garbage gets its 400).
            .map(|(p, b)| {
                (
                    if p == Protocol::Tcp {
                        Protocol::Http1
                    } else {
                        p
                    },
                    b,
                )
            }),
    };
    let (protocol, prefix) = match detected {
        Ok(d) => d,
        Err(err) => {
            debug!(%err, "connection failed during protocol detection");
            return;
        }
    };
    shared.metrics.detected(
        direction,
        match protocol {
            Protocol::Http1 => metrics::Protocol::Http1,
            Protocol::Http2 => metrics::Protocol::Http2,
            Protocol::Tcp => metrics::Protocol::Tcp,
        },
    );
    let io = DownstreamIo::new(prefix, stream, shared.metrics.clone(), direction);
    match protocol {
        Protocol::Tcp => {
            let (cluster, source) = match direction {
                Direction::Outbound => (&snapshot.clusters.outbound_passthrough, None),
                Direction::Inbound => (
                    &snapshot.clusters.inbound_passthrough,
                    Some(shared.config.passthrough_for(&orig_dst)),
                ),
            };
            let timeout = cluster.connect_timeout;
            drop(snapshot);
            // Boxed, like every branch: the task stays as small as `dispatch` itself.
            Box::pin(tcp::proxy(
                io,
                orig_dst,
                source,
                tcp::Timeouts {
                    connect: timeout,
                    idle: tcp_idle,
                },
                direction,
                &shared.metrics,
            ))
            .await;
        }
        Protocol::Http1 | Protocol::Http2 => {
            drop(snapshot);
            let ctx = Arc::new(ConnCtx {
                direction,
                peer,
                orig_dst,
                source: shared.source.clone(),
                metrics: shared.metrics.clone(),
                declared,
                active_requests: shared
                    .metrics
                    .active_requests
                    .get_or_create(&metrics::DirectionLabels { direction })
                    .clone(),
                last_series: std::sync::Mutex::new(None),
                last_grpc: std::sync::Mutex::new(None),
            });
            let drain = shared.drain.watch();
            // Both boxed, as the other branches: the connection's task is sized for its
            // largest branch, and HTTP/1's inline (~4 KiB of hyper's HTTP/1 state) made every
            // h2 and TCP connection's task that big too (memory per idle h2 connection).
            if protocol == Protocol::Http2 {
                Box::pin(http::serve_h2(io, ctx, &limits, drain)).await;
            } else {
                Box::pin(h1::serve(io, ctx, &limits, drain)).await;
            }
        }
    }
}
