//! Outbound (15001): the app's connection, redirected here, goes where it asked to go — routed by
//! `Host` when it is HTTP, byte for byte otherwise. The proxy's own upstream connections are made
//! as the proxy UID, so they are not intercepted again.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::warn;

use super::{
    dispatch::{Shared, dispatch},
    metrics::{Direction, Refusal},
};

pub async fn handle(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let metrics = &shared.metrics;
    let _active = metrics.open(Direction::Outbound);
    let orig = match shared.orig_dst.outbound(&stream) {
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
    if Some(orig) == local
        || (orig.ip().is_loopback() && shared.config.own_ports().contains(&orig.port()))
    {
        warn!(%peer, %orig, "original destination is the proxy itself; closing");
        metrics.refuse(Direction::Outbound, Refusal::Loop);
        return;
    }
    dispatch(stream, peer, orig, Direction::Outbound, &shared).await;
}
