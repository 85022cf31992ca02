//! Inbound (15006): a connection to the pod's address, steered here, goes on to that address
//! (the article's `ORIGINAL_DST` inbound cluster) from 127.0.0.6, as Istio does since 1.10:
//! an app bound to its pod IP is reachable, one bound only to 127.0.0.1 stays private.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::{TcpSocket, TcpStream};
use tracing::{debug, warn};

use super::{
    ProxyConfig,
    forward::forward,
    metrics::{Direction, ProxyMetrics, Refusal},
};
use crate::socket;

pub async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    config: Arc<ProxyConfig>,
    metrics: ProxyMetrics,
) {
    let _active = metrics.open(Direction::Inbound);
    // With sk_lookup the accepted socket's local address is the original destination; the
    // getsockopt program answers SO_ORIGINAL_DST with it too (and iptables REDIRECT needs it).
    let orig = match socket::original_dst(&stream).or_else(|_| stream.local_addr()) {
        Ok(orig) => socket::canonical(orig),
        Err(err) => {
            warn!(%peer, %err, "inbound connection without a local address; closing");
            metrics.refuse(Direction::Inbound, Refusal::NoOriginalDst);
            return;
        }
    };
    // Our own passthrough hop coming back would be a loop: refuse it rather than spin.
    if socket::canonical(peer).ip() == config.passthrough_for(&orig) {
        warn!(%peer, %orig, "inbound connection from the passthrough address: a loop; closing");
        metrics.refuse(Direction::Inbound, Refusal::Loop);
        return;
    }
    if config.own_ports().contains(&orig.port()) {
        warn!(%peer, %orig, "inbound connection to the proxy's own port; closing");
        metrics.refuse(Direction::Inbound, Refusal::Loop);
        return;
    }
    let upstream = match tokio::time::timeout(
        config.connect_timeout,
        connect_from(config.passthrough_for(&orig), orig),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(err)) => {
            debug!(%peer, %orig, %err, "connect to the app failed");
            metrics.refuse(Direction::Inbound, Refusal::ConnectFailed);
            return;
        }
        Err(_) => {
            debug!(%peer, %orig, "connect to the app timed out");
            metrics.refuse(Direction::Inbound, Refusal::ConnectFailed);
            return;
        }
    };
    match forward(stream, upstream, Direction::Inbound, &metrics).await {
        Ok((sent, received)) => debug!(%peer, %orig, sent, received, "inbound closed"),
        Err(err) => debug!(%peer, %orig, %err, "inbound ended with an error"),
    }
}

/// Connects to `dst` from `src` (port chosen at connect time). Falls back to the default
/// source when `src` cannot be bound (e.g. `::6` not configured on lo).
async fn connect_from(src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
    let sock = match dst {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    let _ = socket::set_bind_address_no_port(&sock);
    if let Err(err) = sock.bind(SocketAddr::new(src, 0)) {
        debug!(%src, %err, "cannot bind the passthrough source; using the default");
        let sock = match dst {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        return sock.connect(dst).await;
    }
    sock.connect(dst).await
}
