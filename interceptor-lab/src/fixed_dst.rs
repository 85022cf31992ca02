//! Every connection "was going" to one address: the proxy benchmark runs the sidecar without
//! interception, so there is no SO_ORIGINAL_DST to ask.

use std::{io, net::SocketAddr};

use interceptor::proxy::orig_dst::OrigDstAddr;
use tokio::net::TcpStream;

/// Answers every original-destination question with the same address.
#[derive(Clone, Copy, Debug)]
pub struct FixedDst(pub SocketAddr);

impl OrigDstAddr for FixedDst {
    fn outbound(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }

    fn inbound(&self, _: &TcpStream) -> io::Result<SocketAddr> {
        Ok(self.0)
    }
}
