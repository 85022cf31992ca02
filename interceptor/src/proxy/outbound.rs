//! Outbound (15001): the app's connection, redirected here, goes to the destination it asked for.
//! The proxy's own upstream connection is made as the proxy UID, so it is not intercepted again.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
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
    let _active = metrics.open(Direction::Outbound);
    let orig = match socket::original_dst(&stream) {
        Ok(orig) => orig,
        Err(err) => {
            warn!(
                %peer, %err,
                "no original destination: this connection reached the outbound port without \
                 being redirected; closing it"
            );
            metrics.refuse(Direction::Outbound, Refusal::NoOriginalDst);
            return;
        }
    };
    let local = stream.local_addr().ok();
    if Some(orig) == local || (orig.ip().is_loopback() && config.own_ports().contains(&orig.port()))
    {
        warn!(%peer, %orig, "original destination is the proxy itself; closing");
        metrics.refuse(Direction::Outbound, Refusal::Loop);
        return;
    }
    let upstream =
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(orig)).await {
            Ok(Ok(s)) => s,
            Ok(Err(err)) => {
                debug!(%peer, %orig, %err, "upstream connect failed");
                metrics.refuse(Direction::Outbound, Refusal::ConnectFailed);
                return;
            }
            Err(_) => {
                debug!(%peer, %orig, "upstream connect timed out");
                metrics.refuse(Direction::Outbound, Refusal::ConnectFailed);
                return;
            }
        };
    match forward(stream, upstream, Direction::Outbound, &metrics).await {
        Ok((sent, received)) => debug!(%peer, %orig, sent, received, "outbound closed"),
        Err(err) => debug!(%peer, %orig, %err, "outbound ended with an error"),
    }
}
