//! Inbound (15006): a connection to the pod's address, steered here, goes on to that address
//! (the article's `ORIGINAL_DST` inbound cluster) from 127.0.0.6, as Istio does since 1.10:
//! an app bound to its pod IP is reachable, one bound only to 127.0.0.1 stays private.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::warn;

use super::{
    dispatch::{Shared, dispatch},
    metrics::{Direction, Refusal},
};
use crate::socket;

pub async fn handle(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let metrics = &shared.metrics;
    let _active = metrics.open(Direction::Inbound);
    let orig = match shared.orig_dst.inbound(&stream) {
        Ok(orig) => socket::canonical(orig),
        Err(err) => {
            warn!(%peer, %err, "inbound connection without a local address; closing");
            metrics.refuse(Direction::Inbound, Refusal::NoOriginalDst);
            return;
        }
    };
    // Our own passthrough hop coming back would be a loop: refuse it rather than spin.
    if socket::canonical(peer).ip() == shared.config.passthrough_for(&orig) {
        warn!(%peer, %orig, "inbound connection from the passthrough address: a loop; closing");
        metrics.refuse(Direction::Inbound, Refusal::Loop);
        return;
    }
    if shared.config.own_ports().contains(&orig.port()) {
        warn!(%peer, %orig, "inbound connection to the proxy's own port; closing");
        metrics.refuse(Direction::Inbound, Refusal::Loop);
        return;
    }
    dispatch(stream, peer, orig, Direction::Inbound, &shared).await;
}
