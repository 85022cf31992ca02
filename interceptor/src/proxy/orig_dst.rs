//! Where a captured connection was going: the seam between the proxy and interception.
//!
//! In a pod the answer comes from the socket (`SO_ORIGINAL_DST`, answered by netfilter or by our
//! getsockopt program; inbound, the local address sk_lookup steered to). Benchmarks and tests
//! without interception plug in their own answer, as linkerd2-proxy's `OrigDstAddr` does, so the
//! deployed binary carries no flag that fakes it.

use std::{io, net::SocketAddr};

use tokio::net::TcpStream;

use crate::socket;

/// The original destination of an accepted connection.
pub trait OrigDstAddr: Send + Sync + 'static {
    /// A connection accepted on the outbound capture port (15001).
    fn outbound(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
    /// A connection accepted on the inbound capture port (15006).
    fn inbound(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

/// The answer interception gives: what every deployed proxy uses.
#[derive(Clone, Copy, Debug, Default)]
pub struct FromSocket;

impl OrigDstAddr for FromSocket {
    fn outbound(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        socket::original_dst(stream)
    }

    fn inbound(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        // With sk_lookup the accepted socket's local address is the original destination; the
        // getsockopt program answers SO_ORIGINAL_DST with it too (and iptables REDIRECT needs it).
        socket::original_dst(stream).or_else(|_| stream.local_addr())
    }
}
