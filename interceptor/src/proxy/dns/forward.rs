//! Asking the upstream resolver: UDP first, again over TCP when the answer is truncated (as a
//! stub resolver does), each nameserver in turn within one overall deadline. The query's bytes
//! go out as the app sent them (its EDNS OPT record included); the answer comes back as the
//! upstream sent it.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};

pub use super::sockets::Sockets;

/// Largest DNS message (TCP's two-byte length).
const MAX_MESSAGE: usize = 65535;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream nameserver (none in resolv.conf, and no original destination)")]
    NoUpstream,
    #[error("no answer from {0} in time")]
    Timeout(SocketAddr),
    #[error("asking {upstream}: {source}")]
    Io {
        upstream: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The nameservers of a resolv.conf (port 53), in order. Malformed lines are skipped, as the
/// libc resolver does.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (`fe80::1%eth0`) loses its scope: link-local resolvers
            // are not a case pods have.
            let ip: IpAddr = words.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Asks `upstreams` in turn until one answers, all within `total`. Returns the raw answer.
pub async fn forward(
    query: &[u8],
    upstreams: &[SocketAddr],
    total: Duration,
    sockets: &Sockets,
) -> Result<Vec<u8>, ForwardError> {
    let Some(id) = query.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return Err(ForwardError::NoUpstream);
    };
    let deadline = Instant::now() + total;
    let mut last = ForwardError::NoUpstream;
    for (i, upstream) in upstreams.iter().enumerate() {
        // Each remaining nameserver gets an equal share of the time left.
        let left = deadline.saturating_duration_since(Instant::now());
        let share = left / u32::try_from(upstreams.len() - i).unwrap_or(1);
        let attempt = Instant::now() + share;
        match ask_udp(query, id, *upstream, attempt, sockets).await {
            Ok(answer) if truncated(&answer) => {
                match ask_tcp(query, id, *upstream, attempt.max(deadline)).await {
                    Ok(full) => return Ok(full),
                    Err(err) => last = err,
                }
            }
            Ok(answer) => return Ok(answer),
            Err(err) => last = err,
        }
    }
    Err(last)
}

fn truncated(answer: &[u8]) -> bool {
    answer.get(2).is_some_and(|b| b & 0x02 != 0)
}

/// Whether `answer` is a response to query `id`.
fn answers(answer: &[u8], id: u16) -> bool {
    answer.len() >= 12 && answer[..2] == id.to_be_bytes() && answer[2] & 0x80 != 0
}

async fn ask_udp(
    query: &[u8],
    id: u16,
    upstream: SocketAddr,
    deadline: Instant,
    sockets: &Sockets,
) -> Result<Vec<u8>, ForwardError> {
    let io_err = |source| ForwardError::Io { upstream, source };
    // A connected socket of a random port (reused for a few queries, see `sockets`): answers
    // are matched by the socket, and a spoofed datagram needs the port as well as the id.
    let sock = sockets.take(upstream).await.map_err(io_err)?;
    sock.sock.send(query).await.map_err(io_err)?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        // A timeout or an error drops the socket: a late answer must not meet a later query.
        let n = timeout_at(deadline, sock.sock.recv(&mut buf))
            .await
            .map_err(|_| ForwardError::Timeout(upstream))?
            .map_err(io_err)?;
        if answers(&buf[..n], id) {
            buf.truncate(n);
            sockets.give_back(upstream, sock);
            return Ok(buf);
        }
        // Anything else on this socket is not our answer: keep waiting.
    }
}

async fn ask_tcp(
    query: &[u8],
    id: u16,
    upstream: SocketAddr,
    deadline: Instant,
) -> Result<Vec<u8>, ForwardError> {
    let io_err = |source| ForwardError::Io { upstream, source };
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        stream.set_nodelay(true)?;
        let len = u16::try_from(query.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
        let mut out = Vec::with_capacity(query.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(query);
        stream.write_all(&out).await?;
        loop {
            let len = stream.read_u16().await?;
            let mut answer = vec![0u8; usize::from(len)];
            stream.read_exact(&mut answer).await?;
            if answers(&answer, id) {
                return Ok(answer);
            }
        }
    };
    timeout_at(deadline, exchange)
        .await
        .map_err(|_| ForwardError::Timeout(upstream))?
        .map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# generated\nsearch default.svc.cluster.local svc.cluster.local\n\
                    nameserver 10.96.0.10\nnameserver fd00::a%eth0\nnameserver bogus\n\
                    options ndots:5\nnameserver\n";
        assert_eq!(
            parse_resolv_conf(text),
            vec![
                "10.96.0.10:53".parse().expect("addr"),
                "[fd00::a]:53".parse().expect("addr")
            ]
        );
        assert!(parse_resolv_conf("").is_empty());
    }

    #[tokio::test]
    async fn a_silent_upstream_fails_within_the_deadline() {
        // A bound socket that never answers.
        let silent = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = silent.local_addr().expect("addr");
        let query = [0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        let start = std::time::Instant::now();
        let err = forward(
            &query,
            &[addr, addr],
            Duration::from_millis(300),
            &Sockets::default(),
        )
        .await
        .expect_err("no answer");
        assert!(matches!(err, ForwardError::Timeout(_)), "{err}");
        assert!(start.elapsed() < Duration::from_secs(2));
    }
}
