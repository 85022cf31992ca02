//! Upstream UDP sockets kept for the next query: creating, binding, connecting and registering
//! a socket per query costs more than the resolver's answer. A socket serves one query at a
//! time, at most [`MAX_USES`] queries (then a fresh one with a new random port, so a spoofer
//! cannot learn one port for good), and is dropped after a timeout or an error, so a late
//! answer never meets a later query.

use std::{
    collections::HashMap,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Mutex,
};

use tokio::net::UdpSocket;

/// Queries one socket carries before it is replaced.
pub const MAX_USES: u32 = 64;
/// Idle sockets kept per upstream (more in flight at once are simply closed afterwards).
const MAX_IDLE: usize = 16;

/// A connected UDP socket to one upstream and how many queries it carried.
#[derive(Debug)]
pub struct Upstream {
    pub sock: UdpSocket,
    uses: u32,
}

impl Upstream {
    /// A fresh socket (random port) connected to `upstream`.
    async fn connect(upstream: SocketAddr) -> io::Result<Self> {
        let local: SocketAddr = match upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local).await?;
        sock.connect(upstream).await?;
        Ok(Self { sock, uses: 0 })
    }
}

/// Idle upstream sockets by upstream address.
#[derive(Debug, Default)]
pub struct Sockets {
    idle: Mutex<HashMap<SocketAddr, Vec<Upstream>>>,
}

impl Sockets {
    /// An idle socket to `upstream`, or a new one; counted as one more use.
    pub async fn take(&self, upstream: SocketAddr) -> io::Result<Upstream> {
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&upstream)
            .and_then(Vec::pop);
        let mut sock = match idle {
            Some(sock) => sock,
            None => Upstream::connect(upstream).await?,
        };
        sock.uses += 1;
        Ok(sock)
    }

    /// Returns a socket whose query was answered; one that served its uses is closed.
    pub fn give_back(&self, upstream: SocketAddr, sock: Upstream) {
        if sock.uses >= MAX_USES {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(upstream).or_default();
        if list.len() < MAX_IDLE {
            list.push(sock);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reuses_a_socket_until_its_uses_are_spent() {
        let upstream: SocketAddr = "127.0.0.1:53".parse().expect("addr");
        let sockets = Sockets::default();
        let first = sockets.take(upstream).await.expect("socket");
        let port = first.sock.local_addr().expect("addr").port();
        sockets.give_back(upstream, first);
        for _ in 1..MAX_USES {
            let again = sockets.take(upstream).await.expect("socket");
            assert_eq!(again.sock.local_addr().expect("addr").port(), port);
            sockets.give_back(upstream, again);
        }
        let fresh = sockets.take(upstream).await.expect("socket");
        assert_eq!(fresh.uses, 1, "a new socket after {MAX_USES} uses");
    }
}
