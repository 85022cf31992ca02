//! Socket options the proxy needs beyond tokio: the original destination and source binding.

#![allow(
    unsafe_code,
    reason = "IP_BIND_ADDRESS_NO_PORT, which socket2 does not wrap"
)]

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
};

use socket2::SockRef;
use tokio::net::TcpStream;

/// The destination the client asked for before interception: `getsockopt(SO_ORIGINAL_DST)`
/// (answered by netfilter with iptables, by the `orig_dst` program with eBPF). IPv4-mapped
/// answers are returned as IPv4.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let local = stream.local_addr()?;
    let v4 = match local.ip() {
        IpAddr::V4(_) => true,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some(),
    };
    let addr = if v4 {
        sock.original_dst()
    } else {
        sock.original_dst_ipv6()
    }?;
    let addr = addr
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP address"))?;
    Ok(canonical(addr))
}

/// `::ffff:a.b.c.d` → `a.b.c.d`.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// `IP_BIND_ADDRESS_NO_PORT`: when binding a source address before connect, let connect pick
/// the port per destination, so 127.0.0.6 is not limited to one connection per port.
pub fn set_bind_address_no_port(sock: &impl AsRawFd) -> io::Result<()> {
    const IP_BIND_ADDRESS_NO_PORT: libc::c_int = 24;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from a valid pointer.
    let ret = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Accepts the next connection. Running out of descriptors or memory (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM) is logged and retried after a pause instead of spinning; errors that
/// concern only the connection being accepted (ECONNABORTED, EPROTO, …) are retried at once.
pub async fn accept_with_backoff(
    listener: &tokio::net::TcpListener,
) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) =>
            {
                tracing::warn!(%err, "accept failed; retrying in 50 ms");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(err) => tracing::debug!(%err, "accept: connection lost before it was accepted"),
        }
    }
}
