//! DNS capture: the resolver a captured socket asked, so its replies can carry that address.

use crate::addr::Addr;

/// The port DNS capture takes (UDP and TCP).
pub const DNS_PORT: u16 = 53;

/// Value of `DNS_ORIG`, keyed by the app socket's cookie: written by sendmsg4/6 (unconnected
/// UDP) and connect4/6 (connected UDP), read by recvmsg4/6 to give the proxy's replies the
/// resolver's address as their source (a stub resolver drops replies from anyone else).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsOrig {
    /// The resolver the app asked, network byte order words (IPv4-mapped for IPv4; a
    /// dual-stack socket's IPv4 resolver too).
    pub ip: Addr,
    /// Its port, host byte order (53).
    pub port: u32,
    /// The pod the socket belongs to.
    pub pod_id: u32,
}
